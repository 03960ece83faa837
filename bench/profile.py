#!/usr/bin/env python
"""Where a training step's time goes, fastvit beside timm: device time by category under torch.profiler.

Each side (fastvit and timm on the same weights, or both under torch.compile with --compile) runs --warmup
training steps, then --steps profiled ones (the same step as bench/throughput.py: global batch by accumulation,
DDP, AdamW, bf16 autocast). Every device kernel is put in one category:

  GEMM, attention forward, attention backward, LayerNorm, GELU/bias/elementwise, casts and copies, optimizer,
  communication, other, and idle

printed in ms per step and % of the step. A kernel's category comes from the names around it: first the
enclosing regions that decide it wherever they sit (optimizer step, collectives, a fused op such as
``fastvit::add_layer_norm_bwd``, attention, LayerNorm, GELU, patch embedding), outermost first; else its own
name (GEMMs, copies) and then its launching ops', innermost first; else "GELU/bias/elementwise" for a known
pointwise kernel and "other" for the rest. ``idle`` is the step's wall time minus the time some kernel ran
(the union of kernel intervals): the GPU waiting on the host. Each kernel counts once, found from the device's
own kernel events and tied to the runtime call that launched it by the profiler's correlation id (or to the op
that launched it, :func:`_launcher`); profile.json's ``unlinked_ms`` is the kernel time the profiler tied to
neither (categorised by the kernel's name alone), and ``unlinked_top`` the costliest such kernels.

On CPU (CI smoke) the same table comes from CPU time: each op's self time, categorised the same way, and
``idle`` is the time the step spent outside any op (Python, the framework).

Writes ``profile.json`` (with the costliest kernels or ops of each category, and in ``top_sites`` the costliest
kernel-and-caller pairs: a copy kernel by the op that asked for it), one Chrome trace per side
(``trace_<side>.json``, for chrome://tracing or Perfetto) and ``profile.png`` (stacked bars, ms per step) to --out.

    python bench/profile.py --model B/16                 # GPU
    python bench/profile.py --model B/16 --compile
    python bench/profile.py --smoke                      # CPU: tiny model, small batch
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

common.reexec_with_interpreter()

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import throughput  # noqa: E402
from fastvit import ops  # noqa: E402
from fastvit.config import plural  # noqa: E402
from fastvit.train import distributed  # noqa: E402

STEP = "fastvit-bench-step"
TOP = 8  # kernels (GPU) or ops (CPU) listed per category in profile.json, the costliest first
SITE_DEPTH = 3  # enclosing ops named per kernel in profile.json's top_sites (which copy is whose)
CATEGORIES = ("GEMM", "attention forward", "attention backward", "LayerNorm", "GELU/bias/elementwise",
              "casts and copies", "optimizer", "communication", "other", "idle")
# Regions that claim every kernel inside them, checked outermost first (an optimizer step's elementwise kernels
# are optimizer time; a fused op's internal matmuls on the CPU fallback are that op's time).
_REGIONS = [
    ("optimizer", r"^Optimizer\.|optimizer|_foreach_|multi_tensor_apply|fused_adam"),
    ("communication", r"nccl|c10d|gloo|all_?reduce|all_?gather|reduce_?scatter|broadcast"),
    ("attention backward", r"(attention|attn|sdpa|fmha|flash).*(backward|bwd|bprop)"),
    ("attention forward", r"attention|attn|sdpa|fmha|flash_fwd"),
    ("LayerNorm", r"layer_?norm|_add_ln_"),
    ("GELU/bias/elementwise", r"gelu"),
    ("GEMM", r"patch_embed|convolution|conv2d|cudnn_conv"),
]
# A kernel's or op's own kind, checked innermost first.
_KINDS = [
    ("GEMM", r"gemm|matmul|\bmm\b|::mm\b|addmm|bmm|::linear|cutlass|cublas|nvjet|xmma|wgmma|triton_tem"),
    ("casts and copies", r"copy|::to\b|_to_copy|cast|memcpy|memset|::cat\b|catarray|clone|contiguous"),
    ("GELU/bias/elementwise", r"elementwise|::add|::mul|::sub|::div|::sum|reduce|triton_poi|triton_red|"
                              r"triton_per|dropout|softmax|::fill|::zero|::where|::neg|::exp|::rsqrt"),
]
# fastvit's LayerNorm + Linear and GELU + Linear autograd nodes hold GEMMs too: they claim nothing
_NOT_A_REGION = re.compile(r"LinearFn")
_REGIONS = [(c, re.compile(p, re.I)) for c, p in _REGIONS]
_KINDS = [(c, re.compile(p, re.I)) for c, p in _KINDS]


def classify(names):
    """The category of a kernel (or a CPU op) from ``names``: its own name, then its enclosing ops' names from
    the innermost outwards (see the module doc for the rules)."""
    for name in reversed(names):
        if _NOT_A_REGION.search(name):
            continue
        for category, pattern in _REGIONS:
            if pattern.search(name):
                return category
    for name in names:
        for category, pattern in _KINDS:
            if pattern.search(name):
                return category
    return "other"


def _ancestors(event):
    """Names of ``event``'s enclosing ops, innermost first, below the step annotation."""
    names = []
    parent = event.cpu_parent
    while parent is not None and parent.name != STEP:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def _union_us(intervals):
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _is_runtime_call(name: str) -> bool:
    """Whether an event named ``name`` is a CUDA runtime or driver call (cudaLaunchKernel, cuLaunchKernelEx,
    cudaMemcpyAsync, ...) rather than an op."""
    return name.startswith("cu")


def _launcher(kernel, calls, ops):
    """The CPU event whose enclosing ops categorise ``kernel``, or None where the profiler linked it to none.

    The profiler numbers events in two spaces: a kernel and the runtime or driver call that launched it share
    CUPTI's correlation id (their ``id``), while ops carry torch's own counter, which a kernel names as its
    ``linked_correlation_id`` (the op innermost at the launch). The two counters overlap, so an id names a call
    only among calls and an op only among ops. The launching call is found first (every torch version);
    else the linked op, where torch records that link on the event (newer than the GPU machine's 2.11)."""
    call = calls.get(kernel.id)
    return call if call is not None else ops.get(getattr(kernel, "linked_correlation_id", 0))


def _site(name, ops):
    """``name`` with where it ran: "kernel <- innermost op < its caller < ...", SITE_DEPTH ops at most."""
    ops = [o for o in ops if not _is_runtime_call(o)][:SITE_DEPTH]  # the runtime call adds nothing
    return f"{name} <- {' < '.join(ops)}" if ops else name


def categorise(events, device_type):
    """(microseconds per category, microseconds per (category, kernel or op name), microseconds per (category,
    :func:`_site` of that kernel or op), busy microseconds, step wall microseconds, microseconds per name of the
    kernels linked to no CPU event) from a profiler's events.

    GPU: every kernel once, categorised with the CPU event that launched it and that event's enclosing ops
    (:func:`_launcher`; a kernel linked to none by its own name alone), busy = the union of the kernels' intervals.
    CPU: every op's self time, busy = their sum.
    """
    totals = dict.fromkeys(CATEGORIES, 0.0)
    by_name, by_site = collections.Counter(), collections.Counter()
    steps = [e for e in events if e.name == STEP and e.device_type == DeviceType.CPU]
    wall = sum(e.time_range.end - e.time_range.start for e in steps)
    unlinked = collections.Counter()
    if device_type == "cuda":
        calls, ops = {}, {}
        for e in events:
            if e.device_type == DeviceType.CPU and not e.is_async and e.id:
                (calls if _is_runtime_call(e.name) else ops)[e.id] = e
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        for k in kernels:
            launcher = _launcher(k, calls, ops)
            duration = k.time_range.end - k.time_range.start
            if launcher is None:
                unlinked[k.name] += duration
            names = [k.name] + ([] if launcher is None else [launcher.name, *_ancestors(launcher)])
            category = classify(names)
            totals[category] += duration
            by_name[category, k.name] += duration
            by_site[category, _site(k.name, names[1:])] += duration
        busy = _union_us([(k.time_range.start, k.time_range.end) for k in kernels])
    else:
        busy = 0.0
        for e in events:
            if e.device_type == DeviceType.CPU and e.name != STEP and not e.is_async:
                ancestors = _ancestors(e)
                category = classify([e.name, *ancestors])
                totals[category] += e.self_cpu_time_total
                by_name[category, e.name] += e.self_cpu_time_total
                by_site[category, _site(e.name, ancestors)] += e.self_cpu_time_total
                busy += e.self_cpu_time_total
    totals["idle"] = max(wall - busy, 0.0)
    return totals, by_name, by_site, busy, wall, unlinked


def profile_side(runner, warmup, steps, device, trace_path):
    """Warm ``runner`` up, profile ``steps`` steps, write its Chrome trace; per-step ms by category."""
    for _ in range(warmup):
        runner.step()
    if device.type == "cpu":
        # Kineto's log lines (its stages, and "gpuGetDeviceCount failed" without a GPU) say nothing on CPU; on a
        # GPU they stay, since a CUPTI error there explains a table without kernels
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                runner.step()
    prof.export_chrome_trace(str(trace_path))
    totals, by_name, by_site, busy, wall, unlinked = categorise(prof.events(), device.type)
    step_ms = wall / steps / 1e3

    def top(counter, category):
        return [[name, t / steps / 1e3] for (cat, name), t in counter.most_common() if cat == category][:TOP]
    rows = {c: {"ms": us / steps / 1e3, "pct": 100 * us / wall if wall else 0.0, "top": top(by_name, c),
                "top_sites": top(by_site, c)}
            for c, us in totals.items()}
    # kernel time in the categories (idle aside) exceeds busy time where kernels overlap (streams running at once)
    return {"step_ms": step_ms, "busy_ms": busy / steps / 1e3, "unlinked_ms": sum(unlinked.values()) / steps / 1e3,
            "unlinked_top": [[name, t / steps / 1e3] for name, t in unlinked.most_common(TOP)],
            "categories": rows, "trace": trace_path.name}


def stacked_bars(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(result["sides"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sides) + 3), 4.5))
    bottom = [0.0] * len(sides)
    for cat in CATEGORIES:
        heights = [result["sides"][s]["categories"][cat]["ms"] for s in sides]
        ax.bar(sides, heights, 0.6, bottom=bottom, label=cat)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel(f"{result['time_source']} ms per step")
    common.set_title(ax, f"{result['model']} training step, {result['dtype']}, micro {result['micro_batch']} x "
                         f"accum {result['accum_steps']}" + (" (SMOKE)" if result["smoke"] else "")
                         + common.interpreter_note())
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result):
    sides = list(result["sides"])
    lines = [f"{'category':24s}" + "".join(f"{s:>26s}" for s in sides)]
    for cat in CATEGORIES + ("step",):
        cells = []
        for s in sides:
            side = result["sides"][s]
            if cat == "step":
                cells.append(f"{side['step_ms']:12.2f} ms  100.0%")
            else:
                c = side["categories"][cat]
                cells.append(f"{c['ms']:12.2f} ms {c['pct']:6.1f}%")
        lines.append(f"{cat:24s}" + "".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="B/16, L/16, H/14, tiny, mini or a registry name (GPU default "
                                                 "B/16; CPU: tiny)")
    p.add_argument("--compile", action="store_true", help="profile both models under torch.compile")
    p.add_argument("--compile-mode", default="default", choices=throughput.COMPILE_MODES)
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="fastvit's kernels")
    p.add_argument("--dtype", default="bf16", choices=list(common.DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="default 4096 (CPU smoke: 128; 8 for a full-size model)")
    p.add_argument("--micro-batch", type=int, default=None, help="per rank (default: throughput's table)")
    p.add_argument("--steps", type=int, default=1, help="profiled steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps per side first")
    p.add_argument("--smoke", action="store_true", help="the small CPU configuration, on any machine")
    p.add_argument("--interpret", action="store_true", help="re-run with TRITON_INTERPRET=1 (very slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="output folder")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.model is not None and len(common.model_list(p, args.model)) > 1:
        p.error(f"--model {args.model}: bench/profile.py profiles one model at a time")
    common.check_step_args(p, args)
    common.out_dir(args.out, p)  # run() writes there
    use_cuda = torch.cuda.is_available() and not args.smoke
    smoke = args.smoke or not use_cuda
    if smoke:
        args.model = args.model or "tiny"
        # a full-size model (B/16 at 224 px) on CPU: 8 images, not 128 (about a minute, not five)
        small = args.model in ("tiny", "mini")
        args.global_batch = args.global_batch or (128 if small else 8)
        args.micro_batch = args.micro_batch or min(64 if small else 4, args.global_batch)
    args.model = args.model or "B/16"
    args.global_batch = args.global_batch or 4096
    with distributed(device="cuda" if use_cuda else "cpu") as env:
        if env.world != 1:
            raise SystemExit("bench/profile.py profiles one process; run it without torchrun")
        run(args, env.device, smoke)


def run(args, device, smoke):
    dtype = common.DTYPES[args.dtype]
    micro = args.micro_batch or min(throughput.GPU_MICRO_BATCH.get(common.canonical(args.model), 32),
                                    args.global_batch)
    if args.global_batch % micro:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the micro-batch {micro}")
    accum = args.global_batch // micro
    ours, ref = common.build_pair(args.model, backend=args.backend, num_classes=10 if smoke else 1000,
                                  seed=args.seed)
    out = common.out_dir(args.out)
    result = {"model": args.model, "smoke": smoke, "device": str(device), "dtype": args.dtype,
              "backend": args.backend, "compile": args.compile,
              "compile_mode": args.compile_mode if args.compile else None, "micro_batch": micro,
              "accum_steps": accum, "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup,
              "time_source": "GPU kernel" if device.type == "cuda" else "CPU op self",
              "categories": list(CATEGORIES), "sides": {}}
    t0 = time.perf_counter()
    for name, model in (("fastvit", ours), ("timm", ref)):
        side = name + ("_compile" if args.compile else "")
        print(f"{side}: {plural(args.warmup, 'warm-up step')}"
              + (" (the first one compiles: a minute or more)" if args.compile else "")
              + f", then {plural(args.steps, 'profiled step')} of {accum} x {micro} images", flush=True)
        runner = throughput.Runner(model, "train", device, dtype, accum, micro,
                                   args.compile_mode if args.compile else None, args.seed)
        result["sides"][side] = profile_side(runner, args.warmup, args.steps, device, out / f"trace_{side}.json")
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # written after each side: a run stopped part-way (gpu_suite.sh's time limit) keeps the side it profiled
        common.write_result(out / "profile.json", result, args, t0, complete=False)
    result = common.write_result(out / "profile.json", result, args, t0)
    print(f"== {'SMOKE (CPU, not a benchmark): ' if smoke else ''}{args.model} training step, {args.dtype}, "
          f"micro {micro} x accum {accum}, {result['time_source']} time per step{common.interpreter_note()}")
    print(table(result))
    for side, data in result["sides"].items():
        if data.get("unlinked_ms"):
            print(f"{side}: {data['unlinked_ms']:.2f} ms of kernels per step linked to no CPU call (by kernel name)")
    stacked_bars(result, out / "profile.png")
    print(f"wrote {out / 'profile.json'}, {out / 'profile.png'} and the traces in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
