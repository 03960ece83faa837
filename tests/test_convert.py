"""Checkpoint conversion: torchvision, Hugging Face (both layouts), MobileCLIP and JAX .npz weights loaded into
fastvit must reproduce the source model's outputs; containers, files, grid resampling and mismatch errors behave
as documented.

Every source model is tiny (32px, patch 8, width 64, depth 2) with all parameters randomised (zero biases would
hide a mis-mapped bias).
"""
import functools
import re
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import fastvit
from fastvit.convert import (CheckpointMismatchError, from_hf, from_mobileclip, from_npz, from_torchvision,
                             load_checkpoint)

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
ATOL = 1e-5


def fastvit_model(**overrides):
    return fastvit.VisionTransformer(**{**CFG, "backend": "torch", **overrides}).eval()


def randomize(module, seed=0):
    """Every parameter random (LayerNorm weights around 1), so each tensor's mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0  # the LayerNorm scales
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + offset)
    return module.eval()


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_same_params(model, reference):
    assert_same_state(model.state_dict(), reference.state_dict())


def assert_same_state(state, reference):
    assert set(state) == set(reference)
    for k, v in state.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0, msg=k)


# ---- torchvision ---------------------------------------------------------------------------------------------
def torchvision_vit():
    from torchvision.models import VisionTransformer
    return randomize(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                                       mlp_dim=128, num_classes=10))


def test_torchvision_outputs_match():
    tv = torchvision_vit()
    model = fastvit_model()
    assert set(from_torchvision(tv.state_dict())) == set(model.state_dict())
    result = load_checkpoint(model, tv.state_dict())
    assert result.layout == "torchvision" and not (result.missing_keys or result.unexpected_keys)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=0, atol=ATOL)


# ---- Hugging Face ---------------------------------------------------------------------------------------------
def hf_config():
    from transformers import ViTConfig
    return ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, layer_norm_eps=1e-6, num_labels=10)


def hf_classifier():
    from transformers import ViTForImageClassification
    return randomize(ViTForImageClassification(hf_config()))


def hf_backbone():
    from transformers import ViTModel
    return randomize(ViTModel(hf_config()))  # keeps its pooler, which the converter drops


def on_disk_keys(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_hf_classifier_in_memory_layout():
    hf = hf_classifier()
    assert any(".q_proj." in k for k in hf.state_dict()), "expected transformers 5.x in-memory names"
    model = fastvit_model()
    assert set(from_hf(hf.state_dict())) == set(model.state_dict())
    assert load_checkpoint(model, hf.state_dict()).layout == "hf"
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(pixel_values=x).logits, rtol=0, atol=ATOL)


def test_hf_classifier_on_disk_layout(tmp_path):
    """save_pretrained writes the transformers 4.x names; load the file, the folder, and a sharded folder."""
    hf = hf_classifier()
    hf.save_pretrained(tmp_path / "single")
    keys = on_disk_keys(tmp_path / "single" / "model.safetensors")
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
    assert "vit.encoder.layer.1.intermediate.dense.weight" in keys
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    x = images()
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        for source in (tmp_path / "single" / "model.safetensors", tmp_path / "single", tmp_path / "sharded"):
            model = fastvit_model()
            load_checkpoint(model, source)
            torch.testing.assert_close(model(x), want, rtol=0, atol=ATOL, msg=str(source))


def test_hf_folder_with_another_layer_norm_eps_warns_and_matches_when_built_with_it(tmp_path):
    """A state_dict has no eps: HF's default 1e-12 against the model's 1e-6 gives slightly different outputs, so
    loading such a folder says so, and a model built with the named eps gives the HF model's outputs."""
    import functools
    import warnings

    from transformers import ViTForImageClassification
    config = hf_config()
    config.layer_norm_eps = 1e-12
    hf = randomize(ViTForImageClassification(config))
    with torch.no_grad():  # tokens of small variance enter the first LayerNorm, where eps matters
        for name, p in hf.named_parameters():
            if "embeddings" in name:
                p.mul_(1e-3)
    hf.save_pretrained(tmp_path)
    x = images()
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    model = fastvit_model()
    with pytest.warns(UserWarning, match=r"layer_norm_eps=1e-12.*eps 1e-06.*eps=1e-12"):
        load_checkpoint(model, tmp_path)
    with pytest.warns(UserWarning, match=rf"^{re.escape(str(tmp_path / 'config.json'))} has"):
        load_checkpoint(model, f"{tmp_path}/")  # a folder named with its slash, as a shell completes it
    with torch.no_grad():
        assert not torch.allclose(model(x), want, rtol=0, atol=ATOL)
    model = fastvit_model(norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=ATOL)


def test_hf_backbone_both_layouts(tmp_path):
    """ViTModel: no 'vit.' prefix and a pooler; its last_hidden_state is fastvit's forward_features."""
    hf = hf_backbone()
    assert any(k.startswith("pooler.") for k in hf.state_dict())
    hf.save_pretrained(tmp_path)
    assert "encoder.layer.0.attention.output.dense.weight" in on_disk_keys(tmp_path / "model.safetensors")
    x = images()
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        for source in (hf.state_dict(), tmp_path / "model.safetensors"):
            model = fastvit_model(num_classes=0)
            result = load_checkpoint(model, source)
            assert result.layout == "hf" and result.ignored_keys == []
            torch.testing.assert_close(model.forward_features(x), want, rtol=0, atol=ATOL)


def test_hf_incomplete_qkv_is_an_error():
    sd = {k: v for k, v in hf_classifier().state_dict().items() if "layers.1.attention.k_proj.bias" not in k}
    with pytest.raises(ValueError, match=r"layer 1 bias: expected query, key and value.*\['q', 'v'\]"):
        from_hf(sd)


# ---- JAX .npz ------------------------------------------------------------------------------------------------
def write_npz(model, path, big_vision=False):
    """Write a timm-layout model in the JAX layout: original ViT, or big_vision ('params/' prefix, blocks scanned
    along a leading depth axis, LayerNorm_1 / MHA_0 / MlpBlock_0, position table without the class row)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    p = "params/" if big_vision else ""
    w = {f"{p}embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         f"{p}embedding/bias": sd["patch_embed.proj.bias"], f"{p}cls": sd["cls_token"],
         f"{p}{'pos_embedding' if big_vision else 'Transformer/posembed_input/pos_embedding'}": sd["pos_embed"],
         f"{p}Transformer/encoder_norm/scale": sd["norm.weight"], f"{p}Transformer/encoder_norm/bias": sd["norm.bias"],
         f"{p}head/kernel": sd["head.weight"].T, f"{p}head/bias": sd["head.bias"]}
    ln2, mha, mlp = (1, 0, 0) if big_vision else (2, 1, 3)
    blocks = []
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        block = {"LayerNorm_0/scale": sd[b + "norm1.weight"], "LayerNorm_0/bias": sd[b + "norm1.bias"],
                 f"LayerNorm_{ln2}/scale": sd[b + "norm2.weight"], f"LayerNorm_{ln2}/bias": sd[b + "norm2.bias"],
                 f"MultiHeadDotProductAttention_{mha}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, -1, dim),
                 f"MultiHeadDotProductAttention_{mha}/out/bias": sd[b + "attn.proj.bias"]}
        for name, weight, bias in zip(("query", "key", "value"), np.split(sd[b + "attn.qkv.weight"], 3),
                                      np.split(sd[b + "attn.qkv.bias"], 3)):
            block[f"MultiHeadDotProductAttention_{mha}/{name}/kernel"] = weight.T.reshape(dim, heads, -1)
            block[f"MultiHeadDotProductAttention_{mha}/{name}/bias"] = bias.reshape(heads, -1)
        for r in range(2):
            block[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            block[f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
        blocks.append(block)
    for i, block in enumerate(blocks):
        for k, v in block.items():
            if big_vision:
                w[f"{p}Transformer/encoderblock/{k}"] = np.stack([bl[k] for bl in blocks])
            else:
                w[f"{p}Transformer/encoderblock_{i}/{k}"] = v
    np.savez(path, **w)


def timm_reference(path, **overrides):
    """timm's own .npz reader: checks that write_npz produced the real layout."""
    from timm.models.vision_transformer import VisionTransformer, _load_weights
    model = VisionTransformer(**{**CFG, **overrides}).eval()
    with torch.no_grad():
        _load_weights(model, str(path))
    return model


def test_npz_original_layout(tmp_path):
    source = randomize(fastvit_model())
    write_npz(source, tmp_path / "vit.npz")
    x = images()
    with torch.no_grad():
        want = source(x)
        torch.testing.assert_close(timm_reference(tmp_path / "vit.npz")(x), want, rtol=0, atol=ATOL)
        model = fastvit_model()
        assert load_checkpoint(model, tmp_path / "vit.npz").layout == "npz"
        assert_same_params(model, source)
        torch.testing.assert_close(model(x), want, rtol=0, atol=ATOL)
        # timm's own loader of a .npz file calls the model's load_pretrained, as it does timm's
        model = fastvit_model()
        timm.models.load_checkpoint(model, str(tmp_path / "vit.npz"))
        assert_same_params(model, source)


def test_npz_at_another_grid_and_patch_size_is_resized_as_timm_resizes_it(tmp_path):
    """An .npz for a 32 px, patch-8 model loaded at 48 px and patch 4: position table and patch projection resized
    as timm's .npz loader does (bilinear, no antialiasing, like the original ViT code); bicubic would differ by ~1e-2."""
    source = randomize(fastvit_model())
    write_npz(source, tmp_path / "vit.npz")
    for overrides in (dict(img_size=48), dict(img_size=48, patch_size=4)):
        model = fastvit_model(**overrides)
        load_checkpoint(model, tmp_path / "vit.npz")
        want = timm_reference(tmp_path / "vit.npz", **overrides).state_dict()
        for k, v in model.state_dict().items():  # the projection's pseudo-inverse: a rounding apart
            torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)


def test_init_from_an_npz_at_another_size_resizes_as_timm(tmp_path):
    """--init / few-shot (fastvit.restore) read a weights file once and load what they read: an .npz keeps its
    layout there, so its position table is resampled as from the file (bilinear, as timm's .npz loader), not as a
    timm state_dict's (bicubic)."""
    from fastvit.restore import load_pretrained
    write_npz(randomize(fastvit_model()), tmp_path / "vit.npz")
    arch = {k: v for k, v in CFG.items() if k != "num_classes"}
    model = load_pretrained(str(tmp_path / "vit.npz"), "vit_tiny_patch16_224", dict(arch, img_size=48))[0]
    want = timm_reference(tmp_path / "vit.npz", img_size=48).pos_embed
    torch.testing.assert_close(model.pos_embed, want, rtol=0, atol=1e-6)


def test_npz_bfloat16_arrays(tmp_path):
    """JAX bfloat16 arrays reach numpy as 2-byte void; they load as the bf16 values they hold."""
    source = randomize(fastvit_model())
    write_npz(source, tmp_path / "f32.npz")
    with np.load(tmp_path / "f32.npz") as f:
        bf16 = {k: torch.from_numpy(f[k]).bfloat16().view(torch.int16).numpy().view("V2") for k in f.files}
    np.savez(tmp_path / "bf16.npz", **bf16)
    model = fastvit_model()
    load_checkpoint(model, tmp_path / "bf16.npz")
    assert_same_state(model.state_dict(), {k: v.bfloat16().float() for k, v in source.state_dict().items()})


@pytest.mark.parametrize("no_embed_class", [True, False])
def test_npz_big_vision_scanned_layout(tmp_path, no_embed_class):
    """big_vision adds positions before the class token is prepended (timm's no_embed_class=True); a model that
    embeds the class row gets a zero row there, which computes the same function."""
    source = randomize(fastvit_model(no_embed_class=True))
    write_npz(source, tmp_path / "bv.npz", big_vision=True)
    x = images()
    with torch.no_grad():
        want = source(x)
        torch.testing.assert_close(timm_reference(tmp_path / "bv.npz", no_embed_class=True)(x), want, rtol=0,
                                   atol=ATOL)
        model = fastvit_model(no_embed_class=no_embed_class)
        load_checkpoint(model, tmp_path / "bv.npz")
        torch.testing.assert_close(model(x), want, rtol=0, atol=ATOL)
        with np.load(tmp_path / "bv.npz") as f:  # a mapping of arrays works as well as the path
            assert set(from_npz(dict(f))) == set(source.state_dict())


# timm's names -> Apple's MobileCLIP names (the inverse of timm's _convert_mobileclip, which the test compares with)
_TO_MOBILECLIP = [(r"^patch_embed\.backbone\.(\d+)\.conv\.", r"patch_emb.\1.block.conv."),
                  (r"^patch_embed\.backbone\.(\d+)\.bn\.", r"patch_emb.\1.block.norm."),
                  (r"^norm\.", "post_transformer_norm."),
                  (r"^blocks\.(\d+)\.norm1\.", r"transformer.\1.pre_norm_mha.0."),
                  (r"^blocks\.(\d+)\.attn\.qkv\.", r"transformer.\1.pre_norm_mha.1.qkv_proj."),
                  (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer.\1.pre_norm_mha.1.out_proj."),
                  (r"^blocks\.(\d+)\.norm2\.", r"transformer.\1.pre_norm_ffn.0."),
                  (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer.\1.pre_norm_ffn.1."),
                  (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer.\1.pre_norm_ffn.4.")]


def test_mobileclip_checkpoint_converts_as_timm():
    """An Apple MobileCLIP-B checkpoint (image and text encoder) -> timm's layout as timm's own converter gives it,
    and loaded by load_checkpoint, timm's outputs."""
    from timm.models.vision_transformer_hybrid import _convert_mobileclip

    torch.manual_seed(0)
    ref = timm.create_model("vit_base_mci_224", depth=2, img_size=64).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ref.head.bias.zero_()  # MobileCLIP's projection has no bias
    raw = {"text_encoder.embedding_layer.weight": torch.randn(7, 4), "logit_scale": torch.ones(())}
    for key, value in ref.state_dict().items():
        if key == "head.weight":
            raw["image_encoder.model.classifier.proj"] = value.T
        elif key == "pos_embed":
            raw["image_encoder.model.pos_embed.pos_embed.pos_embed"] = value.unsqueeze(0)
        elif key != "head.bias":
            name = next((re.sub(a, b, key) for a, b in _TO_MOBILECLIP if re.match(a, key)), key)
            raw["image_encoder.model." + name] = value
    ours, theirs = from_mobileclip(raw), _convert_mobileclip(raw, ref)
    assert ours.keys() == theirs.keys() == ref.state_dict().keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    model = fastvit.create_model("vit_base_mci_224", depth=2, img_size=64).eval()
    assert load_checkpoint(model, raw).layout == "mobileclip"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_class_row_folded_into_class_token():
    """A checkpoint embedding the class row loads into a no_embed_class model: the row moves into cls_token."""
    source = randomize(fastvit_model())
    model = fastvit_model(no_embed_class=True)
    load_checkpoint(model, source.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=ATOL)


def test_a_square_table_read_without_a_class_row_says_what_else_it_could_be():
    """25 rows are a 5x5 grid without a class row (DeiT-3's layout, folded into a class-row model) or a 4x6 grid
    with one: no state_dict tells them apart, so the fold says which it took and how to load the other."""
    source = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=1)
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=1)
    with pytest.warns(UserWarning, match=r"25 rows were read as a 5x5 patch grid without a class-token row .* "
                                         r"4x6 grid with a class row reads the same"):
        load_checkpoint(model, source.state_dict())
    with warnings.catch_warnings():  # a table with the model's own layout is not a fold
        warnings.simplefilter("error")
        load_checkpoint(fastvit.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=1),
                        timm.create_model("vit_tiny_patch16_224", img_size=40, patch_size=8, depth=1).state_dict())


# ---- files and containers -------------------------------------------------------------------------------------
def test_file_round_trips_and_containers(tmp_path):
    source = randomize(fastvit_model())
    sd = source.state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "optimizer": {}, "state_dict": sd}, tmp_path / "train.pth")
    torch.save({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    torch.save(to_torchvision_names(sd), tmp_path / "tv.bin")
    for source_path in ("w.safetensors", "train.pth", "ddp.pt", "tv.bin"):
        model = fastvit_model()
        result = load_checkpoint(model, tmp_path / source_path)
        assert result.layout == ("torchvision" if source_path == "tv.bin" else "timm")
        assert_same_params(model, source)


def to_torchvision_names(sd):
    """timm keys -> torchvision's, inverting from_torchvision on a real torchvision state_dict's keys."""
    tv_keys = list(torchvision_vit().state_dict())
    names = dict(zip(from_torchvision(dict.fromkeys(tv_keys)), tv_keys))
    return {names[k]: v for k, v in sd.items()}


def test_create_model_with_checkpoint_path(tmp_path):
    source = randomize(fastvit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                            num_classes=10, backend="torch"))
    save_file(source.state_dict(), tmp_path / "tiny.safetensors")
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                                 checkpoint_path=tmp_path / "tiny.safetensors", backend="torch")
    assert_same_params(model, source)


# ---- grid resampling -------------------------------------------------------------------------------------------
def test_pos_embed_resampled_to_model_grid():
    source = randomize(fastvit_model())
    model = fastvit_model(img_size=48)
    load_checkpoint(model, source.state_dict())
    want = fastvit.resample_abs_pos_embed(source.pos_embed.detach(), (6, 6), (4, 4), num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 37, 64)
    torch.testing.assert_close(model.pos_embed.detach(), want, rtol=0, atol=0)
    # the same through a converted layout: torchvision at 32px into a 48px model
    tv = torchvision_vit()
    model = fastvit_model(img_size=48)
    load_checkpoint(model, tv.state_dict())
    want = fastvit.resample_abs_pos_embed(tv.encoder.pos_embedding.detach(), (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("pos_embed", ["learn", "learn_2d", "rel"])
def test_tables_resampled_like_set_input_size(pos_embed):
    """Loading a 32px checkpoint into a 48px model equals the source model after set_input_size(48)."""
    source = randomize(fastvit_model(pos_embed=pos_embed))
    model = fastvit_model(pos_embed=pos_embed, img_size=48)
    load_checkpoint(model, source.state_dict())
    source.set_input_size(img_size=48)
    assert_same_params(model, source)


def test_patch_projection_resampled_to_model_patch_size_as_timm():
    """A patch-16 checkpoint into a patch-8 model: timm's checkpoint filter resamples the projection (FlexiViT)
    and the position table; so does load_checkpoint, to the same outputs."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    source = randomize(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10))
    ref = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10, patch_size=8)
    ref.load_state_dict(checkpoint_filter_fn(dict(source.state_dict()), ref))
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=10, patch_size=8)
    load_checkpoint(model, source.state_dict())
    expected = ref.state_dict()
    for k, v in model.state_dict().items():  # the pseudo-inverse in fp64 here, in fp32 in timm
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-5, msg=k)
    x = images(size=64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_create_model_takes_timms_factory_arguments(tmp_path):
    """device / dtype placement, pretrained_strict, an empty checkpoint_path (no checkpoint), timm's layer
    config flags; scriptable=True is refused with the alternatives."""
    meta = fastvit.create_model("vit_tiny_patch16_224", device="meta", dtype=torch.bfloat16, exportable=True,
                                no_jit=True, checkpoint_path="")
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.bfloat16)}
    source = randomize(fastvit_model())
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    kwargs = {**CFG, "num_classes": 5, "checkpoint_path": tmp_path / "w.safetensors"}
    model = fastvit.create_model("vit_tiny_patch16_224", **kwargs, pretrained_strict=False)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointMismatchError, match="head"):
        fastvit.create_model("vit_tiny_patch16_224", **kwargs)
    with pytest.raises(ValueError, match="torch.export"):
        fastvit.create_model("vit_tiny_patch16_224", scriptable=True)


# ---- mismatches ----------------------------------------------------------------------------------------------
def test_head_size_mismatch():
    source = randomize(fastvit_model())
    model = fastvit_model(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, source.state_dict())
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "head.weight: checkpoint (10, 64) vs model (5, 64)" in message
    assert "head.bias: checkpoint (10,) vs model (5,)" in message
    assert "reset_classifier(10)" in message and "strict=False" in message
    assert "missing keys" not in message and "unexpected keys" not in message
    assert_same_state(model.state_dict(), before)  # a failed strict load changes nothing

    result = load_checkpoint(model, source.state_dict(), strict=False)
    assert [k for k, _, _ in result.mismatched_keys] == ["head.weight", "head.bias"]
    assert result.missing_keys == result.unexpected_keys == []
    torch.testing.assert_close(model.head.weight, before["head.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight, rtol=0, atol=0)

    model.reset_classifier(10)
    load_checkpoint(model, source.state_dict())
    assert_same_params(model, source)


def test_create_model_head_mismatch_hints_name_create_models_arguments(tmp_path):
    """Inside create_model there is no model to reset yet and strict=False is not an argument (a TypeError): the
    hints name what create_model takes, and each of them loads."""
    save_file(randomize(fastvit_model()).state_dict(), tmp_path / "w.safetensors")
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, backend="torch")
    build = functools.partial(fastvit.create_model, "vit_tiny_patch16_224", **kw)
    with pytest.raises(CheckpointMismatchError, match=r"build it with num_classes=10 to take the checkpoint's head, "
                                                      r"or pass pretrained_strict=False"):
        build(num_classes=7, checkpoint_path=tmp_path / "w.safetensors")
    assert build(num_classes=10, checkpoint_path=tmp_path / "w.safetensors").num_classes == 10
    assert build(num_classes=7, checkpoint_path=tmp_path / "w.safetensors", pretrained_strict=False).num_classes == 7
    with pytest.raises(CheckpointMismatchError, match=r"pass pretrained_cfg_overlay=dict\(num_classes=10\) \(the "
                                                      r"weights' class count\) to take the checkpoint's head"):
        build(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    assert build(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"),
                                                              num_classes=10)).num_classes == 10


def test_missing_and_unexpected_keys_listed():
    sd = randomize(fastvit_model()).state_dict()
    del sd["blocks.1.norm2.bias"]
    sd["pre_logits.fc.weight"] = torch.zeros(64, 64)
    deeper = fastvit_model(depth=3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(deeper, sd)
    e = err.value
    assert "blocks.1.norm2.bias" in e.missing_keys and "blocks.2.attn.qkv.weight" in e.missing_keys
    assert e.unexpected_keys == ["pre_logits.fc.weight"]
    message = str(e)
    assert "checkpoint (timm layout) does not match VisionTransformer" in message
    assert "missing keys (13): blocks.1.norm2.bias, blocks.2.norm1.weight" in message
    assert "unexpected keys (1): pre_logits.fc.weight" in message


def test_headless_model_and_headless_checkpoint():
    source = randomize(fastvit_model())
    headless = fastvit_model(num_classes=0)
    result = load_checkpoint(headless, source.state_dict())
    assert result.ignored_keys == ["head.weight", "head.bias"]
    with torch.no_grad():
        torch.testing.assert_close(headless(images()), source.forward_head(source.forward_features(images()),
                                                                           pre_logits=True), rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="checkpoint has no classifier: build the model with "
                                                      "num_classes=0"):
        load_checkpoint(fastvit_model(), headless.state_dict())


def test_bad_inputs():
    with pytest.raises(ValueError, match="unrecognised checkpoint layout.*found foo"):
        load_checkpoint(fastvit_model(), {"foo": torch.zeros(1)})
    with pytest.raises(TypeError, match="expected a checkpoint path or a state_dict mapping, got Linear"):
        load_checkpoint(fastvit_model(), torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(fastvit_model(), "/nonexistent/vit.pth")


def test_unknown_suffix(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported checkpoint file .*w\.h5.*\.safetensors"):
        load_checkpoint(fastvit_model(), tmp_path / "w.h5")


@pytest.mark.parametrize("name, kind", [("junk.pth", r"PyTorch \(torch.save\)"), ("junk.safetensors", "safetensors")])
def test_unreadable_file_names_itself(tmp_path, name, kind):
    """A file that is not a checkpoint of its suffix's format: an error naming the file and the format, not the
    unpickler's KeyError or safetensors' header error alone."""
    (tmp_path / name).write_bytes(b"hello")
    with pytest.raises(ValueError, match=rf"{name} is not a readable {kind} checkpoint \(damaged, or "
                                         rf"another kind of file"):
        load_checkpoint(fastvit_model(), tmp_path / name)
    # bytes no unpickler reads: the unpickler's line, without torch's advice to load with weights_only=False
    (tmp_path / "noise.pth").write_bytes(bytes([233]) * 64)
    with pytest.raises(ValueError, match=r"noise.pth is not a readable .*\(damaged, or another kind of file: "
                                         r"UnpicklingError: .*233\)$") as err:
        load_checkpoint(fastvit_model(), tmp_path / "noise.pth")
    assert "weights_only" not in str(err.value)


def test_a_checkpoint_of_another_width_is_named_as_such(tmp_path):
    """A wider model's weights: the hint names both widths, not the grid (the position table only differs in
    width); from --init without --model it also says which model was assumed."""
    from fastvit.restore import load_model_for_eval
    torch.save(fastvit_model(embed_dim=96, num_heads=2).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(fastvit_model(), tmp_path / "wide.pth")
    assert "embedding width is 96, the model's 64" in str(err.value) and "could not be fitted" not in str(err.value)
    with pytest.raises(ValueError, match=r"is a weights file, so the model is --model's, vit_base_patch16_224 when "
                                         r"--model is not passed"):
        load_model_for_eval(str(tmp_path / "wide.pth"))


def test_a_training_script_checkpoint_with_its_args_loads(tmp_path):
    """timm's (and DeiT's) train.py save their argparse.Namespace and a metric beside the weights: a weights-only load
    takes them, as timm's loader does; an object with code of its own is refused in one line naming it."""
    import argparse
    import datetime
    source = randomize(fastvit_model())
    torch.save({"epoch": 3, "arch": "vit", "state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1),
                "metric": np.float64(81.5), "version": 2}, tmp_path / "model_best.pth.tar")
    model = fastvit_model()
    load_checkpoint(model, tmp_path / "model_best.pth.tar")
    assert_same_params(model, source)
    torch.save({"state_dict": source.state_dict(), "when": datetime.date(2026, 12, 4)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError) as err:
        load_checkpoint(fastvit_model(), tmp_path / "odd.pth")
    assert "it holds a datetime.date, which torch.load(weights_only=True) does not build" in str(err.value)
    assert "Re-running" not in str(err.value) and "\n" not in str(err.value)
