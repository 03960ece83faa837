"""Hybrid ViT (BiT ResNet feature map, 1x1 patches) against timm's vision_transformer_hybrid models."""
from functools import partial

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import _load_weights as timm_load_npz
from timm.models.vision_transformer_hybrid import _resnetv2

import fastvit
from _helpers import assert_close_to_scale
from fastvit.convert import from_npz, hybrid_backbone_from_npz, load_checkpoint
from fastvit.hybrid import ConvStem, HybridEmbed, ResNetV2  # importing registers vit_*_r50_*
from fastvit.resnet_d import ResNetD

NAMES = ["vit_base_r50_s16_224", "vit_base_r50_s16_384", "vit_large_r50_s32_224", "vit_large_r50_s32_384",
         "vit_small_r26_s32_224", "vit_small_r26_s32_384", "vit_base_r26_s32_224", "vit_tiny_r_s16_p8_224",
         "vit_tiny_r_s16_p8_384", "vit_small_resnet26d_224", "vit_small_resnet50d_s16_224", "vit_base_resnet26d_224",
         "vit_base_resnet50d_224", "vit_base_mci_224"]


def pair(name, **kwargs):
    """fastvit and timm builds of ``name`` with the same (timm's, perturbed) random weights, in eval mode."""
    torch.manual_seed(0)
    ref = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # make every parameter non-trivial (timm zero-inits each block's last GroupNorm)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = fastvit.create_model(name, **kwargs).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", NAMES)
def test_registered_names_match_timm_layout_and_defaults(name):
    with torch.device("meta"):
        ref, model = timm.create_model(name), fastvit.create_model(name)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # in timm's order too: an optimizer's state_dict is matched to parameters by position (a timm optimizer state
    # loaded into a ResNet-D hybrid's optimizer failed at its first step, or fed one parameter's moments to another)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(model.state_dict()) == list(ref.state_dict())
    assert model.num_classes == ref.num_classes  # 0 for vit_base_r50_s16_224 (headless in21k default)
    pe, ref_pe = model.patch_embed, ref.patch_embed
    assert isinstance(pe, HybridEmbed)
    assert (pe.img_size, pe.patch_size, pe.grid_size, pe.num_patches, pe.feature_ratio, pe.feature_dim) == \
        (ref_pe.img_size, ref_pe.patch_size, ref_pe.grid_size, ref_pe.num_patches, ref_pe.feature_ratio,
         ref_pe.feature_dim)


def test_default_model_matches_timm_at_224():
    model, ref = pair("vit_base_r50_s16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_outputs_and_gradients_match_timm():
    model, ref = pair("vit_base_r50_s16_224", img_size=64, depth=2, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():  # normwise: fp32 rounding differs between the two (~5e-6 measured)
        err = rel_err(p.grad, grads[name].grad)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_stride32_model_matches_timm():
    """Forward only: through four stages down to a 2x2 map, fp32 backbone gradients are ill-conditioned (timm's
    and ours both differ from float64 by ~1e-3), so they say nothing about the implementation."""
    model, ref = pair("vit_large_r50_s32_384", img_size=64, depth=2)
    assert model.patch_embed.grid_size == (2, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # logits of ~7 from width 1024: fp32 summation-order noise passes a fixed 1e-5
        assert_close_to_scale(model(x), ref(x), rtol=1e-5)


@pytest.mark.parametrize("size", [(50, 50), (37, 64)])
def test_backbone_same_padding_matches_timm_at_odd_sizes(size):
    """Sizes that are not multiples of the stride exercise the symmetric and asymmetric 'SAME' paddings of every
    strided op."""
    torch.manual_seed(0)
    ref = _resnetv2((1, 1, 1, 1)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    backbone = ResNetV2((1, 1, 1, 1)).eval()
    backbone.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out, expected = backbone(x), ref(x)
    assert out.shape == expected.shape == (1, 2048, -(-size[0] // 32), -(-size[1] // 32))
    # raw (un-normalised) residual stream: compare normwise, fp32 rounding measured 3e-6, a wrong pad gives ~1
    assert rel_err(out, expected) < 2e-5



def _timm_resnet_d(layers):
    """timm's resnet26d / resnet50d as the hybrids build it (features_only, the last stage of ``layers``), with its
    parameters perturbed (its init zeroes each block's last BatchNorm)."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet26d" if layers == (2, 2, 2, 2) else "resnet50d", features_only=True,
                            out_indices=[len(layers)])
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.mark.parametrize("layers,size", [((2, 2, 2, 2), (61, 47)), ((3, 4, 6), (64, 50))])
def test_resnet_d_matches_timm_in_train_and_eval_mode(layers, size):
    """ResNet-D against timm's at sizes that leave remainders in the strided convolutions and the shortcuts'
    ceil-mode average pools: features and gradients in train mode (batch statistics), the running statistics that
    step updates, and features in eval mode."""
    ref = _timm_resnet_d(layers)
    backbone = ResNetD(layers)
    backbone.load_state_dict(ref.state_dict(), strict=True)
    # timm's modules in its order (its placeholders too): hooks find the same names and fire in the same order
    assert [n for n, _ in backbone.named_modules()] == [n for n, _ in ref.named_modules()]
    fired = {}
    for net, key in ((backbone, "ours"), (ref, "timm")):
        fired[key] = []
        for name, module in net.named_modules():
            if name:
                module.register_forward_hook(lambda m, i, o, name=name, key=key: fired[key].append(name))
    x = torch.randn(2, 3, *size)
    out, expected = backbone(x), ref(x)[-1]
    assert fired["ours"] == fired["timm"]
    reduction = 4 * 2 ** (len(layers) - 1)
    assert out.shape == expected.shape == (2, backbone.num_features, -(-size[0] // reduction),
                                           -(-size[1] // reduction))
    assert rel_err(out, expected) < 2e-5
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in backbone.named_parameters():
        assert rel_err(p.grad, grads[name].grad) < 1e-4, name
    buffers = dict(ref.named_buffers())
    for name, b in backbone.named_buffers():
        torch.testing.assert_close(b, buffers[name], msg=name)
    backbone.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(backbone(x), ref(x)[-1]) < 2e-5


def test_resnet_d_init_as_timm():
    """timm's ResNet init: He-normal fan-out convolutions (the same spread per tensor), BatchNorm 1 / 0, and each
    bottleneck's last BatchNorm weight zero so that a block starts as its shortcut."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet26d", features_only=True, out_indices=[4])
    ours = dict(ResNetD((2, 2, 2, 2)).named_parameters())
    for name, p in ref.named_parameters():
        if p.ndim == 4:
            fan_out = p.shape[0] * p.shape[2] * p.shape[3]
            assert abs(ours[name].std().item() / (2 / fan_out) ** 0.5 - 1) < 0.25, name
        else:
            assert torch.equal(ours[name], p), name
    assert not ours["layer1.0.bn3.weight"].any() and ours["layer1.0.bn2.weight"].eq(1).all()


def test_dynamic_img_size_matches_timm_and_validates():
    model, ref = pair("vit_base_r50_s16_224", img_size=64, depth=1, dynamic_img_size=True)
    x = torch.randn(1, 3, 96, 64)
    assert model.patch_embed.check_input(x)[1] == (6, 4)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the embedding alone in timm's layout for a dynamic size: (B, gh, gw, D)
        torch.testing.assert_close(model.patch_embed(x), ref.patch_embed(x), atol=1e-5, rtol=1e-5)
    fixed, _ = pair("vit_base_r50_s16_224", img_size=64, depth=1)
    with pytest.raises(ValueError, match=r"expected image size \(64, 64\)"):
        fixed(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match="3 input channels"):
        fixed(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("name, size", [("vit_base_r50_s16_224", (72, 40)), ("vit_small_resnet26d_224", (70, 50)),
                                        ("vit_tiny_r_s16_p8_224", (70, 50)), ("vit_base_mci_224", (75, 70))])
def test_sizes_off_the_token_stride_match_timm(name, size):
    """An image size that is no multiple of the backbone's reduction, built as the model's size or passed to a
    dynamic-size model: the token grid is what the backbone gives (ceil for 'SAME' padding: BiT, ResNet-D; floor for
    MobileCLIP's unpadded stem; then whole patches of the projection), as timm's (it was refused here)."""
    dynamic, dynamic_ref = pair(name, img_size=64, depth=1, dynamic_img_size=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), dynamic_ref(x), atol=1e-5, rtol=1e-5)
    if name == "vit_tiny_r_s16_p8_224":  # built at that size, timm too asks for whole patches of its feature map
        with pytest.raises(ValueError, match=r"the backbone's feature map \(18, 13\) must be divisible by "
                                             r"patch_size \(8, 8\)"):
            fastvit.create_model(name, img_size=size, depth=1)
        return
    fixed, fixed_ref = pair(name, img_size=size, depth=1)
    assert fixed.patch_embed.grid_size == fixed_ref.patch_embed.grid_size
    assert fixed.patch_embed.feature_size == tuple(fixed_ref.patch_embed.feature_size)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), fixed_ref(x), atol=1e-5, rtol=1e-5)


def test_a_dynamic_size_hybrid_traces_at_sizes_off_the_stride():
    """torch.fx: the token grid of a dynamic-size hybrid is a node (the patch grid over the feature map a leaf), so
    the traced module runs other sizes, off the stride too, as eager does."""
    model, _ = pair("vit_tiny_r_s16_p8_224", img_size=64, depth=1, dynamic_img_size=True)
    traced = torch.fx.symbolic_trace(model)
    for size in ((72, 40), (100, 70)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_the_trainer_s_size_check_refuses_only_dropped_pixels():
    """--img-size off the stride: a backbone that pads ('SAME') reads every pixel, so the trainer takes it; one
    that drops the rest (MobileCLIP's stem) is refused as a plain ViT is."""
    from fastvit.restore import check_whole_patches
    check_whole_patches(fastvit.create_model("vit_base_r50_s16_224", img_size=70, depth=1))
    with pytest.raises(ValueError, match=r"--img-size 70 must be divisible by patch_size \(16, 16\)"):
        check_whole_patches(fastvit.create_model("vit_base_mci_224", img_size=70, depth=1))


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match=r"the backbone's feature map \(2, 2\) is smaller than patch_size \(8, 8\)"):
        fastvit.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=1, dynamic_img_size=True)(
            torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"rounding must be one of \('whole', 'floor', 'ceil'\), got 'same'"):
        HybridEmbed(backbone=type("SameRounding", (_Strided16,), {"feature_rounding": "same"})(), img_size=32)
    with pytest.raises(ValueError, match=r"image size \(24, 24\) must be divisible by the backbone reduction "
                                         r"\(16, 16\)"):  # a backbone of its own that does not say how it rounds
        fastvit.VisionTransformer(img_size=32, patch_size=1, embed_dim=64, depth=1, num_heads=2,
                                  embed_layer=partial(HybridEmbed, backbone=_Strided16()),
                                  dynamic_img_size=True)(torch.randn(1, 3, 24, 24))
    with pytest.raises(TypeError, match="nn.Module"):
        HybridEmbed(backbone=None)
    with pytest.raises(TypeError, match="reduction"):
        HybridEmbed(backbone=torch.nn.Conv2d(3, 8, 1))
    with pytest.raises(ValueError, match="in_chans=1"):
        HybridEmbed(backbone=ResNetV2((1,)), in_chans=1)
    with pytest.raises(ValueError, match="layers"):
        ResNetV2((3, 4, 0))
    one_channel = fastvit.create_model("vit_base_r50_s16_224", img_size=32, depth=1, in_chans=1)
    assert one_channel.patch_embed.backbone.stem.conv.weight.shape == (64, 1, 7, 7)
    with pytest.raises(ValueError, match="layers"):
        ResNetD(())
    with pytest.raises(ValueError, match="embed_dim equal to the backbone's 768 features and patch_size 1, got 384"):
        fastvit.create_model("vit_base_mci_224", embed_dim=384, num_heads=6, depth=1)
    with pytest.raises(ValueError, match="patch_size must stay 1, got 2"):
        fastvit.create_model("vit_base_mci_224", depth=1).set_input_size(patch_size=2)
    with pytest.raises(ValueError, match="same length"):
        ConvStem(channels=(8, 8), strides=(2,))
    mci = fastvit.create_model("vit_base_mci_224", depth=1, img_size=32)  # no patch projection to read a dtype from
    mci.reset_classifier(10)
    assert mci(torch.randn(1, 3, 32, 32)).shape == (1, 10)


class _Strided16(torch.nn.Module):
    """A user's backbone exposing in_chans, num_features and reduction, nothing about its rounding."""
    in_chans, num_features, reduction = 3, 8, 16

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 16, 16)

    def forward(self, x):
        return self.conv(x)


def test_set_input_size_resamples_pos_embed_to_new_feature_grid():
    model, ref = pair("vit_base_r50_s16_224", img_size=64, depth=1, num_classes=10)
    old = model.pos_embed.detach().clone()
    model.set_input_size(img_size=96)
    ref.set_input_size(img_size=96)
    pe = model.patch_embed
    assert (pe.img_size, pe.feature_size, pe.grid_size, pe.num_patches) == ((96, 96), (6, 6), (6, 6), 36)
    torch.testing.assert_close(model.pos_embed.detach(), fastvit.resample_abs_pos_embed(old, (6, 6), (4, 4), 1),
                               atol=0, rtol=0)
    x = torch.randn(1, 3, 96, 96)
    out = model(x)
    assert out.shape == (1, 10)
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
    model.set_input_size(patch_size=2)  # 2x2 patches over the 6x6 feature map
    assert (pe.patch_size, pe.grid_size, pe.token_stride) == ((2, 2), (3, 3), (32, 32))
    assert model(x).shape == (1, 10)


# ---- original JAX .npz layout (google-research/vision_transformer R50+ViT-B_16) ------------------------------
def _to_npz(model):
    """Write a timm hybrid's weights in the original JAX layout (the inverse of timm's _load_weights)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hwio = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    w = {"embedding/kernel": hwio(sd["patch_embed.proj.weight"]), "embedding/bias": sd["patch_embed.proj.bias"],
         "cls": sd["cls_token"], "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"]
        for j, part in enumerate(("query", "key", "value")):
            w[f"{p}MultiHeadDotProductAttention_1/{part}/kernel"] = \
                sd[f"{b}attn.qkv.weight"][j * d:(j + 1) * d].T.reshape(d, heads, -1)
            w[f"{p}MultiHeadDotProductAttention_1/{part}/bias"] = \
                sd[f"{b}attn.qkv.bias"][j * d:(j + 1) * d].reshape(heads, -1)
        w[f"{p}MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[f"{b}attn.proj.weight"].reshape(d, heads, -1).transpose(1, 2, 0)
        w[f"{p}MultiHeadDotProductAttention_1/out/bias"] = sd[f"{b}attn.proj.bias"]
        for j in range(2):
            w[f"{p}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}mlp.fc{j + 1}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}mlp.fc{j + 1}.bias"]
    bb = "patch_embed.backbone."
    w["conv_root/kernel"] = hwio(sd[bb + "stem.conv.weight"])
    w["gn_root/scale"] = sd[bb + "stem.norm.weight"].reshape(1, 1, 1, -1)  # BiT-style 4D GroupNorm parameters
    w["gn_root/bias"] = sd[bb + "stem.norm.bias"]
    for i, stage in enumerate(model.patch_embed.backbone.stages):
        for j, block in enumerate(stage.blocks):
            p, b = f"block{i + 1}/unit{j + 1}/", f"{bb}stages.{i}.blocks.{j}."
            subs = [(f"conv{r}", f"gn{r}", f"conv{r}", f"norm{r}") for r in (1, 2, 3)]
            if block.downsample is not None:
                subs.append(("conv_proj", "gn_proj", "downsample.conv", "downsample.norm"))
            for conv, gn, tconv, tnorm in subs:
                w[f"{p}{conv}/kernel"] = hwio(sd[f"{b}{tconv}.weight"])
                w[f"{p}{gn}/scale"], w[f"{p}{gn}/bias"] = sd[f"{b}{tnorm}.weight"], sd[f"{b}{tnorm}.bias"]
    return w


@pytest.fixture(scope="module")
def npz_case(tmp_path_factory):
    """A random timm R50+ViT-B (64 px, 2 blocks), its weights as a JAX .npz, and an input."""
    _, ref = pair("vit_base_r50_s16_224", img_size=64, depth=2, num_classes=10)
    path = tmp_path_factory.mktemp("npz") / "R50+ViT-B_16.npz"
    np.savez(path, **_to_npz(ref))
    # the synthetic file is the real layout: timm's own .npz reader recovers every tensor from it
    reread = timm.create_model("vit_base_r50_s16_224", img_size=64, depth=2, num_classes=10).eval()
    timm_load_npz(reread, str(path))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(reread.state_dict()[k], v, atol=0, rtol=0, msg=k)
    return ref, path, torch.randn(2, 3, 64, 64)


def test_npz_backbone_conversion_loads_original_layout(npz_case):
    ref, path, x = npz_case
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    backbone, rest = hybrid_backbone_from_npz(arrays)
    expected = {k: v for k, v in ref.state_dict().items() if k.startswith("patch_embed.backbone.")}
    assert set(backbone) == set(expected)
    assert not any(k.startswith(("conv_root", "gn_root", "block")) for k in rest)
    model = fastvit.create_model("vit_base_r50_s16_224", img_size=64, depth=2, num_classes=10).eval()
    result = load_checkpoint(model, {**from_npz(rest), **backbone})
    assert not (result.missing_keys or result.unexpected_keys or result.mismatched_keys)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    # a prefixed checkpoint (e.g. 'opt/target/') and one without a backbone
    prefixed, _ = hybrid_backbone_from_npz({f"opt/target/{k}": v for k, v in arrays.items()}, prefix="opt/target/")
    assert prefixed.keys() == backbone.keys()
    none, rest = hybrid_backbone_from_npz({"embedding/kernel": arrays["embedding/kernel"]})
    assert none == {} and list(rest) == ["embedding/kernel"]


def test_load_checkpoint_reads_hybrid_npz_file(npz_case):
    ref, path, x = npz_case
    model = fastvit.create_model("vit_base_r50_s16_224", img_size=64, depth=2, num_classes=10,
                                 checkpoint_path=str(path)).eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
