"""The kernels' host path (fastvit.kernels._launch): after a kernel's first launch, ``launch`` calls the compiled
kernel exactly as Triton's own ``JITFunction.run`` does, at every launch site of every op; the ops skip the
dispatcher only in plain eager mode and give the same results either way. Launches run on CPU tensors through
bench/overhead.py's stub (Triton's host path up to the driver call, nothing launched)."""
import importlib.util
import pathlib

import pytest
import torch
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import JITFunction

from _helpers import compile_capturing_graphs, graph_calls, route_launches
from fastvit.kernels import _launch
from fastvit.kernels import layer_norm

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_overhead():
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "bench" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


overhead = _load_overhead()


def _normalised(args):
    """A launch's arguments with tensors replaced by what a kernel sees of them (tensors differ between calls)."""
    return [(t.dtype, tuple(t.shape), t.stride(), t.data_ptr() % 16) if isinstance(t, torch.Tensor) else t
            for t in args]


@pytest.mark.parametrize("case", overhead.tiny_cases(), ids=lambda c: c["op"])
def test_cached_launch_matches_tritons_own(monkeypatch, case):
    """Two identical forward + backward calls of each op with its Triton path: the first launches each kernel
    variant through JITFunction.run, the second only through ``launch``'s cache, with the same arguments."""
    runs = []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: runs.append(self) or real_run(self, *a, **k))
    monkeypatch.setattr(_launch, "_COMPILED", {})
    recorded, per_call = [], []
    monkeypatch.setattr(overhead._NoLaunch, "run", lambda self, *args: recorded.append(args))
    with overhead.stubbed_launches(), overhead.triton_on_cpu_tensors():
        for _ in range(2):
            inputs = {k: v.clone().requires_grad_(k in case["grads"]) for k, v in case["inputs"].items()}
            outs = case["fastvit"](inputs, "triton")
            torch.autograd.grad(outs, [inputs[k] for k in case["grads"]], [torch.ones_like(o) for o in outs])
            per_call.append((len(recorded), len(runs)))
    (launches, triton_runs), (total, total_runs) = per_call
    assert triton_runs > 0 and total_runs == triton_runs and total == 2 * launches
    for a, b in zip(recorded[:launches], recorded[launches:]):
        assert _normalised(a) == _normalised(b)


def _ln_args(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    return [t.to(device) for t in (x, r, w, b)] + [1e-6, False, False]


def test_ops_skip_the_dispatcher_only_in_plain_eager(monkeypatch):
    op = layer_norm.add_layer_norm_fwd
    dispatched = []
    real = op.overload
    monkeypatch.setattr(op, "overload", lambda *a: dispatched.append(1) or real(*a))
    args = _ln_args()
    direct = op(*args)
    assert dispatched == []
    for expected, out in zip(real(*args), direct):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with torch.profiler.profile() as prof:  # the profiler names the op
        op(*args)
    assert len(dispatched) == 1 and any(e.name == "fastvit::add_layer_norm_fwd" for e in prof.events())
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert op(*fake)[0].shape == (6, 32)
    meta = op(*_ln_args("meta"))
    assert len(dispatched) == 3 and meta[0].is_meta
    with torch.no_grad():
        op(torch.nn.Parameter(args[0]), *args[1:])  # a Parameter is a plain tensor
    assert len(dispatched) == 3


@pytest.mark.parametrize("case", overhead.tiny_cases(), ids=lambda c: c["op"])
def test_compile_sees_every_kernel(monkeypatch, case):
    """Under torch.compile each op decomposes into its kernels (triton_op + wrap_triton): the graphs inductor
    gets launch, as Triton kernels it schedules, the kernels an eager forward + backward launches, and hold no
    opaque fastvit op. Each op names those kernels to torch (whose compile cache hashes their sources)."""
    launched, ops_called = [], []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: launched.append(self.fn.__name__)
                        or real_run(self, *a, **k))
    real_call = _launch.EagerOp.__call__
    monkeypatch.setattr(_launch.EagerOp, "__call__", lambda self, *a: ops_called.append(self.overload._name)
                        or real_call(self, *a))
    monkeypatch.setattr(_launch, "_COMPILED", {})
    graphs = []
    with overhead.stubbed_launches(), overhead.triton_on_cpu_tensors():
        def run(f):
            inputs = {k: v.clone().requires_grad_(k in case["grads"]) for k, v in case["inputs"].items()}
            outs = f(*inputs.values())
            torch.autograd.grad(outs, [inputs[k] for k in case["grads"]], [torch.ones_like(o) for o in outs])

        names = list(case["inputs"])
        run(lambda *vals: case["fastvit"](dict(zip(names, vals)), "triton"))
        eager = set(launched)
        monkeypatch.setattr(_launch.EagerOp, "__call__", real_call)  # dynamo would trace the recording
        torch._dynamo.reset()
        run(compile_capturing_graphs(lambda *vals: case["fastvit"](dict(zip(names, vals)), "triton"), graphs))
    kernels, ours = graph_calls(graphs)
    assert eager and set(kernels) == eager and ours == []
    named = {k.fn.__name__ for op in ops_called for k in get_triton_kernels_for_op(op)}
    assert eager <= named


def test_launch_key_separates_what_tritons_binder_separates(monkeypatch):
    """A launch found in ``launch``'s cache runs the variant Triton's own binder would pick: arguments that differ
    in dtype, 16-byte alignment, an int that is 1 or a multiple of 16 (or not), or a bool passed for an int each get
    their own compiled kernel, identical to the one ``kernel[grid]`` returns for them."""
    monkeypatch.setattr(_launch, "_COMPILED", {})
    kernel = layer_norm._add_ln_fwd_kernel
    flags = dict(HAS_RESIDUAL=True, STORE_RESIDUAL=True, STORE_Y=True, BLOCK=32, num_warps=1, num_stages=3)

    def args(dtype=torch.float32, offset=0, stride=32, n_cols=32):
        buf = torch.zeros(6 * 32 + offset, dtype=dtype)
        x = buf[offset:].view(6, 32)
        return (x, x, torch.ones(32), torch.zeros(32), x, x, torch.empty(6), torch.empty(6),
                stride, stride, stride, stride, n_cols, 1e-6)

    variants = [args(), args(torch.float16), args(offset=1), args(stride=1), args(stride=17), args(n_cols=1),
                args(n_cols=True)]
    with overhead.stubbed_launches():
        expected = [kernel[(6,)](*a, **flags) for a in variants]
        assert len({id(k) for k in expected}) == len(variants)  # Triton's binder tells them all apart
        for a, want in zip(variants, expected):
            _launch.launch(kernel, (6,), *a, **flags)  # through Triton: cached
            got, keyword_values = _launch._COMPILED[_launch._launch_key(kernel, 0, a, flags)]
            # the kernel's keyword parameters, in its signature order (num_warps, num_stages are launch options)
            assert got is want and keyword_values == (True, True, True, 32)


@pytest.mark.parametrize("case", overhead.tiny_cases(), ids=lambda c: c["op"])
def test_inference_skips_autograd_and_gives_the_same_outputs(monkeypatch, case):
    """Where autograd has nothing to record (no_grad, or no input requiring grad), an op applies no autograd
    Function (counted on the Triton path, where every op has one: it runs the op's forward body alone, or the
    Function's forward on a context that keeps nothing), with the outputs that recording it gives (compared on the
    torch fallbacks, which compute on CPU); an input requiring grad records it."""
    applied = []
    apply = vars(torch.autograd.Function)["apply"]

    def recording(cls, *args):
        applied.append(cls)
        return apply.__get__(None, cls)(*args)
    monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(recording))

    def run(backend, grads=False):
        inputs = {k: v.clone().requires_grad_(grads and k in case["grads"]) for k, v in case["inputs"].items()}
        return case["fastvit"](inputs, backend)

    with overhead.stubbed_launches(), overhead.triton_on_cpu_tensors():
        with torch.no_grad():
            run("triton")
        run("triton")
        assert not applied
        recorded = run("triton", grads=True)
        assert applied and all(o.grad_fn is not None for o in recorded)
    with torch.no_grad():
        fast = run("torch")
    for a, b in zip(fast, run("torch", grads=True)):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_launch_key_separates_tma_descriptors(monkeypatch):
    """Descriptor arguments (the persistent TMA GEMM's) specialise on their dtype and block shape: each variant gets
    the compiled kernel Triton's binder picks, and a launch with new descriptors of a seen variant reuses it."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    from fastvit.kernels import matmul
    monkeypatch.setattr(_launch, "_COMPILED", {})
    kernel = matmul._fused_matmul_tma_kernel
    flags = dict(PROLOGUE="none", HAS_BIAS=False, HAS_RESIDUAL=False, EVEN_K=True, APPROXIMATE="none",
                 PRECISION="ieee", BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, FLATTEN=matmul.FLATTEN, num_warps=4,
                 num_stages=3)

    def args(dtype=torch.float16, block_k=16):
        a, w, out = torch.zeros(64, 32, dtype=dtype), torch.zeros(48, 32, dtype=dtype), torch.zeros(64, 48)
        descs = (TensorDescriptor.from_tensor(a, [32, block_k]), TensorDescriptor.from_tensor(w, [32, block_k]),
                 TensorDescriptor.from_tensor(out, [32, 32]))
        return (*descs, *[out] * 6, 64, 48, 32, 0, 4)

    variants = [args(), args(torch.float32), args(block_k=32)]
    with overhead.stubbed_launches():
        expected = [kernel[(4,)](*a, **flags) for a in variants]
        assert len({id(k) for k in expected}) == len(variants)
        for a, want in zip(variants, expected):
            _launch.launch(kernel, (4,), *a, **flags)
            assert _launch._COMPILED[_launch._launch_key(kernel, 0, a, flags)][0] is want
        again = args()
        assert _launch._launch_key(kernel, 0, again, flags) == _launch._launch_key(kernel, 0, variants[0], flags)


@pytest.mark.parametrize("pos_embed", ["learn", "rel"])
def test_whole_model_on_the_kernel_path_compiles_in_one_graph_with_dynamic_shapes(monkeypatch, pos_embed):
    """A GPU's torch.compile path, traced on CPU with the launches stubbed (so only the graphs are checked, not
    numbers): a training step of the whole model with the Triton kernels traces in one forward and one backward
    graph, also with dynamic shapes, holds every kernel and no opaque fastvit op, and draws no warning from dynamo.
    Questions only a GPU run asks (is flash_attn installed, the device's compute capability, the attention kernel's
    tiles) are constants to dynamo, not traced: tracing the flash_attn import broke the graph at every attention
    call where the package is missing, and a cache around a parse drew a warning at every compile."""
    import warnings

    from fastvit.model import VisionTransformer
    monkeypatch.setattr(_launch, "_COMPILED", {})
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
                              pos_embed=pos_embed)
    graphs = []
    # backend "auto", as on a GPU: it runs the kernels on these CPU tensors (triton_on_cpu_tensors)
    with overhead.stubbed_launches() as launches, overhead.triton_on_cpu_tensors(), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch._dynamo.reset()
        compiled = compile_capturing_graphs(model, graphs, dynamic=True)
        for batch in (2, 3):
            compiled(torch.randn(batch, 3, 32, 32)).sum().backward()
    kernels, ours = graph_calls(graphs)
    assert len(graphs) % 2 == 0 and launches[0] > 0 and ours == []
    assert {"_patch_embed_fwd_kernel", "_add_ln_fwd_kernel", "_bias_gelu_fwd_kernel", "_attn_fwd_kernel",
            "_add_ln_bwd_kernel", "_attn_bwd_dq_kernel"} <= set(kernels)
    assert not [str(w.message) for w in caught if "dynamo" in str(w.message).lower()]


# the ops whose launchers keep plans (_launch.Plans); patch_embed launches through launch() at every call
PLANNED = [c for c in overhead.tiny_cases() if c["op"] in ("add_layer_norm", "bias_gelu", "attention")]


def _spy_launches(monkeypatch):
    """(calls of launch() by the plans, arguments the stubbed driver got): two lists filled as the ops run."""
    through_launch, launched = [], []
    route_launches(monkeypatch, lambda real, kernel, *a, **k: through_launch.append(kernel) or real(kernel, *a, **k))
    monkeypatch.setattr(overhead._NoLaunch, "run", lambda self, *args: launched.append(args))
    return through_launch, launched


def _forward_backward(case, backend="triton"):
    inputs = {k: v.clone().requires_grad_(k in case["grads"]) for k, v in case["inputs"].items()}
    outs = case["fastvit"](inputs, backend)
    torch.autograd.grad(outs, [inputs[k] for k in case["grads"]], [torch.ones_like(o) for o in outs])


@pytest.mark.parametrize("case", PLANNED, ids=lambda c: c["op"])
def test_a_planned_call_skips_launch_and_passes_the_same_arguments(monkeypatch, case):
    """After a first forward + backward, the same call again launches every kernel from its plan's bound launch
    (launch() is not called at all) with the arguments the first call's launches passed, and gives the plain
    eager results; under no_grad too."""
    through_launch, launched = _spy_launches(monkeypatch)
    with overhead.stubbed_launches(), overhead.triton_on_cpu_tensors():
        _forward_backward(case)
        first, n = list(launched), len(through_launch)
        assert n == len(first) > 0
        _forward_backward(case)
        assert len(through_launch) == n and len(launched) == 2 * n
        for a, b in zip(first, launched[n:]):
            assert _normalised(a) == _normalised(b)
        with torch.no_grad():  # inference's own plans (add_layer_norm keeps no statistics), then bound launches
            case["fastvit"](dict(case["inputs"]), "triton")
            planned = len(through_launch)
            case["fastvit"](dict(case["inputs"]), "triton")
        assert len(through_launch) == planned


def test_a_new_signature_gets_its_own_plan(monkeypatch):
    """add_layer_norm with another row count, dtype, eps, or without the residual: each goes through launch() once
    (its own plan), with the arguments Triton's binder takes for it, then through its plan."""
    from fastvit import ops
    through_launch, launched = _spy_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)

    def call(rows=5, dtype=torch.float32, eps=1e-6, residual=True):
        x = torch.randn(1, rows, 64, generator=g).to(dtype)
        r = torch.randn(1, rows, 64, generator=g).to(dtype) if residual else None
        with torch.no_grad():
            return ops.add_layer_norm(x, r, torch.ones(64), torch.zeros(64), eps, backend="triton")

    variants = [{}, dict(rows=7), dict(dtype=torch.float16), dict(eps=1e-5), dict(residual=False)]
    with overhead.stubbed_launches(), overhead.triton_on_cpu_tensors():
        for kwargs in variants:
            before = len(through_launch)
            call(**kwargs)
            first = launched[-1]
            call(**kwargs)
            assert len(through_launch) == before + 1, kwargs  # the first call only
            assert _normalised(launched[-1]) == _normalised(first)
        # every variant's launch differs from the first one's in what it changes
        firsts = [_normalised(a) for a in launched[::2]]
        assert len({repr(a) for a in firsts}) == len(variants)


def test_an_unaligned_input_or_another_device_takes_the_launch_path(monkeypatch):
    """A plan's bound launch was compiled for 16-byte aligned inputs on one device: an input at an offset of 4
    bytes goes through launch() (Triton compiles its own variant), and so does a call while another device is
    current; the next aligned call on the first device takes the plan again."""
    from fastvit import ops
    through_launch, _ = _spy_launches(monkeypatch)
    compiled = []
    real_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: compiled.append(self) or real_run(self, *a, **k))
    buf = torch.randn(1 + 5 * 64)
    aligned, shifted = buf[:320].view(1, 5, 64), buf[1:].view(1, 5, 64)
    w, b = torch.ones(64), torch.zeros(64)

    def call(x):
        with torch.no_grad():
            ops.add_layer_norm(x, None, w, b, backend="triton")
    with overhead.stubbed_launches(), overhead.triton_on_cpu_tensors():
        call(aligned)
        call(aligned)
        assert len(through_launch) == 1 and len(compiled) == 1
        call(shifted)
        assert len(through_launch) == 2 and len(compiled) == 2  # a variant of its own
        call(aligned)
        assert len(through_launch) == 2
        monkeypatch.setattr(overhead._HostOnlyDriver, "get_current_device", lambda self: 1)
        call(aligned)
        assert len(through_launch) == 3


def test_a_fused_gemm_call_launches_from_its_plan(monkeypatch):
    """The fused GEMM's pointer-load kernel (with the LayerNorm prologue, as ``ln_matmul`` runs it on a GPU): a
    repeated call launches from its plan with the first call's arguments; the TMA kernel, whose descriptors hold
    the tensors' addresses, goes through launch() at every call."""
    from fastvit.kernels import matmul
    through_launch, launched = _spy_launches(monkeypatch)
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(5, 64, generator=g).half(), torch.randn(192, 64, generator=g).half()
    extras = dict(bias=torch.randn(192, generator=g), prologue="layer_norm", mean=torch.randn(5, generator=g),
                  rstd=torch.rand(5, generator=g), prologue_weight=torch.randn(64, generator=g),
                  prologue_bias=torch.randn(64, generator=g))
    with overhead.stubbed_launches():
        for _ in range(2):
            matmul.fused_matmul(a, w, torch.float16, **extras)
        assert through_launch == [matmul._fused_matmul_kernel] and len(launched) == 2
        assert _normalised(launched[0]) == _normalised(launched[1])
        monkeypatch.setattr(matmul, "tma_supported", lambda *args: True)
        for _ in range(2):
            matmul.fused_matmul(a, w, torch.float16, tma=True, **extras)
        assert through_launch[1:] == [matmul._fused_matmul_tma_kernel] * 2 and len(launched) == 4


def test_planned_attention_outputs_have_the_layout_the_fake_ops_promise():
    """The attention plans allocate from sizes worked out once per signature: out as a (B, heads, N, hd) view of a
    (B, N, heads, hd) buffer, lse (B, heads, N) fp32, and the packed backward's d qkv contiguous, as the ops' fake
    implementations (what torch.compile plans its graph on) say, in the first call and in the planned ones."""
    from fastvit.kernels import flash_attention as fa
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 3, 3, 16, generator=g)
    q, k, v = fa.split_qkv(qkv)
    args = (None, None, 0, 0, 0.25, 0.0, True)

    def layout(t):
        return tuple(t.shape), t.stride(), t.dtype

    with FakeTensorMode() as mode:
        fq, fk, fv, fqkv = (mode.from_tensor(t) for t in (q, k, v, qkv))
        fake_out, fake_lse = fa.attention_fwd(fq, fk, fv, *args)
        fake_dqkv = fa.attention_bwd_qkv(fake_out, fqkv, fake_out, fake_lse, *args)[0]
        expected = [layout(fake_out), layout(fake_lse), layout(fake_dqkv)]
    with overhead.stubbed_launches():
        for _ in range(2):  # the first call makes the plans, the second runs from them
            out, lse = fa.attention_fwd(q, k, v, *args)
            dqkv = fa.attention_bwd_qkv(out, qkv, out, lse, *args)[0]
            assert [layout(out), layout(lse), layout(dqkv)] == expected
    assert expected[0][1] == (7 * 3 * 16, 16, 3 * 16, 1) and expected[2][1] == qkv.stride()
