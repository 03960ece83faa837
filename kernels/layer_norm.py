"""Residual add + LayerNorm."""
import torch
import torch.nn.functional as F


def add_layer_norm_ref(x, residual, weight, bias, eps=1e-6, residual_in_fp32=False):
    """Torch reference: (LayerNorm(x + residual), x + residual)."""
    new_residual = x if residual is None else x + residual
    if residual_in_fp32:
        new_residual = new_residual.float()
    y = F.layer_norm(new_residual, weight.shape, weight, bias, eps).to(x.dtype)
    return y, new_residual


def add_layer_norm(x, residual, weight, bias, eps, residual_in_fp32, use_triton):
    return add_layer_norm_ref(x, residual, weight, bias, eps, residual_in_fp32)
