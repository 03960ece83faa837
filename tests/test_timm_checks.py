"""The checks timm's generic model tests make (tests/test_models.py of pytorch-image-models), run on every
fastvit name with our own code: forward, backward, default configs, features, forward_intermediates and torch.fx.

Each model is built one block deep at four tokens a side (its config's input size is checked apart), and the names
are those that stand for every layout (``representative_names``), so the set runs in CI time;
``bench/timm_suite.py`` runs timm's own file, unchanged, on the full models.
"""
import math

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastvit
from _helpers import representative_names

NAMES = representative_names()
# tracing a ResNet backbone takes seconds: one hybrid of each backbone family stands for the others in the torch.fx
# check
_HYBRIDS = set(fastvit.list_models(module="vision_transformer_hybrid"))
FX_NAMES = [n for n in NAMES if n not in _HYBRIDS] + ["vit_base_r50_s16_224", "vit_small_resnet26d_224",
                                                      "vit_base_mci_224"]


def build(name, **kwargs):
    """``name`` one block deep, at 4 x 4 tokens."""
    torch.manual_seed(0)
    with torch.device("meta"):
        stride = fastvit.create_model(name, depth=1).feature_info[0]["reduction"]
    return fastvit.create_model(name, depth=1, img_size=4 * stride, **kwargs)


def input_size(model):
    inner = getattr(model, "model", model)  # a feature extractor wraps the model
    return (3, *inner.patch_embed.img_size)


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_input_size_is_what_the_model_takes(name):
    with torch.device("meta"):
        model = fastvit.create_model(name)
    assert model.default_cfg["input_size"] == (3, *model.patch_embed.img_size)
    assert model.default_cfg["fixed_input_size"]


def images(model, batch=1):
    return torch.randn(batch, *input_size(model), generator=torch.Generator().manual_seed(1))


def check_maps(maps, channels, reductions, size, batch=1):
    """timm's bound on each (B, C, H, W) map: C channels, H and W at most ceil(size / reduction) + 1."""
    assert len(maps) == len(channels)
    for m, c, r in zip(maps, channels, reductions):
        assert m.shape[0] == batch and m.shape[1] == c
        assert m.shape[2] <= math.ceil(size[1] / r) + 1 and m.shape[3] <= math.ceil(size[2] / r) + 1
        assert not torch.isnan(m).any()


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_grad_checkpointing(name):
    model = build(name).eval()
    x = images(model)
    out = model(x)
    assert out.shape == (1, model.num_classes or model.num_features) and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = build(name, num_classes=42).train()
    out = model(images(model, 2))
    out.mean().backward()
    assert out.shape == (2, 42)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_heads_and_names(name):
    model = build(name).eval()
    cfg = model.default_cfg
    x = images(model)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape[-1] == model.num_features and pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    headless = build(name, num_classes=0).eval()
    assert headless(x).shape == (1, headless.num_features)
    state = model.state_dict() if not cfg.get("num_classes") else build(name).state_dict()
    for key in [cfg["classifier"]] if cfg.get("num_classes") else []:
        assert f"{key}.weight" in state
    assert f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_shapes_and_final(name):
    model = build(name).eval()
    x = images(model)
    info = model.feature_info
    final, maps = model.forward_intermediates(x, output_fmt="NCHW")
    check_maps(maps, [f["num_chs"] for f in info], [f["reduction"] for f in info], input_size(model))
    assert torch.allclose(final, model.forward_features(x))
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x, output_fmt="NCHW")[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_getter(name):
    model = build(name, features_only=True, feature_cls="getter", out_indices=1).eval()
    size = input_size(model)
    maps = model(torch.randn(1, *size))
    check_maps(maps, model.feature_info.channels(), model.feature_info.reduction(), size)


@pytest.mark.parametrize("name", FX_NAMES)
def test_fx_forward_is_exact_and_backward_reaches_every_parameter(name):
    model = build(name).eval()
    x = images(model)
    train_nodes, eval_nodes = get_graph_node_names(model)
    with torch.inference_mode():
        fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                      eval_return_nodes=[eval_nodes[-1]])
        assert torch.equal(next(iter(fx(x).values())), model(x))
    model = build(name, num_classes=42).train()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]])
    out = next(iter(fx(images(model, 2)).values()))
    out.mean().backward()
    assert out.shape == (2, 42) and all(p.grad is not None for p in fx.parameters())
