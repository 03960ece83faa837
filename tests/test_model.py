"""fastvit.VisionTransformer against timm (the reference implementation) and the paper's equations."""
import functools
import inspect
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit
from _helpers import (assert_close_to_scale, compile_capturing_graphs, graph_calls, images, representative_names,
                      timm_pair)
from fastvit.kernels.flash_attention import relative_position_index

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def pair(**kwargs):
    """A fastvit model and a timm model with the same config and the same (timm's) random weights."""
    return timm_pair(**{**SMALL, **kwargs})


TIMM_CONFIGS = [
    {},
    dict(no_embed_class=True),
    dict(class_token=False, global_pool="avg"),
    dict(global_pool="avg"),
    dict(global_pool="avg", fc_norm=False),
    dict(global_pool=""),
    dict(global_pool="max"),
    dict(global_pool="avgmax", fc_norm=False),
    dict(qk_norm=True, scale_attn_norm=True),
    dict(scale_mlp_norm=True),
    dict(final_norm=False),
    dict(final_norm=False, global_pool="avg"),
    dict(init_values=1e-2),
    dict(qkv_bias=False, mlp_ratio=2.0),
    dict(img_size=(32, 48), patch_size=(8, 16)),
    dict(pos_embed="none"),
    # register tokens (DINOv2), attention pooling (SigLIP), norm and activation layers (CLIP, SigLIP)
    dict(reg_tokens=4, no_embed_class=True, init_values=1e-2),
    dict(reg_tokens=3),
    dict(reg_tokens=1, class_token=False, global_pool="avg"),
    dict(class_token=False, global_pool="map"),
    dict(reg_tokens=2, class_token=False, global_pool="map", act_layer="gelu_tanh"),
    dict(pre_norm=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5), act_layer="quick_gelu"),
    dict(norm_layer="rmsnorm", class_token=False, global_pool="avg", qk_norm=True),
    dict(embed_norm_layer="layernorm", act_layer="silu"),
    dict(proj_bias=False, qkv_bias=False),
    dict(reg_tokens=2, global_pool="avg", pool_include_prefix=True),
    dict(reg_tokens=1, class_token=False, global_pool="map", pool_include_prefix=True),
]


@pytest.mark.parametrize("cfg", TIMM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_timm_outputs_and_gradients(cfg):
    model, ref = pair(**cfg)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    size = cfg.get("img_size", 32)
    size = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, 3, *size)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(model.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True),
                               ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [{}, dict(global_pool="avg"), dict(residual_dtype="autocast")],
                         ids=["token", "avg", "16-bit residuals"])
def test_autocast_features_and_pre_logits_are_fp32_as_timm(cfg):
    """Autocast runs LayerNorm in fp32, so timm's features and pre-logits come back in fp32 (an fp32 probe takes
    them); the logits are in the autocast dtype."""
    model, ref = pair(**{k: v for k, v in cfg.items() if k != "residual_dtype"})
    if "residual_dtype" in cfg:
        model = fastvit.VisionTransformer(**SMALL, **cfg)
        model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        outs = [(m.forward_features(x), m.forward_head(m.forward_features(x), pre_logits=True), m(x),
                 m.forward_intermediates(x, norm=True)[1][0]) for m in (model, ref)]
    for ours, theirs in zip(*outs):
        assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
        torch.testing.assert_close(ours.float(), theirs.float(), atol=0.1, rtol=0.05)
    assert outs[0][0].dtype == torch.float32 and outs[0][2].dtype == torch.bfloat16


@pytest.mark.parametrize("residual_dtype", [None, "model"])
def test_a_model_cast_to_bf16_keeps_timms_dtypes_under_cpu_autocast(residual_dtype):
    """In a model cast with .bfloat16() timm's residual stream is bf16 and CPU autocast keeps a bf16 LayerNorm in
    bf16: features, intermediates, pre-logits and logits come back bf16, ours as timm's, with timm's values to
    bf16 rounding, and training reaches every (bf16) parameter."""
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(**SMALL).bfloat16()
    model = fastvit.VisionTransformer(**SMALL, residual_dtype=residual_dtype).bfloat16()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        outs = [(m.forward_features(x), m.forward_head(m.forward_features(x), pre_logits=True), m(x),
                 *m.forward_intermediates(x, norm=True)[1], *m.forward_intermediates(x)[1]) for m in (model, ref)]
    for ours, theirs in zip(*outs):
        assert ours.dtype == theirs.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), theirs.float(), atol=0.1, rtol=0.05)
    with torch.autocast("cpu", torch.bfloat16):
        model(x).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_residual_dtype_names_a_choice():
    with pytest.raises(ValueError, match="residual_dtype must be one of .*'model'"):
        fastvit.VisionTransformer(**SMALL, residual_dtype="fp32")


@pytest.mark.parametrize("kwargs", [dict(), dict(pos_embed="rel"), dict(residual_dtype="autocast")])
def test_forward_computes_only_what_a_class_token_head_reads(kwargs):
    """With a class-token head, forward's final LayerNorm runs on that token alone: in eval mode or without grad the
    logits are the bits of forward_head(forward_features(x)) (fp32 and bf16 autocast). In a training step the last
    block runs on that token alone too where it may (``class_token_suffices``; not with a relative-position table):
    logits and gradients agree to rounding, and autograd keeps less: the final norm's input for B rows instead of
    B x L and, with the one-row block, none of its other rows' MLP pre-activations."""
    from fastvit.memory import saved_activation_bytes
    from fastvit.model import class_token_suffices
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, **kwargs)
    x = torch.randn(4, 3, 32, 32)
    whole_block = "pos_embed" in kwargs
    assert class_token_suffices(model.blocks[-1]) is not whole_block

    def two_stages(m, images):
        return m.forward_head(m.forward_features(images))

    for enabled in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            assert torch.equal(model(x), two_stages(model, x))
        with torch.autocast("cpu", torch.bfloat16, enabled=enabled):
            assert torch.equal(model.eval()(x), two_stages(model, x))
        model.train()
    with torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(model(x), two_stages(model, x), rtol=2e-2, atol=2e-2)
    grads = []
    for fn in (model, functools.partial(two_stages, model)):
        model.zero_grad()
        fn(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    one_row = saved_activation_bytes(model, x)
    model.norm.register_forward_hook(lambda m, i, o: None)  # now forward runs the two stages as written
    tokens = (32 // 8) ** 2 + 1
    if whole_block:
        # B x (L - 1) rows more of the final norm's fp32 input, each with its fp32 mean and rstd
        assert saved_activation_bytes(model, x) - one_row == 4 * (tokens - 1) * (64 * 4 + 2 * 4)
    else:
        # at least the last block's fc1 pre-activations (B, L - 1, 4D) in fp32 more
        assert saved_activation_bytes(model, x) - one_row >= 4 * (tokens - 1) * 4 * 64 * 4


@pytest.mark.parametrize("kwargs", [dict(), dict(pos_embed="rel")])
def test_class_token_inference_runs_the_last_block_on_that_token(monkeypatch, kwargs):
    """set_class_token_inference: an eval forward runs the last block on the class token's row alone where it may
    (not with a relative-position table), with timm's logits to fp32 rounding; forward_features still runs every
    row, and torch.jit.trace traces the whole block (its check traces again without grad and compares)."""
    from fastvit.model import Block
    calls = []
    forward_pair = Block.forward_pair

    def recording(self, *args, **kw):
        calls.append(kw.get("class_token_only", False))
        return forward_pair(self, *args, **kw)
    monkeypatch.setattr(Block, "forward_pair", recording)
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, **kwargs).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = model(x)
        assert calls == [False, False]
        model.set_class_token_inference()
        calls.clear()
        logits = model(x)
        one_row = "pos_embed" not in kwargs
        assert calls == [False, one_row]
        features = model.forward_features(x)
    assert features.shape == (3, 17, 64)
    if one_row:
        ref = timm.models.vision_transformer.VisionTransformer(**SMALL).eval()
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(x), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(logits, whole)
    calls.clear()
    torch.jit.trace(model, x)
    assert calls[:2] == [False, False]  # traced whole (its check then calls forward eagerly)
    model.set_class_token_inference(False)
    with torch.no_grad():
        assert torch.equal(model(x), whole)


def test_forward_runs_a_hooked_final_norm_on_every_token():
    """A hook on the final norm, or a head that pools otherwise, sees the norm run on all tokens, as in timm."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL)
    seen = []
    model.norm.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    model(torch.randn(2, 3, 32, 32))
    assert seen == [(2, 17, 64)]


def test_dynamic_img_size_matches_timm():
    model, ref = pair(dynamic_img_size=True)
    for size in [(32, 32), (48, 40), (16, 64)]:
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_training_mode_with_dropout_is_stochastic_and_eval_is_not():
    model, _ = pair(drop_rate=0.5, drop_path_rate=0.5, proj_drop_rate=0.3, attn_drop_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("rates", [dict(pos_drop_rate=0.3), dict(proj_drop_rate=0.3), dict(drop_rate=0.3),
                                   dict(drop_path_rate=0.5)], ids=lambda r: next(iter(r)))
def test_training_mode_dropout_draws_as_timm(rates):
    """Each active dropout / DropPath runs (none is skipped as an identity) and draws timm's masks, in timm's
    order: the same seed gives timm's output."""
    model, ref = pair(**rates)
    model.train()
    ref.train()
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for net in (model, ref):
        torch.manual_seed(1)
        outs.append(net(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x), outs[0], atol=1e-3)


@pytest.mark.parametrize("drop_prob", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_path_module_is_timms(drop_prob, scale_by_keep):
    """fastvit.drop.DropPath against timm.layers.DropPath: the same bits from the same seed (the mask scaled, then
    multiplied in), drop_prob 1 drops everything (no 0 / 0), the same repr and arguments."""
    from fastvit.drop import DropPath
    x = torch.randn(64, 17, 32)
    ours, theirs = DropPath(drop_prob, scale_by_keep), timm.layers.DropPath(drop_prob, scale_by_keep=scale_by_keep)
    torch.manual_seed(0)
    out = ours(x)
    torch.manual_seed(0)
    assert torch.equal(out, theirs(x)) and out.isfinite().all()
    assert repr(ours) == repr(theirs) and ours.eval()(x) is x


# every registered name has timm's parameter names and shapes by construction (scripts/gen_pretrained_cfgs.py keeps
# only those, and tests/test_pretrained.py checks the shipped file is what it writes): here through create_model
@pytest.mark.parametrize("name", representative_names())
def test_registry_matches_timm(name):
    with torch.device("meta"):
        model, ref = fastvit.create_model(name), timm.create_model(name, weight_init="skip")  # shapes only
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert model.num_classes == ref.num_classes
    assert model.patch_embed.grid_size == ref.patch_embed.grid_size


@pytest.mark.parametrize("name", representative_names())
def test_every_layout_builds_timms_model(name):
    """Each registered layout (timm's constructor arguments as the data file holds them) against timm's model of the
    same name, one block deep at 3 x 2 tokens: the same initial parameters from the same seed, and (from random
    weights) the same outputs, features and gradients."""
    with torch.device("meta"):
        pe = fastvit.create_model(name, depth=1).patch_embed
        patch = getattr(pe, "token_stride", pe.patch_size)  # a hybrid's: its backbone's reduction x patch_size
    kwargs = dict(depth=1, img_size=(3 * patch[0], 2 * patch[1]), num_classes=5)
    torch.manual_seed(0)
    ref = timm.create_model(name, **kwargs)
    torch.manual_seed(0)
    model = fastvit.create_model(name, **kwargs)
    initial = model.state_dict()
    for k, v in ref.state_dict().items():  # a seed reproduces a timm run from its first step
        assert torch.equal(initial[k], v), f"{k}: the same seed initialised it otherwise than timm"
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, *kwargs["img_size"], generator=torch.Generator().manual_seed(1))
    out, expected = model(x), ref(x)
    assert_close_to_scale(out, expected, rtol=1e-5)
    assert_close_to_scale(model.forward_features(x), ref.forward_features(x), rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert_close_to_scale(p.grad, grads[n].grad, rtol=1e-4, msg=n)
    assert model.no_weight_decay() <= ref.no_weight_decay() and model.group_matcher() == ref.group_matcher()


def _trains_as_timm(model, ref, x):
    """From perturbed weights loaded into both: outputs in eval and in training (stochastic layers drawing the
    same masks from one seed, and dropping something) and gradients of timm's."""
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.load_state_dict(ref.state_dict(), strict=True)
    for train in (False, True):
        outs = []
        for net in (model.train(train), ref.train(train)):
            torch.manual_seed(1)
            outs.append(net(x))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0], model.eval()(x), atol=1e-3)  # something was dropped
    for out in outs:
        out.square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_res_post_block_as_timm():
    """block_fn='ResPostBlock' against timm's ResPostBlock: the norms start at init_values, and outputs (eval, and
    train with DropPath drawing the same masks) and gradients match; the class works as the name does, and an
    unknown name lists the choices."""
    from timm.models.vision_transformer import ResPostBlock as TimmResPostBlock
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    cfg = dict(SMALL, init_values=1e-3, class_token=False, global_pool="avg", qkv_bias=False, drop_path_rate=0.3)
    torch.manual_seed(0)
    ref = TimmViT(**cfg, block_fn=TimmResPostBlock)
    model = fastvit.VisionTransformer(**cfg, block_fn="ResPostBlock")
    assert type(model.blocks[1]) is fastvit.ResPostBlock
    assert model.blocks[1].norm2.weight.eq(1e-3).all() and ref.blocks[1].norm2.weight.eq(1e-3).all()
    x = torch.randn(2, 3, 32, 32)
    _trains_as_timm(model, ref, x)
    for cls in (fastvit.ResPostBlock, TimmResPostBlock):  # timm's class: ours in its place
        assert type(fastvit.VisionTransformer(**SMALL, block_fn=cls).blocks[0]) is fastvit.ResPostBlock
    with pytest.raises(ValueError, match=r"block_fn must be one of \('Block', 'ResPostBlock', 'ParallelThingsBlock', "
                                         r"'ParallelScalingBlock', 'DiffParallelScalingBlock'\), got 'ResPost'"):
        fastvit.VisionTransformer(**SMALL, block_fn="ResPost")


@pytest.mark.parametrize("block, cfg", [
    ("ParallelThingsBlock", dict(init_values=1e-3)),
    ("ParallelThingsBlock", dict(qk_norm=True, scale_mlp_norm=True, proj_drop_rate=0.2)),
    ("ParallelScalingBlock", dict(init_values=1e-3, proj_drop_rate=0.2)),
    ("ParallelScalingBlock", dict(qkv_bias=False, qk_norm=True, norm_layer="rmsnorm", pre_norm=True,
                                  no_embed_class=True)),
    (functools.partial(fastvit.ParallelScalingBlock, fuse_out_proj=True), dict(qkv_bias=False)),
    (functools.partial(timm.models.vision_transformer.ParallelScalingBlock, fuse_out_proj=True), {}),
    (functools.partial(timm.models.vision_transformer.ParallelThingsBlock, num_parallel=3), {}),
    (functools.partial(timm.models.vision_transformer.DiffParallelScalingBlock, dual_lambda=True), {}),
    ("Block", dict(attn_layer="diff", init_values=1e-3)),
    ("ResPostBlock", dict(attn_layer="diff", qk_norm=True, scale_attn_norm=True)),
    ("ParallelThingsBlock", dict(attn_layer="diff")),
    ("DiffParallelScalingBlock", dict(qkv_bias=False, init_values=1e-3, proj_drop_rate=0.2)),
    ("DiffParallelScalingBlock", dict(qk_norm=True, norm_layer="rmsnorm"))],
    ids=["things", "things-qk_norm-drop", "scaling-drop", "scaling-xp", "scaling-fused-out", "timm-fused-out",
         "timm-three-things", "timm-diff-dual-lambda", "diff",
         "diff-res-post", "diff-things", "diff-scaling-drop", "diff-scaling-qk_norm"])
def test_parallel_and_differential_blocks_as_timm(block, cfg):
    """timm's parallel blocks (its vit_*_18x2 and vit_*_xp models) and differential attention (attn_layer='diff'
    in any block, DiffParallelScalingBlock: its dwee, dlittle and dpwee models): the same parameter names in the
    same order, the same initial weights from a seed (lambda depends on the block's index), and outputs (eval, and
    train with DropPath and dropout drawing the same masks), masked outputs and gradients of timm's; a hook on one
    branch fires as in timm. A functools.partial of timm's class (how timm sets a block's own options) builds ours
    with them."""
    import timm.models.vision_transformer as tv
    if isinstance(block, str):
        theirs = getattr(tv, block)
    else:
        theirs = functools.partial(getattr(tv, block.func.__name__), **block.keywords)
    cfg = dict(SMALL, drop_path_rate=0.3, **cfg)
    torch.manual_seed(0)
    ref = tv.VisionTransformer(**cfg, block_fn=theirs)
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**cfg, block_fn=block)
    assert list(model.state_dict()) == list(ref.state_dict())
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name
    x = torch.randn(2, 3, 32, 32)
    _trains_as_timm(model, ref, x)
    mask = torch.rand(1, 1, 17, 17) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(model.eval().forward_features(x, attn_mask=mask),
                               ref.eval().forward_features(x, attn_mask=mask), atol=1e-5, rtol=1e-5)
    if isinstance(block, str) and block == "ParallelThingsBlock":
        seen = []
        for net in (model, ref):
            handle = net.blocks[1].attns[1].register_forward_hook(lambda m, i, o: seen.append(o))
            net(x)
            handle.remove()
        torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", ["ParallelThingsBlock", "ParallelScalingBlock", "DiffParallelScalingBlock"])
def test_fix_init_names_the_blocks_it_cannot_scale(block):
    """timm's fix_init scales Block's attn.proj and mlp.fc2; the parallel blocks have neither (timm's raises an
    AttributeError from its init), so fix_init is refused with a ValueError that says so."""
    with pytest.raises(ValueError, match=f"fix_init scales each block's attn.proj and mlp.fc2, which {block} has not"):
        fastvit.VisionTransformer(**SMALL, block_fn=block, fix_init=True)


@pytest.mark.parametrize("cfg", [dict(attn_layer="diff"), dict(block_fn="DiffParallelScalingBlock")])
def test_differential_attention_refuses_odd_head_widths(cfg):
    """Differential attention halves each head's q and k: 66 channels in 2 heads of 33 were accepted and failed
    in the first forward with a reshape error (as timm's)."""
    with pytest.raises(ValueError, match="embed_dim 66 must be divisible by num_heads 2 into heads of an even width"):
        fastvit.VisionTransformer(**dict(SMALL, embed_dim=66, num_heads=2), **cfg)
    fastvit.VisionTransformer(**dict(SMALL, embed_dim=68, num_heads=2), **cfg)


def test_the_block_index_reaches_differential_attention_only_as_in_timm():
    """timm passes ``depth`` (the block's index, which sets lambda_init) to DiffAttention and its subclasses only:
    a user's attention with a ``depth`` argument of its own keeps its default, in fastvit as in timm."""
    import timm.models.vision_transformer as tv

    class DepthAttention(fastvit.Attention):
        def __init__(self, dim, depth=-1, **kwargs):
            super().__init__(dim, kwargs["num_heads"], kwargs["qkv_bias"])
            self.depth = depth

    class Sub(fastvit.DiffAttention):
        pass

    cfg = dict(SMALL, depth=3)
    for vit in (fastvit.VisionTransformer, tv.VisionTransformer):
        assert [b.attn.depth for b in vit(**cfg, attn_layer=DepthAttention).blocks] == [-1, -1, -1]
    for layer in (Sub, functools.partial(fastvit.DiffAttention, dual_lambda=True), "diff"):
        lambdas = [b.attn.lambda_init for b in fastvit.VisionTransformer(**cfg, attn_layer=layer).blocks]
        assert lambdas == [0.8 - 0.6 * math.exp(-0.3 * i) for i in range(3)]


def test_parallel_blocks_and_differential_attention_refuse_relative_positions():
    with pytest.raises(ValueError, match="pos_embed='rel' needs one attention per block"):
        fastvit.VisionTransformer(**SMALL, pos_embed="rel", block_fn="ParallelScalingBlock")
    with pytest.raises(ValueError, match="attn_layer DiffAttention has no relative positions"):
        fastvit.VisionTransformer(**SMALL, pos_embed="rel", attn_layer="diff")
    with pytest.raises(ValueError, match=r"attn_layer must be one of \('', 'attn', 'diff'\), got 'dif'"):
        fastvit.VisionTransformer(**SMALL, attn_layer="dif")


def test_register_tokens_and_attention_pool_as_timm():
    model, ref = pair(reg_tokens=2, class_token=False, global_pool="map")
    x = torch.randn(2, 3, 32, 32)
    assert model.num_prefix_tokens == ref.num_prefix_tokens == 2 and model.num_reg_tokens == 2
    final, taken = model.forward_intermediates(x, indices=[0], return_prefix_tokens=True, output_fmt="NLC")
    ref_final, ref_taken = ref.forward_intermediates(x, indices=[0], return_prefix_tokens=True, output_fmt="NLC")
    torch.testing.assert_close(taken[0][1], ref_taken[0][1])  # the register tokens
    torch.testing.assert_close(taken[0][0], ref_taken[0][0])
    feats = ref.forward_features(x)
    torch.testing.assert_close(model.pool(feats, pool_type="avg"), ref.pool(feats, pool_type="avg"))
    assert model.no_weight_decay() == {"reg_token", "pos_embed"}
    model.set_input_size(img_size=48)
    ref.set_input_size(img_size=48)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    model.reset_classifier(3, global_pool="avg")  # no attention pool any more, as in timm
    assert model.attn_pool is None and model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool='map' needs the attention pool"):
        model.reset_classifier(3, global_pool="map")


@pytest.mark.parametrize("ours,theirs", [
    ("swiglu", "SwiGLU"), ("swiglu_packed", functools.partial(timm.layers.GluMlp, act_layer=nn.SiLU, gate_last=False)),
    ("glu", "GluMlp")])
def test_gated_mlps_match_timm(ours, theirs):
    """AIMv2's and DINOv2-giant's MLPs by name against timm's classes: timm's init (the gate opened: bias 1, weights
    near 0), outputs and gradients; with timm's own class passed, it runs as given."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    theirs = getattr(timm.layers, theirs) if isinstance(theirs, str) else theirs
    cfg = dict(SMALL, mlp_ratio=3.0, act_layer="silu", proj_bias=False, scale_mlp_norm=True)
    torch.manual_seed(0)
    ref = TimmViT(**cfg, mlp_layer=theirs)
    model = fastvit.VisionTransformer(**cfg, mlp_layer=ours)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert p.shape == q.shape, name
        if ".mlp.fc" in name:  # the same gate rows open: bias 1, weights ~ N(0, 1e-6)
            flat = (p.abs().amax(-1) < 1e-3, q.abs().amax(-1) < 1e-3) if p.ndim == 2 else (p == 1, q == 1)
            assert torch.equal(*flat) and flat[0].any() == name.endswith(("fc1_g.weight", "fc1.weight")), name
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert type(fastvit.VisionTransformer(**SMALL, mlp_layer=theirs).blocks[0].mlp) is type(ref.blocks[0].mlp)


@pytest.mark.parametrize("cfg", [dict(weight_init="jax"), dict(weight_init="jax_nlhb", global_pool="map",
                                                                class_token=False),
                                 dict(weight_init="moco"), dict(fix_init=True), dict(weight_init="jax", fix_init=True,
                                                                                     pre_norm=True),
                                 dict(weight_init="reset")])
def test_weight_init_modes_draw_as_timm(cfg):
    """Each init mode, from the same seed, gives timm's parameters bit for bit: the same draws in the same order
    (timm's inverse-CDF truncated normal, layers visited children first)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    cfg = dict(SMALL, embed_dim=192, num_heads=3, depth=3, num_classes=100, **cfg)
    torch.manual_seed(0)
    theirs = TimmViT(**cfg).state_dict()
    torch.manual_seed(0)
    ours = fastvit.VisionTransformer(**cfg).state_dict()
    for name, q in theirs.items():
        assert torch.equal(ours[name], q), name
    with pytest.raises(ValueError, match="weight_init must be one of"):
        fastvit.VisionTransformer(**SMALL, weight_init="xavier")


@pytest.mark.parametrize("cfg", [dict(patch_drop_rate=0.5), dict(patch_drop_rate=0.3, reg_tokens=2,
                                                                 class_token=False, global_pool="avg")])
def test_patch_dropout_keeps_timms_tokens(cfg):
    """In training the same seed keeps the same patch tokens as timm (the prefix tokens always), so outputs and
    gradients match; in eval every token runs."""
    model, ref = pair(**cfg, depth=1)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    ref.train()
    outs = []
    for net in (model, ref):
        torch.manual_seed(3)
        outs.append(net.forward_features(x))
    assert outs[0].shape[1] == ref.num_prefix_tokens + max(1, int(16 * (1 - cfg["patch_drop_rate"])))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(o.square().sum(), net.patch_embed.proj.weight)[0] for o, net in zip(outs, (model, ref))]
    torch.testing.assert_close(*grads, atol=1e-5, rtol=1e-4)
    model.eval()
    ref.eval()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="patch_drop_rate needs the position table at the stem"):
        fastvit.VisionTransformer(**SMALL, patch_drop_rate=0.5, pos_embed="rel")


@pytest.mark.parametrize("mode", ["", "jax", "reset"])
@pytest.mark.parametrize("needs_reset", [True, False])
@pytest.mark.parametrize("cfg", [{}, dict(init_values=1e-5, reg_tokens=2, global_pool="map", class_token=False,
                                          no_embed_class=True), dict(weight_init="skip")])
def test_init_weights_restarts_a_trained_model_as_timm(cfg, mode, needs_reset):
    """init_weights on trained weights (every parameter moved by ~3), from the same seed: every parameter as timm
    leaves it, bit for bit; with ``needs_reset`` the norms and layer scales start afresh too, without it they stay."""
    model, ref = pair(**cfg)
    with torch.no_grad():
        for net in (model, ref):
            torch.manual_seed(1)
            for p in net.parameters():
                p.add_(torch.randn_like(p) + 3)
    for net in (model, ref):
        torch.manual_seed(2)
        net.init_weights(mode, needs_reset=needs_reset)
    ours, theirs = model.state_dict(), ref.state_dict()
    kept = {name for name, t in theirs.items() if t.mean() > 1.5}
    assert any("norm" in name for name in kept) is not needs_reset
    for name, t in theirs.items():  # untouched, reset to a constant or drawn again: the same values
        assert torch.equal(ours[name], t), name


def test_weight_init_skip_leaves_the_parameters_as_made():
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, weight_init="skip")
    assert torch.count_nonzero(model.pos_embed) == 0  # not drawn
    model.init_weights("jax")
    assert torch.count_nonzero(model.head.weight) == 0 and model.pos_embed.std() > 0.01


@pytest.mark.parametrize("kwargs,match", [
    (dict(mlp_layer="geglu"), r"mlp_layer must be one of \('swiglu', 'swiglu_packed', 'glu'\)"),
    (dict(reg_tokens=2, pos_embed="rel"), "reg_tokens must be 0 or more, and 0 with pos_embed='rel'"),
    (dict(reg_tokens=-1), "reg_tokens must be 0 or more"),
    (dict(act_layer="gelu_erf"), r"act_layer must be one of \('gelu', 'gelu_tanh', 'quick_gelu'"),
    (dict(norm_layer="batchnorm"), r"norm_layer must be one of \('layernorm', 'rmsnorm'\)"),
    (dict(global_pool="map2"), "global_pool must be one of"),
])
def test_layout_options_say_what_was_expected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastvit.VisionTransformer(**{**SMALL, **kwargs})


def test_gelus_and_layernorm_fuse_other_layers_do_not():
    """The exact GELU and timm's two approximations run in the fused ops under their name there; another activation
    (or a GELU subclass) or norm runs as its own module."""
    for kwargs, approximate in [({}, "none"), (dict(act_layer="gelu_tanh"), "tanh"), (dict(act_layer=nn.GELU), "none"),
                                (dict(act_layer="quick_gelu"), "sigmoid"), (dict(act_layer="silu"), None),
                                (dict(act_layer=type("MyGELU", (nn.GELU,), {})), None)]:
        mlp = fastvit.VisionTransformer(**SMALL, **kwargs).blocks[0].mlp
        assert mlp.gelu_approximate == approximate and mlp.fused_activation is (approximate is not None), kwargs
    model = fastvit.VisionTransformer(**SMALL, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5))
    assert model.blocks[0].norm1.eps == model.norm.eps == 1e-5
    assert type(fastvit.VisionTransformer(**SMALL, norm_layer="rmsnorm").blocks[0].norm1) is nn.RMSNorm


@pytest.mark.parametrize("name,count", [("vit_base_patch16_224", 86_567_656), ("vit_large_patch16_224", 304_326_632),
                                        ("vit_huge_patch14_224", 632_045_800)])
def test_parameter_counts_of_the_paper_variants(name, count):
    with torch.device("meta"):  # ViT-H planned without allocating memory
        model = fastvit.create_model(name, num_classes=1000)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("pos_embed", ["learn", "rel"])
def test_forward_and_backward_on_the_meta_device(pos_embed):
    """A model planned on the meta device runs there, as timm's does (shapes without memory), in fp32, fp16 and
    under autocast (which has no meta mode)."""
    with torch.device("meta"):
        model = fastvit.create_model("vit_tiny_patch16_224", pos_embed=pos_embed, num_classes=7)
        x = torch.randn(2, 3, 224, 224, requires_grad=True)
        model(x).sum().backward()
        assert x.grad.is_meta and x.grad.shape == x.shape
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).shape == (2, 7)
        assert model.half()(x.half()).dtype == torch.float16


def test_the_class_takes_timms_device_and_dtype_keywords():
    """``VisionTransformer(..., device=, dtype=)`` as timm's class takes them: built on the meta device without
    memory; in bf16, timm's fp32 initialisation with the same seed, rounded (timm draws in bf16 itself)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    model = fastvit.VisionTransformer(**kwargs, device="meta")
    assert all(p.is_meta for p in model.parameters()) and model.num_classes == 5
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**kwargs, dtype=torch.bfloat16)
    torch.manual_seed(0)
    ref = TimmViT(**kwargs).to(torch.bfloat16)
    for (name, p), (ref_name, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert name == ref_name and p.dtype == q.dtype == torch.bfloat16 and torch.equal(p, q), name
    assert {"device", "dtype"} <= set(inspect.signature(fastvit.VisionTransformer).parameters)


def test_registry_names_and_errors(monkeypatch):
    assert "vit_base_patch16_224" in fastvit.list_models()
    assert fastvit.list_models("vit_large_patch32*") == ["vit_large_patch32_224", "vit_large_patch32_384"]
    # every ViT of timm's vision_transformer.py (timm 1.0.31), parallel blocks and differential attention included
    assert set(timm.list_models(module="vision_transformer")) <= set(fastvit.list_models())
    with pytest.raises(ValueError, match="vit_base_patch16_224"):
        fastvit.create_model("vit_base_patch16_244")
    # one of a later timm's that the data file lists as not built: the error says why
    data = {**fastvit.registry._data(), "skipped": {"vit_next_patch16_224": "attn_layer='next'"}}
    monkeypatch.setattr(fastvit.registry, "_data", lambda: data)
    with pytest.raises(ValueError, match=r"'vit_next_patch16_224' is timm's, but fastvit does not build it "
                                         r"\(attn_layer='next'\)"):
        fastvit.create_model("vit_next_patch16_224")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):  # offline, nothing cached (tests/conftest.py)
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True)
    model = fastvit.create_model("vit_tiny_patch16_224.augreg_in21k", num_classes=7, depth=1)
    assert model.head.out_features == 7 and len(model.blocks) == 1


@pytest.mark.parametrize("num_prefix,old,new", [(1, (4, 4), (6, 6)), (1, (4, 4), (3, 5)), (0, (3, 5), (7, 2)),
                                                (1, None, (8, 8))])
def test_resample_abs_pos_embed_matches_timm(num_prefix, old, new):
    torch.manual_seed(0)
    grid = old or (4, 4)
    posemb = torch.randn(1, num_prefix + grid[0] * grid[1], 16)
    expected = timm.layers.resample_abs_pos_embed(posemb, new, old, num_prefix_tokens=num_prefix)
    torch.testing.assert_close(fastvit.resample_abs_pos_embed(posemb, new, old, num_prefix_tokens=num_prefix),
                               expected)


@pytest.mark.parametrize("new", [(12, 6), (16, 4), (7, 10), (14, 14), (4, 4)])
def test_resample_patch_embed_matches_timm(new):
    """Sizes that shrink on one axis and grow on the other make the resize matrix rank-deficient."""
    torch.manual_seed(0)
    weight = torch.randn(16, 3, 8, 8)
    expected = timm.layers.resample_patch_embed(weight, list(new))
    out = fastvit.resample_patch_embed(weight, new)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_resample_keeps_dtype_and_prefix():
    posemb = torch.randn(1, 1 + 16, 8, dtype=torch.float16)
    out = fastvit.resample_abs_pos_embed(posemb, (6, 6))
    assert out.dtype == torch.float16 and out.shape == (1, 37, 8)
    assert torch.equal(out[:, :1], posemb[:, :1])


@pytest.mark.parametrize("img_size,patch_size", [(48, None), ((40, 56), None), (None, 4), (64, 16)])
def test_set_input_size_matches_timm(img_size, patch_size):
    model, ref = pair()
    model.set_input_size(img_size=img_size, patch_size=patch_size)
    ref.set_input_size(img_size=img_size, patch_size=patch_size)
    assert model.patch_embed.grid_size == ref.patch_embed.grid_size
    torch.testing.assert_close(model.pos_embed, ref.pos_embed)
    torch.testing.assert_close(model.patch_embed.proj.weight, ref.patch_embed.proj.weight, atol=1e-5, rtol=1e-4)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos_embed", ["learn", "learn_2d", "rel"])
def test_set_input_size_keeps_frozen_position_tables_frozen(pos_embed):
    """A fine-tune that froze the stem changes the resolution: every resampled table stays as frozen as it was."""
    model = fastvit.VisionTransformer(**SMALL, pos_embed=pos_embed)
    for name, p in model.named_parameters():
        p.requires_grad_("pos" not in name)
    model.set_input_size(img_size=48)
    trains = {name: p.requires_grad for name, p in model.named_parameters() if "pos" in name}
    assert trains and not any(trains.values())


def test_pool_types_override_as_timm():
    model, ref = pair()
    feats = ref.forward_features(torch.randn(2, 3, 32, 32))
    for pool_type in ("token", "avg", "max", "avgmax", ""):
        torch.testing.assert_close(model.pool(feats, pool_type=pool_type), ref.pool(feats, pool_type=pool_type))
    model.global_pool = "mean"  # set past the constructor's check: the error names the choices
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.pool(feats)


def test_patch_embed_and_model_attributes_as_timm():
    model, ref = pair(img_size=(32, 48), patch_size=(8, 16))
    assert model.in_chans == ref.in_chans == 3
    for args in ((), (False,)):
        assert model.patch_embed.feat_ratio(*args) == ref.patch_embed.feat_ratio(*args)
    assert model.patch_embed.dynamic_feat_size((40, 70)) == ref.patch_embed.dynamic_feat_size((40, 70)) == (5, 4)


def test_reset_classifier_is_zero_initialised():
    model, _ = pair()
    model.reset_classifier(5)
    assert model.head.out_features == 5 and model.num_classes == 5
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0
    model.reset_classifier(0, global_pool="avg")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max_avg")


def test_grad_checkpointing_gives_the_same_gradients():
    model, _ = pair(depth=3)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_no_weight_decay_names():
    model, _ = pair()
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}
    rel = fastvit.VisionTransformer(**SMALL, pos_embed="rel")
    assert rel.no_weight_decay() == {"cls_token", "blocks.0.attn.rel_pos_table", "blocks.1.attn.rel_pos_table"}
    assert fastvit.VisionTransformer(**SMALL, pos_embed="learn_2d").no_weight_decay() == {
        "cls_token", "pos_embed_h", "pos_embed_w"}


# ---- the paper's position-embedding ablations --------------------------------------------------------------------

def manual_forward(model, x, pos_per_layer):
    """Block-by-block reference using torch's own modules: z_{l} = Block(z_{l-1} + pos_l)."""
    tokens = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                      stride=model.patch_embed.patch_size).flatten(2).transpose(1, 2)
    z = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)
    for i, block in enumerate(model.blocks):
        z = block(z + pos_per_layer(i))
    return model.head(F.layer_norm(z, (z.shape[-1],), model.norm.weight, model.norm.bias, 1e-6)[:, 0])


def grid_table(rows, cols):
    """E_pos[i*gw + j] = [row_i; col_j] built with loops, the learn_2d definition."""
    return torch.stack([torch.cat([rows[i], cols[j]]) for i in range(len(rows)) for j in range(len(cols))])


@pytest.mark.parametrize("at", ["stem", "every_layer", "every_layer_shared"])
def test_learn_2d_tables(at):
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**{**SMALL, "img_size": (32, 48)}, pos_embed="learn_2d", pos_embed_at=at).eval()
    tables = 2 if at == "every_layer" else 1
    assert model.pos_embed_h.shape == (tables, 4, 32) and model.pos_embed_w.shape == (tables, 6, 32)
    x = torch.randn(2, 3, 32, 48)

    def pos(i):
        t = 0 if at != "every_layer" else i
        if at == "stem" and i > 0:
            return 0
        return F.pad(grid_table(model.pos_embed_h[t], model.pos_embed_w[t]), (0, 0, 1, 0))
    torch.testing.assert_close(model(x), manual_forward(model, x, pos), atol=1e-5, rtol=1e-5)
    model(x).sum().backward()
    assert model.pos_embed_h.grad.abs().sum() > 0 and model.pos_embed_w.grad.abs().sum() > 0


@pytest.mark.parametrize("at", ["every_layer", "every_layer_shared"])
def test_learn_1d_every_layer(at):
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, pos_embed="learn", pos_embed_at=at).eval()
    assert model.pos_embed.shape == ((2 if at == "every_layer" else 1), 17, 64)
    x = torch.randn(2, 3, 32, 32)
    expected = manual_forward(model, x, lambda i: model.pos_embed[i if at == "every_layer" else 0])
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_no_pos_embed_is_permutation_equivariant():
    """Without position embeddings the encoder sees a bag of patches: permuting patches permutes tokens."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, pos_embed="none").eval()
    assert model.pos_embed is None
    x = torch.randn(1, 3, 32, 32)
    swapped = x.clone()
    swapped[..., :8, :8], swapped[..., 8:16, 8:16] = x[..., 8:16, 8:16], x[..., :8, :8]
    a, b = model.forward_features(x), model.forward_features(swapped)
    torch.testing.assert_close(a[:, 0], b[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[:, 1], b[:, 6], atol=1e-5, rtol=1e-5)


def test_relative_position_bias_matches_brute_force():
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**{**SMALL, "img_size": (24, 32)}, pos_embed="rel").eval()
    attn = model.blocks[0].attn
    gh, gw = 3, 4
    assert attn.rel_pos_table.shape == (4, (2 * gh - 1) * (2 * gw - 1) + 3)
    with torch.no_grad():
        attn.rel_pos_table.normal_()
    y = torch.randn(2, 1 + gh * gw, 64)
    B, N, D = y.shape
    q, k, v = (y @ attn.qkv.weight.T + attn.qkv.bias).reshape(B, N, 3, 4, 16).permute(2, 0, 3, 1, 4)
    bias = torch.empty(4, N, N)
    r = (2 * gh - 1) * (2 * gw - 1)
    for i in range(N):
        for j in range(N):
            if i == 0 and j == 0:
                idx = r + 2
            elif i == 0:
                idx = r
            elif j == 0:
                idx = r + 1
            else:
                (yi, xi), (yj, xj) = divmod(i - 1, gw), divmod(j - 1, gw)
                idx = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
            bias[:, i, j] = attn.rel_pos_table[:, idx]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16) + bias, dim=-1)
    expected = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(attn(y, (gh, gw)), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(relative_position_index((gh, gw))[1:, 1:].diagonal(), torch.full((gh * gw,), r // 2))


def _masks(n, tokens):
    """timm's mask arguments: a bool mask (True: may attend), an additive float one per image, and causal."""
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(tokens, tokens, generator=gen) > 0.3
    keep |= torch.eye(tokens, dtype=torch.bool)  # every query keeps a key
    additive = torch.randn(n, 1, tokens, tokens, generator=gen)
    return [dict(attn_mask=keep), dict(attn_mask=additive), dict(is_causal=True)]


@pytest.mark.parametrize("fused_attn", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("which", ["bool", "float", "causal"])
def test_attention_masks_as_timm(which, fused_attn):
    """timm's attn_mask / is_causal on forward, forward_features, forward_intermediates, a block and an attention:
    outputs and gradients equal timm's, on the fused path (SDPA with the mask) and the explicit one."""
    model, ref = pair(reg_tokens=1)
    for m in (model, ref):
        for block in m.blocks:
            block.attn.fused_attn = fused_attn
    x = images(2)
    masks = _masks(2, 1 + 1 + 16)[["bool", "float", "causal"].index(which)]
    out, expected = model(x, **masks), ref(x, **masks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, model(x), atol=1e-3)  # the mask changed something
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(model.forward_features(x, **masks), ref.forward_features(x, **masks), atol=1e-5,
                               rtol=1e-5)
    ours = model.forward_intermediates(x, indices=[0, 1], **masks)
    theirs = ref.forward_intermediates(x, indices=[0, 1], **masks)
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    tokens = torch.randn(2, 18, 64)
    torch.testing.assert_close(model.blocks[0](tokens, **masks), ref.blocks[0](tokens, **masks), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(model.blocks[1].attn(tokens, **masks), ref.blocks[1].attn(tokens, **masks),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["bool", "float", "causal"])
def test_attention_masks_join_the_relative_position_bias(which):
    """With pos_embed='rel' (ours only) the mask and the bias add up: the fused path (SDPA with one additive mask)
    gives what the explicit softmax(q k^T / sqrt(D_h) + B_rel + M) v gives."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, pos_embed="rel").eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.rel_pos_table.normal_()
    x = images(2)
    masks = _masks(2, 17)[["bool", "float", "causal"].index(which)]
    fused = model(x, **masks)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(fused, model(x, **masks), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fused, model(x), atol=1e-3)


@pytest.mark.parametrize("cfg", [{}, dict(reg_tokens=2), dict(no_embed_class=True, reg_tokens=1),
                                 dict(class_token=False, global_pool="avg"), dict(pos_embed="none")],
                         ids=["cls", "reg", "no_embed_class", "no_cls", "none"])
def test_stages_by_hand_as_timm(cfg):
    """patch_embed, _pos_embed, patch_drop, norm_pre, blocks, norm called one by one (code written against timm's
    forward_features) give timm's tokens, and our forward_features; (B, gh, gw, D) tokens take another grid."""
    model, ref = pair(**cfg) if cfg.get("pos_embed") != "none" else (fastvit.VisionTransformer(**SMALL, **cfg), None)
    x = images(2)

    def by_hand(m, x):
        z = m._pos_embed(m.patch_embed(x))
        return m.norm(m.blocks(m.norm_pre(m.patch_drop(z))))

    torch.testing.assert_close(by_hand(model, x), model.forward_features(x), atol=1e-5, rtol=1e-5)
    if ref is not None:
        torch.testing.assert_close(by_hand(model, x), by_hand(ref, x), atol=1e-5, rtol=1e-5)
    tokens = model.patch_embed(images(2, 48))
    grid = tokens.reshape(2, 6, 6, -1)
    assert model._pos_embed(grid).shape == (2, model.num_prefix_tokens + 36, 64)
    with pytest.raises(ValueError, match=r"_pos_embed takes \(B, 16, D\) tokens of the 4 x 4 patch grid"):
        model._pos_embed(tokens)


@pytest.mark.parametrize("cfg", [{}, dict(dynamic_img_pad=True)], ids=["dynamic", "dynamic_pad"])
def test_dynamic_size_patch_tokens_keep_their_grid_as_timms(cfg):
    """With dynamic_img_size, patch_embed gives (B, gh, gw, D) tokens as timm's (its NHWC output), so a forward
    run stage by stage takes an image of another size; a hook on patch_embed sees what timm's would."""
    model, ref = pair(dynamic_img_size=True, **cfg)
    x = images(2, 48)[..., :40]  # 6 x 5 patches
    if cfg:
        x = x[..., :45, :37]  # padded to 6 x 5 patches
    seen = []
    model.patch_embed.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    for m in (model, ref):
        assert m.patch_embed(x).shape == (2, 6, 5, 64)
    torch.testing.assert_close(model._pos_embed(model.patch_embed(x)), ref._pos_embed(ref.patch_embed(x)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert seen[-1] == (2, 6, 5, 64)  # the hooked model's own forward


def test_fused_attn_default_follows_timms_switch(monkeypatch):
    """timm.layers.set_fused_attn(False) (or TIMM_FUSED_ATTN=0 before timm is loaded) builds attention layers on the
    explicit path, as timm's own, in blocks and in the attention pool."""
    import sys

    from timm.layers import set_fused_attn
    from timm.layers.config import use_fused_attn
    was = use_fused_attn()
    set_fused_attn(False)
    try:
        model, ref = pair(class_token=False, global_pool="map")
        assert [b.attn.fused_attn for b in model.blocks] == [b.attn.fused_attn for b in ref.blocks] == [False] * 2
        assert model.attn_pool.fused_attn is ref.attn_pool.fused_attn is False
        torch.testing.assert_close(model(images(2)), ref(images(2)), atol=1e-5, rtol=1e-5)
    finally:
        set_fused_attn(was)
    assert fastvit.VisionTransformer(**SMALL).blocks[0].attn.fused_attn is True
    monkeypatch.delitem(sys.modules, "timm.layers.config")
    monkeypatch.setenv("TIMM_FUSED_ATTN", "0")
    assert fastvit.VisionTransformer(**SMALL).blocks[0].attn.fused_attn is False


def test_rel_pos_follows_set_input_size():
    model = fastvit.VisionTransformer(**SMALL, pos_embed="rel")
    model.set_input_size(img_size=48)
    assert model.blocks[0].attn.rel_pos_table.shape == (4, 11 * 11 + 3)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    dyn = fastvit.VisionTransformer(**SMALL, pos_embed="rel", dynamic_img_size=True)
    assert dyn(torch.randn(1, 3, 40, 24)).shape == (1, 10)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pos_embed="sincos"), "pos_embed"), (dict(global_pool="prr"), "global_pool"),
    (dict(backend="cuda"), "backend"), (dict(pos_embed_at="input"), "pos_embed_at"),
    (dict(pos_embed="none", pos_embed_at="every_layer"), "pos_embed_at"),
    (dict(class_token=False), "class_token"), (dict(num_heads=5), "num_heads"),
    (dict(img_size=6), "smaller than patch_size"),
])
def test_bad_config_names_expected_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastvit.VisionTransformer(**{**SMALL, **kwargs})


@pytest.mark.parametrize("cfg,size", [(dict(img_size=30), (30, 30)), (dict(img_size=(38, 44)), (38, 44)),
                                      (dict(img_size=(45, 27), reg_tokens=2, global_pool="avg"), (45, 27))])
def test_pixels_past_the_last_whole_patch_are_dropped_as_timm(cfg, size):
    """A model whose image size is not a whole number of patches (SigLIP so400m/14 at 384 px): the remainder is
    dropped, as timm's strided projection drops it (with dynamic_img_size each image must be whole patches, as in
    timm: test_bad_inputs_raise_clear_errors)."""
    model, ref = pair(**cfg)
    x = torch.randn(2, 3, *size, requires_grad=True)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad, ref_grad = torch.autograd.grad(out.square().sum(), x)[0], torch.autograd.grad(expected.square().sum(), x)[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert model.patch_embed.grid_size == ref.patch_embed.grid_size


def test_bad_inputs_raise_clear_errors():
    model, _ = pair()
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected image size \(32, 32\)"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="4D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Tensor"):
        model([[1.0]])
    dyn, _ = pair(dynamic_img_size=True)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        dyn(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cudnn")


@pytest.mark.parametrize("dynamic, shape, dtype", [(False, (1, 3, 48, 48), torch.float32),
                                                   (True, (1, 3, 36, 32), torch.float32),
                                                   (False, (1, 1, 32, 32), torch.float32),
                                                   (False, (1, 3, 32, 32), torch.int64)],
                         ids=["size", "not-whole-patches", "channels", "integer"])
def test_bad_images_raise_what_timm_raises(dynamic, shape, dtype):
    """Code written against timm catches our errors with timm's exception type (an AssertionError for a size,
    the convolution's RuntimeError for channels or dtype); ours are ValueError / TypeError as well."""
    model, ref = pair(dynamic_img_size=dynamic)
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(Exception) as theirs:
        ref(x)
    with pytest.raises(type(theirs.value)):
        model(x)


def test_triton_backend_without_gpu_or_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = fastvit.VisionTransformer(**SMALL, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        model(torch.randn(1, 3, 32, 32))


def test_nan_input_propagates_without_crash():
    model, _ = pair()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    out = model(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_channels_last_and_strided_inputs_match_contiguous():
    model, _ = pair()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, atol=1e-6, rtol=1e-6)
    big = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(big[:, :, ::2, ::2]), model(big[:, :, ::2, ::2].contiguous()),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(big[:, :, 16:48, 16:48]), model(big[:, :, 16:48, 16:48].contiguous()),
                               atol=1e-6, rtol=1e-6)


def test_backend_switch_is_applied_everywhere():
    """Every module takes the new name (that "auto" then runs the kernels, and matches "torch", is checked under
    the interpreter: tests/interpret/test_model_triton.py; on a CPU without it both names run the same code)."""
    model, _ = pair()
    for name in ("torch", "auto", "triton"):
        model.set_backend(name)
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {name}


@pytest.mark.parametrize("pos_embed", ["learn", "rel"])
def test_whole_model_compiles_fullgraph(pos_embed):
    """Dynamo and AOTAutograd trace the whole model, forward and backward, in one graph each (the tracing
    torch.compile does, without inductor's codegen), and the fused ops decompose into the aten ops of their torch
    fallbacks (triton_op), so inductor would see no opaque call."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, pos_embed=pos_embed)
    x = torch.randn(2, 3, 32, 32)
    graphs = []
    _compiled_step_matches_eager(model, compile_capturing_graphs(model, graphs), x)
    assert len(graphs) == 2 and graph_calls(graphs) == ([], [])


def _compiled_step_matches_eager(model, compiled, x):
    """A training step's outputs and gradients of ``compiled`` (torch.compile of ``model``) against eager's."""
    out_c = compiled(x)
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out_c, out)
    for g_c, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(g_c, p.grad)
    model.zero_grad()


def test_compiled_training_at_a_new_image_size_matches_eager():
    """A dynamic-size model, compiled, trains at a second image size (a recompile: the table is resampled to the new
    grid, antialiased bicubic as timm does it) with eager's outputs and gradients. torch has no backward for that
    interpolation at a symbolic size, so the size is fixed per graph."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**SMALL, dynamic_img_size=True)
    graphs = []
    compiled = compile_capturing_graphs(model, graphs)
    for size in (32, 40):
        _compiled_step_matches_eager(model, compiled, torch.randn(2, 3, size, size))
    assert len(graphs) == 4


def test_dynamic_img_pad_matches_timm():
    """Images that are not whole patches are zero-padded on the bottom and right, as by timm's PatchEmbed."""
    model, ref = pair(dynamic_img_size=True, dynamic_img_pad=True)
    for size in ((30, 37), (32, 32), (41, 17)):
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
        assert model.patch_embed.dynamic_feat_size(size) == ref.patch_embed.dynamic_feat_size(size)
        kwargs = dict(indices=[0, 1], intermediates_only=True)
        for ours, theirs in zip(model.forward_intermediates(x, **kwargs), ref.forward_intermediates(x, **kwargs)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_dynamic_img_pad_alone_refuses_another_image_size_as_timm():
    """Without dynamic_img_size the image size is fixed: timm checks it before padding, so an image of another size
    is refused instead of being zero-padded up to the model's."""
    model, ref = pair(dynamic_img_pad=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="doesn't match model"):
        ref(x[..., :20, :30])
    with pytest.raises(ValueError, match=r"expected image size \(32, 32\), got \(20, 30\)"):
        model(x[..., :20, :30])


def test_images_of_another_dtype_than_the_model_are_refused_as_timm_refuses_them():
    """An fp32 model given bf16 images raises as timm's (nn.Conv2d's rule) instead of casting in silence; under
    autocast, and with the model cast to the images' dtype, it runs."""
    model, ref = timm_pair(**SMALL)
    x = torch.randn(2, 3, 32, 32).bfloat16()
    with pytest.raises(RuntimeError, match="should be the same"):
        ref(x)
    with pytest.raises(RuntimeError, match=r"Input type \(torch.bfloat16\) and weight type \(torch.float32\) should "
                                           r"be the same"):
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x).float(), ref(x).float(), atol=0.1, rtol=0.05)
