"""The torch fallbacks of add_layer_norm and bias_gelu (what runs on CPU): same results as the references, the
same saved tensors as the kernels, sound custom-op registrations, and torch.compile(fullgraph=True)."""
import pytest
import torch

from _helpers import assert_compiled_matches_eager

from fastvit.kernels.bias_gelu import bias_gelu, bias_gelu_ref
from fastvit.kernels.layer_norm import add_layer_norm, add_layer_norm_ref

EPS = 1e-6


def _ln_leaves(shape, dtype=torch.float32, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (2 * torch.randn(shape, generator=g) + 0.5).to(dtype).requires_grad_()
    r = (3 * torch.randn(shape, generator=g) - 1).to(dtype).requires_grad_() if residual else None
    w = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(d, generator=g)).to(dtype).requires_grad_()
    return x, r, w, b


def _ln_outputs_and_grads(fn, x, r, w, b, fp32_res):
    g = torch.Generator().manual_seed(1)
    y, res = fn(x, r, w, b, fp32_res)
    gy, gres = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g)
    loss = (y.float() * gy).sum() + (res.float() * gres).sum()
    return [y, res, *torch.autograd.grad(loss, [t for t in (x, r, w, b) if t is not None])]


@pytest.mark.parametrize("shape,residual,fp32_res", [
    ((2, 197, 768), True, False), ((1, 257, 1280), True, True), ((3, 5, 37), False, False),
    ((1, 1, 1024), False, True), ((0, 197, 768), True, False),
])
def test_layer_norm_fallback_matches_reference(shape, residual, fp32_res):
    x, r, w, b = _ln_leaves(shape, residual=residual)
    ours = _ln_outputs_and_grads(lambda *a: add_layer_norm(*a[:4], EPS, a[4], False), x, r, w, b, fp32_res)
    ref = _ln_outputs_and_grads(lambda *a: add_layer_norm_ref(*a[:4], EPS, a[4]), x, r, w, b, fp32_res)
    for i, (a, e) in enumerate(zip(ours, ref)):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        torch.testing.assert_close(a, e, atol=1e-5 if i < 2 else 1e-4, rtol=1e-5, msg=str(i))


@pytest.mark.parametrize("shape,with_bias", [((2, 197, 3072), True), ((257, 37), True), ((4, 1280), False)])
def test_bias_gelu_fallback_matches_reference(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(shape, generator=g)).requires_grad_()
    b = torch.randn(shape[-1], generator=g).requires_grad_() if with_bias else None
    gy = torch.randn(shape, generator=g)
    leaves = [t for t in (x, b) if t is not None]
    outs = []
    for y in (bias_gelu(x, b, False), bias_gelu_ref(x, b)):
        outs.append([y, *torch.autograd.grad((y * gy).sum(), leaves)])
    for i, (a, e) in enumerate(zip(*outs)):
        torch.testing.assert_close(a, e, atol=1e-5 if i == 0 else 1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
def test_bias_gelu_fallback_is_timms_activation(approximate, dtype):
    """The fallback of each GELU gives what timm's module computes after fc1 (nn.GELU, its tanh form, timm's
    QuickGELU): the same bits forward (the same ops in the same dtype), and gradients as close to fp64 math as
    timm's (the same bits for nn.GELU's, whose backward is the same kernel; the quick GELU's by SiLU's backward)."""
    from timm.layers import QuickGELU
    act = QuickGELU() if approximate == "sigmoid" else torch.nn.GELU(approximate=approximate)
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 33, 256, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(256, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(4, 33, 256, generator=g).to(dtype)
    outs = []
    for y in (bias_gelu(x, b, False, approximate), act(x + b)):
        outs.append([y, *torch.autograd.grad(y, [x, b], gy)])
    (y, dx, db), (ty, tdx, tdb) = outs
    assert y.dtype == ty.dtype == dx.dtype == dtype and torch.equal(y, ty)
    if approximate != "sigmoid":
        assert torch.equal(dx, tdx)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    exact = torch.autograd.grad(act(x64 + b64), [x64, b64], gy.double())
    for name, a, t, e in zip(["dx", "db"], (dx, db), (tdx, tdb), exact):
        err, timm_err = ((v.double() - e).abs().max().item() for v in (a, t))
        assert err <= 2 * timm_err + 1e-6 * e.abs().max().item(), (name, err, timm_err)


@pytest.mark.parametrize("call", ["bias_gelu", "bias_gelu_linear", "layer_norm_mlp"])
def test_ops_name_the_gelus_for_an_unknown_approximation(call):
    """Every path of the public ops (here the torch reference under vmap, and the CPU inference path whose GEMM
    epilogue computes the GELU) rejects an unknown approximation by our error, not by whatever op meets it."""
    from fastvit import ops
    x, w = torch.randn(2, 3, 8), torch.randn(8, 8)
    calls = {"bias_gelu": lambda x: ops.bias_gelu(x, w[0], approximate="erf"),
             "bias_gelu_linear": lambda x: ops.bias_gelu_linear(x, w[0], w, approximate="erf"),
             "layer_norm_mlp": lambda x: ops.layer_norm_mlp(x, None, w[0], w[1], w, w[2], w, w[3],
                                                             approximate="erf")[0]}
    for run in (calls[call], torch.vmap(calls[call])):
        with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh', 'sigmoid'\), got 'erf'"):
            run(x)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("residual,fp32_res", [(True, False), (False, False), (False, True), (True, True)])
def test_layer_norm_saves_residual_mean_rstd_only(residual, fp32_res):
    """Per token: the new residual (D values, the stream the next block needs anyway) and two fp32 statistics."""
    x, r, w, b = _ln_leaves((2, 7, 768), torch.bfloat16, residual)
    saved, (y, res) = _saved(lambda: add_layer_norm(x, r, w, b, EPS, fp32_res, False))
    assert [tuple(t.shape) for t in saved] == [(2, 7, 768), (768,), (2, 7, 1), (2, 7, 1)]
    assert saved[0].data_ptr() == res.data_ptr() and saved[1] is w
    assert res.dtype == (torch.float32 if fp32_res else torch.bfloat16)
    assert saved[2].dtype == saved[3].dtype == torch.float32


def test_bias_gelu_saves_input_and_bias_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3072, generator=g).bfloat16().requires_grad_()
    b = torch.randn(3072, generator=g).requires_grad_()
    saved, _ = _saved(lambda: bias_gelu(x, b, False))
    assert len(saved) == 2 and saved[0].data_ptr() == x.data_ptr() and saved[1] is b


@pytest.mark.parametrize("use_res", [True, False])
def test_leaf_gradients_do_not_share_storage(use_res):
    """x and residual receive the same gradient (one tensor, as from torch's add); as two leaves they still get
    separate .grad tensors, and changing one in place leaves the other as it was."""
    x, r, w, b = _ln_leaves((2, 3, 64))
    y, res = add_layer_norm(x, r, w, b, EPS, False, False)
    (y.square().sum() + (res.sum() if use_res else 0)).backward()
    torch.testing.assert_close(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    expected = r.grad.clone()
    x.grad.zero_()
    torch.testing.assert_close(r.grad, expected)


def test_custom_ops_pass_opcheck():
    """Schemas, fake (shape-only) implementations and aliasing rules of all four ops."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(6, 48, generator=g), torch.randn(6, 48, generator=g)
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    ops = torch.ops.fastvit
    for args in [(x, r, w, b, EPS, False, False), (x, None, w, b, EPS, True, False),
                 (x, None, w, b, EPS, False, False), (x.half(), r.half(), w, b, EPS, True, False)]:
        torch.library.opcheck(ops.add_layer_norm_fwd, args)
    y, res, mean, rstd = ops.add_layer_norm_fwd(x, r, w, b, EPS, False, False)
    torch.library.opcheck(ops.add_layer_norm_bwd, (x, r, res, w, mean, rstd, False, False))
    torch.library.opcheck(ops.add_layer_norm_bwd, (x.half(), None, res, w, mean, rstd, True, False))
    torch.library.opcheck(ops.bias_gelu_fwd, (x, b, False))
    torch.library.opcheck(ops.bias_gelu_bwd, (x, x, b, False))
    torch.library.opcheck(ops.bias_gelu_bwd, (x, x, None, False))


def test_compile_fullgraph_matches_eager():
    """A block-like chain of both ops compiles in one graph (inductor, CPU) and matches eager with gradients."""
    def f(h, residual, w, b, fb):
        y, residual = add_layer_norm(h, residual, w, b, EPS, False, False)
        h = bias_gelu(y, fb, False)
        y, residual = add_layer_norm(h, residual, w, b, EPS, True, False)
        return (y * y).sum() + (residual * 0.5).sum()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 5, 64, generator=g), None, torch.randn(64, generator=g),
            torch.randn(64, generator=g), torch.randn(64, generator=g)]
    assert_compiled_matches_eager(f, [a if a is None else a.requires_grad_() for a in args])


def test_bad_shapes_raise_value_error():
    x, r, w, b = _ln_leaves((2, 3, 64))
    with pytest.raises(ValueError, match=r"\(64,\)"):
        add_layer_norm(x, r, w[:32], b, EPS, False, False)
    with pytest.raises(ValueError, match="residual"):
        add_layer_norm(x, r[:1], w, b, EPS, False, False)
    with pytest.raises(ValueError, match=r"\(64,\)"):
        bias_gelu(x, b[:10], False)
