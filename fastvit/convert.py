"""Load ViT checkpoints from timm, torchvision, Hugging Face, Apple's MobileCLIP and JAX (.npz) into fastvit.

fastvit keeps timm's state_dict layout, so timm checkpoints load as they are. The ``from_*`` converters rename
(and where needed reshape) another layout's tensors into timm's; keys they do not know pass through unchanged, so
that ``load_checkpoint`` reports them as unexpected instead of dropping them silently.

Policy of ``load_checkpoint``:
- position tables are resampled in 2D when the checkpoint's patch grid differs from the model's
  (``fastvit.resample_abs_pos_embed``, bicubic with antialiasing), and a class-token row is moved between
  ``pos_embed`` and ``cls_token`` when only one side embeds it (exact: both add the same vector to the class token);
- a classifier of another size is a shape mismatch: with ``strict=True`` nothing is loaded and the error says how
  to proceed (``model.reset_classifier(K)`` to take the checkpoint's head, or ``strict=False`` to keep the model's
  head and load everything else); a headless model (``num_classes=0``) ignores the checkpoint's classifier;
- errors list missing keys, unexpected keys and shape mismatches (``CheckpointMismatchError``, a ValueError).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
# numpy's scalar pickler under its 2.x name, which numpy 1.26 also answers (np._core there is a partial shim)
from numpy._core.multiarray import scalar as _np_scalar

from fastvit.resample import (resample_abs_pos_embed, resample_patch_embed, resample_pos_embed_1d,
                              resample_rel_pos_table)

__all__ = ["CheckpointMismatchError", "LoadResult", "check_hf_eps", "from_hf", "from_mobileclip", "from_npz",
           "from_torchvision", "load_checkpoint", "load_state_dict_read", "read_checkpoint"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Keys that wrap a state_dict in training checkpoints (timm train.py, torchvision references, common scripts).
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Prefixes added by DistributedDataParallel, torch.compile and Lightning-style wrappers.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")
_MAX_LISTED = 20


class LoadResult(NamedTuple):
    """What ``load_checkpoint`` did: keys left out of the load, and the checkpoint layout it detected.

    ``mismatched_keys`` holds ``(key, checkpoint_shape, model_shape)``; ``ignored_keys`` the checkpoint's classifier
    when the model is headless. With ``strict=True`` a returned result has empty missing/unexpected/mismatched lists.
    """
    missing_keys: list
    unexpected_keys: list
    mismatched_keys: list
    ignored_keys: list
    layout: str


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model; ``result`` is the ``LoadResult`` a non-strict load would return."""

    def __init__(self, result: LoadResult, model_name: str, hints=()):
        self.result, self.model_name = result, model_name
        self.missing_keys = result.missing_keys
        self.unexpected_keys = result.unexpected_keys
        self.mismatched_keys = result.mismatched_keys
        lines = [f"checkpoint ({result.layout} layout) does not match {model_name}; nothing was loaded"]
        if result.missing_keys:
            lines.append(f"  missing keys ({len(result.missing_keys)}): {_listing(result.missing_keys)}")
        if result.unexpected_keys:
            lines.append(f"  unexpected keys ({len(result.unexpected_keys)}): {_listing(result.unexpected_keys)}")
        if result.mismatched_keys:
            items = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in result.mismatched_keys]
            lines.append(f"  shape mismatches ({len(items)}): {_listing(items, sep='; ')}")
        lines += [f"  hint: {h}" for h in hints]
        super().__init__("\n".join(lines))


def _listing(items, sep=", "):
    shown = sep.join(items[:_MAX_LISTED])
    return shown + (f"{sep}... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _rename(key, rules):
    """Apply the first matching (anchored regex, replacement) rule; unknown keys are returned unchanged."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


# ---- torchvision ---------------------------------------------------------------------------------------------
_TV_BLOCK = r"^encoder\.layers\.encoder_layer_(\d+)\."
_TORCHVISION_RULES = [
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (_TV_BLOCK + r"ln_1\.", r"blocks.\1.norm1."),
    (_TV_BLOCK + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (_TV_BLOCK + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_TV_BLOCK + r"ln_2\.", r"blocks.\1.norm2."),
    (_TV_BLOCK + r"mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),  # linear_1/2: torchvision < 0.13 names
    (_TV_BLOCK + r"mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
]


def from_torchvision(state_dict):
    """torchvision ``VisionTransformer`` (vit_b_16, ...) state_dict -> timm layout.

    torchvision packs q, k, v into ``in_proj_weight`` in the same order as timm's ``qkv``, so only names change.
    """
    return {_rename(k, _TORCHVISION_RULES): v for k, v in state_dict.items()}


# ---- Hugging Face transformers --------------------------------------------------------------------------------
_HF_BLOCK = r"^(?:encoder\.layer|layers)\.(\d+)\."
_HF_QKV = [re.compile(_HF_BLOCK + r"attention\.attention\.(query|key|value)\.(weight|bias)$"),  # on disk, 4.x
           re.compile(_HF_BLOCK + r"attention\.([qkv])_proj\.(weight|bias)$")]  # transformers 5.x in memory
_HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_HF_BLOCK + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_HF_BLOCK + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_HF_BLOCK + r"(?:attention\.output\.dense|attention\.o_proj)\.", r"blocks.\1.attn.proj."),
    (_HF_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_HF_BLOCK + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def from_hf(state_dict):
    """Hugging Face ``ViTForImageClassification`` / ``ViTModel`` state_dict -> timm layout.

    Accepts the on-disk (transformers 4.x) names and the transformers 5.x in-memory names, with or without the
    ``vit.`` prefix. Separate query/key/value projections are concatenated into ``qkv``; ``ViTModel``'s pooler (a
    tanh layer that timm's ViT does not have) is dropped. A state_dict carries no LayerNorm eps: HF's default is
    1e-12 against timm's 1e-6 (``load_checkpoint`` on an HF folder warns when its config.json differs from the model).
    """
    out, qkv = {}, {}
    for key, value in state_dict.items():
        name = key[len("vit."):] if key.startswith("vit.") else key
        if name.startswith("pooler."):
            continue
        match = next((m for m in (p.match(name) for p in _HF_QKV) if m), None)
        if match:
            block, which, param = match.groups()
            qkv.setdefault((int(block), param), {})[which[0]] = value
            continue
        out[_rename(name, _HF_RULES)] = value
    for (block, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {block} {param}: expected query, key and value tensors, found only "
                             f"{sorted(parts)}")
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---- Apple's MobileCLIP (ml-mobileclip) -----------------------------------------------------------------------
MOBILECLIP_PREFIX = "image_encoder.model."
_MOBILECLIP_BLOCK = r"^transformer\.(\d+)\."
_MOBILECLIP_RULES = [
    (r"^patch_emb\.(\d+)\.block\.conv\.", r"patch_embed.backbone.\1.conv."),
    (r"^patch_emb\.(\d+)\.block\.norm\.", r"patch_embed.backbone.\1.bn."),
    (r"^post_transformer_norm\.", "norm."),
    (_MOBILECLIP_BLOCK + r"pre_norm_mha\.0\.", r"blocks.\1.norm1."),
    (_MOBILECLIP_BLOCK + r"pre_norm_mha\.1\.qkv_proj\.", r"blocks.\1.attn.qkv."),
    (_MOBILECLIP_BLOCK + r"pre_norm_mha\.1\.out_proj\.", r"blocks.\1.attn.proj."),
    (_MOBILECLIP_BLOCK + r"pre_norm_ffn\.0\.", r"blocks.\1.norm2."),
    (_MOBILECLIP_BLOCK + r"pre_norm_ffn\.1\.", r"blocks.\1.mlp.fc1."),
    (_MOBILECLIP_BLOCK + r"pre_norm_ffn\.4\.", r"blocks.\1.mlp.fc2."),
    (r"^pos_embed\.pos_embed\.pos_embed$", "pos_embed"),
]


def from_mobileclip(state_dict):
    """A MobileCLIP checkpoint of Apple's (ml-mobileclip, ViT-B/16 image encoder: ``vit_base_mci_224``) -> timm
    layout: the image encoder's tensors renamed, the text encoder's dropped; the (D, K) projection into the joint
    embedding becomes a (K, D) head with a zero bias, and the (1, 1, N, D) position table (1, N, D)."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(MOBILECLIP_PREFIX):
            continue
        name = key[len(MOBILECLIP_PREFIX):]
        if name == "classifier.proj":
            out["head.weight"], out["head.bias"] = value.T, value.new_zeros(value.shape[1])
            continue
        name = _rename(name, _MOBILECLIP_RULES)
        out[name] = value.squeeze(0) if name == "pos_embed" else value
    return out


# ---- JAX .npz (google-research/vision_transformer and big_vision) --------------------------------------------
_NPZ_BLOCK = re.compile(r"^Transformer/encoderblock(?:_(\d+))?/(.+)$")
_NPZ_RULES = [
    (r"^embedding/bias$", "patch_embed.proj.bias"),
    (r"^cls$", "cls_token"),
    (r"^(?:Transformer/posembed_input/)?pos_embedding$", "pos_embed"),  # original ViT / big_vision
    (r"^Transformer/encoder_norm/scale$", "norm.weight"),
    (r"^Transformer/encoder_norm/bias$", "norm.bias"),
    (r"^head/bias$", "head.bias"),
]


def _npz_block(i, w):
    """One encoder block's Flax tensors -> timm names (Flax Dense kernels are (in, out): transpose).

    The sub-module indices differ between the original ViT (LayerNorm_0/2, MultiHeadDotProductAttention_1,
    MlpBlock_3) and big_vision (LayerNorm_0/1, ..._0, MlpBlock_0): LayerNorm_0 is norm1, the other one norm2.
    """
    out, qkv, rest = {}, {}, {}
    p = f"blocks.{i}."
    for name, t in w.items():
        ln = re.match(r"^LayerNorm_(\d+)/(scale|bias)$", name)
        mha = re.match(r"^MultiHeadDotProductAttention_\d+/(query|key|value|out)/(kernel|bias)$", name)
        mlp = re.match(r"^MlpBlock_\d+/Dense_([01])/(kernel|bias)$", name)
        if ln:
            norm = "norm1" if ln.group(1) == "0" else "norm2"
            out[f"{p}{norm}.{'weight' if ln.group(2) == 'scale' else 'bias'}"] = t
        elif mha and mha.group(1) == "out":  # kernel (heads, head_dim, D)
            out[p + "attn.proj." + ("weight" if mha.group(2) == "kernel" else "bias")] = (
                t.reshape(-1, t.shape[-1]).T if mha.group(2) == "kernel" else t)
        elif mha:  # kernel (D, heads, head_dim), bias (heads, head_dim)
            param = "weight" if mha.group(2) == "kernel" else "bias"
            qkv.setdefault(param, {})[mha.group(1)] = t.reshape(t.shape[0], -1).T if param == "weight" else \
                t.reshape(-1)
        elif mlp:
            fc = f"{p}mlp.fc{int(mlp.group(1)) + 1}."
            out[fc + ("weight" if mlp.group(2) == "kernel" else "bias")] = t.T if mlp.group(2) == "kernel" else t
        else:
            rest[name] = t
    for param, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"encoder block {i} {param}: expected query, key and value tensors, found only "
                             f"{sorted(parts)}")
        out[f"{p}attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out, rest


def _npz_tensor(array):
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16 saved by JAX: raw 16-bit words
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


_NPZ_BACKBONE = re.compile(r"^(?:(conv_root|gn_root)|block(\d+)/unit(\d+)/(conv|gn)(1|2|3|_proj))/(kernel|scale|bias)$")


def hybrid_backbone_from_npz(npz, prefix=""):
    """Split the ResNet of an original R50+ViT ``.npz`` (google-research/vision_transformer) into timm names.

    ``npz``: a mapping of array names to numpy arrays or tensors; only names starting with ``prefix`` are read.
    Returns ``(backbone_state_dict, rest)``: ``patch_embed.backbone.*`` tensors (conv kernels HWIO -> OIHW,
    GroupNorm scale/bias flattened), and every other entry of ``npz`` unchanged (the ViT part, for ``from_npz``).
    Names: ``conv_root``/``gn_root`` -> ``stem.conv``/``stem.norm``; ``block{i}/unit{j}/conv{r}``/``gn{r}`` ->
    ``stages.{i-1}.blocks.{j-1}.conv{r}``/``norm{r}``; ``conv_proj``/``gn_proj`` -> ``downsample.conv``/``.norm``.
    A checkpoint without a backbone returns ``({}, dict(npz))``, so ``from_npz`` can call this unconditionally.
    """
    out, rest = {}, {}
    for key, value in npz.items():
        match = _NPZ_BACKBONE.match(key[len(prefix):]) if key.startswith(prefix) else None
        if match is None:
            rest[key] = value
            continue
        root, stage, unit, kind, which, param = match.groups()
        if root:
            module = "stem.conv" if root == "conv_root" else "stem.norm"
        else:
            layer = {"conv": "conv", "gn": "norm"}[kind]
            sub = f"downsample.{layer}" if which == "_proj" else f"{layer}{which}"
            module = f"stages.{int(stage) - 1}.blocks.{int(unit) - 1}.{sub}"
        t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else torch.as_tensor(value)
        if param == "kernel":
            if t.ndim != 4:
                raise ValueError(f"{key}: expected a 4D HWIO convolution kernel, got shape {tuple(t.shape)}")
            t = t.permute(3, 2, 0, 1)
        else:
            t = t.reshape(-1)  # GroupNorm parameters may be stored as (1, 1, 1, C)
        name = "weight" if param in ("kernel", "scale") else "bias"
        out[f"patch_embed.backbone.{module}.{name}"] = t.contiguous()
    return out, rest


def from_npz(path):
    """Original ViT / big_vision ``.npz`` (a path, or a mapping of its arrays) -> timm layout.

    Handles the parameter prefixes '', 'opt/target/', 'params/', 'params/img/' (keys outside the prefix, e.g.
    optimizer state, are skipped), scanned checkpoints whose blocks are stacked along a leading depth axis, and
    bfloat16 arrays stored as 2-byte void (how numpy saves JAX's bfloat16 without ml_dtypes).
    big_vision tables without a class-token row stay so; ``load_checkpoint`` fits them to the model.
    """
    if isinstance(path, Mapping):
        arrays = dict(path)
    else:
        with np.load(os.fspath(path)) as f:
            arrays = {k: f[k] for k in f.files}
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise ValueError(f"not a ViT .npz checkpoint: expected an 'embedding/kernel' array under one of the "
                         f"prefixes {NPZ_PREFIXES}, found {_listing(sorted(arrays))}")
    w = {k[len(prefix):]: _npz_tensor(v) for k, v in arrays.items() if k.startswith(prefix)}
    out, w = hybrid_backbone_from_npz(w)  # R50+ViT hybrids: conv_root / gn_root / block* arrays
    blocks = {}
    for name, t in w.items():
        block = _NPZ_BLOCK.match(name)
        if block and block.group(1) is not None:
            blocks.setdefault(int(block.group(1)), {})[block.group(2)] = t
        elif block:  # scanned: one array per parameter, depth first
            for i, layer in enumerate(t.unbind(0)):
                blocks.setdefault(i, {})[block.group(2)] = layer
        elif name == "embedding/kernel":  # HWIO -> OIHW
            out["patch_embed.proj.weight"] = t.permute(3, 2, 0, 1)
        elif name == "head/kernel":
            out["head.weight"] = t.T
        else:
            out[_rename(name, _NPZ_RULES)] = t
    for i in sorted(blocks):
        converted, rest = _npz_block(i, blocks[i])
        out.update(converted)
        out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in rest.items()})
    return {k: v.contiguous() for k, v in out.items()}


# ---- reading and detecting ------------------------------------------------------------------------------------
def _read_hf_dir(path):
    """A ``save_pretrained`` / hub snapshot folder: one weights file or an index of shards."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(_read_file(os.path.join(path, shard)))
            return sd
        if os.path.exists(os.path.join(path, single)):
            return _read_file(os.path.join(path, single))
    raise FileNotFoundError(f"{path} holds no model.safetensors, pytorch_model.bin or shard index")


def _hf_config_eps(path):
    """The ``layer_norm_eps`` of an HF model folder's config.json; None for anything else or where it is unstated."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            eps = json.load(f).get("layer_norm_eps")
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: the weights alone decide
        return None
    return float(eps) if isinstance(eps, (int, float)) else None


def check_hf_eps(model, path):
    """Warn when an HF folder's LayerNorm eps differs from the model's: the weights load either way, but outputs
    then differ from the HF model's (by ~1e-3 at random weights for 1e-12 against 1e-6). For a caller that reads
    the folder's weights with :func:`read_checkpoint` and loads the state_dict."""
    eps = _hf_config_eps(path)
    if eps is None:
        return
    model_eps = sorted({m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)})
    if model_eps and model_eps != [eps]:
        shown = ", ".join(f"{e:g}" for e in model_eps)
        warnings.warn(f"{os.path.join(path, 'config.json')} has layer_norm_eps={eps:g}, the model's LayerNorms use eps "
                      f"{shown}: outputs will differ slightly from the Hugging Face model's; for the same outputs "
                      f"build it with norm_layer=functools.partial(torch.nn.LayerNorm, eps={eps:g})", stacklevel=3)


# what training scripts put beside the weights, allowed in a weights-only load: timm's and DeiT's train.py save
# their argparse.Namespace ('args'), others a numpy metric; plain data with no code of their own
_TRAINING_CHECKPOINT_GLOBALS = [argparse.Namespace, np.dtype, _np_scalar,
                                *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64))]


def _read_file(path):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise ValueError(f"unsupported checkpoint file {path!r}: expected one of "
                         f"{('.safetensors', '.npz') + TORCH_SUFFIXES} or a Hugging Face model folder")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        with torch.serialization.safe_globals(_TRAINING_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ImportError, MemoryError):  # not found, unreadable: the system's own words
        raise
    except Exception as e:  # a truncated or foreign file raises anything from KeyError to UnpicklingError
        kind = "safetensors" if suffix == ".safetensors" else "PyTorch (torch.save)"
        # torch's weights-only refusal is a page of advice; its one line that names the object is what matters
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        # of the rest of that page, the unpickler's own line ("Unsupported operand 233": not a pickle at all); its
        # advice to load with weights_only=False is no help for a file that is no checkpoint
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)\s*$", str(e), re.MULTILINE)
        reason = (f"it holds a {unsafe.group(1)}, which torch.load(weights_only=True) does not build: tensors and "
                  f"plain containers only" if unsafe else
                  f"damaged, or another kind of file: {type(e).__name__}: {unpickler.group(1) if unpickler else e}")
        raise ValueError(f"{path} is not a readable {kind} checkpoint ({reason})") from e


def _unwrap(obj):
    """Find the state_dict inside a training checkpoint and strip DDP / torch.compile / wrapper prefixes."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"expected a state_dict or a checkpoint holding one under {CONTAINER_KEYS}, got "
                         f"{type(obj).__name__} with keys {_listing(list(obj)) if isinstance(obj, Mapping) else '-'}")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in obj):
                obj = {k[len(prefix):]: v for k, v in obj.items()}
                stripped = True
    return dict(obj)


def _detect_layout(sd):
    if "patch_embed.proj.weight" in sd or "patch_embed.backbone.0.conv.weight" in sd:  # the latter: MobileCLIP's
        return "timm"
    if MOBILECLIP_PREFIX + "patch_emb.0.block.conv.weight" in sd:
        return "mobileclip"
    if "conv_proj.weight" in sd or "class_token" in sd:
        return "torchvision"
    if any(k in sd for k in ("embeddings.patch_embeddings.projection.weight",
                             "vit.embeddings.patch_embeddings.projection.weight")):
        return "hf"
    if any(f"{p}embedding/kernel" in sd for p in NPZ_PREFIXES):
        return "npz"
    raise ValueError(f"unrecognised checkpoint layout: expected a timm ('patch_embed.proj.weight'), torchvision "
                     f"('conv_proj.weight'), Hugging Face ('vit.embeddings.patch_embeddings.projection.weight'), "
                     f"MobileCLIP ('{MOBILECLIP_PREFIX}patch_emb.0.block.conv.weight') or JAX ('embedding/kernel') "
                     f"key; found {_listing(sorted(map(str, sd)))}")


_CONVERTERS = {"timm": dict, "torchvision": from_torchvision, "hf": from_hf, "mobileclip": from_mobileclip,
               "npz": from_npz}


def read_checkpoint(path_or_state_dict):
    """Any supported source (a path as ``load_checkpoint`` takes, or a state_dict) -> (timm-layout state_dict,
    layout name: 'timm', 'torchvision', 'hf', 'mobileclip' or 'npz'), without fitting it to a model."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.lower().endswith(".npz"):
            return from_npz(path), "npz"
        raw = _read_hf_dir(path) if os.path.isdir(path) else _read_file(path)
    elif isinstance(path_or_state_dict, Mapping):
        raw = path_or_state_dict
    else:
        raise TypeError(f"expected a checkpoint path or a state_dict mapping, got {type(path_or_state_dict).__name__}")
    sd = _unwrap(raw)
    layout = _detect_layout(sd)
    sd = _CONVERTERS[layout](sd)
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} is a {type(v).__name__}, expected a torch.Tensor")
    return sd, layout


# ---- fitting the tables to the model's grid -------------------------------------------------------------------
def _square_side(n):
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def _fit_pos_embed(model, sd, target_shape, **resize):
    """Move the class-token row to where the model keeps it, then resample the grid rows to the model's grid
    (``resize``: resample_abs_pos_embed's interpolation / antialias)."""
    table = sd["pos_embed"]
    if table.ndim != 3 or table.shape[0] != target_shape[0] or table.shape[2] != target_shape[2]:
        return
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    rows = table.shape[1]
    ckpt_prefix = next((p for p in dict.fromkeys((model_prefix, 0, 1)) if _square_side(rows - p)), None)
    if ckpt_prefix is None:
        return
    if ckpt_prefix != model_prefix:
        foldable = model.has_class_token and "cls_token" in sd and table.shape[0] == 1
        if not foldable or abs(ckpt_prefix - model_prefix) != 1:
            return
        if ckpt_prefix == 1:  # model adds no position to the class token: fold its row into cls_token
            sd["cls_token"] = sd["cls_token"] + table[:, :1]
            table = table[:, 1:]
    side = _square_side(rows - ckpt_prefix)
    if ckpt_prefix < model_prefix:  # model adds a class-token row: zero keeps the class token as the checkpoint had it
        table = torch.cat([table.new_zeros(1, 1, table.shape[2]), table], dim=1)
        # n^2 rows are also an (n-1) x (n+1) grid with a class row, which no state_dict tells apart
        warnings.warn(f"pos_embed's {rows} rows were read as a {side}x{side} patch grid without a class-token row "
                      f"(the class token gets a zero row); a checkpoint of a {side - 1}x{side + 1} grid with a class "
                      f"row reads the same: load that at its own image size, then call set_input_size", stacklevel=4)
    sd["pos_embed"] = resample_abs_pos_embed(table, model.patch_embed.grid_size, (side, side), model_prefix, **resize)


def _fit_tables(model, sd, expected, **resize):
    """Adapt what follows the patch size and grid: the patch projection (resampled to the model's patch size, as
    timm's checkpoint filter does), position tables (learned 1D, learned 2D, relative bias). ``resize``: the
    interpolation / antialias of the first two (bicubic, antialiased by default)."""
    key = "patch_embed.proj.weight"
    t, want = sd.get(key), expected.get(key)
    if t is not None and want is not None and t.ndim == want.ndim == 4 and t.shape[:2] == want.shape[:2] \
            and t.shape[2:] != want.shape[2:]:
        sd[key] = resample_patch_embed(t, tuple(want.shape[2:]), **resize)
    if "pos_embed" in sd and "pos_embed" in expected and sd["pos_embed"].shape != expected["pos_embed"].shape:
        _fit_pos_embed(model, sd, expected["pos_embed"].shape, **resize)
    for key in ("pos_embed_h", "pos_embed_w"):
        t, want = sd.get(key), expected.get(key)
        if t is not None and want is not None and t.shape != want.shape and t.ndim == 3 and \
                (t.shape[0], t.shape[2]) == (want.shape[0], want.shape[2]):
            sd[key] = resample_pos_embed_1d(t, want.shape[1])
    grid = model.patch_embed.grid_size
    for key, want in expected.items():
        t = sd.get(key)
        if not key.endswith("attn.rel_pos_table") or t is None or t.shape == want.shape or t.shape[0] != want.shape[0]:
            continue
        extra = want.shape[1] - (2 * grid[0] - 1) * (2 * grid[1] - 1)
        offsets = _square_side(t.shape[1] - extra)
        if offsets and offsets % 2:
            side = (offsets + 1) // 2
            sd[key] = resample_rel_pos_table(t, (side, side), grid, num_extra=extra)


def _hints(model, result, caller="load_checkpoint"):
    """What to do about a mismatch, in the arguments of the call that loaded: ``load_checkpoint``, or
    ``create_model`` with a ``checkpoint_path`` or ``pretrained`` weights (no model yet to reset there, and strict is
    pretrained_strict)."""
    hints = []
    strict = "strict=False" if caller == "load_checkpoint" else "pretrained_strict=False"
    head = [m for m in result.mismatched_keys if m[0] == "head.weight"]
    if head:
        k = head[0][1][0]
        take = {"load_checkpoint": f"call model.reset_classifier({k}) first",
                "checkpoint_path": f"build it with num_classes={k}",
                "pretrained": f"pass pretrained_cfg_overlay=dict(num_classes={k}) (the weights' class count)"}[caller]
        hints.append(f"the classifier differs (checkpoint {k} classes, model {model.num_classes}): {take} to take "
                     f"the checkpoint's head, or pass {strict} to keep the model's head and load everything else")
    elif "head.weight" in result.missing_keys:
        hints.append(f"the checkpoint has no classifier: build the model with num_classes=0, or pass {strict} to "
                     f"keep the model's freshly initialised head")
    widths = [(ckpt[-1], own[-1]) for key, ckpt, own in result.mismatched_keys
              if key in ("cls_token", "pos_embed", "norm.weight") and ckpt[-1] != own[-1]]
    if widths:
        a, b = widths[0]
        hints.append(f"the checkpoint's embedding width is {a}, the model's {b}: it holds a model of another size "
                     f"(embed_dim, depth, num_heads)")
    elif any(m[0] == "pos_embed" for m in result.mismatched_keys):
        hints.append("pos_embed could not be fitted to the model's grid: check img_size, patch_size, class_token "
                     "and no_embed_class against the checkpoint")
    return hints


def load_checkpoint(model, path_or_state_dict, strict=True, name=None):
    """Load a timm, torchvision, Hugging Face or JAX .npz ViT checkpoint into ``model`` (timm-layout ViT).

    ``path_or_state_dict``: a ``.pth/.pt/.bin/.ckpt/.tar`` file (``torch.load(weights_only=True)``), a
    ``.safetensors`` file, a ``.npz`` file, a Hugging Face model folder, or a (possibly wrapped) state_dict.
    Position tables are resampled to the model's grid. With ``strict=True`` (default) any missing key, unexpected
    key or shape mismatch raises ``CheckpointMismatchError`` listing them and leaves the model untouched; with
    ``strict=False`` every tensor that fits is loaded and the rest is reported. Returns a ``LoadResult``.
    ``name`` names the model in errors (default: its class name).
    """
    sd, layout = read_checkpoint(path_or_state_dict)
    if layout == "hf":
        check_hf_eps(model, path_or_state_dict)
    return load_state_dict_read(model, sd, layout, strict, name)


def load_state_dict_read(model, sd, layout, strict=True, name=None):
    """:func:`load_checkpoint` of what :func:`read_checkpoint` gave (``sd``, ``layout``), for a caller that looked
    at the weights first (a folder is read once). The layout decides how position tables are resampled."""
    expected = model.state_dict()
    ignored = []
    if "head.weight" not in expected:  # headless model: the checkpoint's classifier has nowhere to go
        ignored = [k for k in ("head.weight", "head.bias") if k in sd]
        for k in ignored:
            del sd[k]
    # timm's .npz loader resizes bilinearly without antialiasing, as the original ViT code does; its state_dict
    # filter bicubically with it
    _fit_tables(model, sd, expected, **(dict(interpolation="bilinear", antialias=False) if layout == "npz" else {}))
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in sd.items()
                  if k in expected and v.shape != expected[k].shape]
    result = LoadResult(missing, unexpected, mismatched, ignored, layout)
    if strict and (missing or unexpected or mismatched):
        raise CheckpointMismatchError(result, name or type(model).__name__, _hints(model, result))
    skip = {k for k, _, _ in mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k in expected and k not in skip}, strict=False)
    return result
