"""fastvit: a drop-in, timm-compatible Vision Transformer whose hot paths are Triton kernels."""
from fastvit import hybrid, model  # noqa: F401  each model family registers its names when imported
from fastvit.convert import load_checkpoint
from fastvit.factory import create_model
from fastvit.model import Attention, Block, Mlp, PatchEmbed, ResPostBlock, VisionTransformer
from fastvit.parallel_blocks import ParallelScalingBlock, ParallelThingsBlock  # registers them as block_fn
from fastvit.diff_attention import DiffAttention, DiffParallelScalingBlock  # registers attn_layer 'diff'
from fastvit.pretrained import save_pretrained
from fastvit.registry import (get_pretrained_cfg, get_pretrained_cfg_value, is_model, list_models, list_pretrained,
                              register_model)
from fastvit.resample import resample_abs_pos_embed, resample_patch_embed

__version__ = "0.1.0"
__all__ = ["Attention", "Block", "DiffAttention", "DiffParallelScalingBlock", "Mlp", "ParallelScalingBlock", "ParallelThingsBlock", "PatchEmbed", "ResPostBlock",
           "VisionTransformer", "create_model",
           "get_pretrained_cfg", "get_pretrained_cfg_value", "is_model", "list_models", "list_pretrained",
           "load_checkpoint", "register_model", "resample_abs_pos_embed", "resample_patch_embed", "save_pretrained"]
