"""Feature-extraction wrappers (``create_model(..., features_only=True)``) with timm's classes, outputs and
state_dict prefixes, so detection / segmentation code written for timm's ViT backbones runs unchanged.

- ``'getter'`` (the default for a ViT, as in timm): ``forward_intermediates`` of the wrapped model, (B, D, gh, gw)
  maps (or (B, N, D) tokens with ``output_fmt='NLC'``) with the blocks after the last one asked for pruned away.
- ``'hook'`` (or any name with 'hook', as timm reads it): forward hooks on the chosen blocks, returning their raw
  (B, [1 +] N, D) outputs.
- ``'fx'``: the same raw block outputs from a torch.fx graph of the model (torchvision's
  ``create_feature_extractor``), which compiles and exports as one graph.
A class is called as timm calls one: ``feature_cls(model, out_indices=..., **kwargs)``.
"""
from __future__ import annotations

import functools

import torch.nn as nn

from fastvit.model import feature_take_indices

class FeatureInfo:
    """What each returned feature is: its module, channels and reduction (timm's ``FeatureInfo`` interface)."""

    def __init__(self, info, out_indices):
        self.info = [dict(info[i]) for i in out_indices]
        self.out_indices = tuple(out_indices)

    def get(self, key, idx=None):
        if idx is None:
            return [f[key] for f in self.info]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys=None, idx=None):
        rows = self.info if idx is None else [self.info[i] for i in ([idx] if isinstance(idx, int) else idx)]
        return [dict(r) if keys is None else {k: r[k] for k in keys} for r in rows]

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self):
        return len(self.info)


class FeatureGetterNet(nn.ModuleDict):
    """Block outputs through the model's ``forward_intermediates`` (state_dict keys ``model.*``, as timm's)."""

    def __init__(self, model, out_indices=3, output_fmt="NCHW", norm=False, prune=True):
        super().__init__()
        if prune:
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            out_indices, _ = feature_take_indices(len(model.blocks), out_indices)
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.model = model
        self.out_indices = out_indices
        self.output_fmt = output_fmt
        self.norm = norm

    def forward(self, x):
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)


class FeatureHookNet(nn.ModuleDict):
    """Raw block outputs caught by forward hooks (state_dict keys ``body.*``, as timm's); the model runs whole,
    its head removed."""

    def __init__(self, model, out_indices=3):
        super().__init__()
        out_indices, _ = feature_take_indices(len(model.blocks), out_indices)
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.out_indices = out_indices
        model.reset_classifier(0)
        self.body = model
        self._outputs = {}
        for i in out_indices:
            # a bound method, not a closure: deepcopy (EMA) and pickle carry the hooks over to the copy's own
            model.blocks[i].register_forward_hook(functools.partial(self._keep, i))

    def _keep(self, index, module, args, output):
        self._outputs[index] = output

    def forward(self, x):
        self._outputs.clear()
        self.body(x)
        out = [self._outputs[i] for i in self.out_indices]
        self._outputs.clear()
        return out


class FeatureGraphNet(nn.Module):
    """Raw block outputs of a torch.fx graph of the model, the blocks' modules as return nodes (state_dict keys
    ``graph_module.*``, as timm's)."""

    def __init__(self, model, out_indices=3):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor
        out_indices, _ = feature_take_indices(len(model.blocks), out_indices)
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.out_indices = out_indices
        names = self.feature_info.module_name()
        self.graph_module = create_feature_extractor(model, dict(zip(names, names)))

    def forward(self, x):
        return list(self.graph_module(x).values())


def features_only(model, feature_cls="getter", out_indices=3, **kwargs):
    """Wrap ``model`` as a feature extractor: ``feature_cls`` 'getter', 'fx', a name with 'hook' (timm's rule for its
    names), or a class, called as ``feature_cls(model, out_indices=..., **kwargs)``."""
    if not isinstance(feature_cls, str):
        return feature_cls(model, out_indices=out_indices, **kwargs)
    name = feature_cls.lower()
    if name == "getter":
        return FeatureGetterNet(model, out_indices, **kwargs)
    if "hook" in name:
        return FeatureHookNet(model, out_indices, **kwargs)
    if name == "fx":
        return FeatureGraphNet(model, out_indices, **kwargs)
    raise ValueError(f"feature_cls must be 'getter', 'fx', a name with 'hook' or a feature class, got {feature_cls!r}")
