"""The Triton patch embedding (under TRITON_INTERPRET=1) against ``patch_embed_ref`` (conv2d + cat + add) with
autograd: the tokens and the gradients of the image, weight, bias, position table and class token, for patches
of 16, 14 (K = 588, not a multiple of 16), 32 (K = 3072) and 1 (the hybrid's 1x1 patches over a 64-channel
feature map), widths 64/96/768 and 40/200 (masked column blocks), several row blocks, channels_last and strided
images, images not divisible by the patch, an empty batch and every optional table left out."""
import pytest
import torch

from _helpers import patch_embed_grads, patch_embed_leaves

from fastvit.kernels.patch_embed import patch_embed, patch_embed_ref

# (batch, channels, H, W, patch, dim)
SHAPES = {
    "p16": (2, 3, 32, 32, 16, 64),
    "p14": (2, 3, 28, 28, 14, 40),
    "p32": (1, 3, 64, 64, 32, 96),
    "hybrid": (2, 64, 8, 8, 1, 96),
    # 324 patches: several row blocks with image boundaries inside them, 2 column blocks, a split dweight
    "tiles": (4, 64, 9, 9, 1, 200),
    "vit_b_width": (1, 3, 32, 48, 16, 768),
    "one_patch": (3, 3, 16, 20, 16, 64),  # N = 1: every row is an image's first patch
}


def _ours(x, w, b, patch, pos, cls, nec):
    return patch_embed(x, w, b, patch, pos, cls, nec, True)


def _assert_close_rel(ours, ref, names, fwd_tol=1e-5, grad_tol=1e-4):
    """Max error relative to the reference's largest magnitude: fwd_tol for the tokens, grad_tol for gradients."""
    assert len(ours) == len(ref) == len(names)
    for name, a, e in zip(names, ours, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, (name, a.shape, e.shape, a.dtype, e.dtype)
        scale = e.abs().max().item() or 1.0
        err = (a - e).abs().max().item()
        assert err <= (fwd_tol if name == "y" else grad_tol) * scale, (name, err, scale)


NAMES = ["y", "dx", "dweight", "dbias", "dpos", "dcls"]


@pytest.mark.parametrize("key,no_embed_class", [("p16", False), ("p14", True), ("p32", False), ("hybrid", False),
                                                 ("tiles", False), ("tiles", True), ("vit_b_width", False),
                                                 ("one_patch", False)])
def test_fp32_matches_reference(key, no_embed_class):
    """fp32 operands take the exact (IEEE) dot: errors are fp32 summation-order noise even at K = 3072."""
    leaves = patch_embed_leaves(SHAPES[key], no_embed_class=no_embed_class)
    _assert_close_rel(patch_embed_grads(_ours, leaves, SHAPES[key][4], no_embed_class),
                      patch_embed_grads(patch_embed_ref, leaves, SHAPES[key][4], no_embed_class), NAMES)


@pytest.mark.parametrize("cls,pos,bias,no_embed_class", [
    (False, True, True, False),   # no class token: patch rows start at 0, pos has N rows
    (True, False, True, False),   # no position table
    (False, False, False, False),  # bare projection
    (True, True, False, True),    # no bias, pos on the patches only
])
def test_optional_tables(cls, pos, bias, no_embed_class):
    leaves = patch_embed_leaves(SHAPES["p14"], cls=cls, pos=pos, bias=bias, no_embed_class=no_embed_class)
    names = ["y", "dx", "dweight"] + [n for n, t in zip(["dbias", "dpos", "dcls"], leaves[2:]) if t is not None]
    _assert_close_rel(patch_embed_grads(_ours, leaves, 14, no_embed_class),
                      patch_embed_grads(patch_embed_ref, leaves, 14, no_embed_class), names)


@pytest.mark.parametrize("key", ["p16", "p14", "p32", "hybrid"])
def test_fp16_error_at_most_twice_torch(key):
    """Error against fp32 math on the same fp16 values: at most 2x that of PyTorch's own fp16 conv2d path."""
    leaves = patch_embed_leaves(SHAPES[key], torch.float16)
    exact_leaves = [t.detach().float().requires_grad_() for t in leaves]
    patch = SHAPES[key][4]
    b, _, h, w, p, d = SHAPES[key]
    # representable in fp16, so every run sees the same upstream gradient
    gy = torch.randn(b, (h // p) * (w // p) + 1, d, generator=torch.Generator().manual_seed(1)).half().float()
    ours = patch_embed_grads(_ours, leaves, patch, False, gy)
    torch16 = patch_embed_grads(patch_embed_ref, leaves, patch, False, gy)
    exact = patch_embed_grads(patch_embed_ref, exact_leaves, patch, False, gy)
    for name, a, t, e in zip(NAMES, ours, torch16, exact):
        assert a.dtype == torch.float16, name
        err = (a.float() - e).abs().max().item()
        torch_err = (t.float() - e).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (name, err, torch_err)


def _view_grads(make_x, base_shape, patch, dim):
    """Tokens and gradients (image base, weight, bias, pos, cls) through an image view ``make_x(base)``."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(base_shape, generator=g).requires_grad_()
    x = make_x(base)
    n = (x.shape[2] // patch) * (x.shape[3] // patch)
    _, weight, bias, pos, cls = patch_embed_leaves((1, x.shape[1], patch, patch, patch, dim))
    pos = (0.1 * torch.randn(1, n + 1, dim, generator=g)).requires_grad_()
    out = []
    for fn in (_ours, patch_embed_ref):
        out.append(patch_embed_grads(fn, [make_x(base), weight, bias, pos, cls], patch, False,
                        wrt=[base, weight, bias, pos, cls]))
    return out


@pytest.mark.parametrize("name,make_x,base_shape", [
    ("channels_last", lambda t: t.to(memory_format=torch.channels_last), (2, 3, 32, 32)),
    ("crop", lambda t: t[:, :, 3:31, 2:30], (2, 3, 34, 33)),
    ("every_other_image_and_channel_flip", lambda t: t[::2].flip(1), (4, 3, 28, 28)),
    ("transposed_hw", lambda t: t.transpose(2, 3), (2, 3, 28, 28)),
])
def test_strided_images(name, make_x, base_shape):
    ours, ref = _view_grads(make_x, base_shape, 14, 40)
    _assert_close_rel(ours, ref, NAMES)


def test_channels_last_feature_map_and_weight():
    """The hybrid's channels_last backbone output (unit channel stride) and a channels_last 1x1 weight."""
    ours, ref = _view_grads(lambda t: t.to(memory_format=torch.channels_last), (2, 64, 6, 5), 1, 96)
    _assert_close_rel(ours, ref, NAMES)
    leaves = patch_embed_leaves(SHAPES["p16"])
    leaves[1] = leaves[1].detach().to(memory_format=torch.channels_last).requires_grad_()
    _assert_close_rel(patch_embed_grads(_ours, leaves, 16, False),
                      patch_embed_grads(patch_embed_ref, leaves, 16, False), NAMES)


def test_image_not_divisible_by_patch():
    """Pixels past the last whole patch are ignored (as by conv2d) and get a zero gradient."""
    leaves = patch_embed_leaves((2, 3, 30, 47, 14, 40))
    ours = patch_embed_grads(_ours, leaves, 14, False)
    _assert_close_rel(ours, patch_embed_grads(patch_embed_ref, leaves, 14, False), NAMES)
    assert ours[1][:, :, 28:].abs().max() == 0 and ours[1][:, :, :, 42:].abs().max() == 0


def test_frozen_weight_image_grad_only():
    """Only the image requires grad (a frozen stem): the scatter kernel alone runs."""
    x, w, b, pos, cls = patch_embed_leaves(SHAPES["hybrid"])
    leaves = [x, w.detach(), b.detach(), pos.detach(), cls.detach()]
    _assert_close_rel(patch_embed_grads(_ours, leaves, 1, False),
                      patch_embed_grads(patch_embed_ref, leaves, 1, False), ["y", "dx"])


def test_empty_batch():
    x, w, b, pos, cls = patch_embed_leaves((0, 3, 32, 32, 16, 64))
    y = _ours(x, w, b, 16, pos, cls, False)
    assert y.shape == (0, 5, 64)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w, b, pos, cls):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_autocast_rounds_operands_only():
    """Under fp16 autocast the image and weight are rounded to fp16 for the dot, everything else stays fp32."""
    leaves = patch_embed_leaves(SHAPES["p16"])
    with torch.autocast("cpu", dtype=torch.float16):
        ours = patch_embed_grads(_ours, leaves, 16, False)
    rounded = [t.detach().half().float().requires_grad_() if i < 2 else t for i, t in enumerate(leaves)]
    ref = patch_embed_grads(patch_embed_ref, rounded, 16, False)
    assert [t.dtype for t in ours] == [torch.float32] * 6
    # gradients of x and weight: dY is rounded to fp16 for those products, as autocast's conv2d backward does
    _assert_close_rel(ours[:1] + ours[3:], ref[:1] + ref[3:], ["y", "dbias", "dpos", "dcls"])
    _assert_close_rel(ours[1:3], ref[1:3], ["dx", "dweight"], grad_tol=2e-3)


def test_kernel_saves_what_fallback_saves():
    """Backward keeps the image and the weight themselves (no patch matrix), on both paths."""
    for use_triton in (True, False):
        x, w, b, pos, cls = patch_embed_leaves(SHAPES["p14"], torch.float16)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            patch_embed(x, w, b, 14, pos, cls, False, use_triton)
        assert len(saved) == 2 and saved[0] is x and saved[1] is w
