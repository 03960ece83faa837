#!/usr/bin/env python
"""Numerical error of fastvit's fused ops and whole models, next to PyTorch's own error in the same dtype.

For every op (patch_embed, add_layer_norm, bias_gelu, attention and the composites, through ``fastvit.ops``; the
fused GEMMs ln_matmul, gelu_matmul and linear_residual called directly, since ``fastvit.ops`` runs them only where
measured faster on a GPU) and every model (a tiny
config and ViT-B/16 at batch 1), in fp32, fp16 and bf16: the max abs and mean relative error of fastvit against a
torch reference computed in higher precision (fp32 for the fp16/bf16 rows, fp64 for the fp32 rows, since an fp32
reference cannot grade fp32), beside the error of plain PyTorch in the same dtype. A row passes when fastvit's
errors are at most 2x PyTorch's. Ops are checked forward and backward (gradients of every input; the row shows the
gradient with the worst ratio). Models also get fastvit vs timm on the same weights in the same dtype.

Each row records the backend that actually ran: on a GPU the Triton kernels; on CPU the kernels run under Triton's
interpreter (``--interpret``, or ``TRITON_INTERPRET=1 python bench/numerics.py``) in fp32/fp16, while bf16 goes
through the torch fallback (the interpreter computes bf16 ``tl.dot`` wrongly); without the interpreter, CPU rows
use the torch fallback.

    python bench/numerics.py                      # results/numerics.json + results/numerics.md
    python bench/numerics.py --interpret --quick --models tiny
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

common.reexec_with_interpreter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastvit import ops  # noqa: E402
from fastvit.kernels.bias_gelu import bias_gelu_ref  # noqa: E402
from fastvit.kernels.flash_attention import attention_ref  # noqa: E402
from fastvit.kernels.gelu_matmul import gelu_matmul  # noqa: E402
from fastvit.kernels.layer_norm import add_layer_norm_ref  # noqa: E402
from fastvit.kernels.ln_matmul import ln_matmul  # noqa: E402
from fastvit.kernels.matmul_residual import matmul_residual  # noqa: E402
from fastvit.kernels.patch_embed import patch_embed_ref  # noqa: E402

OPS = ("patch_embed", "add_layer_norm", "bias_gelu", "attention", "add_layer_norm_linear", "bias_gelu_linear",
       "ln_matmul", "gelu_matmul", "linear_residual")
MODEL_BATCH = {"tiny": 2}  # every other model runs at batch 1 (fp16 matmuls are slow on CPU)
PASS_RATIO = 2.0
_TINY = 1e-30


# ---- the ops: inputs, fastvit call, and the torch reference that sits beside each kernel -----------------------

def dtype_name(dtype):
    return {torch.float64: "fp64", **{v: k for k, v in common.DTYPES.items()}}[dtype]


def _case(op, label, inputs, grads, fastvit_fn, torch_fn):
    return dict(op=op, shape=label, inputs=inputs, grads=grads, fastvit=fastvit_fn, torch=torch_fn)


def patch_embed_case(gen, batch, img, patch, dim):
    n = (img // patch) ** 2
    inputs = {"x": torch.randn(batch, 3, img, img, generator=gen),
              "weight": 0.02 * torch.randn(dim, 3, patch, patch, generator=gen),
              "bias": 0.02 * torch.randn(dim, generator=gen),
              "pos_embed": 0.02 * torch.randn(1, n + 1, dim, generator=gen),
              "cls_token": 0.02 * torch.randn(1, 1, dim, generator=gen)}

    def fv(t, backend):
        return (ops.patch_embed(t["x"], t["weight"], t["bias"], patch, t["pos_embed"], t["cls_token"],
                                backend=backend),)

    def ref(t):
        return (patch_embed_ref(t["x"], t["weight"], t["bias"], patch, t["pos_embed"], t["cls_token"]),)

    return _case("patch_embed", f"B={batch} {img}px P={patch} D={dim}", inputs, list(inputs), fv, ref)


def add_layer_norm_case(gen, batch, tokens, dim):
    inputs = {"x": torch.randn(batch, tokens, dim, generator=gen),
              "residual": torch.randn(batch, tokens, dim, generator=gen),
              "weight": 1 + 0.1 * torch.randn(dim, generator=gen),
              "bias": 0.1 * torch.randn(dim, generator=gen)}

    def fv(t, backend):
        return ops.add_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], 1e-6, backend=backend)

    def ref(t):
        return add_layer_norm_ref(t["x"], t["residual"], t["weight"], t["bias"], 1e-6)

    return _case("add_layer_norm", f"({batch},{tokens},{dim})", inputs, list(inputs), fv, ref)


def _gelu_label(approximate):
    return "" if approximate == "none" else f" {approximate}"


def bias_gelu_case(gen, batch, tokens, dim, approximate="none"):
    """``approximate``: the exact GELU, or SigLIP's "tanh" or CLIP's "sigmoid" (quick GELU)."""
    inputs = {"x": torch.randn(batch, tokens, dim, generator=gen), "bias": torch.randn(dim, generator=gen)}

    def fv(t, backend):
        return (ops.bias_gelu(t["x"], t["bias"], backend=backend, approximate=approximate),)

    def ref(t):
        return (bias_gelu_ref(t["x"], t["bias"], approximate),)

    return _case("bias_gelu", f"({batch},{tokens},{dim})" + _gelu_label(approximate), inputs, list(inputs), fv, ref)


def add_layer_norm_linear_case(gen, batch, tokens, dim, out_dim, linear_bias, fused=False):
    """LayerNorm(x + residual) followed by the next projection (the block's qkv and fc1 carry a bias; without one
    is the op's other form); ``fused``: the LayerNorm inside our GEMM (``ln_matmul``), the Triton kernels on
    ``backend="triton"``."""
    inputs = {"x": torch.randn(batch, tokens, dim, generator=gen),
              "residual": torch.randn(batch, tokens, dim, generator=gen),
              "norm_weight": 1 + 0.1 * torch.randn(dim, generator=gen),
              "norm_bias": 0.1 * torch.randn(dim, generator=gen),
              "weight": 0.02 * torch.randn(out_dim, dim, generator=gen)}
    if linear_bias:
        inputs["bias"] = 0.02 * torch.randn(out_dim, generator=gen)

    def fv(t, backend):
        args = (t["x"], t["residual"], t["norm_weight"], t["norm_bias"], t["weight"], t.get("bias"), 1e-6)
        if fused:
            return ln_matmul(*args, False, backend == "triton")
        return ops.add_layer_norm_linear(*args, backend=backend)

    def ref(t):
        y, res = add_layer_norm_ref(t["x"], t["residual"], t["norm_weight"], t["norm_bias"], 1e-6)
        return F.linear(y, t["weight"], t.get("bias")), res

    label = f"({batch},{tokens},{dim})->{out_dim}" + ("" if linear_bias else " no bias")
    return _case("ln_matmul" if fused else "add_layer_norm_linear", label, inputs, list(inputs), fv, ref)


def bias_gelu_linear_case(gen, batch, tokens, dim, out_dim, fused=False, approximate="none"):
    """GELU(x + b1) followed by fc2 (as the MLP runs it with the Triton kernels: fc1's bias b1 added here);
    ``fused``: the GELU inside our GEMM (``gelu_matmul``); ``approximate`` as in :func:`bias_gelu_case`."""
    inputs = {"x": torch.randn(batch, tokens, dim, generator=gen), "bias": torch.randn(dim, generator=gen),
              "weight": 0.02 * torch.randn(out_dim, dim, generator=gen),
              "weight_bias": 0.02 * torch.randn(out_dim, generator=gen)}

    def fv(t, backend):
        args = (t["x"], t["bias"], t["weight"], t["weight_bias"])
        if fused:
            return (gelu_matmul(*args, backend == "triton", approximate),)
        return (ops.bias_gelu_linear(*args, backend=backend, approximate=approximate),)

    def ref(t):
        return (F.linear(bias_gelu_ref(t["x"], t["bias"], approximate), t["weight"], t["weight_bias"]),)

    return _case("gelu_matmul" if fused else "bias_gelu_linear",
                 f"({batch},{tokens},{dim})->{out_dim}" + _gelu_label(approximate), inputs, list(inputs), fv, ref)


def linear_residual_case(gen, batch, tokens, dim, out_dim):
    """A Linear and the residual add after it (proj, fc2) in our GEMM's epilogue (``matmul_residual``)."""
    inputs = {"x": torch.randn(batch, tokens, dim, generator=gen),
              "weight": 0.02 * torch.randn(out_dim, dim, generator=gen),
              "bias": 0.02 * torch.randn(out_dim, generator=gen),
              "residual": torch.randn(batch, tokens, out_dim, generator=gen)}

    def fv(t, backend):
        return (matmul_residual(t["x"], t["weight"], t["bias"], t["residual"], backend == "triton"),)

    def ref(t):
        return (F.linear(t["x"], t["weight"], t["bias"]) + t["residual"],)

    return _case("linear_residual", f"({batch},{tokens},{dim})->{out_dim}", inputs, list(inputs), fv, ref)


def attention_case(gen, batch, tokens, heads, head_dim):
    """q, k, v are the strided (B, heads, N, D_h) views of one qkv buffer, as the model hands them over."""
    inputs = {"qkv": torch.randn(batch, tokens, 3, heads, head_dim, generator=gen)}

    def split(t):
        return t["qkv"].permute(2, 0, 3, 1, 4).unbind(0)

    def fv(t, backend):
        q, k, v = split(t)
        return (ops.attention(q, k, v, backend=backend),)

    def ref(t):
        return (attention_ref(*split(t)),)

    return _case("attention", f"B={batch} N={tokens} H={heads} d={head_dim}", inputs, ["qkv"], fv, ref)


def op_cases(quick, seed):
    """ViT-B/16 and ViT-H/14 shapes (widths 768/3072/1280/5120, head dims 64/80); ``quick`` keeps fewer tokens,
    one patch embedding (the interpreter is slowest there) and one shape of each composite op (LayerNorm + qkv,
    LayerNorm + fc1, GELU + fc2), and of each fused GEMM."""
    gen = torch.Generator().manual_seed(seed)
    if quick:
        return [patch_embed_case(gen, 1, 64, 16, 768),
                add_layer_norm_case(gen, 1, 37, 768), add_layer_norm_case(gen, 1, 17, 1280),
                bias_gelu_case(gen, 1, 37, 3072), bias_gelu_case(gen, 1, 17, 5120),
                attention_case(gen, 1, 37, 2, 64), attention_case(gen, 1, 17, 2, 80),
                add_layer_norm_linear_case(gen, 1, 17, 768, 2304, True),
                add_layer_norm_linear_case(gen, 1, 17, 768, 3072, False),
                bias_gelu_linear_case(gen, 1, 17, 3072, 768),
                add_layer_norm_linear_case(gen, 1, 17, 768, 768, True, fused=True),
                bias_gelu_linear_case(gen, 1, 17, 3072, 768, fused=True), linear_residual_case(gen, 1, 17, 768, 768)]
    return [patch_embed_case(gen, 2, 224, 16, 768), patch_embed_case(gen, 1, 224, 14, 1280),
            add_layer_norm_case(gen, 2, 197, 768), add_layer_norm_case(gen, 1, 257, 1280),
            bias_gelu_case(gen, 2, 197, 3072), bias_gelu_case(gen, 1, 257, 5120),
            attention_case(gen, 2, 197, 12, 64), attention_case(gen, 1, 257, 16, 80),
            add_layer_norm_linear_case(gen, 2, 197, 768, 2304, True),
            add_layer_norm_linear_case(gen, 2, 197, 768, 3072, False),
            add_layer_norm_linear_case(gen, 1, 257, 1280, 3840, True),
            bias_gelu_linear_case(gen, 2, 197, 3072, 768), bias_gelu_linear_case(gen, 1, 257, 5120, 1280),
            add_layer_norm_linear_case(gen, 2, 197, 768, 2304, True, fused=True),
            add_layer_norm_linear_case(gen, 2, 197, 768, 3072, False, fused=True),
            add_layer_norm_linear_case(gen, 1, 257, 1280, 3840, True, fused=True),
            bias_gelu_linear_case(gen, 2, 197, 3072, 768, fused=True),
            bias_gelu_linear_case(gen, 1, 257, 5120, 1280, fused=True),
            linear_residual_case(gen, 2, 197, 768, 768), linear_residual_case(gen, 2, 197, 3072, 768)]


def gelu_variant_cases(seed):
    """The GELU approximations of SigLIP ("tanh") and CLIP ("sigmoid") at B/16's MLP, alone and in the GEMM: run
    after the models, so that a GPU run's time limit cuts these first."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [case for approximate in ("tanh", "sigmoid")
            for case in (bias_gelu_case(gen, 2, 197, 3072, approximate),
                         bias_gelu_linear_case(gen, 2, 197, 3072, 768, fused=True, approximate=approximate))]


# ---- running and grading ---------------------------------------------------------------------------------------

def resolve_backend(requested, device, dtype):
    """(backend to pass, why): what actually runs for this device and dtype, so each row can say so."""
    if requested == "torch":
        return "torch", "requested"
    if device.type == "cuda":
        return "triton", "GPU"
    if common.interpreting():
        if dtype == torch.bfloat16:
            return "torch", "bf16 on CPU: the Triton interpreter computes bf16 tl.dot wrongly"
        return "triton", "Triton interpreter (TRITON_INTERPRET=1)"
    if requested == "triton":
        raise SystemExit("--backend triton on CPU needs the interpreter: add --interpret")
    return "torch", "CPU without TRITON_INTERPRET: torch fallback"


def _grade(fv_stats, torch_stats):
    ratio_abs = (fv_stats["max_abs"] + _TINY) / (torch_stats["max_abs"] + _TINY)
    ratio_rel = (fv_stats["mean_rel"] + _TINY) / (torch_stats["mean_rel"] + _TINY)
    return {"ratio_max_abs": ratio_abs, "ratio_mean_rel": ratio_rel,
            "ok": bool(ratio_abs <= PASS_RATIO and ratio_rel <= PASS_RATIO)}


def _worst(per_tensor):
    """The tensor whose worse ratio is largest: the one a row reports."""
    return max(per_tensor, key=lambda k: max(per_tensor[k]["ratio_max_abs"], per_tensor[k]["ratio_mean_rel"]))


def _run(fn, inputs, grads, upstream):
    """Outputs of fn(inputs) and the gradients of sum(out * upstream) with respect to ``grads``."""
    outs = fn(inputs)
    gs = torch.autograd.grad(outs, [inputs[k] for k in grads], [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs], dict(zip(grads, gs))


def run_op(case, dtype, requested, device, seed):
    """Forward and backward rows for one op case in ``dtype``."""
    backend, why = resolve_backend(requested, device, dtype)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32

    def cast(dt):
        return {k: v.to(device, dt).requires_grad_(k in case["grads"]) for k, v in case["inputs"].items()}

    t0 = time.perf_counter()
    ref_in = cast(ref_dtype)
    ref_outs = case["torch"](ref_in)
    gen = torch.Generator().manual_seed(seed + 1)
    upstream = [torch.randn(o.shape, generator=gen).to(device) for o in ref_outs]
    ref_out, ref_grad = _run(case["torch"], ref_in, case["grads"], upstream)
    low = cast(dtype)
    torch_out, torch_grad = _run(case["torch"], low, case["grads"], upstream)
    fv_out, fv_grad = _run(lambda t: case["fastvit"](t, backend), low, case["grads"], upstream)
    seconds = time.perf_counter() - t0

    rows = []
    names = ["y", "residual"] if case["op"].startswith(("add_layer_norm", "ln_matmul")) else ["out"]
    for direction, fv, tr, ref in (("fwd", dict(zip(names, fv_out)), dict(zip(names, torch_out)),
                                    dict(zip(names, ref_out))),
                                   ("bwd", {f"d{k}": v for k, v in fv_grad.items()},
                                    {f"d{k}": v for k, v in torch_grad.items()},
                                    {f"d{k}": v for k, v in ref_grad.items()})):
        per = {}
        for k in ref:
            s_fv, s_tr = common.error_stats(fv[k], ref[k]), common.error_stats(tr[k], ref[k])
            per[k] = {"fastvit": s_fv, "torch": s_tr, **_grade(s_fv, s_tr)}
        worst = _worst(per)
        rows.append({"kind": "op", "name": case["op"], "shape": case["shape"], "dtype": dtype_name(dtype),
                     "direction": direction, "backend": backend, "backend_reason": why,
                     "reference": f"torch {dtype_name(ref_dtype)}", "tensor": worst, **per[worst], "tensors": per,
                     "seconds": seconds})
    return rows


def _logits(model, x, dtype, backend=None):
    m = copy.deepcopy(model).to(dtype).eval()
    if backend is not None:
        m.set_backend(backend)
    with torch.no_grad():
        out = m(x.to(dtype)).float()
    del m
    return out


def run_model(name, dtypes, requested, device, seed):
    """Forward rows (logits) for one model, plus fastvit vs timm on the same weights per dtype."""
    batch = MODEL_BATCH.get(name, 1)
    fv_model, timm_model = common.build_pair(name, seed=seed)
    fv_model, timm_model = fv_model.to(device), timm_model.to(device)
    img = fv_model.patch_embed.img_size
    x = torch.randn(batch, 3, *img, generator=torch.Generator().manual_seed(seed)).to(device)
    refs = {}
    rows, vs_timm = [], []
    for dtype in dtypes:
        backend, why = resolve_backend(requested, device, dtype)
        ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
        t0 = time.perf_counter()
        if ref_dtype not in refs:
            refs[ref_dtype] = _logits(timm_model, x, ref_dtype)
        ref = refs[ref_dtype]
        tr = _logits(timm_model, x, dtype)
        fv = _logits(fv_model, x, dtype, backend)
        s_fv, s_tr = common.error_stats(fv, ref), common.error_stats(tr, ref)
        label = f"B={batch} {img[0]}px"
        rows.append({"kind": "model", "name": name, "shape": label, "dtype": dtype_name(dtype), "direction": "fwd",
                     "backend": backend, "backend_reason": why, "reference": f"timm {dtype_name(ref_dtype)}",
                     "tensor": "logits", "fastvit": s_fv, "torch": s_tr, **_grade(s_fv, s_tr),
                     "seconds": time.perf_counter() - t0})
        vs_timm.append({"name": name, "shape": label, "dtype": dtype_name(dtype), "backend": backend,
                        **common.error_stats(fv, tr)})
    return rows, vs_timm


def _fmt(v):
    return f"{v:.2e}"


def console_line(fwd, bwd=None) -> str:
    """A checked case as one console line: its error ratios forward (and backward), FAIL where one is over the
    bound (numerics.md has the errors themselves)."""
    ratios = " ".join(f"{d} x{r['ratio_max_abs']:.2f}/{r['ratio_mean_rel']:.2f}"
                      for d, r in (("fwd", fwd), ("bwd", bwd)) if r is not None)
    failed = not all(r["ok"] for r in (fwd, bwd) if r is not None)
    return (f"{fwd['name']:21s} {fwd['shape']:30s} {fwd['dtype']:9s} {fwd['backend']:6s} {ratios} "
            f"({fwd['seconds']:.1f}s){'  FAIL' if failed else ''}")


def markdown(rows, vs_timm, env):
    header = ["kind", "name", "shape", "dtype", "direction", "backend", "tensor", "fastvit max abs", "torch max abs",
              "ratio", "fastvit mean rel", "torch mean rel", "ratio", "ok (<= 2x)"]
    cells = [[r["kind"], r["name"], r["shape"], r["dtype"], r["direction"], r["backend"], r["tensor"],
              _fmt(r["fastvit"]["max_abs"]), _fmt(r["torch"]["max_abs"]), f"{r['ratio_max_abs']:.2f}",
              _fmt(r["fastvit"]["mean_rel"]), _fmt(r["torch"]["mean_rel"]), f"{r['ratio_mean_rel']:.2f}",
              "pass" if r["ok"] else "FAIL"] for r in rows]
    text = ["# fastvit numerics", "",
            f"Reference: torch fp32 for fp16/bf16 rows, fp64 for fp32 rows (timm for models). "
            f"Device: {env.get('gpu', 'CPU')}; TRITON_INTERPRET={int(env['triton_interpret'])}.", "",
            common.markdown_table(header, cells)]
    if vs_timm:
        text += ["", "## fastvit vs timm, same weights, same dtype (logits)", "",
                 common.markdown_table(["model", "shape", "dtype", "backend", "max abs", "mean rel"],
                                       [[v["name"], v["shape"], v["dtype"], v["backend"], _fmt(v["max_abs"]),
                                         _fmt(v["mean_rel"])] for v in vs_timm])]
    return "\n".join(text) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {OPS}, or '' for none")
    p.add_argument("--models", default="tiny,B/16", help="comma list: tiny, B/16, L/16, H/14 or a registry name, or "
                                                        "'' for none")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS)
    p.add_argument("--quick", action="store_true", help="op shapes with fewer rows (same widths)")
    p.add_argument("--interpret", action="store_true", help="re-run with TRITON_INTERPRET=1 (CPU kernels)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="output folder for numerics.json and numerics.md")
    p.add_argument("--strict", action="store_true", help="exit 1 when a row fails the 2x bound")
    args = p.parse_args(argv)

    op_names = common.choice_list(p, args.ops, OPS, "op") if args.ops else []
    model_names = common.model_list(p, args.models) if args.models else []
    dtypes = [common.DTYPES[name] for name in common.choice_list(p, args.dtypes, common.DTYPES, "dtype")]
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here; on CPU use "
                "--device cpu (with --interpret for the Triton kernels)")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: cpu or cuda[:N]")
    out = common.out_dir(args.out, p)
    torch.manual_seed(args.seed)

    t_start = time.perf_counter()
    rows, vs_timm = [], []
    env = common.environment()

    def save(complete):
        """numerics.json and .md for the rows so far: rewritten after every op case and model, so a run stopped
        part-way (bench/gpu_suite.sh's time limit) keeps what it checked, marked incomplete."""
        failed = sum(not r["ok"] for r in rows)
        result = common.write_result(out / "numerics.json", {
            "pass_ratio": PASS_RATIO, "rows": rows, "fastvit_vs_timm": vs_timm, "failed": failed},
            args, t_start, complete)
        (out / "numerics.md").write_text(markdown(rows, vs_timm, env), encoding="utf-8")
        return result

    def check_ops(cases):
        nonlocal rows
        for case in cases:
            if case["op"] in op_names:
                for dtype in dtypes:
                    rows += run_op(case, dtype, args.backend, device, args.seed)
                    print(console_line(*rows[-2:]), flush=True)
                save(complete=False)

    print(f"error of fastvit / error of PyTorch in the same dtype, against a higher-precision reference (max abs / "
          f"mean rel); a row passes at <= {PASS_RATIO}x", flush=True)
    check_ops(op_cases(args.quick, args.seed))
    for name in model_names:
        m_rows, m_vs = run_model(name, dtypes, args.backend, device, args.seed)
        rows += m_rows
        vs_timm += m_vs
        for r in m_rows:
            print(console_line(r), flush=True)
        save(complete=False)
    if not args.quick:
        check_ops(gelu_variant_cases(args.seed))

    result = save(complete=True)
    print(f"{len(rows)} rows, {result['failed']} over {PASS_RATIO}x; wrote {out / 'numerics.json'} and "
          f"{out / 'numerics.md'} in {result['seconds']:.0f}s")
    return 1 if result["failed"] and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
