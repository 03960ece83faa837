"""fastvit.onednn (fc1 with its GELU, qkv and fc2 with their bias in the GEMM epilogue) and the ops that use it in CPU
inference (ops.layer_norm_mlp, the MLP branch; ops.add_layer_norm_linear), against torch math and timm."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import QuickGELU

from _helpers import timm_pair
from fastvit import autotune, onednn, ops
from fastvit.kernels import _gemm

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
needs_bf16 = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                reason="no oneDNN bf16 GEMM on this CPU")


@pytest.fixture
def fused_wins(monkeypatch):
    """The fused GEMM as this CPU's measured winner wherever it is a candidate (the measurement is tested below);
    choices settled by earlier tests are forgotten."""
    monkeypatch.setattr(onednn, "fused_is_faster", lambda *args: True)
    monkeypatch.setattr(autotune, "_SETTLED", {})


def _linear_case(shape=(3, 33, 64), out=640, bias=True, seed=0):
    """x, W, b of a product that ``onednn.worth_fusing`` fuses in fp32 and bf16."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(out, shape[-1], generator=gen) / shape[-1] ** 0.5
    b = torch.randn(out, generator=gen) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_matches_torch_fp32(bias, fused_wins):
    assert onednn.supports(torch.float32)
    x, w, b = _linear_case(bias=bias)
    out, fused = _fused_gemms(lambda: onednn.linear_gelu(x, w, b))
    assert fused == 1
    assert out.shape == (3, 33, 640) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_linear_gelu_approximations(fused_wins):
    """The tanh GELU (SigLIP's) runs in oneDNN's epilogue too and gives F.gelu(approximate="tanh")'s result; CLIP's
    quick GELU, which oneDNN's post-ops lack, runs after the GEMM with timm's QuickGELU's bits."""
    assert onednn.supports(torch.float32, "tanh") and not onednn.supports(torch.float32, "sigmoid")
    x, w, b = _linear_case()
    out, fused = _fused_gemms(lambda: onednn.linear_gelu(x, w, b, "tanh"))
    assert fused == 1
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5, rtol=1e-5)
    out, fused = _fused_gemms(lambda: onednn.linear_gelu(x, w, b, "sigmoid"))
    h = F.linear(x, w, b)
    assert fused == 0 and torch.equal(out, QuickGELU()(h))


@needs_bf16
def test_linear_gelu_under_autocast_is_within_torchs_own_error(fused_wins):
    """Under bf16 autocast: the dtype F.linear gives, and an error against fp64 math no larger than twice that of
    F.linear + F.gelu under the same autocast (the fused GEMM rounds once, after the GELU)."""
    assert onednn.supports(torch.bfloat16)
    x, w, b = _linear_case(shape=(512, 96), out=384)
    want = F.gelu(F.linear(x.double(), w.double(), b.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = onednn.linear_gelu(x, w, b)
        torch_out = F.gelu(F.linear(x, w, b))
    assert out.dtype == torch_out.dtype == torch.bfloat16
    ours, torchs = ((o.double() - want).abs().max().item() for o in (out, torch_out))
    assert ours <= 2 * torchs, (ours, torchs)


@needs_onednn
@pytest.mark.parametrize("shape, dtype", [((17, 64), torch.float32), ((197, 768), torch.bfloat16)])
def test_small_products_stay_unfused(shape, dtype, monkeypatch):
    """Where a oneDNN call costs more than it saves (``worth_fusing``): F.linear + F.gelu, bit for bit (with
    PyTorch's own bf16 GEMM, which tests/test_cpu_gemm.py compares the fp32 one with)."""
    monkeypatch.setattr(_gemm, "EMULATED", frozenset())
    x, w, b = _linear_case(shape=shape, out=4 * shape[-1])
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out, fused = _fused_gemms(lambda: onednn.linear_gelu(x, w, b))
        assert fused == 0 and torch.equal(out, F.gelu(F.linear(x, w, b)))
        out, fused = _fused_gemms(lambda: onednn.linear(x, w, b))
        assert fused == 0 and torch.equal(out, F.linear(x, w, b))


@needs_onednn
def test_a_settled_choice_is_one_lookup(monkeypatch, tmp_path):
    """Once a product's choice is made, a call like it takes it without walking the choice again (the candidate
    test and the timing's bookkeeping: a dozen Python calls a GEMM, three GEMMs a block); another thread count,
    under which the timings differ, is asked again."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "time_cpu", lambda run: 1.0 if run.func is onednn.IMPLS["fused"] else 2.0)
    asked = []
    worth_fusing = onednn.worth_fusing
    monkeypatch.setattr(onednn, "worth_fusing", lambda *args: asked.append(args) or worth_fusing(*args))
    autotune.clear()
    threads = torch.get_num_threads()
    try:
        x, w, b = _linear_case()
        first, fused = _fused_gemms(lambda: onednn.linear_gelu(x, w, b))
        again, fused_again = _fused_gemms(lambda: onednn.linear_gelu(x, w, b))
        assert len(asked) == 1 and fused == fused_again == 1 and torch.equal(first, again)
        torch.set_num_threads(1 if threads > 1 else 2)
        onednn.linear_gelu(x, w, b)
        assert len(asked) == 2
    finally:
        torch.set_num_threads(threads)
        autotune.clear()


@needs_onednn
@pytest.mark.parametrize("winner", ["fused", "unfused"])
def test_the_measured_winner_runs(winner, monkeypatch, tmp_path):
    """Which GEMM runs is timed once on the call's own inputs per dtype, row count (to the next power of two) and
    widths, then cached in memory and on disk: the winner of those timings runs, and fewer rows of the same
    bucket, or a new process, measure nothing."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    timed = []

    def time_cpu(run):  # the candidate a runner runs: functools.partial(onednn.IMPLS[name], x, w, b, dtype)
        name = next(n for n, impl in onednn.IMPLS.items() if impl is run.func)
        timed.append((name, run.args[0].shape))
        return 1.0 if name == winner else 2.0
    monkeypatch.setattr(autotune, "time_cpu", time_cpu)
    autotune.clear()
    try:
        x, w, b = _linear_case(shape=(3, 40, 64))  # 120 rows: the 128 bucket
        out, fused = _fused_gemms(lambda: onednn.linear_gelu(x, w, b))
        assert sorted(name for name, _ in timed) == ["fused", "unfused"]
        assert all(shape == x.shape for _, shape in timed)  # timed on the call's inputs
        assert fused == (winner == "fused") * 1
        if winner == "unfused":
            assert torch.equal(out, F.gelu(F.linear(x, w, b)))
        torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)), atol=1e-5, rtol=1e-5)
        fewer = x[:, :35]  # 105 rows, same bucket
        _, fused = _fused_gemms(lambda: onednn.linear_gelu(fewer, w, b))
        autotune.clear()  # a new process: the disk file answers
        _, fused_again = _fused_gemms(lambda: onednn.linear_gelu(x, w, b))
        assert len(timed) == 2 and fused == fused_again == (winner == "fused") * 1
        onednn.linear_gelu(torch.cat([x, x]), w, b)  # 240 rows: the 256 bucket is measured
        assert len(timed) == 4
        out, fused = _fused_gemms(lambda: onednn.linear(x, w, b))  # the bias alone: a product timed on its own
        assert len(timed) == 6 and fused == (winner == "fused") * 1
        torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    finally:
        autotune.clear()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch_fp32(bias, fused_wins):
    """The plain product, its bias (if any) added in oneDNN's epilogue: F.linear's result to rounding."""
    assert onednn.supports(torch.float32, None)
    x, w, b = _linear_case(bias=bias)
    out, weights = _onednn_weights(lambda: onednn.linear(x, w, b))
    assert weights == [(640, 64)]
    assert out.shape == (3, 33, 640) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_bf16
def test_linear_under_autocast_is_within_torchs_own_error(fused_wins):
    x, w, b = _linear_case(shape=(512, 96), out=288)
    want = F.linear(x.double(), w.double(), b.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = _onednn_weights(lambda: onednn.linear(x, w, b))
        torch_out = F.linear(x, w, b)
    assert weights == [(288, 96)] and out.dtype == torch_out.dtype == torch.bfloat16
    ours, torchs = ((o.double() - want).abs().max().item() for o in (out, torch_out))
    assert ours <= 2 * torchs, (ours, torchs)


@needs_onednn
@pytest.mark.parametrize("residual", [True, False])
def test_add_layer_norm_linear_inference_matches_torch_math(residual, fused_wins):
    """ops.add_layer_norm_linear in CPU inference (the qkv projection with its LayerNorm): the LayerNorm, then the
    product with its bias in oneDNN's epilogue; where autograd records, the Function's own GEMM, bit for bit as
    before."""
    h, r, (nw, nb, w, b, _, _) = _mlp_case(residual=residual)
    with torch.inference_mode():
        (out, z), weights = _onednn_weights(lambda: ops.add_layer_norm_linear(h, r, nw, nb, w, b))
    z_want = h if r is None else h + r
    assert weights == [(256, 64)]
    torch.testing.assert_close(out, F.linear(F.layer_norm(z_want, (64,), nw, nb, 1e-6), w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, z_want)
    leaves = [t.clone().requires_grad_() for t in (h, nw, nb, w, b)]
    (out_grad, _), weights = _onednn_weights(lambda: ops.add_layer_norm_linear(leaves[0], r, *leaves[1:]))
    assert weights == []
    torch.testing.assert_close(out_grad, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32-none", "fp32", "bf16-fp32", "bf16"])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_inference_add_layer_norm_is_the_ops_bit_for_bit(dtypes, residual_in_fp32, monkeypatch):
    """The CPU-inference branch's residual add + LayerNorm (kernels.layer_norm.add_layer_norm_inference, which
    skips the autograd Function around it) gives ops.add_layer_norm's outputs exactly, x itself as the new residual
    where that is x; and the two CPU-inference ops take it, not the Function."""
    from fastvit.kernels import layer_norm
    x_dtype, r_dtype = dtypes
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=gen).to(x_dtype)
    r = None if r_dtype is None else torch.randn(2, 7, 64, generator=gen).to(r_dtype)
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    with torch.no_grad():
        y, z = layer_norm.add_layer_norm_inference(x, r, w, b, 1e-6, residual_in_fp32)
        y_op, z_op = ops.add_layer_norm(x, r, w, b, 1e-6, residual_in_fp32)
    assert torch.equal(y, y_op) and y.dtype == y_op.dtype and torch.equal(z, z_op) and z.dtype == z_op.dtype
    assert (z is x) == (z_op is x)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        layer_norm.add_layer_norm_inference(x, x[:1], w, b, 1e-6, False)
    monkeypatch.setattr(layer_norm.AddLayerNormFn, "forward", lambda *args: pytest.fail("the Function ran"))
    h, hr, params = _mlp_case()
    with torch.inference_mode():
        ops.add_layer_norm_linear(h, hr, *params[:4])
        ops.layer_norm_mlp(h, hr, *params)


def test_linear_gelu_without_onednn_is_torchs(monkeypatch):
    monkeypatch.setattr(onednn, "supports", lambda *args: False)
    x, w, b = _linear_case()
    assert torch.equal(onednn.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(onednn.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    assert torch.equal(onednn.linear_gelu(x, w, b, "tanh"), F.gelu(F.linear(x, w, b), approximate="tanh"))


def test_supports_says_no_without_onednn(monkeypatch):
    onednn._supports.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        assert not onednn.supports(torch.float32) and not onednn.supports(torch.float32, None)
    finally:
        onednn._supports.cache_clear()


def _mlp_case(seed=0, d=64, hidden=256, residual=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 40, d, generator=gen)
    r = torch.randn(2, 40, d, generator=gen) if residual else None
    params = [torch.randn(d, generator=gen) * 0.1 + 1, torch.randn(d, generator=gen) * 0.1,
              torch.randn(hidden, d, generator=gen) / d ** 0.5, torch.randn(hidden, generator=gen),
              torch.randn(d, hidden, generator=gen) / hidden ** 0.5, torch.randn(d, generator=gen)]
    return h, r, params


def _mlp_reference(h, r, nw, nb, w1, b1, w2, b2):
    z = h if r is None else h + r
    return F.linear(F.gelu(F.linear(F.layer_norm(z, nw.shape, nw, nb, 1e-6), w1, b1)), w2, b2), z


def _onednn_weights(fn):
    """fn()'s result and the (out, in) weight shapes of the oneDNN GEMMs it ran, in order (seen by the profiler)."""
    for dtype in (torch.float32, torch.bfloat16):
        for approximate in (None, "none", "tanh"):
            onednn.supports(dtype, approximate)  # its one-time check runs the GEMM too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    return out, [tuple(e.input_shapes[1]) for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]


def _fused_gemms(fn):
    """fn()'s result and how many oneDNN GEMMs with a fused epilogue it ran."""
    out, weights = _onednn_weights(fn)
    return out, len(weights)


@needs_onednn
@pytest.mark.parametrize("residual", [True, False])
def test_layer_norm_mlp_inference_matches_torch_math(residual, fused_wins):
    h, r, params = _mlp_case(residual=residual)
    with torch.inference_mode():
        (out, z), weights = _onednn_weights(lambda: ops.layer_norm_mlp(h, r, *params))
    want, want_z = _mlp_reference(h, r, *params)
    assert weights == [(256, 64), (64, 256)]  # fc1 with its GELU, fc2 with its bias
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, want_z)


def test_layer_norm_mlp_with_autograd_is_the_two_op_path():
    """Where autograd records, the fused epilogue (which has no backward) is not used: outputs and gradients are
    those of add_layer_norm_linear + bias_gelu_linear, bit for bit."""
    h, r, params = _mlp_case()
    leaves = [t.clone().requires_grad_() for t in (h, r, *params)]
    (out, z), fused = _fused_gemms(lambda: ops.layer_norm_mlp(*leaves))
    (out.square().sum() + z.sum()).backward()
    twins = [t.clone().requires_grad_() for t in (h, r, *params)]
    hidden, z2 = ops.add_layer_norm_linear(*twins[:6])
    out2 = ops.bias_gelu_linear(hidden, None, twins[6], twins[7])
    (out2.square().sum() + z2.sum()).backward()
    assert fused == 0
    assert torch.equal(out, out2) and torch.equal(z, z2)
    for a, b in zip(leaves, twins):
        assert torch.equal(a.grad, b.grad)


@needs_bf16
@pytest.mark.parametrize("cfg", [{}, dict(class_token=False, global_pool="avg", mlp_ratio=2.0)],
                         ids=["default", "avg-pool"])
def test_model_inference_matches_timm(cfg, fused_wins):
    """The model's eval forward takes the fused MLP in inference and still gives timm's output: in fp32 to
    rounding, under bf16 autocast within twice timm's own error against fp64 math."""
    model, ref = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10, **cfg)
    x = torch.randn(32, 3, 32, 32)
    hidden = int(64 * cfg.get("mlp_ratio", 4))
    with torch.inference_mode():
        out, weights = _onednn_weights(lambda: model(x))
        assert weights == [(192, 64), (hidden, 64), (64, hidden)] * 2  # qkv, fc1 + GELU, fc2 in each block
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
        want = ref.double()(x.double())
        ref.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (low, weights), timms = _onednn_weights(lambda: model(x)), ref(x)
    # in bf16 a product is a candidate from rows >= 4x its input width (worth_fusing): 512-544 rows leave out fc2
    # from 256 inputs, not from 128
    assert weights == ([(192, 64), (hidden, 64)] + [(64, hidden)] * (hidden == 128)) * 2
    ours, theirs = ((o.double() - want).abs().max().item() for o in (low, timms))
    assert ours <= 2 * theirs, (ours, theirs)


def test_torchscript_trace_keeps_plain_aten_ops():
    """A TorchScript trace (legacy ONNX export traces this way) records the unfused MLP: ONNX has no oneDNN op."""
    model, _ = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=10)
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert "_linear_pointwise" not in str(traced.graph)
        torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=1e-5)
