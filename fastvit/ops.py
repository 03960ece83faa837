"""The one dispatch point between the model and its kernels.

The model calls only these functions for patch embedding, residual add + LayerNorm, bias + GELU and attention
(plus two composites, LayerNorm + Linear and GELU + Linear, that recompute the LayerNorm / GELU output in backward
instead of saving it, and on a GPU may run them inside our GEMMs; ``layer_norm_mlp``, a block's whole MLP branch,
which in CPU inference runs the GELU in fc1's GEMM; ``linear_residual`` adds a Linear's residual in its GEMM;
``linear``, the other Linears, is F.linear but on a CPU whose bf16 / fp16 GEMM is emulated; ``block_inference``, a
whole block in plain CPU inference (fp32, a 16-bit model, or autocast), where the Python between its kernels is what
a small batch waits on).
Each takes ``backend``:

- ``"torch"``: the op's torch fallback (plain PyTorch math);
- ``"triton"``: our Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
- ``"auto"``: the kernel where it can run, the fallback otherwise.

``attention`` also accepts ``"flash"`` (the optional flash-attn package, which ``"auto"`` prefers where it runs).
"""
from __future__ import annotations

import functools
import operator
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fastvit import autotune, onednn
from fastvit.kernels import _gemm
from fastvit.kernels import bias_gelu as _bias_gelu
from fastvit.kernels import flash_attention as _flash_attention
from fastvit.kernels import gelu_matmul as _gelu_matmul
from fastvit.kernels import layer_norm as _layer_norm
from fastvit.kernels import ln_matmul as _ln_matmul
from fastvit.kernels import matmul as _matmul
from fastvit.kernels import matmul_residual as _matmul_residual
from fastvit.kernels import patch_embed as _patch_embed
from fastvit.kernels._launch import (KERNEL_DTYPES, apply, capability, cast, device_arch, eager_training_call,
                                     exporting, inference_call, jit_tracing, plain_inference, quiet_size_checks,
                                     records_autograd, transformed)
from fastvit.kernels._launch import interpreting as triton_interpreting

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str) -> str:
    """Validate a backend name, so that a typo fails at construction rather than in a forward pass."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Resolve ``backend`` for tensor ``x``: True runs the Triton kernel, False the torch fallback (for "auto" also
    where x's dtype is none the kernels compute in: an fp64 model stays fp64)."""
    check_backend(backend)
    if backend == "torch":
        return False
    runnable = x.is_cuda or (x.device.type == "cpu" and triton_interpreting())
    if backend == "triton" and not runnable:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors; got a tensor on {x.device}"
        )
    if x.dtype not in KERNEL_DTYPES:
        if backend == "triton":
            raise TypeError(f"backend='triton' runs float32, float16 and bfloat16 tensors, got {x.dtype}; use "
                            f"backend='auto' or 'torch'")
        return False
    return runnable


def _reference(backend, x) -> bool:
    """Whether a call runs the op's plain-torch reference: under a torch.func transform (:func:`transformed`:
    functorch cannot run the ops' autograd Functions), and where torch.export (so also torch.onnx's exporter) or
    torch.jit.trace (the legacy ONNX exporter's tracer) traces a call the torch fallback would run (the traced
    program then holds only aten ops: ONNX has no translation for ours, and inference needs none of their memory
    savings)."""
    return transformed() or ((exporting() or jit_tracing()) and not use_triton(backend, x))


def patch_embed(x, weight, bias, patch_size, pos_embed=None, cls_token=None, no_embed_class=False,
                backend="auto"):
    """z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos for an image ``x`` of shape (B, C, H, W).

    ``weight`` is the (D, C, P, P) projection E in conv layout, ``bias`` its (D,) bias or None. ``pos_embed`` is
    None or (1, L, D) with L = N + 1 when it has a class-token row (``no_embed_class=False``) else N;
    ``cls_token`` is None or (1, 1, D). Returns (B, N [+1], D).
    """
    if _reference(backend, x):
        return _patch_embed.patch_embed_ref(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class)
    return _patch_embed.patch_embed(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class,
                                    use_triton(backend, x))


def add_class_and_position(tokens, pos_embed=None, cls_token=None, no_embed_class=False):
    """The part of ``patch_embed`` after the projection, for (B, N, D) tokens that an edited projection produced
    (a hooked or replaced ``proj``): [x_class; tokens] + E_pos in torch."""
    return _patch_embed.add_class_and_position(tokens, pos_embed, cls_token, no_embed_class)


def add_layer_norm(x, residual, weight, bias, eps=1e-6, residual_in_fp32=False, backend="auto"):
    """new_residual = x + residual (residual None: x); y = LayerNorm(new_residual). Returns (y, new_residual).

    y has x's dtype; new_residual is fp32 when ``residual_in_fp32``.
    """
    if _reference(backend, x):
        return _layer_norm.add_layer_norm_ref(x, residual, weight, bias, eps, residual_in_fp32)
    triton = use_triton(backend, x)
    if _inference((x, residual, weight, bias), triton):
        return _layer_norm.add_layer_norm_inference(x, residual, weight, bias, eps, residual_in_fp32, triton)
    return _layer_norm.add_layer_norm(x, residual, weight, bias, eps, residual_in_fp32, triton)


def bias_gelu(x, bias, backend="auto", approximate="none"):
    """y = GELU(x + bias): the exact erf GELU of the paper and timm, or with ``approximate`` "tanh" (as
    ``F.gelu``) or "sigmoid" (u sigmoid(1.702 u), CLIP's quick GELU)."""
    _bias_gelu.check_approximate(approximate)
    if _reference(backend, x):
        return _bias_gelu.bias_gelu_ref(x, bias, approximate)
    triton = use_triton(backend, x)
    if _inference((x, bias), triton):
        return _bias_gelu.bias_gelu_inference(x, bias, triton, approximate)
    return _bias_gelu.bias_gelu(x, bias, triton, approximate)


def _features(x):
    """The last dim of ``x``, or None for a 0-d tensor."""
    return x.shape[-1] if x.ndim else None


@quiet_size_checks
def _check_linear(weight, bias, in_features, names=("weight", "bias")):
    """A Linear's (out, ``in_features``) weight and (out,) bias or None, each named in the error (torch's GEMM says
    only that 'mat1 and mat2 shapes cannot be multiplied', its add that two sizes differ). ``in_features`` None:
    nothing to check against (a 0-d input, which the op's own check names)."""
    if in_features is None:
        return
    if weight.ndim != 2 or weight.shape[1] != in_features:
        raise ValueError(f"{names[0]} must have shape (out_features, {in_features}) for inputs of {in_features} "
                         f"features, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{names[1]} must have shape ({weight.shape[0]},), as {names[0]} has {weight.shape[0]} "
                         f"outputs, got {tuple(bias.shape)}")


# The two composites below are the ops above followed by the next Linear, differing only in what autograd keeps:
# the normalised / activated tensor is recomputed in backward instead of being saved as the Linear's input.

def add_layer_norm_linear(x, residual, norm_weight, norm_bias, weight, bias=None, eps=1e-6,
                          residual_in_fp32=False, backend="auto"):
    """(LayerNorm(x + residual) W^T + b, x + residual), saving only what ``add_layer_norm`` saves.

    Where the Triton kernels run on a GPU, the LayerNorm either runs on its own before cuBLAS ("ln+cublas") or
    inside our GEMM's loads ("ln_gemm", ``kernels/ln_matmul.py``), whichever was measured faster for this call
    shape (:func:`gemm_impl`). In plain CPU inference with the torch fallback the GEMM may add the bias in oneDNN's
    epilogue (``fastvit.onednn.linear``)."""
    _check_linear(weight, bias, _features(x))
    if _reference(backend, x):
        return _ln_matmul.ln_matmul_ref(x, residual, norm_weight, norm_bias, weight, bias, eps, residual_in_fp32)
    triton = use_triton(backend, x)
    args = (x, residual, norm_weight, norm_bias, weight, bias, eps, residual_in_fp32, triton)
    if _gemm_on_gpu(triton, x):
        extra = (("residual", None if residual is None else str(residual.dtype)),
                 ("residual_in_fp32", residual_in_fp32), ("bias", bias is not None))
        impl = gemm_impl("add_layer_norm_linear", x, weight, extra, functools.partial(_run_ln_linear, args))
        if impl != "ln+cublas":
            return _run_ln_linear(args, impl)
    if _inference(args[:6], triton):
        y, residual = _layer_norm.add_layer_norm_inference(x, residual, norm_weight, norm_bias, eps, residual_in_fp32,
                                                           triton)
        return _inference_linear(y, weight, bias, triton), residual
    return _layer_norm.add_layer_norm_linear(*args)


def _run_ln_linear(args, impl):
    if impl == "ln+cublas":
        return _layer_norm.add_layer_norm_linear(*args)
    return _ln_matmul.ln_matmul(*args, tma=impl == "ln_gemm_tma")


def bias_gelu_linear(x, bias, weight, weight_bias=None, backend="auto", approximate="none"):
    """GELU(x + bias) W^T + b, saving only the pre-activation x (as ``bias_gelu`` does; ``approximate`` as there).

    On a GPU with the Triton kernels: the bias + GELU kernel before cuBLAS ("gelu+cublas") or inside our GEMM's
    loads ("gelu_gemm", ``kernels/gelu_matmul.py``), whichever was measured faster (:func:`gemm_impl`)."""
    _bias_gelu.check_approximate(approximate)
    _check_linear(weight, weight_bias, _features(x), ("weight", "weight_bias"))
    if _reference(backend, x):
        return _gelu_matmul.gelu_matmul_ref(x, bias, weight, weight_bias, approximate)
    triton = use_triton(backend, x)
    args = (x, bias, weight, weight_bias, triton, approximate)
    if _gemm_on_gpu(triton, x):
        # the GELU's bias (fc1's, which layer_norm_mlp adds here) changes the kernel's prologue: part of the key
        extra = (("gelu_bias", None if bias is None else str(bias.dtype)), ("bias", weight_bias is not None),
                 ("gelu", approximate))
        impl = gemm_impl("bias_gelu_linear", x, weight, extra, functools.partial(_run_gelu_linear, args))
        if impl != "gelu+cublas":
            return _run_gelu_linear(args, impl)
    if _inference(args[:4], triton):
        return _gemm.linear(_bias_gelu.bias_gelu_inference(x, bias, triton, approximate), weight, weight_bias)
    return _bias_gelu.bias_gelu_linear(*args)


def _run_gelu_linear(args, impl):
    if impl == "gelu+cublas":
        return _bias_gelu.bias_gelu_linear(*args)
    return _gelu_matmul.gelu_matmul(*args, tma=impl == "gelu_gemm_tma")


def layer_norm_mlp(x, residual, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6,
                   residual_in_fp32=False, backend="auto", approximate="none"):
    """(MLP(LayerNorm(x + residual)), x + residual) with MLP(y) = GELU(y W_1^T + b_1) W_2^T + b_2: a block's MLP
    branch as one op (TransformerEngine's LayerNormMLP; ``approximate`` picks the GELU, as in ``bias_gelu``).

    Where autograd records the call, on a GPU and under tracing it is ``add_layer_norm_linear`` then
    ``bias_gelu_linear`` (only the pre-activation is kept for backward). With the Triton kernels b_1 is added by
    the GELU kernel rather than in fc1's GEMM, so that the GELU's backward sums b_1's gradient in the pass that
    writes dh, instead of a reduction over the (rows, 4D) dh after it (about a quarter of the bias-gradient
    reductions' 55 ms in the H200's 1577 ms B/16 step, profile.json); the fallbacks keep it in the GEMM, as
    F.linear. In plain CPU inference with the torch fallback nothing is kept, so the GELU runs in fc1's GEMM
    epilogue instead (``fastvit.onednn``)."""
    _bias_gelu.check_approximate(approximate)
    _check_linear(fc1_weight, fc1_bias, _features(x), ("fc1_weight", "fc1_bias"))
    _check_linear(fc2_weight, fc2_bias, fc1_weight.shape[0], ("fc2_weight", "fc2_bias"))
    args = (x, residual, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    triton = use_triton(backend, x)
    if not _cpu_inference(args, triton):
        hidden, residual = add_layer_norm_linear(x, residual, norm_weight, norm_bias, fc1_weight,
                                                 None if triton else fc1_bias, eps, residual_in_fp32, backend)
        return bias_gelu_linear(hidden, fc1_bias if triton else None, fc2_weight, fc2_bias, backend,
                                approximate), residual
    y, residual = _layer_norm.add_layer_norm_inference(x, residual, norm_weight, norm_bias, eps, residual_in_fp32)
    hidden = onednn.linear_gelu(y, fc1_weight, fc1_bias, approximate)
    del y  # freed before fc2's output is allocated: inference memory peaks here
    return onednn.linear(hidden, fc2_weight, fc2_bias), residual


# the dtypes of h (and of the model) a lean block runs in without autocast: timm's fp32 and a model cast to 16 bits
LEAN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_inference_applies(h, residual, backend="auto") -> bool:
    """Whether :func:`block_inference` may run a block on ``h`` (+ ``residual``): plain CPU inference (grad mode off,
    no trace or transform) on the torch fallbacks (``backend``: not the Triton kernels, which run CPU tensors under
    TRITON_INTERPRET=1), where the block's ops would each take their CPU inference branch; in fp32, bf16 or fp16 (a
    model cast to that dtype; ``residual`` in ``h``'s), or under autocast with the stream in fp32 or the autocast
    dtype."""
    # inference_call first: it answers for torch.fx's proxies (no plain tensors) before anything reads h
    if not (inference_call((h, residual)) and not torch.is_grad_enabled() and h.device.type == "cpu"
            and not transformed() and backend != "triton" and not use_triton(backend, h)):
        return False
    # a residual of another shape is refused by the ops (torch.add would broadcast it)
    if residual is not None and residual.shape != h.shape:
        return False
    if torch.is_autocast_enabled("cpu"):
        dtypes = (torch.float32, torch.get_autocast_dtype("cpu"))
        return h.dtype in dtypes and (residual is None or residual.dtype in dtypes)
    return h.dtype in LEAN_DTYPES and (residual is None or residual.dtype == h.dtype)


def block_inference(h, residual, norm1, qkv, proj, norm2, fc1, fc2, num_heads, approximate="none"):
    """A pre-LN block's (MLP branch, z') for z = h + residual, in plain CPU inference (:func:`block_inference_applies`):
    z' = z + MSA(LN_1(z)), branch = MLP(LN_2(z')). ``norm1`` / ``norm2`` are (weight, bias, eps), ``qkv``, ``proj``,
    ``fc1``, ``fc2`` (weight, bias); ``approximate`` fc1's GELU.

    The same kernels, in the same order, as ``add_layer_norm_linear``, ``attention_qkv`` and ``layer_norm_mlp``
    run in this mode (so the same values), called directly: at small CPU batches a forward waits on the Python
    between its kernels, ~1.5-2.5 us a function call there (a block's ops walk about 180), where ~0.2 us timed
    alone (bench/paired.py, ViT-Ti/16 at batch 1: fp32 0.89x timm with the ops, 0.93-0.97x this way; bf16 autocast
    0.90x, 0.95-0.98x)."""
    # F.layer_norm is the ops' inference LayerNorm (add_layer_norm_inference; CPU autocast leaves it as it is),
    # its output in the dtype of the branch it follows as there; proj's product ops.linear, as Attention._project
    # calls it. Each intermediate is freed as soon as the ops' block frees it (the memory peak is theirs): the
    # LayerNorms' outputs after their GEMMs, qkv before the MLP, the attention's output after its projection
    z = h if residual is None else torch.add(h, residual)
    packed = onednn.linear(cast(F.layer_norm(z, z.shape[-1:], *norm1), h.dtype), *qkv)
    b, n, d3 = packed.shape
    heads = _flash_attention.split_qkv(packed.reshape(b, n, 3, num_heads, d3 // (3 * num_heads)))
    del packed
    out = F.scaled_dot_product_attention(*heads)
    del heads
    branch = linear(out.transpose(1, 2).reshape(b, n, d3 // 3), *proj)
    del out
    z, dtype = torch.add(branch, z), branch.dtype
    del branch
    hidden = onednn.linear_gelu(cast(F.layer_norm(z, z.shape[-1:], *norm2), dtype), *fc1, approximate)
    return onednn.linear(hidden, *fc2), z


def _inference(args, triton) -> bool:
    """Whether a call with tensor arguments ``args`` (the first the input) runs its op's forward body alone: eager
    inference (nothing for autograd to keep, no trace), no torch.func transform, and on the kernels no profiler
    (``kernels._launch.plain_inference``). At small batches a GPU forward waits on the host: the autograd Function,
    its context and the custom-op layers cost ~2-4 us a fused op (bench/overhead.py's stubbed launches)."""
    return not transformed() and (plain_inference(args) if triton else inference_call(args))


def _cpu_inference(args, triton) -> bool:
    """:func:`_inference` on the torch fallback on CPU, where GEMMs may take their bias or GELU in oneDNN's
    epilogue (``fastvit.onednn``)."""
    return args[0].device.type == "cpu" and not triton and _inference(args, triton)


def _inference_linear(y, weight, bias, triton):
    """The Linear after a fused op's forward in eager inference: oneDNN's (the bias in its epilogue) on the CPU
    fallback, else the product the op's autograd Function computes (``kernels._gemm.linear``)."""
    if y.device.type == "cpu" and not triton:
        return onednn.linear(y, weight, bias)
    return _gemm.linear(y, weight, bias)


def linear_residual(x, weight, bias, residual, backend="auto"):
    """x W^T + b + residual: a Linear (attention's proj, the MLP's fc2) and the residual add after it.

    On a GPU with the Triton kernels: cuBLAS and a separate add ("cublas+add") or our GEMM adding bias and residual
    before its store ("gemm_residual", ``kernels/matmul_residual.py``), whichever was measured faster
    (:func:`gemm_impl`); elsewhere, and with ``backend="torch"``, ``F.linear(x, W, b) + residual``."""
    _check_linear(weight, bias, _features(x))
    _check_residual(residual, (*x.shape[:-1], weight.shape[0]))
    args = (x, weight, bias, residual, use_triton(backend, x))
    if not _gemm_on_gpu(args[-1], x) or transformed():
        return _matmul_residual.matmul_residual_ref(*args[:-1])
    impl = gemm_impl("linear_residual", x, weight, (("residual", str(residual.dtype)), ("bias", bias is not None)),
                     functools.partial(_run_linear_residual, args))
    return _run_linear_residual(args, impl)


@quiet_size_checks
def _check_residual(residual, shape):
    if residual.shape != shape:
        raise ValueError(f"residual must have the output's shape {shape}, got {tuple(residual.shape)}")


def linear(x, weight, bias=None):
    """x W^T + b: ``F.linear``, except on a CPU that only emulates the bf16 / fp16 GEMM the call computes in, where
    the product and its backward run in fp32 on operands rounded as autocast rounds them (``kernels/_gemm.py``:
    ~10x faster there, the same values up to summation order). The model's attention projection and head."""
    dtype = _gemm.fp32_dtype(x, weight, bias)
    if dtype is None:
        return F.linear(x, weight, bias)
    return apply(_gemm.LinearFn, cast(x, dtype), cast(weight, dtype), bias)


def linear_is_plain(x) -> bool:
    """Whether :func:`linear` is F.linear for inputs like ``x`` whatever the dtype: a cheap test (off a CPU, or on
    one with native low-precision GEMMs), so that a caller may keep its nn.Linear call there."""
    return not _gemm.EMULATED or x.device.type != "cpu"


def _run_linear_residual(args, impl):
    if impl == "cublas+add":
        return _matmul_residual.matmul_residual_ref(*args[:-1])
    return _matmul_residual.matmul_residual(*args, tma=impl == "gemm_residual_tma")


# per op: (the unfused path, our GEMM with one program per tile, the persistent TMA GEMM: sm_90 on); the first is
# the static choice
GEMM_IMPLS = {"add_layer_norm_linear": ("ln+cublas", "ln_gemm", "ln_gemm_tma"),
              "bias_gelu_linear": ("gelu+cublas", "gelu_gemm", "gelu_gemm_tma"),
              "linear_residual": ("cublas+add", "gemm_residual", "gemm_residual_tma")}


def _gemm_on_gpu(triton, x) -> bool:
    """Whether a fused GEMM may be a candidate at all (the cheap test, before :func:`gemm_impl`): the Triton
    kernels run (``triton``) on a GPU tensor."""
    return triton and x.is_cuda


def gemm_impl(op, x, weight, extra_fields, run) -> str:
    """Which of ``GEMM_IMPLS[op]`` runs a call with input ``x`` (any leading shape) and (N, K) ``weight``, where the
    Triton kernels run on a GPU (:func:`_gemm_on_gpu`); the TMA GEMM is a candidate on sm_90 and newer.

    Outside torch.compile / export tracing the candidates are timed once per (GPU, dtypes, rows, K, N,
    ``extra_fields``, candidates) on the call's own inputs, forward only (all share their backward), and the
    fastest of those whose outputs agree with the unfused path's is cached (``fastvit.autotune``); while tracing,
    the unfused path. ``run(impl)`` runs the op once with ``impl`` and returns its outputs.
    """
    unfused = GEMM_IMPLS[op][0]
    if torch.compiler.is_compiling():
        return unfused
    compute = _matmul.compute_dtype(x)
    rows, k, n = x.numel() // max(x.shape[-1], 1), x.shape[-1], weight.shape[0]
    names = gemm_candidates(op, x)
    call = (op, x.device.index or 0, x.dtype, compute, weight.dtype, rows, k, n, extra_fields, names)
    impl = autotune.settled(call)
    if impl is not None:
        return impl
    if not torch.cuda.is_available() or compute not in (torch.float16, torch.bfloat16, torch.float32):
        return unfused
    fields = (("dtype", str(x.dtype)), ("compute", str(compute)), ("weight", str(weight.dtype)), ("rows", rows),
              ("in", k), ("out", n), *extra_fields, ("candidates", names))
    return autotune.fastest(op, call[1], fields, list(names), lambda impl: functools.partial(_forward_only, run, impl),
                            unfused, agrees=_agreement(lambda impl: _forward_only(run, impl), unfused),
                            call_key=call, report_failures=True)


def gemm_candidates(op, x) -> tuple:
    """The paths of ``GEMM_IMPLS[op]`` a call with input ``x`` may take: all of them, less the TMA kernel for a
    tensor on a GPU before sm_90 (no TMA there)."""
    names = GEMM_IMPLS[op]
    return names[:2] if x.is_cuda and capability(x.device) < (9, 0) else names


def _forward_only(run, impl):
    with torch.no_grad():
        out = run(impl)
    return out if isinstance(out, tuple) else (out,)


def _agreement(outputs, reference):
    """``agrees(impl)`` for ``autotune.fastest``: whether ``outputs(impl)`` (a tuple of tensors) matches
    ``outputs(reference)``, computed once (:func:`_close`)."""
    expected = []

    def agrees(impl):
        if impl == reference:
            return True
        if not expected:
            expected.append(outputs(reference))
        return all(_close(a, b) for a, b in zip(outputs(impl), expected[0], strict=True))
    return agrees


def _close(a, b) -> bool:
    """``a`` finite, of ``b``'s shape and within 2% of b's largest value of it: implementations round differently,
    while a wrong tile, a wrong offset or garbage is far off."""
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    return bool((a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max() + 1e-3)


ATTENTION_BACKENDS = BACKENDS + ("flash",)
# torch's scaled_dot_product_attention with one of its kernels forced (candidates of the tuned "auto")
SDPA_KERNELS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}
# whether the user left each of them on (torch.backends.cuda.enable_*_sdp, or inside torch.nn.attention.sdpa_kernel)
SDPA_ENABLED = {"sdpa_flash": torch.backends.cuda.flash_sdp_enabled,
                "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled,
                "sdpa_efficient": torch.backends.cuda.mem_efficient_sdp_enabled}


@quiet_size_checks
def attention(q, k, v, rel_bias=None, grid_size=None, dropout_p=0.0, scale=None, backend="auto", attn_mask=None,
              is_causal=False):
    """softmax(q k^T / sqrt(D_h) + B_rel [+ M]) v on (B, heads, N, head_dim) views, which may be strided.

    ``rel_bias`` is None or a per-head table of relative-position biases, shape (heads, (2gh-1)(2gw-1) [+3]),
    over the ``grid_size`` = (gh, gw) patch grid; its last 3 entries (present when N = gh*gw + 1) are the
    class-token entries (query->key): class->patch, patch->class, class->class (BEiT's layout).

    ``backend`` may also be ``"flash"`` (the optional flash_attn package: CUDA fp16/bf16, no ``rel_bias``).
    ``"auto"`` on a GPU runs the fastest of flash_attn, torch's SDPA kernels (those the user left enabled:
    ``sdpa_kernel``, ``torch.backends.cuda.enable_flash_sdp`` and the like) and our Triton kernel for this call
    shape, measured once (``fastvit.autotune``); with a ``rel_bias`` (which only ours takes), under torch.compile
    and on CPU it takes flash_attn where it can run, else the Triton kernels where they can (fp32/fp16/bf16,
    head_dim <= 128), else scaled_dot_product_attention (on CPU, for 16-bit training at up to 128 tokens, with our
    torch backward instead of SDPA's: :func:`_cpu_training_attention`).

    ``attn_mask`` / ``is_causal`` are timm's and SDPA's: a mask M broadcast to (B, heads, N, N), bool (True where a
    query may attend) or added to the scores, or the causal mask. No fused kernel takes one, so a masked call runs
    SDPA whatever ``backend`` (with ``rel_bias`` added to the mask: :func:`mask_bias`). Nor does one take fewer
    queries than keys (q of (B, heads, M < N, head_dim), no ``rel_bias``): SDPA runs those too.
    """
    if attn_mask is not None or is_causal:
        return _masked_attention(q, k, v, rel_bias, grid_size, dropout_p, scale, attn_mask, is_causal)
    if q.shape[-2] < k.shape[-2] and k.shape == v.shape and rel_bias is None:
        # fewer queries than keys (a last block's class-token query, model.class_token_suffices): SDPA takes them,
        # our kernels do not; its math kernel under a torch.func transform, as below
        math = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if transformed() else nullcontext()
        with math:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if transformed():  # SDPA's math kernel: the fused ones have neither forward-mode AD nor vmap rules
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return _run_attention("torch", q, k, v, rel_bias, grid_size, dropout_p, scale)
    impl = attention_backend(q, rel_bias, backend, dropout_p, grid_size)
    return _run_attention(impl, q, k, v, rel_bias, grid_size, dropout_p, scale)


@quiet_size_checks
def attention_qkv(qkv, num_heads, rel_bias=None, grid_size=None, dropout_p=0.0, scale=None, backend="auto"):
    """:func:`attention` of the q, k, v packed in ``qkv`` (B, N, 3 D), the qkv projection's output, split into
    ``num_heads`` heads; (B, heads, N, D / heads) out. Where our attention Function runs (the Triton kernels, or the
    CPU training "fallback") for a call autograd records, it takes the packed tensor and returns its gradient in one
    piece (``flash_attention.attention_bwd_qkv``); every other call gets the three views."""
    b, n, d3 = qkv.shape
    if d3 % (3 * num_heads):
        raise ValueError(f"qkv's last dim ({d3}) must be 3 x num_heads ({num_heads}) x head_dim: a multiple of "
                         f"{3 * num_heads}")
    qkv = qkv.reshape(b, n, 3, num_heads, d3 // (3 * num_heads))
    q, k, v = _flash_attention.split_qkv(qkv)
    if transformed():
        return attention(q, k, v, rel_bias, grid_size, dropout_p, scale, backend)
    impl = attention_backend(q, rel_bias, backend, dropout_p, grid_size)
    if (impl != "fallback" and not impl.startswith("triton")) or not records_autograd((qkv, rel_bias)):
        return _run_attention(impl, q, k, v, rel_bias, grid_size, dropout_p, scale)
    return _flash_attention.flash_attention_qkv(qkv, rel_bias, grid_size, scale, dropout_p, *_kernel_choice(impl))


def timm_fused_attn() -> bool:
    """timm's global default for a new attention's ``fused_attn`` (False: the explicit path, whose maps hooks see):
    ``timm.layers.set_fused_attn`` / ``set_exportable`` where timm is loaded, else its TIMM_FUSED_ATTN variable."""
    config = sys.modules.get("timm.layers.config")
    if config is not None:
        return config.use_fused_attn()
    return int(os.environ.get("TIMM_FUSED_ATTN", "1")) > 0


def mask_bias(n, like, attn_mask=None, is_causal=False):
    """The additive (.., n, n) bias of a mask as timm's explicit attention resolves it (None without one):
    ``is_causal`` -inf above the diagonal (it wins over ``attn_mask``, as in timm), a bool mask -inf where False, a
    float mask as it is; ``like`` gives the dtype and device."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def masked_scores(scores, attn_mask=None, is_causal=False):
    """Attention scores (.., n, n) with a mask's bias added (:func:`mask_bias`), or as they are without one: the
    explicit attention's step, one torch.fx leaf (a traced graph then runs with or without a mask)."""
    bias = mask_bias(scores.shape[-1], scores, attn_mask, is_causal)
    return scores if bias is None else scores + bias


def _masked_attention(q, k, v, rel_bias, grid_size, dropout_p, scale, attn_mask, is_causal):
    """SDPA with the mask; a relative-position bias joins it as one additive mask, checked as without a mask (a
    table of another size or head count would otherwise be indexed or broadcast silently)."""
    if rel_bias is not None:
        n = q.shape[-2]
        grid_size = _flash_attention._check_inputs(q, k, v, rel_bias, grid_size, dropout_p)
        bias = _flash_attention.relative_bias_dense(rel_bias, grid_size, n).to(q.dtype)
        attn_mask, is_causal = bias + mask_bias(n, bias, attn_mask, is_causal), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


def _run_attention(impl, q, k, v, rel_bias, grid_size, dropout_p, scale):
    if impl == "fallback":
        return _flash_attention.flash_attention(q, k, v, rel_bias, grid_size, scale, dropout_p, False)
    if impl == "flash":
        return _flash_attention.attention_flash(q, k, v, rel_bias, dropout_p, scale)
    if impl in SDPA_KERNELS:
        with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, SDPA_KERNELS[impl])):
            return _flash_attention.attention(q, k, v, None, None, dropout_p, scale, False)
    use_triton, fwd_tiles, bwd_tiles = _kernel_choice(impl)
    if use_triton and plain_inference((q, k, v, rel_bias)):
        return _flash_attention.attention_inference(q, k, v, rel_bias, grid_size, scale, dropout_p, True, fwd_tiles)
    return _flash_attention.attention(q, k, v, rel_bias, grid_size, dropout_p, scale, use_triton, fwd_tiles,
                                      bwd_tiles)


def _kernel_choice(impl: str) -> tuple:
    """(use_triton, forward tiles, dK/dV tiles) for our attention Function from an implementation name: "triton@2"
    is our kernel with forward_tiles(head_dim)[2], "triton@2/1" also with backward_tiles(head_dim, arch)[1]
    (:func:`_triton_tiles`); "fallback" and "torch" its torch math. Parsed once per name in eager calls; traced,
    the parse folds to constants (dynamo ignores a cache and warns about it at every compile)."""
    if torch.compiler.is_compiling():
        return _parse_kernel_choice(impl)
    return _cached_kernel_choice(impl)


def _parse_kernel_choice(impl: str) -> tuple:
    name, _, tiles = impl.partition("@")
    fwd, _, bwd = tiles.partition("/")
    return name == "triton", int(fwd or 0), int(bwd or 0)


_cached_kernel_choice = functools.lru_cache(maxsize=None)(_parse_kernel_choice)  # a few names, asked at every call


def _triton_tiles(fwd: int, bwd: int) -> str:
    """The implementation name of our kernel with forward tiles ``fwd`` and dK/dV tiles ``bwd`` (see
    :func:`_run_attention`): "triton" for the defaults."""
    if bwd:
        return f"triton@{fwd}/{bwd}"
    return f"triton@{fwd}" if fwd else "triton"


def attention_backend(q, rel_bias=None, backend="auto", dropout_p=0.0, grid_size=None) -> str:
    """Which implementation :func:`attention` runs for ``q`` (and ``rel_bias`` over ``grid_size``, ``dropout_p``):
    "flash", "triton", "torch", with a tuned ``"auto"`` one of ``SDPA_KERNELS`` or ``"triton@i"`` (our kernel
    with the forward's i-th alternative tiles, ``flash_attention.forward_tiles``; for a training call also
    ``"triton@i/j"``, with the dK/dV kernel's j-th, ``flash_attention.backward_tiles``), or for a CPU training call
    "fallback" (SDPA's forward, our torch backward: :func:`_cpu_training_attention`). A call with a ``rel_bias`` is
    tuned among our kernel's tiles only (nothing else takes the bias)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "flash" or (backend == "auto" and _flash_attention.flash_attn_supported(q, rel_bias)):
        static = "flash"
    elif backend == "auto" and not _flash_attention.triton_supported(q):
        static = "torch"
    else:
        static = "triton" if use_triton(backend, q) else "torch"
    if backend == "auto" and static == "torch" and q.device.type == "cpu":
        return _cpu_training_attention(q, rel_bias, dropout_p)
    if (backend != "auto" or not q.is_cuda
            or (rel_bias is not None and (static != "triton" or grid_size is None))):
        return static
    training = torch.is_grad_enabled() and (q.requires_grad or (rel_bias is not None and rel_bias.requires_grad))
    call = (str(q.dtype), *q.shape, dropout_p > 0, training, _flash_attention.triton_supported(q),
            q.device.index or 0, None if rel_bias is None else tuple(rel_bias.shape),
            None if grid_size is None else tuple(grid_size), static)
    if torch.compiler.is_compiling():
        return _compiled_attention_choice(call)
    # SDPA's kernels the user left on are candidates: a switch flipped later is another call
    call_key = (*call, *(SDPA_ENABLED[name]() for name in SDPA_KERNELS))
    impl = autotune.settled(call_key)
    if impl is not None:
        return impl
    if not torch.cuda.is_available():
        return static
    fields, names = _attention_candidates(*call)
    return autotune.fastest("attention", q.device.index or 0, fields, names,
                            functools.partial(_attention_runner, q, rel_bias, grid_size, dropout_p, training),
                            static, agrees=_agreement(_attention_outputs(q, rel_bias, grid_size, training), "torch"),
                            call_key=call_key)


def _attention_candidates(dtype, b, h, n, d, dropout, training, ours_run, device_index, table_shape, grid, static):
    """(autotune fields, candidate names) of an attention call, from plain values (so that torch.compile can call
    this at trace time): our kernel's tile choices where it runs the call, SDPA's kernels the user left on, torch's
    default, flash_attn where it can run; with a bias table, our tiles only."""
    fields = (("dtype", dtype), ("batch", b), ("heads", h), ("tokens", n), ("head_dim", d), ("dropout", dropout),
              ("training", training))
    ours = []
    if ours_run:
        arch = device_arch(torch.device("cuda", device_index))
        backward = len(_flash_attention.backward_tiles(d, arch)) if training else 1
        ours = [_triton_tiles(i, j) for i in range(len(_flash_attention.forward_tiles(d))) for j in range(backward)]
    if table_shape is not None:
        return (*fields, ("rel_bias", table_shape), ("grid", grid)), ours
    sdpa = tuple(name for name in SDPA_KERNELS if SDPA_ENABLED[name]())
    return (*fields, ("sdpa", sdpa)), [*sdpa, "torch", *(["flash"] if static == "flash" else []), *ours]


def _compiled_attention_choice(call) -> str:
    """:func:`_traced_attention_choice` for ``call`` while torch.compile traces, its sizes as plain ints: dynamo
    cannot hand a symbolic size (a dynamic batch, after a recompile for a new one) to a constant function, which
    broke the graph at every attention call. ``operator.index`` fixes a symbolic int to its value (dynamo guards on
    it: one graph per shape, as the per-shape winners want); int() would leave it symbolic."""
    return _traced_attention_choice(*map(_plain_sizes, call))


def _plain_sizes(v):
    """``v`` with every (symbolic) int in it, also inside a tuple (a grid), as a plain int."""
    if isinstance(v, tuple):
        return tuple(map(_plain_sizes, v))
    return operator.index(v) if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) else v


@torch.compiler.assume_constant_result
def _traced_attention_choice(dtype, b, h, n, d, dropout, training, ours_run, device_index, table_shape, grid,
                             static) -> str:
    """:func:`attention_backend`'s choice while torch.compile traces, where nothing can be timed: the winner an
    eager call measured for this call (in this process or the autotune file), else the static choice. Asked once
    per compiled graph, outside it. (Compiled models used to take the static choice at every shape: our kernel
    where eager ran cuDNN's, H/14 training on the H200 336 against 362 images/s.)"""
    fields, names = _attention_candidates(dtype, b, h, n, d, dropout, training, ours_run, device_index, table_shape,
                                          grid, static)
    return autotune.cached("attention", device_index, fields, names, static)


# 16-bit CPU training calls with at most this many tokens take the fallback's attention backward (see below)
CPU_MATH_BACKWARD_MAX_TOKENS = 128


def _cpu_training_attention(q, rel_bias, dropout_p) -> str:
    """"fallback" (our attention Function's torch path) or "torch" (SDPA) for a call with ``backend="auto"`` on CPU.

    Both run PyTorch's CPU flash kernel forward and save the same tensors; they differ in the backward: SDPA's CPU
    flash backward, or the fallback's fp32 torch math (P recomputed from the saved log-sum-exp). On an AVX-512 VM
    the flash backward in bf16 took 1.3-12x as long as the math one up to 101 tokens (11.6x at the smoke models'
    17) and 0.87x from 145; in fp32 it was the faster everywhere (0.5-0.9x). So a 16-bit training call
    without a bias or dropout and with at most ``CPU_MATH_BACKWARD_MAX_TOKENS`` tokens takes the fallback. A fixed
    rule, not a timing: the choice changes a gradient's rounding, and a measured one could differ between the ranks
    of a job, or between a run and its resume, which repeats the run bitwise. Under torch.compile too: inductor
    compiles the fallback's backward from its torch ops (a triton_op's body) where it would call SDPA's kernel."""
    if (q.dtype in (torch.float16, torch.bfloat16) and q.shape[-2] <= CPU_MATH_BACKWARD_MAX_TOKENS
            and rel_bias is None and dropout_p == 0
            and (eager_training_call((q,)) or (torch.compiler.is_compiling() and records_autograd((q,))))):
        return "fallback"
    return "torch"


def _attention_inputs(q, rel_bias, requires_grad=False):
    """Random (q, k, v) shaped like ``q``'s call (strided views of one packed buffer, as the model passes them) and
    a random table shaped like ``rel_bias`` (None without one)."""
    b, h, n, d = q.shape
    qkv = torch.randn(b, n, 3, h, d, device=q.device, dtype=q.dtype, requires_grad=requires_grad)
    table = None if rel_bias is None else torch.randn(rel_bias.shape, device=q.device, dtype=rel_bias.dtype,
                                                      requires_grad=requires_grad)
    return _flash_attention.split_qkv(qkv), table


def _attention_outputs(q, rel_bias, grid, training):
    """outputs(impl) for :func:`_agreement`: ``impl``'s output on one set of random inputs shaped like the call's,
    and for a ``training`` call the gradients of q, k, v (and the table) for one random output gradient (implementations
    that differ only in their backward tiles agree in the forward); without dropout (whose masks differ between
    implementations). "torch" is torch's SDPA, with the dense bias for a table."""
    inputs = []

    def outputs(impl):
        if not inputs:
            inputs.append(_attention_inputs(q, rel_bias, requires_grad=training))
        views, table = inputs[0]
        with torch.set_grad_enabled(training):
            out = _run_attention(impl, *views, table, grid, 0.0, None)
        if not training:
            return (out,)
        if len(inputs) == 1:
            inputs.append(torch.randn_like(out))
        leaves = [*views, *([] if table is None else [table])]
        return (out.detach(), *torch.autograd.grad(out, leaves, inputs[1]))
    return outputs


def _attention_runner(q, rel_bias, grid, dropout_p, training, impl):
    """A run of ``impl`` on random inputs shaped like the call's, with a backward pass for a training call."""
    views, table = _attention_inputs(q, rel_bias, requires_grad=training)

    def run():
        out = _run_attention(impl, *views, table, grid, dropout_p, None)
        if training:
            out.backward(torch.ones_like(out))

    return run


# torch.fx traces the model with these as leaf calls: a traced module runs the same kernels, and their Python
# checks and dispatch see real tensors, never proxies.
for _name in ("patch_embed", "add_class_and_position", "add_layer_norm", "bias_gelu", "add_layer_norm_linear",
              "bias_gelu_linear", "layer_norm_mlp", "linear_residual", "linear", "attention", "masked_scores"):
    torch.fx.wrap(_name)
