"""Multi-head self-attention (FlashAttention-2) with an optional 2D relative-position bias looked up in-kernel.

softmax(q k^T * scale + B_rel) v on (B, heads, N, head_dim) views that may be strided: the model takes q, k and v
straight from the fused qkv projection (stride 3*D over tokens), and every kernel takes all four strides of each
tensor, so nothing is copied. The forward keeps a running max and sum per query row (online softmax) and writes
the output and the row log-sum-exp only; the N x N probabilities never reach memory.

B_rel comes from a learned (heads, R) table indexed like :func:`relative_position_index` (BEiT's layout): the
kernels compute each (query, key) pair's table index from the token indices and the patch grid and gather the
entry, so no (heads, N, N) bias exists in memory; its gradient is accumulated by atomic adds into an fp32
(heads, R) buffer (not deterministic: under ``torch.use_deterministic_algorithms(True)`` the fallback math runs
that backward).

Backward: a preprocessing kernel takes delta = rowsum(dO * O); then one kernel per key block accumulates dK and
dV over all query blocks, and one kernel per query block accumulates dQ (and the table gradient) over all key
blocks. Two kernels recompute the scores twice, but each output is written once by one program: no fp32 dQ
buffer, no atomics on dQ (so dQ is deterministic), and each kernel gets its own block sizes, which keeps the
padded head dims (80 -> 128) out of register spills.

Attention dropout hashes (seed, batch*head, query, key) with Philox (tl.rand) in the forward and again in both
backward kernels, so the mask is never stored; the seed is one int64 tensor drawn from torch's generator.

The Triton launch and the torch fallback math sit inside the same ``torch.library`` custom ops
(fastvit::attention_fwd / attention_bwd), save the same tensors (q, k, v, out, lse, the table and the seed) and do
the same backward math; the fallback hashes (seed, element index) in torch integer ops for its dropout mask. The
``torch`` backend instead runs :func:`attention_ref` (scaled_dot_product_attention), and the ``flash`` backend the
flash_attn package when it is installed.
"""
import dataclasses
import functools
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastvit.kernels._launch import (KERNEL_DTYPES, PlannedLaunch, Plans, accumulation_dtype, apply, autocast_off,
                                     cdiv, device_arch, eager_op, next_power_of_2,
                                     plans_apply)
from fastvit.kernels._report import TORCH_DTYPES, spec_from_launch

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels keep scores and the log-sum-exp in log2 units (exp2 is cheaper)
_LN2 = tl.constexpr(0.6931471805599453)  # back to natural log for the saved log-sum-exp
MAX_HEAD_DIM = 128


def num_relative_positions(grid_size, class_token=True):
    """Size of the per-head bias table: every 2D offset between two patches, plus 3 class-token entries."""
    gh, gw = grid_size
    return (2 * gh - 1) * (2 * gw - 1) + (3 if class_token else 0)


def relative_position_index(grid_size, class_token=True, device=None):
    """(N, N) index into the bias table for query i, key j, tokens in raster order (BEiT's layout)."""
    gh, gw = grid_size
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + gh - 1
    dx = xs[:, None] - xs[None, :] + gw - 1
    index = dy * (2 * gw - 1) + dx
    if class_token:
        r = (2 * gh - 1) * (2 * gw - 1)
        index = F.pad(index, (1, 0, 1, 0))
        index[0, :] = r          # class -> patch
        index[:, 0] = r + 1      # patch -> class
        index[0, 0] = r + 2      # class -> class
    return index


def relative_bias_dense(rel_bias, grid_size, n):
    """Expand the (heads, R) table to the (heads, N, N) additive bias the torch path feeds to SDPA."""
    index = relative_position_index(grid_size, n == grid_size[0] * grid_size[1] + 1, rel_bias.device)
    return rel_bias[:, index]


def attention_ref(q, k, v, rel_bias=None, grid_size=None, dropout_p=0.0, scale=None):
    """Torch reference: scaled_dot_product_attention with the dense bias as its mask."""
    mask = None
    if rel_bias is not None:
        mask = relative_bias_dense(rel_bias, grid_size, q.shape[-2]).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration

class _Blocks(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class _Config(NamedTuple):
    block_d: int
    fwd: _Blocks
    bwd_dkdv: _Blocks
    bwd_dq: _Blocks
    preprocess: _Blocks


def _blocks(block_d):
    """Block sizes and warps of every attention kernel at a padded head dim ``block_d`` (the defaults).

    The head dim is padded to a power of two in registers (BLOCK_D). Chosen so that no kernel spills on sm_80 or
    sm_90 in any variant (bias table, dropout; checked by bench/kernel_report.py): 8 warps throughout, at
    BLOCK_D = 128 (head dim 80/96/128) tiles of 64 x 64 or less, and 32 keys per dK/dV program at BLOCK_D = 64,
    since 64 keys with bias and dropout spill on sm_80 (sm_90 takes :data:`_DKDV_HOPPER` instead:
    :func:`backward_tiles`). The forward's alternatives are in :data:`_FWD_ALTERNATIVES`.
    """
    if block_d <= 64:
        return _Config(block_d, fwd=_Blocks(128, 64, 8, 2), bwd_dkdv=_Blocks(64, 32, 8, 2),
                       bwd_dq=_Blocks(128, 32, 8, 2), preprocess=_Blocks(128, 0, 4, 1))
    return _Config(block_d, fwd=_Blocks(64, 32, 8, 2), bwd_dkdv=_Blocks(32, 64, 8, 2),
                   bwd_dq=_Blocks(64, 32, 8, 2), preprocess=_Blocks(64, 0, 4, 1))


# dK/dV tiles on Hopper and newer at a padded head dim up to 64 (queries per step, keys per program, warps, stages).
# Keys lie along the MMA's M dimension, and Hopper's warpgroup MMA (wgmma) takes at least 64 rows per warpgroup:
# _blocks' 32 keys on 8 warps compile to the older mma.sync there (bench/kernel_report.py's "mma" column). Each of
# these compiles to wgmma without spills in every variant (bias, dropout) on sm_90. The default, 128 keys over two
# warpgroups and 32-query steps, pads 197 queries to 224 (64-query steps: 256); the others are what a measured
# backend="auto" may pick instead (``fastvit.ops.attention_backend``).
_DKDV_HOPPER = (_Blocks(32, 128, 8, 2), _Blocks(32, 64, 4, 2), _Blocks(64, 64, 8, 2), _Blocks(64, 128, 8, 2))

# built once for every BLOCK_D a supported head dim pads to: _config runs on every launch
_CONFIGS = {block_d: _blocks(block_d) for block_d in (16, 32, 64, 128)}


def _config(head_dim):
    """The :func:`_blocks` of ``head_dim``; the launchers and aot_specs use this."""
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention supports head_dim 1 to {MAX_HEAD_DIM}, got {head_dim}")
    return _CONFIGS[max(next_power_of_2(head_dim), 16)]


@functools.lru_cache(maxsize=None)
def backward_tiles(head_dim, arch):
    """The dK/dV kernel's tile choices at ``head_dim`` on compute capability ``arch`` (:func:`device_arch`): the
    default first (``bwd_tiles`` indexes this). Before Hopper, and at padded head dims above 64 (whose 64-key tiles
    are wgmma already), only :func:`_blocks`'."""
    cfg = _config(head_dim)
    if arch >= 90 and cfg.block_d <= 64:
        return _DKDV_HOPPER
    return (cfg.bwd_dkdv,)


# Forward tiles that backend="auto" also times on a GPU (``fastvit.ops.attention_backend``), by padded head dim up
# to 64 / above: a 64-query tile on 4 warps (twice the programs, for small batches), a third pipeline stage, and
# 32-key steps (197 keys pad to 224 instead of 256); above 64 (ViT-H/14's 80), 64-key steps and 128-query tiles too,
# clean since the table is always fp32 (a 16-bit one spilled them). Each compiles without spills in every variant
# (bias, dropout) on sm_80 and sm_90, with triton 3.6 and 3.8; at BLOCK_D = 128 a 64 x 64 tile on 4 warps, a
# 128 x 64 tile, or a third stage with 64 keys do not.
_FWD_ALTERNATIVES = {64: (_Blocks(64, 64, 4, 2), _Blocks(128, 64, 8, 3), _Blocks(128, 32, 8, 2)),
                     128: (_Blocks(64, 32, 8, 3), _Blocks(64, 64, 8, 2), _Blocks(128, 32, 8, 2), _Blocks(64, 32, 4, 2))}


@functools.lru_cache(maxsize=None)
def forward_tiles(head_dim):
    """The forward kernel's tile choices at ``head_dim``: the default (:func:`_blocks`) first, then the alternatives
    a measured choice may pick (``fwd_tiles`` indexes this)."""
    cfg = _config(head_dim)
    return (cfg.fwd, *_FWD_ALTERNATIVES[64 if cfg.block_d <= 64 else 128])


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels

@triton.jit
def _grid_pos(tokens, grid_w, HAS_CLS: tl.constexpr):
    """(row, col) of each token on the patch grid; the class token (index 0 with HAS_CLS) maps to (0, 0)."""
    if HAS_CLS:
        patch = tl.maximum(tokens - 1, 0)
    else:
        patch = tokens
    return patch // grid_w, patch % grid_w


@triton.jit
def _rel_index(q_tok, q_y, q_x, k_tok, k_y, k_x, grid_h, grid_w, HAS_CLS: tl.constexpr):
    """Table index of each (query, key) pair, as relative_position_index; arguments broadcast to the tile."""
    idx = (q_y - k_y + grid_h - 1) * (2 * grid_w - 1) + (q_x - k_x + grid_w - 1)
    if HAS_CLS:
        n_rel = (2 * grid_h - 1) * (2 * grid_w - 1)
        k_cls = k_tok == 0
        idx = tl.where(q_tok == 0, tl.where(k_cls, n_rel + 2, n_rel), tl.where(k_cls, n_rel + 1, idx))
    return idx


@triton.jit
def _bias_log2(TABLE, q_tok, q_y, q_x, k_tok, k_y, k_x, grid_h, grid_w, mask, HAS_CLS: tl.constexpr):
    """(the relative-position bias of each (query, key) pair of a tile in log2 units, its table index)."""
    idx = _rel_index(q_tok, q_y, q_x, k_tok, k_y, k_x, grid_h, grid_w, HAS_CLS)
    return tl.load(TABLE + idx, mask=mask, other=0.0).to(tl.float32) * _LOG2E, idx


@triton.jit
def _program_block(seq_len, n_heads, BLOCK: tl.constexpr):
    """(batch * head, batch, head, token offsets) of this program's block: one program per (block of BLOCK tokens,
    batch * head), the blocks of one head adjacent so that they share K and V in L2."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(seq_len, BLOCK)
    bh = pid // n_blocks
    return bh, (bh // n_heads).to(tl.int64), bh % n_heads, (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _tile(X, b, h, offs, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Pointers to the (tokens, head dim) tile of X[b, h] at token offsets ``offs``."""
    return X + b * stride_b + h * stride_h + offs[:, None] * stride_n + offs_d[None, :] * stride_d


@triton.jit
def _dropout_rows(bh, seq_len, offs_m):
    """Philox counters of each query row's first key: the dropout draw of (bh, i, j) is rand(seed, row_i + j)."""
    return (bh * seq_len + offs_m).to(tl.int64) * seq_len


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, TABLE, SEED,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_on, stride_od,
                     n_heads, seq_len, n_table, qk_scale, grid_h, grid_w, dropout_p,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, DROPOUT: tl.constexpr,
                     PRECISION: tl.constexpr):
    # Inductor passes Python floats to a kernel it compiles as fp64 (Triton: fp32): fp64 scores would fail tl.dot
    qk_scale, dropout_p = tl.cast(qk_scale, tl.float32), tl.cast(dropout_p, tl.float32)
    bh, b, h, offs_m = _program_block(seq_len, n_heads, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    d_mask = offs_d < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd), mask=q_mask, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    if HAS_BIAS:
        TABLE += h * n_table
        q_y, q_x = _grid_pos(offs_m, grid_w, HAS_CLS)
    if DROPOUT:
        seed = tl.load(SEED)
        rows = _dropout_rows(bh, seq_len, offs_m)
    # scores are kept in log2 units (times log2(e)) so the exponentials are exp2
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            k_y, k_x = _grid_pos(offs_n, grid_w, HAS_CLS)
            bias, _ = _bias_log2(TABLE, offs_m[:, None], q_y[:, None], q_x[:, None], offs_n[None, :], k_y[None, :],
                                 k_x[None, :], grid_h, grid_w, m_mask[:, None] & n_mask[None, :], HAS_CLS)
            s += bias
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if DROPOUT:
            # the normaliser l_i sums the kept and the dropped probabilities; only the output drops
            p = tl.where(tl.rand(seed, rows[:, None] + offs_n[None, :]) >= dropout_p, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    tl.store(LSE + bh * seq_len + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=m_mask)
    tl.store(_tile(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od), acc.to(O.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(O, DO, DELTA,
                                stride_ob, stride_oh, stride_on, stride_od,
                                stride_dob, stride_doh, stride_don, stride_dod,
                                n_heads, seq_len,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id O_id, the row term of dS = P * (dP - delta)."""
    bh, b, h, offs_m = _program_block(seq_len, n_heads, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_tile(O, b, h, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od), mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(_tile(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod), mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh * seq_len + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq_len)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TABLE, SEED,
                          stride_qb, stride_qh, stride_qn, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_don, stride_dod,
                          stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          n_heads, seq_len, n_table, sm_scale, qk_scale, grid_h, grid_w, dropout_p,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr,
                          DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """One block of keys: dV = P^T dO and dK = scale * dS^T Q summed over every query block.

    Tiles are transposed (keys along rows) so that dV and dK accumulate without transposing P or dS. With
    dropout, Z = keep / (1 - p) multiplies P in dV and dP in dS (the forward used P * Z).
    """
    # Inductor passes Python floats to a kernel it compiles as fp64 (Triton: fp32): fp64 scores would fail tl.dot
    sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    bh, b, h, offs_n = _program_block(seq_len, n_heads, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seq_len
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(_tile(K, b, h, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd), mask=kv_mask, other=0.0)
    v = tl.load(_tile(V, b, h, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd), mask=kv_mask, other=0.0)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * seq_len
    DELTA += bh * seq_len
    if HAS_BIAS:
        TABLE += h * n_table
        k_y, k_x = _grid_pos(offs_n, grid_w, HAS_CLS)
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_len
        qt = tl.load(Q + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=m_mask[None, :] & d_mask[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=m_mask, other=0.0) * _LOG2E
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            q_y, q_x = _grid_pos(offs_m, grid_w, HAS_CLS)
            bias, _ = _bias_log2(TABLE, offs_m[None, :], q_y[None, :], q_x[None, :], offs_n[:, None], k_y[:, None],
                                 k_x[:, None], grid_h, grid_w, n_mask[:, None] & m_mask[None, :], HAS_CLS)
            st += bias
        pt = tl.where(m_mask[None, :], tl.exp2(st - lse[None, :]), 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep = tl.rand(seed, _dropout_rows(bh, seq_len, offs_m)[None, :] + offs_n[:, None]) >= dropout_p
            dv = tl.dot(tl.where(keep, pt * keep_scale, 0.0).to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.where(keep, dpt * keep_scale, 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(DELTA + offs_m, mask=m_mask, other=0.0)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    tl.store(_tile(DK, b, h, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd),
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile(DV, b, h, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, TABLE, DTABLE, SEED,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_don, stride_dod,
                        stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                        n_heads, seq_len, n_table, sm_scale, qk_scale, grid_h, grid_w, dropout_p,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr,
                        DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """One block of queries: dQ = scale * dS K over every key block; dS is also the bias gradient, which is
    added into the fp32 (heads, R) table gradient entry by entry."""
    # Inductor passes Python floats to a kernel it compiles as fp64 (Triton: fp32): fp64 scores would fail tl.dot
    sm_scale, qk_scale = tl.cast(sm_scale, tl.float32), tl.cast(qk_scale, tl.float32)
    dropout_p = tl.cast(dropout_p, tl.float32)
    bh, b, h, offs_m = _program_block(seq_len, n_heads, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    d_mask = offs_d < HEAD_DIM
    q_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(_tile(Q, b, h, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd), mask=q_mask, other=0.0)
    do = tl.load(_tile(DO, b, h, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod), mask=q_mask,
                 other=0.0)
    lse = tl.load(LSE + bh * seq_len + offs_m, mask=m_mask, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh * seq_len + offs_m, mask=m_mask, other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    if HAS_BIAS:
        TABLE += h * n_table
        DTABLE += h * n_table
        q_y, q_x = _grid_pos(offs_m, grid_w, HAS_CLS)
    if DROPOUT:
        seed = tl.load(SEED)
        keep_scale = 1.0 / (1.0 - dropout_p)
        rows = _dropout_rows(bh, seq_len, offs_m)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        if HAS_BIAS:
            k_y, k_x = _grid_pos(offs_n, grid_w, HAS_CLS)
            tile_mask = m_mask[:, None] & n_mask[None, :]
            bias, idx = _bias_log2(TABLE, offs_m[:, None], q_y[:, None], q_x[:, None], offs_n[None, :],
                                   k_y[None, :], k_x[None, :], grid_h, grid_w, tile_mask, HAS_CLS)
            s += bias
        p = tl.where(n_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(tl.rand(seed, rows[:, None] + offs_n[None, :]) >= dropout_p, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
        if HAS_BIAS:
            tl.atomic_add(DTABLE + idx, ds, mask=tile_mask, sem="relaxed")
    tl.store(_tile(DQ, b, h, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers and the torch fallback, inside the custom ops

def _precision(dtype):
    """fp32 inputs get IEEE dots (as SDPA computes fp32); fp16/bf16 run on tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_out(q):
    """The output as a (B, heads, N, hd) view of a (B, N, heads, hd) buffer: the model's
    ``out.transpose(1, 2).reshape(B, N, D)`` is then free."""
    return q.new_empty_strided(*_out_layout(q))  # one call: ~2 us less than a permute


def _out_layout(q):
    """(size, stride) of :func:`_new_out`'s output."""
    b, h, n, d = q.shape
    return (b, h, n, d), (n * h * d, d, h * d, 1)


def _has_cls(n, grid_h, grid_w):
    return n == grid_h * grid_w + 1


def _scores(q, k, rel_bias, grid_h, grid_w, scale):
    """fp32 (B, heads, N, N) scores q k^T * scale + B_rel of the fallback."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if rel_bias is not None:
        s = s + relative_bias_dense(rel_bias.float(), (grid_h, grid_w), q.shape[-2])
    return s


_MASK32 = 0xFFFFFFFF


def _mul32(x, m):
    """(x * m) mod 2^32 for int64 tensors x < 2^32 and a 32-bit constant m, in two 16-bit halves of m so that no
    product leaves int64."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x):
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability about 1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _dropout_scale(seed, shape, dropout_p, device):
    """Fallback dropout: keep / (1 - p), keep from a hash of (seed, element index), so that the backward
    regenerates the forward's mask (the Triton kernels instead hash (seed, bh, i, j) with Philox). Tensor ops
    only: the seed never goes to the host, so torch.compile traces the fallback into its graph."""
    index = torch.arange(shape.numel(), device=device, dtype=torch.int64).view(shape)
    key = _mix32((seed ^ (seed >> 32)) & _MASK32)
    bits = _mix32(_mix32((index & _MASK32) ^ key) ^ (index >> 32))
    uniform = (bits >> 8).to(torch.float32) * 2.0 ** -24  # 24 random bits: exact in fp32, in [0, 1)
    return (uniform >= dropout_p) / (1.0 - dropout_p)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _fallback_fwd(q, k, v, rel_bias, seed, grid_h, grid_w, scale, dropout_p):
    """(out, lse) by torch: without a bias or dropout on CPU, PyTorch's CPU flash kernel (what SDPA runs there:
    the same two outputs, out in :func:`_new_out`'s layout, and no N x N scores in memory); otherwise fp32 scores,
    softmax and product as the kernels compute them (run with autocast off, which would round these products to 16
    bits, also where torch.compile traces a backward under the forward's autocast)."""
    if (rel_bias is None and dropout_p == 0 and q.device.type == "cpu" and q.dtype in KERNEL_DTYPES
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.numel()):  # 0 tokens: SIGFPE in torch 2.14
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.contiguous()  # it lays lse out as (B, N, heads); the op's contract is (B, heads, N)
    out = _new_out(q)
    s = _scores(q, k, rel_bias, grid_h, grid_w, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if dropout_p > 0:
        p = p * _dropout_scale(seed, p.shape, dropout_p, q.device)
    out.copy_(torch.matmul(p, v.float()))
    return out, lse


def _fallback_bwd(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p):
    """The backward's torch math (fp32 inside, autocast off as for :func:`_fallback_fwd`): attention_bwd's outputs.
    The (B, heads, N, N) products are updated in place (they are this function's own): fewer such buffers."""
    _, heads, n, _ = q.shape
    q32, k32, do32 = q.float(), k.float(), do.float()
    p = _scores(q32, k32, rel_bias, grid_h, grid_w, scale).sub_(lse[..., None]).exp_()
    dp = torch.matmul(do32, v.float().transpose(-1, -2))
    if dropout_p > 0:
        z = _dropout_scale(seed, p.shape, dropout_p, q.device)
        dv = torch.matmul((p * z).transpose(-1, -2), do32)
        dp.mul_(z)
    else:
        dv = torch.matmul(p.transpose(-1, -2), do32)
    # rowsum(dO * O) = rowsum(P * dP) also with dropout, since O = (P * Z) V
    ds = dp.sub_((do32 * out.float()).sum(-1, keepdim=True)).mul_(p)
    dq = torch.matmul(ds, k32).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), q32).mul_(scale)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    if rel_bias is None:
        return (*grads, q.new_empty(0))
    index = relative_position_index((grid_h, grid_w), _has_cls(n, grid_h, grid_w), q.device).flatten()
    dtable = torch.zeros(rel_bias.shape, dtype=torch.float32, device=q.device)
    dtable.index_add_(1, index, ds.sum(0).reshape(heads, n * n))
    return (*grads, dtable.to(rel_bias.dtype))


@eager_op("attention_fwd")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_bias: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], grid_h: int, grid_w: int, scale: float, dropout_p: float,
                  use_triton: bool, fwd_tiles: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, heads, N, hd) in q's dtype, lse the fp32 (B, heads, N) row log-sum-exp of the
    scores (natural log, before dropout), the one statistic the backward needs. ``seed`` is a one-element int64
    tensor when ``dropout_p`` > 0, else None. ``fwd_tiles`` picks the kernel's tiles from :func:`forward_tiles`."""
    bsz, heads, n, hd = q.shape
    if not use_triton:
        with autocast_off(q.device.type):
            return _fallback_fwd(q, k, v, rel_bias, seed, grid_h, grid_w, scale, dropout_p)
    if not plans_apply(q):
        return _Forward(q, rel_bias, grid_h, grid_w, scale, dropout_p, fwd_tiles, False)(q, k, v, rel_bias, seed)
    key = (q.shape, q.stride(), q.dtype, k.shape, k.stride(), k.dtype, v.shape, v.stride(), v.dtype,
           None if rel_bias is None else (rel_bias.shape, rel_bias.stride(), rel_bias.dtype),
           None if seed is None else seed.dtype, grid_h, grid_w, scale, dropout_p, fwd_tiles, q.device)
    plan = _FORWARDS.get(key)
    if plan is None:
        plan = _FORWARDS.keep(key, _Forward(q, rel_bias, grid_h, grid_w, scale, dropout_p, fwd_tiles, True))
    return plan(q, k, v, rel_bias, seed)


class _Forward:
    """What :func:`attention_fwd` does on the kernels for one signature of its arguments: the outputs'
    allocations and the forward kernel's launch (``bindable``: a plan kept for later calls, see
    ``_launch.Plans``)."""

    def __init__(self, q, rel_bias, grid_h, grid_w, scale, dropout_p, fwd_tiles, bindable):
        bsz, heads, n, hd = q.shape
        # allocation sizes as tuples: a torch.Size argument costs ~0.5 us more host time to parse
        (self.out_size, self.out_stride), self.lse_size = _out_layout(q), (bsz, heads, n)
        blk = forward_tiles(hd)[fwd_tiles]
        flags = dict(HEAD_DIM=hd, BLOCK_D=_config(hd).block_d, BLOCK_M=blk.block_m, BLOCK_N=blk.block_n,
                     HAS_BIAS=rel_bias is not None, HAS_CLS=_has_cls(n, grid_h, grid_w), DROPOUT=dropout_p > 0,
                     PRECISION=_precision(q.dtype), num_warps=blk.num_warps, num_stages=blk.num_stages)
        self.launch = PlannedLaunch(_attn_fwd_kernel, (bsz * heads * cdiv(n, blk.block_m),), flags, bindable)
        self.scalars = (heads, n, (q if rel_bias is None else rel_bias).shape[-1], scale * LOG2E, grid_h, grid_w,
                        dropout_p)
        self.empty = q.numel() == 0

    def __call__(self, q, k, v, rel_bias, seed):
        out = q.new_empty_strided(self.out_size, self.out_stride)
        lse = q.new_empty(self.lse_size, dtype=torch.float32)
        if self.empty:
            return out, lse
        table = q if rel_bias is None else rel_bias
        inputs = (q, k, v, table) if seed is None else (q, k, v, table, seed)
        self.launch((q, k, v, out, lse, table, lse if seed is None else seed), inputs,
                    lambda: (*_strides(q, k, v, out), *self.scalars))
        return out, lse


_FORWARDS = Plans()


@attention_fwd.register_fake
def _(q, k, v, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton, fwd_tiles=0):
    return _new_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@eager_op("attention_bwd")
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, rel_bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], grid_h: int,
                  grid_w: int, scale: float, dropout_p: float, use_triton: bool,
                  bwd_tiles: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d rel_bias) from the saved q, k, v, out and lse; P is recomputed as exp(scores - lse) and the
    dropout mask from the seed. d rel_bias is empty when rel_bias is None. ``bwd_tiles`` picks the dK/dV kernel's
    tiles from :func:`backward_tiles`.
    """
    if not use_triton:
        with autocast_off(q.device.type):
            return _fallback_bwd(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dtable = _launch_bwd(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p, bwd_tiles, dq, dk,
                         dv)
    return dq, dk, dv, dtable


def _launch_bwd(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p, bwd_tiles, dq, dk, dv):
    """The backward kernels, writing dq, dk, dv into the given (B, heads, N, hd) tensors, which may be strided views
    (of one packed gradient: :func:`attention_bwd_qkv`); returns d rel_bias (empty when rel_bias is None)."""
    if not plans_apply(q):
        plan = _Backward(q, rel_bias, grid_h, grid_w, scale, dropout_p, bwd_tiles, False)
        return plan(do, q, k, v, out, lse, rel_bias, seed, dq, dk, dv)
    key = (do.shape, do.stride(), do.dtype, q.shape, q.stride(), q.dtype, k.shape, k.stride(), k.dtype, v.shape,
           v.stride(), v.dtype, out.shape, out.stride(), out.dtype, lse.dtype,
           None if rel_bias is None else (rel_bias.shape, rel_bias.stride(), rel_bias.dtype),
           None if seed is None else seed.dtype, grid_h, grid_w, scale, dropout_p, bwd_tiles,
           dq.stride(), dq.dtype, dk.stride(), dk.dtype, dv.stride(), dv.dtype, q.device)
    plan = _BACKWARDS.get(key)
    if plan is None:
        plan = _BACKWARDS.keep(key, _Backward(q, rel_bias, grid_h, grid_w, scale, dropout_p, bwd_tiles, True))
    return plan(do, q, k, v, out, lse, rel_bias, seed, dq, dk, dv)


class _Backward:
    """What :func:`_launch_bwd` does for one signature of its arguments: its allocations and the three kernels'
    launches (as :class:`_Forward`)."""

    def __init__(self, q, rel_bias, grid_h, grid_w, scale, dropout_p, bwd_tiles, bindable):
        bsz, heads, n, hd = q.shape
        self.delta_size = (bsz, heads, n)  # a tuple: see _Forward
        cfg = _config(hd)
        blk = cfg.preprocess
        self.preprocess = PlannedLaunch(
            _attn_bwd_preprocess_kernel, (bsz * heads * cdiv(n, blk.block_m),),
            dict(HEAD_DIM=hd, BLOCK_D=cfg.block_d, BLOCK_M=blk.block_m, num_warps=blk.num_warps,
                 num_stages=blk.num_stages), bindable)
        common = dict(HEAD_DIM=hd, BLOCK_D=cfg.block_d, HAS_BIAS=rel_bias is not None,
                      HAS_CLS=_has_cls(n, grid_h, grid_w), DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype))
        blk = backward_tiles(hd, device_arch(q.device))[bwd_tiles]
        self.dkdv = PlannedLaunch(
            _attn_bwd_dkdv_kernel, (bsz * heads * cdiv(n, blk.block_n),),
            dict(BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, num_warps=blk.num_warps, num_stages=blk.num_stages,
                 **common), bindable)
        blk = cfg.bwd_dq
        self.dq = PlannedLaunch(
            _attn_bwd_dq_kernel, (bsz * heads * cdiv(n, blk.block_m),),
            dict(BLOCK_M=blk.block_m, BLOCK_N=blk.block_n, num_warps=blk.num_warps, num_stages=blk.num_stages,
                 **common), bindable)
        self.scalars = (heads, n, (q if rel_bias is None else rel_bias).shape[-1], scale, scale * LOG2E, grid_h,
                        grid_w, dropout_p)
        self.empty = q.numel() == 0

    def __call__(self, do, q, k, v, out, lse, rel_bias, seed, dq, dk, dv):
        dtable = None if rel_bias is None else torch.zeros_like(rel_bias, dtype=torch.float32,
                                                                memory_format=torch.contiguous_format)
        if self.empty:
            return q.new_empty(0) if rel_bias is None else dtable.to(rel_bias.dtype)
        delta = q.new_empty(self.delta_size, dtype=torch.float32)
        self.preprocess((out, do, delta), (out, do), lambda: (*_strides(out, do), *self.scalars[:2]))
        table = q if rel_bias is None else rel_bias
        seed = lse if seed is None else seed
        dtable_arg = lse if dtable is None else dtable
        inputs = (q, k, v, do, lse, table, seed)
        self.dkdv((q, k, v, do, lse, delta, dk, dv, table, seed), (*inputs, dk, dv),
                  lambda: (*_strides(q, k, v, do, dk, dv), *self.scalars))
        self.dq((q, k, v, do, lse, delta, dq, table, dtable_arg, seed), (*inputs, dq),
                lambda: (*_strides(q, k, v, do, dq), *self.scalars))
        return q.new_empty(0) if rel_bias is None else dtable.to(rel_bias.dtype)


_BACKWARDS = Plans()


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton, bwd_tiles=0):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    return (*grads, q.new_empty(0) if rel_bias is None else torch.empty_like(rel_bias))


def split_qkv(qkv):
    """q, k, v as (B, heads, N, hd) strided views of a packed (B, N, 3, heads, hd) tensor (no copies)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@eager_op("attention_bwd_qkv")
def attention_bwd_qkv(do: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      rel_bias: Optional[torch.Tensor], seed: Optional[torch.Tensor], grid_h: int, grid_w: int,
                      scale: float, dropout_p: float, use_triton: bool,
                      bwd_tiles: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(d qkv, d rel_bias) for q, k, v packed in ``qkv`` (B, N, 3, heads, hd): :func:`attention_bwd` with the
    kernels writing dq, dk, dv straight into their slots of one gradient of qkv's layout. Split by autograd, the
    three gradients would be stacked and then copied into that layout: two passes over the gradient that took 89 of
    the 1577 ms of kernel time of the H200's B/16 training step (profile.json). The fallback copies its three in."""
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    grads = split_qkv(dqkv)
    q, k, v = split_qkv(qkv)
    if not use_triton:
        with autocast_off(q.device.type):
            *parts, dtable = _fallback_bwd(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p)
        for grad, part in zip(grads, parts):
            grad.copy_(part)
        return dqkv, dtable
    return dqkv, _launch_bwd(do, q, k, v, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p, bwd_tiles,
                             *grads)


@attention_bwd_qkv.register_fake
def _(do, qkv, out, lse, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton, bwd_tiles=0):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), (
        qkv.new_empty(0) if rel_bias is None else torch.empty_like(rel_bias))


class FlashAttentionFn(torch.autograd.Function):
    """Autograd for softmax(q k^T * scale + B_rel) v; saves q, k, v (views, no copies), out, lse, the table and
    the dropout seed."""

    @staticmethod
    def forward(ctx, q, k, v, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton, fwd_tiles=0,
                bwd_tiles=0):
        out, lse = attention_fwd(q, k, v, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton, fwd_tiles)
        ctx.save_for_backward(q, k, v, out, lse, rel_bias, seed)
        ctx.args = (grid_h, grid_w, scale, dropout_p, use_triton)
        ctx.bwd_tiles = bwd_tiles
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, rel_bias, seed = ctx.saved_tensors
        if torch.is_grad_enabled():
            dq, dk, dv, dtable = _recorded_backward(do, q, k, v, rel_bias, seed, *ctx.args)
        else:
            *args, use_triton = ctx.args
            dq, dk, dv, dtable = attention_bwd(do, q, k, v, out, lse, rel_bias, seed, *args,
                                               _backward_on_kernels(use_triton, rel_bias, args[3]), ctx.bwd_tiles)
        return dq, dk, dv, (None if rel_bias is None else dtable), *[None] * 8


class FlashAttentionQKVFn(torch.autograd.Function):
    """:class:`FlashAttentionFn` for q, k, v packed in one (B, N, 3, heads, hd) tensor, as the qkv projection
    returns them: saves that tensor instead of three views of it, and returns its gradient in one piece
    (:func:`attention_bwd_qkv`)."""

    @staticmethod
    def forward(ctx, qkv, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton, fwd_tiles=0, bwd_tiles=0):
        out, lse = attention_fwd(*split_qkv(qkv), rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton,
                                 fwd_tiles)
        ctx.save_for_backward(qkv, out, lse, rel_bias, seed)
        ctx.args = (grid_h, grid_w, scale, dropout_p, use_triton)
        ctx.bwd_tiles = bwd_tiles
        return out

    @staticmethod
    def backward(ctx, do):
        qkv, out, lse, rel_bias, seed = ctx.saved_tensors
        if torch.is_grad_enabled():
            views = split_qkv(qkv)
            *grads, dtable = _recorded_backward(do, *views, rel_bias, seed, *ctx.args)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, views)]
            dqkv = torch.stack(grads, 0).permute(1, 3, 0, 2, 4)  # (3, B, heads, N, hd) -> qkv's layout
        else:
            *args, use_triton = ctx.args
            dqkv, dtable = attention_bwd_qkv(do, qkv, out, lse, rel_bias, seed, *args,
                                             _backward_on_kernels(use_triton, rel_bias, args[3]), ctx.bwd_tiles)
        return dqkv, (None if rel_bias is None else dtable), *[None] * 8


def _backward_on_kernels(use_triton, rel_bias, dropout_p) -> bool:
    """Whether the backward runs the kernels (as the forward did, ``use_triton``). Their table gradient is a sum of
    atomic adds, whose order (so the fp32 rounding) varies from run to run: under
    ``torch.use_deterministic_algorithms(True)`` the fallback computes the backward instead (dense, its table
    gradient by index_add, which torch makes deterministic there). With dropout it cannot (its mask is not the
    kernels'), so that raises as torch's nondeterministic ops do, or warns with ``warn_only=True``."""
    if not (use_triton and rel_bias is not None and torch.are_deterministic_algorithms_enabled()):
        return use_triton
    if dropout_p == 0:
        return False
    message = ("the Triton attention backward accumulates the relative-position table gradient by atomic adds, "
               "which is not deterministic, and with attention dropout there is no deterministic fallback; "
               "torch.use_deterministic_algorithms(True) was set: use attn_drop_rate=0 or backend='torch'")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(message)
    warnings.warn(message, stacklevel=3)
    return True


def _recorded_backward(do, q, k, v, rel_bias, seed, grid_h, grid_w, scale, dropout_p, use_triton):
    """(dq, dk, dv, d rel_bias) for a backward that autograd records (``create_graph=True``): autograd through the
    fallback's math, P = softmax(scores) recomputed from q and k. ``attention_bwd`` would read P off the saved lse,
    which enters the graph as a constant, so a second derivative would lose P's dependence on q, k and the table."""
    if dropout_p > 0 and use_triton:
        raise NotImplementedError(
            "backward with create_graph=True through attention dropout is not supported on the Triton kernels (their "
            "Philox dropout mask has no torch counterpart); use attn_drop_rate=0 or backend='torch'")
    inputs = (q, k, v, rel_bias)
    with autocast_off(q.device.type):  # fp32 math, as in _fallback_fwd, and so its derivatives
        p = torch.softmax(_scores(q, k, rel_bias, grid_h, grid_w, scale), -1)
        if dropout_p > 0:
            p = p * _dropout_scale(seed, p.shape, dropout_p, q.device)
        out = torch.matmul(p, v.float()).to(q.dtype)
        grads = iter(torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], do,
                                         create_graph=True))
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in inputs)


# ----------------------------------------------------------------------------------------------------------------
# Entry points

def _check_inputs(q, k, v, rel_bias, grid_size, dropout_p):
    """Validate shapes and dropout_p; returns (grid_h, grid_w), (0, 0) without a bias."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, heads, N, head_dim) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if rel_bias is None:
        return 0, 0
    if grid_size is None:
        raise ValueError("rel_bias needs grid_size=(gh, gw), the patch grid its table is laid over")
    gh, gw = grid_size
    _, heads, n, _ = q.shape
    if n not in (gh * gw, gh * gw + 1):
        raise ValueError(f"with grid_size {tuple(grid_size)} N must be {gh * gw} or {gh * gw + 1} (class token), "
                         f"got {n}")
    expected = (heads, num_relative_positions((gh, gw), n == gh * gw + 1))
    if tuple(rel_bias.shape) != expected:
        raise ValueError(f"rel_bias must have shape {expected}, got {tuple(rel_bias.shape)}")
    return gh, gw


def triton_supported(q):
    """Whether the Triton kernels cover this call's inputs: fp32/fp16/bf16 and head_dim <= 128."""
    return q.dtype in KERNEL_DTYPES and 0 < q.shape[-1] <= MAX_HEAD_DIM


def _check_tiles(q, fwd_tiles, bwd_tiles):
    hd = q.shape[-1]
    for name, index, choices in (("fwd_tiles", fwd_tiles, len(forward_tiles(hd))),
                                 ("bwd_tiles", bwd_tiles, len(backward_tiles(hd, device_arch(q.device))))):
        if not 0 <= index < choices:
            raise ValueError(f"{name} must be in 0..{choices - 1} at head_dim {hd} on this device, got {index}")


def flash_attention(q, k, v, rel_bias=None, grid_size=None, scale=None, dropout_p=0.0, use_triton=True, fwd_tiles=0,
                    bwd_tiles=0):
    """dropout(softmax(q k^T * scale + B_rel)) v through the custom ops: the Triton kernels (the forward with tiles
    ``forward_tiles(head_dim)[fwd_tiles]``, the dK/dV kernel with ``backward_tiles(head_dim, arch)[bwd_tiles]``),
    or (``use_triton=False``) the torch fallback math with the same saved tensors. Returns (B, heads, N, hd) in q's
    dtype. The dropout seed is drawn from torch's generator on q's device (so torch.manual_seed repeats it)."""
    return apply(FlashAttentionFn, q, k, v, *_prepare(q, k, v, rel_bias, grid_size, scale, dropout_p, use_triton,
                                                      fwd_tiles, bwd_tiles))


def flash_attention_qkv(qkv, rel_bias=None, grid_size=None, scale=None, dropout_p=0.0, use_triton=True, fwd_tiles=0,
                        bwd_tiles=0):
    """:func:`flash_attention` of the q, k, v packed in ``qkv`` (B, N, 3, heads, hd), whose gradient comes back in
    one piece (:class:`FlashAttentionQKVFn`)."""
    return apply(FlashAttentionQKVFn, qkv, *_prepare(*split_qkv(qkv), rel_bias, grid_size, scale, dropout_p,
                                                     use_triton, fwd_tiles, bwd_tiles))


def attention_inference(q, k, v, rel_bias=None, grid_size=None, scale=None, dropout_p=0.0, use_triton=True,
                        fwd_tiles=0):
    """:func:`flash_attention` where autograd records nothing and nothing traces or profiles (eager inference,
    ``ops``): the forward op's body alone on the same checked arguments, without the autograd Function and
    custom-op layers around it."""
    prepared = _prepare(q, k, v, rel_bias, grid_size, scale, dropout_p, use_triton, fwd_tiles, 0)
    return attention_fwd.fn(q, k, v, *prepared[:-1])[0]


def _prepare(q, k, v, rel_bias, grid_size, scale, dropout_p, use_triton, fwd_tiles, bwd_tiles):
    """The checked arguments of the attention Functions after q, k, v: (rel_bias in fp32, dropout seed, grid_h,
    grid_w, scale, dropout_p, use_triton, fwd_tiles, bwd_tiles)."""
    grid_h, grid_w = _check_inputs(q, k, v, rel_bias, grid_size, dropout_p)
    if use_triton:
        if q.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton attention needs float32, float16 or bfloat16 inputs, got {q.dtype}")
        if fwd_tiles or bwd_tiles:  # the defaults exist for every call
            _check_tiles(q, fwd_tiles, bwd_tiles)
    if rel_bias is not None:
        # the bias is added in fp32: a 16-bit table (a model cast to fp16 / bf16) goes in as an exact fp32 copy, so
        # no kernel variant loads a 16-bit table (with one, ptxas serialised every attention kernel's wgmma); its
        # gradient returns through the cast
        rel_bias = rel_bias.to(accumulation_dtype(rel_bias.dtype)).contiguous()
        if torch.compiler.is_compiling():
            # torch 2.11's compile took the table as written by the kernel and copied it back into the parameter
            # (an in-place op on a leaf that requires grad: a compiled training step failed); a copy of the
            # (heads, R) table costs nothing next to the attention
            rel_bias = rel_bias.clone()
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return rel_bias, seed, grid_h, grid_w, scale, float(dropout_p), use_triton, fwd_tiles, bwd_tiles


def attention(q, k, v, rel_bias, grid_size, dropout_p, scale, use_triton, fwd_tiles=0, bwd_tiles=0):
    """Dispatch from fastvit.ops.attention: the Triton kernels (tiles ``fwd_tiles`` / ``bwd_tiles``, see
    :func:`forward_tiles` and :func:`backward_tiles`), or scaled_dot_product_attention."""
    if not use_triton:
        _check_inputs(q, k, v, rel_bias, grid_size, dropout_p)
        return attention_ref(q, k, v, rel_bias, grid_size, dropout_p, scale)
    return flash_attention(q, k, v, rel_bias, grid_size, scale, dropout_p, True, fwd_tiles, bwd_tiles)


# ----------------------------------------------------------------------------------------------------------------
# The flash_attn package (backend='flash')

@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """flash_attn.flash_attn_func, or None when the package is not installed (it is optional)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


@torch.compiler.assume_constant_result
def flash_attn_installed() -> bool:
    """Whether the flash_attn package imports. A constant to torch.compile, which would otherwise trace the import
    (the cache around it is ignored there) and, where the package is missing, break the graph at every attention
    call."""
    return _flash_attn_func() is not None


def flash_attn_supported(q, rel_bias=None):
    """Whether the flash_attn package can run this call: installed, CUDA fp16/bf16, head_dim a multiple of 8 up
    to 256, and no bias table (flash_attn takes no additive bias). Asked whether it is installed first, so that a
    compiled CPU model traces that question as a GPU one does."""
    return (flash_attn_installed() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and rel_bias is None
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def attention_flash(q, k, v, rel_bias=None, dropout_p=0.0, scale=None):
    """flash_attn_func on the (B, N, heads, hd) views of q, k, v (strided, no copies); (B, heads, N, hd) out."""
    fn = _flash_attn_func()
    if fn is None:
        raise RuntimeError("backend='flash' needs the flash_attn package (pip install flash-attn), which is not "
                           "installed; use backend='triton' or 'torch'")
    if rel_bias is not None:
        raise ValueError("backend='flash' takes no rel_bias (flash_attn has no additive bias); use 'triton'")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"backend='flash' needs CUDA float16 or bfloat16 tensors, got {q.dtype} on {q.device}")
    _check_inputs(q, k, v, None, None, dropout_p)
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time specs (bench/kernel_report.py)

def aot_specs(shape, dtype):
    """Every attention kernel at ``shape``'s head dim and tokens, in each variant a model launches: no bias, the
    relative-position table (pos_embed='rel'; always fp32, see :func:`flash_attention`), each with and without
    attention dropout; the forward also with each alternative of :func:`forward_tiles` (labelled "tiles@i"), the
    dK/dV kernel with each of :func:`backward_tiles` on the archs that run it ("bwd tiles@j"). Block sizes and warps
    come from :func:`_config` / :func:`forward_tiles` / :func:`backward_tiles`, as in the launchers.

    Arguments are those of a real launch, so the specs specialise as the JIT does: q, k, v are views of the packed
    (B, N, 3, heads, hd) qkv output, strides (3ND, hd, 3D, 1); out is a (B, N, heads, hd) buffer seen as
    (B, heads, N, hd), strides (ND, hd, D, 1), and so is dO, the proj GEMM's input gradient viewed back through
    ``out.transpose(1, 2).reshape``; dq, dk, dv are contiguous, strides (heads N hd, N hd, hd, 1). D and hd being
    multiples of 16, every stride but the unit head-dim one (the constexpr 1) is aligned, and so are n_heads = 16
    and the 16 x 16 grid of ViT-H/14. The batch size enters no argument.
    """
    cfg = _config(shape.head_dim)
    act, hd, n, heads, dim = f"*{dtype}", shape.head_dim, shape.tokens, shape.heads, shape.dim
    grid = shape.img_size // shape.patch
    scale = hd ** -0.5
    strides = {"q": (3 * n * dim, hd, 3 * dim, 1), "o": (n * dim, hd, dim, 1), "dq": (heads * n * hd, n * hd, hd, 1)}
    strides.update(k=strides["q"], v=strides["q"], do=strides["o"], dk=strides["dq"], dv=strides["dq"])
    base = {"O": act, "DO": act, "DELTA": "*fp32", "n_heads": heads, "seq_len": n,
            **{f"stride_{t}{axis}": v for t, st in strides.items() for axis, v in zip("bhnd", st)}}
    blk = cfg.preprocess
    specs = [spec_from_launch("attn_bwd_preprocess", _attn_bwd_preprocess_kernel, base,
                              {"HEAD_DIM": hd, "BLOCK_D": cfg.block_d, "BLOCK_M": blk.block_m}, blk.num_warps,
                              blk.num_stages, f"hd={hd} N={n}")]
    for table_t in (None, "*fp32"):
        for dropout in (False, True):
            has_bias = table_t is not None
            parts = ([f"bias({table_t[1:]})"] if has_bias else []) + (["dropout"] if dropout else [])
            # without a bias the launchers pass q as the table, lse as its gradient and a 0 x 0 grid; lse as the
            # seed without dropout
            args = {**base, "Q": act, "K": act, "V": act, "DQ": act, "DK": act, "DV": act, "LSE": "*fp32",
                    "TABLE": table_t or act, "DTABLE": "*fp32", "SEED": "*i64" if dropout else "*fp32",
                    "n_table": num_relative_positions((grid, grid), _has_cls(n, grid, grid)) if has_bias else hd,
                    "grid_h": grid if has_bias else 0, "grid_w": grid if has_bias else 0,
                    "qk_scale": scale * LOG2E, "sm_scale": scale, "dropout_p": 0.1 if dropout else 0.0}
            common = {"HEAD_DIM": hd, "BLOCK_D": cfg.block_d, "HAS_BIAS": has_bias,
                      "HAS_CLS": has_bias and _has_cls(n, grid, grid), "DROPOUT": dropout,
                      "PRECISION": _precision(TORCH_DTYPES[dtype])}
            label = f"hd={hd} N={n} " + ("+".join(parts) or "plain")
            kernels = [("attn_fwd", _attn_fwd_kernel, cfg.fwd, label, (80, 90)),
                       ("attn_bwd_dq", _attn_bwd_dq_kernel, cfg.bwd_dq, label, (80, 90))]
            kernels += [("attn_fwd", _attn_fwd_kernel, blk, f"{label} tiles@{i}", (80, 90))
                        for i, blk in enumerate(forward_tiles(hd)[1:], 1)]
            kernels += [("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, blk, variant, archs)
                        for blk, (variant, archs) in _dkdv_variants(hd, label).items()]
            for name, fn, blk, variant, archs in kernels:
                spec = spec_from_launch(name, fn, args, {**common, "BLOCK_M": blk.block_m, "BLOCK_N": blk.block_n},
                                        blk.num_warps, blk.num_stages, variant)
                specs.append(dataclasses.replace(spec, archs=archs))
    return specs


def _dkdv_variants(head_dim, label):
    """{tiles: (label, archs)} of the dK/dV kernel: each arch's :func:`backward_tiles`, labelled "bwd tiles@j" after
    the first, compiled for the archs that launch them (one spec where sm_80 and sm_90 share tiles)."""
    variants = {}
    for target in (80, 90):
        for j, blk in enumerate(backward_tiles(head_dim, target)):
            variant, archs = variants.get(blk, (f"{label} bwd tiles@{j}" if j else label, ()))
            variants[blk] = (variant, (*archs, target))
    return variants
