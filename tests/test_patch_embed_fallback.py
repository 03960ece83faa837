"""The torch fallback of the fused patch embedding (what runs on CPU): same tokens and gradients as
``patch_embed_ref`` (conv2d + cat + add), the same saved tensors as the kernel path (the image and the weight,
never a patch matrix), sound custom-op registrations, torch.compile(fullgraph=True), autocast and argument checks."""
import pytest
import torch

from _helpers import assert_compiled_matches_eager, patch_embed_grads, patch_embed_leaves

from fastvit.kernels.patch_embed import patch_embed, patch_embed_ref


def _fallback(x, w, b, patch, pos, cls, nec):
    return patch_embed(x, w, b, patch, pos, cls, nec, False)


@pytest.mark.parametrize("shape,cls,pos,bias,nec", [
    ((1, 3, 224, 224, 16, 768), True, True, True, False),   # ViT-B/16
    ((2, 3, 30, 47, 14, 40), True, True, True, True),       # not divisible by the patch, no_embed_class
    ((2, 64, 7, 7, 1, 96), False, True, False, False),      # hybrid 1x1 patches, no class token
    ((1, 3, 64, 64, 32, 64), True, False, True, False),     # K = 3072, no position table
    ((0, 3, 32, 32, 16, 64), True, True, True, False),      # empty batch
])
def test_fallback_matches_reference(shape, cls, pos, bias, nec):
    leaves = patch_embed_leaves(shape, cls=cls, pos=pos, bias=bias, no_embed_class=nec)
    ours = patch_embed_grads(_fallback, leaves, shape[4], nec)
    ref = patch_embed_grads(patch_embed_ref, leaves, shape[4], nec)
    for i, (a, e) in enumerate(zip(ours, ref)):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        torch.testing.assert_close(a, e, atol=1e-5 if i == 0 else 1e-4, rtol=1e-5, msg=str(i))


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


def _new_saved_bytes(saved, inputs):
    """Bytes of the saved storages that are not the inputs' own (what autograd keeps alive beyond them)."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in storages.items() if ptr not in own)


def test_saves_image_and_weight_only():
    """No patch matrix and, under bf16 autocast, no cast copies: conv2d there saves bf16 copies of both."""
    x, w, b, pos, cls = patch_embed_leaves((2, 3, 224, 224, 16, 768))
    saved = _saved(lambda: _fallback(x, w, b, 16, pos, cls, False))
    assert len(saved) == 2 and saved[0] is x and saved[1] is w
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _saved(lambda: _fallback(x, w, b, 16, pos, cls, False))
        eager = _saved(lambda: patch_embed_ref(x, w, b, 16, pos, cls, False))
    assert len(ours) == 2 and ours[0] is x and ours[1] is w
    assert _new_saved_bytes(ours, (x, w)) == 0
    # eager autocast conv2d: a bf16 image and a bf16 weight
    assert _new_saved_bytes(eager, (x, w)) == 2 * (x.numel() + w.numel())


def test_autocast_computes_in_autocast_dtype_and_promotes_like_reference():
    """bf16 autocast: the projection runs as PyTorch's autocast runs it (bf16 operands and output, fp32
    accumulation); the tokens are fp32 (bf16 projection + fp32 position table, as in the reference), bias/pos/cls
    added in fp32."""
    leaves = patch_embed_leaves((2, 3, 32, 32, 16, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = patch_embed_grads(_fallback, leaves, 16, False)
        eager = patch_embed_ref(*leaves[:3], 16, leaves[3], leaves[4], False)
    assert ours[0].dtype == eager.dtype == torch.float32
    rounded = [t.detach().bfloat16().float().requires_grad_() if i < 2 else t for i, t in enumerate(leaves)]
    ref = patch_embed_grads(patch_embed_ref, rounded, 16, False)
    # within one bf16 rounding of the projection of fp32 accumulation
    torch.testing.assert_close(ours[0], ref[0], atol=2 ** -8 * ref[0].abs().max().item(), rtol=0)
    assert not torch.equal(ours[0], ref[0])
    for a, e in zip(ours[3:], ref[3:]):  # bias, pos, cls gradients: plain sums of dY
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for a, e in zip(ours[1:3], ref[1:3]):  # dY rounded to bf16 for the two products
        torch.testing.assert_close(a, e, atol=2e-2 * e.abs().max().item(), rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fallback(*leaves[:3], 16, None, leaves[4], False).dtype == torch.bfloat16


def test_custom_ops_pass_opcheck():
    """Schemas, fake (shape-only) implementations and aliasing of both ops, with and without the optional tables."""
    x, w, b, pos, cls = [t.detach() for t in patch_embed_leaves((2, 3, 30, 28, 14, 40))]
    ops = torch.ops.fastvit
    f32 = torch.float32
    for args in [(x, w, b, pos, cls, 14, 14, False, f32, f32, False),
                 (x, w, None, None, None, 14, 14, False, f32, f32, False),
                 (x, w, b, pos[:, 1:], cls, 14, 14, True, torch.bfloat16, f32, False),
                 (x.to(memory_format=torch.channels_last), w, None, pos[:, 1:], None, 14, 14, False, f32, f32, False)]:
        torch.library.opcheck(ops.patch_embed_fwd, args)
    dy = torch.randn(2, 5, 40)
    torch.library.opcheck(ops.patch_embed_bwd, (dy, x, w, 14, 14, True, f32, True, True, True, False))
    torch.library.opcheck(ops.patch_embed_bwd, (dy[:, 1:], x, w, 14, 14, False, f32, False, True, True, False))
    torch.library.opcheck(ops.patch_embed_bwd, (dy, x.to(memory_format=torch.channels_last), w, 14, 14, True,
                                                torch.float16, True, False, False, False))


@pytest.mark.parametrize("with_tables", [True, False])
def test_compile_fullgraph_matches_eager(with_tables):
    """The op inside a compiled function (inductor, CPU): one graph, same tokens and gradients as eager."""
    def f(x, w, b, pos, cls):
        tokens = patch_embed(x, w, b, 16, pos, cls, False, False)
        return (tokens.tanh() * tokens).sum()

    leaves = patch_embed_leaves((2, 3, 32, 48, 16, 64), cls=with_tables, pos=with_tables, bias=with_tables)
    assert_compiled_matches_eager(f, leaves)


def test_bad_arguments_raise():
    x, w, b, pos, cls = patch_embed_leaves((2, 3, 32, 32, 16, 64))
    with pytest.raises(ValueError, match=r"\(D, 3, 14, 14\)"):
        _fallback(x, w, b, 14, None, None, False)
    with pytest.raises(ValueError, match=r"\(64,\)"):
        _fallback(x, w, b[:10], 16, pos, cls, False)
    with pytest.raises(ValueError, match=r"\(1, 4, 64\)"):
        _fallback(x, w, b, 16, pos, cls, True)  # no_embed_class: the table covers the 4 patches only
    with pytest.raises(ValueError, match=r"\(1, 1, 64\)"):
        _fallback(x, w, b, 16, pos, cls[0], False)
    with pytest.raises(ValueError, match="smaller than the patch"):
        _fallback(x[:, :, :8], w, b, 16, None, None, False)
    with pytest.raises(ValueError, match="patch_size"):
        _fallback(x, w, b, (16, 16, 1), pos, cls, False)
    with pytest.raises(TypeError, match="floating-point"):
        _fallback(x.detach().long(), w, b, 16, pos, cls, False)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        patch_embed(x.detach().double(), w.detach().double(), None, 16, None, None, False, True)
