"""Attention without the Triton interpreter: the custom ops' torch fallback against SDPA, what autograd saves,
opcheck, torch.compile(fullgraph=True), input checks, and the backend dispatch including the optional flash_attn
package (faked by monkeypatching, since it cannot be installed here)."""
import sys
import types

import pytest
import torch

from _helpers import assert_compiled_matches_eager, compile_capturing_graphs

from fastvit import ops
from fastvit.kernels import flash_attention as fa


def _case(b, h, n, hd, grid, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(b, n, 3 * h * hd, generator=g).to(dtype).requires_grad_()
    table = None
    if grid is not None:
        table = (0.5 * torch.randn(h, fa.num_relative_positions(grid, n == grid[0] * grid[1] + 1),
                                   generator=g)).requires_grad_()
    return packed, table, torch.randn(b, h, n, hd, generator=g).to(dtype)


def _qkv(packed, h):
    b, n, d3 = packed.shape
    return packed.reshape(b, n, 3, h, d3 // (3 * h)).permute(2, 0, 3, 1, 4).unbind(0)


def _out_and_grads(fn, packed, table, do, h, grid):
    q, k, v = _qkv(packed, h)
    out = fn(q, k, v, table, grid)
    leaves = [packed] + ([table] if table is not None else [])
    return [out, *torch.autograd.grad(out, leaves, do)]


@pytest.mark.parametrize("b,h,n,hd,grid", [(2, 3, 50, 64, (7, 7)), (1, 2, 49, 80, (7, 7)), (2, 2, 197, 64, None),
                                           (1, 2, 1, 32, None), (1, 1, 257, 80, (16, 16))])
def test_fallback_matches_sdpa(b, h, n, hd, grid):
    packed, table, do = _case(b, h, n, hd, grid)
    ours = _out_and_grads(lambda q, k, v, t, g: fa.flash_attention(q, k, v, t, g, use_triton=False),
                          packed, table, do, h, grid)
    ref = _out_and_grads(fa.attention_ref, packed, table, do, h, grid)
    for i, (a, e) in enumerate(zip(ours, ref)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=1e-5 if i == 0 else 5e-5, rtol=1e-4, msg=str(i))


def test_fallback_in_half_precision_returns_input_dtype():
    packed, table, do = _case(1, 2, 50, 64, (7, 7), torch.bfloat16)
    out, dpacked, dtable = _out_and_grads(lambda q, k, v, t, g: fa.flash_attention(q, k, v, t, g, use_triton=False),
                                          packed, table, do, 2, (7, 7))
    ref = fa.attention_ref(*(t.double() for t in _qkv(packed, 2)), table.double(), (7, 7))
    assert out.dtype == dpacked.dtype == torch.bfloat16 and dtable.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("create_graph", [False, True])
def test_fallback_math_stays_fp32_under_autocast(create_graph):
    """The fallback computes scores, softmax and products in fp32 as the kernels do, whatever autocast says: under
    CPU bf16 autocast (around forward and backward, as torch.compile traces a backward) outputs and gradients are
    bitwise those without autocast, for the plain and the recorded (create_graph) backward. Autocast would run its
    matmuls in bf16 (errors ~1e-2)."""
    packed, table, do = _case(2, 2, 50, 32, (7, 7))

    def run():
        q, k, v = _qkv(packed, 2)
        out = fa.flash_attention(q, k, v, table, (7, 7), use_triton=False)
        return [out, *torch.autograd.grad(out, [packed, table], do, create_graph=create_graph)]

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    for a, e in zip(got, want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_rel_bias_gradient_is_the_scatter_of_the_dense_bias_gradient():
    """d table[h, r] = sum over batch and every (i, j) with index[i, j] = r of dL/dB[h, i, j]."""
    packed, table, do = _case(2, 2, 50, 32, (7, 7))
    q, k, v = (t.detach() for t in _qkv(packed, 2))
    dense = fa.relative_bias_dense(table.detach(), (7, 7), 50).requires_grad_()
    (dbias,) = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                                   dense, do)
    expected = torch.zeros_like(table).index_add_(1, fa.relative_position_index((7, 7)).flatten(),
                                                  dbias.reshape(2, -1))
    (dtable,) = torch.autograd.grad(fa.flash_attention(q, k, v, table, (7, 7), use_triton=False), table, do)
    torch.testing.assert_close(dtable, expected, atol=1e-5, rtol=1e-5)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


def test_saves_qkv_views_output_lse_and_table_only():
    """q, k, v are saved as the views they are (no copies), the output is the returned tensor itself, the row
    log-sum-exp is fp32 (B, heads, N), and the small table: nothing of size N x N."""
    packed, table, _ = _case(2, 3, 50, 64, (7, 7), torch.bfloat16)
    q, k, v = _qkv(packed, 3)
    saved, out = _saved(lambda: fa.flash_attention(q, k, v, table, (7, 7), use_triton=False))
    assert len(saved) == 6
    for s, t in zip(saved[:3], (q, k, v)):
        assert s.data_ptr() == t.data_ptr() and s.stride() == t.stride()
    assert saved[3].data_ptr() == out.data_ptr()
    assert saved[4].shape == (2, 3, 50) and saved[4].dtype == torch.float32
    assert saved[5] is table
    assert out.transpose(1, 2).is_contiguous()


def test_fallback_forward_without_bias_is_sdpas_cpu_kernel():
    """Without a bias or dropout on CPU the fallback's forward is PyTorch's CPU flash kernel, the one SDPA runs
    there: the same output bits, and the row log-sum-exp of the scores laid out (B, heads, N) as the op promises."""
    for dtype in (torch.float32, torch.bfloat16):
        packed, _, _ = _case(2, 3, 17, 32, None, dtype)
        q, k, v = (t.detach() for t in _qkv(packed, 3))
        out, lse = torch.ops.fastvit.attention_fwd(q, k, v, None, None, 0, 0, 32 ** -0.5, 0.0, False)
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        assert lse.shape == (2, 3, 17) and lse.is_contiguous() and lse.dtype == torch.float32
        scores = q.double() @ k.double().transpose(-1, -2) * 32 ** -0.5
        tol = 1e-5 if dtype == torch.float32 else 1e-4  # fp32 sums of bf16 products, in another order
        torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=tol, rtol=tol)
    empty = torch.randn(2, 2, 0, 32)  # no tokens: the math path (PyTorch's CPU kernel dies of SIGFPE there)
    out, lse = torch.ops.fastvit.attention_fwd(empty, empty, empty, None, None, 0, 0, 0.2, 0.0, False)
    assert out.shape == (2, 2, 0, 32) and lse.shape == (2, 2, 0)


@pytest.mark.parametrize("dtype, n, grad, dropout_p, table, backend, want", [
    (torch.bfloat16, 17, True, 0.0, False, "auto", "fallback"),
    (torch.float16, 128, True, 0.0, False, "auto", "fallback"),
    (torch.bfloat16, 129, True, 0.0, False, "auto", "torch"),
    (torch.float32, 17, True, 0.0, False, "auto", "torch"),
    (torch.bfloat16, 17, False, 0.0, False, "auto", "torch"),
    (torch.bfloat16, 17, True, 0.1, False, "auto", "torch"),
    (torch.bfloat16, 17, True, 0.0, True, "auto", "torch"),
    (torch.bfloat16, 17, True, 0.0, False, "torch", "torch")])
def test_cpu_training_attention_choice(dtype, n, grad, dropout_p, table, backend, want):
    """On CPU, "auto" takes the fallback's backward for 16-bit training calls of up to 128 tokens without a bias or
    dropout (where PyTorch's CPU flash backward is the slow one), SDPA otherwise; "torch" is always SDPA."""
    q = torch.randn(2, 2, n, 32, dtype=dtype, requires_grad=grad)
    rel_bias = torch.zeros(2, fa.num_relative_positions((4, 4))) if table else None
    assert ops.attention_backend(q, rel_bias, backend, dropout_p, (4, 4) if table else None) == want


def test_cpu_bf16_training_attention_is_as_accurate_as_sdpa():
    """The "auto" path of a bf16 CPU training call (our Function: SDPA's forward kernel, the backward in fp32 math)
    gives SDPA's output bits and gradients within twice SDPA's own error against fp64 math."""
    packed, _, do = _case(4, 2, 17, 32, None, torch.bfloat16)

    def run(backend):
        q, k, v = _qkv(packed, 2)
        out = ops.attention(q, k, v, backend=backend)
        return out, *torch.autograd.grad(out, packed, do)

    ours, sdpa = run("auto"), run("torch")
    assert type(ours[0].grad_fn).__name__ == "FlashAttentionFnBackward"
    assert type(sdpa[0].grad_fn).__name__.startswith("ScaledDotProduct")
    exact = packed.detach().double().requires_grad_()
    q, k, v = _qkv(exact, 2)
    out = torch.softmax(q @ k.transpose(-1, -2) * 32 ** -0.5, -1) @ v
    ref = (out, *torch.autograd.grad(out, exact, do.double()))
    assert torch.equal(ours[0], sdpa[0])
    for name, a, s, r in zip(("out", "grad"), ours, sdpa, ref):
        err, sdpa_err = ((t.double() - r).abs().max().item() for t in (a, s))
        assert err <= 2 * sdpa_err, (name, err, sdpa_err)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_compiled_cpu_bf16_training_attention_follows_the_eager_rule(backend):
    """Under torch.compile a bf16 CPU training call chooses as in eager: with "auto" the backward graph computes the
    fallback's math instead of calling SDPA's CPU flash backward (its slow one at 17 tokens), and gives eager's
    output and gradients (the graphs run as traced, no inductor); "torch" keeps SDPA's backward."""
    packed, _, do = _case(4, 2, 17, 32, None, torch.bfloat16)

    def run(fn):
        q, k, v = _qkv(packed, 2)
        out = fn(q, k, v)
        return out, *torch.autograd.grad(out, packed, do)

    def attend(q, k, v):
        return ops.attention(q, k, v, backend=backend)

    graphs = []
    compiled = run(compile_capturing_graphs(attend, graphs))
    eager = run(attend)
    backward = {str(node.target) for node in graphs[1].graph.nodes if node.op == "call_function"}
    sdpa_backward = "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"
    assert (sdpa_backward in backward) == (backend == "torch"), sorted(backward)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=0, rtol=0)


def test_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(2, 50, 3 * 2 * 32, generator=g)
    q, k, v = _qkv(packed, 2)
    table = torch.randn(2, fa.num_relative_positions((7, 7)), generator=g)
    seed = torch.tensor([1234])
    ops_ = torch.ops.fastvit
    for args in [(q, k, v, table, None, 7, 7, 0.2, 0.0, False), (q, k, v, None, None, 0, 0, 0.2, 0.0, False),
                 (q.half(), k.half(), v.half(), table, None, 7, 7, 0.2, 0.0, False),
                 (q, k, v, table, seed, 7, 7, 0.2, 0.25, False)]:
        torch.library.opcheck(ops_.attention_fwd, args)
    out, lse = ops_.attention_fwd(q, k, v, table, seed, 7, 7, 0.2, 0.25, False)
    do = torch.randn(out.shape, generator=g)
    torch.library.opcheck(ops_.attention_bwd, (do, q, k, v, out, lse, table, seed, 7, 7, 0.2, 0.25, False))
    torch.library.opcheck(ops_.attention_bwd, (do, q, k, v, out, lse, None, None, 0, 0, 0.2, 0.0, False))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compile_fullgraph_matches_eager(dropout_p):
    """A qkv projection, attention with the bias table (and dropout) and an output projection compile in one
    graph (inductor, CPU) and match eager, gradients included; with fallback_random the compiled graph draws the
    same dropout seed as eager."""
    heads, hd = 2, 16

    def f(x, w_qkv, table, w_out):
        b, n, d = x.shape
        q, k, v = (x @ w_qkv).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = fa.flash_attention(q, k, v, table, (4, 4), dropout_p=dropout_p, use_triton=False)
        return ((out.transpose(1, 2).reshape(b, n, d) @ w_out) ** 2).sum()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 17, 32, generator=g), 0.2 * torch.randn(32, 96, generator=g),
            torch.randn(heads, fa.num_relative_positions((4, 4)), generator=g), 0.2 * torch.randn(32, 32, generator=g)]
    assert_compiled_matches_eager(f, [a.requires_grad_() for a in args])


def test_bad_inputs_raise_clear_errors():
    packed, table, _ = _case(1, 2, 50, 32, (7, 7))
    q, k, v = _qkv(packed, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.attention(q, k, v, backend="flash2")
    with pytest.raises(ValueError, match="grid_size"):
        ops.attention(q, k, v, rel_bias=table, backend="torch")
    with pytest.raises(ValueError, match="N must be 64 or 65"):
        ops.attention(q, k, v, rel_bias=table, grid_size=(8, 8), backend="torch")
    with pytest.raises(ValueError, match=r"rel_bias must have shape \(2, 172\)"):
        ops.attention(q, k, v, rel_bias=table[:, :-1], grid_size=(7, 7), backend="torch")
    with pytest.raises(ValueError, match="share one"):
        ops.attention(q, k[:, :, :10], v, backend="torch")
    with pytest.raises(ValueError, match="head_dim 1 to 128"):
        fa.flash_attention(*(torch.randn(1, 1, 4, 160) for _ in range(3)))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fa.flash_attention(*(torch.randn(1, 1, 4, 16).double() for _ in range(3)))
    # with a mask too, where SDPA would index or broadcast a wrong table silently
    for mask in (dict(attn_mask=torch.ones(50, 50, dtype=torch.bool)), dict(is_causal=True)):
        with pytest.raises(ValueError, match=r"rel_bias must have shape \(2, 172\)"):
            ops.attention(q, k, v, rel_bias=torch.zeros(2, 200), grid_size=(7, 7), **mask)
        with pytest.raises(ValueError, match=r"rel_bias must have shape \(2, 172\)"):
            ops.attention(q, k, v, rel_bias=table[:1], grid_size=(7, 7), **mask)
        with pytest.raises(ValueError, match="grid_size"):
            ops.attention(q, k, v, rel_bias=table, **mask)


# ---------------------------------------------------------------------------------------------------------------
# backend dispatch

class _PretendCuda(torch.Tensor):
    """A CPU tensor that reports is_cuda, to reach the CUDA-only dispatch branches on this machine."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """Installs a stand-in flash_attn package whose flash_attn_func records its calls and computes with SDPA."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None):
        calls.append(dict(q=q, k=k, v=v, dropout_p=dropout_p, softmax_scale=softmax_scale))
        q, k, v = (t.as_subclass(torch.Tensor).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=softmax_scale).transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    fa._flash_attn_func.cache_clear()
    yield calls
    fa._flash_attn_func.cache_clear()


@pytest.fixture
def no_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    fa._flash_attn_func.cache_clear()
    yield
    fa._flash_attn_func.cache_clear()


def _pretend_cuda_qkv(dtype=torch.float16):
    packed, _, _ = _case(2, 3, 50, 64, None, dtype)
    return [t.detach().as_subclass(_PretendCuda) for t in _qkv(packed, 3)]


def test_flash_backend_passes_strided_views_and_arguments(fake_flash_attn):
    q, k, v = _pretend_cuda_qkv()
    out = ops.attention(q, k, v, dropout_p=0.0, scale=0.2, backend="flash")
    (call,) = fake_flash_attn
    assert call["softmax_scale"] == 0.2 and call["dropout_p"] == 0.0
    for name, t in zip("qkv", (q, k, v)):
        # (B, N, heads, hd) views of the same memory: no copy before flash_attn
        assert call[name].shape == (2, 50, 3, 64) and call[name].data_ptr() == t.data_ptr()
    ref = fa.attention_ref(*(t.as_subclass(torch.Tensor).float() for t in (q, k, v)), scale=0.2)
    assert out.shape == q.shape
    torch.testing.assert_close(out.as_subclass(torch.Tensor).float(), ref, atol=2e-3, rtol=2e-3)


def test_auto_picks_flash_only_where_it_can_run(fake_flash_attn, monkeypatch):
    q, k, v = _pretend_cuda_qkv()
    ops.attention(q, k, v, dropout_p=0.1, backend="auto")
    assert len(fake_flash_attn) == 1 and fake_flash_attn[0]["dropout_p"] == 0.1

    chosen = []
    monkeypatch.setattr(fa, "attention", lambda *args: chosen.append(args[7]))  # use_triton
    table = torch.zeros(3, fa.num_relative_positions((7, 7)))
    ops.attention(q, k, v, rel_bias=table, grid_size=(7, 7), backend="auto")  # a bias: Triton
    ops.attention(*(t.float() for t in (q, k, v)), backend="auto")            # fp32: Triton
    ops.attention(*_pretend_cuda_qkv(torch.bfloat16), backend="torch")        # asked for torch
    ops.attention(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), backend="auto")  # CPU, no interpreter
    assert chosen == [True, True, False, False] and len(fake_flash_attn) == 1
    # attention_backend names what attention ran, for reports
    assert ops.attention_backend(q) == "flash"
    assert ops.attention_backend(q, rel_bias=table) == "triton"
    assert ops.attention_backend(q.float()) == "triton"
    assert ops.attention_backend(q, backend="torch") == "torch"
    assert ops.attention_backend(q.as_subclass(torch.Tensor)) == "torch"


def test_auto_without_flash_attn_uses_triton_or_sdpa(no_flash_attn, monkeypatch):
    q, k, v = _pretend_cuda_qkv()
    chosen = []
    monkeypatch.setattr(fa, "attention", lambda *args: chosen.append((args[5], args[7])))  # dropout_p, use_triton
    ops.attention(q, k, v, backend="auto")
    ops.attention(q, k, v, dropout_p=0.1, backend="auto")
    ops.attention(*(t.double() for t in (q, k, v)), backend="auto")  # no fp64 kernel: SDPA
    ops.attention(*(torch.zeros(1, 1, 4, 160).as_subclass(_PretendCuda) for _ in range(3)), backend="auto")
    assert chosen == [(0.0, True), (0.1, True), (0.0, False), (0.0, False)]
    assert [ops.attention_backend(t) for t in (q, q.double())] == ["triton", "torch"]


def test_flash_backend_errors(no_flash_attn):
    q, k, v = _pretend_cuda_qkv()
    with pytest.raises(RuntimeError, match="flash_attn package"):
        ops.attention(q, k, v, backend="flash")


def test_flash_backend_rejects_what_flash_attn_cannot_do(fake_flash_attn):
    q, k, v = _pretend_cuda_qkv()
    with pytest.raises(ValueError, match="rel_bias"):
        ops.attention(q, k, v, rel_bias=torch.zeros(3, 172), grid_size=(7, 7), backend="flash")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        ops.attention(*(t.float() for t in (q, k, v)), backend="flash")
    with pytest.raises(TypeError, match="CUDA"):
        ops.attention(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), backend="flash")
    assert not fake_flash_attn
