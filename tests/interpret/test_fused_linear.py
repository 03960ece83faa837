"""LayerNorm + Linear and GELU + Linear composites (Triton under the interpreter, and the torch fallback) against
plain torch: same outputs and gradients, and none of the Linear inputs kept for backward."""
import pytest
import torch
import torch.nn.functional as F

from fastvit import ops

EPS = 1e-6


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.5 + 0.1).requires_grad_() for s in shapes]


def ln_linear_ref(x, r, w, b, lw, lb):
    res = x if r is None else x + r
    return F.linear(F.layer_norm(res, w.shape, w, b, EPS), lw, lb), res


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rows,d,n,residual,lin_bias", [(197, 768, 96, True, True), (50, 37, 40, False, True),
                                                        (1, 1280, 64, True, False), (0, 64, 32, True, True)])
def test_add_layer_norm_linear_matches_torch(backend, rows, d, n, residual, lin_bias):
    x, r, w, b, lw, lb = leaves((2, rows, d), (2, rows, d), (d,), (d,), (n, d), (n,))
    r = r if residual else None
    lb = lb if lin_bias else None
    ins = [t for t in (x, r, w, b, lw, lb) if t is not None]
    gout, gres = torch.randn(2, rows, n), torch.randn(2, rows, d)
    outs = []
    for fn in (lambda *a: ops.add_layer_norm_linear(*a[:4], a[4], a[5], EPS, backend=backend), ln_linear_ref):
        out, res = fn(x, r, w, b, lw, lb)
        loss = (out * gout).sum() + (res * gres).sum()
        outs.append([out, res, *torch.autograd.grad(loss, ins)])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rows,c,n,lin_bias", [(197, 3072, 48, True), (33, 100, 37, False), (0, 64, 16, True)])
def test_bias_gelu_linear_matches_torch(backend, rows, c, n, lin_bias):
    x, b, lw, lb = leaves((2, rows, c), (c,), (n, c), (n,))
    lb = lb if lin_bias else None
    ins = [t for t in (x, b, lw, lb) if t is not None]
    gout = torch.randn(2, rows, n)
    outs = []
    for fn in (lambda *a: ops.bias_gelu_linear(*a, backend=backend), lambda x, b, lw, lb: F.linear(F.gelu(x + b), lw, lb)):
        out = fn(x, b, lw, lb)
        outs.append([out, *torch.autograd.grad((out * gout).sum(), ins)])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def saved_storages(fn):
    """Unique storages (data_ptr -> nbytes) that autograd keeps for backward while ``fn`` runs."""
    found = {}

    def pack(t):
        found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return found, out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_composites_keep_no_linear_input(backend):
    rows, d, n = 64, 96, 288
    x, r, w, b, lw, lb, w2 = leaves((rows, d), (rows, d), (d,), (d,), (n, d), (n,), (d, n))
    params = {t.untyped_storage().data_ptr() for t in (w, b, lw, lb, w2)}
    saved, (h, res) = saved_storages(lambda: ops.add_layer_norm_linear(x, r, w, b, lw, None, EPS, backend=backend))
    activations = {p: nbytes for p, nbytes in saved.items() if p not in params}
    assert res.untyped_storage().data_ptr() in activations  # the residual sum, which the next block needs anyway
    assert sum(activations.values()) == rows * d * 4 + 2 * rows * 4  # + mean and rstd, no LayerNorm output
    saved, out = saved_storages(lambda: ops.bias_gelu_linear(h, lb, w2, None, backend=backend))
    activations = {p: nbytes for p, nbytes in saved.items() if p not in params}
    assert activations == {h.untyped_storage().data_ptr(): rows * n * 4}  # the pre-activation only


def test_autocast_bf16_composites_match_autocast_torch():
    """Under CPU bf16 autocast the composites compute in bf16 like F.linear does, and grads come back fp32."""
    x, r, w, b, lw, lb = leaves((2, 17, 64), (2, 17, 64), (64,), (64,), (192, 64), (192,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, res = ops.add_layer_norm_linear(x, r, w, b, lw, lb, EPS, backend="torch")
        ref_out, ref_res = ln_linear_ref(x, r, w, b, lw, lb)
    assert out.dtype == ref_out.dtype == torch.bfloat16 and res.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().sum(), (x, lw))
    ref_grads = torch.autograd.grad(ref_out.float().sum(), (x, lw))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_backward_recomputes_the_norm_in_the_products_dtype(backend):
    """The backward recomputes LN(x + residual) for the weight gradient straight in the dtype that product runs in
    (the output gradient's, bf16 here), not in the fp32 residual's and then cast (an activation-sized cast per
    composite: 28 ms of the H200's B/16 step); the gradients are bitwise those of the fp32 recompute and a cast."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastvit.kernels import layer_norm

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    def grads(y_dtype_of_recompute):
        x, r, w, b, lw, lb = leaves((2, 17, 64), (2, 17, 64), (64,), (64,), (192, 64), (192,), seed=3)
        h = x.detach().to(torch.bfloat16).requires_grad_()  # a 16-bit branch onto the fp32 stream, as in a block
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, res = ops.add_layer_norm_linear(h, r, w, b, lw, lb, EPS, backend=backend)
        assert res.dtype == torch.float32 and out.dtype == torch.bfloat16
        casts = Casts()
        with casts:
            got = torch.autograd.grad(out.float().square().sum(), (h, r, w, b, lw, lb))
        return got, casts.shapes

    got, shapes = grads(None)
    assert (2, 17, 64) not in shapes and (34, 64) not in shapes, shapes  # only weight-sized casts remain
    real = layer_norm.add_layer_norm_fwd
    try:  # the recompute as it was: in the residual's fp32, cast by the product
        layer_norm.add_layer_norm_fwd = lambda *a: real(*a[:7])
        ref, ref_shapes = grads(None)
    finally:
        layer_norm.add_layer_norm_fwd = real
    assert (2, 17, 64) in ref_shapes or (34, 64) in ref_shapes
    for a, e in zip(got, ref):
        if backend == "torch":
            assert torch.equal(a, e)
        else:  # the interpreter rounds fp32 to bf16 its own way: the old recompute's torch cast differed from it
            torch.testing.assert_close(a, e, atol=2 ** -7 * e.abs().max().item(), rtol=2 ** -7)
    # the recompute is the forward's own op: y of (bf16 x + fp32 residual) equals y recomputed from the sum
    x, r, w, b = leaves((2, 17, 64), (2, 17, 64), (64,), (64,), seed=4)
    use_triton = backend == "triton"
    y, res, _, _ = layer_norm.add_layer_norm_fwd(x.detach().bfloat16(), r.detach(), w.detach(), b.detach(), EPS,
                                                 False, use_triton)
    again = layer_norm.add_layer_norm_fwd(res, None, w.detach(), b.detach(), EPS, False, use_triton,
                                          torch.bfloat16)[0]
    assert y.dtype == again.dtype == torch.bfloat16 and torch.equal(y, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("residual", [False, True])
def test_eager_backward_recomputes_the_norm_by_the_kernel_alone(monkeypatch, dtype, residual):
    """In a plain eager backward the LayerNorm's recomputation launches the kernel alone, keeping neither statistic
    (layer_norm._normalized): the op is not called, and every gradient has the bits it has when the op recomputes
    (a traced or profiled backward, forced here)."""
    from fastvit.kernels import layer_norm
    x, r, w, b, lw, lb = (t.detach().to(dtype).requires_grad_()
                          for t in leaves((2, 17, 96), (2, 17, 96), (96,), (96,), (40, 96), (40,), seed=7))
    r = r if residual else None
    ins = [t for t in (x, r, w, b, lw, lb) if t is not None]
    gout = torch.randn(2, 17, 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    op_calls = []
    real_op = layer_norm.add_layer_norm_fwd
    monkeypatch.setattr(layer_norm, "add_layer_norm_fwd", lambda *a: op_calls.append(a[6:]) or real_op(*a))

    def grads():
        out, _ = ops.add_layer_norm_linear(x, r, w, b, lw, lb, EPS, backend="triton")
        op_calls.clear()
        return torch.autograd.grad((out * gout).sum(), ins)
    eager = grads()
    assert op_calls == []  # the forward's op ran before the clear; the backward called none
    monkeypatch.setattr(layer_norm, "plain_inference", lambda args: False)
    through_op = grads()
    assert op_calls == [(True, dtype)]  # the recomputation as the op: use_triton, y in the product's dtype
    for a, e in zip(eager, through_op):
        assert a.dtype == e.dtype and torch.equal(a, e)
