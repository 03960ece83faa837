"""The fused-GEMM ops on CPU (their torch fallbacks; the kernels are tests/interpret/test_fused_matmul.py) and their
dispatch: results and gradients of the references, sound custom ops, torch.compile, and the measured choice
between each fused GEMM and its unfused path (fused only on a GPU, outside tracing, when measured faster)."""
import collections
import itertools

import pytest
import torch
import torch.nn.functional as F

from _helpers import PretendCuda as _PretendCuda
from _helpers import assert_compiled_matches_eager
from _helpers import tuner  # noqa: F401  (a fixture)

from fastvit import autotune, ops
from fastvit.kernels import gelu_matmul, ln_matmul, matmul_residual
from fastvit.kernels._launch import capability

EPS = 1e-6


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.5 + 0.1).requires_grad_() for s in shapes]


def _outputs_and_grads(fn, leaves, seed=1):
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return [*outs, *torch.autograd.grad(loss, [t for t in leaves if t is not None])]


@pytest.mark.parametrize("residual,fp32_res,lin_bias", [(True, False, True), (False, False, False),
                                                        (True, True, False), (False, True, True)])
def test_ln_matmul_fallback_matches_reference(residual, fp32_res, lin_bias):
    x, r, w, b, lw, lb = _leaves((2, 9, 48), (2, 9, 48), (48,), (48,), (80, 48), (80,))
    args = [x, r if residual else None, w, b, lw, lb if lin_bias else None]
    ours = _outputs_and_grads(lambda *a: ln_matmul.ln_matmul(*a, EPS, fp32_res, False), args)
    want = _outputs_and_grads(lambda *a: ln_matmul.ln_matmul_ref(*a, EPS, fp32_res), args)
    for a, e in zip(ours, want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_b1,with_b2", [(True, True), (False, True), (True, False)])
def test_gelu_matmul_fallback_matches_reference(with_b1, with_b2):
    x, b1, w, b2 = _leaves((2, 9, 96), (96,), (40, 96), (40,))
    args = [x, b1 if with_b1 else None, w, b2 if with_b2 else None]
    ours = _outputs_and_grads(lambda *a: gelu_matmul.gelu_matmul(*a, False), args)
    want = _outputs_and_grads(gelu_matmul.gelu_matmul_ref, args)
    for a, e in zip(ours, want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_bias,res_dtype", [(True, torch.float32), (False, torch.float32), (True, torch.float64)])
def test_matmul_residual_fallback_matches_reference(with_bias, res_dtype):
    x, w, b, r = _leaves((2, 9, 48), (40, 48), (40,), (2, 9, 40))
    args = [x, w, b if with_bias else None, r.detach().to(res_dtype).requires_grad_()]
    ours = _outputs_and_grads(lambda *a: matmul_residual.matmul_residual(*a, False), args)
    want = _outputs_and_grads(matmul_residual.matmul_residual_ref, args)
    assert ours[0].dtype == res_dtype
    for a, e in zip(ours, want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_matmul_residual_skips_gradients_nobody_needs():
    """A frozen weight and bias (an adapter's base layer) get no gradient computed."""
    x, w, b, r = _leaves((5, 48), (40, 48), (40,), (5, 40))
    w.requires_grad_(False)
    b.requires_grad_(False)
    matmul_residual.matmul_residual(x, w, b, r, False).sum().backward()
    assert w.grad is None and b.grad is None and x.grad is not None and torch.equal(r.grad, torch.ones(5, 40))


def test_bf16_autocast_matches_autocast_torch():
    """Under CPU bf16 autocast the fused ops compute in bf16 as F.linear does (weights cast), and their gradients
    come back in the parameters' fp32."""
    x, r, w, b, lw, lb = _leaves((2, 9, 64), (2, 9, 64), (64,), (64,), (192, 64), (192,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, res = ln_matmul.ln_matmul(x, r, w, b, lw, lb, EPS, True, False)
        ref, ref_res = ln_matmul.ln_matmul_ref(x, r, w, b, lw, lb, EPS, True)
        h = gelu_matmul.gelu_matmul(out, lb, lw.t().contiguous(), b, False)
        final = matmul_residual.matmul_residual(h, lw[:64, :64].contiguous(), b, res, False)
    assert out.dtype == ref.dtype == h.dtype == torch.bfloat16 and res.dtype == final.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(final.sum(), (x, lw, lb))
    assert all(g.dtype == torch.float32 for g in grads)


def test_weight_dtype_must_match_without_autocast():
    x, r, w, b, lw, lb = _leaves((2, 3, 32), (2, 3, 32), (32,), (32,), (16, 32), (16,))
    with pytest.raises(RuntimeError, match="torch.float32"):
        ln_matmul.ln_matmul(x, r, w, b, lw.half(), lb, EPS, False, False)
    with pytest.raises(ValueError, match="residual must have shape"):
        matmul_residual.matmul_residual(x, lw, lb, r, False)


def test_fused_linear_ops_name_a_wrong_shape():
    """A weight, bias or residual of the wrong shape is named with the shape expected (torch's GEMM said 'mat1 and
    mat2 shapes cannot be multiplied'), and qkv's width must split into 3 x heads (a reshape error before)."""
    from fastvit import ops
    x, r, w, b = _leaves((2, 5, 48), (2, 5, 48), (48,), (48,))
    fc1, b1, fc2, b2 = torch.randn(80, 48), torch.randn(80), torch.randn(48, 80), torch.randn(48)
    bad = [(lambda: ops.add_layer_norm_linear(x, r, w, b, torch.randn(80, 49)),
            r"weight must have shape \(out_features, 48\) for inputs of 48 features, got \(80, 49\)"),
           (lambda: ops.add_layer_norm_linear(x, r, w, b, fc1, torch.randn(79)),
            r"bias must have shape \(80,\), as weight has 80 outputs, got \(79,\)"),
           (lambda: ops.bias_gelu_linear(torch.randn(2, 5, 80), b1, torch.randn(48, 81)),
            r"weight must have shape \(out_features, 80\)"),
           (lambda: ops.layer_norm_mlp(x, r, w, b, fc1, b1, torch.randn(48, 81), b2),
            r"fc2_weight must have shape \(out_features, 80\)"),
           (lambda: ops.layer_norm_mlp(x, r, w, b, fc1, b1, fc2, torch.randn(47)),
            r"fc2_bias must have shape \(48,\)"),
           (lambda: ops.linear_residual(x, fc1, b1, torch.randn(2, 5, 81)),
            r"residual must have the output's shape \(2, 5, 80\), got \(2, 5, 81\)"),
           (lambda: ops.attention_qkv(torch.randn(2, 9, 95), 2),
            r"qkv's last dim \(95\) must be 3 x num_heads \(2\) x head_dim: a multiple of 6")]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    out, _ = ops.layer_norm_mlp(x, r, w, b, fc1, b1, fc2, b2)  # the right shapes run
    assert out.shape == (2, 5, 48)


def test_bias_gelu_of_a_scalar_names_the_shape_it_takes():
    from fastvit import ops
    for call in (lambda: ops.bias_gelu(torch.tensor(1.0), None),
                 lambda: ops.bias_gelu_linear(torch.tensor(1.0), None, torch.ones(2, 1))):
        with pytest.raises(ValueError, match=r"x must have a channel dim, shape \(\.\.\., C\), got a 0-d tensor"):
            call()


def test_custom_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(6, 48, generator=g), torch.randn(6, 48, generator=g)
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    lw, lb = torch.randn(32, 48, generator=g), torch.randn(32, generator=g)
    for args in [(x, r, w, b, lw, lb, EPS, False, False), (x, None, w, b, lw, None, EPS, True, False),
                 (x.half(), r.half(), w, b, lw.half(), lb, EPS, True, False)]:
        torch.library.opcheck(torch.ops.fastvit.ln_matmul_fwd, args)
    torch.library.opcheck(torch.ops.fastvit.gelu_matmul_fwd, (x, b, lw, lb, False))
    torch.library.opcheck(torch.ops.fastvit.gelu_matmul_fwd, (x, None, lw, None, False))
    torch.library.opcheck(torch.ops.fastvit.matmul_residual_fwd, (x, lw, lb, torch.randn(6, 32), False))
    torch.library.opcheck(torch.ops.fastvit.matmul_residual_fwd, (x.half(), lw.half(), None, torch.randn(6, 32),
                                                                   False))


def test_compile_fullgraph_matches_eager():
    """A block-like chain of the three fused ops compiles in one graph (inductor, CPU) and matches eager."""
    def f(x, r, w, b, lw, lb, w2, b2):
        h, res = ln_matmul.ln_matmul(x, r, w, b, lw, None, EPS, False, False)
        out = gelu_matmul.gelu_matmul(h, lb, w2, b2, False)
        return matmul_residual.matmul_residual(out, w2[:, :32], b2, res, False).square().sum()

    args = _leaves((2, 5, 32), (2, 5, 32), (32,), (32,), (64, 32), (64,), (32, 64), (32,))
    assert_compiled_matches_eager(f, args)


# ---- dispatch: fastvit.ops picks the fused GEMM only where measured faster on a GPU -----------------------------

@pytest.fixture
def timed(tuner, monkeypatch):
    """The pretend-GPU tuner with timings planted per implementation: each measurement runs the runner once (so
    it must work), which records the implementation it ran and whether grad mode was on."""
    times, runs = {}, []

    def measure(runner):
        runner()
        return times[runs[-1][0]]
    monkeypatch.setattr(autotune, "time_cuda", measure)
    return times, runs


def _recorder(runs, outputs=None):
    """run(impl) that notes the call and returns ``outputs[impl]`` (default: the same tensor for every impl)."""
    same = torch.ones(3)
    return lambda impl: runs.append((impl, torch.is_grad_enabled())) or (outputs or {}).get(impl, same)


def test_the_faster_implementation_is_chosen_once_per_shape(timed):
    times, runs = timed
    times.update({"ln+cublas": 2.0, "ln_gemm": 1.0, "ln_gemm_tma": 1.5})
    x, w = torch.randn(2, 5, 64).as_subclass(_PretendCuda), torch.randn(96, 64)
    assert ops.gemm_impl("add_layer_norm_linear", x, w, (), _recorder(runs)) == "ln_gemm"
    # forward only, the call's own inputs; each fused path also run once beside the unfused one (agreement)
    assert {r[0] for r in runs} == {"ln+cublas", "ln_gemm", "ln_gemm_tma"} and not any(r[1] for r in runs)
    measured = len(runs)
    assert ops.gemm_impl("add_layer_norm_linear", x, w, (), _recorder(runs)) == "ln_gemm"
    assert len(runs) == measured  # cached
    times.update({"ln_gemm_tma": 0.5})
    x2 = torch.randn(3, 5, 64).as_subclass(_PretendCuda)  # more rows: another key
    assert ops.gemm_impl("add_layer_norm_linear", x2, w, (), _recorder(runs)) == "ln_gemm_tma"
    assert len(runs) == 2 * measured


def test_a_settled_gemm_choice_skips_the_tuner(timed, monkeypatch):
    """Once chosen, a call shape's implementation comes from the call's own key (dtypes, rows, K, N, the op's
    extra fields): the tuner's fields and runners are not built again; any of those changed is another call."""
    times, runs = timed
    times.update({"ln+cublas": 2.0, "ln_gemm": 1.0, "ln_gemm_tma": 1.5})
    asked = []
    real = autotune.fastest
    monkeypatch.setattr(autotune, "fastest", lambda *args, **kw: asked.append(args[2]) or real(*args, **kw))
    x, w = torch.randn(2, 5, 64).as_subclass(_PretendCuda), torch.randn(96, 64)
    for _ in range(3):
        assert ops.gemm_impl("add_layer_norm_linear", x, w, (("bias", True),), _recorder(runs)) == "ln_gemm"
    assert len(asked) == 1
    times.update({"ln+cublas": 0.5})
    assert ops.gemm_impl("add_layer_norm_linear", x, w, (("bias", False),), _recorder(runs)) == "ln+cublas"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another compute dtype
        ops.gemm_impl("add_layer_norm_linear", x, w, (("bias", True),), _recorder(runs))
    assert [dict(fields)["compute"] for fields in asked] == ["torch.float32", "torch.float32", "torch.bfloat16"]


def test_a_fused_gemm_that_disagrees_is_not_chosen(timed):
    """The fastest candidate whose output is off (a kernel wrong on this GPU) is skipped with a warning, and so is
    one that gives a non-finite value; a small rounding difference is no disagreement."""
    times, runs = timed
    times.update({"cublas+add": 3.0, "gemm_residual": 2.0, "gemm_residual_tma": 1.0})
    w, ref = torch.randn(96, 64), torch.randn(10, 96)
    for rows, off in ((2, ref * 1.1), (3, torch.where(ref > 2, float("nan"), ref)), (4, None)):
        x = torch.randn(rows, 5, 64).as_subclass(_PretendCuda)  # another call shape each time: measured anew
        if off is None:
            break
        with pytest.warns(RuntimeWarning, match="'gemm_residual_tma' disagrees with the reference"):
            pick = ops.gemm_impl("linear_residual", x, w, (), _recorder(runs, {"cublas+add": ref, "gemm_residual": ref,
                                                                                "gemm_residual_tma": off}))
        assert pick == "gemm_residual"
    close = ref + 0.005 * ref.abs().max() * torch.rand(10, 96)
    outputs = {"cublas+add": ref, "gemm_residual": ref, "gemm_residual_tma": close}
    assert ops.gemm_impl("linear_residual", x, w, (), _recorder(runs, outputs)) == "gemm_residual_tma"


def test_the_tma_gemm_is_a_candidate_from_sm_90_on(timed, monkeypatch):
    """Before Hopper (no TMA) the persistent TMA kernel is not measured; the cache key names the candidates, so a
    winner measured among fewer of them is not reused."""
    times, runs = timed
    times.update({"gelu+cublas": 2.0, "gelu_gemm": 1.0, "gelu_gemm_tma": 0.5})
    x, w = torch.randn(2, 5, 64).as_subclass(_PretendCuda), torch.randn(96, 64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    capability.cache_clear()
    assert ops.gemm_impl("bias_gelu_linear", x, w, (), _recorder(runs)) == "gelu_gemm"
    assert {r[0] for r in runs} == {"gelu+cublas", "gelu_gemm"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    capability.cache_clear()
    assert ops.gemm_impl("bias_gelu_linear", x, w, (), _recorder(runs)) == "gelu_gemm_tma"
    assert "gelu_gemm_tma" in {r[0] for r in runs}


def test_unfused_where_nothing_may_be_measured(timed, monkeypatch):
    times, runs = timed
    gpu_x, w = torch.randn(2, 5, 64).as_subclass(_PretendCuda), torch.randn(96, 64)
    assert not ops._gemm_on_gpu(True, torch.randn(2, 5, 64))  # a CPU tensor
    assert not ops._gemm_on_gpu(False, gpu_x)  # the torch backend
    assert ops.gemm_impl("linear_residual", gpu_x.double(), w.double(), (), _recorder(runs)) == "cublas+add"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.gemm_impl("linear_residual", gpu_x, w, (), _recorder(runs)) == "cublas+add"
    assert runs == []


def test_a_fused_gemm_that_cannot_run_is_no_candidate(timed):
    """The real runners of ln_gemm and ln_gemm_tma on CPU tensors cannot launch their kernels here (no GPU, no
    interpreter): the measurement skips them, each with a warning naming its error (a fused GEMM should run every
    call: on a GPU a failure is a bug to see), and the unfused path, which does run, is chosen."""
    times, runs = timed
    times.update({"ln+cublas": 2.0, "ln_gemm": 1.0, "ln_gemm_tma": 1.0})
    x, r, w, b, lw = (t.detach() for t in _leaves((2, 5, 64), (2, 5, 64), (64,), (64,), (96, 64)))
    x = x.as_subclass(_PretendCuda)

    def run(impl):
        runs.append((impl, False))
        ops._run_ln_linear((x, r, w, b, lw, None, EPS, False, impl != "ln+cublas"), impl)
    with pytest.warns(RuntimeWarning) as caught:
        assert ops.gemm_impl("add_layer_norm_linear", x, lw, (), run) == "ln+cublas"
    failed = [str(w.message) for w in caught if "failed for" in str(w.message)]
    assert len(failed) == 2 and all("it is not used" in m for m in failed), failed
    assert {m.split("'")[1] for m in failed} == {"ln_gemm", "ln_gemm_tma"}


@pytest.mark.parametrize("op,impls", list(ops.GEMM_IMPLS.items()))
def test_ops_route_each_choice(monkeypatch, op, impls):
    """Whatever gemm_impl picks is what runs, with the same results (the torch fallbacks on CPU)."""
    x, r, w, b, lw, lb = _leaves((2, 5, 48), (2, 5, 48), (48,), (48,), (48, 48), (48,))
    call, leaves = {
        "add_layer_norm_linear": (lambda: ops.add_layer_norm_linear(x, r, w, b, lw, lb, EPS), [x, r, w, b, lw, lb]),
        "bias_gelu_linear": (lambda: ops.bias_gelu_linear(x, b, lw, lb), [x, b, lw, lb]),
        "linear_residual": (lambda: ops.linear_residual(x, lw, lb, r), [x, lw, lb, r]),
    }[op]
    results = []
    monkeypatch.setattr(ops, "_gemm_on_gpu", lambda triton, x: True)  # as on a GPU with the kernels
    for impl in impls:
        seen = []
        monkeypatch.setattr(ops, "gemm_impl", lambda name, *a: seen.append(name) or impl)
        results.append(_outputs_and_grads(lambda *_: call(), leaves))
        assert seen == [op]
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_each_tuning_key_names_what_changes_the_kernel(monkeypatch):
    """Calls that launch different fused kernels (with or without the GELU's bias, which layer_norm_mlp now adds in
    fc2's prologue; with or without a bias, a residual, an fp32 residual) are different keys for the tuner, so a
    winner measured for one is never reused for the other unmeasured."""
    x, r, w, b, lw, lb = _leaves((2, 5, 48), (2, 5, 48), (48,), (48,), (48, 48), (48,))
    keys = collections.defaultdict(set)
    monkeypatch.setattr(ops, "_gemm_on_gpu", lambda triton, x: True)
    monkeypatch.setattr(ops, "gemm_impl",
                        lambda name, x, w, extra, run: keys[name].add(extra) or ops.GEMM_IMPLS[name][0])
    for gelu_bias, bias in itertools.product((None, b), (None, lb)):
        ops.bias_gelu_linear(x, gelu_bias, lw, bias)
        ops.linear_residual(x, lw, bias, r)
    for residual, bias, in_fp32 in itertools.product((None, r), (None, lb), (False, True)):
        ops.add_layer_norm_linear(x, residual, w, b, lw, bias, EPS, in_fp32)
    assert {name: len(k) for name, k in keys.items()} == {"bias_gelu_linear": 4, "linear_residual": 2,
                                                          "add_layer_norm_linear": 8}


def test_linear_residual_backends_agree_with_torch():
    x, w, b, r = _leaves((2, 5, 48), (40, 48), (40,), (2, 5, 40))
    torch.testing.assert_close(ops.linear_residual(x, w, b, r, backend="torch"), F.linear(x, w, b) + r)
    torch.testing.assert_close(ops.linear_residual(x, w, b, r), F.linear(x, w, b) + r)
