"""Compile every Triton kernel ahead of time for sm_80 and sm_90 and report registers, spills, shared memory and
tensor-core instructions.

No GPU is needed: each kernels/*.py module that exposes ``aot_specs`` (see kernels/_report.py) lists the kernel
variants a model launches, with the block sizes and warps its launcher picks; this script compiles them at the
shapes of ViT-B/16, L/16 and H/14 in fp16 and bf16, reads the cubins with the cuobjdump bundled with Triton and the
PTX for the MMA instructions, prints a table, writes JSON and exits 1 if any kernel spills (STACK/LOCAL > 0),
exceeds the shared-memory limit of one block, issues mma.sync instead of wgmma on sm_90, or fails to compile. It
also lists the variants whose wgmma ptxas serialised (its note C7515, with the reason it gives; reported, not
failed: which of them cost time needs a GPU).

    python bench/kernel_report.py [--models vit_base_patch16_224 ...] [--kernels layer_norm ...] [--jobs N]
                                  [--out PATH]
"""
import argparse
import collections
import concurrent.futures
import functools
import multiprocessing as mp
import os
import pathlib
import sys
import time
import traceback

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402  first: it loads the standard library's profile before fastvit's imports ask for it

import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fastvit.kernels._report import DTYPES, MODELS, SMEM_LIMIT, collect_specs, compile_spec, kernel_modules  # noqa: E402


_JOBS = []  # (model, dtype, module, spec, arch) of the running report: forked workers read it by index


def _compile_key(spec, arch):
    """What a compilation depends on. Models often launch the same variant (B/16's and L/16's LayerNorms both take
    1024-wide blocks; 1186 records, 732 variants), whose binary is compiled once for all of its records."""
    return (id(spec.fn), repr(tuple(spec.signature.items())), repr(sorted(spec.constexprs.items())), spec.aligned,
            spec.num_warps, spec.num_stages, arch)


def _compile_job(index):
    """:func:`compile_spec`'s result for one job, or its error."""
    _, _, _, spec, arch = _JOBS[index]
    try:
        return compile_spec(spec, arch)
    except Exception as exc:  # a kernel that does not compile fails the report, not the run
        traceback.print_exc()
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _record(job, result):
    """One record of the report: the job's identity and its variant's compile result."""
    model, dtype, module, spec, arch = job
    rec = {"model": model, "dtype": dtype, "module": module, "kernel": spec.name, "label": spec.label,
           "arch": f"sm_{arch}", "num_warps": spec.num_warps, "num_stages": spec.num_stages,
           "constexprs": {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in spec.constexprs.items()}}
    rec.update(result)
    return rec


def run(models, dtypes, archs, modules, jobs=1):
    """One record per (model, dtype, kernel variant, arch), in a fixed order, with a progress bar over the distinct
    compilations (:func:`_compile_key`; a full report takes minutes). ``jobs`` > 1 compiles in that many forked
    processes (compiling is CPU-bound and each kernel stands alone), which divides the time by about as much."""
    _JOBS[:] = [(model, dtype, module, spec, arch) for model in models for dtype in dtypes
                for module, spec in collect_specs(MODELS[model], dtype, modules) for arch in archs
                if arch in spec.archs]
    first = {}  # compile key -> the first job with it
    keys = [first.setdefault(_compile_key(spec, arch), i) for i, (_, _, _, spec, arch) in enumerate(_JOBS)]
    unique = sorted(set(keys))
    progress = functools.partial(tqdm, total=len(unique), desc="compiling", unit="kernel", mininterval=5)
    if jobs <= 1 or len(unique) <= 1:
        results = [_compile_job(i) for i in progress(unique)]
    else:
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(unique)), mp_context=mp.get_context("fork")) as pool:
            results = list(progress(pool.map(_compile_job, unique, chunksize=4)))
    compiled = dict(zip(unique, results))
    return [_record(job, compiled[k]) for job, k in zip(_JOBS, keys)]


def print_table(records):
    head = f"{'model':<22} {'dtype':<5} {'arch':<6} {'kernel':<24} {'variant':<28} {'warps':>5} {'regs':>5} " \
           f"{'stack':>5} {'local':>5} {'smem':>7} {'mma':<8}  ok"
    print(head)
    print("-" * len(head))
    for r in records:
        if "error" in r:
            print(f"{r['model']:<22} {r['dtype']:<5} {r['arch']:<6} {r['kernel']:<24} {r['label']:<28} "
                  f"COMPILE ERROR: {r['error'][:80]}")
            continue
        print(f"{r['model']:<22} {r['dtype']:<5} {r['arch']:<6} {r['kernel']:<24} {r['label']:<28} "
              f"{r['num_warps']:>5} {r['registers']:>5} {r['stack']:>5} {r['local']:>5} {r['shared']:>7} "
              f"{r['mma'] + ('*' if r['wgmma_serialized'] else ''):<8}  "
              f"{'yes' if r['ok'] else 'NO'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--archs", nargs="+", type=int, default=sorted(SMEM_LIMIT), choices=sorted(SMEM_LIMIT))
    p.add_argument("--kernels", nargs="+", default=None, choices=kernel_modules(),
                   help="kernel modules to include (default: every one with aot_specs)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compiles at a time, each in its own process (default: one per CPU core)")
    p.add_argument("--out", default="results/kernel_report.json",
                   help="the .json file to write, or a folder (any other path: made if missing) to write "
                        "kernel_report.json in")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    out = pathlib.Path(args.out)
    # a folder, as the other scripts' --out
    if out.is_dir() or args.out.endswith(os.sep) or out.suffix.lower() != ".json":
        out = out / "kernel_report.json"
    out = common.out_dir(out.parent, p) / out.name

    t_start = time.perf_counter()
    records = run(args.models, args.dtypes, args.archs, args.kernels, args.jobs)
    print_table(records)
    bad = [r for r in records if not r["ok"]]
    common.write_result(out, {"triton": triton.__version__, "ok": not bad and bool(records), "kernels": records}, args,
                        t_start)
    serialized = sorted({(r["kernel"], r["label"], r["wgmma_serialized_reason"]) for r in records
                         if r.get("wgmma_serialized")})
    if serialized:
        print(f"\nwgmma* = ptxas serialised the wgmma (note C7515: the tensor cores wait for each one in turn), "
              f"in {len(serialized)} variants:")
        for kernel, label, _ in serialized:
            print(f"  {kernel:<24} {label}")
        for reason, count in sorted(collections.Counter(r for _, _, r in serialized).items()):
            print(f"ptxas's reason in {count} of them: {reason or '(none given)'}")
    print(f"\n{len(records)} compiled kernels, {len(bad)} failing; wrote {out}")
    if not records:
        print("no kernel specs found", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
