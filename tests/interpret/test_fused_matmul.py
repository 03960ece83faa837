"""The fused-prologue/epilogue GEMMs (kernels/ln_matmul.py, gelu_matmul.py, matmul_residual.py) under
TRITON_INTERPRET=1: outputs and every gradient against torch in fp64 on the same inputs, within 2x the error of
torch's own math in the same dtype (fp32, fp16, and fp16 autocast over fp32 weights), at tiny shapes whose K and N
are not multiples of the tiles (K 80 and 96 against K steps of 32/64, N 48 and 160 against 64/128-wide tiles),
with both GEMM kernels (one program per tile; persistent with TMA descriptors, which the interpreter emulates).
bf16 only for the statistics pass, which has no tl.dot (the interpreter computes bf16 dots wrongly)."""
import pytest
import torch

from fastvit.kernels import layer_norm, matmul
from fastvit.kernels.gelu_matmul import gelu_matmul, gelu_matmul_ref
from fastvit.kernels.ln_matmul import ln_matmul, ln_matmul_ref
from fastvit.kernels.matmul import fused_matmul
from fastvit.kernels.matmul_residual import matmul_residual, matmul_residual_ref

EPS = 1e-6


def _tensors(shapes, seed):
    """Random tensors scaled like a ViT's: activations ~N(0.1, 1), LayerNorm weight ~1, the rest small."""
    g = torch.Generator().manual_seed(seed)
    scale = {"x": 1.0, "residual": 2.0, "norm_weight": 0.2, "norm_bias": 0.2, "weight": 0.1, "bias": 0.1,
             "b1": 0.5}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * scale[name] + (0.1 if name == "x" else 0.0)
        out[name] = t + 1 if name == "norm_weight" else t
    return out


def _grads(fn, inputs, dtypes, upstream):
    """fn's outputs and the gradients of sum(out_i * upstream_i) for inputs cast to ``dtypes`` (name -> dtype)."""
    leaves = {k: v.to(dtypes.get(k, dtypes["*"])).requires_grad_() for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, list(leaves.values()), [u.to(o.dtype) for o, u in zip(outs, upstream)])
    return [o.detach() for o in outs] + list(grads)


def _check(ours, low, ref, names, dtype):
    """Each tensor of ``ours`` is within 2x the max abs error of ``low`` (torch in the same dtype) against ``ref``
    (fp64), plus an ulp of the reference's largest value for tensors torch gets exactly."""
    assert len(ours) == len(low) == len(ref) == len(names)
    for name, a, t, e in zip(names, ours, low, ref):
        assert a.shape == e.shape, name
        err = (a.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        ulp = torch.finfo(dtype).eps * e.abs().max().item()
        assert err <= 2 * torch_err + ulp, (name, err, torch_err)


def _compare(fn, ref_fn, inputs, dtypes, out_shapes, names, dtype, autocast=False):
    gen = torch.Generator().manual_seed(7)
    upstream = [torch.randn(s, generator=gen).to(dtype).float() for s in out_shapes]  # representable in dtype
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        ours = _grads(fn, inputs, dtypes, upstream)
        low = _grads(ref_fn, inputs, dtypes, upstream)
    ref = _grads(ref_fn, inputs, {"*": torch.float64}, upstream)
    _check(ours, low, ref, names, dtype)
    return ours


LN_CASES = [  # rows, K, N, residual ("none", "act" or "fp32": the residual stream kept in fp32), linear bias
    (40, 96, 160, "act", True),
    (40, 80, 48, "none", False),
    (40, 64, 160, "fp32", True),
    (25, 96, 48, "act", False),
]


def _ln_call(residual_mode, tma=False):
    def fn(x, norm_weight, norm_bias, weight, residual=None, bias=None):
        return ln_matmul(x, residual, norm_weight, norm_bias, weight, bias, EPS, residual_mode == "fp32", True, tma)

    def ref(x, norm_weight, norm_bias, weight, residual=None, bias=None):
        return ln_matmul_ref(x, residual, norm_weight, norm_bias, weight, bias, EPS, residual_mode == "fp32")
    return fn, ref


def _ln_inputs(rows, k, n, residual_mode, with_bias, seed=0):
    shapes = {"x": (rows, k), "norm_weight": (k,), "norm_bias": (k,), "weight": (n, k)}
    if residual_mode != "none":
        shapes["residual"] = (rows, k)
    if with_bias:
        shapes["bias"] = (n,)
    return _tensors(shapes, seed)


def _ln_names(inputs):
    return ["out", "new_residual"] + [f"d{k}" for k in inputs]


@pytest.fixture(params=[False, True], ids=["tiles", "tma"])
def tma(request, monkeypatch):
    """Which GEMM kernel runs; fails a test where the TMA kernel was asked for but the other one ran."""
    launched = []
    real = matmul._fused_matmul_tma_kernel
    monkeypatch.setattr(matmul, "_fused_matmul_tma_kernel", _Recording(real, launched))
    yield request.param
    assert bool(launched) == request.param


class _Recording:
    """A kernel that notes each launch (``kernel[grid](...)``)."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        self.launched.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,k,n,residual_mode,with_bias", LN_CASES)
def test_ln_matmul(dtype, rows, k, n, residual_mode, with_bias, tma):
    inputs = _ln_inputs(rows, k, n, residual_mode, with_bias)
    fn, ref = _ln_call(residual_mode, tma)
    _compare(fn, ref, inputs, {"*": dtype}, [(rows, n), (rows, k)], _ln_names(inputs), dtype)


def test_ln_matmul_under_fp16_autocast():
    """fp32 activations and parameters under autocast: the GEMM runs in fp16 as F.linear's would, the residual
    stays fp32, and every gradient is within 2x of the autocast torch path's error."""
    inputs = _ln_inputs(40, 96, 160, "act", True)
    fn, ref = _ln_call("act")
    ours = _compare(fn, ref, inputs, {"*": torch.float32}, [(40, 160), (40, 96)], _ln_names(inputs), torch.float16,
                    autocast=True)
    assert ours[0].dtype == torch.float16 and ours[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in ours[2:])


def test_ln_matmul_saves_what_add_layer_norm_linear_saves():
    """The fused forward keeps the same tensors for backward as the unfused one: new_residual, the LayerNorm
    parameters, mean, rstd and W (no LayerNorm output)."""
    inputs = _ln_inputs(40, 96, 160, "act", True)
    found = []
    for fused in (True, False):
        leaves = {k: v.half().requires_grad_() for k, v in inputs.items()}
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn = ln_matmul if fused else layer_norm.add_layer_norm_linear
            fn(leaves["x"], leaves["residual"], leaves["norm_weight"], leaves["norm_bias"], leaves["weight"],
               leaves["bias"], EPS, False, True)
        found.append([(tuple(t.shape), t.dtype) for t in saved])
    assert found[0] == found[1]
    assert found[0] == [((40, 96), torch.float16), ((96,), torch.float16), ((96,), torch.float16),
                        ((40, 1), torch.float32), ((40, 1), torch.float32), ((160, 96), torch.float16)]


GELU_CASES = [(40, 96, 48, True), (40, 80, 160, True), (33, 64, 48, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,k,n,with_b1", GELU_CASES)
def test_gelu_matmul(dtype, rows, k, n, with_b1, tma):
    shapes = {"x": (rows, k), "weight": (n, k), "bias": (n,)}
    if with_b1:
        shapes["b1"] = (k,)
    inputs = _tensors(shapes, 1)

    def fn(x, weight, bias, b1=None):
        return gelu_matmul(x, b1, weight, bias, True, tma=tma)

    def ref(x, weight, bias, b1=None):
        return gelu_matmul_ref(x, b1, weight, bias)
    _compare(fn, ref, inputs, {"*": dtype}, [(rows, n)], ["out"] + [f"d{k}" for k in inputs], dtype)


@pytest.mark.parametrize("approximate", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_matmul_approximations(dtype, approximate, tma):
    """SigLIP's tanh GELU and CLIP's quick GELU in the GEMM's prologue, with and without b1."""
    for rows, k, n, with_b1 in GELU_CASES[1:]:
        shapes = {"x": (rows, k), "weight": (n, k), "bias": (n,), **({"b1": (k,)} if with_b1 else {})}
        inputs = _tensors(shapes, 3)

        def fn(x, weight, bias, b1=None):
            return gelu_matmul(x, b1, weight, bias, True, approximate, tma)

        def ref(x, weight, bias, b1=None):
            return gelu_matmul_ref(x, b1, weight, bias, approximate)
        _compare(fn, ref, inputs, {"*": dtype}, [(rows, n)], ["out"] + [f"d{k}" for k in inputs], dtype)


def test_gelu_matmul_under_fp16_autocast():
    inputs = _tensors({"x": (40, 96), "weight": (48, 96), "bias": (48,), "b1": (96,)}, 2)

    def fn(x, weight, bias, b1):
        return gelu_matmul(x.half(), b1, weight, bias, True)  # the fc1 output reaches fc2 in fp16 under autocast

    def ref(x, weight, bias, b1):
        return gelu_matmul_ref(x.half(), b1, weight, bias)
    _compare(fn, ref, inputs, {"*": torch.float32}, [(40, 48)], ["out", "dx", "dweight", "dbias", "db1"],
             torch.float16, autocast=True)


RESIDUAL_CASES = [(40, 96, 48, "act", True), (40, 80, 160, "fp32", True), (40, 64, 48, "act", False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,k,n,residual_mode,with_bias", RESIDUAL_CASES)
def test_matmul_residual(dtype, rows, k, n, residual_mode, with_bias, tma):
    shapes = {"x": (rows, k), "weight": (n, k), "residual": (rows, n)}
    if with_bias:
        shapes["bias"] = (n,)
    inputs = _tensors(shapes, 3)

    def fn(x, weight, residual, bias=None):
        return matmul_residual(x, weight, bias, residual, True, tma)

    def ref(x, weight, residual, bias=None):
        return matmul_residual_ref(x, weight, bias, residual)
    dtypes = {"*": dtype, "residual": torch.float32 if residual_mode == "fp32" else dtype}
    ours = _compare(fn, ref, inputs, dtypes, [(rows, n)], ["out"] + [f"d{k}" for k in inputs], dtype)
    assert ours[0].dtype == dtypes["residual"]


def test_many_row_blocks_and_empty_inputs(tma):
    """600 rows: ten 64-row blocks, so the grouped tile order covers a full group of 8 and a partial one (the
    persistent kernel: 4 programs, as for CPU tensors, walking 30 tiles); and no rows at all."""
    inputs = _tensors({"x": (600, 40), "weight": (132, 40), "bias": (132,), "residual": (600, 132)}, 4)
    out = fused_matmul(inputs["x"], inputs["weight"], torch.float32, inputs["bias"], inputs["residual"], tma=tma)
    want = inputs["x"].double() @ inputs["weight"].double().T + inputs["bias"].double() + inputs["residual"].double()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    empty = _ln_inputs(0, 96, 48, "act", True)
    leaves = {k: v.requires_grad_() for k, v in empty.items()}
    out, res = ln_matmul(leaves["x"], leaves["residual"], leaves["norm_weight"], leaves["norm_bias"],
                         leaves["weight"], leaves["bias"], EPS, False, True, tma)
    assert out.shape == (0, 48) and res.shape == (0, 96)
    (out.sum() + res.sum()).backward()
    assert leaves["weight"].grad.abs().sum() == 0


@pytest.mark.parametrize("residual_mode", ["none", "act", "fp32"])
def test_statistics_pass_bf16(residual_mode):
    """The add_layer_norm kernel without its output (what ln_matmul runs first) in bf16: the stored sum is the
    bf16 sum within one bf16 ulp (the interpreter truncates instead of rounding), and mean / rstd are those of the
    stored sum."""
    inputs = _ln_inputs(37, 768, 16, residual_mode, False, seed=5)
    x = inputs["x"].bfloat16()
    r = inputs["residual"].bfloat16() if residual_mode != "none" else None
    _, res, mean, rstd = layer_norm.launch_add_layer_norm(x, r, inputs["norm_weight"], inputs["norm_bias"], EPS,
                                                       residual_mode == "fp32")
    want = x.float() if r is None else x.float() + r.float()
    if residual_mode == "none":
        assert res.numel() == 0
        stored = x.double()
    else:
        assert res.dtype == (torch.float32 if residual_mode == "fp32" else torch.bfloat16)
        torch.testing.assert_close(res.float(), want, atol=0, rtol=2 ** -7)
        stored = res.double()
    torch.testing.assert_close(mean.double(), stored.mean(1, keepdim=True), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), 1 / (stored.var(1, unbiased=False, keepdim=True) + EPS).sqrt(), atol=0,
                               rtol=1e-5)


def test_strided_inputs():
    """x a column slice (row stride > K), W a transposed view and biases every other element of a longer tensor,
    for each op; matches torch."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 112, generator=g)[:, 8:88]
    r = torch.randn(40, 80, generator=g)
    w = (0.1 * torch.randn(80, 48, generator=g)).t()
    b = torch.randn(96, generator=g)[::2]
    b1 = torch.randn(160, generator=g)[::2]
    nw, nb = 1 + 0.1 * torch.randn(80, generator=g), 0.1 * torch.randn(80, generator=g)
    got, want = ln_matmul(x, r, nw, nb, w, b, EPS, False, True), ln_matmul_ref(x, r, nw, nb, w, b, EPS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gelu_matmul(x, b1, w, b, True), gelu_matmul_ref(x, b1, w, b), atol=1e-5, rtol=1e-5)
    res = torch.randn(48, 40, generator=g).t()
    torch.testing.assert_close(matmul_residual(x, w, b, res, True), matmul_residual_ref(x, w, b, res), atol=1e-5,
                               rtol=1e-5)


def test_tma_needs_aligned_rows():
    """The TMA kernel needs 16-byte aligned row strides: fp16 rows of 36 elements (72 bytes) take the other kernel,
    with the same result."""
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(20, 36, generator=g).half(), (0.1 * torch.randn(24, 36, generator=g)).half()
    assert not matmul.tma_supported(x, w, torch.float16)
    assert matmul.tma_supported(x[:, :32].contiguous(), w[:, :32].contiguous(), torch.float16)
    torch.testing.assert_close(fused_matmul(x, w, torch.float16, tma=True), fused_matmul(x, w, torch.float16),
                               atol=0, rtol=0)
