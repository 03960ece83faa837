"""Derivatives checked against references: finite differences (gradcheck / gradgradcheck of an fp64 model) and
timm's model with the same weights, for second derivatives (backward of a gradient taken with create_graph=True)
through the model's default CPU path. Both run attention under SDPA's math kernel, as timm needs too: torch's
fused SDPA kernels have no double backward. The Triton path is tested under the interpreter
(tests/interpret/test_model_triton.py, test_flash_attention.py)."""
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastvit
from fastvit import ops
from fastvit.kernels.bias_gelu import gelu_ref
from _helpers import gradient_penalty, images, timm_pair

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


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
    _assert_close(gradient_penalty(model, x)[1], gradient_penalty(ref, x)[1])


def test_parameters_without_second_derivative_get_none_as_in_timm(pair):
    """For a loss linear in the logits the input gradient does not depend on the final norm's bias (nor the head's):
    a penalty on it leaves their .grad None in timm, so optimizers skip them; the same here, not a zero gradient
    (which AdamW would still decay)."""
    grads = {}
    for name, m in zip(("fastvit", "timm"), pair):
        x = images(2).requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):
            g, = torch.autograd.grad(m(x).sum(), x, create_graph=True)
            g.square().sum().backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters()}
    assert {n for n, g in grads["timm"].items() if g is None} == {"norm.bias", "head.bias"}
    assert {n for n, g in grads["fastvit"].items() if g is None} == {"norm.bias", "head.bias"}
    _assert_close({n: g for n, g in grads["fastvit"].items() if g is not None},
                  {n: g for n, g in grads["timm"].items() if g is not None})


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
    want = gradient_penalty(model, x)[1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        got = gradient_penalty(model, x)[1]
    _assert_close(got, want)


def test_float64_model_matches_timm():
    """An fp64 model stays fp64 throughout (the fallbacks' statistics and sums included), as timm's does."""
    model, ref = timm_pair(**CFG)
    model, ref = model.double().train(), ref.double().train()
    x = images(2).double()
    out, want = model(x), ref(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("pos_embed", ["learn", "rel"])
def test_gradcheck_and_gradgradcheck_in_float64(pos_embed):
    """First and second derivatives of every op's Function against finite differences: an fp64 ViT small enough
    for torch.autograd.gradcheck, with respect to the image and every parameter."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=3,
                                      pos_embed=pos_embed).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return functional_call(model, dict(zip(names, params)), (x,))

    # fast mode: J and the second derivative projected on random vectors against finite differences of the same
    # projections (a slow-mode check takes one column at a time)
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused SDPA kernels have no double backward
        assert torch.autograd.gradgradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
def test_bias_gelu_bias_gradient_in_float64(approximate):
    """An fp64 call's bias gradient is summed in fp64, as autograd's of GELU(x + b) is (an fp32 sum was ~1e-4 off
    over 800 rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 200, 96, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(96, dtype=torch.float64, generator=g).requires_grad_()
    got = torch.autograd.grad(ops.bias_gelu(x, b, backend="torch", approximate=approximate).sum(), (x, b))
    want = torch.autograd.grad(gelu_ref(x + b, approximate).sum(), (x, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
def test_bias_gelu_second_derivatives_in_float64(approximate):
    """Double backward through each GELU (CLIP's quick GELU included) against finite differences."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, b: ops.bias_gelu(x, b, approximate=approximate), (x, b))
