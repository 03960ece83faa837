"""Model names -> constructors, and timm's pretrained configs per tag (``name.tag``), with timm's lookup functions.

A leaf module: model families import it to register their names where they are defined (``fastvit.model``,
``fastvit.hybrid``); building a model from a name is ``fastvit.factory``, weights are ``fastvit.pretrained``.
The configs are facts copied from timm into ``pretrained_cfgs.json`` by ``scripts/gen_pretrained_cfgs.py``; a name
registered without configs gets timm's default config fields.
"""
from __future__ import annotations

import copy
import difflib
import fnmatch
import json
import re
from functools import cache
from importlib import resources

__all__ = ["UnknownModelError", "current_name", "get_pretrained_cfg", "get_pretrained_cfg_value", "is_model",
           "json_cfg", "list_models", "list_pretrained", "model_entrypoint", "register_model", "split_model_name_tag",
           "timm_archs"]

_MODELS = {}  # name -> builder(**kwargs) -> nn.Module
_MODULES = {}  # name -> the timm module that defines it ('vision_transformer', ...), for list_models(module=...)


class UnknownModelError(ValueError, RuntimeError):
    """A model name, or a pretrained tag of one, fastvit does not build: a ValueError, and the RuntimeError timm's
    ``create_model`` raises for either."""


def register_model(name, builder, module=""):
    """Register ``builder(**kwargs) -> nn.Module`` under ``name``; ``module`` is what ``list_models(module=...)``
    matches (timm's module name, e.g. 'vision_transformer')."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    if "." in name or ":" in name:
        raise ValueError(f"model name {name!r} may not contain '.' (it starts a pretrained tag) or ':'")
    _MODELS[name] = builder
    _MODULES[name] = module
    return builder


def json_cfg(cfg):
    """A pretrained config read from JSON, with timm's tuples where JSON has lists."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


@cache
def _data():
    with resources.files("fastvit").joinpath("pretrained_cfgs.json").open(encoding="utf-8") as f:
        data = json.load(f)
    data["defaults"] = json_cfg(data["defaults"])
    for arch in data["models"].values():
        arch["cfgs"] = {tag: json_cfg(cfg) for tag, cfg in arch["cfgs"].items()}
    return data


def _tags(arch):
    """The architecture's tags, default first ([] when it has no configs)."""
    entry = _data()["models"].get(arch)
    return list(entry["tags"]) if entry else []


def timm_archs():
    """{name: constructor arguments (JSON values)} of timm's ViT architectures that fastvit builds, as the data file
    holds them (``fastvit.model`` registers them)."""
    return {arch: entry["args"] for arch, entry in _data()["models"].items() if "args" in entry}


def _has_weights(cfg):
    return bool(cfg.get("hf_hub_id"))


def split_model_name_tag(model_name, no_tag=""):
    """'vit_base_patch16_224.augreg_in21k' -> ('vit_base_patch16_224', 'augreg_in21k')."""
    arch, _, tag = model_name.partition(".")
    return arch, tag or no_tag


def is_model(model_name):
    """Whether the architecture of ``model_name`` (a tag is ignored) is registered."""
    return split_model_name_tag(model_name)[0] in _MODELS


def current_name(model_name):
    """The 'arch.tag' that timm now gives a deprecated model name (``vit_base_patch16_224_in21k`` ->
    ``vit_base_patch16_224.augreg_in21k``), or None for any other name."""
    return _data().get("deprecated", {}).get(model_name)


def model_entrypoint(model_name):
    """The builder registered for the architecture of ``model_name``; unknown names raise with close matches."""
    arch = split_model_name_tag(model_name)[0]
    skipped = _data().get("skipped", {}).get(arch)
    if arch not in _MODELS and skipped:  # one of timm's that is not built: say why instead of "unknown"
        raise UnknownModelError(f"{arch!r} is timm's, but fastvit does not build it ({skipped}); the rest of "
                                f"timm's ViTs are in fastvit.list_models()")
    if arch not in _MODELS:
        close = difflib.get_close_matches(arch, list(_MODELS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see fastvit.list_models()"
        raise UnknownModelError(f"unknown model {model_name!r}{hint}")
    return _MODELS[arch]


def get_pretrained_cfg(model_name):
    """timm's pretrained config (a new dict) of 'arch.tag', or of the architecture's default tag for 'arch'.

    An architecture registered without configs gets timm's default fields with its name; an unknown tag raises
    ``UnknownModelError`` (a ValueError, and timm's RuntimeError) listing the tags there are.
    """
    model_entrypoint(model_name)
    arch, tag = split_model_name_tag(model_name)
    tags = _tags(arch)
    if not tags:
        if tag:
            raise UnknownModelError(f"{arch} has no pretrained tags, got {model_name!r}")
        return {**copy.deepcopy(_data()["defaults"]), "architecture": arch}
    if tag and tag not in tags:
        raise UnknownModelError(f"unknown pretrained tag {tag!r} for {arch}; its tags are: {', '.join(tags)} "
                         f"(default {tags[0]})")
    return copy.deepcopy(_data()["models"][arch]["cfgs"][tag or tags[0]])


def get_pretrained_cfg_value(model_name, cfg_key):
    """One field of ``get_pretrained_cfg(model_name)``, None when the config does not set it (timm's semantics)."""
    return get_pretrained_cfg(model_name).get(cfg_key)


def _natural_key(name):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name.lower())]


def _as_list(value):
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """Registered names, sorted naturally, with timm's arguments and semantics.

    ``filter`` / ``exclude_filters``: shell-style pattern(s); ``module``: timm module name(s); ``pretrained``: only
    names whose weights can be fetched (a tagless name counts when its default tag has weights); ``include_tags``
    (default: ``pretrained``): list 'arch.tag' names, and a pattern without a tag also matches its tags.
    """
    include_tags = pretrained if include_tags is None else include_tags
    modules = _as_list(module)
    names = {n for n in _MODELS if not modules or _MODULES[n] in modules}
    includes, excludes = _as_list(filter), _as_list(exclude_filters)
    if include_tags:
        names = {f"{n}.{t}" for n in names for t in _tags(n)} | {n for n in names if not _tags(n)}
        includes, excludes = ([e for p in patterns for e in ((p, p + ".*") if "." not in p else (p,))]
                              for patterns in (includes, excludes))
    if includes:
        names = {n for n in names if any(fnmatch.fnmatch(n, p) for p in includes)}
    names = {n for n in names if not any(fnmatch.fnmatch(n, p) for p in excludes)}
    if pretrained:
        names = {n for n in names if _tags(n.partition(".")[0]) and _has_weights(get_pretrained_cfg(n))}
    if name_matches_cfg:
        names = {n for n in names if _tags(n.partition(".")[0])}
    return sorted(names, key=_natural_key)


def list_pretrained(filter="", exclude_filters=""):
    """'arch.tag' names whose weights can be fetched from the Hugging Face Hub (timm's ``list_pretrained``)."""
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)
