"""Write fastvit/pretrained_cfgs.json: timm's ViT architectures that fastvit builds, with their constructor arguments
and pretrained configs.

Where the values come from: the installed timm. Its ``timm/models/vision_transformer.py`` entry points give each
architecture's constructor arguments (read by calling the entry point with the model build intercepted); its
registry gives the pretrained configs, built from the ``default_cfgs`` tables of ``vision_transformer.py`` and
``vision_transformer_hybrid.py`` (``timm.models.get_arch_pretrained_cfgs``, tags in timm's priority order, the
default first). An architecture is taken when every argument is one fastvit's VisionTransformer has (norm and
activation layers and gated MLPs by name: ``fastvit.model.norm_layer_of``, ``act_layer_of``, ``mlp_layer_of``)
and the model it builds has timm's parameter names and shapes; the others are listed under ``skipped`` with the
reason. The hybrids are
registered in code (``fastvit.hybrid``); their configs are written too. Run after upgrading timm:

    python scripts/gen_pretrained_cfgs.py
"""
import functools
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parents[1] / "fastvit" / "pretrained_cfgs.json"


class _Intercepted(Exception):
    pass


def timm_vit_args():
    """{name: the keyword arguments timm's entry point passes to its ViT builder} for every ViT in
    ``timm.models.vision_transformer``."""
    import timm
    import timm.models.vision_transformer as tv

    captured = {}

    def intercept(variant, pretrained=False, **kwargs):
        captured[variant] = kwargs
        raise _Intercepted

    build, tv._create_vision_transformer = tv._create_vision_transformer, intercept
    try:
        for name in timm.list_models(module="vision_transformer"):
            try:
                getattr(tv, name)()
            except _Intercepted:
                pass
    finally:
        tv._create_vision_transformer = build
    return captured


def _norm_arg(layer):
    """timm's norm_layer as JSON: 'layernorm' / 'rmsnorm', or [name, eps]; None when it is another layer."""
    import torch.nn as nn
    from timm.layers import LayerNorm, RmsNorm

    eps = None
    if isinstance(layer, functools.partial) and set(layer.keywords) <= {"eps"} and not layer.args:
        layer, eps = layer.func, layer.keywords.get("eps")
    names = {LayerNorm: "layernorm", nn.LayerNorm: "layernorm", RmsNorm: "rmsnorm", nn.RMSNorm: "rmsnorm",
             "layernorm": "layernorm", "rmsnorm": "rmsnorm"}
    name = names.get(layer) if isinstance(layer, (type, str)) else None
    if name is None:
        return None
    return name if eps is None else [name, eps]


def _act_arg(layer):
    import torch.nn as nn

    from fastvit.model import ACT_LAYERS
    if isinstance(layer, str):
        return layer if layer in ACT_LAYERS else None
    return {nn.GELU: "gelu", nn.SiLU: "silu", nn.ReLU: "relu"}.get(layer)


def _mlp_arg(layer):
    """timm's mlp_layer as one of fastvit.model.MLP_LAYERS' names, or None."""
    import torch.nn as nn
    from timm.layers import GluMlp, SwiGLU

    if layer is SwiGLU:
        return "swiglu"
    if layer is GluMlp:
        return "glu"
    if (isinstance(layer, functools.partial) and layer.func is GluMlp and not layer.args
            and layer.keywords == {"act_layer": nn.SiLU, "gate_last": False}):
        return "swiglu_packed"
    return None


def _block_arg(block):
    """timm's block_fn as one of fastvit.model.BLOCK_FNS' names (timm's class names), or None."""
    import timm.models.vision_transformer as tv

    from fastvit.model import BLOCK_FNS
    name = getattr(block, "__name__", None)
    return name if name in BLOCK_FNS and getattr(tv, name, None) is block else None


def as_json_args(kwargs):
    """(JSON arguments, None) for timm's constructor arguments, or (None, why not)."""
    args = {}
    for key, value in kwargs.items():
        if key in ("norm_layer", "embed_norm_layer"):
            value = _norm_arg(value)
        elif key == "act_layer":
            value = _act_arg(value)
        elif key == "mlp_layer":
            value = _mlp_arg(value)
        elif key == "block_fn":
            value = _block_arg(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif not isinstance(value, (int, float, str, bool, type(None))):
            value = None
        if value is None and kwargs[key] is not None:
            return None, f"{key}={getattr(kwargs[key], '__name__', kwargs[key])!r}"
        args[key] = value
    return args, None


def _same_parameters(name, args):
    """Why fastvit's model of ``args`` differs from timm's ``name`` in parameter names or shapes, or None."""
    import timm
    import torch

    from fastvit.factory import _cfg_defaults
    from fastvit.model import VisionTransformer, constructor_args
    with torch.device("meta"):
        try:
            kwargs = _cfg_defaults(timm.models.get_pretrained_cfg(name).to_dict(), constructor_args(args))
            ours = VisionTransformer(**kwargs).state_dict()
        except (TypeError, ValueError) as e:
            return str(e).split("\n")[0]
        # only names and shapes are compared: timm's init runs its clamps through Python decompositions on meta
        # tensors (0.3 s a model)
        theirs = timm.create_model(name, weight_init="skip").state_dict()
    ours, theirs = ({k: tuple(v.shape) for k, v in sd.items()} for sd in (ours, theirs))
    return None if ours == theirs else f"parameters differ: {sorted(set(ours.items()) ^ set(theirs.items()))[:2]}"


def build_table():
    """The file's content as a dict."""
    import timm
    from timm.models import PretrainedCfg, get_arch_pretrained_cfgs, get_deprecated_models

    import fastvit

    archs, skipped = {}, {}
    for name, kwargs in timm_vit_args().items():
        args, why = as_json_args(kwargs)
        if why is None:
            why = _same_parameters(name, args)
        if why is None:
            archs[name] = args
        else:
            skipped[name] = why
    archs.update((name, None) for name in fastvit.list_models(module="vision_transformer_hybrid"))
    models = {}
    for arch, args in archs.items():
        cfgs = get_arch_pretrained_cfgs(arch)
        if not cfgs:
            raise ValueError(f"timm {timm.__version__} has no pretrained configs for {arch}")
        tags = [name.partition(".")[2] for name in cfgs]
        models[arch] = {"tags": tags, "cfgs": {tag: cfg.to_dict() for tag, cfg in zip(tags, cfgs.values())}}
        if args is not None:
            models[arch]["args"] = args
    # timm's deprecated names (vit_base_patch16_224_in21k, ...) and the 'arch.tag' each now maps to, where fastvit
    # builds that architecture
    deprecated = {old: new for module in ("vision_transformer", "vision_transformer_hybrid")
                  for old, new in get_deprecated_models(module).items()
                  if new is not None and new.partition(".")[0] in models}
    return {
        "source": "timm's ViT entry points and registered default_cfgs (timm/models/vision_transformer.py, "
                  "vision_transformer_hybrid.py), written by scripts/gen_pretrained_cfgs.py",
        "timm_version": timm.__version__,
        "defaults": PretrainedCfg().to_dict(),
        "models": models,
        "skipped": dict(sorted(skipped.items())),
        "deprecated": dict(sorted(deprecated.items())),
    }


def render(table):
    return json.dumps(table, indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(build_table()), encoding="utf-8")
    print(f"wrote {OUT}")
