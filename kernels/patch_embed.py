"""Patchify + linear projection + position embedding + class token."""
import torch
import torch.nn.functional as F


def patch_embed_ref(x, weight, bias, patch_size, pos_embed=None, cls_token=None, no_embed_class=False):
    """Torch reference: a stride-P convolution is the per-patch linear map x_p E."""
    tokens = F.conv2d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    if pos_embed is not None and no_embed_class:
        tokens = tokens + pos_embed
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    if pos_embed is not None and not no_embed_class:
        tokens = tokens + pos_embed
    return tokens


def patch_embed(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class, use_triton):
    return patch_embed_ref(x, weight, bias, patch_size, pos_embed, cls_token, no_embed_class)
