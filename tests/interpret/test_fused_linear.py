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
