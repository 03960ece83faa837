"""oneDNN's GEMM with its epilogue fused, for the fallbacks' CPU inference: fc1 with its GELU, and the qkv projection
and fc2 with their bias.

On a GPU the MLP keeps only fc1's pre-activation for backward and recomputes the GELU inside fc2
(``kernels/gelu_matmul.py``). In CPU inference nothing is kept, so the GELU belongs in fc1's epilogue: oneDNN
(PyTorch's ``mkldnn::_linear_pointwise``, the op inductor emits for the same pattern on CPU) applies it to each
output tile while it is in cache, and the (rows, 4D) activation is written once instead of written, read and written
again. A plain Linear gains too: PyTorch's addmm first copies the bias into every row of its output and then
multiplies into it, where oneDNN adds the bias to each tile it computes (bf16, 8704 rows, on an AMX VM: the mini
model's qkv product 96 -> 288 took 0.42 ms by F.linear, 0.32 ms by oneDNN, the fewest of many calls each).

Whether that pays depends on the CPU: the fused GEMM is oneDNN's, the unfused one MKL's, and on CPUs with
AVX-512 ``F.gelu(F.linear(...))`` took 1.15-2.2x the fused GEMM's time at the smoke and B/16 shapes, bf16 and fp32,
while on an AVX2 EPYC the fused one is the slower at ViT widths (README). So large enough products
(:func:`worth_fusing`) are timed both ways once on each CPU (:func:`fused_is_faster`). oneDNN's post-op computes the
exact and the tanh GELU; CLIP's quick GELU (``approximate="sigmoid"``) runs after the GEMM, in place.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastvit import autotune
from fastvit.kernels import _gemm
from fastvit.kernels._launch import next_power_of_2
from fastvit.kernels.bias_gelu import gelu_ref
from fastvit.kernels.matmul import compute_dtype


# When the fused GEMM may pay (measured on an AVX-512 VM, whole model and GEMM alone, README): in fp32 from about
# a million multiply-adds (below that a oneDNN call, ~50 us here, costs more than MKL's GEMM and the GELU pass:
# 0.8x at 17 x 64 x 256, 1.1x at 68 x 64 x 256, 1.75x at 1 x 768 x 3072); in bf16 from rows >= 4x the input width
# (each call converts the weight freshly cast by autocast into oneDNN's layout, a cost of the weight's size: a B/16
# forward at batch 1 took 1.11x as long fused, at batch 16 0.95x; tiny and mini at batch 512 gain)
FP32_MIN_MACS = 1 << 20
LOW_PRECISION_MIN_ROWS_PER_INPUT = 4
# the GELUs (``approximate``) of oneDNN's post-op: its algorithm argument
ONEDNN_GELUS = ("none", "tanh")


def worth_fusing(dtype: torch.dtype, rows: int, in_features: int, out_features: int) -> bool:
    """Whether a (rows, in) x (in, out) product in ``dtype`` is large enough for the fused GEMM to be a candidate
    (see above): below, a oneDNN call's fixed cost decides against it without a measurement."""
    if dtype == torch.float32:
        return rows * in_features * out_features >= FP32_MIN_MACS
    return rows >= LOW_PRECISION_MIN_ROWS_PER_INPUT * in_features


def supports(dtype: torch.dtype, approximate: str | None = "none") -> bool:
    """Whether this PyTorch build and CPU run the fused GEMM in ``dtype`` with the GELU ``approximate`` names (None:
    no GELU, the bias alone) and it gives F.linear's (+ GELU's) result (checked once per dtype and epilogue on a
    small product; a build without oneDNN, or a CPU without bf16 support, says no)."""
    return _supports(dtype, approximate)


@functools.lru_cache(maxsize=None)
def _supports(dtype, approximate):
    if approximate is not None and approximate not in ONEDNN_GELUS:
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen).to(dtype) for shape in ((37, 24), (40, 24), (40,)))
    try:
        with torch.no_grad():
            fused = _fused(x, w, b, dtype, approximate)
    except RuntimeError:
        return False
    want = _epilogue(F.linear(x.double(), w.double(), b.double()), approximate)
    tolerance = 1e-4 if dtype == torch.float32 else 1 / 64  # relative: a 16-bit product rounds to 8 or 11 bits
    return fused.shape == want.shape and bool(((fused.double() - want).abs() <= tolerance * (1 + want.abs())).all())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b over the last dim of a CPU tensor ``x``, in the dtype F.linear would compute in: by one oneDNN GEMM
    that adds the bias in its epilogue where :func:`linear_gelu`'s conditions hold, else by ``kernels/_gemm.py``'s
    ``linear``. Inference only: the op has no backward."""
    return _linear_pointwise(x, weight, bias, None)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                approximate: str = "none") -> torch.Tensor:
    """GELU(x W^T + b) (``approximate``: ``bias_gelu``'s) over the last dim of a CPU tensor ``x``, in the dtype
    F.linear would compute in (the autocast dtype under autocast), by one oneDNN GEMM where :func:`supports` that
    dtype and GELU, it is :func:`worth_fusing`, the product does not run in fp32 (``kernels/_gemm.py``) and it was
    measured faster on this CPU (:func:`fused_is_faster`), else by that module's ``linear`` and the GELU in place.
    Inference only: the op has no backward."""
    return _linear_pointwise(x, weight, bias, approximate)


_CALL = "onednn"  # first in a call key of :func:`_linear_pointwise`: apart from other callers' keys


def _linear_pointwise(x, weight, bias, approximate):
    dtype = compute_dtype(x)
    if _gemm.in_fp32(x, dtype):  # the product in fp32 on rounded operands (kernels/_gemm.py)
        return _epilogue(_gemm.linear(x, weight, bias), approximate, inplace=True)
    k = x.shape[-1]
    rows = x.numel() // max(k, 1)
    # a call like one before takes its settled choice in one lookup: three GEMMs a block ask, and at small batches
    # a CPU forward waits on its Python (the whole choice walked a dozen functions a GEMM)
    call = (_CALL, dtype, rows, k, weight.shape[0], bias is not None, approximate, torch.get_num_threads())
    impl = autotune.settled(call)
    if impl is None:
        impl = ("fused" if worth_fusing(dtype, rows, k, weight.shape[0]) and supports(dtype, approximate)
                and fused_is_faster(x, weight, bias, dtype, rows, approximate, call) else "unfused")
    return IMPLS[impl](x, weight, bias, dtype, approximate)


def _epilogue(h, approximate, inplace=False):
    """The GELU ``approximate`` names on the product ``h`` (None: ``h`` as it is)."""
    return h if approximate is None else gelu_ref(h, approximate, inplace=inplace)


def _unfused(x, weight, bias, dtype, approximate="none"):
    # F.linear: a product that does not run in fp32 (_linear_pointwise asks first). GELU in place: the product is a
    # fresh tensor nothing else holds, and inference keeps no pre-activation, so the (rows, 4D) activation takes one
    # buffer instead of two (a lower peak, fewer fresh pages to fault in)
    return _epilogue(F.linear(x, weight, bias), approximate, inplace=True)


def _fused(x, weight, bias, dtype, approximate="none"):
    k = x.shape[-1]
    attr, algorithm = ("none", "") if approximate is None else ("gelu", approximate)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, k).to(dtype), weight.to(dtype).contiguous(),
                                             None if bias is None else bias.to(dtype), attr, [], algorithm)
    return out.view(*x.shape[:-1], weight.shape[0])


IMPLS = {"fused": _fused, "unfused": _unfused}


def fused_is_faster(x, weight, bias, dtype, rows, approximate="none", call_key=None) -> bool:
    """Whether the fused GEMM beat F.linear (+ F.gelu) for a product like this one (``rows`` rows of ``x``) on this
    CPU: timed once on the call's own inputs per dtype, row count (to the next power of two), widths, epilogue and
    CPU (``fastvit.autotune``), and settled for ``call_key`` (``autotune.settled``). The answer differs between
    CPUs: oneDNN's fp32 GEMM trails MKL's at ViT widths on an AVX2 EPYC (the fused one took 1.3-1.5x as long at 384
    and 768 -> 4x, batch 8) and leads on CPUs with AVX-512 (README)."""
    fields = (("dtype", str(dtype)), ("rows", next_power_of_2(max(rows, 1))), ("in", x.shape[-1]),
              ("out", weight.shape[0]), ("bias", bias is not None))
    op = "linear" if approximate is None else "linear_gelu"
    if approximate is not None:
        fields += (("gelu", approximate),)
    return autotune.fastest_on_cpu(op, fields, tuple(IMPLS), lambda impl: functools.partial(
        IMPLS[impl], x, weight, bias, dtype, approximate), "unfused", call_key) == "fused"
