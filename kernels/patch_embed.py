"""Patchify + linear projection + position embedding + class token, in one pass over the image.

Forward: each program gathers its P x P x C patches straight from the image (NCHW, channels_last or any strided
view; no im2col tensor), multiplies them by the (D, C, P, P) projection with an fp32 accumulator, adds the bias and
the patch's position row, and writes rows 1..N of the (B, 1 + N, D) token buffer; the programs whose rows start
an image also write its row 0 (class token + its position row). Both operands are rounded to one compute dtype
before the dot: the autocast dtype under autocast (as conv2d would be), else the image's dtype.

Backward saves only the image and the weight (never a patch matrix): dweight = sum over patches of dY^T x_patch
gathers the patches again, into a transient matrix for one GEMM; the image gradient (only when the image requires
grad) scatters dY W back into the patch positions (stride = P, so patches do not overlap); dbias, dpos_embed and
dcls come from the batch sum of dY. The Triton launch and the torch fallback sit inside the same ``torch.library``
custom ops and save the same tensors, so memory measured on CPU speaks for the GPU path.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastvit.kernels._launch import (accumulation_dtype, apply, autocast_enabled, autocast_off, cast, cdiv,
                                     eager_op, launch, next_power_of_2, triton_in_backward)
from fastvit.kernels._gemm import in_fp32, matmul
from fastvit.kernels._report import TORCH_DTYPES, KernelSpec

# compute dtype -> the constexpr code the kernels branch on (0: fp32 operands, exact IEEE dot)
_COMPUTE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def patch_embed_ref(x, weight, bias, patch_size, pos_embed=None, cls_token=None, no_embed_class=False):
    """Torch reference: a stride-P convolution is the per-patch linear map x_p E."""
    tokens = F.conv2d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    return add_class_and_position(tokens, pos_embed, cls_token, no_embed_class)


def add_class_and_position(tokens, pos_embed=None, cls_token=None, no_embed_class=False):
    """[x_class; tokens] + E_pos on projected (B, N, D) tokens, in torch (the tail of the reference)."""
    if pos_embed is not None and no_embed_class:
        tokens = tokens + pos_embed
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    if pos_embed is not None and not no_embed_class:
        tokens = tokens + pos_embed
    return tokens


@functools.lru_cache(maxsize=None)
def _config(kernel, dim, patch_w, load_bytes):
    """(BLOCK_M, BLOCK_D, BLOCK_K, num_warps, num_stages) of ``kernel`` ('fwd' or 'dx') for embedding
    width ``dim``, patch width ``patch_w`` and ``load_bytes``, the largest element size among the tensors the
    kernel loads (fp32 images and weights under autocast: 4).

    The launchers and aot_specs both call this. BLOCK_K covers whole padded patch rows where it can; 4-byte loads
    halve the reduction block so the pipelined shared-memory buffers fit on sm_80. Checked free of spills with
    bench/kernel_report.py on sm_80 and sm_90 at ViT-B/16, L/16 and H/14.
    """
    block_d = min(128, max(16, next_power_of_2(dim)))
    block_k = max(64 // load_bytes * 2, _padded(patch_w))
    block_m = 128 if kernel == "fwd" else 64
    return block_m, block_d, block_k, 8, 3


def _padded(patch_w):
    """Patch rows are read padded to a power of two, so that the pixels of a row form one contiguous run."""
    return next_power_of_2(patch_w)


@triton.jit
def _to_compute(t, COMPUTE: tl.constexpr):
    if COMPUTE == 1:
        out = t.to(tl.float16)
    elif COMPUTE == 2:
        out = t.to(tl.bfloat16)
    else:
        out = t.to(tl.float32)
    return out


@triton.jit
def _mma(a, b, acc, COMPUTE: tl.constexpr):
    """acc += a @ b with both operands in the compute dtype; fp32 operands get the exact (non-TF32) product."""
    if COMPUTE == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _patch_rows(m, N, GW, sb, sh, sw, PH: tl.constexpr, PW: tl.constexpr):
    """Patch index m = b*N + n -> (b, n, offset of the patch's top-left pixel in a (B, C, H, W) tensor)."""
    b = m // N
    n = m % N
    off = b.to(tl.int64) * sb + ((n // GW) * PH).to(tl.int64) * sh + ((n % GW) * PW).to(tl.int64) * sw
    return b, n, off


@triton.jit
def _patch_cols(kp, R, sc, sh, sw, PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr):
    """Padded patch-vector index kp = (c*PH + i)*PWP + j over R = C*PH patch rows -> (offset of pixel (c, i, j)
    from the patch corner, its index (c*PH + i)*PW + j in the conv weight's (D, C*PH*PW) view, whether it is a
    real pixel (j < PW, inside the patch vector))."""
    row = kp // PWP
    j = kp % PWP
    valid = row < R
    if PWP != PW:
        valid = valid & (j < PW)
    return (row // PH) * sc + (row % PH) * sh + j * sw, row * PW + j, valid


@triton.jit
def _patch_embed_fwd_kernel(
        X, W, BIAS, POS, CLS, Y,
        M, N, GW, D, R,
        sxb, sxc, sxh, sxw, swd, swk, syb, syl, spos,
        HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr, POS_CLS_ROW: tl.constexpr,
        PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr, COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    # D tiles vary fastest, so the programs sharing a block of patches run together and reuse it from L2
    n_d = tl.cdiv(D, BLOCK_D)
    pid_m = tl.program_id(0) // n_d
    pid_d = tl.program_id(0) % n_d
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = m < M
    d_mask = d < D
    b, n, x_rows = _patch_rows(m, N, GW, sxb, sxh, sxw, PH, PW)
    w_rows = d.to(tl.int64) * swd
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, R * PWP, BLOCK_K):
        x_cols, kw, k_mask = _patch_cols(k0 + tl.arange(0, BLOCK_K), R, sxc, sxh, sxw, PH, PW, PWP)
        a = tl.load(X + x_rows[:, None] + x_cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + kw[:, None] * swk + w_rows[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        acc = _mma(_to_compute(a, COMPUTE), _to_compute(w, COMPUTE), acc, COMPUTE)
    mask = m_mask[:, None] & d_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos_row = n + 1 if POS_CLS_ROW else n
        acc += tl.load(POS + pos_row[:, None] * spos + d[None, :], mask=mask, other=0.0).to(tl.float32)
    y_img = b.to(tl.int64) * syb
    y_row = n + 1 if HAS_CLS else n
    tl.store(Y + (y_img + y_row.to(tl.int64) * syl)[:, None] + d[None, :], acc.to(Y.dtype.element_ty), mask=mask)
    if HAS_CLS:
        # row 0 of every image whose first patch is in this block
        cls = tl.load(CLS + d, mask=d_mask, other=0.0).to(tl.float32)
        if POS_CLS_ROW:
            cls += tl.load(POS + d, mask=d_mask, other=0.0).to(tl.float32)
        row0 = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + cls[None, :]
        tl.store(Y + y_img[:, None] + d[None, :], row0.to(Y.dtype.element_ty), mask=mask & (n == 0)[:, None])


@triton.jit
def _patch_embed_dx_kernel(
        DY, W, DX,
        M, N, GW, D, R,
        sdb, sdl, sdd, swd, swk, sxb, sxc, sxh, sxw,
        ROW0: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, PWP: tl.constexpr, COMPUTE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx at each patch's pixels = (dY W)[patch]; patches do not overlap, so every pixel is written once."""
    n_k = tl.cdiv(R * PWP, BLOCK_K)
    pid_m = tl.program_id(0) // n_k
    pid_k = tl.program_id(0) % n_k
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    b, n, x_rows = _patch_rows(m, N, GW, sxb, sxh, sxw, PH, PW)
    dy_rows = b.to(tl.int64) * sdb + (n + ROW0).to(tl.int64) * sdl
    x_cols, kw, k_mask = _patch_cols(pid_k * BLOCK_K + tl.arange(0, BLOCK_K), R, sxc, sxh, sxw, PH, PW, PWP)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        dy = tl.load(DY + dy_rows[:, None] + d[None, :] * sdd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + d.to(tl.int64)[:, None] * swd + kw[None, :] * swk, mask=d_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc = _mma(_to_compute(dy, COMPUTE), _to_compute(w, COMPUTE), acc, COMPUTE)
    tl.store(DX + x_rows[:, None] + x_cols[None, :], acc.to(DX.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


@triton.jit
def _batch_sum_kernel(DY, S, B, L, D, sdb, sdl, sdd, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """S[l, d] = sum_b dY[b, l, d] in fp32: the gradient of every per-token table (position rows, class token)."""
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < L)[:, None] & (d < D)[None, :]
    ptrs = DY + rows.to(tl.int64)[:, None] * sdl + d[None, :] * sdd
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for _ in range(0, B):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += sdb
    tl.store(S + rows[:, None] * D + d[None, :], acc, mask=mask)


# one pass over dY with nothing to overlap: no software pipelining (the launch and aot_specs both use these)
_SUM_BLOCK_L, _SUM_BLOCK_D, _SUM_WARPS, _SUM_STAGES = 16, 128, 4, 1


def _grid_size(x, ph, pw):
    return x.shape[2] // ph, x.shape[3] // pw


def _patch_grid(x, ph, pw):
    """x's whole patches as a (B, GH, GW, C, PH, PW) strided view (no copy)."""
    b, c = x.shape[:2]
    gh, gw = _grid_size(x, ph, pw)
    return x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)


def _patches(x, ph, pw):
    """(B, N, C*P*P) patch matrix of the fallback (a transient; it is never saved)."""
    grid = _patch_grid(x, ph, pw)
    b, gh, gw, c = grid.shape[:4]
    return grid.reshape(b, gh * gw, c * ph * pw)  # sizes, not -1: a batch of 0 has no size to infer


def _weight_grad(dy, x, weight, patch_h, patch_w, has_cls, compute_dtype):
    """dweight = sum over patches of dY^T x_patch, as one GEMM over a transient patch matrix in the compute dtype
    (cuBLAS on a GPU), on both paths.

    The reduction runs over all B*N patches into a small (D, C*P*P) output: a Triton kernel gathering the patches
    itself (split over the patches, fp32 partials) ran at ~14 TFLOPS on an H200, 67 ms of a 1577 ms B/16 training
    step, where one strided copy of the image into the patch matrix and cuBLAS's split-K GEMM need well under 5.
    The matrix gets a zero row where dY has its class-token row, so that dY enters the GEMM as it is (a view
    when it is contiguous in the compute dtype) instead of as a sliced copy."""
    bsz, rows, dim = dy.shape
    xp = torch.empty((bsz, rows, weight[0].numel()), dtype=compute_dtype, device=x.device)
    if has_cls:
        xp[:, 0].zero_()
    grid = _patch_grid(x, patch_h, patch_w)
    xp[:, int(has_cls):].view(grid.shape).copy_(grid)  # cast and gather in one pass
    g = cast(dy, compute_dtype).reshape(-1, dim)
    return matmul(g.t(), xp.view(-1, xp.shape[-1])).view(weight.shape).to(weight.dtype)


@eager_op("patch_embed_fwd")
def patch_embed_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    pos_embed: Optional[torch.Tensor], cls_token: Optional[torch.Tensor], patch_h: int, patch_w: int,
                    no_embed_class: bool, compute_dtype: torch.dtype, out_dtype: torch.dtype,
                    use_triton: bool) -> torch.Tensor:
    """(B, [1 +] N, D) tokens in ``out_dtype``; x and weight are rounded to ``compute_dtype``, the rest is fp32."""
    bsz = x.shape[0]
    dim = weight.shape[0]
    gh, gw = _grid_size(x, patch_h, patch_w)
    n = gh * gw
    has_cls = cls_token is not None
    pos_cls_row = pos_embed is not None and has_cls and not no_embed_class
    if not use_triton:
        with autocast_off(x.device.type):
            # the projection in the compute dtype, as PyTorch's autocast runs it (fp32 accumulation, one rounding)
            if x.shape[2] != gh * patch_h or x.shape[3] != gw * patch_w:
                x = x[:, :, :gh * patch_h, :gw * patch_w]  # the rows and columns no patch covers are dropped
            xc = cast(x, compute_dtype)
            if in_fp32(x, compute_dtype):  # as one GEMM over the patch matrix (kernels._gemm)
                tokens = matmul(_patches(xc, patch_h, patch_w), weight.reshape(dim, -1).t())
            else:
                tokens = F.conv2d(xc, cast(weight, compute_dtype), stride=(patch_h, patch_w)).flatten(2).transpose(1, 2)
            del xc  # the rounded image is freed before the output is allocated (a lower peak, as in timm)
            # + bias, + position rows in fp32 (fp64 for fp64), written in place into the output's patch rows (no
            # class-token cat); copy_ then +=, since an add of 16-bit tokens and an fp32 bias into the output
            # would first convert the tokens into a temporary of the output's size
            acc = accumulation_dtype(compute_dtype)
            z = torch.empty((bsz, n + int(has_cls), dim), dtype=acc, device=x.device)
            patches = z[:, 1:] if has_cls else z
            patches.copy_(tokens)
            del tokens
            if bias is not None:
                patches += cast(bias, acc)
            if pos_embed is not None:
                patches += cast(pos_embed[:, 1:] if pos_cls_row else pos_embed, acc)
            if has_cls:
                cls = cast(cls_token, acc)
                z[:, :1] = cls + cast(pos_embed[:, :1], acc) if pos_cls_row else cls
            return cast(z, out_dtype)
    y = torch.empty((bsz, n + int(has_cls), dim), dtype=out_dtype, device=x.device)
    m = bsz * n
    if m == 0:
        return y
    bias = None if bias is None else bias.contiguous()
    pos = None if pos_embed is None else pos_embed.reshape(-1, dim).contiguous()
    cls = None if cls_token is None else cls_token.reshape(dim).contiguous()
    w2 = weight.reshape(dim, -1)  # a view of a contiguous weight; a transient copy of a channels_last one
    block_m, block_d, block_k, num_warps, num_stages = _config("fwd", dim, patch_w, _load_bytes(x, weight))
    grid = (cdiv(m, block_m) * cdiv(dim, block_d),)
    launch(_patch_embed_fwd_kernel, grid,
        x, w2, y if bias is None else bias, y if pos is None else pos, y if cls is None else cls, y,
        m, n, gw, dim, x.shape[1] * patch_h, *x.stride(), *w2.stride(), y.stride(0), y.stride(1),
        0 if pos is None else pos.stride(0),
        HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_CLS=has_cls, POS_CLS_ROW=pos_cls_row,
        PH=patch_h, PW=patch_w, PWP=_padded(patch_w), COMPUTE=_COMPUTE[compute_dtype],
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y


def _load_bytes(*tensors):
    return max(t.element_size() for t in tensors)


@patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, cls_token, patch_h, patch_w, no_embed_class, compute_dtype, out_dtype,
      use_triton):
    gh, gw = _grid_size(x, patch_h, patch_w)
    # int(): torch 2.11 cannot add a bool to a symbolic size (torch.compile with dynamic shapes)
    return x.new_empty((x.shape[0], gh * gw + int(cls_token is not None), weight.shape[0]), dtype=out_dtype)


@eager_op("patch_embed_bwd")
def patch_embed_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, patch_h: int, patch_w: int,
                    has_cls: bool, compute_dtype: torch.dtype, need_dx: bool, need_dw: bool, need_sum: bool,
                    use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's layout and dtype, dweight (contiguous, weight's dtype), dY summed over the batch (fp32, fp64 for
    fp64; (L, D))); a result not asked for has 0 elements. dY is rounded to the compute dtype for the two products."""
    if use_triton:
        return _bwd_triton(dy, x, weight, patch_h, patch_w, has_cls, compute_dtype, need_dx, need_dw, need_sum)
    bsz, _, dim = dy.shape
    c = x.shape[1]
    gh, gw = _grid_size(x, patch_h, patch_w)
    dx, dw, s = x.new_empty(0), weight.new_empty(0), dy.new_empty(0, dtype=accumulation_dtype(dy.dtype))
    with autocast_off(x.device.type):
        # both products in the compute dtype, as PyTorch's autocast runs them (fp32 accumulation, one rounding)
        if need_dw:
            dw = _weight_grad(dy, x, weight, patch_h, patch_w, has_cls, compute_dtype)
        if need_dx:
            g = (dy[:, 1:] if has_cls else dy).to(compute_dtype).reshape(-1, dim)
            dxp = matmul(g, weight.reshape(dim, -1)).to(x.dtype)
            dxp = dxp.view(bsz, gh, gw, c, patch_h, patch_w).permute(0, 3, 1, 4, 2, 5)
            # out of place, zero right of / below the last whole patch: autograd's batched gradients (jacobian with
            # vectorize=True) can write no batched dx into zeros of x's shape (nor take dy[:, 0:], an alias)
            dx = F.pad(dxp.reshape(bsz, c, gh * patch_h, gw * patch_w),
                       (0, x.shape[3] - gw * patch_w, 0, x.shape[2] - gh * patch_h))
            if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                dx = dx.contiguous(memory_format=torch.channels_last)
        if need_sum:
            s = dy.sum(0, dtype=accumulation_dtype(dy.dtype))
    return dx, dw, s


def _bwd_triton(dy, x, weight, patch_h, patch_w, has_cls, compute_dtype, need_dx, need_dw, need_sum):
    bsz, rows, dim = dy.shape
    if need_dx:
        gh, gw = _grid_size(x, patch_h, patch_w)
        n = gh * gw
        m = bsz * n
        r = x.shape[1] * patch_h  # patch rows per patch vector
        k_padded = r * _padded(patch_w)
        consts = dict(ROW0=int(has_cls), PH=patch_h, PW=patch_w, PWP=_padded(patch_w),
                      COMPUTE=_COMPUTE[compute_dtype])
        # pixels right of / below the last whole patch get no gradient
        dx = torch.empty_like(x) if (gh * patch_h, gw * patch_w) == x.shape[2:] else torch.zeros_like(x)
        if m:
            w2 = weight.reshape(dim, -1)
            block_m, block_d, block_k, num_warps, num_stages = _config("dx", dim, patch_w, _load_bytes(dy, weight))
            grid = (cdiv(m, block_m) * cdiv(k_padded, block_k),)
            launch(_patch_embed_dx_kernel, grid,
                dy, w2, dx, m, n, gw, dim, r, *dy.stride(), *w2.stride(), *dx.stride(), **consts,
                BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    else:
        dx = x.new_empty(0)
    if need_dw:
        with autocast_off(x.device.type):
            dw = _weight_grad(dy, x, weight, patch_h, patch_w, has_cls, compute_dtype)
    else:
        dw = weight.new_empty(0)
    if need_sum:
        s = torch.empty((rows, dim), dtype=torch.float32, device=dy.device)
        grid = (cdiv(rows, _SUM_BLOCK_L), cdiv(dim, _SUM_BLOCK_D))
        launch(_batch_sum_kernel, grid, dy, s, bsz, rows, dim, *dy.stride(), BLOCK_L=_SUM_BLOCK_L,
               BLOCK_D=_SUM_BLOCK_D, num_warps=_SUM_WARPS, num_stages=_SUM_STAGES)
    else:
        s = dy.new_empty(0, dtype=torch.float32)
    return dx, dw, s


@patch_embed_bwd.register_fake
def _(dy, x, weight, patch_h, patch_w, has_cls, compute_dtype, need_dx, need_dw, need_sum, use_triton):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if need_dw else weight.new_empty(0)
    return dx, dw, dy.new_empty(dy.shape[1:] if need_sum else (0,), dtype=accumulation_dtype(dy.dtype))


class PatchEmbedFn(torch.autograd.Function):
    """Autograd for the fused patch embedding; saves the image and the weight only."""

    @staticmethod
    def forward(ctx, x, weight, bias, pos_embed, cls_token, patch_h, patch_w, no_embed_class, compute_dtype,
                out_dtype, use_triton):
        ctx.save_for_backward(x, weight)
        ctx.args = (patch_h, patch_w, cls_token is not None, compute_dtype)
        ctx.use_triton = use_triton
        ctx.pos_cls_row = pos_embed is not None and cls_token is not None and not no_embed_class
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, pos_embed, cls_token))
        return patch_embed_fwd(x, weight, bias, pos_embed, cls_token, patch_h, patch_w, no_embed_class,
                               compute_dtype, out_dtype, use_triton)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, s = patch_embed_bwd(dy, x, weight, *ctx.args, need[0], need[1], any(need[2:5]),
                                    triton_in_backward(ctx.use_triton))
        off = int(ctx.args[2])
        bias_dt, pos_dt, cls_dt = ctx.dtypes
        dbias = s[off:].sum(0).to(bias_dt) if need[2] else None
        dpos = (s if ctx.pos_cls_row else s[off:]).unsqueeze(0).to(pos_dt) if need[3] else None
        dcls = s[:1].unsqueeze(0).to(cls_dt) if need[4] else None
        return (dx if need[0] else None, dw if need[1] else None, dbias, dpos, dcls,
                None, None, None, None, None, None)


def _pair_size(patch_size):
    size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if len(size) != 2 or not all(isinstance(p, int) and p > 0 for p in size):
        raise ValueError(f"patch_size must be a positive int or a pair of them, got {patch_size!r}")
    return size


def _check_args(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class):
    """Validate shapes; return (patch_h, patch_w)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point (B, C, H, W) tensor, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                        f"{' ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}")
    ph, pw = _pair_size(patch_size)
    bsz, c, h, w = x.shape
    if weight.ndim != 4 or tuple(weight.shape[1:]) != (c, ph, pw):
        raise ValueError(f"weight must have shape (D, {c}, {ph}, {pw}), got {tuple(weight.shape)}")
    if h < ph or w < pw:
        raise ValueError(f"image size {(h, w)} is smaller than the patch size {(ph, pw)}")
    dim = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias must have shape ({dim},), got {tuple(bias.shape)}")
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, dim):
        raise ValueError(f"cls_token must have shape (1, 1, {dim}), got {tuple(cls_token.shape)}")
    if pos_embed is not None:
        rows = (h // ph) * (w // pw) + int(cls_token is not None and not no_embed_class)
        if tuple(pos_embed.shape) != (1, rows, dim):
            raise ValueError(f"pos_embed must have shape (1, {rows}, {dim}) for this image, class token and "
                             f"no_embed_class={no_embed_class}, got {tuple(pos_embed.shape)}")
    return ph, pw


def patch_embed(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class, use_triton):
    """(B, [1 +] N, D) tokens; see ``fastvit.ops.patch_embed`` for the arguments and the module doc for the math.

    The dot runs in the autocast dtype under autocast, else in x's dtype; the result has that dtype, promoted
    with pos_embed's (as ``patch_embed_ref`` would give).
    """
    ph, pw = _check_args(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class)
    dev = x.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if autocast_enabled(dev) else x.dtype
    if use_triton and compute_dtype not in _COMPUTE:
        raise TypeError(f"the Triton patch embedding computes in float32, float16 or bfloat16, got {compute_dtype}")
    out_dtype = compute_dtype if pos_embed is None else torch.promote_types(compute_dtype, pos_embed.dtype)
    return apply(PatchEmbedFn, x, weight, bias, pos_embed, cls_token, ph, pw, bool(no_embed_class), compute_dtype,
                 out_dtype, use_triton)


def _int_args(sig, consts, aligned, **values):
    """Signature entries for integer arguments as Triton's JIT specialises them: 1 becomes a constexpr, multiples
    of 16 are marked aligned."""
    for name, v in values.items():
        if v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                aligned.append(name)


def aot_specs(shape, dtype):
    """The three kernels at ``shape``'s patch size and width, for a contiguous batch of three 224px images
    (M = 3N is 16-divisible, as the JIT would mark it, exactly when N is: always for H/14's 256 patches), in two
    variants: ``half`` (a model cast to fp16/bf16: every tensor in ``dtype``) and ``amp`` (autocast: fp32 image,
    parameters and tokens, operands rounded to ``dtype``)."""
    c, p, dim = shape.in_chans, shape.patch, shape.dim
    gw = shape.img_size // p
    n, k = gw * gw, c * p * p
    rows = n + 1
    code = _COMPUTE[TORCH_DTYPES[dtype]]
    x_strides = dict(sxb=c * shape.img_size ** 2, sxc=shape.img_size ** 2, sxh=shape.img_size, sxw=1)
    w_strides = dict(swd=k, swk=1)
    dy_strides = dict(sdb=rows * dim, sdl=dim, sdd=1)
    sizes = dict(M=3 * n, N=n, GW=gw, D=dim, R=c * p)
    specs = []
    for variant, t in (("half", f"*{dtype}"), ("amp", "*fp32")):
        load_bytes = 2 if variant == "half" else 4
        label = f"D={dim} P={p} {variant}"
        tile = {"PH": p, "PW": p, "PWP": _padded(p), "COMPUTE": code}

        def spec(name, fn, pointers, ints, constexprs, cfg):
            sig = dict(pointers)
            consts, aligned = {}, list(pointers)
            _int_args(sig, consts, aligned, **ints)
            if cfg is None:
                num_warps, num_stages = _SUM_WARPS, _SUM_STAGES
            else:
                block_m, block_d, block_k, num_warps, num_stages = cfg
                constexprs = dict(constexprs, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k)
            sig.update({name_: "constexpr" for name_ in constexprs})
            consts.update(constexprs)
            specs.append(KernelSpec(name, fn, sig, consts, num_warps, num_stages, label=label,
                                    aligned=tuple(aligned)))

        spec("patch_embed_fwd", _patch_embed_fwd_kernel, dict(X=t, W=t, BIAS=t, POS=t, CLS=t, Y=t),
             dict(sizes, **x_strides, **w_strides, syb=rows * dim, syl=dim, spos=dim),
             dict(HAS_BIAS=True, HAS_POS=True, HAS_CLS=True, POS_CLS_ROW=True, **tile),
             _config("fwd", dim, p, load_bytes))
        spec("patch_embed_dx", _patch_embed_dx_kernel, dict(DY=t, W=t, DX=t),
             dict(sizes, **dy_strides, **w_strides, **x_strides),
             dict(ROW0=1, **tile), _config("dx", dim, p, load_bytes))
        spec("patch_embed_batch_sum", _batch_sum_kernel, dict(DY=t, S="*fp32"),
             dict(B=3, L=rows, D=dim, **dy_strides),
             dict(BLOCK_L=_SUM_BLOCK_L, BLOCK_D=_SUM_BLOCK_D), None)
    return specs
