"""Pretrained weights in and out, as timm does: the Hugging Face Hub, ``hf-hub:`` / ``local-dir:`` model folders,
and ``save_pretrained`` writing timm's Hub folder layout (``config.json`` + ``model.safetensors``).

Downloads go through ``huggingface_hub`` (``pip install 'fastvit[hub]'``) into the standard Hugging Face cache, so
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME`` and tokens work as they do for timm and transformers. Weights are
checked against the model before anything is copied (``fastvit.convert.load_checkpoint``): a file that does not
fit raises and leaves the model as it was.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings

import torch

from fastvit.convert import load_checkpoint, read_checkpoint
from fastvit.registry import get_pretrained_cfg, json_cfg, list_pretrained, model_entrypoint
from fastvit.resample import _pair

__all__ = ["adapt_input_conv", "hub_config", "hub_download", "load_pretrained", "parse_model_name",
           "read_model_config", "resolve_weights", "save_pretrained"]

SOURCES = ("hf-hub", "local-dir")
# pretrained_cfg fields that say where weights live: not part of a saved folder's config (timm drops them too).
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source")
_KEEP_NULL = ("pool_size", "first_conv", "classifier")  # timm writes these even when None
# Constructor arguments that place or run a model (kernels, numerics under autocast) but do not describe its
# weights: never written to config.json, which timm must be able to build from.
RUNTIME_ARGS = ("backend", "residual_dtype", "device", "dtype")


def _hub():
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError("downloading from the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'fastvit[hub]'") from err
    return huggingface_hub


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("model folders are written as safetensors: pip install 'fastvit[hub]'") from err
    return safetensors.torch


def parse_model_name(model_name):
    """'hf-hub:org/name' -> ('hf-hub', 'org/name'); 'local-dir:PATH' -> ('local-dir', PATH); a registry name
    ('arch' or 'arch.tag') -> (None, name). A name that looks like a path or repo id without a prefix raises,
    as in timm, instead of silently picking a registry model."""
    source, sep, ident = model_name.partition(":")
    if not sep or not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.\-_]+", source):
        if any(c in model_name for c in "/\\:"):
            raise ValueError(f"model name {model_name!r} looks like a Hub repo id or a folder: write "
                             f"'hf-hub:{model_name}' or 'local-dir:{model_name}'")
        return None, model_name
    source = source.lower().replace("hf_hub", "hf-hub")
    if source not in SOURCES:
        raise ValueError(f"unknown model source {source!r} in {model_name!r}: expected one of {SOURCES}")
    if not ident:
        raise ValueError(f"model name {model_name!r} has nothing after '{source}:'")
    return source, ident


def hub_download(repo, filename, cache_dir=None):
    """Path of ``filename`` of Hub repo ``repo`` ('org/name' or 'org/name@revision') in the HF cache, downloading
    it if needed. A file neither cached nor reachable raises ``FileNotFoundError`` saying what to do."""
    hub = _hub()
    repo_id, _, revision = repo.partition("@")
    try:
        return hub.hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir)
    except hub.errors.LocalEntryNotFoundError as err:
        where = cache_dir or hub.constants.HF_HUB_CACHE
        why = ("HF_HUB_OFFLINE is set" if hub.constants.HF_HUB_OFFLINE else
               "the Hub could not be reached (on a machine without network, HF_HUB_OFFLINE=1 says so at once, "
               "without huggingface_hub's retries)")
        raise FileNotFoundError(
            f"{filename} of Hugging Face Hub repo {repo!r} is not in the cache ({where}) and {why}: connect to the "
            f"Hub once to download it, or load local files (checkpoint_path=..., or a 'local-dir:' folder)") from err


def _hub_weights(repo, cfg, cache_dir):
    """The weights file of a Hub repo: the config's hf_hub_filename, else model.safetensors, else
    pytorch_model.bin when the repo has no safetensors (a file missing from the cache raises at once)."""
    if cfg.get("hf_hub_filename"):
        return hub_download(repo, cfg["hf_hub_filename"], cache_dir)
    try:
        return hub_download(repo, "model.safetensors", cache_dir)
    except _hub().errors.EntryNotFoundError:
        return hub_download(repo, "pytorch_model.bin", cache_dir)


def read_model_config(source, ident, cache_dir=None):
    """A timm model folder's ``config.json`` (on the Hub or on disk) -> (pretrained_cfg, architecture,
    model_args). The pretrained_cfg records where the weights are (``hf_hub_id`` or ``file``, and ``source``)."""
    if source == "hf-hub":
        path, where = hub_download(ident, "config.json", cache_dir), {"hf_hub_id": ident, "source": source}
    else:
        path, where = os.path.join(ident, "config.json"), {"file": ident, "source": source}
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: a local-dir: folder holds config.json and model.safetensors "
                                    f"(as fastvit.save_pretrained and timm write them)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "pretrained_cfg" not in config:  # older timm folders: one flat dict
        config = {"architecture": config.pop("architecture", None), "pretrained_cfg": config}
    if not config.get("architecture"):
        raise ValueError(f"{path} names no 'architecture' (a timm model folder's config.json does)")
    cfg = {**json_cfg(config["pretrained_cfg"]), **where, "architecture": config["architecture"]}
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in config:
            cfg[key] = config[key]
    return cfg, config["architecture"], dict(config.get("model_args", {}))


def adapt_input_conv(in_chans, weight, base_chans=3):
    """A pretrained (O, base_chans, kh, kw) first convolution for ``in_chans`` inputs, timm's rule: one channel
    sums the filters over channels; more channels repeat them cyclically, scaled by base_chans / in_chans."""
    if weight.ndim != 4 or weight.shape[1] != base_chans:
        raise ValueError(f"expected a (O, {base_chans}, kh, kw) convolution weight, got {tuple(weight.shape)}")
    if in_chans == base_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / base_chans), 1, 1)[:, :in_chans] * (base_chans / in_chans)
    return w.to(weight.dtype)


def resolve_weights(cfg, cache_dir=None):
    """Where ``cfg`` says the weights are, in timm's order (an hf-hub:/local-dir: source, then state_dict, file,
    hf_hub_id), downloaded into the HF cache if needed: a local path or a state_dict. Raises before anything is
    built when there are none."""
    name = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag"))))
    if cfg.get("source") == "local-dir":
        return cfg["file"]
    if cfg.get("source") != "hf-hub" and cfg.get("state_dict") is not None:
        return cfg["state_dict"]
    if cfg.get("source") != "hf-hub" and cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub_id"):
        return _hub_weights(cfg["hf_hub_id"], cfg, cache_dir)
    if cfg.get("url"):
        raise ValueError(f"{name} has weights only at a URL ({cfg['url']}); fastvit loads from the Hugging Face Hub: "
                         f"download the file and pass checkpoint_path=")
    with_weights = list_pretrained(cfg["architecture"]) if cfg.get("architecture") else []
    raise ValueError(f"{name} has no pretrained weights; names with weights: {', '.join(with_weights) or 'none'}")


def load_pretrained(model, pretrained_cfg=None, cache_dir=None, weights=None, strict=True):
    """Load the weights ``pretrained_cfg`` (default ``model.pretrained_cfg``) points to, or ``weights`` (what
    ``resolve_weights`` returned for it), as timm's ``load_pretrained`` does: a model with another class count
    keeps its own fresh classifier, the first convolution is adapted to the model's input channels, position tables
    are resampled to its grid. A file that does not fit raises ``CheckpointMismatchError`` naming the architecture
    and loads nothing (with ``strict=False``: loads what fits and returns the ``LoadResult`` that lists the rest)."""
    cfg = pretrained_cfg if pretrained_cfg is not None else getattr(model, "pretrained_cfg", None)
    if not cfg:
        raise ValueError("no pretrained_cfg: build the model with fastvit.create_model, or pass pretrained_cfg=")
    sd, _ = read_checkpoint(resolve_weights(cfg, cache_dir) if weights is None else weights)
    base_chans = (cfg.get("input_size") or (3,))[0]
    for conv in [cfg["first_conv"]] if isinstance(cfg.get("first_conv"), str) else cfg.get("first_conv") or ():
        weight, module = sd.get(conv + ".weight"), model.get_submodule(conv)
        if weight is not None and weight.shape[1] != module.weight.shape[1]:
            sd[conv + ".weight"] = adapt_input_conv(module.weight.shape[1], weight, base_chans)
    classifiers = [cfg["classifier"]] if isinstance(cfg.get("classifier"), str) else cfg.get("classifier") or ()
    new_head = getattr(model, "num_classes", 0) != cfg.get("num_classes")
    if new_head and model.num_classes > 0:
        for name in classifiers:  # keep the model's own freshly initialised classifier
            sd.update({f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()})
    name = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag")))) or type(model).__name__
    if not (strict and new_head):
        return load_checkpoint(model, sd, strict=strict, name=name)
    # another head, as timm: load what fits (a pooled head's fc_norm for the final norm, ...) and say what did not
    result = load_checkpoint(model, sd, strict=False, name=name)
    left = result.missing_keys + result.unexpected_keys + [k for k, *_ in result.mismatched_keys]
    if left:
        warnings.warn(f"{name} loaded into a model with another head ({model.num_classes} classes, the weights "
                      f"{cfg.get('num_classes')}): not loaded: {', '.join(left[:8])}{', ...' if len(left) > 8 else ''}")
    return result


# ---- saving ----------------------------------------------------------------------------------------------------
def _unwrap(model):
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def _full_tensors(state_dict):
    """CPU copies of the tensors to write; sharded (FSDP) tensors cannot be written by one process."""
    sharded = []
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        sharded = [k for k, v in state_dict.items() if isinstance(v, DTensor)]
    if sharded:
        raise ValueError(f"{sharded[0]} is sharded (FSDP): pass state_dict= a full state dict, e.g. "
                         f"torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                         f"StateDictOptions(full_state_dict=True, cpu_offload=True))")
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def _is_drop(key):
    """Dropout rates are training settings, left out of saved configs as timm does."""
    return key in ("drop_rate", "drop_path_rate", "drop_block_rate") or key.endswith("_drop_rate")


def _current_args(model):
    """Constructor arguments that follow the model's state (a new classifier, another input size)."""
    return {"num_classes": model.num_classes, "in_chans": model.patch_embed.in_chans,
            "global_pool": model.global_pool, "img_size": tuple(model.patch_embed.img_size)}


def _unrecorded_keywords(value):
    """'eps=1e-12' for a ``functools.partial`` constructor argument with keywords (a norm layer with its own eps),
    which no JSON value in config.json can carry; '' for anything else."""
    if isinstance(value, functools.partial) and value.keywords:
        return ", ".join(f"{k}={v!r}" for k, v in value.keywords.items())
    return ""


def hub_config(model, architecture=None, model_args=None, model_config=None):
    """The ``config.json`` dict of timm's Hub layout for ``model`` (what ``timm.models.save_for_hf`` writes)."""
    extra = dict(model_config or {})
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = architecture or extra.pop("architecture", None) or cfg.get("architecture")
    if not architecture:
        raise ValueError("the model has no pretrained_cfg naming its architecture (models from fastvit.create_model "
                         "have one): pass architecture='vit_...' and model_args={...}")
    if not cfg:
        cfg = get_pretrained_cfg(architecture)
    cfg = {k: v for k, v in cfg.items() if k not in _SOURCE_KEYS and (v is not None or k in _KEEP_NULL)}
    cfg.update(extra.pop("pretrained_cfg", {}))
    cfg.pop("architecture", None)

    given = dict(model_args or {})
    args = {k: v for k, v in getattr(model, "_model_args", {}).items() if k not in RUNTIME_ARGS and not _is_drop(k)}
    for key in given.keys() & args.keys():
        lost = _unrecorded_keywords(args[key])
        if lost:
            warnings.warn(f"model_args {key}={given[key]!r} stands in for {args[key]!r} in config.json: its "
                          f"{lost} is not recorded, so a model built from this folder computes with "
                          f"{given[key]!r}'s own settings (other outputs)", stacklevel=3)
    args.update(given)
    for key, value in _current_args(model).items():
        supplied = _pair(given[key]) if key == "img_size" and key in given else given.get(key, value)
        if supplied != value:
            raise ValueError(f"model_args {key}={given[key]!r} disagrees with the model ({value!r})")
        args[key] = value
    for key, value in args.items():
        try:
            json.dumps(value)
        except TypeError as err:
            lost = _unrecorded_keywords(value)
            raise ValueError(f"constructor argument {key}={value!r} cannot be written to config.json: pass "
                             f"model_args={{{key!r}: <a JSON value the builder accepts>}}"
                             + (f" (no JSON value records its {lost}: a model built from the folder would compute "
                                f"without it)" if lost else "")) from err

    fixed = not getattr(model, "dynamic_img_size", False)
    size = args["img_size"] if fixed else tuple(cfg.get("input_size", (3, *args["img_size"])))[-2:]
    cfg.update(input_size=(args["in_chans"], *size), fixed_input_size=fixed, custom_load=False)
    cfg.pop("label_offset", None)
    if fixed:
        cfg.pop("test_input_size", None)
    if model.num_classes != cfg.get("num_classes"):
        for key in ("label_names", "label_descriptions"):
            cfg.pop(key, None)
    cfg["num_classes"] = model.num_classes

    config = {"architecture": architecture, "num_classes": model.num_classes, "num_features": model.num_features}
    if isinstance(model.global_pool, str) and model.global_pool:
        config["global_pool"] = model.global_pool
    for key in ("label_names", "label_descriptions"):
        if extra.get(key):
            config[key] = extra.pop(key)
    config.update(model_args=args, pretrained_cfg=cfg, **extra)
    return json.loads(json.dumps(config))  # tuples -> lists, as the file holds them


def _check_rebuilds(config, tensors):
    """The config must rebuild a model of exactly these tensor shapes, or loading the folder would fail later."""
    with torch.device("meta"):
        ref = model_entrypoint(config["architecture"])(**config["model_args"]).state_dict()
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    want = {k: tuple(v.shape) for k, v in ref.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise ValueError(f"config.json would not rebuild this model: {config['architecture']}"
                         f"(**{config['model_args']}) differs in {diff}; pass model_args= with the constructor "
                         f"arguments the model was built with")


def save_pretrained(model, folder, architecture=None, model_args=None, model_config=None, state_dict=None):
    """Write ``model`` as timm's Hub folder: ``config.json`` (architecture, num_classes, model_args,
    pretrained_cfg, as ``timm.models.save_for_hf`` writes it) and ``model.safetensors``. Returns the folder.

    ``timm.create_model('local-dir:FOLDER', pretrained=True)``, ``fastvit.create_model('local-dir:FOLDER',
    pretrained=True)`` and a Hub upload of the folder (``hf-hub:``) load it. Models from ``fastvit.create_model``
    carry their architecture and constructor arguments; for another model pass ``architecture`` and
    ``model_args``. ``model_config`` adds top-level fields (``label_names``, ...) or ``pretrained_cfg`` entries;
    ``state_dict`` replaces ``model.state_dict()`` (e.g. a full state dict gathered from FSDP). The config is
    checked to rebuild the model's tensor shapes; files are written under temporary names and renamed, so an
    interrupted save never leaves a half-written file under the final name.
    """
    st = _safetensors()
    model = _unwrap(model)
    config = hub_config(model, architecture, model_args, model_config)
    tensors = _full_tensors(state_dict if state_dict is not None else model.state_dict())
    _check_rebuilds(config, tensors)
    os.makedirs(folder, exist_ok=True)
    weights, cfg_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    st.save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    with open(cfg_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(cfg_path + ".tmp", cfg_path)
    return folder
