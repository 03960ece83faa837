"""The Triton bias + erf GELU (under TRITON_INTERPRET=1) against the torch reference: forward and the gradients of
x and bias, at ViT widths (768, 1024, 1280 and the MLP's 3072/5120, which span several column blocks) and an odd
one, for 0 to 257 rows, strided inputs and no bias; and its tanh and sigmoid (quick GELU) approximations."""
import pytest
import torch

from _helpers import INTERPRETER_ROUNDING

from fastvit import ops
from fastvit.kernels.bias_gelu import bias_gelu, bias_gelu_ref


def _inputs(shape, dtype, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    b = (torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_() if with_bias else None
    return x, b


def _run(fn, x, b, gy):
    y = fn(x, b)
    leaves = [t for t in (x, b) if t is not None]
    return [y, *torch.autograd.grad((y.float() * gy).sum(), leaves)]


def _ours(x, b):
    return bias_gelu(x, b, True)


def _upstream(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


CASES = [
    ((1, 197, 768), True),
    ((2, 25, 1024), True),
    ((1, 257, 1280), True),
    ((1, 1, 3072), True),
    ((1, 257, 37), True),
    ((50, 5120), False),
    ((197, 37), False),
]


@pytest.mark.parametrize("shape,with_bias", CASES)
def test_fp32_matches_reference(shape, with_bias):
    x, b = _inputs(shape, torch.float32, with_bias)
    gy = _upstream(shape)
    ours = _run(_ours, x, b, gy)
    ref = _run(bias_gelu_ref, x, b, gy)
    for name, a, e in zip(["y", "dx", "dbias"], ours, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, atol=1e-5 if name == "y" else 1e-4, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(1, 197, 3072), (2, 50, 1280), (257, 37)])
def test_half_error_at_most_twice_torch(shape, dtype):
    """Error against fp32 math on the same fp16/bf16 inputs: at most 2x PyTorch's own error in that dtype (the
    kernels have no tl.dot, so the interpreter computes bf16 as a GPU does, apart from the rounding of stores: see
    INTERPRETER_ROUNDING)."""
    x, b = _inputs(shape, dtype)
    gy = _upstream(shape).to(dtype).float()  # representable in dtype, so every run sees the same upstream gradient
    ours = _run(_ours, x, b, gy)
    torch_half = _run(bias_gelu_ref, x, b, gy)
    exact = _run(bias_gelu_ref, x.detach().float().requires_grad_(), b.detach().float().requires_grad_(), gy)
    assert ours[0].dtype == dtype
    for name, a, t, e in zip(["y", "dx", "dbias"], ours, torch_half, exact):
        err = (a.float() - e).abs().max().item()
        torch_err = (t.float() - e).abs().max().item()
        assert err <= INTERPRETER_ROUNDING[dtype] * 2 * torch_err + 1e-6, (name, err, torch_err)


@pytest.mark.parametrize("approximate", ["tanh", "sigmoid"])
@pytest.mark.parametrize("shape,with_bias", [((1, 197, 768), True), ((1, 257, 37), True), ((50, 5120), False)])
def test_approximations_fp32_match_reference(shape, with_bias, approximate):
    """SigLIP's tanh GELU and CLIP's quick GELU (the kernels write both as u sigmoid(s(u))) against torch's
    F.gelu(approximate="tanh") and x * sigmoid(1.702 x), inputs out to |u| ~ 10 where the sigmoid saturates."""
    x, b = _inputs(shape, torch.float32, with_bias)
    gy = _upstream(shape)
    ours = _run(lambda x, b: bias_gelu(x, b, True, approximate), x, b, gy)
    ref = _run(lambda x, b: bias_gelu_ref(x, b, approximate), x, b, gy)
    for name, a, e in zip(["y", "dx", "dbias"], ours, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, atol=1e-5 if name == "y" else 1e-4, rtol=1e-5, msg=name)


@pytest.mark.parametrize("approximate", ["tanh", "sigmoid"])
def test_approximations_fp32_gradient_no_less_exact_than_torch(approximate):
    """The fp32 gradient of both approximations against fp64, out to |u| = 8: at most torch's own fp32 error. Written
    s + u s (1 - s) s'(u) with 1 - s subtracted from 1, the tanh GELU's had 1.9x torch's here (3.3x on an H200)."""
    u = torch.linspace(-8, 8, 20001).reshape(1, -1)
    gy = torch.ones_like(u)
    ours = _run(lambda x, b: bias_gelu(x, b, True, approximate), u.clone().requires_grad_(), None, gy)[1]
    torch32 = _run(lambda x, b: bias_gelu_ref(x, b, approximate), u.clone().requires_grad_(), None, gy)[1]
    exact = _run(lambda x, b: bias_gelu_ref(x, b, approximate), u.double().requires_grad_(), None, gy.double())[1]
    err, torch_err = ((g.double() - exact).abs().max().item() for g in (ours, torch32))
    assert err <= torch_err, (err, torch_err)


@pytest.mark.parametrize("approximate", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_approximations_half_error_at_most_twice_torch(dtype, approximate):
    shape = (2, 50, 1280)
    x, b = _inputs(shape, dtype)
    gy = _upstream(shape).to(dtype).float()
    ours = _run(lambda x, b: bias_gelu(x, b, True, approximate), x, b, gy)
    torch_half = _run(lambda x, b: bias_gelu_ref(x, b, approximate), x, b, gy)
    exact = _run(lambda x, b: bias_gelu_ref(x, b, approximate), x.detach().float().requires_grad_(),
                 b.detach().float().requires_grad_(), gy)
    for name, a, t, e in zip(["y", "dx", "dbias"], ours, torch_half, exact):
        err = (a.float() - e).abs().max().item()
        torch_err = (t.float() - e).abs().max().item()
        assert err <= INTERPRETER_ROUNDING[dtype] * 2 * torch_err + 1e-6, (name, err, torch_err)


def test_fp32_bias_on_fp16_activations():
    """Under AMP the fc1 output is fp16 and its bias fp32: y stays fp16 and the bias grad fp32."""
    x, _ = _inputs((1, 197, 768), torch.float16)
    b = torch.randn(768).requires_grad_()
    gy = _upstream(x.shape)
    y, dx, db = _run(_ours, x, b, gy)
    # y is fp16, so the gradient reaching it is gy rounded to fp16: give the reference the same one
    ey, edx, edb = _run(bias_gelu_ref, x.detach().float().requires_grad_(), b, gy.half().float())
    assert y.dtype == dx.dtype == torch.float16 and db.dtype == torch.float32
    torch.testing.assert_close(y.float(), ey, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(dx.float(), edx, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(db, edb, atol=1e-4, rtol=1e-5)


def test_strided_inputs():
    """A column slice (row stride > C) and a last dim that is not unit-stride."""
    g = torch.Generator().manual_seed(2)
    c = 1280
    sliced = torch.randn(2, 9, c + 32, generator=g)[:, :, 16:16 + c]
    transposed = torch.randn(2, c, 9, generator=g).transpose(1, 2)
    b = torch.randn(c, generator=g)
    gy = _upstream((2, 9, c))
    for x in (sliced, transposed):
        x = x.detach().requires_grad_()
        bb = b.clone().requires_grad_()
        for a, e in zip(_run(_ours, x, bb, gy), _run(bias_gelu_ref, x, bb, gy)):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


def test_one_token_view_of_a_transposed_map():
    """A (B, 1, C) view of a (B, C, 1) map is contiguous to torch with a token stride of 1, not C: such an input,
    and an upstream gradient laid out the same way, give the reference's results."""
    c = 48
    g = torch.Generator().manual_seed(4)
    x, gy = torch.randn(3, c, 1, generator=g), torch.randn(3, c, 1, generator=g)
    b = torch.randn(c, generator=g)
    results = []
    for fn in (_ours, bias_gelu_ref):
        xx, bb = x.transpose(1, 2).requires_grad_(), b.clone().requires_grad_()
        assert xx.is_contiguous() and xx.stride(1) == 1
        y = fn(xx, bb)
        results.append([y, *torch.autograd.grad((y.transpose(1, 2) * gy).sum(), (xx, bb))])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)

def test_empty_batch():
    x, b = _inputs((0, 197, 3072), torch.float32)
    y = _ours(x, b)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(b.grad, torch.zeros(3072))


def test_kernel_saves_what_fallback_saves():
    """Backward keeps the pre-activation x and the bias only, on the Triton path as on the fallback."""
    for use_triton in (True, False):
        x, b = _inputs((2, 7, 3072), torch.float16)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            bias_gelu(x, b, use_triton)
        assert [(tuple(t.shape), t.dtype) for t in saved] == [((2, 7, 3072), torch.float16), ((3072,), torch.float16)]
        assert saved[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_recomputes_the_forward_output(dtype, approximate):
    """bias_gelu_bwd's ``need_y`` output (the MLP's recomputed activation, for fc2's weight gradient) is what the
    forward op wrote, on the kernel and on the fallback; without ``need_y`` it is empty and dx is unchanged."""
    from fastvit.kernels.bias_gelu import bias_gelu_bwd, bias_gelu_fwd
    x, b = _inputs((2, 37, 1100), dtype)  # two column blocks, a partial one
    x, b = x.detach(), b.detach()
    dy = _upstream(x.shape).to(dtype)
    for use_triton in (True, False):
        y = bias_gelu_fwd(x, b, use_triton, approximate)
        dx, db, y_again = bias_gelu_bwd(dy, x, b, use_triton, approximate, True)
        assert torch.equal(y_again, y)
        dx_only, db_only, nothing = bias_gelu_bwd(dy, x, b, use_triton, approximate)
        assert nothing.numel() == 0 and torch.equal(dx_only, dx) and torch.equal(db_only, db)


@pytest.mark.parametrize("approximate", ["none", "tanh", "sigmoid"])
@pytest.mark.parametrize("linear", [False, True], ids=["gelu", "gelu-linear"])
def test_inference_call_gives_the_recorded_calls_output(approximate, linear):
    """``ops.bias_gelu`` and ``ops.bias_gelu_linear`` in eager inference launch the kernel without the autograd
    Function: the bits of the call autograd records, on a strided (column-slice) input too."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 300, generator=g)[..., :256].half()
    b, w = torch.randn(256, generator=g).half(), torch.randn(64, 256, generator=g).half()

    def call(bias):
        if linear:
            return ops.bias_gelu_linear(x, bias, w, None, backend="triton", approximate=approximate)
        return ops.bias_gelu(x, bias, backend="triton", approximate=approximate)
    recorded = call(b.clone().requires_grad_())
    with torch.no_grad():
        inferred = call(b)
    assert recorded.requires_grad and not inferred.requires_grad
    assert torch.equal(inferred, recorded)
