"""Pretrained configs and tags, the Hugging Face Hub (an offline cache built here from timm's random weights),
hf-hub: / local-dir: names and save_pretrained, each checked against timm doing the same thing."""
import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import get_arch_pretrained_cfgs
from timm.models import get_pretrained_cfg as timm_cfg
from timm.models._hub import save_for_hf
from timm.models._registry import _model_to_module, split_model_name_tag

try:  # timm's input traits: timm 1.0.31 on (the GPU machine's timm 1.0.29 has none)
    from timm.models import get_model_input_config
except ImportError:
    get_model_input_config = None

import fastvit
from fastvit.convert import CheckpointMismatchError
from fastvit.pretrained import load_pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = fastvit.list_models()
TAGGED = fastvit.list_models(include_tags=True)
TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # built with depth=2 to stay fast


def timm_pair(name, **kwargs):
    """timm's model (every parameter perturbed, so no zero-initialised tensor hides a loading bug) in eval mode."""
    torch.manual_seed(0)
    ref = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def put_in_cache(cache, repo, files, refs=("main",)):
    """Write ``files`` (name -> writer(path)) as the revisions ``refs`` of Hub repo ``repo`` in the standard HF cache
    layout (models--org--name/refs/<ref> + snapshots/<commit>/...)."""
    root = pathlib.Path(cache, "models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        write(str(snapshot / name))
    return snapshot


def cache_weights(cache, repo, model):
    return put_in_cache(cache, repo, {"model.safetensors": lambda p: save_file(model.state_dict(), p)})


def as_json(obj):
    return json.loads(json.dumps(obj))


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ---- configs and tags ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_every_tag_carries_timms_config(arch):
    timm_cfgs = get_arch_pretrained_cfgs(arch)
    assert [f"{arch}.{t}" for t in fastvit.registry._tags(arch)] == list(timm_cfgs)  # default first, as timm
    for name, cfg in timm_cfgs.items():
        assert fastvit.get_pretrained_cfg(name) == cfg.to_dict()
    assert fastvit.get_pretrained_cfg(arch) == timm_cfg(arch).to_dict()
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "hf_hub_id", "license", "num_classes",
                "first_conv", "classifier", "min_input_size"):
        assert fastvit.get_pretrained_cfg_value(arch, key) == timm.models.get_pretrained_cfg_value(arch, key)
    assert fastvit.registry._MODULES[arch] == _model_to_module[arch]


def test_the_data_file_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_pretrained_cfgs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    shipped = json.loads((ROOT / "fastvit" / "pretrained_cfgs.json").read_text())
    fresh = json.loads(gen.render(gen.build_table()))
    assert (fresh["models"], fresh["defaults"]) == (shipped["models"], shipped["defaults"])
    assert fresh["deprecated"] == shipped["deprecated"]
    assert "vision_transformer.py" in shipped["source"] and shipped["timm_version"]


def test_listing_matches_timm():
    def on_the_hub(names):  # timm also lists weights found only at a URL (I-JEPA's); fastvit fetches from the Hub
        return [n for n in names if fastvit.get_pretrained_cfg(n).get("hf_hub_id")]

    def ours_vs_timm(**kw):
        theirs = set(timm.list_models(**kw))
        listed = [n for n in timm.list_models(**{**kw, "filter": NAMES}) if n in theirs]
        return fastvit.list_models(**kw), on_the_hub(listed) if kw.get("pretrained") else listed

    for kw in [dict(pretrained=True), dict(pretrained=True, include_tags=False), dict(include_tags=True),
               dict(filter="vit_base*", include_tags=True), dict(exclude_filters=["*384*", "*huge*"]),
               dict(module="vision_transformer_hybrid"), dict(filter="vit_huge*", pretrained=True),
               dict(name_matches_cfg=True)]:
        ours, theirs = ours_vs_timm(**kw)
        assert ours == theirs, kw
    assert fastvit.list_pretrained() == fastvit.list_models(pretrained=True) == on_the_hub(timm.list_pretrained(NAMES))
    assert "vit_huge_patch14_224.untrained" in TAGGED and "vit_huge_patch14_224.untrained" not in \
        fastvit.list_pretrained()
    assert "vit_huge_patch14_gap_224.in1k_ijepa" in timm.list_pretrained() and \
        "vit_huge_patch14_gap_224.in1k_ijepa" not in fastvit.list_pretrained()


@pytest.mark.parametrize("name", TAGGED)
def test_a_tag_builds_the_head_and_input_size_it_says(name):
    with torch.device("meta"):
        model = fastvit.create_model(name)
    cfg = timm_cfg(name).to_dict()
    assert model.pretrained_cfg == cfg and model.default_cfg is model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"]
    assert model.patch_embed.img_size == cfg["input_size"][1:]


def test_tag_examples_and_explicit_arguments_win():
    with torch.device("meta"):
        assert fastvit.create_model("vit_base_patch16_224.augreg_in21k").head.out_features == 21843
        assert fastvit.create_model("vit_base_patch16_224.orig_in21k").num_classes == 0
        assert fastvit.create_model("vit_base_patch16_224.orig_in21k", num_classes=5).num_classes == 5
        assert fastvit.create_model("vit_base_patch16_224", pretrained_cfg="augreg_in21k").num_classes == 21843
        model = fastvit.create_model("vit_base_patch16_224", num_classes=None, img_size=None)  # None: default
    assert model.num_classes == 1000 and model.pretrained_cfg["tag"] == "augreg2_in21k_ft_in1k"


def _tags_of(name):
    return [n.partition(".")[2] for n in get_arch_pretrained_cfgs(split_model_name_tag(name)[0])]


@pytest.mark.parametrize("module", ["vision_transformer", "vision_transformer_hybrid"])
def test_deprecated_names_map_as_timm_maps_them(module):
    """timm's old names (vit_base_patch16_224_in21k, ...) build the current architecture with the tag timm maps
    them to, with timm's warning; every one of timm's, for the two modules fastvit builds (where timm maps a name to
    a tag it has since dropped, both refuse it)."""
    deprecated = timm.models.get_deprecated_models(module)
    assert deprecated
    for name, current in deprecated.items():
        if split_model_name_tag(current)[1] not in _tags_of(current):  # timm maps it to a tag it no longer has
            with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="Invalid pretrained tag"):
                timm.create_model(name)
            with pytest.warns(UserWarning), pytest.raises(ValueError, match="unknown pretrained tag"):
                fastvit.create_model(name)
            continue
        with pytest.warns(UserWarning) as theirs, torch.device("meta"):
            ref = timm.create_model(name)
        with pytest.warns(UserWarning) as ours, torch.device("meta"):
            model = fastvit.create_model(name)
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs] == [
            f"Mapping deprecated model name {name} to current {current}."]
        assert model.pretrained_cfg == ref.pretrained_cfg and model.num_classes == ref.num_classes, name
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_bad_names_say_what_was_expected():
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'nope' for vit_base_patch16_224; its tags are: "
                                         r"augreg2_in21k_ft_in1k, .*mae"):
        fastvit.create_model("vit_base_patch16_224.nope")
    for name in ("vit_base_patch16_224.nope", "vit_nope"):  # timm raises a RuntimeError for both: so does fastvit
        with pytest.raises(RuntimeError):
            timm.create_model(name)
        with pytest.raises(RuntimeError):
            fastvit.create_model(name)
    with pytest.raises(ValueError, match="did you mean vit_base_patch16_224"):
        fastvit.get_pretrained_cfg("vit_base_patch16_244.augreg_in1k")
    with pytest.raises(RuntimeError, match="unknown model 'vit_nope'"):  # what timm raises, and a ValueError
        fastvit.create_model("vit_nope")
    with pytest.raises(ValueError, match="hf-hub:timm/vit_base_patch16_224"):
        fastvit.create_model("timm/vit_base_patch16_224")
    with pytest.raises(ValueError, match="expected one of .*hf-hub"):
        fastvit.create_model("s3:bucket/model")


# ---- the Hub -----------------------------------------------------------------------------------------------------
def test_pretrained_from_the_hub_cache_gives_timms_outputs(tmp_path):
    ref = timm_pair(TINY, depth=2)
    cache_weights(tmp_path, f"timm/{TINY}", ref)
    theirs = timm.create_model(TINY, pretrained=True, depth=2, cache_dir=tmp_path)  # the cache is timm's layout
    model = fastvit.create_model(TINY, pretrained=True, depth=2, cache_dir=tmp_path)
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(outputs(theirs, x), outputs(ref, x), atol=0, rtol=0)
    torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-5, rtol=1e-5)

    # another head stays freshly initialised, fewer input channels sum the patch filters: as timm does
    kw = dict(pretrained=True, depth=2, cache_dir=tmp_path, num_classes=10, in_chans=1)
    model, theirs = fastvit.create_model(TINY, **kw), timm.create_model(TINY, **kw)
    x1 = x[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x1), theirs.forward_features(x1), atol=1e-5, rtol=1e-5)
    assert model.head.weight.shape == (10, 192) and not torch.equal(model.head.weight[:, :5], ref.head.weight[:10, :5])


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224",
                                  "vit_base_patch16_clip_quickgelu_224", "aimv2_large_patch14_224",
                                  "vit_betwixt_patch16_reg4_gap_256", "vit_base_mci_224"])
def test_pretrained_families_load_timms_hub_weights(tmp_path, name):
    """The default tag of each family beyond the paper's ViT (registers, attention pooling, quick GELU, SwiGLU and
    RMSNorm, a pooled head, MobileCLIP's convolutional stem) from its Hub repo in the cache: timm's outputs, one
    block deep; and at another image size, the position table resampled around the prefix rows as timm resamples
    it."""
    ref = timm_pair(name, depth=1)
    cache_weights(tmp_path, fastvit.get_pretrained_cfg(name)["hf_hub_id"], ref)
    model = fastvit.create_model(name, pretrained=True, depth=1, cache_dir=tmp_path)
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-5, rtol=1e-5)
    kw = dict(pretrained=True, depth=1, cache_dir=tmp_path, img_size=112)
    model, theirs = fastvit.create_model(name, **kw), timm.create_model(name, **kw)
    x = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(outputs(model, x), outputs(theirs, x), atol=1e-5, rtol=1e-5)


def test_hf_hub_and_local_dir_names_load_timm_folders(tmp_path):
    ref = timm_pair(TINY, depth=2, img_size=64, num_classes=7)
    folder = tmp_path / "folder"
    save_for_hf(ref, folder, safe_serialization=True)
    cache = tmp_path / "cache"
    put_in_cache(cache, "someone/tiny-vit", {n: (lambda p, n=n: os.link(folder / n, p))
                                             for n in ("config.json", "model.safetensors")}, refs=("main", "v1"))
    x = torch.randn(2, 3, 64, 64)
    for name, kw in [("hf-hub:someone/tiny-vit", dict(cache_dir=cache)), ("hf-hub:someone/tiny-vit@v1",
                                                                            dict(cache_dir=cache)),
                     (f"local-dir:{folder}", {})]:
        model = fastvit.create_model(name, pretrained=True, **kw)
        theirs = timm.create_model(name, pretrained=True, **kw)
        torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outputs(theirs, x), outputs(ref, x), atol=0, rtol=0)
        assert as_json(model.pretrained_cfg) == as_json(theirs.pretrained_cfg)
        assert model.pretrained_model_args == theirs.pretrained_model_args
    assert fastvit.create_model("hf-hub:someone/tiny-vit", cache_dir=cache).pretrained_cfg["hf_hub_id"] == \
        "someone/tiny-vit"


def test_hub_download_honours_hf_hub_offline_and_hf_hub_cache(tmp_path):
    """In a fresh interpreter whose environment names the cache: no cache_dir argument anywhere."""
    snapshot = cache_weights(tmp_path, f"timm/{TINY}", timm_pair(TINY, depth=2))
    code = ("import fastvit, torch, safetensors.torch, sys;"
            f"m = fastvit.create_model({TINY!r}, pretrained=True, depth=2);"
            "sd = safetensors.torch.load_file(sys.argv[1]);"
            "assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items()), 'weights differ'")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code, str(snapshot / "model.safetensors")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_weights_in_reach_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"model.safetensors of Hugging Face Hub repo "
                                                r"'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k' is not in the cache "
                                                r".*HF_HUB_OFFLINE is set.*checkpoint_path="):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True, cache_dir=tmp_path)  # the default tag
    # not offline, the Hub unreachable (huggingface_hub's error after its retries): the message says how to skip them
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match=r"the Hub could not be reached \(on a machine without network, "
                                                r"HF_HUB_OFFLINE=1 says so at once"):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vit_huge_patch14_224.untrained has no pretrained weights; names with "
                                         "weights: vit_huge_patch14_224.mae, vit_huge_patch14_224.orig_in21k"):
        fastvit.create_model("vit_huge_patch14_224.untrained", pretrained=True)


def test_weights_load_into_another_head_as_timm(tmp_path):
    """Another head (num_classes, with a pooled layout: fc_norm instead of the final norm) loads what fits and
    warns about the rest, as timm's load_pretrained turns strict off there; with the weights' own head it is
    strict (below)."""
    ref = timm_pair(f"{TINY}", depth=2)
    cache_weights(tmp_path, f"timm/{TINY}", ref)
    with pytest.warns(UserWarning, match=r"another head \(0 classes, the weights 1000\): not loaded: "
                                         r"fc_norm.weight, fc_norm.bias, norm.bias, norm.weight"):
        model = fastvit.create_model(TINY, pretrained=True, depth=2, cache_dir=tmp_path, num_classes=0,
                                     global_pool="avg")
    theirs = ref.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc_norm"):
            assert torch.equal(tensor, theirs[name]), name
    assert model.fc_norm.weight.eq(1).all()


def test_a_hub_file_of_another_architecture_loads_nothing(tmp_path):
    cache_weights(tmp_path, f"timm/{TINY}", timm_pair("vit_small_patch16_224.augreg_in21k_ft_in1k", depth=2))
    with pytest.raises(CheckpointMismatchError, match=r"does not match vit_tiny_patch16_224.augreg_in21k_ft_in1k; "
                                                      r"nothing "
                                                      r"was loaded(.|\n)*blocks.0.attn.qkv.weight: checkpoint "
                                                      r"\(1152, 384\) vs model \(576, 192\)"):
        fastvit.create_model(TINY, pretrained=True, depth=2, cache_dir=tmp_path)
    model = fastvit.create_model(TINY, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError):
        load_pretrained(model, cache_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    put_in_cache(tmp_path, "someone/resnet", {"config.json": lambda p: pathlib.Path(p).write_text(
        json.dumps({"architecture": "resnet18", "num_classes": 1000, "pretrained_cfg": {}}))})
    with pytest.raises(ValueError, match="holds a 'resnet18' model, which fastvit does not build"):
        fastvit.create_model("hf-hub:someone/resnet", cache_dir=tmp_path)


def test_without_huggingface_hub_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'fastvit\[hub\]'"):
        fastvit.create_model(TINY, pretrained=True, depth=1)


def test_checkpoint_path_and_cfg_file_load_without_the_hub(tmp_path):
    ref = timm_pair(TINY, depth=2)
    path = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), path)
    x = torch.randn(1, 3, 224, 224)
    for model in (fastvit.create_model(TINY, pretrained=True, depth=2, checkpoint_path=path),  # nothing cached
                  fastvit.create_model(TINY, pretrained=True, depth=2, pretrained_cfg_overlay={"file": str(path)})):
        torch.testing.assert_close(outputs(model, x), outputs(ref, x), atol=1e-5, rtol=1e-5)


# ---- save_pretrained -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs,img,steps", [
    ("vit_tiny_patch16_224.augreg_in21k", dict(depth=2, img_size=32, num_classes=7, drop_path_rate=0.1), 32,
     ("as built", "fine-tuned: new head, new size", "pooled: avg, its norm kept")),
    ("vit_base_r50_s16_224", dict(depth=1, img_size=32, num_classes=3, embed_dim=64, num_heads=2), 32,
     ("as built",)),
])
def test_save_pretrained_writes_timms_folder(tmp_path, name, kwargs, img, steps):
    """fastvit.save_pretrained and timm's save_for_hf on our model write the config timm's writes for its own, after
    a new head and size (the size in timm's input traits too) and a new pooling (the norm placement it keeps)."""
    ref = timm_pair(name, **kwargs)
    model = fastvit.create_model(name, backend="torch", residual_dtype=torch.bfloat16, **kwargs)  # not in timm
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, img, img)
    for step in steps:
        if step.startswith("fine-tuned"):
            for m in (model, ref):
                m.reset_classifier(5)
                m.set_input_size(img_size=img + 16)
            ref.load_state_dict(model.state_dict())
            x = torch.randn(2, 3, img + 16, img + 16)
            if get_model_input_config is not None:
                assert get_model_input_config(model) == get_model_input_config(ref)
                assert get_model_input_config(model)["input_size"] == (3, img + 16, img + 16)
        if step.startswith("pooled"):
            for m in (model, ref):
                m.reset_classifier(4, "avg")
            ref.load_state_dict(model.state_dict())
        ours, theirs, by_timm = (tmp_path / side / step for side in ("ours", "timm", "ours_by_timm"))
        assert fastvit.save_pretrained(model, ours) == ours
        save_for_hf(ref, theirs, safe_serialization=True)
        save_for_hf(model, by_timm, safe_serialization=True)
        assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
        assert json.loads((by_timm / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
        assert sorted(os.listdir(ours)) == ["config.json", "model.safetensors"]
        expected = outputs(model, x)
        for reload in (timm.create_model(f"local-dir:{ours}", pretrained=True),
                       fastvit.create_model(f"local-dir:{ours}", pretrained=True)):
            torch.testing.assert_close(outputs(reload, x), expected, atol=1e-5, rtol=1e-5)


def test_save_pretrained_of_a_plain_model_needs_its_architecture(tmp_path):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3)
    model = fastvit.VisionTransformer(**args)
    with pytest.raises(ValueError, match="pass architecture="):
        fastvit.save_pretrained(model, tmp_path / "a")
    with pytest.raises(ValueError, match="would not rebuild this model"):
        fastvit.save_pretrained(model, tmp_path / "b", architecture="vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="model_args num_classes=4 disagrees with the model"):
        fastvit.save_pretrained(model, tmp_path / "c", architecture="vit_tiny_patch16_224", model_args={
            **args, "num_classes": 4})
    assert not any((tmp_path / d).exists() for d in "abc")
    folder = fastvit.save_pretrained(model, tmp_path / "d", architecture="vit_tiny_patch16_224", model_args=args,
                                     state_dict={k: v * 2 for k, v in model.state_dict().items()})
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert all(torch.equal(v, 2 * model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    assert load_file(folder / "model.safetensors").keys() == model.state_dict().keys()


def test_save_pretrained_says_a_norm_layer_s_eps_is_not_recorded(tmp_path):
    """A model built for Hugging Face weights (LayerNorm eps 1e-12, as the README says) cannot record that eps in
    config.json (timm's save_for_hf refuses it too): the error says so, and a JSON stand-in warns that the folder
    rebuilds with the stand-in's eps (outputs shift), which it does."""
    eps_norm = functools.partial(torch.nn.LayerNorm, eps=1e-12)
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3, norm_layer=eps_norm)
    with pytest.raises(ValueError, match=r"cannot be written to config.json: .* \(no JSON value records its "
                                         r"eps=1e-12: a model built from the folder would compute without it\)"):
        fastvit.save_pretrained(model, tmp_path / "a")
    with pytest.warns(UserWarning, match=r"model_args norm_layer='layernorm' stands in for .* its eps=1e-12 is not "
                                         r"recorded"):
        folder = fastvit.save_pretrained(model, tmp_path / "b", model_args={"norm_layer": "layernorm"})
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).blocks[0].norm1.eps == 1e-6


def test_save_pretrained_of_an_fsdp_model_takes_the_gathered_state_dict(tmp_path):
    """FSDP2 shards parameters into DTensors that one process cannot write: the error says how to gather them, and
    the gathered state dict is written as it is (one rank, gloo)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = fastvit.create_model(TINY, depth=1, img_size=32, patch_size=8, num_classes=3, backend="torch")
        fully_shard(model)
        with pytest.raises(ValueError, match="is sharded \\(FSDP\\): pass state_dict= a full state dict"):
            fastvit.save_pretrained(model, tmp_path / "sharded")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        folder = fastvit.save_pretrained(model, tmp_path / "full", state_dict=full)
    finally:
        torch.distributed.destroy_process_group()
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in full.items())
