"""One Triton GEMM, out = prologue(A) W^T [+ b] [+ residual], that the fused-matmul ops build on.

The ops in ``ln_matmul.py``, ``gelu_matmul.py`` and ``matmul_residual.py`` differ only in what happens to an A tile
between its load and the tensor-core dot (the prologue) and in what is added to the fp32 accumulator before the
store (the epilogue), so they share this kernel and pick their variant with constexprs:

- prologue ``"none"``: A as loaded, cast to W's dtype (an fp32 A meets bf16 weights under autocast);
- ``"layer_norm"``: (A - mean) * rstd * gamma + beta per row, from per-row fp32 statistics, so the normalised
  tensor never reaches memory;
- ``"bias_gelu"``: GELU(A + b1), ``"gelu"``: GELU(A) (the model's, whose fc1 adds b1 in its GEMM), so the MLP's
  activation never reaches memory; the exact erf GELU or an approximation (``APPROXIMATE``, ``bias_gelu.gelu``);
- epilogue: + bias (fp32), + residual (fp32 add of another (M, N) tensor), one rounding to OUT's dtype.

The prologue works on fp32 values in registers and rounds once to W's dtype before the dot, as the unfused path
rounds the LayerNorm / GELU output once to the GEMM's dtype. Tiles are visited in groups of ``GROUP_M`` row blocks
so that W's column blocks stay in L2 across consecutive programs. A is read along unit-stride rows, W is (N, K)
with unit-stride rows (nn.Linear's layout, no transpose copy).

Two kernels share the prologue and epilogue: one program per output tile with pointer loads (any GPU), and on
sm_90 a persistent one (a program per SM walking the tiles) that loads A and W and stores the output through TMA
descriptors. Which one a call shape gets, or cuBLAS instead, is measured (``fastvit.ops.gemm_impl``).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastvit.kernels._launch import (TRITON_VERSION, PlannedLaunch, Plans, capability, cdiv, device_arch, interpreting,
                                     launch, plans_apply, sm_count)
from fastvit.kernels._report import TORCH_DTYPES, KernelSpec
from fastvit.kernels.bias_gelu import gelu

PROLOGUES = ("none", "layer_norm", "bias_gelu", "gelu")
# Whether the persistent TMA kernel flattens its tile and K loops (the next tile's loads then overlap this one's
# epilogue). Triton 3.6 serialises the wgmma of the flattened loop (ptxas note C7515: each waits for the one
# before) in every prologue variant at ViT shapes; 3.7 and 3.8 do not (bench/kernel_report.py shows both).
FLATTEN = TRITON_VERSION >= (3, 7)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one GEMM variant."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def config(dtype: torch.dtype, prologue: str, a_dtype: torch.dtype, arch: int) -> Tiles:
    """Tiles for a GEMM whose dot runs in ``dtype`` on an A of ``a_dtype`` on compute capability ``arch``
    (``_launch.device_arch``); the launcher and aot_specs both call this.

    fp16/bf16: 128 x 128 output tiles on 8 warps (a prologue holds its A tile in fp32 registers next to the
    accumulator), K steps of 64 over 3 stages. K steps of 32 over 4 stages where a step of 64 spills on sm_80: the
    GELU prologue (its erf, 480 bytes of stack) and an fp32 A (``residual_in_fp32``, 40 bytes); on sm_90 the GELU
    prologue keeps the step of 64, at which the pointer-load kernel's wgmma stay asynchronous (at 32 ptxas
    serialises them, note C7515). fp32 (IEEE dots, CUDA cores) takes 64 x 64 tiles.
    """
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    if dtype == torch.float32:
        return Tiles(64, 64, 32, 8, 4, 3)
    if dtype in (torch.float16, torch.bfloat16):
        if prologue in ("bias_gelu", "gelu") and arch < 90 or a_dtype == torch.float32:
            return Tiles(128, 128, 32, 8, 8, 4)
        return Tiles(128, 128, 64, 8, 8, 3)
    raise ValueError(f"fused matmuls run in float32, float16 or bfloat16, got {dtype}")


def precision(dtype: torch.dtype) -> str:
    """The dot's input precision: IEEE for fp32 (as F.linear computes it) unless torch allows TF32 matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile ``tile``, row blocks grouped by GROUP_M for L2 reuse of W."""
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit
def _prologue(a, k0, ks, K, mean, rstd, P_W, P_B, PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr,
              APPROXIMATE: tl.constexpr):
    """An A tile (columns k0 + ks) as the dot takes it, in fp32: normalised ("layer_norm", with the rows' ``mean``
    and ``rstd``), activated ("bias_gelu", "gelu") or as loaded ("none"). Lanes past K load as 0 and stay 0: gamma
    and beta load as 0 there, and GELU(0) = 0."""
    if PROLOGUE == "layer_norm":
        if EVEN_K:
            gamma = tl.load(P_W + k0 + ks).to(tl.float32)
            beta = tl.load(P_B + k0 + ks).to(tl.float32)
        else:
            gamma = tl.load(P_W + k0 + ks, mask=ks < K - k0, other=0.0).to(tl.float32)
            beta = tl.load(P_B + k0 + ks, mask=ks < K - k0, other=0.0).to(tl.float32)
        a = (a.to(tl.float32) - mean) * rstd * gamma[None, :] + beta[None, :]
    elif PROLOGUE == "bias_gelu" or PROLOGUE == "gelu":
        u = a.to(tl.float32)
        if PROLOGUE == "bias_gelu":
            if EVEN_K:
                u += tl.load(P_B + k0 + ks).to(tl.float32)[None, :]
            else:
                u += tl.load(P_B + k0 + ks, mask=ks < K - k0, other=0.0).to(tl.float32)[None, :]
        a = gelu(u, APPROXIMATE)
    return a


@triton.jit
def _epilogue(acc, rows, cols, M, N, BIAS, RES, stride_rm, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The fp32 accumulator of output rows x cols plus the bias and the residual."""
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        acc += tl.load(RES + rows.to(tl.int64)[:, None] * stride_rm + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    return acc


@triton.jit
def _fused_matmul_kernel(A, W, OUT, BIAS, RES, MEAN, RSTD, P_W, P_B,
                         M, N, K, stride_am, stride_wn, stride_om, stride_rm,
                         PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         EVEN_K: tl.constexpr, APPROXIMATE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One output tile per program, operands through pointer loads (any GPU)."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows and columns past the edge wrap to valid ones, so loads need no row/column mask (the store has one)
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows_in[:, None] * stride_am + ks[None, :]
    w_ptrs = W + cols_in[None, :] * stride_wn + ks[:, None]
    mean = 0.0
    rstd = 0.0
    if PROLOGUE == "layer_norm":
        mean = tl.load(MEAN + rows_in)[:, None]
        rstd = tl.load(RSTD + rows_in)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0)
            w = tl.load(w_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        a = _prologue(a, k0, ks, K, mean, rstd, P_W, P_B, PROLOGUE, EVEN_K, APPROXIMATE)
        acc = tl.dot(a.to(W.dtype.element_ty), w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _epilogue(acc, rows, cols, M, N, BIAS, RES, stride_rm, HAS_BIAS, HAS_RESIDUAL)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(OUT + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fused_matmul_tma_kernel(A_DESC, W_DESC, OUT_DESC, BIAS, RES, MEAN, RSTD, P_W, P_B, M, N, K, stride_rm,
                             programs, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                             EVEN_K: tl.constexpr, APPROXIMATE: tl.constexpr, PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, FLATTEN: tl.constexpr):
    """Persistent (``programs`` programs, about one per SM, each walking every programs-th tile; with ``FLATTEN``
    the loops are flattened so the next tile's loads overlap this one's epilogue), operands and output through TMA
    descriptors (sm_90+), which zero-fill loads past M, N and K and clip the store."""
    ks = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), programs, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mean = 0.0
        rstd = 0.0
        if PROLOGUE == "layer_norm":
            mean = tl.load(MEAN + rows % M)[:, None]
            rstd = tl.load(RSTD + rows % M)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _prologue(A_DESC.load([pid_m * BLOCK_M, k0]), k0, ks, K, mean, rstd, P_W, P_B, PROLOGUE, EVEN_K,
                          APPROXIMATE)
            acc = tl.dot(a.to(W_DESC.dtype), W_DESC.load([pid_n * BLOCK_N, k0]).T, acc, input_precision=PRECISION)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _epilogue(acc, rows, cols, M, N, BIAS, RES, stride_rm, HAS_BIAS, HAS_RESIDUAL)
        OUT_DESC.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(OUT_DESC.dtype))


def _rows(t):
    """A 2D tensor whose last dim has unit stride (a copy only when it has not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def tma_supported(a, weight, out_dtype) -> bool:
    """Whether the persistent TMA kernel can run prologue(a) weight^T into an ``out_dtype`` output: a Hopper or
    newer GPU (or Triton's interpreter, for tests) and 16-byte aligned bases and row strides, as TMA requires."""
    if a.is_cuda:
        if capability(a.device) < (9, 0):
            return False
    elif not interpreting():
        return False
    return (a.stride(-1) == 1 and weight.stride(-1) == 1 and a.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and (a.stride(0) * a.element_size()) % 16 == 0 and (weight.stride(0) * weight.element_size()) % 16 == 0
            and (weight.shape[0] * out_dtype.itemsize) % 16 == 0)


def fused_matmul(a, weight, out_dtype, bias=None, residual=None, prologue="none", mean=None, rstd=None,
                 prologue_weight=None, prologue_bias=None, tma=False, approximate="none"):
    """prologue(a) weight^T [+ bias] [+ residual] on (M, K) ``a`` and (N, K) ``weight``, computed in weight's
    dtype with fp32 accumulation, returned as a new (M, N) tensor of ``out_dtype``.

    ``prologue="layer_norm"`` needs the per-row fp32 ``mean`` and ``rstd`` of ``a`` and the LayerNorm's
    ``prologue_weight`` / ``prologue_bias`` (K,); ``"bias_gelu"`` needs ``prologue_bias`` (K,); ``approximate``
    picks the GELU of ``"bias_gelu"`` / ``"gelu"`` (``bias_gelu.APPROXIMATIONS``). ``tma``: the persistent TMA
    kernel (where :func:`tma_supported`), else one program per output tile. In eager mode the tiles and launch
    options of a call signature are worked out once (:class:`_FusedMatmul`).
    """
    a, weight = _rows(a), _rows(weight)
    extras = (bias, None if residual is None else _rows(residual), mean, rstd, prologue_weight, prologue_bias)
    if not plans_apply(a):
        return _FusedMatmul(a, weight, out_dtype, *extras, prologue, tma, approximate, False)(a, weight, *extras)
    key = (a.shape, a.stride(), a.dtype, weight.shape, weight.stride(), weight.dtype, out_dtype,
           *(None if t is None else (t.shape, t.stride(), t.dtype) for t in extras), prologue, tma, approximate,
           precision(weight.dtype), a.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.keep(key, _FusedMatmul(a, weight, out_dtype, *extras, prologue, tma, approximate, True))
    return plan(a, weight, *extras)


class _FusedMatmul:
    """What :func:`fused_matmul` does for one signature of its arguments: tiles, launch options and the launch
    (the pointer-load kernel's bound after its first launch; the TMA kernel's descriptors hold the tensors'
    addresses and are made at each call)."""

    def __init__(self, a, weight, out_dtype, bias, residual, mean, rstd, prologue_weight, prologue_bias, prologue, tma,
                 approximate, bindable):
        (m, k), n = a.shape, weight.shape[0]
        self.sizes, self.out_dtype = (m, n, k), out_dtype
        self.tiles = tiles = config(weight.dtype, prologue, a.dtype, device_arch(a.device))
        options = dict(PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                       EVEN_K=k % tiles.block_k == 0, APPROXIMATE=approximate, PRECISION=precision(weight.dtype),
                       BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
                       num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        num_tiles = cdiv(m, tiles.block_m) * cdiv(n, tiles.block_n)
        self.tma_options = dict(options, FLATTEN=FLATTEN) if tma else None
        self.programs = min(num_tiles, sm_count(a.device)) if tma else 0
        self.launch = PlannedLaunch(_fused_matmul_kernel, (num_tiles,), options, bindable)

    def __call__(self, a, weight, bias, residual, mean, rstd, prologue_weight, prologue_bias):
        m, n, k = self.sizes
        out = torch.empty((m, n), dtype=self.out_dtype, device=a.device)
        if not (m and n):
            return out
        bias = None if bias is None else bias.contiguous()
        operands = tuple(out if t is None else t for t in (bias, residual, mean, rstd, prologue_weight,
                                                             prologue_bias))
        res_stride = 0 if residual is None else residual.stride(0)
        if self.tma_options is not None and tma_supported(a, weight, self.out_dtype):
            tiles = self.tiles
            launch(_fused_matmul_tma_kernel, (self.programs,),
                   TensorDescriptor.from_tensor(a, [tiles.block_m, tiles.block_k]),
                   TensorDescriptor.from_tensor(weight, [tiles.block_n, tiles.block_k]),
                   TensorDescriptor.from_tensor(out, [tiles.block_m, tiles.block_n]),
                   *operands, m, n, k, res_stride, self.programs, **self.tma_options)
            return out
        self.launch((a, weight, out, *operands), (a, weight, *operands),
                    lambda: (m, n, k, a.stride(0), weight.stride(0), out.stride(0), res_stride))
        return out


_PLANS = Plans()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in for an input like ``x``: the autocast dtype when autocast is on for
    x's device, else x's own dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def gemm_weights(x, weight):
    """``weight`` as the fused matmul of input ``x`` takes it: cast to the autocast dtype under autocast, as
    F.linear would; without autocast it must already have x's dtype, as F.linear requires. (Biases keep their own
    dtype: the kernel adds them in fp32.)"""
    dtype = compute_dtype(x)
    if weight.dtype != dtype:
        if not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"the fused matmul needs weight in the input's dtype {dtype} (as F.linear does), "
                               f"got {weight.dtype}")
        weight = weight.to(dtype)
    return weight


def variant_specs(name, dtype, prologue, a_type, out_type, has_bias, has_residual, res_type=None, label="",
                  tma=False, approximate="none"):
    """KernelSpecs of one variant for the report: A of ``a_type`` ("*bf16", "*fp32", ...), weights of ``dtype``
    ("fp16"/"bf16"), fp32 bias and LayerNorm parameters as under AMP; K a multiple of the K block (every ViT width),
    every row stride and N, K multiples of 16, M (batch x tokens) not. ``tma``: the persistent TMA kernel (sm_90;
    its program count that of an H100/H200, 132). One spec per distinct :func:`config` of the archs that launch the
    kernel, labelled with its arch where sm_80 and sm_90 differ."""
    unused = out_type
    operands = {"BIAS": "*fp32" if has_bias else unused, "RES": res_type if has_residual else unused,
                "MEAN": "*fp32" if prologue == "layer_norm" else unused,
                "RSTD": "*fp32" if prologue == "layer_norm" else unused,
                "P_W": "*fp32" if prologue == "layer_norm" else unused,
                "P_B": "*fp32" if prologue in ("layer_norm", "bias_gelu") else unused}
    by_tiles = {}
    for arch in (90,) if tma else (80, 90):
        tiles = config(TORCH_DTYPES[dtype], prologue, TORCH_DTYPES[a_type[1:]], arch)
        by_tiles[tiles] = (*by_tiles.get(tiles, ()), arch)
    specs = []
    for tiles, archs in by_tiles.items():
        if tma:
            sig = {"A_DESC": f"tensordesc<{a_type[1:]}[{tiles.block_m}, {tiles.block_k}]>",
                   "W_DESC": f"tensordesc<{dtype}[{tiles.block_n}, {tiles.block_k}]>",
                   "OUT_DESC": f"tensordesc<{out_type[1:]}[{tiles.block_m}, {tiles.block_n}]>",
                   **operands, "M": "i32", "N": "i32", "K": "i32", "stride_rm": "i32", "programs": "i32"}
            fn, aligned = _fused_matmul_tma_kernel, ("N", "K", "stride_rm")
        else:
            sig = {"A": a_type, "W": f"*{dtype}", "OUT": out_type, **operands, "M": "i32", "N": "i32", "K": "i32",
                   "stride_am": "i32", "stride_wn": "i32", "stride_om": "i32", "stride_rm": "i32"}
            fn, aligned = _fused_matmul_kernel, ("A", "W", "OUT", "N", "K", "stride_am", "stride_wn", "stride_om",
                                                 "stride_rm")
        consts = {"PROLOGUE": prologue, "HAS_BIAS": has_bias, "HAS_RESIDUAL": has_residual, "EVEN_K": True,
                  "APPROXIMATE": approximate, "PRECISION": precision(TORCH_DTYPES[dtype]), "BLOCK_M": tiles.block_m,
                  "BLOCK_N": tiles.block_n, "BLOCK_K": tiles.block_k, "GROUP_M": tiles.group_m,
                  **({"FLATTEN": FLATTEN} if tma else {})}
        sig.update({k: "constexpr" for k in consts})
        specs.append(KernelSpec(name + ("_tma" if tma else ""), fn, sig, consts, tiles.num_warps, tiles.num_stages,
                                label if len(by_tiles) == 1 else f"{label} sm_{archs[0]}",
                                (*aligned, "BIAS", "RES", "MEAN", "RSTD", "P_W", "P_B"), archs))
    return specs
