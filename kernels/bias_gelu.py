"""Bias + GELU: the exact (erf) GELU of the paper, or one of its two approximations.

y = GELU(x + b) in x's dtype (the fc1 GEMM's output dtype; the sum is taken in fp32). Backward recomputes
x + b from the saved pre-activation x and the bias, so nothing else is kept, and folds db into per-program fp32
partial sums reduced afterwards. The Triton launch and the torch fallback sit in the same ``torch.library``
custom ops and save the same tensors.

``approximate`` picks the GELU, as timm's configs name them: "none" the exact u Phi(u) (the paper, timm's 'gelu'),
"tanh" 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) (``F.gelu(approximate="tanh")``, SigLIP's 'gelu_tanh'),
"sigmoid" u sigmoid(1.702 u) (Hendrycks and Gimpel's sigmoid approximation, OpenAI CLIP's 'quick_gelu'). The
kernels write tanh(z) as 2 sigmoid(2 z) - 1, so both approximations are u sigmoid(s(u)).
"""
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastvit.kernels._launch import (PlannedLaunch, Plans, accumulation_dtype, apply, as_rows, cast, cdiv,
                                     eager_op, next_power_of_2, plans_apply, row_programs,
                                     triton_in_backward)
from fastvit.kernels._gemm import linear, matmul
from fastvit.kernels._report import AOT_IMAGES, AOT_PROGRAMS, spec_from_launch

# constexpr so the kernels can read them
_SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_TANH_SCALE = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))  # 0.5 (1 + tanh(z)) = sigmoid(2 z)
_TANH_CUBIC = tl.constexpr(0.044715)
QUICK_GELU_SCALE = 1.702  # s of CLIP's quick GELU u sigmoid(s u)
_SIGMOID_SCALE = tl.constexpr(QUICK_GELU_SCALE)

APPROXIMATIONS = ("none", "tanh", "sigmoid")


def check_approximate(approximate: str) -> str:
    """``approximate`` itself, or a ValueError naming the GELUs there are."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return approximate


def gelu_ref(u, approximate="none", inplace=False):
    """Torch reference of the GELU ``approximate`` names, computed as timm's modules compute it (``nn.GELU``,
    ``QuickGELU``); ``inplace`` writes it into ``u``."""
    if approximate == "sigmoid":
        s = torch.sigmoid(QUICK_GELU_SCALE * u)
        return u.mul_(s) if inplace else u * s
    # torch._C._nn.gelu_: aten's in-place GELU without torch.ops' Python dispatch (~2 us less a call)
    return (torch._C._nn.gelu_ if inplace else F.gelu)(u, approximate=approximate)


def bias_gelu_ref(x, bias, approximate="none"):
    """Torch reference: GELU(x + b)."""
    return gelu_ref(x if bias is None else x + bias, approximate)


def _gelu_backward(dy, u, approximate):
    """dy GELU'(u) by torch's own fused backward kernels: GELU's for "none" / "tanh"; for "sigmoid", SiLU's at
    v = 1.702 u, since u sigmoid(1.702 u) = SiLU(v) / 1.702 has the derivative SiLU'(v) (two passes over u where
    autograd's chain through timm's QuickGELU takes five; what it saved, the sigmoid, is not kept here). aten has
    no derivative of silu_backward, so a backward that autograd records (create_graph=True) writes SiLU'(v) out."""
    if approximate != "sigmoid":
        return torch.ops.aten.gelu_backward(dy, u, approximate=approximate)
    if torch.is_grad_enabled():
        s = torch.sigmoid(QUICK_GELU_SCALE * u)
        return dy * s * (1 + QUICK_GELU_SCALE * u * (1 - s))
    return torch.ops.aten.silu_backward(dy, u * QUICK_GELU_SCALE)


@triton.jit
def _gate_arg(u, APPROXIMATE: tl.constexpr):
    """s(u) of u sigmoid(s(u)); tensors first in each product (a constexpr first makes the interpreter's product a
    constexpr)."""
    if APPROXIMATE == "tanh":
        z = u * _TANH_SCALE * (1.0 + u * u * _TANH_CUBIC)
    else:
        z = u * _SIGMOID_SCALE
    return z


@triton.jit
def gelu(u, APPROXIMATE: tl.constexpr):
    """GELU(u) of fp32 ``u`` (module doc)."""
    if APPROXIMATE == "none":
        y = 0.5 * u * (1.0 + tl.math.erf(u * _SQRT1_2))
    else:
        y = u * tl.sigmoid(_gate_arg(u, APPROXIMATE))
    return y


@triton.jit
def gelu_grad(u, APPROXIMATE: tl.constexpr):
    """d GELU(u) / du of fp32 ``u``: Phi(u) + u phi(u) for the exact GELU, s + u s (1 - s) s'(u) for
    u sigmoid(s(u)), with 1 - s as sigmoid(-s(u)): subtracted from 1 where s is near 1 it kept only the rounding
    of s (the H200's fp32 tanh-GELU gradient had 3.3x PyTorch's max error, which has the same cancellation in
    1 - tanh^2, half as large)."""
    if APPROXIMATE == "none":
        g = 0.5 * (1.0 + tl.math.erf(u * _SQRT1_2)) + u * tl.exp(-0.5 * u * u) * _INV_SQRT_2PI
    else:
        z = _gate_arg(u, APPROXIMATE)
        if APPROXIMATE == "tanh":
            ds = (1.0 + u * u * (3.0 * _TANH_CUBIC)) * _TANH_SCALE
        else:
            ds = _SIGMOID_SCALE
        s = tl.sigmoid(z)
        g = s + u * s * tl.sigmoid(-z) * ds
    return g


@functools.lru_cache(maxsize=None)
def _config(n_cols):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for rows of ``n_cols``: tiles of 4096 values, up to 1024 columns
    wide.

    The launchers and aot_specs both use this. 8 warps (16 values a thread): with 4 the backward spills on sm_90.
    3 stages is Triton's default for CUDA, which the kernels have always run with.
    """
    block_n = min(next_power_of_2(n_cols), 1024)
    return max(4096 // block_n, 1), block_n, 8, 3


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, stride_x, stride_y, n_rows, n_cols,
                          HAS_BIAS: tl.constexpr, APPROXIMATE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows = rows.to(tl.int64)
    u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    y = gelu(u, APPROXIMATE)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB_PART, Y, stride_dy, stride_x, stride_dx, stride_y, n_rows, n_cols,
                          row_blocks_per_program, HAS_BIAS: tl.constexpr, APPROXIMATE: tl.constexpr,
                          STORE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DX = DY GELU'(X + B), its column sums into DB_PART, and with STORE_Y the recomputed GELU(X + B) into Y."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * row_blocks_per_program
    for blk in range(first, first + row_blocks_per_program):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        rows = rows.to(tl.int64)
        u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += b
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dy * gelu_grad(u, APPROXIMATE)
        db += dx
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_Y:
            tl.store(Y + rows[:, None] * stride_y + cols[None, :], gelu(u, APPROXIMATE).to(Y.dtype.element_ty),
                     mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * n_cols + cols, tl.sum(db, axis=0), mask=col_mask)


@eager_op("bias_gelu_fwd")
def bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], use_triton: bool,
                  approximate: str = "none") -> torch.Tensor:
    """GELU(x + bias) on x of shape (..., C), in x's dtype."""
    if not use_triton:
        # as PyTorch computes it: the sum in x's dtype, then GELU (fp32 inside) rounded once
        return gelu_ref(x if bias is None else x + cast(bias, x.dtype), approximate)
    if not plans_apply(x):
        return _Forward(x, bias, approximate, False)(x, bias)
    key = (x.shape, x.stride(), x.dtype, None if bias is None else (bias.stride(), bias.dtype), approximate,
           x.device)
    plan = _FORWARDS.get(key)
    if plan is None:
        plan = _FORWARDS.keep(key, _Forward(x, bias, approximate, True))
    return plan(x, bias)


class _Forward:
    """What :func:`bias_gelu_fwd` does on the kernel for one signature of its arguments: the output's allocation
    and the launch (``bindable``: a plan kept for later calls, see ``_launch.Plans``)."""

    def __init__(self, x, bias, approximate, bindable):
        self.rows = as_rows(x) is not x
        self.n_cols = x.shape[-1]
        self.n_rows = x.numel() // max(self.n_cols, 1)
        block_m, block_n, num_warps, num_stages = _config(self.n_cols)
        grid = (cdiv(self.n_rows, block_m), cdiv(self.n_cols, block_n))
        flags = dict(HAS_BIAS=bias is not None, APPROXIMATE=approximate, BLOCK_M=block_m, BLOCK_N=block_n,
                     num_warps=num_warps, num_stages=num_stages)
        self.launch = PlannedLaunch(_bias_gelu_fwd_kernel, grid, flags, bindable)

    def __call__(self, x, bias):
        if self.rows:
            x = as_rows(x)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        if self.n_rows and self.n_cols:
            b = x if bias is None else bias.contiguous()
            self.launch((x, b, y), (x, b), lambda: (x.stride(-2), y.stride(-2), self.n_rows, self.n_cols))
        return y


_FORWARDS = Plans()


@bias_gelu_fwd.register_fake
def _(x, bias, use_triton, approximate="none"):
    return x.new_empty(x.shape)


@eager_op("bias_gelu_bwd")
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], use_triton: bool,
                  approximate: str = "none", need_y: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dbias, y) from the saved pre-activation x and bias: dbias is empty when bias is None; y, the forward's
    GELU(x + bias) recomputed in the same pass over x (for a weight gradient that needs it), is empty unless
    ``need_y``."""
    if not use_triton:
        n_cols = x.shape[-1]
        # as PyTorch computes it, by torch's own GELU backward (fp32 inside) on the forward's pre-activation; y as
        # bias_gelu_fwd computes it
        u = x if bias is None else x + cast(bias, x.dtype)
        dx = _gelu_backward(cast(dy, x.dtype), u, approximate)
        db = (x.new_empty(0) if bias is None
              else cast(dx.reshape(-1, n_cols).sum(0, dtype=accumulation_dtype(dx.dtype)), bias.dtype))
        return dx, db, gelu_ref(u, approximate) if need_y else x.new_empty(0)
    if not plans_apply(dy):
        return _Backward(dy, x, bias, approximate, need_y, False)(dy, x, bias)
    key = (dy.shape, dy.stride(), dy.dtype, x.shape, x.stride(), x.dtype,
           None if bias is None else (bias.stride(), bias.dtype), approximate, need_y, x.device)
    plan = _BACKWARDS.get(key)
    if plan is None:
        plan = _BACKWARDS.keep(key, _Backward(dy, x, bias, approximate, need_y, True))
    return plan(dy, x, bias)


class _Backward:
    """What :func:`bias_gelu_bwd` does on the kernel for one signature of its arguments (as :class:`_Forward`)."""

    def __init__(self, dy, x, bias, approximate, need_y, bindable):
        self.rows = as_rows(dy) is not dy or as_rows(x) is not x
        self.n_cols = x.shape[-1]
        self.n_rows = x.numel() // max(self.n_cols, 1)
        self.need_y = need_y
        block_m, block_n, num_warps, num_stages = _config(self.n_cols)
        self.row_blocks = cdiv(self.n_rows, block_m)
        self.programs = row_programs(self.row_blocks, x.device) if self.row_blocks else 0
        flags = dict(HAS_BIAS=bias is not None, APPROXIMATE=approximate, STORE_Y=need_y, BLOCK_M=block_m,
                     BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
        self.launch = PlannedLaunch(_bias_gelu_bwd_kernel, (self.programs, cdiv(self.n_cols, block_n)), flags,
                                    bindable)

    def __call__(self, dy, x, bias):
        if self.rows:
            dy, x = as_rows(dy), as_rows(x)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        need_y = self.need_y
        y = torch.empty_like(dx) if need_y else x.new_empty(0)
        if not (self.n_rows and self.n_cols):
            return dx, (x.new_empty(0) if bias is None else torch.zeros_like(bias)), y
        db_part = x.new_empty((self.programs if bias is not None else 0, self.n_cols), dtype=torch.float32)
        b = x if bias is None else bias.contiguous()
        self.launch((dy, x, b, dx, db_part, y if need_y else dx), (dy, x, b),
                    lambda: (dy.stride(-2), x.stride(-2), dx.stride(-2), dx.stride(-2), self.n_rows, self.n_cols,
                             cdiv(self.row_blocks, self.programs)))
        return dx, (x.new_empty(0) if bias is None else cast(db_part.sum(0), bias.dtype)), y


_BACKWARDS = Plans()


@bias_gelu_bwd.register_fake
def _(dy, x, bias, use_triton, approximate="none", need_y=False):
    return (x.new_empty(x.shape), (x.new_empty(0) if bias is None else torch.empty_like(bias)),
            x.new_empty(x.shape if need_y else (0,)))


class BiasGeluFn(torch.autograd.Function):
    """Autograd for GELU(x + b) on (..., C); saves the pre-activation x and b only."""

    @staticmethod
    def forward(ctx, x, bias, use_triton, approximate):
        ctx.use_triton, ctx.approximate = use_triton, approximate
        ctx.save_for_backward(x, bias)
        return bias_gelu_fwd(x, bias, use_triton, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, db, _ = bias_gelu_bwd(dy, x, bias, triton_in_backward(ctx.use_triton), ctx.approximate)
        return dx, (None if bias is None else db), None, None


class BiasGeluLinearFn(torch.autograd.Function):
    """GELU(x + b) W^T + c that keeps no GELU output for backward.

    A plain Linear after the GELU would save its (rows, 4D) input; here backward recomputes it from the saved
    pre-activation x, so the MLP's hidden layer is saved once, as x. The recompute rides on the GELU's gradient
    pass (which reads x anyway), after the product that gives that gradient: a separate forward pass read x once
    more, 42 ms of the H200's 1577 ms B/16 step (profile.json, ``_bias_gelu_fwd_kernel``).
    """

    @staticmethod
    def forward(ctx, x, bias, lin_weight, lin_bias, use_triton, approximate):
        ctx.use_triton, ctx.approximate = use_triton, approximate
        ctx.has_lin_bias = lin_bias is not None
        ctx.save_for_backward(x, bias, lin_weight)
        return linear(bias_gelu_fwd(x, bias, use_triton, approximate), lin_weight, lin_bias)

    @staticmethod
    def backward(ctx, dout):
        x, bias, lin_weight = ctx.saved_tensors
        use_triton, approximate = triton_in_backward(ctx.use_triton), ctx.approximate
        dh = cast(matmul(dout, lin_weight), x.dtype)
        dx, db, h = bias_gelu_bwd(dh, x, bias, use_triton, approximate, True)
        g = dout.reshape(-1, dout.shape[-1])
        d_lin_w = cast(matmul(g.t(), h.reshape(-1, h.shape[-1])), lin_weight.dtype)
        d_lin_b = cast(g.sum(0), lin_weight.dtype) if ctx.has_lin_bias else None
        # None for use_triton, approximate and what a subclass's forward adds
        return dx, (None if bias is None else db), d_lin_w, d_lin_b, *[None] * (len(ctx.needs_input_grad) - 4)


def _check_rows(x, bias):
    if x.ndim == 0:
        raise ValueError("x must have a channel dim, shape (..., C), got a 0-d tensor (reshape it to (1,))")
    c = x.shape[-1]
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias must have shape ({c},), got {tuple(bias.shape)}")
    return as_rows(x)


def bias_gelu(x, bias, use_triton, approximate="none"):
    """GELU(x + bias) over the last dim of x (any leading shape), in x's dtype; see the module doc."""
    x2 = _check_rows(x, bias)
    out = apply(BiasGeluFn, x2, bias, use_triton, check_approximate(approximate))
    return out if x2 is x else out.view_as(x)


def bias_gelu_inference(x, bias, use_triton, approximate="none"):
    """:func:`bias_gelu` where autograd records nothing and nothing traces or profiles (eager inference, ``ops``):
    the forward op's body alone, without the autograd Function and custom-op layers around it."""
    x2 = _check_rows(x, bias)
    out = bias_gelu_fwd.fn(x2, bias, use_triton, check_approximate(approximate))
    return out if x2 is x else out.view_as(x)


def bias_gelu_linear(x, bias, lin_weight, lin_bias, use_triton, approximate="none", function=BiasGeluLinearFn,
                     function_args=()):
    """GELU(x + bias) lin_weight^T + lin_bias over the last dim of x, recomputing the GELU in backward.

    ``function`` is the autograd Function that runs it, with ``function_args`` after the common ones
    (``gelu_matmul`` passes its fused-GEMM subclass and the kernel choice)."""
    x2 = _check_rows(x, bias)
    out = apply(function, x2, bias, lin_weight, lin_bias, use_triton, check_approximate(approximate),
                *function_args)
    return out if x2 is x else out.view(*x.shape[:-1], lin_weight.shape[0])


def aot_specs(shape, dtype):
    """Forward and backward at the MLP width ``shape.mlp_dim`` for ``AOT_IMAGES`` images, as a ViT launches them:
    with fc1's bias (``ops.layer_norm_mlp`` adds it here), fp32 under AMP (label "amp") and in ``dtype`` in a model
    cast to it ("half"); the exact GELU first, then each approximation (label "tanh", "sigmoid"). The backward
    stores the recomputed GELU as well, as the MLP's (``BiasGeluLinearFn``) does, on every token and (label
    "class token") on one row per image, the MLP of a training step's last block (``model.class_token_suffices``):
    one row block per program there (an int Triton specialises)."""
    block_m, block_n, num_warps, num_stages = _config(shape.mlp_dim)
    act, c, rows = f"*{dtype}", shape.mlp_dim, AOT_IMAGES * shape.tokens
    specs = []
    for approximate in APPROXIMATIONS:
        consts = {"HAS_BIAS": True, "APPROXIMATE": approximate, "BLOCK_M": block_m, "BLOCK_N": block_n}
        for variant, bias in (("amp", "*fp32"), ("half", act)):
            label = f"C={c} {variant}" + ("" if approximate == "none" else f" {approximate}")
            fwd = {"X": act, "B": bias, "Y": act, "stride_x": c, "stride_y": c, "n_rows": rows, "n_cols": c}
            specs.append(spec_from_launch("bias_gelu_fwd", _bias_gelu_fwd_kernel, fwd, consts, num_warps, num_stages,
                                          label))
            for n_rows, suffix in ((rows, ""), (AOT_IMAGES, " class token")):
                bwd = {"DY": act, "X": act, "B": bias, "DX": act, "DB_PART": "*fp32", "Y": act, "stride_dy": c,
                       "stride_x": c, "stride_dx": c, "stride_y": c, "n_rows": n_rows, "n_cols": c,
                       "row_blocks_per_program": cdiv(cdiv(n_rows, block_m), AOT_PROGRAMS)}
                specs.append(spec_from_launch("bias_gelu_bwd", _bias_gelu_bwd_kernel, bwd, dict(consts, STORE_Y=True),
                                              num_warps, num_stages, label + suffix))
    return specs
