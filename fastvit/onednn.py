"""oneDNN's GEMM with a fused GELU epilogue, for the MLP's fc1 in CPU inference.

On a GPU the MLP keeps only fc1's pre-activation for backward and recomputes the GELU inside fc2
(``kernels/gelu_matmul.py``). In CPU inference nothing is kept, so the GELU belongs in fc1's epilogue: oneDNN
(PyTorch's ``mkldnn::_linear_pointwise``, the op inductor emits for the same pattern on CPU) applies it to each
output tile while it is in cache, and the (rows, 4D) activation is written once instead of written, read and written
again. On this project's CPU ``F.gelu(F.linear(...))`` takes 1.15-2.2x the fused GEMM's time at the smoke and B/16
shapes, bf16 and fp32 (README).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastvit.kernels.matmul import compute_dtype


@functools.lru_cache(maxsize=None)
def supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run the fused GEMM in ``dtype`` and it gives F.linear + GELU's result
    (checked once per dtype on a small product; a build without oneDNN, or a CPU without bf16 support, says no)."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen).to(dtype) for shape in ((37, 24), (40, 24), (40,)))
    try:
        with torch.no_grad():
            fused = op(x, w, b, "gelu", [], "none")
    except RuntimeError:
        return False
    want = F.gelu(F.linear(x.double(), w.double(), b.double()))
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    return fused.shape == want.shape and bool((fused.double() - want).abs().max() <= tolerance)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(x W^T + b) (exact erf GELU) over the last dim of a CPU tensor ``x``, in the dtype F.linear would compute
    in (the autocast dtype under autocast), by one oneDNN GEMM where :func:`supports` that dtype, else by F.linear
    and F.gelu. Inference only: the op has no backward."""
    dtype = compute_dtype(x)
    if not supports(dtype):
        return F.gelu(F.linear(x, weight, bias))
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch.ops.mkldnn._linear_pointwise(rows, weight.to(dtype).contiguous(),
                                             None if bias is None else bias.to(dtype), "gelu", [], "none")
    return out.view(*x.shape[:-1], weight.shape[0])
