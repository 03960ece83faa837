#!/usr/bin/env python
"""Host time per call of each fused op against the eager torch ops it replaces, on CPU with the launches stubbed.

At ViT sizes a fused op's GPU time is a few microseconds, so the Python between the model and the driver decides
its speed. This script measures that host path without a GPU, so CI can run it:

- fastvit side: the op through ``fastvit.ops`` with the Triton path taken on CPU tensors. The launch path runs
  as on a GPU (a kernel's first launch through Triton's binder and kernel cache, later ones through
  ``fastvit.kernels._launch``'s cache; the grid, the launch metadata); only the final driver call is a no-op. A host-only driver answers device, stream and target (sm_90) questions, and a
  kernel looked up for the first time is "compiled" into a stand-in whose launch does nothing. The torch work
  around the kernels (output and partial-sum allocations, reductions of partial sums, autograd) is real.
- torch side: the eager torch ops the fused op replaces (``bench/numerics.py``'s references, e.g. ``x + r`` and
  ``F.layer_norm``; ``F.scaled_dot_product_attention``), on the same CPU tensors.

What makes this fair: both sides run on tiny CPU tensors (one image, 5 tokens, width 64) in one thread, so torch's
own compute is a few hundred nanoseconds and both sides pay the dispatcher, autograd and allocation as on a GPU;
neither pays a device launch (cuLaunchKernel, ~2-4 us on a GPU). The torch side launches more kernels than ours on
a GPU (two to five against one or two), so leaving launches out on both sides favours torch. Not counted: autocast
(timed without it), CUDA stream/device queries (constants here), caching-allocator time on a GPU.

Whole-model rows (``--depth`` blocks, 12 by default; 0 leaves them out): fastvit's VisionTransformer on that path
against timm's with the same weights, one 32 px image (17 tokens of width 64), a forward under no_grad and a training
forward + backward: the ops' host time together with the model's own Python around it, which is the step time
on a GPU at small batches. Only fastvit's Triton kernels are stubbed: timm's LayerNorm, GELU and attention compute
on CPU (a microsecond or so each at this size), both models' GEMMs run in torch.

Each time is the best of ``--repeat`` rounds of ``--number`` calls (noise only adds), with fastvit's and torch's
rounds interleaved so that load on the machine hits both. ``fwd`` is a forward call; ``fwd+bwd`` a forward and
``torch.autograd.grad`` of every output with respect to every input.

With ``--device cuda`` (a GPU machine) nothing is stubbed: both sides run on CUDA tensors with their real
launches (our kernels' and torch's), which is the host time item 3 of the speed issue asks about. The time is
the process's CPU time while it issues the calls, all threads (the tiny kernels finish faster than the host
issues them, so the host is what a call costs; a backward of CUDA tensors runs in autograd's device thread while
the calling thread waits, so the calling thread's time alone would leave it out); the GPU is synchronised between
rounds, outside the timing. There are no launch counts then (``kernel_launches`` is null).

    python bench/overhead.py                     # results/overhead.json
    python bench/overhead.py --ops add_layer_norm,attention --number 500 --repeat 5 --depth 0
    python bench/overhead.py --device cuda --out results/overhead_cuda
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys
import time
import timeit

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

if common.interpreting():
    raise SystemExit("bench/overhead.py stubs compiled Triton launches; run it without TRITON_INTERPRET")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import numerics  # noqa: E402
from fastvit import ops  # noqa: E402
from fastvit.kernels import _launch  # noqa: E402

DIRECTIONS = ("fwd", "fwd+bwd")
# the whole-model rows' ViT (depth from --depth): 17 tokens of width 64, so that compute is small next to host time
MODEL = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=2, num_classes=10)


# the fused ops :func:`tiny_cases` has a case for (numerics.OPS also has the GEMM-fused ones)
MEASURED_OPS = ("patch_embed", "add_layer_norm", "bias_gelu", "attention", "add_layer_norm_linear", "bias_gelu_linear")


def tiny_cases(seed=0):
    """Every fused op at one image of a width-64 ViT: compute is negligible next to the host path."""
    gen = torch.Generator().manual_seed(seed)
    return [numerics.patch_embed_case(gen, 1, 16, 8, 64),
            numerics.add_layer_norm_case(gen, 1, 5, 64),
            numerics.bias_gelu_case(gen, 1, 5, 256),
            numerics.attention_case(gen, 1, 5, 2, 32),
            numerics.add_layer_norm_linear_case(gen, 1, 5, 64, 192, True),
            numerics.bias_gelu_linear_case(gen, 1, 5, 256, 64)]


class _HostOnlyDriver:
    """The parts of Triton's active driver that a launch asks for, answered without a GPU."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class _NoLaunch:
    """Stands in for a compiled kernel: Triton's run() calls launch_metadata and run on it."""

    function = packed_metadata = None

    def __init__(self, counter):
        self.counter = counter

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        self.counter[0] += 1


@contextlib.contextmanager
def stubbed_launches():
    """Inside, every ``kernel[grid](...)`` runs Triton's host path up to the driver call and launches nothing;
    yields a one-element list counting the launches. Kernels used inside get fresh per-device caches on exit.

    A stubbed kernel leaves its output as allocated, uninitialised: where that memory holds denormal floats, a torch
    op reading it computes at the CPU's slow denormal speed (bias_gelu_linear's fc2 GEMM after the stubbed GELU:
    ~200 us instead of ~10), a cost no GPU run has. So denormals flush to zero inside (off again on exit, torch's
    default)."""
    counter, touched = [0], set()
    saved_compile, saved_driver = JITFunction._do_compile, driver._active  # triton 3.8: no public getter

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _NoLaunch(counter)
        self.device_caches[device][0][key] = kernel
        touched.add(self)
        return kernel

    JITFunction._do_compile = do_compile
    driver.set_active(_HostOnlyDriver(GPUTarget("cuda", 90, 32)))
    saved_compiled = dict(_launch._COMPILED)
    _launch.forget()  # the launchers' plans bound to real kernels: rebuilt on the stand-ins inside
    torch.set_flush_denormal(True)
    try:
        yield counter
    finally:
        torch.set_flush_denormal(False)
        JITFunction._do_compile = saved_compile
        driver._active = saved_driver
        for fn in touched:
            fn.device_caches = collections.defaultdict(fn.create_binder)
        # launch()'s cache of compiled kernels and the plans would keep the stand-ins: launch()'s as it was, the
        # plans rebuilt by the next calls
        _launch.forget()
        _launch._COMPILED.update(saved_compiled)


@contextlib.contextmanager
def triton_on_cpu_tensors():
    """``fastvit.ops`` resolves backend 'triton' to the kernels for CPU tensors (as it does under the interpreter,
    without the interpreter: the stubbed launches never touch the data)."""
    saved = ops.triton_interpreting
    ops.triton_interpreting = lambda: True
    try:
        yield
    finally:
        ops.triton_interpreting = saved


def _call(case, impl, direction, device="cpu"):
    """A no-argument function running one call of ``case`` by ``impl`` ('fastvit' or 'torch') on ``device``."""
    grads = direction == "fwd+bwd"
    inputs = {k: v.to(device, copy=True).requires_grad_(grads and k in case["grads"])
              for k, v in case["inputs"].items()}
    fn = (lambda: case["fastvit"](inputs, "triton")) if impl == "fastvit" else (lambda: case["torch"](inputs))
    if not grads:
        return fn
    leaves = [inputs[k] for k in case["grads"]]
    upstream = [torch.ones_like(o) for o in fn()]

    def fwd_bwd():
        torch.autograd.grad(fn(), leaves, upstream)
    return fwd_bwd


def measure(case, direction, number, repeat, launches, device="cpu"):
    """Best per-call microseconds of fastvit and torch, rounds interleaved; and fastvit's launches per call."""
    return measure_calls({impl: _call(case, impl, direction, device) for impl in ("fastvit", "torch")}, number,
                         repeat, launches, device)


def model_calls(depth, direction, device="cpu"):
    """{"fastvit": f, "timm": g}: one forward (eval, no_grad) or one training forward + backward of a ``depth``-block
    ``MODEL`` on one image, the two models with the same weights, fastvit's on backend 'triton' (module doc), on
    ``device``."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from fastvit.model import VisionTransformer
    cfg = dict(MODEL, depth=depth)
    torch.manual_seed(0)
    models = {"timm": TimmViT(**cfg)}
    models["fastvit"] = VisionTransformer(**cfg, backend="triton")
    models["fastvit"].load_state_dict(models["timm"].state_dict())
    x = torch.randn(1, 3, cfg["img_size"], cfg["img_size"], device=device)
    calls = {}
    for name in ("fastvit", "timm"):
        model = models[name].to(device).train(direction == "fwd+bwd")
        if direction == "fwd":
            calls[name] = torch.no_grad()(functools.partial(model, x))
        else:
            calls[name] = functools.partial(lambda m: m(x).sum().backward(), model)
    return calls


def measure_calls(calls, number, repeat, launches, device="cpu"):
    """Best per-call microseconds of each call in ``calls`` ({"fastvit": f, other: g}), rounds interleaved; and
    fastvit's launches per call (None where ``launches`` is: real launches are not counted)."""
    cuda = torch.device(device).type == "cuda"
    for fn in calls.values():  # first calls build caches (kernel keys, autograd graph pools; compile on a GPU)
        for _ in range(3):
            fn()
    per_call = None
    if launches is not None:
        before = launches[0]
        calls["fastvit"]()
        per_call = launches[0] - before
    best = {impl: float("inf") for impl in calls}
    # one thread's CPU time, on CPU (torch.set_num_threads(1)); on a GPU every thread's: autograd runs a backward of
    # CUDA tensors in its own device thread
    timer = time.process_time if cuda else time.thread_time
    for _ in range(repeat):
        for impl, fn in calls.items():
            if cuda:  # a round starts with an idle GPU: the host never waits on a full launch queue
                torch.cuda.synchronize(device)
            best[impl] = min(best[impl], timeit.Timer(fn, timer=timer).timeit(number) / number * 1e6)
    return best, per_call


def _launches(n):
    return "real launches" if n is None else f"{n} launch{'' if n == 1 else 'es'}"


@contextlib.contextmanager
def host_path(device):
    """The launch path of the run: stubbed launches of kernels taken on CPU tensors (yields their counter), or on
    a GPU the real ones (yields None)."""
    if torch.device(device).type == "cuda":
        yield None
        return
    with stubbed_launches() as launches, triton_on_cpu_tensors():
        yield launches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(MEASURED_OPS), help=f"comma list from {MEASURED_OPS}")
    p.add_argument("--number", type=int, default=200, help="calls per timed round")
    p.add_argument("--repeat", type=int, default=7, help="timed rounds per side (the best counts)")
    p.add_argument("--depth", type=int, default=12,
                   help="blocks of the whole-model rows (fastvit's model against timm's; 0 leaves them out)")
    p.add_argument("--model-number", type=int, default=10,
                   help="calls per timed round of the whole-model rows (a call is a whole forward or step)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: launches stubbed (CI); cuda: real launches on a GPU (module doc)")
    p.add_argument("--out", default="results", help="output folder for overhead.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False); the default, --device cpu, "
                "stubs the launches instead")
    names = common.choice_list(p, args.ops, MEASURED_OPS, "op")
    if args.number < 1 or args.repeat < 1 or args.model_number < 1:
        p.error("--number, --repeat and --model-number must be at least 1")
    if args.depth < 0:
        p.error(f"--depth must be 0 (no model rows) or more, got {args.depth}")
    out = common.out_dir(args.out, p)
    torch.set_num_threads(1)

    rows = []
    t_start = time.perf_counter()
    print("host time per call, best of the rounds; ratio = fastvit / torch (or timm): above 1, fastvit's host path "
          "is the slower", flush=True)
    with host_path(args.device) as launches:
        for case in tiny_cases():
            if case["op"] not in names:
                continue
            for direction in DIRECTIONS:
                best, per_call = measure(case, direction, args.number, args.repeat, launches, args.device)
                row = {"op": case["op"], "direction": direction, "shape": case["shape"],
                       "fastvit_us": best["fastvit"], "torch_us": best["torch"],
                       "ratio": best["fastvit"] / best["torch"], "kernel_launches": per_call}
                rows.append(row)
                print(f"{row['op']:22s} {direction:8s} fastvit {row['fastvit_us']:7.1f} us  torch "
                      f"{row['torch_us']:7.1f} us  ratio {row['ratio']:5.2f}  ({_launches(per_call)})", flush=True)
        models = []
        for direction in DIRECTIONS if args.depth else ():
            best, per_call = measure_calls(model_calls(args.depth, direction, args.device), args.model_number,
                                           args.repeat, launches, args.device)
            row = {"model": f"ViT depth {args.depth} width {MODEL['embed_dim']}, 1 image", "direction": direction,
                   "fastvit_us": best["fastvit"], "timm_us": best["timm"], "ratio": best["fastvit"] / best["timm"],
                   "kernel_launches": per_call}
            models.append(row)
            print(f"{'model':22s} {direction:8s} fastvit {row['fastvit_us']:7.1f} us  timm  "
                  f"{row['timm_us']:7.1f} us  ratio {row['ratio']:5.2f}  ({_launches(per_call)}; {row['model']})",
                  flush=True)
    result = {"ops": rows, "models": models, "number": args.number, "model_number": args.model_number,
              "repeat": args.repeat, "threads": 1, "device": args.device,
              "launches": "stubbed" if launches is not None else "real"}
    result = common.write_result(out / "overhead.json", result, args, t_start)
    print(f"wrote {out / 'overhead.json'} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
