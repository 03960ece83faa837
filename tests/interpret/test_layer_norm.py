"""The Triton residual-add + LayerNorm (under TRITON_INTERPRET=1) against the torch reference: forward and the
gradients of x, residual, weight and bias, at ViT widths (768 and 1280 are not powers of two) and an odd one,
for 0 to 257 rows, strided inputs and each residual mode."""
import pytest
import torch

from _helpers import INTERPRETER_ROUNDING

from fastvit import ops
from fastvit.kernels.layer_norm import add_layer_norm, add_layer_norm_ref

EPS = 1e-6


def _inputs(shape, dtype, mode, seed=0):
    """x, residual (None for mode 'none'), weight, bias: leaves requiring grad, with a non-trivial mean."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    r = None if mode == "none" else (torch.randn(shape, generator=g) * 3 - 1).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(d, generator=g)).to(dtype).requires_grad_()
    return x, r, w, b


def _run(fn, x, r, w, b, fp32_res, gy, gres):
    """Outputs of ``fn`` and the gradients of sum(y*gy) + sum(new_residual*gres) for its tensor inputs."""
    leaves = [t for t in (x, r, w, b) if t is not None]
    y, res = fn(x, r, w, b, fp32_res)
    loss = (y.float() * gy).sum() + (res.float() * gres).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [y, res, *grads]


def _ours(x, r, w, b, fp32_res):
    return add_layer_norm(x, r, w, b, EPS, fp32_res, True)


def _ref(x, r, w, b, fp32_res):
    return add_layer_norm_ref(x, r, w, b, EPS, fp32_res)


def _upstream(shape, seed=1):
    """Gradients reaching y and new_residual from downstream."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


CASES = [  # (shape, residual mode); rows = prod(shape[:-1])
    ((1, 197, 768), "add"),
    ((2, 25, 1024), "add_fp32"),
    ((1, 257, 1280), "add"),
    ((1, 1, 1280), "none"),
    ((1, 197, 37), "add_fp32"),
    ((50, 37), "none"),
    ((1, 257, 768), "none_fp32"),
    ((1, 1, 1024), "add"),
]


@pytest.mark.parametrize("shape,mode", CASES)
def test_fp32_matches_reference(shape, mode):
    x, r, w, b = _inputs(shape, torch.float32, mode.split("_")[0])
    fp32_res = mode.endswith("fp32")
    gy, gres = _upstream(shape)
    ours = _run(_ours, x, r, w, b, fp32_res, gy, gres)
    ref = _run(_ref, x, r, w, b, fp32_res, gy, gres)
    names = ["y", "new_residual", "dx"] + (["dresidual"] if r is not None else []) + ["dweight", "dbias"]
    for name, a, e in zip(names, ours, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        atol = 1e-5 if name in ("y", "new_residual") else 1e-4
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5, msg=name)


HALF_CASES = [
    ((1, 197, 768), "add", False),
    ((2, 25, 1280), "add", True),
    ((1, 257, 1024), "none", False),
    ((3, 37), "add", False),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,mode,fp32_res", HALF_CASES)
def test_half_error_at_most_twice_torch(shape, mode, fp32_res, dtype):
    """Error against an fp32 computation of the same (fp16/bf16-valued) inputs: at most 2x PyTorch's own error in
    that dtype (the kernels have no tl.dot, so the interpreter computes bf16 as a GPU does, apart from the
    rounding of stores: see INTERPRETER_ROUNDING)."""
    x, r, w, b = _inputs(shape, dtype, mode)
    # representable in dtype, so every run sees the same upstream gradients
    gy, gres = (g.to(dtype).float() for g in _upstream(shape))

    def f32(t):
        return None if t is None else t.detach().float().requires_grad_()

    ours = _run(_ours, x, r, w, b, fp32_res, gy, gres)
    torch_half = _run(_ref, x, r, w, b, fp32_res, gy, gres)
    exact = _run(_ref, f32(x), f32(r), f32(w), f32(b), fp32_res, gy, gres)
    assert ours[0].dtype == dtype
    assert ours[1].dtype == (torch.float32 if fp32_res else dtype)
    for i, (a, t, e) in enumerate(zip(ours, torch_half, exact)):
        err = (a.float() - e).abs().max().item()
        torch_err = (t.float() - e).abs().max().item()
        assert err <= INTERPRETER_ROUNDING[dtype] * 2 * torch_err + 1e-6, (i, err, torch_err)


def test_strided_inputs():
    """A column slice (row stride > D), a transposed residual (rows not collapsible) and a last dim that is not
    unit-stride all give the reference's results."""
    d = 768
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 9, d + 64, generator=g)
    x = base[:, :, 10:10 + d]
    r = torch.randn(9, 2, d, generator=g).transpose(0, 1)
    w = torch.randn(d, generator=g)
    b = torch.randn(d, generator=g)
    xt = torch.randn(2, d, 9, generator=g).transpose(1, 2)  # stride(-1) == 9
    gy, gres = _upstream((2, 9, d))
    for xx in (x, xt):
        xx = xx.detach().requires_grad_()
        rr = r.detach().requires_grad_()
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        ours = _run(_ours, xx, rr, ww, bb, False, gy, gres)
        ref = _run(_ref, xx, rr, ww, bb, False, gy, gres)
        for a, e in zip(ours, ref):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


def test_one_token_view_of_a_transposed_map():
    """A (B, 1, D) view of a (B, D, 1) map (one token per image) is contiguous to torch with a token stride of 1,
    not D: such inputs, and upstream gradients laid out the same way, give the reference's results."""
    d = 48
    g = torch.Generator().manual_seed(4)
    x, r, gy, gres = (torch.randn(3, d, 1, generator=g) for _ in range(4))
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    results = []
    for fn in (_ours, _ref):
        leaves = [x.transpose(1, 2).requires_grad_(), r.transpose(1, 2).requires_grad_(), w.clone().requires_grad_(),
                  b.clone().requires_grad_()]
        assert leaves[0].is_contiguous() and leaves[0].stride(1) == 1
        y, res = fn(*leaves, False)
        loss = (y.transpose(1, 2) * gy).sum() + (res.transpose(1, 2) * gres).sum()
        results.append([y, res, *torch.autograd.grad(loss, leaves)])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)

def test_empty_batch():
    x, r, w, b = _inputs((0, 197, 768), torch.float32, "add")
    y, res = _ours(x, r, w, b, False)
    assert y.shape == res.shape == (0, 197, 768)
    (y.sum() + res.sum()).backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape
    assert torch.equal(w.grad, torch.zeros(768)) and torch.equal(b.grad, torch.zeros(768))


def test_new_residual_unused_and_y_unused():
    """The final norm uses only y; a skipped branch could use only new_residual: both backwards are right."""
    x, r, w, b = _inputs((1, 197, 1280), torch.float32, "add")
    gy, gres = _upstream((1, 197, 1280))
    for pick in (0, 1):
        outs = []
        for fn in (_ours, _ref):
            out = fn(x, r, w, b, False)[pick]
            grads = torch.autograd.grad((out * (gy, gres)[pick]).sum(), (x, r, w, b), allow_unused=True)
            # the reference's new_residual does not involve weight and bias: no gradient means zero
            outs.append([torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, r, w, b))])
        for a, e in zip(*outs):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode,fp32_res", [("add", False), ("none", False), ("none", True), ("add", True)])
def test_kernel_saves_what_fallback_saves(mode, fp32_res):
    """The Triton path keeps exactly the fallback's tensors for backward: new_residual (or x), weight, mean, rstd."""
    shapes = []
    for use_triton in (True, False):
        x, r, w, b = _inputs((2, 7, 768), torch.float16, mode)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            add_layer_norm(x, r, w, b, EPS, fp32_res, use_triton)
        shapes.append([(tuple(t.shape), t.dtype) for t in saved])
    assert shapes[0] == shapes[1]
    res_dtype = torch.float32 if fp32_res else torch.float16
    assert shapes[0] == [((2, 7, 768), res_dtype), ((768,), torch.float16), ((2, 7, 1), torch.float32),
                         ((2, 7, 1), torch.float32)]


@pytest.mark.parametrize("use_triton", [True, False])
def test_fp32_residual_stream_with_fp16_branch(use_triton):
    """The steady state of residual_in_fp32: an fp16 branch output joins an fp32 residual; the residual's gradient
    comes back in fp32 (the kernel's second output), x's in fp16."""
    shape = (1, 197, 1280)
    x, _, w, b = _inputs(shape, torch.float16, "none")
    r = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3).requires_grad_()
    gy, gres = (g.half().float() for g in _upstream(shape))
    ours = _run(lambda *a: add_layer_norm(*a[:4], EPS, a[4], use_triton), x, r, w, b, True, gy, gres)
    ref = _run(_ref, x, r, w, b, True, gy, gres)
    names = ["y", "new_residual", "dx", "dresidual", "dweight", "dbias"]
    dtypes = [torch.float16, torch.float32, torch.float16, torch.float32, torch.float16, torch.float16]
    for name, a, e, dt in zip(names, ours, ref, dtypes):
        assert a.dtype == e.dtype == dt, name
        tol = {"atol": 1e-4, "rtol": 1e-5} if dt == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
        torch.testing.assert_close(a, e, **tol, msg=name)


@pytest.mark.parametrize("mode,fp32_res", [("add", False), ("none", False), ("none", True), ("add", True)])
@pytest.mark.parametrize("layout", ["contiguous", "column-slice", "transposed"])
def test_inference_call_gives_the_recorded_calls_outputs(mode, fp32_res, layout):
    """``fastvit.ops.add_layer_norm`` in eager inference launches the kernel without its autograd Function: the
    same bits as the call autograd records, for any layout, and x itself as new_residual where the sum would
    equal x (the caller's residual stream then stays x, as after the recorded call)."""
    d = 96
    g = torch.Generator().manual_seed(6)
    base = {"contiguous": torch.randn(2, 9, d, generator=g), "column-slice": torch.randn(2, 9, d + 8, generator=g),
            "transposed": torch.randn(2, d, 9, generator=g)}[layout].half()
    x = {"contiguous": base, "column-slice": base[..., 4:4 + d], "transposed": base.transpose(1, 2)}[layout]
    r = None if mode == "none" else torch.randn(2, 9, d, generator=g).half()
    w, b = torch.randn(d, generator=g).half(), torch.randn(d, generator=g).half()
    recorded = ops.add_layer_norm(x, r, w.requires_grad_(), b, EPS, fp32_res, backend="triton")
    with torch.no_grad():
        inferred = ops.add_layer_norm(x, r, w, b, EPS, fp32_res, backend="triton")
    assert recorded[0].requires_grad and not inferred[0].requires_grad
    for a, e in zip(inferred, recorded):
        assert a.shape == e.shape and a.dtype == e.dtype and torch.equal(a, e)
    assert (inferred[1] is x) == (recorded[1] is x) == (mode == "none" and not fp32_res)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("trains", ["x", "residual", "params"])
def test_new_residual_requires_grad_as_torch_s_sum(backend, trains):
    """new_residual = x + residual needs a gradient only where x or residual does, as torch's sum: with only the
    norm's (or the Linear's) parameters training it is a plain tensor, not a node of the LayerNorm's graph."""
    gen = torch.Generator().manual_seed(0)
    x, r, w, b = (torch.randn(*shape, generator=gen) for shape in ((2, 5, 32), (2, 5, 32), (32,), (32,)))
    lin = torch.randn(48, 32, generator=gen)
    for t, name in ((x, "x"), (r, "residual"), (w, "params"), (lin, "params")):
        t.requires_grad_(name == trains)
    for y, res in (ops.add_layer_norm(x, r, w, b, backend=backend),
                   ops.add_layer_norm_linear(x, r, w, b, lin, backend=backend)):
        assert res.requires_grad == (x + r).requires_grad == (trains != "params")
        assert y.requires_grad
        (y.sum() + res.sum() if res.requires_grad else y.sum()).backward()
