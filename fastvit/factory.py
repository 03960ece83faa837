"""``create_model``: a model from a name, as ``timm.create_model`` builds it, with its pretrained config and weights.

Names: a registered architecture ('vit_base_patch16_224'), with a pretrained tag ('vit_base_patch16_224.augreg_in21k':
the tag's head and input size), 'hf-hub:org/name[@revision]' or 'local-dir:PATH' (a timm model folder, its
``config.json`` gives the architecture and constructor arguments). Explicit keyword arguments always win.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from fastvit.convert import CheckpointMismatchError, _hints, load_checkpoint
from fastvit.features import features_only as wrap_features
from fastvit.pretrained import RUNTIME_ARGS, load_pretrained, parse_model_name, read_model_config, resolve_weights
from fastvit.registry import current_name, get_pretrained_cfg, is_model, model_entrypoint, split_model_name_tag
from fastvit.resample import _pair

__all__ = ["create_model"]


def _cfg_defaults(cfg, kwargs):
    """Constructor defaults a pretrained config sets (timm's ``_update_default_model_kwargs``): the head size, the
    input channels and, for a fixed input size, the image size."""
    defaults = {}
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        defaults["num_classes"] = cfg["num_classes"]
    if cfg.get("input_size"):
        defaults["in_chans"] = cfg["input_size"][0]
        if cfg.get("fixed_input_size"):
            defaults["img_size"] = tuple(cfg["input_size"][-2:])
    return {**defaults, **kwargs}


def create_model(model_name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                 checkpoint_path=None, cache_dir=None, scriptable=None, exportable=None, no_jit=None,
                 features_only=False, out_indices=3, feature_cls="getter", pretrained_strict=True, device=None,
                 dtype=None, **kwargs):
    """Build ``model_name`` as timm does; keyword arguments override its config (None values are dropped).

    ``pretrained=True`` loads the tag's weights (the architecture's default tag without one) from the Hugging Face
    Hub (``pip install 'fastvit[hub]'``; cached in the standard HF cache, or ``cache_dir``) or from the
    ``local-dir:`` folder. ``checkpoint_path`` loads a local timm, torchvision, HF or .npz file instead (no
    download). ``pretrained_cfg`` (a tag or a dict) and ``pretrained_cfg_overlay`` (fields to replace) as in timm.
    ``features_only`` returns the blocks ``out_indices`` as a feature extractor of class ``feature_cls``
    (``fastvit.features``), built after the weights are loaded. The model gets ``pretrained_cfg`` and its alias
    ``default_cfg`` (a feature extractor without the classifier fields, as timm's). ``device`` and ``dtype`` place
    the parameters as they are created (``device="meta"`` allocates nothing); ``pretrained_strict=False`` loads what
    fits of a checkpoint. timm's ``exportable`` and ``no_jit`` change nothing here (the models export and compile as
    they are); ``scriptable=True`` is refused: TorchScript is not supported (README, *Export*).
    """
    if scriptable:
        raise ValueError("scriptable=True: fastvit models do not support TorchScript; use torch.export or "
                         "torch.compile (README, 'Export')")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, ident = parse_model_name(model_name)
    source_args = {}
    if source:
        if pretrained_cfg is not None:
            raise ValueError(f"pretrained_cfg cannot be combined with {model_name!r}, whose config.json gives it")
        pretrained_cfg, arch, source_args = read_model_config(source, ident, cache_dir)
        if not is_model(arch):
            raise ValueError(f"{model_name} holds a {arch!r} model, which fastvit does not build; "
                             f"fastvit.list_models() lists what it does")
        kwargs = {**source_args, **kwargs}
    else:
        current = current_name(ident)
        if current is not None:  # as timm maps them
            warnings.warn(f"Mapping deprecated model name {ident} to current {current}.", stacklevel=2)
            ident = current
        arch, tag = split_model_name_tag(ident)
        if isinstance(pretrained_cfg, str):  # a tag passed apart from the name wins, as in timm
            tag, pretrained_cfg = pretrained_cfg, None
        if pretrained_cfg is None:
            pretrained_cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    builder = model_entrypoint(arch)
    cfg = {**pretrained_cfg, **(pretrained_cfg_overlay or {})}
    cfg.setdefault("architecture", arch)
    # weights are found (downloaded) before the model is built, so a missing file fails fast
    weights = resolve_weights(cfg, cache_dir) if pretrained and not checkpoint_path else None

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = builder(**_cfg_defaults(cfg, kwargs))
    if dtype is not None:
        model.to(dtype)
    model.pretrained_cfg = model.default_cfg = cfg
    model.pretrained_model_args = source_args
    model._model_args = {k: v for k, v in kwargs.items() if k not in RUNTIME_ARGS}  # for save_pretrained
    # timm's input traits (timm.models.get_model_input_config, save_for_hf read them): the size asked for, if any
    first_conv = cfg.get("first_conv")
    model._traits = {"img_size": _pair(kwargs["img_size"]) if "img_size" in kwargs else None,
                     "fixed_input_size": not getattr(model, "dynamic_img_size", False),
                     "first_conv": tuple(first_conv) if isinstance(first_conv, list) else first_conv}
    try:
        if checkpoint_path:  # an empty path is none, as in timm
            load_checkpoint(model, checkpoint_path, strict=pretrained_strict, name=arch)
        elif weights is not None:
            load_pretrained(model, cfg, weights=weights, strict=pretrained_strict)
    except CheckpointMismatchError as e:  # hints in create_model's arguments (strict=False here is a TypeError)
        caller = "checkpoint_path" if checkpoint_path else "pretrained"
        raise CheckpointMismatchError(e.result, e.model_name, _hints(model, e.result, caller)) from None
    if features_only:
        traits = model._traits
        model = wrap_features(model, feature_cls, out_indices)
        model._traits = traits
        model.pretrained_cfg = model.default_cfg = {k: v for k, v in cfg.items()
                                                    if k not in ("num_classes", "classifier", "global_pool")}
    return model
