"""ops.block_inference: a whole pre-LN block in plain CPU inference (fp32, or a model cast to bf16 / fp16), the ops'
kernels called without their layers. It gives the bits the ops give (and timm's values), and steps aside for any
edit, mode or dtype in which the block's modules or the ops' other branches must run."""
import pytest
import torch
import torch.nn as nn

import fastvit
from _helpers import images, timm_pair
from fastvit import ops

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture
def lean_calls(monkeypatch):
    """The blocks ops.block_inference ran, by call."""
    calls = []
    real = ops.block_inference

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(ops, "block_inference", counted)
    return calls


def _without_lean(model, x):
    """model(x) with ops.block_inference turned down: every block through its ops, as before it existed."""
    real = ops.block_inference_applies
    ops.block_inference_applies = lambda *args: False
    try:
        return model(x)
    finally:
        ops.block_inference_applies = real


@pytest.mark.parametrize("cfg", [{}, {"global_pool": "avg"}, {"class_token": False, "global_pool": "avg"},
                                 {"mlp_ratio": 3.0, "act_layer": "gelu_tanh"}, {"num_heads": 2, "depth": 3}])
def test_the_ops_bits_and_timms_values(cfg, lean_calls):
    """Every block takes it, in eval and in train mode (no dropout on), and the logits and features are the ops'
    to the bit and timm's within fp32 rounding."""
    model, ref = timm_pair(**{**CFG, **cfg})
    x = images()
    with torch.no_grad():
        out, features = model(x), model.forward_features(x)
        assert len(lean_calls) == 2 * len(model.blocks)
        assert torch.equal(out, _without_lean(model, x))
        assert torch.equal(model.train()(x), out) and torch.equal(_without_lean(model, x), out)
        assert torch.equal(features, _without_lean(model.forward_features, x))
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


def _hook(net, path):
    net.get_submodule(path).register_forward_hook(lambda m, i, o: o * 1.5 + 0.1)


class _Scaled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, **kwargs):
        return self.inner(x, **kwargs) * 0.9


def _wrap(net, path):
    parent, _, name = path.rpartition(".")
    setattr(net.get_submodule(parent), name, _Scaled(net.get_submodule(path)))


@pytest.mark.parametrize("edit, path", [
    (_hook, "blocks.0.norm1"), (_hook, "blocks.0.attn.qkv"), (_hook, "blocks.0.attn.proj"),
    (_hook, "blocks.0.ls1"), (_hook, "blocks.0.mlp.act"),
    (_hook, "blocks.0.mlp.fc2"), (_hook, "blocks.0.drop_path2"), (_hook, "blocks.0.attn.q_norm"),
    (_wrap, "blocks.0.mlp.fc1"), (_wrap, "blocks.0.attn"), (_wrap, "blocks.0.mlp.norm")])
def test_an_edited_block_runs_its_modules(edit, path, lean_calls):
    """A hook or a wrapper anywhere in a block keeps that block on its modules (the edit acts as on timm); the
    other block still takes the lean path."""
    model, ref = timm_pair(**CFG)
    for net in (model, ref):
        edit(net, path)
    x = images()
    with torch.no_grad():
        out = model(x)
        assert len(lean_calls) == 1  # blocks.1
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)


def test_a_global_hook_or_active_dropout_keeps_every_block_on_its_modules(lean_calls):
    model, ref = timm_pair(**CFG, proj_drop_rate=0.5)
    x = images()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()
    assert lean_calls == []
    model.blocks[1].mlp.drop2.train()  # MC dropout in one block
    with torch.no_grad():
        model(x)
    assert len(lean_calls) == 1


@pytest.mark.parametrize("cfg", [{"init_values": 0.1}, {"qk_norm": True}, {"pos_embed": "rel"}])
def test_layers_it_does_not_cover_run_as_modules(cfg, lean_calls):
    """LayerScale, q/k norms and a relative-position bias are not in the lean block: those blocks run their ops."""
    model = fastvit.VisionTransformer(**CFG, **cfg).eval()
    with torch.no_grad():
        model(images())
    assert lean_calls == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp32_norms", [False, True])
def test_a_model_cast_to_16_bits_takes_it_with_the_ops_bits(dtype, fp32_norms, lean_calls):
    """model.to(bf16 / fp16), also with its LayerNorms kept in fp32 (a mixed-precision recipe): every block takes
    the lean path, with the ops' logits and features to the bit and timm's (cast alike) within 16-bit rounding."""
    model, ref = timm_pair(**CFG)
    for net in (model, ref):
        net.to(dtype)
        if fp32_norms:
            for module in net.modules():
                if isinstance(module, nn.LayerNorm):
                    module.float()
    x = images().to(dtype)
    with torch.no_grad():
        out, features = model(x), model.forward_features(x)
        assert out.dtype == features.dtype == dtype and len(lean_calls) == 2 * len(model.blocks)
        assert torch.equal(out, _without_lean(model, x))
        assert torch.equal(features, _without_lean(model.forward_features, x))
        torch.testing.assert_close(out.float(), ref(x).float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_layer_norm_takes_16_bit_parameters_as_they_are(dtype):
    """Where nothing keeps the statistics, a 16-bit LayerNorm's parameters are not cast to fp32 first: the output
    is the one the fp32 parameters give (the ops' training forward, which keeps fp32 statistics) and
    nn.LayerNorm's own (timm's) for the same sum."""
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(2, 17, 64, generator=gen).to(dtype) for _ in range(2))
    norm = nn.LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(64, generator=gen))
        norm.bias.add_(0.1 * torch.randn(64, generator=gen))
    norm.to(dtype)
    w, b = norm.weight.detach(), norm.bias.detach()
    with torch.no_grad():
        y, res = ops.add_layer_norm(x, r, w, b, 1e-6, backend="torch")
    y_kept, res_kept = ops.add_layer_norm(x, r, w.requires_grad_(), b, 1e-6, backend="torch")
    assert torch.equal(res, res_kept) and torch.equal(res, x + r)
    assert torch.equal(y, y_kept) and torch.equal(y, norm(x + r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual_dtype", [None, "autocast"])
def test_under_autocast_with_the_ops_bits(dtype, residual_dtype, lean_calls):
    """Under CPU autocast (the stream in fp32, or in the autocast dtype with ``residual_dtype="autocast"``) every
    block takes the lean path, each LayerNorm's output in the dtype of the branch before it as the ops give it:
    the ops' logits and features to the bit, timm's (under the same autocast) within its rounding."""
    model, ref = timm_pair(**CFG)
    model.residual_dtype = residual_dtype
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out, features = model(x), model.forward_features(x)
        assert len(lean_calls) == 2 * len(model.blocks)
        assert torch.equal(out, _without_lean(model, x))
        assert torch.equal(features, _without_lean(model.forward_features, x))
        torch.testing.assert_close(out.float(), ref(x).float(), atol=0.05, rtol=0.05)


def test_under_autocast_norms_in_the_autocast_dtype_keep_the_ops(lean_calls):
    """An fp32 model whose norms were cast to bf16, under bf16 autocast: the residual sum is fp32 there (the
    branches come out of the GEMMs in bf16), so the ops cast those norms' parameters; the lean block does not
    take them (F.layer_norm refuses bf16 parameters for an fp32 input)."""
    model, _ = timm_pair(**CFG)
    model.blocks[1].norm1.bfloat16()
    model.blocks[1].norm2.bfloat16()
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert len(lean_calls) == 1  # blocks.0
        assert torch.equal(out, _without_lean(model, x))


@pytest.mark.parametrize("autocast", [False, True])
def test_a_norm_with_weight_and_bias_in_two_dtypes_keeps_the_ops(autocast, lean_calls):
    """A bf16 model whose first norm has an fp32 weight (and a bf16 bias): the ops cast both to fp32, F.layer_norm
    would refuse the pair, so that block keeps the ops (the other takes the lean path)."""
    model, _ = timm_pair(**CFG)
    model.bfloat16()
    norm = model.blocks[0].norm1
    norm.weight = nn.Parameter(norm.weight.detach().float())
    x = images().bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
        assert len(lean_calls) == 1  # blocks.1
        assert torch.equal(out, _without_lean(model, x))


def test_a_residual_of_another_shape_is_refused_as_by_the_ops(lean_calls):
    """Block.forward_pair called with a residual that would broadcast against h: the ops' error, not a sum."""
    model, _ = timm_pair(**CFG)
    h = torch.randn(3, 17, 64)
    with torch.no_grad(), pytest.raises(ValueError, match="residual must have x's shape"):
        model.blocks[0].forward_pair(h, h[:1])
    assert lean_calls == []


@pytest.mark.parametrize("mode", ["grad", "double", "fp16 autocast of a bf16 model"])
def test_other_modes_and_dtypes_take_the_ops(mode, lean_calls):
    """Training calls, fp64 and a stream in neither fp32 nor the autocast dtype keep the ops' branches (their dtype
    rules differ)."""
    model, _ = timm_pair(**CFG)
    x = images()
    if mode == "grad":
        model(x).sum().backward()
    elif mode.startswith("fp16 autocast"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            model.bfloat16()(x.bfloat16())
    else:
        with torch.no_grad():
            model.double()(x.double())
    assert lean_calls == []


class _TaggedParameter(nn.Parameter):
    """A parameter subclass, as quantisation libraries put in a Linear's weight."""


def test_a_subclassed_weight_keeps_its_block_on_its_ops(lean_calls):
    model, ref = timm_pair(**CFG)
    fc1 = model.blocks[0].mlp.fc1
    fc1.weight = _TaggedParameter(fc1.weight.detach().clone())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    assert len(lean_calls) == 1


def test_not_where_the_triton_kernels_run_on_cpu(monkeypatch):
    """Under TRITON_INTERPRET=1 backend 'auto' runs our kernels on CPU tensors: the block keeps them."""
    h = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert ops.block_inference_applies(h, h) and ops.block_inference_applies(h, h, "torch")
        monkeypatch.setattr(ops, "triton_interpreting", lambda: True)
        assert not ops.block_inference_applies(h, h) and ops.block_inference_applies(h, h, "torch")


def _old_path(fn, *args):
    """fn(*args) with ops.block_inference turned down."""
    real = ops.block_inference_applies
    ops.block_inference_applies = lambda *a: False
    try:
        return fn(*args)
    finally:
        ops.block_inference_applies = real


def _attention_dropout_in_train_mode(model):
    """model.train() with every nn.Dropout module back in eval: the attention's own mode sets its dropout."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()


def _attend_patched(model):
    attn = model.blocks[0].attn
    real = attn.attend
    attn.attend = lambda *args, **kwargs: real(*args, **kwargs) * 0.5


def _norm_in_fp64(model):
    model.blocks[0].norm1.double()


def _attention_backend_torch(model):
    model.blocks[0].attn.backend = "torch"


@pytest.mark.parametrize("edit, lean", [
    (_attention_dropout_in_train_mode, 0), (_attend_patched, 1), (_norm_in_fp64, 1),
    (lambda model: setattr(model.blocks[0].attn, "attn_drop", nn.Identity()), 1),
    (lambda model: setattr(model.blocks[0].mlp, "drop1", nn.Identity()), 1),
    (_attention_backend_torch, 2)])
def test_what_the_ops_path_honours_keeps_it(edit, lean, lean_calls):
    """Edits the ops' block path acts on without a hook: the attention's own training mode for its dropout, a
    patched ``attend``, a norm's dtype (cast by the ops), an Identity where the ops want a Dropout (they then take
    another path, other bits); an attention backend of 'torch' under a block's 'auto' is the same path."""
    model, _ = timm_pair(**CFG, attn_drop_rate=0.5)
    edit(model)
    x = images()
    with torch.no_grad():
        torch.manual_seed(0)
        out = model(x)
        assert len(lean_calls) == lean
        torch.manual_seed(0)
        assert torch.equal(out, _old_path(model, x))


def test_blocks_trace_with_torch_fx():
    model, _ = timm_pair(**CFG)
    traced = torch.fx.symbolic_trace(model.blocks)
    h = torch.randn(2, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(h), model.blocks(h))


def test_an_attention_backend_the_block_does_not_run_keeps_the_ops(lean_calls):
    model, _ = timm_pair(**CFG)
    model.blocks[0].attn.backend = "flash"
    with torch.no_grad(), pytest.raises(RuntimeError, match="flash"):
        model(images())
    assert lean_calls == []


def test_a_class_token_only_call_keeps_its_row(lean_calls):
    model, _ = timm_pair(**CFG)
    h = torch.randn(2, 17, 64)
    with torch.no_grad():
        out, residual = model.blocks[1].forward_pair(h, None, class_token_only=True)
    assert out.shape == residual.shape == (2, 1, 64) and lean_calls == []
