"""fastvit.kernels._gemm: the fallbacks' GEMMs in fp32 on a CPU that emulates bf16 / fp16 GEMMs, against torch's own
low-precision products (F.linear under autocast) and timm; forced on and off with monkeypatch, so both paths run
on any CPU."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _helpers import compile_capturing_graphs, images, timm_pair
from fastvit import ops
from fastvit.kernels import _gemm
from fastvit.memory import saved_activation_bytes

LOW = (torch.bfloat16, torch.float16)
GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.convolution}


@pytest.fixture
def emulated(monkeypatch):
    """``emulated(True)``: this CPU counts as emulating bf16 and fp16 GEMMs; ``emulated(False)``: as native."""
    return lambda on: monkeypatch.setattr(_gemm, "EMULATED", frozenset(LOW) if on else frozenset())


def _case(shape=(4, 33, 96), out=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen), torch.randn(out, shape[-1], generator=gen) / shape[-1] ** 0.5,
            torch.randn(out, generator=gen))


def _assert_same_product(got, want, dtype=None):
    """Equal up to summation order: want's dtype, nearly all elements bitwise equal, the rest within one rounding
    step of the product's dtype (``dtype``, else want's)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got == want).float().mean() > 0.99
    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype or want.dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_linear_under_autocast_gives_torchs_low_precision_product(emulated, dtype):
    x, w, b = _case()
    emulated(True)
    with torch.autocast("cpu", dtype=dtype):
        got = _gemm.linear(x, w, b)
        want = F.linear(x, w, b)
    _assert_same_product(got, want)


@pytest.mark.parametrize("dtype", LOW)
def test_linear_and_matmul_without_autocast(emulated, dtype):
    x, w, b = (t.to(dtype) for t in _case())
    emulated(True)
    _assert_same_product(_gemm.linear(x, w, b), F.linear(x, w, b))
    _assert_same_product(_gemm.matmul(x, w.t()), x @ w.t())
    for f in (_gemm.linear, ops.linear):  # mixed dtypes fail as in F.linear, not silently run in fp32
        with pytest.raises(RuntimeError):
            f(x, w.float(), b)


def test_native_and_fp32_paths_leave_other_products_alone(emulated):
    x, w, b = _case()
    emulated(True)
    assert torch.equal(_gemm.linear(x, w, b), F.linear(x, w, b))  # fp32: F.linear itself
    assert not _gemm.in_fp32(x.to("meta"), torch.bfloat16)


def test_linear_fn_gradients_match_autocast_linear(emulated):
    """ops.linear (LinearFn) against F.linear under bf16 autocast: output, dx, dW, db; an fp32 input keeps an fp32
    gradient, as autocast's cast gives it."""
    x, w, b = _case()
    dout = torch.randn(4, 33, 160, generator=torch.Generator().manual_seed(3)).bfloat16()
    results = []
    for on in (True, False):
        emulated(on)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.linear(*leaves)
        out.backward(dout)
        results.append([out, *(t.grad for t in leaves)])
    for got, want in zip(*results):
        _assert_same_product(got, want, torch.bfloat16)


class GemmDtypes(TorchDispatchMode):
    """Records the dtype of every GEMM / convolution that runs under it (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _step(model, x, train):
    """Logits and, in training, the gradients of every parameter, under bf16 autocast."""
    model.train(train)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        out = model(x)
    if not train:
        return [out]
    out.float().square().mean().backward()
    return [out, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("train", [False, True])
def test_model_runs_every_gemm_in_fp32_and_matches_timm(emulated, train):
    """With the CPU counted as emulating bf16, no GEMM of a bf16-autocast forward (or backward) of the model runs
    in bf16, and logits and gradients are those of the native path and of timm's bf16 model."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    model, ref = timm_pair(**cfg)
    x = images(8)
    runs = {}
    for on in (True, False):
        emulated(on)
        with GemmDtypes() as seen:
            runs[on] = _step(model, x, train)
        assert seen.dtypes and (set(seen.dtypes) == {torch.float32} if on else torch.bfloat16 in seen.dtypes)
    timm_run = _step(ref, x, train)
    for fp32, native, theirs in zip(runs[True], runs[False], timm_run):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(fp32.float(), native.float(), rtol=0, atol=0.02 * scale)
        torch.testing.assert_close(fp32.float(), theirs.float(), rtol=0, atol=0.02 * scale)


@pytest.mark.parametrize("dtype", LOW)
def test_an_empty_batch_runs_on_the_fp32_path(emulated, dtype):
    """A batch of 0 images in a 16-bit model: the patch matrix of the fp32 product has no size to infer from."""
    emulated(True)
    model, _ = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        assert model.to(dtype)(images(0).to(dtype)).shape == (0, 10)


def test_saved_activations_do_not_depend_on_the_path(emulated):
    model, _ = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    sizes = []
    for on in (True, False):
        emulated(on)
        sizes.append(saved_activation_bytes(model, images(4)))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("value, want", [("native", frozenset()), ("fp32", frozenset(LOW))])
def test_environment_variable_chooses(monkeypatch, value, want):
    monkeypatch.setenv("FASTVIT_CPU_LOWP_GEMM", value)
    assert _gemm._emulated_dtypes() == want
    monkeypatch.setenv("FASTVIT_CPU_LOWP_GEMM", "bf16")
    with pytest.raises(ValueError, match="auto, native or fp32"):
        _gemm._emulated_dtypes()


def test_compiled_training_step_matches_eager(emulated):
    """Under torch.compile (one graph) the fp32 products are traced like any torch code: logits and gradients of a
    bf16-autocast training step agree with eager's."""
    emulated(True)
    model, _ = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    x = images(8)
    eager = _step(model, x, True)
    compiled = _step(torch.compile(model, fullgraph=True), x, True)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.02 * want.abs().max().item())


def _graph_gemm_dtypes(graphs):
    """The output dtype of every GEMM node in FX graphs (from the fake tensor AOTAutograd recorded)."""
    return [node.meta["val"].dtype for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in GEMMS]


def test_compiled_training_keeps_the_fp32_products(emulated):
    """The graphs torch.compile gives inductor for a bf16-autocast training step hold fp32 GEMMs only, in the
    backward too: AOTAutograd traces a Function's backward under the forward's autocast, which cast the backward's
    fp32 products back to bf16 (a compiled step was then 5x slower than eager on an AVX2 CPU)."""
    emulated(True)
    model, _ = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    graphs = []
    torch._dynamo.reset()  # a fresh compile: earlier tests' frames would make it a dynamic-shape recompile
    _step(compile_capturing_graphs(model, graphs), images(8), True)
    assert len(graphs) == 2  # forward and backward
    forward, backward = (_graph_gemm_dtypes([g]) for g in graphs)
    assert forward and backward and set(forward + backward) == {torch.float32}
