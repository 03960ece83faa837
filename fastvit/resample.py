"""Resampling learned tables to a new patch grid (the paper's 2D interpolation for higher-resolution fine-tuning)."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from fastvit.kernels._launch import exporting


def _pair(size):
    """(h, w) of a size given as one number or two, as ints; a symbolic size (torch.export with dynamic shapes)
    stays symbolic, where int() would fix it to the traced value."""
    if isinstance(size, (int, torch.SymInt)):
        size = (size, size)
    return tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)


def _specialized(size):
    """``size`` as plain ints while torch.compile traces: an antialiased interpolation has no backward for a symbolic
    size there (torch's meta kernel asserts "Expected IntList"), which failed a compiled training step at a new image
    size. ``operator.index`` fixes a symbolic int to its value (dynamo guards on it: one graph per grid), as timm's
    patch embedding does by formatting its sizes into a check's message; int() would leave it symbolic."""
    return tuple(map(operator.index, size))


def _static(sizes) -> bool:
    """Whether every size is a plain int, not a symbolic one (torch.export's dynamic dimensions)."""
    return all(type(s) is int for s in sizes)


def resample_abs_pos_embed(posemb, new_size, old_size=None, num_prefix_tokens=1, interpolation="bicubic",
                           antialias=True):
    """Interpolate a (T, prefix + gh*gw, D) position table to the ``new_size`` grid in 2D.

    Prefix (class-token) rows are kept as they are; the grid rows are reshaped to their 2D layout (square when
    ``old_size`` is None) and interpolated in fp32, then cast back. Same results as timm's function for T = 1.
    """
    new_size = _pair(new_size)
    if antialias and torch.compiler.is_compiling() and not exporting():
        new_size = _specialized(new_size)
    num_tokens = posemb.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"cannot infer a square grid from {num_tokens} position rows; pass old_size")
        old_size = (side, side)
    old_size = _pair(old_size)
    # no early return for a symbolic size while torch.export traces: it would fix an exported dynamic image size to
    # the traced one (asked first: comparing a symbolic size guards it); a fixed-size model's grid is plain ints, and
    # its program resamples nothing, as timm's
    if (_static(new_size) or not exporting()) and old_size == new_size:
        return posemb
    if old_size[0] * old_size[1] != num_tokens:
        raise ValueError(f"old_size {old_size} does not match the {num_tokens} grid rows of the position table")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    t, _, dim = grid.shape
    grid = grid.float().reshape(t, *old_size, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(t, -1, dim).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_pos_embed_1d(table, new_len, interpolation="linear"):
    """Interpolate a (T, g, D) table of row (or column) embeddings to ``new_len`` entries."""
    if (_static((new_len,)) or not exporting()) and table.shape[1] == new_len:
        return table  # see resample_abs_pos_embed
    out = F.interpolate(table.float().transpose(1, 2), size=new_len, mode=interpolation)
    return out.transpose(1, 2).to(table.dtype)


def resample_rel_pos_table(table, old_size, new_size, num_extra=3, interpolation="bicubic"):
    """Interpolate a (heads, (2gh-1)(2gw-1) + extra) relative-position table to a new grid in 2D.

    The offsets form a (2gh-1, 2gw-1) grid per head; the trailing class-token entries are kept.
    """
    old_size, new_size = _pair(old_size), _pair(new_size)
    if old_size == new_size:
        return table
    heads = table.shape[0]
    n_old = (2 * old_size[0] - 1) * (2 * old_size[1] - 1)
    offsets, extra = table[:, :n_old], table[:, n_old:]
    offsets = offsets.float().reshape(1, heads, 2 * old_size[0] - 1, 2 * old_size[1] - 1)
    offsets = F.interpolate(offsets, size=(2 * new_size[0] - 1, 2 * new_size[1] - 1), mode=interpolation,
                            align_corners=True)
    return torch.cat([offsets.reshape(heads, -1).to(table.dtype), extra], dim=1)


def resample_patch_embed(weight, new_size, interpolation="bicubic", antialias=True):
    """Resample a (D, C, P, P) patch projection to a new patch size (FlexiViT's pseudo-inverse resize).

    Choosing w' = pinv(R^T) w, where R resizes a patch, keeps <x, w> = <resize(x), w'> for resized inputs. R is
    built in fp32 (F.interpolate's antialiased kernels), so singular values at its rounding level are noise: the
    pseudo-inverse drops them (fp32's tolerance, as timm's fp32 pinv does) rather than inverting them, which blew
    w' up by ~1e9 where a size shrinks on one axis and grows on the other (8x8 -> 12x6).
    """
    old_size, new_size = tuple(weight.shape[-2:]), _pair(new_size)
    if old_size == new_size:
        return weight
    n = old_size[0] * old_size[1]
    basis = torch.eye(n, dtype=torch.float32, device=weight.device).reshape(n, 1, *old_size)
    resize = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias).reshape(n, -1)
    # (new numel, old numel), in fp64 for accuracy but with R's own (fp32) tolerance
    pinv = torch.linalg.pinv(resize.double(), rtol=max(resize.shape) * torch.finfo(resize.dtype).eps)
    flat = weight.double().reshape(-1, n) @ pinv.T
    return flat.reshape(*weight.shape[:2], *new_size).to(weight.dtype)
