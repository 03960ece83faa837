"""Edits to a model's submodules (hooks, replaced or wrapped layers, LoRA, quantisation) act on fastvit exactly as
the same edit acts on timm: the fused paths step aside for any module that is not the plain one it was built as."""
import copy
import types

import pytest
import torch
import torch.nn as nn

import fastvit
from _helpers import images, timm_pair
from fastvit.model import Block
from fastvit.surgery import runs_unmodified

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def pair(**kwargs):
    return timm_pair(**{**CFG, **kwargs})


def assert_same_grads(model, ref, atol=1e-5):
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert (p.grad is None) == (grads[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, atol=atol, rtol=1e-4, msg=name)


def forward_backward(model, x):
    out = model(x)
    out.square().sum().backward()
    return out


class Scaled(nn.Module):
    """A user's wrapper around a layer: inner(x) * scale + shift."""

    def __init__(self, inner, scale=0.9, shift=0.01):
        super().__init__()
        self.inner, self.scale, self.shift = inner, scale, shift

    def forward(self, x):
        return self.inner(x) * self.scale + self.shift


class LinearSubclass(nn.Linear):
    """A subclass (as bitsandbytes' and many quantised layers are) that changes the math."""

    def forward(self, x):
        return super().forward(x) * 1.1


def _sub(model, path):
    return model.get_submodule(path)


def _replace(model, path, fn):
    parent, _, name = path.rpartition(".")
    setattr(_sub(model, parent), name, fn(getattr(_sub(model, parent), name)))


def test_forward_hooks_fire_on_every_module_timm_has_with_timm_values():
    model, ref = pair()
    seen, seen_ref = {}, {}
    for net, store in ((model, seen), (ref, seen_ref)):
        for name, m in net.named_modules():
            if name:
                m.register_forward_hook(lambda m, i, o, name=name, store=store: store.setdefault(name, o))
    x = images()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    common = set(dict(model.named_modules())) & set(dict(ref.named_modules())) - {""}
    assert common >= {"patch_embed", "patch_embed.proj", "pos_drop", "blocks", "blocks.0", "blocks.0.norm1",
                      "blocks.0.attn", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.norm2", "blocks.0.mlp",
                      "blocks.0.mlp.fc1", "blocks.0.mlp.act", "blocks.0.mlp.fc2", "norm", "head"}
    missing = sorted(n for n in common if n in seen_ref and n not in seen)
    assert not missing, f"hooks that fire on timm but not on fastvit: {missing}"
    for name in sorted(common & set(seen_ref)):
        torch.testing.assert_close(seen[name], seen_ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("path", ["patch_embed.proj", "blocks.0.norm1", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                                  "blocks.1.norm2", "blocks.1.mlp.fc1", "blocks.1.mlp.act", "blocks.1.mlp.fc2",
                                  "blocks.0.attn", "blocks.1.mlp", "blocks.0", "blocks", "norm", "patch_embed"])
def test_an_output_changing_hook_acts_as_on_timm(path):
    """One hook that rescales a module's output; the rest of the model keeps its fused paths."""
    model, ref = pair()
    calls = []
    for net in (model, ref):
        _sub(net, path).register_forward_hook(lambda m, i, o: calls.append(1) or o * 1.5 + 0.1)
    x = images()
    out, expected = forward_backward(model, x), forward_backward(ref, x)
    assert len(calls) == 2
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("path", ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.1.norm1"])
def test_pre_hooks_and_backward_hooks_fire(path):
    model, ref = pair()
    grads = {}

    def keep_grad(key):
        def hook(module, grad_input, grad_output):
            grads[key] = grad_output[0].clone()
        return hook

    for key, net in (("fastvit", model), ("timm", ref)):
        m = _sub(net, path)
        m.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
        m.register_full_backward_hook(keep_grad(key))
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["fastvit"], grads["timm"], atol=1e-5, rtol=1e-4)
    assert_same_grads(model, ref)


def _global_hook_calls(model, ref):
    """{net: [(name, type) of each module a global forward hook sees]} of one forward of each, checked alike."""
    calls = {model: [], ref: []}
    names = {id(m): (net, n, type(m).__name__) for net in (model, ref) for n, m in net.named_modules()}

    def hook(m, i, o):
        if id(m) in names:
            net, *name_and_type = names[id(m)]
            calls[net].append(tuple(name_and_type))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        x = images()
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("block_fn", ["ParallelThingsBlock", "ParallelScalingBlock", "DiffParallelScalingBlock"])
def test_a_global_hook_sees_a_parallel_blocks_modules_in_timms_order(block_fn):
    """ParallelScalingBlock ran attn_out_proj before the MLP's activation and dropout; timm runs them first. (Names
    only: the differential sub-norm is torch's nn.RMSNorm, timm's RmsNorm.)"""
    import timm.models.vision_transformer as tv
    model, ref = pair(block_fn=getattr(tv, block_fn))
    calls = _global_hook_calls(model, ref)
    assert [name for name, _ in calls[model]] == [name for name, _ in calls[ref]]


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
def test_a_global_hook_sees_timms_modules_in_timms_order(drop_path_rate):
    """An activation logger (a global forward hook) sees every module timm's forward calls, of timm's types, in its
    order (the fused paths step aside for it): no attention dropout on the fused attention path (timm's never calls it, so the maps are not computed
    for the logger), and the drop paths are nn.Identity where off."""
    model, ref = pair(drop_path_rate=drop_path_rate)
    calls = _global_hook_calls(model, ref)
    # the rate rises linearly over the blocks from 0: block 0 has none
    assert calls[model] == calls[ref] and ("blocks.1.drop_path1", "Identity" if drop_path_rate == 0 else "DropPath"
                                           ) in calls[ref]
    assert not any(name.endswith("attn_drop") for name, _ in calls[model])
    assert {("blocks.1.attn.qkv", "Linear"), ("blocks.1.mlp.fc2", "Linear")} <= set(calls[model])


def test_mc_dropout_on_an_eval_model_drops_as_on_timm():
    """Monte-Carlo dropout: an eval-mode model with its MLP dropouts switched back on draws the same masks as timm
    (the fused GELU + fc2 path steps aside for a Dropout in training mode, whatever the Mlp's own mode)."""
    model, ref = pair(proj_drop_rate=0.5)
    outs = []
    for net in (model, ref):
        for block in net.blocks:
            block.mlp.drop1.train()
        torch.manual_seed(3)
        outs.append([net(images()) for _ in range(2)])
    assert not torch.allclose(outs[0][0], outs[0][1], atol=1e-3)
    for got, expected in zip(*outs):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_fn, path", [(None, "blocks.1.mlp.drop1"),
                                             ("ParallelScalingBlock", "blocks.1.mlp_drop")], ids=["mlp", "parallel"])
def test_a_dropout_replaced_before_the_output_projection_runs_as_on_timm(block_fn, path):
    """nn.Identity in place of the dropout between the GELU and the MLP's output projection (a common way to switch
    it off) runs, in training too: the check for fusing the GELU into that projection read the module's p first
    (an AttributeError that nn.Module reported as a missing fc2_gelu / _gelu_in_out_proj)."""
    import timm.models.vision_transformer as tv
    model, ref = pair(**({"block_fn": getattr(tv, block_fn)} if block_fn else {}))
    for net in (model, ref):
        _replace(net, path, lambda _: nn.Identity())
        net.train()
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("cfg, path", [(dict(attn_layer="diff"), "blocks.1.attn.attn_drop"),
                                        (dict(block_fn="DiffParallelScalingBlock"), "blocks.1.attn_drop")],
                         ids=["diff", "diff-parallel"])
def test_differential_attention_keeps_timms_dropout_rate(cfg, path):
    """timm's differential attention reads its fused maps' dropout from attn_drop_p, not attn_drop: nn.Identity
    put there runs in training, still dropping at that rate (fastvit read attn_drop.p, an AttributeError)."""
    import timm.models.vision_transformer as tv
    cfg = {k: getattr(tv, v) if k == "block_fn" else v for k, v in cfg.items()}
    model, ref = pair(**cfg, attn_drop_rate=0.3)
    assert _sub(model, path.rpartition(".")[0]).attn_drop_p == 0.3
    outs = []
    for net in (model, ref):
        _replace(net, path, lambda _: nn.Identity())
        torch.manual_seed(1)
        outs.append(forward_backward(net.train(), images()))
    torch.testing.assert_close(*outs, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("how", ["attribute", "buffer"])
@pytest.mark.parametrize("path", ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2",
                                  "blocks.0.norm1", "norm"])
def test_a_weight_that_is_not_a_parameter_runs_as_on_timm(path, how):
    """A weight set as a plain tensor or a buffer (hypernetworks, functional meta-learning): the layer runs as the
    user left it, on fastvit as on timm, and the gradient reaches the tensor it came from."""
    model, ref = pair()
    sources = []
    for net in (model, ref):
        layer = _sub(net, path)
        weight = (layer.weight.detach() * 1.5).requires_grad_()
        del layer.weight
        if how == "buffer":
            layer.register_buffer("weight", weight)
        else:
            layer.weight = weight
        sources.append(weight)
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sources[0].grad, sources[1].grad, atol=1e-5, rtol=1e-4)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("where", ["subclass", "instance"])
def test_an_overridden_pos_embed_stage_builds_z0_as_on_timm(where):
    """timm's forward builds z_0 by ``self._pos_embed(self.patch_embed(x))``: a positional encoding of one's own
    put there (by a subclass or on the instance) runs, on fastvit as on timm, fixed or dynamic image size."""
    extra = torch.linspace(-1, 1, 64)
    for dynamic in (False, True):
        model, ref = pair(dynamic_img_size=dynamic)
        for net in (model, ref):
            base = type(net)
            if where == "subclass":
                net.__class__ = type("Own", (base,), {"_pos_embed": lambda s, t, base=base: base._pos_embed(s, t) + extra})
            else:
                net._pos_embed = types.MethodType(lambda s, t, base=base: base._pos_embed(s, t) + extra, net)
        x = images(size=48 if dynamic else 32)
        out = forward_backward(model, x)
        torch.testing.assert_close(out, forward_backward(ref, x), atol=1e-5, rtol=1e-5)
        assert_same_grads(model, ref)
        assert not torch.allclose(out, pair(dynamic_img_size=dynamic)[0](x), atol=1e-3)


def test_timms_attention_forward_grafted_on_runs():
    """Copying timm's Attention.forward onto ours (the usual recipe for extracting attention maps) finds timm's
    attributes, and with_kwargs hooks see the keywords timm's Block passes."""
    from timm.layers import Attention as TimmAttention
    model, ref = pair()
    seen = []
    for net in (model, ref):
        attn = net.blocks[0].attn
        attn.forward = types.MethodType(TimmAttention.forward, attn)
        attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)
    assert seen[0] == seen[1] == {"attn_mask": None, "is_causal": False}


@pytest.mark.parametrize("path", ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1",
                                  "blocks.1.mlp.fc2", "blocks.0.norm1", "blocks.1.norm2", "norm"])
def test_a_wrapped_layer_changes_what_runs_as_on_timm(path):
    model, ref = pair()
    for net in (model, ref):
        _replace(net, path, Scaled)
    x = images()
    out, expected = forward_backward(model, x), forward_backward(ref, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)
    untouched, _ = pair()
    assert not torch.allclose(out, untouched(x), atol=1e-3)


@pytest.mark.parametrize("path", ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"])
def test_a_linear_subclass_runs_its_own_forward(path):
    model, ref = pair()
    for net in (model, ref):
        old = _sub(net, path)
        new = LinearSubclass(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        _replace(net, path, lambda _: new)
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


def test_replaced_activation_and_instance_forward_are_honoured():
    model, ref = pair()
    for net in (model, ref):
        net.blocks[0].mlp.act = nn.GELU(approximate="tanh")
        net.blocks[1].mlp.act = nn.SiLU()
        lin = net.blocks[1].attn.proj
        lin.forward = lambda x, lin=lin: nn.functional.linear(x, lin.weight) * 2.0
    x = images()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, patched", [
    (nn.GELU, lambda self, x: torch.relu(x)),
    (nn.Linear, lambda self, x: nn.functional.linear(x, self.weight, self.bias) * 0.5),
    (nn.LayerNorm, lambda self, x: nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-1)),
    (nn.Conv2d, lambda self, x: self._conv_forward(x, self.weight, None)),
    (nn.Identity, lambda self, x: x * 2.0),
], ids=["GELU", "Linear", "LayerNorm", "Conv2d", "Identity"])
def test_class_level_patches_are_honoured(monkeypatch, cls, patched):
    """A forward patched on the class (``nn.GELU.forward = ...``) is a modified module, as an instance-level patch
    is (that one matches timm: test_replaced_activation_and_instance_forward_are_honoured): the fused kernels must
    not read past it."""
    model, _ = pair()
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if type(m) is cls:
            m.forward = types.MethodType(patched, m)
    x = images()
    before = model(x)
    monkeypatch.setattr(cls, "forward", patched)
    out = model(x)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, before, atol=1e-3)
    monkeypatch.undo()
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # the fused path again


def test_replaced_timm_attention_and_block_run():
    """A block or attention swapped for timm's own modules (same weights) runs as in timm."""
    model, ref = pair()
    model.blocks[0].attn = copy.deepcopy(ref.blocks[0].attn)
    model.blocks[1] = copy.deepcopy(ref.blocks[1])
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


def test_dynamic_quantisation_matches_timm():
    model, ref = pair()
    qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    qref = torch.ao.quantization.quantize_dynamic(ref, {nn.Linear}, dtype=torch.qint8)
    assert type(qmodel.blocks[0].attn.qkv) is not nn.Linear
    x = images()
    torch.testing.assert_close(qmodel(x), qref(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(qmodel(x), model(x), atol=1e-6)


def test_peft_lora_trains_and_matches_timm():
    peft = pytest.importorskip("peft")
    model, ref = pair()
    config = dict(r=4, lora_alpha=8, target_modules=["qkv", "fc1", "proj", "fc2"], lora_dropout=0.0)
    lora = peft.get_peft_model(model, peft.LoraConfig(**config))
    lora_ref = peft.get_peft_model(ref, peft.LoraConfig(**config))
    x = images()
    base = lora(x).detach()
    torch.testing.assert_close(base, lora_ref(x), atol=1e-5, rtol=1e-5)
    # peft starts B at zero (the output is unchanged); give both the same non-zero adapters
    with torch.no_grad():
        adapters = dict(lora_ref.named_parameters())
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
                adapters[name].copy_(p)
    out, expected = lora(x), lora_ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, base, atol=1e-3)  # the adapters change the output
    out.square().sum().backward()
    expected.square().sum().backward()
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, adapters[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    # one step on the adapters alone moves the output
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    opt.step()
    assert not torch.allclose(lora(x), out, atol=1e-4)


def test_unmodified_modules_take_the_fused_paths(monkeypatch):
    """The check itself: plain modules fuse; a hook, a subclass or an instance forward does not."""
    model, _ = pair()
    block = model.blocks[0]
    assert runs_unmodified(block, Block) and runs_unmodified(block.attn.qkv, nn.Linear)
    handle = block.attn.qkv.register_forward_hook(lambda *a: None)
    assert not runs_unmodified(block.attn.qkv, nn.Linear)
    handle.remove()
    assert runs_unmodified(block.attn.qkv, nn.Linear)
    assert not runs_unmodified(LinearSubclass(2, 2), nn.Linear)
    calls = []
    from fastvit import ops
    real = ops.add_layer_norm_linear
    monkeypatch.setattr(ops, "add_layer_norm_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(images())
    assert len(calls) == 2 * len(model.blocks)
    calls.clear()
    model.blocks[1].mlp.fc1.register_forward_hook(lambda *a: None)
    model(images())
    assert len(calls) == 2 * len(model.blocks) - 1


@pytest.mark.parametrize("path", ["blocks.0", "blocks.1.attn"])
def test_pre_hooks_on_blocks_and_attention_see_timm_arguments(path):
    """A block and an attention are called with the tokens alone, as timm's are (the grid goes only to a relative
    position bias), so a pre-hook that unpacks them, or rewrites them, acts as on timm."""
    model, ref = pair()
    for net in (model, ref):
        def pre(m, args):
            (h,) = args
            return (h * 1.1,)
        _sub(net, path).register_forward_pre_hook(pre)
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


def test_a_block_subclass_with_timm_forward_signature_runs():
    class Halved(Block):
        def forward(self, x):
            return super().forward(x) * 0.5

    model, ref = pair()
    block = Halved(64, 4)
    block.load_state_dict(model.blocks[1].state_dict())
    model.blocks[1] = block
    out = model(images())
    ref.blocks[1].register_forward_hook(lambda m, i, o: o * 0.5)
    torch.testing.assert_close(out, ref(images()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("replacement", ["timm", "wrapper"])
def test_a_replaced_patch_embed_runs_as_on_timm(replacement):
    from timm.layers import PatchEmbed as TimmPatchEmbed
    model, ref = pair()
    for net in (model, ref):
        if replacement == "timm":
            new = TimmPatchEmbed(32, 8, 3, 64)
            new.load_state_dict(net.patch_embed.state_dict(), strict=False)
        else:
            new = Scaled(net.patch_embed)
        net.patch_embed = new
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("dynamic", [False, True])
def test_timm_embed_layers_build_as_on_timm(dynamic):
    """embed_layer= takes timm's own PatchEmbed and HybridEmbed: the model passes timm's keywords (dynamic_img_pad;
    strict_img_size=False and output_fmt='NHWC' for a dynamic size), not a dynamic_img_size they do not know."""
    import timm
    from timm.layers import HybridEmbed as TimmHybridEmbed
    from timm.layers import PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    size = 48 if dynamic else 32

    def resnet18(**kwargs):  # a backbone each: shared, the two models would run one module
        return TimmHybridEmbed(timm.create_model("resnet18", num_classes=0, global_pool=""), **kwargs)
    for layer, cfg in ((TimmPatchEmbed, CFG), (resnet18, dict(CFG, img_size=64, patch_size=1))):
        torch.manual_seed(0)
        ref = TimmViT(**cfg, embed_layer=layer, dynamic_img_size=dynamic).eval()
        model = fastvit.VisionTransformer(**cfg, embed_layer=layer, dynamic_img_size=dynamic).eval()
        model.load_state_dict(ref.state_dict())
        x = torch.randn(1, 3, size * cfg["img_size"] // 32, size * cfg["img_size"] // 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(flatten=False), dict(output_fmt="NHWC"), dict(output_fmt="NCL"),
                                     dict(output_fmt="NLC"), dict(strict_img_size=False, output_fmt="NHWC")])
def test_patch_embed_takes_timms_options(options):
    """fastvit's PatchEmbed takes timm's arguments, in timm's order, and gives its layouts."""
    from timm.layers import PatchEmbed as TimmPatchEmbed
    torch.manual_seed(0)
    ref = TimmPatchEmbed(32, 8, 3, 64, None, **options)
    ours = fastvit.model.PatchEmbed(32, 8, 3, 64, None, **options)
    ours.load_state_dict(ref.state_dict())
    assert (ours.flatten, ours.output_fmt, ours.strict_img_size) == (ref.flatten, ref.output_fmt,
                                                                     ref.strict_img_size)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match=r"output_fmt must be one of \('NCHW', 'NHWC', 'NCL', 'NLC'\), got 'NWHC'"):
        fastvit.model.PatchEmbed(output_fmt="NWHC")


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_norm_on_the_patch_tokens_runs_as_on_timm(dynamic):
    """embed_norm_layer: a norm on the patch tokens, in each layout (it crashed where the embedding's output was
    (B, gh, gw, D): under dynamic_img_size, or timm's layout options)."""
    model, ref = pair(embed_norm_layer="layernorm", dynamic_img_size=dynamic)
    x = torch.randn(2, 3, 48, 40) if dynamic else images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)


def test_dynamic_img_size_on_the_embedding_switches_timms_pair():
    """fastvit's switch sets timm's pair (any size, (B, gh, gw, D) tokens) and, off, undoes only that: a layout
    chosen otherwise stays."""
    pe = fastvit.model.PatchEmbed(32, 8, 3, 64)
    pe.dynamic_img_size = True
    assert (pe.strict_img_size, pe.flatten, pe.output_fmt) == (False, False, "NHWC")
    assert pe(torch.randn(1, 3, 48, 40)).shape == (1, 6, 5, 64)
    pe.dynamic_img_size = False
    assert (pe.strict_img_size, pe.flatten) == (True, True)
    pe.output_fmt, pe.flatten = "NCL", False
    pe.dynamic_img_size = False
    assert (pe.strict_img_size, pe.flatten, pe.output_fmt) == (True, False, "NCL")


def test_timms_recipe_for_any_image_size_on_a_built_model():
    """Setting timm's attributes on a built fixed-size model makes it take other sizes, as on timm's."""
    from timm.layers import Format
    model, ref = pair()
    for net in (model, ref):
        net.dynamic_img_size = True
        net.patch_embed.strict_img_size = False
        net.patch_embed.flatten = False
        net.patch_embed.output_fmt = Format.NHWC
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert model.patch_embed.dynamic_img_size


def test_a_projection_for_more_channels_takes_them():
    """A patch projection replaced by one over 4 channels (an RGB-D input): the model takes 4-channel images, as
    timm's does (the channel check read a count kept from the build)."""
    model, ref = pair()
    torch.manual_seed(1)
    proj = nn.Conv2d(4, 64, 8, 8)
    model.patch_embed.proj, ref.patch_embed.proj = proj, copy.deepcopy(proj)
    x = torch.randn(2, 4, 32, 32)
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)
    with pytest.raises(ValueError, match="expected 4 input channels, got 3"):
        model(images())


def test_a_replaced_patch_embed_with_the_wrong_token_count_names_the_grid():
    model, _ = pair()
    model.patch_embed = nn.Sequential(nn.Conv2d(3, 64, 16, 16), nn.Flatten(2), _Transpose())
    with pytest.raises(ValueError, match="4 x 4 patch grid"):
        model(images())


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


@pytest.mark.parametrize("stage", ["forward_features", "forward_head", "pool"])
def test_stages_patched_on_the_instance_are_called(stage):
    """timm's forward calls self.forward_features / forward_head / pool, so one set on the instance runs."""
    model, ref = pair()
    for net in (model, ref):
        original = getattr(net, stage)
        setattr(net, stage, lambda *args, original=original, **kw: original(*args, **kw) * 0.5)
    x = images()
    out = model(x)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    del model.__dict__[stage]
    assert not torch.allclose(model(x), out, atol=1e-4)


@pytest.mark.parametrize("method", ["hook", "fx"])
def test_attention_maps_extract_as_on_timm(method):
    """timm's AttentionExtract on models with fused_attn off: the same maps by the same names (attn_drop's output,
    or the softmax node under torch.fx)."""
    from timm.utils import AttentionExtract
    model, ref = pair()
    for net in (model, ref):
        for block in net.blocks:
            block.attn.fused_attn = False
    x = images()
    maps, expected = AttentionExtract(model, method=method)(x), AttentionExtract(ref, method=method)(x)
    assert list(maps) == list(expected) and len(maps) == len(model.blocks)
    for name in expected:
        assert maps[name].shape == (x.shape[0], 4, 17, 17)
        torch.testing.assert_close(maps[name], expected[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embed", ["learn", "rel"])
def test_explicit_attention_matches_the_fused_one(pos_embed):
    """fused_attn off computes the same attention (the relative bias included) with the same gradients."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**CFG, pos_embed=pos_embed)
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.rel_pos_table is not None:
                block.attn.rel_pos_table.normal_()
    explicit = copy.deepcopy(model)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    x = images()
    torch.testing.assert_close(forward_backward(explicit, x), forward_backward(model, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(explicit, model)


def test_attention_dropout_is_an_nn_dropout_as_in_timm():
    """Setting every nn.Dropout's p to 0 turns attention dropout off too, as on timm."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**CFG, attn_drop_rate=0.5).train()
    assert isinstance(model.blocks[0].attn.attn_drop, nn.Dropout) and model.blocks[0].attn.attn_drop.p == 0.5
    x = images()
    assert not torch.equal(model(x), model(x))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("path", ["norm_pre", "patch_embed.norm", "blocks.1.mlp.norm", "blocks.0.attn.norm"])
def test_a_norm_put_in_timms_placeholders_runs(path):
    """timm keeps nn.Identity placeholders for norms (on the patch tokens, before the blocks, before the
    attention's projection and before fc2); a LayerNorm put there runs, on fastvit as on timm."""
    model, ref = pair()
    for net in (model, ref):
        torch.manual_seed(0)
        norm = nn.LayerNorm(256 if ".mlp." in path else 64)  # the MLP's is over its hidden width
        nn.init.normal_(norm.weight)
        _replace(net, path, lambda _, norm=norm: norm)
    x = images()
    out = forward_backward(model, x)
    torch.testing.assert_close(out, forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)
    assert not torch.allclose(out, pair()[0](x), atol=1e-3)


def test_pre_norm_matches_timm():
    model, ref = pair(pre_norm=True)
    assert "norm_pre.weight" in model.state_dict()
    x = images()
    torch.testing.assert_close(forward_backward(model, x), forward_backward(ref, x), atol=1e-5, rtol=1e-5)
    assert_same_grads(model, ref)
