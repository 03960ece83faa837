"""The features API (forward_intermediates and friends, features_only wrappers, group_matcher) and torch.fx
tracing, each against timm on the same weights."""
import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastvit
from _helpers import images, timm_pair

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)


def pair(**kwargs):
    return timm_pair(**{**CFG, **kwargs})


def assert_same(a, b):
    """Nested lists / tuples / dicts of tensors are equal up to fp32 rounding."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


INTERMEDIATE_ARGS = [
    {},
    dict(indices=2, norm=True),
    dict(indices=[0, -1], output_fmt="NLC"),
    dict(indices=[2, 1], return_prefix_tokens=True),
    dict(indices=[1], stop_early=True),
    dict(indices=3, intermediates_only=True),
    dict(indices=[0, 3], output_dict=True, return_prefix_tokens=True),
    dict(indices=1, output_dict=True, intermediates_only=True, output_fmt="NLC"),
]


@pytest.mark.parametrize("cfg", [{}, dict(class_token=False, global_pool="avg"), dict(no_embed_class=True)],
                         ids=["token", "avg", "no_embed_class"])
@pytest.mark.parametrize("kwargs", INTERMEDIATE_ARGS, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()) or "default")
def test_forward_intermediates_matches_timm(cfg, kwargs):
    model, ref = pair(**cfg)
    x = images()
    assert_same(model.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs))


def test_forward_intermediates_final_output_is_forward_features():
    model, _ = pair()
    x = images()
    final, taken = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
    assert [t.shape for t in taken] == [(2, 64, 4, 4)] * 4
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-5, atol=1e-6)


def test_get_intermediate_layers_matches_timm():
    model, ref = pair()
    x = images()
    keep = torch.rand(17, 17, generator=torch.Generator().manual_seed(0)) > 0.3
    keep.fill_diagonal_(True)
    for kwargs in (dict(n=2), dict(n=[0, 2], reshape=True, norm=True), dict(n=1, return_prefix_tokens=True),
                   dict(n=2, attn_mask=keep)):
        assert_same(model.get_intermediate_layers(x, **kwargs), ref.get_intermediate_layers(x, **kwargs))
    assert not torch.allclose(model.get_intermediate_layers(x, attn_mask=keep)[0], model.get_intermediate_layers(x)[0])


@pytest.mark.parametrize("indices, prune_norm", [(1, False), ([0, 2], True), (4, False)])
def test_prune_intermediate_layers_matches_timm(indices, prune_norm):
    model, ref = pair()
    assert model.prune_intermediate_layers(indices, prune_norm) == ref.prune_intermediate_layers(indices, prune_norm)
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = images()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bad_indices_name_the_range():
    model, _ = pair()
    with pytest.raises(ValueError, match=r"in 1\.\.4, got 5"):
        model.forward_intermediates(images(), indices=5)
    with pytest.raises(ValueError, match=r"in -4\.\.3, got \[4\]"):
        model.forward_intermediates(images(), indices=[4])
    with pytest.raises(ValueError, match="output_fmt must be one of"):
        model.forward_intermediates(images(), output_fmt="NHWC")


def test_feature_info_matches_timm():
    for name, kwargs in (("vit_small_patch16_224", {}), ("vit_base_r50_s16_224", dict(depth=2))):
        model = fastvit.create_model(name, **kwargs)
        assert model.feature_info == timm.create_model(name, **kwargs).feature_info


@pytest.mark.parametrize("feature_cls", ["getter", "hook", "FeatureHookNet", "fx", "timm's FeatureGetterNet"])
@pytest.mark.parametrize("out_indices", [3, (1, -1)])
def test_features_only_matches_timm(feature_cls, out_indices):
    """Each feature class timm builds for a ViT (by its name, timm's rule for names, or a class) gives timm's
    outputs, feature_info and state_dict keys (model.* / body.* / graph_module.*)."""
    if feature_cls == "timm's FeatureGetterNet":
        from timm.models._features import FeatureGetterNet
        feature_cls = FeatureGetterNet
    kwargs = dict(img_size=64, features_only=True, feature_cls=feature_cls, out_indices=out_indices)
    ref = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    model = fastvit.create_model("vit_tiny_patch16_224", **kwargs).eval()
    model.load_state_dict(ref.state_dict())  # same keys, strict
    x = images(size=64)
    assert_same(model(x), ref(x))
    assert model.feature_info.channels() == ref.feature_info.channels()
    assert model.feature_info.reduction() == ref.feature_info.reduction()
    assert model.feature_info.module_name() == ref.feature_info.module_name()


@pytest.mark.parametrize("feature_cls", ["getter", "hook", "fx"])
def test_features_only_copies_and_pickles_to_a_working_model(feature_cls):
    """An EMA copy (deepcopy) or a pickled backbone collects its own features, as timm's does."""
    import copy
    import pickle
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=64, depth=2, features_only=True,
                                 feature_cls=feature_cls, out_indices=(0, 1)).eval()
    x = images(size=64)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert_same(clone(x), expected)
        with torch.no_grad():
            clone.get_parameter(next(n for n, _ in clone.named_parameters() if n.endswith("blocks.0.mlp.fc2.bias")))\
                .add_(1.0)
        assert not torch.allclose(clone(x)[0], expected[0])  # the copy's own weights, not the original's
        assert_same(model(x), expected)


def test_features_only_rejects_an_unknown_class():
    with pytest.raises(ValueError, match=r"feature_cls must be 'getter', 'fx', a name with 'hook' or a feature "
                                         r"class, got 'list'"):
        fastvit.create_model("vit_tiny_patch16_224", features_only=True, feature_cls="list")


def test_layer_decay_groups_match_timm():
    from timm.optim import param_groups_layer_decay
    model, ref = pair()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    expected = param_groups_layer_decay(ref, weight_decay=0.05, layer_decay=0.75)
    assert [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in groups] == \
        [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in expected]


# ---- torch.fx ------------------------------------------------------------------------------------------------
def test_symbolic_trace_equals_eager_exactly_and_keeps_fused_ops():
    model, ref = pair()
    x = images()
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(x), model(x))
    targets = {getattr(n.target, "__name__", str(n.target)) for n in traced.graph.nodes if n.op == "call_function"}
    assert {"patch_embed", "add_layer_norm_linear", "attention", "layer_norm_mlp"} <= targets


def test_create_feature_extractor_returns_timms_nodes():
    model, ref = pair()
    x = images()
    nodes = {"patch_embed": "stem", "blocks.1": "b1", "blocks.3": "b3", "norm": "norm", "head": "logits",
             "blocks.0.attn.proj": "proj"}
    ours = create_feature_extractor(model, return_nodes=nodes)(x)
    theirs = create_feature_extractor(ref, return_nodes=nodes)(x)
    assert_same(ours, theirs)
    assert {"norm", "head"} <= set(get_graph_node_names(model)[1])


def test_fx_training_graph_gives_every_gradient():
    model, _ = pair()
    model.train()
    traced = torch.fx.symbolic_trace(model)
    out = traced(images())
    out.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in traced.parameters())


@pytest.mark.parametrize("cfg", [dict(), dict(reg_tokens=2, class_token=False, global_pool="avg", no_embed_class=True),
                                 dict(pos_embed="learn_2d"), dict(dynamic_img_pad=True)])
def test_a_dynamic_size_model_traces_and_runs_at_other_sizes(cfg):
    """With dynamic_img_size the patch grid is a node of the graph (a leaf reads the image's shape), so the traced
    module resamples the position table for each size as eager does, and gives eager's bits; timm's tests trace it."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5,
                                      dynamic_img_size=True, **cfg).eval()
    traced = create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])
    for size in [(32, 32), (48, 24), (16, 40)] + [(30, 37)] * cfg.get("dynamic_img_pad", False):
        x = torch.randn(2, 3, *size)
        assert torch.equal(next(iter(traced(x).values())), model(x)), size


def test_hybrid_traces():
    model = fastvit.create_model("vit_base_r50_s16_224", img_size=64, depth=1).eval()
    x = images(1, 64)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


def test_traced_model_still_checks_its_input():
    traced = torch.fx.symbolic_trace(pair()[0])
    with pytest.raises(ValueError, match=r"expected image size \(32, 32\), got \(48, 48\)"):
        traced(images(size=48))
