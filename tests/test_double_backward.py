"""Second derivatives (backward of a gradient taken with create_graph=True) through the model's default CPU path,
against timm's model with the same weights. Both run attention under SDPA's math kernel, as timm needs too: torch's
fused SDPA kernels have no double backward. The Triton path is tested under the interpreter
(tests/interpret/test_model_triton.py, test_flash_attention.py)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from _helpers import images, timm_pair

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _gradient_penalty(model, x):
    """Parameter gradients of ||d sum(f(x)^2) / dx||^2 (an R1 / WGAN-GP style penalty)."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        g, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _hessian_vector_product(model, x, y, vec):
    """H v of the cross-entropy loss with respect to the parameters, by double backward."""
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vec)), params)
    return dict(zip((n for n, _ in model.named_parameters()), hv))


def _assert_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4 * want[k].abs().max().item(), msg=k)


@pytest.fixture
def pair():
    model, ref = timm_pair(**CFG)
    for block in ref.blocks:
        block.attn.fused_attn = False
    return model, ref


def test_gradient_penalty_matches_timm(pair):
    model, ref = pair
    x = images(2)
    _assert_close(_gradient_penalty(model, x), _gradient_penalty(ref, x))


def test_hessian_vector_product_matches_timm(pair):
    model, ref = pair
    x, y = images(2), torch.tensor([3, 8])
    gen = torch.Generator().manual_seed(3)
    vec = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    _assert_close(_hessian_vector_product(model, x, y, vec), _hessian_vector_product(ref, x, y, vec))


def test_gradient_penalty_under_the_profiler(pair):
    """Under the profiler the ops go through the dispatcher, whose registered ops have no derivative: a backward
    that autograd records runs their bodies instead, so the result is the same as without it."""
    model, _ = pair
    x = images(2)
    want = _gradient_penalty(model, x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        got = _gradient_penalty(model, x)
    _assert_close(got, want)
