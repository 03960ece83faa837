"""Residual add + LayerNorm.

Forward: new_residual = x + residual (kept in fp32 if asked), y = LayerNorm(new_residual) in x's dtype, with
fp32 statistics. Backward needs only new_residual, mean and rstd (the normalised input is recomputed), and one
kernel writes d(new_residual) = dLN + the gradient flowing into new_residual from downstream, which is both the
x and the residual gradient, plus per-program fp32 partial sums of dweight/dbias that are reduced afterwards.

Both the Triton launch and the torch fallback sit inside the same ``torch.library`` custom ops and save the same
tensors, so memory and numerics measured on CPU speak for the GPU path.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastvit.kernels._launch import (PlannedLaunch, Plans, accumulation_dtype, apply, as_rows, cast, cdiv,
                                     eager_op, next_power_of_2, plain_inference,
                                     plans_apply, row_programs, triton_in_backward)
from fastvit.kernels._gemm import linear, matmul
from fastvit.kernels._report import AOT_IMAGES, AOT_PROGRAMS, spec_from_launch

MAX_FEATURES = 16384


def add_layer_norm_ref(x, residual, weight, bias, eps=1e-6, residual_in_fp32=False):
    """Torch reference: (LayerNorm(x + residual), x + residual)."""
    new_residual = x if residual is None else x + residual
    if residual_in_fp32:
        new_residual = new_residual.float()
    # cast the parameters to the residual's dtype: torch's CPU LayerNorm rejects fp16 weights on an fp32 input
    dt = new_residual.dtype
    y = F.layer_norm(new_residual, weight.shape, weight.to(dt), None if bias is None else bias.to(dt), eps)
    return y.to(x.dtype), new_residual


@functools.lru_cache(maxsize=None)
def _config(n_cols):
    """(BLOCK, num_warps, num_stages) for a row of ``n_cols`` features; the launchers and aot_specs both use this.
    3 stages is Triton's default for CUDA, which the kernels have always run with."""
    if not 0 < n_cols <= MAX_FEATURES:
        raise ValueError(f"add_layer_norm supports 1 to {MAX_FEATURES} features, got {n_cols}")
    block = next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 8), 3


def _stats_shape(x):
    """(..., 1) for x of shape (..., D): one mean / rstd per row, shaped as torch's LayerNorm returns them."""
    return (*x.shape[:-1], 1)


def _residual_dtype(x, residual, residual_in_fp32):
    if residual_in_fp32:
        return torch.float32
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@triton.jit
def _add_ln_fwd_kernel(X, R, W, B, Y, RES_OUT, MEAN, RSTD,
                       stride_x, stride_r, stride_y, stride_res, n_cols, eps,
                       HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr, STORE_Y: tl.constexpr,
                       BLOCK: tl.constexpr):
    """The sum and its statistics; without STORE_Y nothing else (a fused matmul normalises while it loads)."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes a Python float as fp64 (Triton: fp32)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        stored = x.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_res + cols, stored, mask=mask)
        # normalise exactly what the backward will reload
        x = stored.to(tl.float32)
    # masked lanes hold 0, so they add nothing to the sum; they are zeroed again before the variance
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    if STORE_Y:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd * w + b
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _add_ln_bwd_kernel(DY, DRES_OUT, RES, W, MEAN, RSTD, DX, DRES_IN, DW_PART, DB_PART,
                       stride_dy, stride_dres, stride_res, stride_dx, stride_dres_in,
                       n_rows, n_cols, rows_per_program,
                       HAS_DRES: tl.constexpr, STORE_DRES_IN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r in range(row_start, row_end):
        row = tl.cast(r, tl.int64)
        res = tl.load(RES + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        # masked lanes need no tl.where: dy and w load as 0 there, so they add 0 to every sum below
        xhat = (res - mean) * rstd
        dw += dy * xhat
        db += dy
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n_cols
        c2 = tl.sum(wdy, axis=0) / n_cols
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DRES:
            dx += tl.load(DRES_OUT + row * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if STORE_DRES_IN:
            tl.store(DRES_IN + row * stride_dres_in + cols, dx.to(DRES_IN.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=mask)


@eager_op("add_layer_norm_fwd")
def add_layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, residual_in_fp32: bool, use_triton: bool,
                       y_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """On x of shape (..., D) (rows as ``_launch.as_rows`` gives them): (y, new_residual, mean, rstd);
    new_residual is empty when it would equal x itself; the statistics are (..., 1), as torch's LayerNorm gives
    them. y is in x's dtype, or ``y_dtype`` (rounded once from fp32 either way)."""
    if not use_triton:
        y, res, mean, rstd = _add_layer_norm_torch(x, residual, weight, bias, eps, residual_in_fp32, y_dtype)
        return y, (res if res is not x else x.new_empty(0)), mean, rstd
    return launch_add_layer_norm(x, residual, weight, bias, eps, residual_in_fp32, y_dtype or x.dtype)


def _add_layer_norm_torch(x, residual, weight, bias, eps, residual_in_fp32, y_dtype=None, keep_stats=True):
    """The kernel's math by torch's own ops: (y, new_residual, mean, rstd), new_residual x itself where it equals x.
    The sum in fp32 (torch adds 16-bit values in fp32 too), rounded once to the residual's dtype, then normalised
    with fp32 statistics and rounded once to x's dtype or ``y_dtype`` (an fp32 model gets nn.LayerNorm's bits, as a
    traced or edited one does). Without ``keep_stats`` (inference) the statistics may come out in another dtype."""
    res = cast(x if residual is None else torch.add(x, residual), _residual_dtype(x, residual, residual_in_fp32))
    # fp32 parameters: fp32 statistics for any input (torch's mixed-dtype LayerNorm for a 16-bit one); fp64 for an
    # fp64 one. Where nothing keeps the statistics, parameters in res's dtype (a model cast to 16 bits) are taken as
    # they are: torch's LayerNorm computes y in fp32 from them either way (timm's bits), and the two casts cost more
    # than a 16-bit LayerNorm of one image on a CPU (bench/paired.py, ViT-S/16 bf16 model, batch 1)
    if keep_stats or weight.dtype != res.dtype or bias.dtype != res.dtype:
        p_dtype = accumulation_dtype(res.dtype)
    else:
        p_dtype = res.dtype
    y, mean, rstd = torch.native_layer_norm(res, (x.shape[-1],), cast(weight, p_dtype), cast(bias, p_dtype), eps)
    return cast(y, y_dtype or x.dtype), res, mean, rstd


def add_layer_norm_inference(x, residual, weight, bias, eps, residual_in_fp32, use_triton=False):
    """:func:`add_layer_norm` where autograd records nothing and nothing traces or profiles (eager inference,
    ``ops``): the same kernel launch, or torch math, on the same values, without the autograd Function and custom-op
    layers around it (host time a call: ~8 us less on the torch path, ~2-4 us on the kernels', bench/overhead.py; at
    small batches a forward is mostly host time)."""
    _check_ln_shapes(x, residual, weight, bias)
    if not use_triton:
        y, res, _, _ = _add_layer_norm_torch(x, residual, weight, bias, eps, residual_in_fp32, keep_stats=False)
        return y, res
    # the launcher takes x and the residual as rows; its outputs are (rows, D) where either was not contiguous
    y, res, _, _ = launch_add_layer_norm(x, residual, weight, bias, eps, residual_in_fp32, x.dtype, keep=False)
    if y.dim() != x.dim():
        y = y.view_as(x)
    if res is None:  # not stored: new_residual would equal x
        return y, x
    return y, (res if res.dim() == x.dim() else res.view_as(x))


def _normalized(res, weight, bias, eps, use_triton, dtype):
    """LayerNorm(res) in ``dtype``, recomputed for a backward: in plain eager mode (``plain_inference``: a backward
    that autograd does not record, untraced) the kernel alone, keeping neither statistic (the saved ones are the
    same values: the same op on the same values); else the op, as its forward ran it."""
    if use_triton and plain_inference((res, weight, bias)):
        return launch_add_layer_norm(res, None, weight, bias, eps, False, dtype, keep=False)[0]
    return add_layer_norm_fwd(res, None, weight, bias, eps, False, use_triton, dtype)[0]


def launch_add_layer_norm(x, residual, weight, bias, eps, residual_in_fp32, y_dtype=None, keep=True):
    """The forward kernel on (..., D), x and the residual taken as rows (``as_rows``): (y, new_residual, mean,
    rstd) as add_layer_norm_fwd returns them, y the LayerNorm output in ``y_dtype``; without ``y_dtype`` y is None
    and the kernel writes only the sum and its statistics (for a GEMM that normalises while it loads,
    ``ln_matmul``). ``keep=False`` (nothing keeps the statistics: inference, a backward's recomputation): (y,
    new_residual or None where it would equal x, None, None), one scratch buffer taking both statistics' writes
    (two allocations fewer, ~2-3 us of host time; the same compiled kernel).

    In eager mode the choices for a call signature are made once (:class:`_Forward`, kept in ``_FORWARDS``):
    later calls build a key, allocate and launch (bench/overhead.py: ~6 us a call here, ~10.5 before)."""
    if not plans_apply(x):
        return _Forward(x, residual, eps, residual_in_fp32, y_dtype, keep, False)(x, residual, weight, bias)
    key = (x.shape, x.stride(), x.dtype,
           None if residual is None else (residual.shape, residual.stride(), residual.dtype),
           weight.dtype, weight.stride(), bias.dtype, bias.stride(), y_dtype, eps, residual_in_fp32, keep,
           x.device)
    plan = _FORWARDS.get(key)
    if plan is None:
        plan = _FORWARDS.keep(key, _Forward(x, residual, eps, residual_in_fp32, y_dtype, keep, True))
    return plan(x, residual, weight, bias)


class _Forward:
    """What :func:`launch_add_layer_norm` does for one signature of its arguments: the sum's dtype and whether it is
    stored, the outputs' allocations and the kernel's launch (``bindable``: a plan kept for later calls)."""

    def __init__(self, x, residual, eps, residual_in_fp32, y_dtype, keep, bindable):
        self.res_dtype = _residual_dtype(x, residual, residual_in_fp32)
        self.store = residual is not None or self.res_dtype != x.dtype
        self.n_cols = x.shape[-1]
        self.n_rows = x.numel() // self.n_cols
        block, num_warps, num_stages = _config(self.n_cols)
        flags = dict(HAS_RESIDUAL=residual is not None, STORE_RESIDUAL=self.store, STORE_Y=y_dtype is not None,
                     BLOCK=block, num_warps=num_warps, num_stages=num_stages)
        self.launch = PlannedLaunch(_add_ln_fwd_kernel, (self.n_rows,), flags, bindable)
        self.rows = as_rows(x) is not x or (residual is not None and as_rows(residual) is not residual)
        self.stats_shape = _stats_shape(as_rows(x)) if keep else (self.n_rows,)
        self.eps, self.y_dtype, self.keep = eps, y_dtype, keep

    def __call__(self, x, residual, weight, bias):
        if self.rows:
            x = as_rows(x)
            residual = None if residual is None else as_rows(residual)
        y = None if self.y_dtype is None else torch.empty_like(x, dtype=self.y_dtype,
                                                               memory_format=torch.contiguous_format)
        # empty_like / new_empty: ~1 us less host time each than torch.empty(shape, dtype=, device=)
        store = self.store
        if store:
            res = torch.empty_like(x, dtype=self.res_dtype, memory_format=torch.contiguous_format)
        else:
            res = x.new_empty(0, dtype=self.res_dtype) if self.keep else None
        mean = x.new_empty(self.stats_shape, dtype=torch.float32)
        rstd = torch.empty_like(mean) if self.keep else mean
        if self.n_rows:
            r_arg = x if residual is None else residual
            y_arg = x if y is None else y  # unused without y: any pointer of the activation dtype
            inputs = (x, r_arg, weight.contiguous(), bias.contiguous())
            self.launch((*inputs, y_arg, res if store else y_arg, mean, rstd), inputs,
                        lambda: (x.stride(-2), r_arg.stride(-2), y_arg.stride(-2), res.stride(-2) if store else 0,
                                 self.n_cols, self.eps))
        return (y, res, mean, rstd) if self.keep else (y, res, None, None)


_FORWARDS = Plans()


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, residual_in_fp32, use_triton, y_dtype=None):
    res_dtype = _residual_dtype(x, residual, residual_in_fp32)
    store = residual is not None or res_dtype != x.dtype
    res = x.new_empty(x.shape if store else (0,), dtype=res_dtype)
    stat = x.new_empty(_stats_shape(x), dtype=torch.float32)
    return (torch.empty_like(x, dtype=y_dtype or x.dtype, memory_format=torch.contiguous_format), res, stat,
            torch.empty_like(stat))


@eager_op("add_layer_norm_bwd")
def add_layer_norm_bwd(dy: torch.Tensor, dres_out: Optional[torch.Tensor], res: torch.Tensor,
                       weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, separate_residual_grad: bool,
                       use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_residual, dweight, dbias): dx in dy's dtype; d_residual (in res's dtype) only when
    ``separate_residual_grad`` (the residual's dtype differs from x's), else empty and equal to dx."""
    n_cols = res.shape[-1]
    if not use_triton:
        # the kernel's math by torch's own LayerNorm backward (fp32 inside), in the residual's dtype
        w = cast(weight, accumulation_dtype(res.dtype))
        d, dw, db = torch.ops.aten.native_layer_norm_backward(
            cast(dy, res.dtype), res, [n_cols], mean, rstd, w, w, [True, True, True])
        if dres_out is not None:
            d = d + dres_out
        dres_in = d.to(res.dtype, copy=True) if separate_residual_grad else dy.new_empty(0, dtype=res.dtype)
        return cast(d, dy.dtype), dres_in, cast(dw, weight.dtype), cast(db, weight.dtype)
    if not plans_apply(dy):
        return _Backward(dy, dres_out, res, separate_residual_grad, False)(dy, dres_out, res, weight, mean, rstd)
    key = (dy.shape, dy.stride(), dy.dtype, None if dres_out is None else (dres_out.stride(), dres_out.dtype),
           res.shape, res.stride(), res.dtype, weight.dtype, weight.stride(), mean.dtype, rstd.dtype,
           separate_residual_grad, dy.device)
    plan = _BACKWARDS.get(key)
    if plan is None:
        plan = _BACKWARDS.keep(key, _Backward(dy, dres_out, res, separate_residual_grad, True))
    return plan(dy, dres_out, res, weight, mean, rstd)


class _Backward:
    """What :func:`add_layer_norm_bwd` does on the kernels for one signature of its arguments (as
    :class:`_Forward` for the forward)."""

    def __init__(self, dy, dres_out, res, separate_residual_grad, bindable):
        self.n_cols = res.shape[-1]
        self.n_rows = res.numel() // self.n_cols
        self.separate = separate_residual_grad
        self.programs = row_programs(self.n_rows, dy.device) if self.n_rows else 0
        block, num_warps, num_stages = _config(self.n_cols)
        flags = dict(HAS_DRES=dres_out is not None, STORE_DRES_IN=separate_residual_grad, BLOCK=block,
                     num_warps=num_warps, num_stages=num_stages)
        self.launch = PlannedLaunch(_add_ln_bwd_kernel, (self.programs,), flags, bindable)
        self.rows = as_rows(dy) is not dy or (dres_out is not None and as_rows(dres_out) is not dres_out)

    def __call__(self, dy, dres_out, res, weight, mean, rstd):
        if self.rows:
            dy = as_rows(dy)
            dres_out = None if dres_out is None else as_rows(dres_out)
        dx = torch.empty_like(res, dtype=dy.dtype, memory_format=torch.contiguous_format)
        separate = self.separate
        dres_in = torch.empty_like(res, memory_format=torch.contiguous_format) if separate else res.new_empty(0)
        if not self.n_rows:
            return dx, dres_in, torch.zeros_like(weight), torch.zeros_like(weight)
        # every program writes its row of partial sums, even one left without rows
        dw_part = dy.new_empty((self.programs, self.n_cols), dtype=torch.float32)
        db_part = torch.empty_like(dw_part)
        d_arg = dy if dres_out is None else dres_out
        inputs = (dy, d_arg, res, weight.contiguous(), mean, rstd)
        self.launch((*inputs, dx, dres_in if separate else dx, dw_part, db_part), inputs,
                    lambda: (dy.stride(-2), d_arg.stride(-2), res.stride(-2), dx.stride(-2),
                             dres_in.stride(-2) if separate else 0, self.n_rows, self.n_cols,
                             cdiv(self.n_rows, self.programs)))
        return dx, dres_in, cast(dw_part.sum(0), weight.dtype), cast(db_part.sum(0), weight.dtype)


_BACKWARDS = Plans()


@add_layer_norm_bwd.register_fake
def _(dy, dres_out, res, weight, mean, rstd, separate_residual_grad, use_triton):
    dres_in = res.new_empty(res.shape if separate_residual_grad else (0,))
    return dy.new_empty(res.shape), dres_in, torch.empty_like(weight), torch.empty_like(weight)


def _ln_forward(ctx, x, residual, weight, bias, eps, residual_in_fp32, use_triton):
    """The forward shared by both Functions below: runs the op and records on ``ctx`` what backward needs.

    Returns (y, saved residual, mean, rstd); the saved residual is x itself when new_residual would equal x.
    """
    y, res, mean, rstd = add_layer_norm_fwd(x, residual, weight, bias, eps, residual_in_fp32, use_triton)
    return y, ln_context(ctx, x, residual, res, bias, eps, use_triton), mean, rstd


def ln_context(ctx, x, residual, res, bias, eps, use_triton):
    """Records on ``ctx`` what :func:`_ln_backward` needs (for any forward that produced ``res``, the op's
    new_residual output) and returns the residual to save: ``res``, or x itself when new_residual equals x."""
    ctx.stored = residual is not None or res.dtype != x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = bias.dtype
    ctx.eps = eps
    ctx.use_triton = use_triton
    ctx.set_materialize_grads(False)
    needs = getattr(ctx, "needs_input_grad", None)  # none on apply's context where autograd records nothing
    if ctx.stored and needs is not None and not (needs[0] or needs[1]):
        # x + residual with neither requiring grad (only the norm's or the Linear's parameters train): no grad, as
        # torch's sum has none, instead of a graph node kept alive by the residual stream
        ctx.mark_non_differentiable(res)
    return res if ctx.stored else x


def _ln_backward(ctx, dy, dres, res, weight, mean, rstd):
    """The backward shared by both Functions: (dx, d_residual, dweight, dbias).

    Without a gradient for the LayerNorm's output (only new_residual's: a double backward reaching the residual
    stream, an unused norm) that gradient is x's and the residual's, and the LayerNorm's parameters get None, as
    after timm's separate add and LayerNorm (a zero gradient would still be decayed by AdamW)."""
    if dy is None:
        if dres is None:
            return None, None, None, None
        dx = cast(dres, ctx.x_dtype)
        d_residual = None if ctx.residual_dtype is None else cast(dres, ctx.residual_dtype)
        dw = db = None
    else:
        separate = ctx.residual_dtype is not None and ctx.residual_dtype != ctx.x_dtype
        dx, dres_in, dw, db = add_layer_norm_bwd(dy, dres, res, weight, mean, rstd, separate,
                                                 triton_in_backward(ctx.use_triton))
        db = cast(db, ctx.bias_dtype)
        # one tensor for both, as torch's add backward hands on; autograd copies it where two leaves would share it
        d_residual = None if ctx.residual_dtype is None else cast(dres_in, ctx.residual_dtype) if separate else dx
    return dx, d_residual, dw, db


class AddLayerNormFn(torch.autograd.Function):
    """Autograd for (x, residual) -> (y, new_residual) on (..., D); saves new_residual, mean and rstd only.

    When new_residual would be x itself (no residual, no dtype change) it returns y alone and saves x; the caller
    hands x on as new_residual, and autograd adds that gradient to x's.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, residual_in_fp32, use_triton):
        y, res, mean, rstd = _ln_forward(ctx, x, residual, weight, bias, eps, residual_in_fp32, use_triton)
        ctx.save_for_backward(res, weight, mean, rstd)
        return (y, res) if ctx.stored else y

    @staticmethod
    def backward(ctx, dy, dres=None):
        return *_ln_backward(ctx, dy, dres, *ctx.saved_tensors), None, None, None


class AddLayerNormLinearFn(torch.autograd.Function):
    """(LN(x + residual) W^T + b, x + residual) that keeps no LayerNorm output for backward.

    A plain Linear after the LayerNorm would save its input y; here backward recomputes y from the saved
    new_residual, mean and rstd (bit-identical: the same op on the same values), so the pair saves what the
    LayerNorm alone saves. This is what brings a block's saved activations down to about 10 D per token.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, lin_weight, lin_bias, eps, residual_in_fp32, use_triton):
        y, res, mean, rstd = _ln_forward(ctx, x, residual, weight, bias, eps, residual_in_fp32, use_triton)
        out = linear(y, lin_weight, lin_bias)  # under autocast this runs in the autocast dtype
        ctx.has_lin_bias = lin_bias is not None
        ctx.save_for_backward(res, weight, bias, mean, rstd, lin_weight)
        return (out, res) if ctx.stored else out

    @staticmethod
    def backward(ctx, dout, dres=None):
        res, weight, bias, mean, rstd, lin_weight = ctx.saved_tensors
        pad = [None] * (len(ctx.needs_input_grad) - 4)  # no gradient reaches the Linear or the arguments after it
        if dout is None:
            return *_ln_backward(ctx, None, dres, res, weight, mean, rstd), *pad
        # y recomputed straight in the dtype its weight-gradient product runs in (dout's), as the forward's GEMM
        # took it: recomputed in the residual's fp32, matmul cast it again (on the H200's B/16 step 28 ms of casts)
        y = _normalized(res, weight, bias, ctx.eps, triton_in_backward(ctx.use_triton), dout.dtype)
        g = dout.reshape(-1, dout.shape[-1])
        dy = cast(matmul(g, lin_weight), ctx.x_dtype).view_as(res)
        d_lin_w = cast(matmul(g.t(), y.reshape(-1, y.shape[-1])), lin_weight.dtype)
        d_lin_b = cast(g.sum(0), lin_weight.dtype) if ctx.has_lin_bias else None
        dx, d_residual, dw, db = _ln_backward(ctx, dy, dres, res, weight, mean, rstd)
        # None for eps, residual_in_fp32, use_triton and what a subclass's forward adds
        return dx, d_residual, dw, db, d_lin_w, d_lin_b, *pad[2:]


def _check_ln_shapes(x, residual, weight, bias):
    if weight is None or bias is None:
        raise ValueError("add_layer_norm needs both a LayerNorm weight and bias (elementwise_affine=True)")
    d = x.shape[-1]
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"weight and bias must have shape ({d},), got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def _check_ln_args(x, residual, weight, bias):
    """(x, residual) as rows for an autograd Function (both (rows, D) where either is not contiguous), after
    :func:`_check_ln_shapes`."""
    _check_ln_shapes(x, residual, weight, bias)
    d = x.shape[-1]
    x2 = as_rows(x)
    r2 = None if residual is None else as_rows(residual)
    if r2 is not None and r2.dim() != x2.dim():  # one of them was not contiguous: both as (rows, D)
        x2, r2 = x2.reshape(-1, d), r2.reshape(-1, d)
    return x2, r2


def add_layer_norm(x, residual, weight, bias, eps, residual_in_fp32, use_triton):
    """(LayerNorm(x + residual), x + residual) over the last dim of x (any leading shape); see the module doc."""
    x2, r2 = _check_ln_args(x, residual, weight, bias)
    out = apply(AddLayerNormFn, x2, r2, weight, bias, eps, residual_in_fp32, use_triton)
    y, res = out if isinstance(out, tuple) else (out, None)
    if x2 is not x:
        y, res = y.view_as(x), None if res is None else res.view_as(x)
    return y, (x if res is None else res)


def add_layer_norm_linear(x, residual, weight, bias, lin_weight, lin_bias, eps, residual_in_fp32, use_triton,
                          function=AddLayerNormLinearFn, function_args=()):
    """(LayerNorm(x + residual) lin_weight^T + lin_bias, x + residual), recomputing the LayerNorm in backward.

    ``function`` is the autograd Function that runs it, with ``function_args`` after the common ones
    (``ln_matmul`` passes its fused-GEMM subclass and the kernel choice)."""
    x2, r2 = _check_ln_args(x, residual, weight, bias)
    out = apply(function, x2, r2, weight, bias, lin_weight, lin_bias, eps, residual_in_fp32, use_triton,
                *function_args)
    out, res = out if isinstance(out, tuple) else (out, None)
    if x2 is not x:
        out, res = out.view(*x.shape[:-1], lin_weight.shape[0]), None if res is None else res.view_as(x)
    return out, (x if res is None else res)


def aot_specs(shape, dtype):
    """Every forward and backward variant a ViT launches at width ``shape.dim``, for ``AOT_IMAGES`` images.

    Under AMP (fp32 weights, activations in ``dtype``, fp32 residual stream): the first LayerNorm (fp32 input, no
    residual, fp32 output), the backward's recomputation (the same with its output in ``dtype``, the dtype of the
    weight-gradient product) and the residual add (``dtype`` branch + fp32 residual);
    their backwards (all fp32; ``dtype`` gradient with an fp32 residual gradient and a gradient reaching the new
    residual). The model's final norm under AMP returns fp32 (autocast's LayerNorm dtype), with either residual
    stream: fp32 first operand, ``dtype`` residual, fp32 output, and its backward (fp32, with a separate residual
    gradient), on every token or one per image. Under AMP with a ``dtype`` residual stream (``residual_dtype``) and in a model cast
    to ``dtype`` (weights in ``dtype`` too): with and without a residual, and the backwards with and without a
    residual gradient. Placeholders are passed as the launchers pass
    them (x for a missing residual, y for an unstored one, dy and dx for unused gradients), unused strides as 0.
    """
    block, num_warps, num_stages = _config(shape.dim)
    act = f"*{dtype}"
    d, rows = shape.dim, AOT_IMAGES * shape.tokens
    stats = {"MEAN": "*fp32", "RSTD": "*fp32"}
    specs = []
    # forward: (label, X, residual (None: none), weights, Y (None: X's dtype))
    for label, x_t, r_t, w_t, y_t in (("amp first", "*fp32", None, "*fp32", None),
                                      ("amp recompute", "*fp32", None, "*fp32", act),
                                      ("amp residual", act, "*fp32", "*fp32", None),
                                      ("amp final norm", "*fp32", act, "*fp32", None),
                                      ("amp16", act, None, "*fp32", None), ("amp16 residual", act, act, "*fp32", None),
                                      ("half", act, None, act, None), ("half residual", act, act, act, None)):
        store = r_t is not None
        res_t = ("*fp32" if "*fp32" in (x_t, r_t) else r_t) if store else (y_t or x_t)  # torch.promote_types
        args = {"X": x_t, "R": r_t or x_t, "W": w_t, "B": w_t, "Y": y_t or x_t, "RES_OUT": res_t, **stats,
                "stride_x": d, "stride_r": d, "stride_y": d, "stride_res": d if store else 0, "n_cols": d,
                "eps": 1e-6}
        specs.append(spec_from_launch("add_layer_norm_fwd", _add_ln_fwd_kernel, args,
                                      {"HAS_RESIDUAL": store, "STORE_RESIDUAL": store, "STORE_Y": True, "BLOCK": block}, num_warps,
                                      num_stages, f"D={d} {label}"))
    # backward: (label, dY, residual, weights, HAS_DRES, a separate (fp32) residual gradient, rows); the final
    # norm of a class-token model normalises one row per image, and so does the second norm of a training step's
    # last block (model.class_token_suffices): one row per program (an int Triton specialises)
    backward = [("amp first", "*fp32", "*fp32", "*fp32", False, False, rows),
                ("amp residual+dres", act, "*fp32", "*fp32", True, True, rows),
                ("amp final norm", "*fp32", "*fp32", "*fp32", False, True, rows),
                ("amp16", act, act, "*fp32", False, False, rows),
                ("amp16 residual+dres", act, act, "*fp32", True, False, rows),
                ("half", act, act, act, False, False, rows), ("half residual+dres", act, act, act, True, False, rows)]
    backward += [(f"{label} class token", *types, AOT_IMAGES) for label, *types, _ in backward
                 if label in ("amp final norm", "half") or label.endswith("residual+dres")]
    for label, dy_t, res_t, w_t, has_dres, separate, n_rows in backward:
        args = {"DY": dy_t, "DRES_OUT": res_t if has_dres else dy_t, "RES": res_t, "W": w_t, **stats, "DX": dy_t,
                "DRES_IN": res_t if separate else dy_t, "DW_PART": "*fp32", "DB_PART": "*fp32",
                "stride_dy": d, "stride_dres": d, "stride_res": d, "stride_dx": d,
                "stride_dres_in": d if separate else 0, "n_rows": n_rows, "n_cols": d,
                "rows_per_program": cdiv(n_rows, min(n_rows, AOT_PROGRAMS))}
        specs.append(spec_from_launch("add_layer_norm_bwd", _add_ln_bwd_kernel, args,
                                      {"HAS_DRES": has_dres, "STORE_DRES_IN": separate, "BLOCK": block}, num_warps,
                                      num_stages, f"D={d} {label}"))
    return specs
