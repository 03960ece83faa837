#!/usr/bin/env bash
# Every GPU measurement of the speed work on one GPU, as many as --budget holds, by default in the order of
# STEPS below (eager throughput first; steps named on the command line run in the order given):
#
#   numerics      bench/numerics.py (every op fwd/bwd at ViT-B/16 and H/14 shapes, tiny and B/16, fp32/fp16/bf16)
#   ops           pytest-benchmark micro-benchmarks of each op, fastvit vs torch, and of our attention's dK/dV
#                 tilings side by side (bench/test_ops_benchmark.py)
#   overhead      bench/overhead.py: host time per call, launches stubbed on this machine's CPU (as CI runs it),
#                 then with the real launches on the GPU (--device cuda, into overhead_cuda/)
#   latency       bench/throughput.py --model B/16 at micro-batch 1, train and infer, eager: where the host
#                 decides the speed, with the real launches (what overhead.py stubs) and the per-call choices of a
#                 GPU run (fused GEMM, attention kernel), fastvit against timm
#   profile       bench/profile.py --model B/16: training-step time by category, fastvit and timm
#   profilec      the same with --compile (into profile_compile/): what Inductor does to timm's step that makes it
#                 the bar, category by category
#   b16 l16 h14   bench/throughput.py: train and infer, the eager columns (fastvit and timm)
#   b16c l16c h14c  the same with --compile: all four columns side by side (eager and torch.compile of each); a
#                 cold Inductor cache compiles each model twice per mode, which takes most of these steps' time
#   b16ct         B/16 --compile --backend torch: fastvit's torch reference ops, which Inductor can fuse, in place of
#                 its Triton kernels, which it calls as they are (does compiling fastvit want the kernels at all?)
#   resid         bench/residual_dtype.py --model B/16: the residual stream in fp32 or bf16, step time and bytes
#                 kept side by side, and one digits run each (which default is the better one)
#   loader        bench/loader.py: decoded + augmented images/s (PIL workers, shards, --decode gpu) beside the
#                 model's training images/s from the b16 (or b16c) step (the data issue's goal); by default last,
#                 with what is left of the budget (skipped without failing when too little is left; named, it must
#                 run); its shard paths need webdataset's wheels carried in .whl/ on a lent machine (below)
#
# JSON (and the PNGs) go to bench/results/<gpu>/, <gpu> from torch.cuda.get_device_name (lower case, [a-z0-9-]);
# the choices fastvit.autotune measured on the way (attention kernel, cuBLAS or which fused GEMM, per call shape) to
# bench/results/<gpu>/autotune/autotune.json; Chrome traces to bench/results/<gpu>/traces/ (not committed: too
# large). Then bench/tables.py writes
# bench/results/<gpu>/summary.md, the tables the README quotes, with date, GPU, torch and triton versions.
# Commit the folder as written; never edit its files by hand.
#
#   bench/gpu_suite.sh                 # all steps
#   bench/gpu_suite.sh profile b16     # some steps (names above)
#   bench/gpu_suite.sh --dry-run       # CPU: every step at smoke size into a temporary folder (checks plumbing)
#   bench/gpu_suite.sh --budget 560 --archive FILE.tgz   # (the defaults: budget 560 s, no archive)
#
# Each step runs under its own time limit (seconds below), so one slow step cannot use up the GPU session; a step
# that fails or runs out of time is reported and the others still run; the exit status is 1 if any failed. Step
# sizes are chosen for the limit: one warm-up and one or two timed global batches; L/16 and H/14 time a global batch
# of 2048 and 1024 eager (images/s hardly depend on it: accumulation repeats the same micro-step), and
# 1024 and 512 compiled, where compiling both models twice already takes most of the step. The eager steps come
# first, so that a compile that runs out of time still leaves the eager figures. The whole suite ends
# within --budget seconds (a lent GPU machine runs one command for 10 minutes at most): a step gets at most what is
# left of it after a reserve for the tables, and one that would get under 20 s is skipped (and counts as failed).
# --archive writes the results folder, traces left out, as one .tgz (a lent machine hands back a few files only),
# also when steps failed; unpack it with `tar xzf FILE.tgz -C bench/results`. On such a machine:
#
#   PYTHONUNBUFFERED=1 bash bench/gpu_suite.sh --archive $OUT/gpu_results.tgz 2>&1 | tee $OUT/gpu_suite.log
#
# Such a machine has no webdataset and no network: before the run fetch its wheels here into .whl/ (git-ignored),
#   python -m pip download --no-deps --only-binary=:all: -d .whl webdataset==1.0.2 braceexpand==0.1.7
# and carry .whl with the run; the suite installs them into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
STEPS=()
BUDGET=560
ARCHIVE=
RESERVE=30  # seconds kept for the tables and the archive
while [ $# -gt 0 ]; do
    arg=$1
    shift
    case "$arg" in
        --dry-run) DRY=1 ;;
        --budget|--archive)
            [ $# -gt 0 ] || { echo "gpu_suite.sh: $arg needs a value" >&2; exit 2; }
            if [ "$arg" = --budget ]; then
                [[ $1 =~ ^[0-9]+$ ]] || { echo "gpu_suite.sh: --budget takes whole seconds, got '$1'" >&2; exit 2; }
                BUDGET=$1
            else
                ARCHIVE=$1
            fi
            shift ;;
        numerics|ops|overhead|latency|profile|profilec|b16|l16|h14|b16c|l16c|h14c|b16ct|resid|loader)
            STEPS+=("$arg") ;;
        -h|--help) sed -n '2,48p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$arg'" \
                "(steps: numerics ops overhead latency profile profilec b16 l16 h14 b16c l16c h14c b16ct resid loader;" \
                "--dry-run, --budget S, --archive F)" >&2
           exit 2 ;;
    esac
done
# unnamed, the loader step comes last and is optional: it gets what the others leave of the budget
OPTIONAL=
[ ${#STEPS[@]} -eq 0 ] && STEPS=(b16 l16 h14 numerics profile ops overhead latency b16c l16c h14c b16ct resid \
                                  profilec loader) \
    && OPTIONAL=loader
PY=${PYTHON:-$(command -v python || command -v python3)}

# fastvit must import as installed (setup.py maps kernels/ to fastvit.kernels). A fresh GPU machine has torch,
# triton and timm but not this package, and no network: install it in place, without an index, dependencies or a
# build environment (its setuptools and wheel build it), where it is missing.
if ! $PY -c "import fastvit.kernels" 2>/dev/null; then
    echo "== installing fastvit in place: $PY -m pip install --no-index --no-deps --no-build-isolation -e ."
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
# The loader step's shard paths need webdataset, which the lent GPU machines' image lacks (and they have no
# network): wheels carried in .whl/ (git-ignored; README, *Benchmarks*) are installed into /tmp/site for this run.
if ! $PY -c "import webdataset" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "== installing the wheels in .whl/ into /tmp/site (webdataset, for the loader's shard paths)"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "== webdataset is not installed: the loader step will skip its shard paths (carry its wheels in .whl/)"
    fi
fi

if [ "$DRY" = 1 ]; then
    OUT=$(mktemp -d /tmp/gpu_suite_dry.XXXXXX)
    GPU=dry-run
else
    GPU=$($PY -c "
import re, sys, torch
if not torch.cuda.is_available():
    sys.exit('gpu_suite.sh needs a CUDA GPU (torch.cuda.is_available() is False); '
             'bench/gpu_suite.sh --dry-run checks the steps on CPU')
print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))") || exit 1
    OUT=bench/results/$GPU
fi
mkdir -p "$OUT/traces"
# fastvit.autotune's measured choices (attention kernel, GEMM path per call shape) land beside the results
export FASTVIT_CACHE_DIR="$OUT/autotune"
# winners timed on other fastvit code are not reused anyway: drop them, so the folder lists this code's choices
$PY -c "from fastvit import autotune; n = autotune.forget_other_code(); n and print(f'== autotune: dropped {n} \
choices timed on other fastvit code')"
echo "== gpu_suite: ${STEPS[*]} -> $OUT ($GPU)"

FAILED=()
step() {  # step NAME LIMIT_SECONDS COMMAND...: at most what is left of the budget (timeout may add 20 s to kill)
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - RESERVE - SECONDS - 20))
    [ "$name" = tables ] && left=$((BUDGET - SECONDS - 20))
    if [ $left -lt 20 ]; then
        if [ "$name" = "$OPTIONAL" ]; then
            echo "== $name: skipped (optional), ${left}s left of the ${BUDGET}s budget"
        else
            echo "== $name: skipped, ${left}s left of the ${BUDGET}s budget"
            FAILED+=("$name(skipped)")
        fi
        return
    fi
    [ $left -lt "$limit" ] && limit=$left
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    [ $rc -ne 0 ] && FAILED+=("$name(exit $rc)")
}

for s in "${STEPS[@]}"; do
    if [ "$DRY" = 1 ]; then
        case $s in
            numerics) step numerics 600 $PY bench/numerics.py --quick --models tiny --dtypes fp32 --out "$OUT" ;;
            ops) step ops 600 $PY -m pytest -q -p no:cacheprovider bench/test_ops_benchmark.py --benchmark-disable ;;
            overhead) step overhead 300 $PY bench/overhead.py --number 5 --repeat 2 --out "$OUT" ;;
            latency) step latency 300 $PY bench/throughput.py --smoke --model tiny --micro-batch 1 --global-batch 4 \
                         --steps 1 --warmup 1 --out "$OUT/throughput_b16_batch1" ;;
            profile) step profile 600 $PY bench/profile.py --smoke --global-batch 64 --micro-batch 32 --warmup 1 \
                         --out "$OUT" ;;
            profilec) step profilec 900 $PY bench/profile.py --smoke --compile --global-batch 64 --micro-batch 32 \
                          --warmup 1 --out "$OUT/profile_compile" ;;
            b16|l16|h14) step "$s" 300 $PY bench/throughput.py --smoke --model tiny --mode train \
                             --global-batch 512 --micro-batch 256 --steps 1 --warmup 1 --out "$OUT/throughput_$s" ;;
            b16c|l16c|h14c) step "$s" 900 $PY bench/throughput.py --smoke --model tiny --mode train --compile \
                             --global-batch 512 --micro-batch 256 --steps 1 --warmup 1 \
                             --out "$OUT/throughput_${s%c}_compile" ;;
            b16ct) step b16ct 900 $PY bench/throughput.py --smoke --model tiny --mode train --compile --backend torch \
                       --global-batch 512 --micro-batch 256 --steps 1 --warmup 1 \
                       --out "$OUT/throughput_b16_compile_torch" ;;
            resid) step resid 300 $PY bench/residual_dtype.py --model tiny --steps 1 --seeds 1 --digits-steps 3 \
                       --out "$OUT" ;;
            loader) step loader 300 $PY bench/loader.py --images 16 --img-size 64 --batch 8 --steps 1 --warmup 1 \
                        --workers 1 --paths folder,shards --out "$OUT" ;;
        esac
        continue
    fi
    case $s in
        numerics) step numerics 120 $PY bench/numerics.py --models tiny,B/16 --out "$OUT" ;;
        ops) step ops 60 $PY -m pytest -q -p no:cacheprovider bench/test_ops_benchmark.py --benchmark-only \
                 --benchmark-max-time=0.2 --benchmark-json="$OUT/ops_benchmark.json" ;;
        overhead) step overhead 30 $PY bench/overhead.py --out "$OUT"
                  step overhead_cuda 90 $PY bench/overhead.py --device cuda --out "$OUT/overhead_cuda" ;;
        latency) step latency 120 $PY bench/throughput.py --model B/16 --micro-batch 1 --global-batch 32 --steps 3 \
                     --warmup 1 --out "$OUT/throughput_b16_batch1" ;;
        profile) step profile 60 $PY bench/profile.py --model B/16 --warmup 1 --steps 1 --out "$OUT" ;;
        profilec) step profilec 300 $PY bench/profile.py --model B/16 --compile --warmup 1 --steps 1 \
                      --out "$OUT/profile_compile" ;;
        b16) step b16 90 $PY bench/throughput.py --model B/16 --steps 2 --warmup 1 --out "$OUT/throughput_b16" ;;
        l16) step l16 90 $PY bench/throughput.py --model L/16 --global-batch 2048 --steps 1 --warmup 1 \
                 --out "$OUT/throughput_l16" ;;
        h14) step h14 100 $PY bench/throughput.py --model H/14 --global-batch 1024 --steps 1 --warmup 1 \
                 --out "$OUT/throughput_h14" ;;
        b16c) step b16c 300 $PY bench/throughput.py --model B/16 --compile --steps 1 --warmup 1 \
                  --out "$OUT/throughput_b16_compile" ;;
        l16c) step l16c 300 $PY bench/throughput.py --model L/16 --compile --global-batch 1024 --steps 1 \
                  --warmup 1 --out "$OUT/throughput_l16_compile" ;;
        h14c) step h14c 300 $PY bench/throughput.py --model H/14 --compile --global-batch 512 --steps 1 \
                  --warmup 1 --out "$OUT/throughput_h14_compile" ;;
        b16ct) step b16ct 300 $PY bench/throughput.py --model B/16 --compile --backend torch --steps 1 --warmup 1 \
                   --out "$OUT/throughput_b16_compile_torch" ;;
        resid) step resid 150 $PY bench/residual_dtype.py --model B/16 --micro-batch 256 --seeds 1 --out "$OUT" ;;
        loader) model=$OUT/throughput_b16/throughput.json  # the model's img/s, when the b16 (or b16c) step has run
                [ -f "$model" ] || model=$OUT/throughput_b16_compile/throughput.json
                step loader 150 $PY bench/loader.py $([ -f "$model" ] && echo --throughput "$model") --out "$OUT" ;;
    esac
done
# traces are large: keep them out of the committed folder's JSON
mv "$OUT"/trace_*.json "$OUT"/profile_compile/trace_*.json "$OUT/traces/" 2>/dev/null
step tables 60 $PY bench/tables.py "$OUT"
if [ -n "$ARCHIVE" ]; then
    tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" --exclude=traces "$(basename "$OUT")" \
        && echo "== archive: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1); tar xzf it -C bench/results)" \
        || FAILED+=("archive")
fi
echo "== gpu_suite: $SECONDS s in all; results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "== gpu_suite: FAILED: ${FAILED[*]}" >&2
    exit 1
fi
