"""A Linear with the residual add in its epilogue: x W^T + b + residual (attention's proj and the MLP's fc2).

The GEMM adds the bias and the residual to its fp32 accumulator before its one store, so the projection's output
is never written on its own and read back by an add. The result has the dtype torch's ``F.linear(x, W, b) +
residual`` would have (an fp32 residual stream under bf16 autocast stays fp32), computed with one rounding instead
of two.

Backward is a plain Linear's (cuBLAS): d residual = d out, dX = d out W, dW = d out^T X, db = column sums; X and
W are saved, as nn.Linear saves them.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.kernels._launch import apply, eager_op
from fastvit.kernels.matmul import compute_dtype, fused_matmul, gemm_weights, variant_specs


def matmul_residual_ref(x, weight, bias, residual):
    """Torch reference: F.linear(x, W, b) + residual."""
    return F.linear(x, weight, bias) + residual


@eager_op("matmul_residual_fwd")
def matmul_residual_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                        use_triton: bool, tma: bool = False) -> torch.Tensor:
    """x weight^T + bias + residual on (rows, K) x and (rows, N) residual, computed in weight's dtype, returned in
    promote(weight's dtype, residual's dtype); ``tma``: the persistent TMA GEMM."""
    if not use_triton:
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)) + residual
    return fused_matmul(x, weight, torch.promote_types(weight.dtype, residual.dtype), bias, residual, tma=tma)


@matmul_residual_fwd.register_fake
def _(x, weight, bias, residual, use_triton, tma=False):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.promote_types(weight.dtype, residual.dtype))


class MatmulResidualFn(torch.autograd.Function):
    """x W^T + b + residual on (rows, K) x with a Linear's backward; saves x and W."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, use_triton, tma=False):
        ctx.dtype = compute_dtype(x)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.residual_dtype = residual.dtype
        ctx.save_for_backward(x, weight)
        return matmul_residual_fwd(x, gemm_weights(x, weight), bias, residual, use_triton, tma)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        g = dout.to(ctx.dtype)  # the gradient reaching the GEMM's output, in the dtype the GEMM ran in
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        dx = (g @ weight.to(g.dtype)).to(x.dtype) if need_x else None
        dw = (g.t() @ x.to(g.dtype)).to(weight.dtype) if need_w else None
        db = g.sum(0).to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        dres = dout.to(ctx.residual_dtype) if need_r else None
        return dx, dw, db, dres, None, None


def matmul_residual(x, weight, bias, residual, use_triton, tma=False):
    """x weight^T + bias + residual over the last dim of x (any leading shape); see the module doc. ``tma``: the
    persistent TMA GEMM (sm_90), where it can run."""
    k, n = x.shape[-1], weight.shape[0]
    if weight.shape != (n, k) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"weight must have shape (N, {k}) and bias (N,), got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if residual.shape != (*x.shape[:-1], n):
        raise ValueError(f"residual must have shape {(*x.shape[:-1], n)}, got {tuple(residual.shape)}")
    out = apply(MatmulResidualFn, x.reshape(-1, k), weight, bias, residual.reshape(-1, n), use_triton, tma)
    return out.view(*x.shape[:-1], n)


def aot_specs(shape, dtype):
    """proj (D -> D) and fc2 (mlp_dim -> D) with bias, adding a residual of the activation dtype or fp32
    (``residual_in_fp32``, then an fp32 output)."""
    act = f"*{dtype}"
    return [spec for what, k in (("proj", shape.dim), ("fc2", shape.mlp_dim)) for res_t in (act, "*fp32")
            for tma in (False, True)
            for spec in variant_specs("matmul_residual", dtype, "none", act, res_t, True, True, res_t,
                                      label=f"{what} {k}->{shape.dim} residual={res_t[1:]}", tma=tma)]
