"""Model registry with timm's names: ``create_model('vit_base_patch16_224')`` builds what timm builds."""
from __future__ import annotations

import difflib
import fnmatch
from functools import partial

from fastvit.model import VisionTransformer

_MODELS = {}

# (embed_dim, depth, num_heads) of the paper's Table 1 plus timm's tiny and small.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
          "huge": (1280, 32, 16)}
_VARIANTS = [(size, patch, img) for size in ("tiny", "small", "base", "large") for patch, img in
             [(16, 224), (16, 384)]] + [(size, 32, img) for size in ("base", "large") for img in (224, 384)] + \
            [("huge", 14, 224)]


def register_model(name, builder):
    """Register ``builder(**kwargs) -> nn.Module`` under ``name``."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = builder
    return builder


# timm's default weights for these two are in21k checkpoints without a head, so timm builds them headless.
_HEADLESS = {"vit_large_patch32_224", "vit_huge_patch14_224"}

for _size, _patch, _img in _VARIANTS:
    _dim, _depth, _heads = _SIZES[_size]
    _name = f"vit_{_size}_patch{_patch}_{_img}"
    register_model(_name, partial(VisionTransformer, img_size=_img, patch_size=_patch, embed_dim=_dim,
                                  depth=_depth, num_heads=_heads, num_classes=0 if _name in _HEADLESS else 1000))


def list_models(pattern="*"):
    """Sorted registered names matching a shell-style pattern, e.g. ``list_models('vit_base*')``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name, pretrained=False, checkpoint_path=None, features_only=False, out_indices=3,
                 feature_cls="getter", **kwargs):
    """Build a registered model; keyword arguments override its config (timm's semantics).

    A timm pretrained tag (``vit_base_patch16_224.augreg_in21k``) is accepted and ignored for the architecture.
    With no network, weights come only from ``checkpoint_path`` (timm, torchvision, HF or .npz layouts).
    ``features_only`` returns the blocks ``out_indices`` as a feature extractor (``fastvit.features``).
    """
    arch = name.split(".", 1)[0]
    if arch not in _MODELS:
        close = difflib.get_close_matches(arch, list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see fastvit.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    if pretrained and checkpoint_path is None:
        raise ValueError(f"pretrained=True needs checkpoint_path=...: fastvit does not download weights "
                         f"(load timm/torchvision/HF/.npz files for {arch!r} with checkpoint_path)")
    model = _MODELS[arch](**kwargs)
    if checkpoint_path is not None:
        from fastvit.convert import load_checkpoint
        load_checkpoint(model, checkpoint_path)
    if features_only:
        from fastvit.features import features_only as wrap
        model = wrap(model, feature_cls, out_indices)
    return model
