"""The torch fallbacks' GEMMs: in fp32 on a CPU whose bf16 / fp16 GEMM PyTorch only emulates.

Where oneDNN has no native bf16 (or fp16) GEMM for the CPU (x86 without AVX512-BF16 / AMX-BF16 or AVX512-FP16 /
AMX-FP16: AMD EPYC before Zen 4, Intel before Cooper Lake, most laptops), PyTorch runs a low-precision matmul through
a generic kernel that converts element by element: on this project's AVX2 VM a bf16 addmm at the smoke shapes
(8704 x 64 x 192 ... 8704 x 96 x 384) took 8-19x as long as the fp32 one, and was ~75% of a bf16-autocast forward of
timm's ViT and of ours. That kernel accumulates in fp32 too, so rounding the operands to the low-precision dtype
(what autocast does), multiplying in fp32 and rounding the product once gives the same values up to summation order
(at ViT shapes 99.99% of outputs are bitwise equal, the rest one rounding step apart) in a fraction of the time.

:func:`linear` and :func:`matmul` do that on such CPUs and are F.linear and ``@`` elsewhere: on a GPU, on a CPU
with native low-precision GEMMs, in fp32, and under torch.export (an exported program keeps plain low-precision
products). torch.compile traces them as written, the backward's too: :func:`matmul` turns autocast off around its
product, since AOTAutograd traces a Function's backward under the forward's autocast, which would cast it back.
:class:`LinearFn` is the Linear whose backward products go the same way; it saves what F.linear saves.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastvit.kernels._launch import autocast_off, cast, exporting, transformed


def _emulated_dtypes() -> frozenset:
    """The low-precision dtypes whose CPU GEMM this build and CPU emulate. ``FASTVIT_CPU_LOWP_GEMM=native`` keeps
    PyTorch's own kernels whatever the CPU (``fp32`` forces the fp32 products, for tests)."""
    choice = os.environ.get("FASTVIT_CPU_LOWP_GEMM", "auto")
    if choice not in ("auto", "native", "fp32"):
        raise ValueError(f"FASTVIT_CPU_LOWP_GEMM must be auto, native or fp32, got {choice!r}")
    if choice != "auto":
        return frozenset() if choice == "native" else frozenset((torch.bfloat16, torch.float16))
    mkldnn = torch.ops.mkldnn
    native = {torch.bfloat16: mkldnn._is_mkldnn_bf16_supported(), torch.float16: mkldnn._is_mkldnn_fp16_supported()}
    return frozenset(dtype for dtype, ok in native.items() if not (ok and torch.backends.mkldnn.is_available()))


# read once, at import: a constant that dynamo folds, and no per-call query
EMULATED = _emulated_dtypes()


def in_fp32(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a product of CPU operands like ``x`` computing in ``dtype`` runs in fp32 here (see the module doc)."""
    return (dtype in EMULATED and x.device.type == "cpu" and not exporting()
            and not transformed())


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and held in fp32: the operand value a ``dtype`` GEMM would multiply."""
    return cast(t, dtype).float()


def fp32_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The dtype ``F.linear(x, weight, bias)`` computes in, where :func:`in_fp32` moves that product to fp32;
    else None (also for operands whose dtypes F.linear would reject: it raises for them)."""
    device = x.device.type
    if not EMULATED or device != "cpu":  # the cheap test first, for the host path of a GPU call
        return None
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    if not in_fp32(x, dtype) or not (autocast or weight.dtype == dtype and (bias is None or bias.dtype == dtype)):
        return None
    return dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its dtype rules (under autocast every operand is cast to the autocast
    dtype; without, the operands' dtypes must agree), in fp32 where :func:`fp32_dtype` says so, rounded to the
    dtype F.linear returns."""
    dtype = fp32_dtype(x, weight, bias)
    if dtype is None:
        return F.linear(x, weight, bias)
    with autocast_off(x.device.type):
        out = F.linear(_rounded(x, dtype), _rounded(weight, dtype), None if bias is None else _rounded(bias, dtype))
    return out.to(dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in a's dtype (``b`` rounded to it first), in fp32 where :func:`in_fp32` says so: the backward
    products of the fallbacks, whose gradient operand sets the dtype."""
    dtype = a.dtype
    if not in_fp32(a, dtype):
        return a @ cast(b, dtype)
    # autocast off: torch.compile traces a Function's backward under the forward's autocast (AOTAutograd's
    # backward_pass_autocast), which would cast this product back to the low-precision dtype
    with autocast_off(a.device.type):
        return (a.float() @ _rounded(b, dtype)).to(dtype)


class LinearFn(torch.autograd.Function):
    """x W^T + b by :func:`linear`, both backward products by :func:`matmul`, for x and W already in the compute
    dtype (cast before, where autograd records the casts, as autocast casts F.linear's operands): it saves them, as
    F.linear does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        g = cast(dout, x.dtype).reshape(-1, dout.shape[-1])
        dx = matmul(g, weight).view_as(x) if ctx.needs_input_grad[0] else None
        dw = matmul(g.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        db = cast(g.sum(0), ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db
