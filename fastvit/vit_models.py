"""timm's ViT names (``vision_transformer.py``) registered as fastvit ``VisionTransformer`` builders.

The paper's Table 1 sizes plus timm's tiny and small; heads, image sizes and the rest come from each name's
pretrained config (``fastvit.registry``), as timm does.
"""
from functools import partial

from fastvit.model import VisionTransformer
from fastvit.registry import register_model

# (embed_dim, depth, num_heads)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
         "huge": (1280, 32, 16)}
VARIANTS = [(size, patch, img) for size in ("tiny", "small", "base", "large") for patch, img in
            [(16, 224), (16, 384)]] + [(size, 32, img) for size in ("base", "large") for img in (224, 384)] + \
           [("huge", 14, 224)]

for _size, _patch, _img in VARIANTS:
    _dim, _depth, _heads = SIZES[_size]
    register_model(f"vit_{_size}_patch{_patch}_{_img}",
                   partial(VisionTransformer, img_size=_img, patch_size=_patch, embed_dim=_dim, depth=_depth,
                           num_heads=_heads),
                   module="vision_transformer")
