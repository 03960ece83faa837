"""Multi-head self-attention with an optional 2D relative-position bias."""
import torch
import torch.nn.functional as F


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


def attention(q, k, v, rel_bias, grid_size, dropout_p, scale, use_triton):
    return attention_ref(q, k, v, rel_bias, grid_size, dropout_p, scale)
