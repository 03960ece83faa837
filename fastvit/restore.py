"""Models rebuilt for ``--init`` and few-shot evaluation: from a fastvit training checkpoint (the architecture stored
in its config.json), a timm model folder (a run's ``out/model``, ``save_pretrained``'s output) or a weights file in
any layout ``fastvit.convert`` reads."""
from __future__ import annotations

import os

import fastvit
from fastvit import checkpoint
from fastvit.config import ARCH_FLAGS, RECIPE_DEFAULTS, check_init


def load_pretrained(init, model_name, overrides: dict, name_given=False):
    """Build a model and load pretrained weights: a fastvit training checkpoint (its stored architecture) or a
    weights file (``model_name`` with ``overrides``, headless). Returns (model, model name, constructor kwargs).
    ``name_given``: the user named ``model_name`` (--model), so a checkpoint of another model is an error."""
    if all(os.path.isfile(os.path.join(init, f)) for f in ("config.json", "model.safetensors")):
        return _from_model_folder(init, model_name, overrides, name_given)
    ckpt = checkpoint.find_checkpoint(init)
    if ckpt is None:
        kwargs = {k: v for k, v in overrides.items() if k != "num_classes"}
        model = fastvit.create_model(model_name, num_classes=0, **kwargs)
        from fastvit.convert import load_checkpoint
        load_checkpoint(model, init)
        return model, model_name, {**kwargs, "num_classes": 0}
    stored = checkpoint.read_config(ckpt)["model"]
    if name_given and model_name != stored["name"]:
        raise ValueError(f"--model {model_name} cannot change the architecture of checkpoint {ckpt} (it holds "
                         f"{stored['name']}); leave --model out to take the checkpoint's")
    _check_same_architecture(overrides, stored["kwargs"], f"checkpoint {ckpt}", "checkpoint")
    kwargs = {**stored["kwargs"], **{k: v for k, v in overrides.items() if k not in ("num_classes", "img_size")}}
    model = fastvit.create_model(stored["name"], **kwargs)
    state = {"model": model.state_dict()}
    checkpoint.load(ckpt, state)
    return model, stored["name"], kwargs


def _from_model_folder(folder, model_name, overrides, name_given):
    """A timm model folder's architecture and weights, with ``overrides`` (not its head size or image size)."""
    from fastvit.pretrained import read_model_config
    _, arch, args = read_model_config("local-dir", folder)
    if name_given and model_name != arch:
        raise ValueError(f"--model {model_name} cannot change the architecture of {folder} (it holds {arch}); leave "
                         f"--model out to take the folder's")
    # a flag the folder's config leaves at the architecture's default goes to create_model, which says what differs
    _check_same_architecture({k: v for k, v in overrides.items() if k in args}, args, folder, "folder")
    kwargs = {k: v for k, v in overrides.items() if k not in ("num_classes", "img_size")}
    model = fastvit.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    return model, arch, {**args, **kwargs, "num_classes": model.num_classes,
                         "img_size": tuple(model.patch_embed.img_size)}


def _check_same_architecture(overrides, stored, where, kind):
    """An architecture flag (--pos-embed, --depth, ...) passed with a value other than the one ``stored`` for the
    weights is an error naming both."""
    bad = [k for k in ARCH_FLAGS if k in overrides and overrides[k] != stored.get(k)]
    if bad:
        flag = bad[0]
        raise ValueError(f"--{flag.replace('_', '-')} cannot change the architecture of {where} "
                         f"({kind}: {stored.get(flag)}, passed: {overrides[flag]})")


def load_model_for_eval(init, model_name=None, img_size=None, **arch):
    """A model for feature extraction (``fastvit.fewshot``): from a checkpoint or weights file, or random.
    ``arch``: constructor options such as pos_embed / pos_embed_at (a checkpoint's own must match)."""
    arch = {k: v for k, v in arch.items() if v is not None}
    overrides = {**arch, **({"img_size": img_size} if img_size else {})}
    name = model_name or RECIPE_DEFAULTS["pretrain"]["model"]
    if init is None:
        model = fastvit.create_model(name, num_classes=0, **overrides)
        return model, model.patch_embed.img_size[0]
    check_init(init)
    model = load_pretrained(init, name, overrides, name_given=model_name is not None)[0]
    if img_size and tuple(model.patch_embed.img_size) != (img_size, img_size):
        model.set_input_size(img_size=img_size)
    return model, model.patch_embed.img_size[0]
