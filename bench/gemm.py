#!/usr/bin/env python
"""Each fused GEMM against its unfused path at the GEMM shapes of ViT-B/16, L/16 and H/14: the measurements behind
``fastvit.ops``' per-shape choice (``ops.gemm_impl``), printed as speed-ups.

Per model (``--batch`` images at 224 px, so rows = batch x tokens) and GEMM:

    qkv    LN(x + r) W^T + b         ln+cublas    vs ln_gemm, ln_gemm_tma              (kernels/ln_matmul.py)
    fc1    LN(x + r) W^T             ln+cublas    vs ln_gemm, ln_gemm_tma
    fc2    GELU(h + b1) W^T + b      gelu+cublas  vs gelu_gemm, gelu_gemm_tma          (kernels/gelu_matmul.py)
    proj   x W^T + b + r             cublas+add   vs gemm_residual, gemm_residual_tma  (kernels/matmul_residual.py)
    fc2+r  x W^T + b + r, K = mlp    cublas+add   vs gemm_residual, gemm_residual_tma

(``*_tma``: the persistent TMA kernel, on sm_90 and newer and under the interpreter; fc1's bias b1 is added by
fc2's GELU, as ``ops.layer_norm_mlp`` runs the MLP with the Triton kernels.)

timed forward and forward + backward (median of CUDA-event timings, ``fastvit.autotune.time_cuda``) as a model
runs them: activations in ``--dtype`` under autocast over fp32 parameters, the residual stream in fp32 with
``--residual-fp32``. A row gives both times, the speed-up (unfused / fused; > 1: the fused GEMM is faster), the
faster fused GEMM's TFLOP/s and name, the TMA kernel's speed-up over the one-program-per-tile kernel, the winner
of the forward (what ``ops.gemm_impl`` keeps: all paths share their backward) and the largest difference between
a fused and the unfused output. Writes gemm.json and gemm.md.

    python bench/gemm.py                                   # GPU: B/16, L/16, H/14 at batch 64, bf16
    python bench/gemm.py --models B/16 --batch 256 --dtype fp16 --residual-fp32
    python bench/gemm.py --interpret --smoke               # CPU: a tiny shape through the Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.reexec_with_interpreter()

import torch  # noqa: E402

from fastvit import autotune, ops  # noqa: E402
from fastvit.kernels._report import MODELS, ModelShape  # noqa: E402
from fastvit.kernels.bias_gelu import bias_gelu_linear  # noqa: E402
from fastvit.kernels.gelu_matmul import gelu_matmul  # noqa: E402
from fastvit.kernels.layer_norm import add_layer_norm_linear  # noqa: E402
from fastvit.kernels.ln_matmul import ln_matmul  # noqa: E402
from fastvit.kernels.matmul_residual import matmul_residual, matmul_residual_ref  # noqa: E402

SMOKE_SHAPE = ModelShape("smoke", 64, 256, 17, 2, 32, 8, img_size=32)


def cases(shape, batch, dtype, residual_fp32, device):
    """(name, ops op, K, N, inputs, run(impl, inputs)) for each GEMM of one block of ``shape``."""
    gen = torch.Generator(device=device).manual_seed(0)
    m, d, f = batch * shape.tokens, shape.dim, shape.mlp_dim
    res_dtype = torch.float32 if residual_fp32 else dtype

    def t(*size, dt=torch.float32, scale=1.0):
        return (scale * torch.randn(size, generator=gen, device=device)).to(dt)

    def ln_inputs(n, bias):
        return {"x": t(m, d, dt=dtype), "residual": t(m, d, dt=res_dtype), "norm_weight": 1 + t(d, scale=0.1),
                "norm_bias": t(d, scale=0.1), "weight": t(n, d, scale=d ** -0.5),
                **({"bias": t(n, scale=0.02)} if bias else {})}

    def ln_run(impl, a):
        args = (a["x"], a["residual"], a["norm_weight"], a["norm_bias"], a["weight"], a.get("bias"), 1e-6,
                residual_fp32, True)
        if impl == "ln+cublas":
            return add_layer_norm_linear(*args)
        return ln_matmul(*args, tma=impl == "ln_gemm_tma")

    def gelu_run(impl, a):
        args = (a["x"], a.get("b1"), a["weight"], a["bias"], True)
        if impl == "gelu+cublas":
            return bias_gelu_linear(*args)
        return gelu_matmul(*args, tma=impl == "gelu_gemm_tma")

    def residual_inputs(k):
        return {"x": t(m, k, dt=dtype), "weight": t(d, k, scale=k ** -0.5), "bias": t(d, scale=0.02),
                "residual": t(m, d, dt=res_dtype)}

    def residual_run(impl, a):
        if impl == "cublas+add":
            return matmul_residual_ref(a["x"], a["weight"], a["bias"], a["residual"])
        return matmul_residual(a["x"], a["weight"], a["bias"], a["residual"], True, tma=impl == "gemm_residual_tma")

    # as the block runs them: fc1's bias b1 is added by fc2's GELU (ops.layer_norm_mlp), not in fc1's GEMM
    gelu_inputs = {"x": t(m, f, dt=dtype), "b1": t(f, scale=0.02), "weight": t(d, f, scale=f ** -0.5),
                   "bias": t(d, scale=0.02)}
    return [("qkv", "add_layer_norm_linear", d, 3 * d, ln_inputs(3 * d, True), ln_run),
            ("fc1", "add_layer_norm_linear", d, f, ln_inputs(f, False), ln_run),
            ("fc2", "bias_gelu_linear", f, d, gelu_inputs, gelu_run),
            ("proj", "linear_residual", d, d, residual_inputs(d), residual_run),
            ("fc2+r", "linear_residual", f, d, residual_inputs(f), residual_run)]


def timer(device, repeats):
    if device.type == "cuda":
        return lambda fn: autotune.time_cuda(fn, repeats)

    def cpu(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    return cpu


def measure(case, dtype, device, repeats):
    """Times and outputs of every implementation of one case."""
    name, op, k, n, inputs, run = case
    autocast = dtype != torch.float32
    time_fn = timer(device, repeats)
    leaves = {key: v.requires_grad_() for key, v in inputs.items() if v is not None}
    result = {"gemm": name, "op": op, "K": k, "N": n, "rows": inputs["x"].shape[0]}
    outs = {}
    names = ops.gemm_candidates(op, inputs["x"])
    for impl in names:
        def fwd():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                return run(impl, leaves)

        def fwd_bwd():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                out = run(impl, leaves)
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
            for v in leaves.values():
                v.grad = None

        out = fwd()
        outs[impl] = (out if isinstance(out, tuple) else (out,))[0]
        result[impl] = {"fwd_s": time_fn(fwd), "fwd_bwd_s": time_fn(fwd_bwd)}
    unfused, fused = names[0], min(names[1:], key=lambda i: result[i]["fwd_s"])
    flops = 2 * result["rows"] * k * n
    result.update(
        fused=fused,
        speedup_fwd=result[unfused]["fwd_s"] / result[fused]["fwd_s"],
        speedup_fwd_bwd=result[unfused]["fwd_bwd_s"] / result[fused]["fwd_bwd_s"],
        fused_tflops_fwd=flops / result[fused]["fwd_s"] / 1e12,
        tma_speedup_fwd=(result[names[1]]["fwd_s"] / result[names[2]]["fwd_s"]) if len(names) > 2 else None,
        winner=fused if result[fused]["fwd_s"] < result[unfused]["fwd_s"] else unfused,
        max_abs_diff=max((outs[i].double() - outs[unfused].double()).abs().max().item() for i in names[1:]))
    return result


def markdown(rows, args, env):
    header = ["model", "gemm", "rows x K -> N", "unfused", "faster fused", "fwd ms (unfused / fused)",
              "speed-up fwd", "fwd+bwd ms", "speed-up fwd+bwd", "fused TFLOP/s", "TMA / tiles fwd", "winner",
              "max |diff|"]
    cells = []
    for r in rows:
        unfused, fused = ops.GEMM_IMPLS[r["op"]][0], r["fused"]
        tma = "-" if r["tma_speedup_fwd"] is None else f"{r['tma_speedup_fwd']:.2f}x"
        cells.append([r["model"], r["gemm"], f"{r['rows']} x {r['K']} -> {r['N']}", unfused, fused,
                      f"{1e3 * r[unfused]['fwd_s']:.3f} / {1e3 * r[fused]['fwd_s']:.3f}", f"{r['speedup_fwd']:.2f}x",
                      f"{1e3 * r[unfused]['fwd_bwd_s']:.3f} / {1e3 * r[fused]['fwd_bwd_s']:.3f}",
                      f"{r['speedup_fwd_bwd']:.2f}x", f"{r['fused_tflops_fwd']:.1f}", tma, r["winner"],
                      f"{r['max_abs_diff']:.1e}"])
    return (f"# Fused GEMMs vs unfused paths\n\n{args.dtype}, batch {args.batch}, residual "
            f"{'fp32' if args.residual_fp32 else args.dtype}; device {env.get('gpu', 'CPU')}, "
            f"TRITON_INTERPRET={int(env['triton_interpret'])}.\n\n" + common.markdown_table(header, cells) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="B/16,L/16,H/14", help="comma list of B/16, L/16, H/14 or registry names")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=list(common.DTYPES))
    p.add_argument("--residual-fp32", action="store_true", help="keep the residual stream in fp32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="one tiny shape, batch 1, 1 repeat (a CPU check)")
    p.add_argument("--interpret", action="store_true", help="re-run with TRITON_INTERPRET=1 (CPU kernels)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not common.interpreting():
        p.error("the fused GEMMs need a GPU, or --interpret (with --smoke: the interpreter is slow)")
    if args.smoke:
        shapes, args.batch, args.repeats = {"smoke": SMOKE_SHAPE}, 1, 1
        if args.dtype == "bf16" and device.type == "cpu":
            args.dtype = "fp16"  # the interpreter computes bf16 dots wrongly
    else:
        shapes = {}
        for name in common.split_list(args.models):
            if common.canonical(name) not in MODELS:
                p.error(f"unknown model {name!r}; expected one of B/16, L/16, H/14 or {sorted(MODELS)}")
            shapes[name] = MODELS[common.canonical(name)]
    dtype = common.DTYPES[args.dtype]
    rows = []
    for model, shape in shapes.items():
        for case in cases(shape, args.batch, dtype, args.residual_fp32, device):
            r = {"model": model, **measure(case, dtype, device, args.repeats)}
            rows.append(r)
            print(f"{model:8s} {r['gemm']:6s} {r['rows']:6d} x {r['K']:5d} -> {r['N']:5d}  fwd x{r['speedup_fwd']:.2f}"
                  f"  fwd+bwd x{r['speedup_fwd_bwd']:.2f}  {r['fused']} {r['fused_tflops_fwd']:.1f} TFLOP/s  "
                  f"winner {r['winner']}", flush=True)
    env = common.environment()
    out = common.out_dir(args.out, p)
    common.write_result(out / "gemm.json", {"rows": rows}, args, t_start)
    (out / "gemm.md").write_text(markdown(rows, args, env), encoding="utf-8")
    print(f"wrote {out / 'gemm.json'} and {out / 'gemm.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
