"""fastvit: a drop-in, timm-compatible Vision Transformer whose hot paths are Triton kernels."""
from fastvit import hybrid  # noqa: F401  registers the vit_*_r50_* hybrid names
from fastvit.convert import load_checkpoint
from fastvit.model import Attention, Block, Mlp, PatchEmbed, VisionTransformer
from fastvit.registry import create_model, list_models, register_model
from fastvit.resample import resample_abs_pos_embed, resample_patch_embed

__version__ = "0.1.0"
__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer", "create_model", "list_models",
           "load_checkpoint", "register_model", "resample_abs_pos_embed", "resample_patch_embed"]
