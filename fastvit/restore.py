"""Models rebuilt for ``--init`` and few-shot evaluation: from a fastvit training checkpoint (the architecture stored
in its config.json), a timm model folder (a run's ``out/model``, ``save_pretrained``'s output) or a weights file in
any layout ``fastvit.convert`` reads."""
from __future__ import annotations

import json
import math
import os

import torch

import fastvit
from fastvit import checkpoint
from fastvit.config import ARCH_FLAGS, RECIPE_DEFAULTS, check_init


def load_pretrained(init, model_name, overrides: dict, name_given=False):
    """Build a model and load pretrained weights: a fastvit training checkpoint (its stored architecture) or a
    weights file (``model_name`` with ``overrides``, headless). Returns (model, model name, constructor kwargs).
    ``name_given``: the user named ``model_name`` (--model), so a checkpoint of another model is an error."""
    if _is_timm_folder(init):
        return _from_model_folder(init, model_name, overrides, name_given)
    ckpt = None if _is_hf_folder(init) else checkpoint.find_checkpoint(init)
    if ckpt is None:
        kwargs = {k: v for k, v in overrides.items() if k != "num_classes"}
        model = fastvit.create_model(model_name, num_classes=0, **kwargs)
        from fastvit.convert import CheckpointMismatchError, check_hf_eps, load_state_dict_read, read_checkpoint
        sd, layout = read_checkpoint(init)  # read once: an H/14 folder is 2.5 GB
        size = None if "img_size" in kwargs else _trained_img_size(model, sd)
        if size is not None and (size, size) != tuple(model.patch_embed.img_size):
            model.set_input_size(img_size=size)  # the weights' own grid: its position table loads as it is
            kwargs["img_size"] = size
        if layout == "hf":
            check_hf_eps(model, init)
        try:
            load_state_dict_read(model, sd, layout, name=model_name)  # .npz tables resample as from the file
        except CheckpointMismatchError as e:
            if name_given:
                raise
            raise ValueError(f"{e}\n  hint: --init {init} is a weights file, so the model is --model's, "
                             f"{model_name} when --model is not passed: pass the --model (and size flags) of the "
                             f"model it holds") from e
        return model, model_name, {**kwargs, "num_classes": 0}
    stored = checkpoint.read_config(ckpt)["model"]
    if name_given and model_name != stored["name"]:
        raise ValueError(f"--model {model_name} cannot change the architecture of checkpoint {ckpt} (it holds "
                         f"{stored['name']}); leave --model out to take the checkpoint's")
    _check_same_architecture(overrides, stored["name"], stored["kwargs"], f"checkpoint {ckpt}", "checkpoint")
    kwargs = {**stored["kwargs"], **{k: v for k, v in overrides.items() if k not in ("num_classes", "img_size")}}
    model = fastvit.create_model(stored["name"], **kwargs)
    state = {"model": model.state_dict()}
    checkpoint.load(ckpt, state)
    return model, stored["name"], kwargs


def _trained_img_size(model, sd):
    """The image size at which a weights file's learned 1-D position table covers its patch grid, at the model's
    pixels per grid cell (a file of another patch size has its projection resampled to the model's), or None: no
    such table, or rows that are no square grid with or without the model's class-token row."""
    table = sd.get("pos_embed")
    if model.pos_embed is None or table is None or table.ndim != 3:
        return None
    for prefix in dict.fromkeys((0 if model.no_embed_class else model.num_prefix_tokens, 0)):
        side = math.isqrt(max(table.shape[1] - prefix, 0))
        if side and side * side == table.shape[1] - prefix:
            # pixels per grid cell: the patch size, or a hybrid's backbone stride
            return side * (model.patch_embed.img_size[0] // model.patch_embed.grid_size[0])
    return None


def _from_model_folder(folder, model_name, overrides, name_given):
    """A timm model folder's architecture and weights, with ``overrides`` (not its head size or image size)."""
    from fastvit.pretrained import read_model_config
    _, arch, args = read_model_config("local-dir", folder)
    if name_given and model_name != arch:
        raise ValueError(f"--model {model_name} cannot change the architecture of {folder} (it holds {arch}); leave "
                         f"--model out to take the folder's")
    _check_same_architecture(overrides, arch, args, folder, "folder")
    kwargs = {k: v for k, v in overrides.items() if k not in ("num_classes", "img_size")}
    model = fastvit.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    return model, arch, {**args, **kwargs, "num_classes": model.num_classes,
                         "img_size": tuple(model.patch_embed.img_size)}


def _is_timm_folder(path) -> bool:
    """A timm model folder (config.json naming an ``architecture``, model.safetensors), not a Hugging Face
    transformers folder, which holds files of the same names (``fastvit.convert`` reads those)."""
    config = os.path.join(path, "config.json")
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(path, "model.safetensors"))):
        return False
    try:
        with open(config) as f:
            return "architecture" in json.load(f)
    except (OSError, ValueError, TypeError):
        return True  # a broken timm config: read_model_config names the problem


def _is_hf_folder(path) -> bool:
    """A Hugging Face transformers model folder (weights that ``fastvit.convert`` reads), not a run folder."""
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in weights)


def _num_heads(model):
    """The first block's head count, wherever its attention keeps it (``attn``, a parallel block's branches or
    itself); None without blocks."""
    heads = (m.num_heads for block in model.blocks[:1] for m in block.modules() if hasattr(m, "num_heads"))
    return next(heads, None)


def architecture(name, kwargs) -> dict:
    """What ``create_model(name, **kwargs)`` builds, as ARCH_FLAGS values plus num_classes and img_size: an option
    ``kwargs`` leaves out has the registered model's own value, so passing that value explicitly changes nothing."""
    with torch.device("meta"):
        m = fastvit.create_model(name, **kwargs)
    patch = tuple(m.patch_embed.patch_size)
    return {"patch_size": patch[0] if patch[0] == patch[-1] else list(patch), "embed_dim": m.embed_dim,
            "depth": len(m.blocks), "num_heads": _num_heads(m),
            "pos_embed": m.pos_embed_type, "pos_embed_at": m.pos_embed_at, "num_classes": m.num_classes,
            "img_size": list(m.patch_embed.img_size)}


def _check_same_architecture(overrides, name, stored, where, kind):
    """An architecture flag (--pos-embed, --depth, ...) passed with a value other than the one the weights were
    built with (``name`` with ``stored`` kwargs) is an error naming both."""
    passed = {k: overrides[k] for k in ARCH_FLAGS if overrides.get(k) is not None}
    if not passed:
        return
    built = architecture(name, stored)
    bad = [k for k in passed if passed[k] != built[k]]
    if bad:
        flag = bad[0]
        raise ValueError(f"--{flag.replace('_', '-')} cannot change the architecture of {where} "
                         f"({kind}: {built[flag]}, passed: {passed[flag]})")


def check_whole_patches(model):
    """An image that is not whole patches loses its last pixels: a mistake, unless it is the architecture's own
    size (SigLIP so400m/14 at 384 px). ValueError naming --img-size otherwise."""
    pe, own_size = model.patch_embed, (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0,))[1:]
    if getattr(pe, "feature_rounding", None) == "ceil":  # a hybrid whose backbone pads: every pixel is read
        return
    stride = getattr(pe, "token_stride", pe.patch_size)
    if (pe.img_size[0] % stride[0] or pe.img_size[1] % stride[1]) and tuple(pe.img_size) != tuple(own_size):
        raise ValueError(f"--img-size {pe.img_size[0]} must be divisible by patch_size {tuple(stride)}, or be the "
                         f"model's own size; the pixels past the last whole patch would be dropped")


def load_model_for_eval(init, model_name=None, img_size=None, **arch):
    """A model for feature extraction (``fastvit.fewshot``): from a checkpoint or weights file, or random.
    ``arch``: constructor options such as pos_embed / pos_embed_at (a checkpoint's own must match)."""
    arch = {k: v for k, v in arch.items() if v is not None}
    overrides = {**arch, **({"img_size": img_size} if img_size else {})}
    name = model_name or RECIPE_DEFAULTS["pretrain"]["model"]
    if init is None:
        model = fastvit.create_model(name, num_classes=0, **overrides)
    else:
        check_init(init)
        model = load_pretrained(init, name, overrides, name_given=model_name is not None)[0]
        if img_size and tuple(model.patch_embed.img_size) != (img_size, img_size):
            model.set_input_size(img_size=img_size)
    check_whole_patches(model)
    return model, model.patch_embed.img_size[0]
