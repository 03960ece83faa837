"""Residual add + LayerNorm fused into the next projection's GEMM: LN(x + residual) W^T + b, and x + residual.

The LayerNorm output never reaches memory. A row pass (the add_layer_norm forward kernel without its output)
writes the residual sum, when there is one, and the per-row fp32 mean and rstd; the GEMM then normalises each A
tile of the sum as it loads it (``matmul.fused_matmul``'s ``"layer_norm"`` prologue). Against add_layer_norm +
cuBLAS this saves writing the (rows, D) LayerNorm output and reading it back.

Backward is :class:`~fastvit.kernels.layer_norm.AddLayerNormLinearFn`'s, unchanged: the forward saves exactly what
that one saves (the residual sum, mean, rstd), and backward recomputes the LayerNorm output for dW with the
add_layer_norm kernel, runs dX and dW on cuBLAS and finishes with the LayerNorm backward kernel. A dW GEMM that
normalises its B operand on load would skip that recompute (one (rows, D) write and read); its two GEMMs are
plain large matmuls that cuBLAS runs well, so that is left for a measured follow-up.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.kernels._launch import eager_op
from fastvit.kernels import layer_norm as _ln
from fastvit.kernels.matmul import fused_matmul, gemm_weights, variant_specs


def ln_matmul_ref(x, residual, norm_weight, norm_bias, weight, bias, eps=1e-6, residual_in_fp32=False):
    """Torch reference: (F.linear(LayerNorm(x + residual), W, b), x + residual)."""
    y, new_residual = _ln.add_layer_norm_ref(x, residual, norm_weight, norm_bias, eps, residual_in_fp32)
    return F.linear(y, weight, bias), new_residual


@eager_op("ln_matmul_fwd")
def ln_matmul_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                  norm_bias: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                  residual_in_fp32: bool, use_triton: bool, tma: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor, torch.Tensor]:
    """On x of shape (..., D): (out (..., N) in weight's dtype, new_residual, mean, rstd), new_residual empty when
    it would equal x (add_layer_norm_fwd's convention). ``tma``: the persistent TMA GEMM (``matmul.fused_matmul``)."""
    if not use_triton:
        y, res, mean, rstd = _ln.add_layer_norm_fwd(x, residual, norm_weight, norm_bias, eps, residual_in_fp32,
                                                    False)
        return F.linear(y.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)), res, mean, rstd
    _, res, mean, rstd = _ln.launch_add_layer_norm(x, residual, norm_weight, norm_bias, eps, residual_in_fp32)
    # the GEMM normalises the sum, or x itself when no sum was stored, as (rows, D)
    a = res if res.shape == x.shape else x
    out = fused_matmul(a.reshape(-1, a.shape[-1]), weight, weight.dtype, bias, prologue="layer_norm",
                       mean=mean, rstd=rstd, prologue_weight=norm_weight.contiguous(),
                       prologue_bias=norm_bias.contiguous(), tma=tma)
    return out.view(*x.shape[:-1], weight.shape[0]), res, mean, rstd


@ln_matmul_fwd.register_fake
def _(x, residual, norm_weight, norm_bias, weight, bias, eps, residual_in_fp32, use_triton, tma=False):
    _, res, mean, rstd = _ln.add_layer_norm_fwd(x, residual, norm_weight, norm_bias, eps, residual_in_fp32,
                                                use_triton)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype), res, mean, rstd


class LayerNormMatmulFn(_ln.AddLayerNormLinearFn):
    """AddLayerNormLinearFn with the LayerNorm folded into the GEMM's loads (and ``tma``, the kernel choice, after
    its arguments); same saved tensors, same backward."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, lin_weight, lin_bias, eps, residual_in_fp32, use_triton, tma=False):
        out, res, mean, rstd = ln_matmul_fwd(x, residual, weight, bias, gemm_weights(x, lin_weight), lin_bias, eps,
                                             residual_in_fp32, use_triton, tma)
        saved = _ln.ln_context(ctx, x, residual, res, bias, eps, use_triton)
        ctx.has_lin_bias = lin_bias is not None
        ctx.save_for_backward(saved, weight, bias, mean, rstd, lin_weight)
        return (out, res) if ctx.stored else out


def ln_matmul(x, residual, weight, bias, lin_weight, lin_bias, eps, residual_in_fp32, use_triton, tma=False):
    """``layer_norm.add_layer_norm_linear`` (same arguments and results) with the LayerNorm in the GEMM; ``tma``:
    the persistent TMA GEMM (sm_90), where it can run."""
    return _ln.add_layer_norm_linear(x, residual, weight, bias, lin_weight, lin_bias, eps, residual_in_fp32,
                                     use_triton, function=LayerNormMatmulFn, function_args=(tma,))


def aot_specs(shape, dtype):
    """The statistics pass at width D (no residual, one in the activation dtype, one in fp32), and the GEMM for
    qkv (N = 3D) with its bias and fc1 (N = mlp_dim) without (``ops.layer_norm_mlp`` adds fc1's in the GELU), on an
    A of the activation dtype or fp32 (residual_in_fp32)."""
    act = f"*{dtype}"
    specs = [dataclasses.replace(s, name="add_layer_norm_stats", constexprs={**s.constexprs, "STORE_Y": False})
             for s in _ln.aot_specs(shape, dtype) if s.name == "add_layer_norm_fwd"]
    for a_type in (act, "*fp32"):
        for n, has_bias, what in ((3 * shape.dim, True, "qkv"), (shape.mlp_dim, False, "fc1")):
            for tma in (False, True):
                specs += variant_specs("ln_matmul", dtype, "layer_norm", a_type, act, has_bias, False,
                                       label=f"{what} {shape.dim}->{n} A={a_type[1:]}", tma=tma)
    return specs
