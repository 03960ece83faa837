"""The measured choice of attention implementation (fastvit.autotune): the fastest runnable one wins, once per
key, cached in memory and on disk; nothing is measured where it cannot be. Timings are injected (no GPU here); the
runners themselves run for real on CPU tensors that report is_cuda."""
import pytest
import torch

from _helpers import PretendCuda as _PretendCuda
from _helpers import tuner  # noqa: F401  (a fixture)

from fastvit import autotune, ops


def _timer(times, log):
    """A measure= that runs the runner once (so it must really work) and reports a planted time for it."""
    def measure(run):
        name = run.name
        log.append(name)
        run()
        return times[name]
    return measure


def _runners(ran):
    def make(name):
        def run():
            ran.append(name)
            if name == "broken":
                raise RuntimeError("cannot run this shape")
        run.name = name
        return run
    return make


def test_fastest_measures_once_then_uses_memory_and_disk(tuner):
    log, ran = [], []
    times = {"a": 3.0, "b": 1.0, "c": 2.0, "broken": 0.1}
    pick = autotune.fastest("op", 0, (("n", 197),), ["a", "b", "c", "broken"], _runners(ran), "a",
                            _timer(times, log))
    assert pick == "b" and sorted(log) == ["a", "b", "broken", "c"]
    assert autotune.fastest("op", 0, (("n", 197),), ["a", "b", "c"], _runners(ran), "a", _timer(times, log)) == "b"
    assert len(log) == 4  # no second measurement
    autotune.clear()  # a new process: the disk file answers
    assert autotune.fastest("op", 0, (("n", 197),), ["a", "b"], _runners(ran), "a", _timer(times, log)) == "b"
    assert len(log) == 4 and (tuner / "autotune.json").exists()
    # another shape is another key
    assert autotune.fastest("op", 0, (("n", 257),), ["a", "c"], _runners(ran), "a", _timer(times, log)) == "c"


def test_a_cached_winner_no_longer_available_is_measured_again(tuner):
    log = []
    autotune.fastest("op", 0, (), ["a", "b"], _runners([]), "a", _timer({"a": 2.0, "b": 1.0}, log))
    autotune.clear()
    assert autotune.fastest("op", 0, (), ["a", "c"], _runners([]), "a", _timer({"a": 2.0, "c": 3.0}, log)) == "a"


def test_without_measurement_the_default_is_used(tuner, monkeypatch):
    monkeypatch.setattr(autotune, "can_measure", lambda: False)
    assert autotune.fastest("op", 0, (), ["a", "b"], _runners([]), "dflt", _timer({}, [])) == "dflt"
    assert autotune.fastest("op", 0, (), ["broken"], _runners([]), "dflt", _timer({"broken": 1.0}, [])) == "dflt"


def test_a_settled_choice_is_answered_by_the_callers_key(tuner, monkeypatch):
    """fastest()'s winner for a call given with a call_key is then answered by settled(call_key), without the
    fields and runners; a default handed out while nothing can be measured is not settled; clear() forgets."""
    log, times = [], {"a": 2.0, "b": 1.0}
    monkeypatch.setattr(autotune, "can_measure", lambda: False)
    assert autotune.fastest("op", 0, (), ["a", "b"], _runners([]), "a", _timer(times, log), call_key=("k",)) == "a"
    assert autotune.settled(("k",)) is None and log == []
    monkeypatch.setattr(autotune, "can_measure", lambda: True)
    assert autotune.fastest("op", 0, (), ["a", "b"], _runners([]), "a", _timer(times, log), call_key=("k",)) == "b"
    assert autotune.settled(("k",)) == "b" and autotune.settled(("other",)) is None
    autotune.clear()
    assert autotune.settled(("k",)) is None
    # a new process: the disk file settles it, nothing measured
    assert autotune.fastest("op", 0, (), ["a", "b"], _runners([]), "a", _timer(times, log), call_key=("k",)) == "b"
    assert autotune.settled(("k",)) == "b" and len(log) == 2


def test_a_settled_attention_choice_skips_the_tuner_until_an_sdpa_switch_flips(tuner, monkeypatch):
    asked = []
    real = autotune.fastest
    monkeypatch.setattr(autotune, "fastest", lambda *args, **kw: asked.append(args[0]) or real(*args, **kw))
    monkeypatch.setattr(autotune, "time_cuda", lambda run: run() or 1.0)
    q, _, _ = _qkv()
    first = ops.attention_backend(q)
    assert ops.attention_backend(q) == first and asked == ["attention"]
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert ops.attention_backend(q) != "sdpa_flash" and len(asked) == 2  # another set of candidates
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert ops.attention_backend(q) == first and len(asked) == 2


def test_a_read_only_cache_dir_keeps_the_winner_in_memory(tuner, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(blocker / "sub"))  # cannot be created
    assert autotune.fastest("op", 0, (), ["a", "b"], _runners([]), "a", _timer({"a": 2.0, "b": 1.0}, [])) == "b"


def test_a_winner_timed_on_other_kernel_code_is_measured_again(tuner, monkeypatch):
    """A GPU timing holds for fastvit's kernel code as it was (``code_version`` in the environment): after an upgrade
    or a kernel change the old winner is not trusted but measured again; the same code reuses it."""
    log = []
    for code in ("fastvit-code:old", autotune.code_version(), autotune.code_version()):
        monkeypatch.setattr(autotune, "_environment", lambda index: ("Fake GPU", torch.__version__, "0", code))
        autotune.clear()  # a new process
        autotune.fastest("op", 0, (("n", 197),), ["a", "b"], _runners([]), "a", _timer({"a": 2.0, "b": 1.0}, log))
    assert log == ["a", "b", "a", "b"]  # measured for the old code, again for this code, then read from disk


def test_forget_other_code_keeps_this_codes_and_cpu_choices(tuner):
    """gpu_suite.sh starts with ``forget_other_code``: the results folder then lists only choices of the code it
    measures. Dropped: GPU winners of other code, and those from before timings named their code (3 fields)."""
    this = autotune.code_version()
    entries = {("ln", ("GPU", "2.11", "3.6")): "ln_gemm", ("ln", ("GPU", "2.11", "3.6", "fastvit-code:0ld")): "x",
               ("ln", ("GPU", "2.11", "3.6", this)): "ln+cublas", ("fc1", ("Xeon", "AVX512", 2, "2.14.1")): "onednn"}
    autotune._write_file({autotune.json.dumps([op, [], list(env)]): w for (op, env), w in entries.items()})
    assert autotune.forget_other_code() == 2
    kept = autotune.json.loads((tuner / "autotune.json").read_text())
    assert sorted(kept.values()) == ["ln+cublas", "onednn"]
    assert autotune.forget_other_code() == 0


def test_code_version_follows_the_kernels_source(monkeypatch, tmp_path):
    """The digest covers every kernel module (and ops.py): one changed line gives another version."""
    import shutil

    import fastvit.kernels
    source = autotune.pathlib.Path(fastvit.kernels.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fastvit.kernels, "__file__", str(copy / "__init__.py"))
    version = autotune.code_version.__wrapped__
    assert version() == autotune.code_version() and version().startswith(autotune.CODE_TAG)
    with open(copy / "gelu_matmul.py", "a") as f:
        f.write("# changed\n")
    assert version() != autotune.code_version()


def _qkv(requires_grad=False):
    qkv = torch.randn(2, 50, 3, 3, 64, requires_grad=requires_grad)
    return [t.as_subclass(_PretendCuda) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]


def test_auto_attention_runs_the_measured_winner(tuner, monkeypatch):
    """On a pretend GPU the real runners execute on CPU: cuDNN / efficient SDPA and Triton cannot run there and
    drop out; among those that can, the planted fastest wins and attention then runs it."""
    runs = []

    def measure(run):
        runs.append(run)
        run()
        return 1.0 / len(runs)  # the later a runnable candidate, the faster

    monkeypatch.setattr(autotune, "time_cuda", measure)
    q, k, v = _qkv()
    assert ops.attention_backend(q) == "torch"  # names order: sdpa_flash, sdpa_cudnn, ..., torch, triton
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.as_subclass(torch.Tensor) for t in (q, k, v)))
    torch.testing.assert_close(ops.attention(q, k, v).as_subclass(torch.Tensor), expected)
    # a training call is another key, measured with a backward pass
    q, k, v = _qkv(requires_grad=True)
    assert ops.attention_backend(q) == "torch"
    # per key: sdpa_flash and torch; sdpa_cudnn, sdpa_efficient and triton fail their agreement run (CPU tensors)
    assert len(runs) == 2 * 2


def test_auto_attention_leaves_out_the_sdpa_kernels_the_user_disabled(tuner, monkeypatch):
    """Inside sdpa_kernel(MATH) (e.g. for a double backward, which the fused SDPA kernels lack) or after
    enable_flash_sdp(False), the tuner neither measures nor runs the kernels turned off."""
    tried = []
    real = ops._run_attention
    monkeypatch.setattr(ops, "_run_attention", lambda impl, *args: tried.append(impl) or real(impl, *args))
    monkeypatch.setattr(autotune, "time_cuda", lambda run: run() or 1.0)
    q, k, v = _qkv()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert ops.attention_backend(q) == "torch"
    assert tried and not [impl for impl in tried if impl.startswith("sdpa")]
    tried.clear()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        ops.attention_backend(q)
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert "sdpa_efficient" in tried and "sdpa_flash" not in tried


def test_auto_attention_skips_a_kernel_that_disagrees(tuner, monkeypatch):
    """A candidate whose output differs from torch's SDPA (a kernel wrong on this GPU) is not timed, even if it
    would be fastest; a warning names it."""
    real = ops._run_attention

    def run(impl, *args):
        out = real(impl, *args)
        return out + 1.0 if impl == "sdpa_flash" else out
    monkeypatch.setattr(ops, "_run_attention", run)
    timed = []
    monkeypatch.setattr(autotune, "time_cuda", lambda fn: timed.append(fn) or {1: 1.0, 2: 2.0}[len(timed)])
    q, _, _ = _qkv()
    with pytest.warns(RuntimeWarning, match="'sdpa_flash' disagrees with the reference"):
        assert ops.attention_backend(q) == "torch"
    assert len(timed) == 1


def test_auto_keeps_the_static_rule_for_bias_compile_and_cpu(tuner, monkeypatch):
    monkeypatch.setattr(autotune, "time_cuda", lambda run: pytest.fail("nothing should be measured"))
    q, _, _ = _qkv()
    table = torch.zeros(3, 172)
    assert ops.attention_backend(q, rel_bias=table) == "triton"  # only ours takes the bias
    assert ops.attention_backend(torch.randn(2, 3, 50, 64)) == "torch"  # CPU
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.attention_backend(q) == "triton"  # nothing measured for this call: the static rule


def test_compile_takes_the_winner_eager_measured(tuner, monkeypatch):
    """While torch.compile traces nothing is timed, but the winner measured for the same call (by an eager call, in
    this process or the file) runs: compiled models took the static choice at every shape, our kernel also where
    eager ran cuDNN's and was faster. The choice is a constant to dynamo: a fullgraph compile traces through it."""
    q, _, _ = _qkv()
    call = (str(q.dtype), *q.shape, False, False, True, 0, None, None, "triton")
    fields, names = ops._attention_candidates(*call)
    assert "sdpa_cudnn" in names and "triton" in names
    times = {name: 1.0 if name == "sdpa_cudnn" else 2.0 for name in names}
    assert autotune.fastest("attention", 0, fields, names, lambda name: name, "triton", measure=times.get) == (
        "sdpa_cudnn")  # as an eager call on this GPU would have measured it
    autotune.clear()  # another process: the file answers
    monkeypatch.setattr(autotune, "time_cuda", lambda run: pytest.fail("nothing should be measured"))
    real = torch.compiler.is_compiling
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.attention_backend(q) == "sdpa_cudnn"
    monkeypatch.setattr(torch.compiler, "is_compiling", real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # dynamo itself asks CUDA questions otherwise
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def step(x):
        return x + 1 if ops._traced_attention_choice(*call) == "sdpa_cudnn" else x - 1
    assert torch.equal(step(torch.zeros(2)), torch.ones(2))
    other = (*call[:3], 197, *call[4:])  # a shape nobody measured: the static choice
    assert ops._traced_attention_choice(*other) == "triton"


def test_a_compiled_call_with_symbolic_sizes_takes_the_winner_for_its_shape(tuner, monkeypatch):
    """With dynamic shapes (dynamic=True, or a recompile for a new batch size) a call's sizes are symbolic, which
    dynamo cannot hand to the constant choice function: each attention call broke the graph (fullgraph: an error).
    They are fixed to their values instead, so each shape gets the winner measured for it (one graph per shape)."""
    q, _, _ = _qkv()
    call = (str(q.dtype), *q.shape, False, False, True, 0, None, None, "triton")
    fields, names = ops._attention_candidates(*call)
    times = {name: 1.0 if name == "sdpa_cudnn" else 2.0 for name in names}
    assert autotune.fastest("attention", 0, fields, names, lambda name: name, "triton", measure=times.get) == (
        "sdpa_cudnn")
    monkeypatch.setattr(autotune, "time_cuda", lambda run: pytest.fail("nothing should be measured"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # dynamo itself asks CUDA questions otherwise
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager", dynamic=True)
    def step(x, with_grid=False):
        grid = (x.shape[2] // 10, 5) if with_grid else None
        choice = ops._compiled_attention_choice((call[0], *x.shape, *call[5:-2], grid, call[-1]))
        return x + 1 if choice == "sdpa_cudnn" else x - 1
    measured, other = torch.zeros(q.shape), torch.zeros(3, *q.shape[1:])
    assert torch.equal(step(measured), measured + 1)
    assert torch.equal(step(other), other - 1)  # a batch size nobody measured: the static choice
    # a grid of symbolic sizes (a dynamic image size) is a plain tuple too; without a bias table it picks nothing
    assert torch.equal(step(measured, True), measured + 1)


@pytest.mark.parametrize("head_dim,tiles", [(64, 4), (80, 5)])
def test_a_relative_bias_call_is_tuned_among_our_forward_tiles(tuner, monkeypatch, head_dim, tiles):
    """With a bias table only our kernel runs the call, so "auto" times its forward tiles (the default and each
    alternative of flash_attention.forward_tiles) and runs the fastest; without a grid it keeps the default."""
    from fastvit.kernels import flash_attention as fa
    timed, ran = [], []
    monkeypatch.setattr(ops, "_run_attention", lambda impl, q, k, v, table, grid, p, scale: ran.append(impl) or
                        fa.attention_ref(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), table, grid))
    speed = {"triton": 3.0, "triton@1": 2.0, f"triton@{tiles - 1}": 1.0}

    def measure(run):
        run()  # the runner's one call names the implementation it ran
        timed.append(ran[-1])
        return speed.get(ran[-1], 4.0)
    monkeypatch.setattr(autotune, "time_cuda", measure)
    qkv = torch.randn(2, 50, 3, 2, head_dim)
    q = qkv.permute(2, 0, 3, 1, 4).unbind(0)[0].as_subclass(_PretendCuda)
    table = torch.zeros(2, fa.num_relative_positions((7, 7)))
    assert len(fa.forward_tiles(head_dim)) == tiles
    assert ops.attention_backend(q, rel_bias=table, grid_size=(7, 7)) == f"triton@{tiles - 1}"
    assert timed == ["triton", *(f"triton@{i}" for i in range(1, tiles))]
    assert ops.attention_backend(q, rel_bias=table) == "triton"  # no grid given: the static rule


def test_a_training_call_is_tuned_over_forward_and_backward_tiles(tuner, monkeypatch):
    """A training call (here with a table, so only our kernel runs it) times every pair of forward tiles
    (flash_attention.forward_tiles) and dK/dV tiles (flash_attention.backward_tiles on the pretend sm_90), each run
    with a backward, and the winner's name carries both to the kernels."""
    from fastvit.kernels import flash_attention as fa
    timed, ran = [], []
    monkeypatch.setattr(ops, "_run_attention", lambda impl, q, k, v, table, grid, p, scale: ran.append(impl) or
                        fa.attention_ref(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), table, grid))

    def measure(run):
        run()
        timed.append(ran[-1])
        return 1.0 if ran[-1] == "triton@2/3" else 2.0
    monkeypatch.setattr(autotune, "time_cuda", measure)
    qkv = torch.randn(2, 50, 3, 2, 64, requires_grad=True)
    q = qkv.permute(2, 0, 3, 1, 4).unbind(0)[0].as_subclass(_PretendCuda)
    table = torch.zeros(2, fa.num_relative_positions((7, 7)), requires_grad=True)
    fwd, bwd = len(fa.forward_tiles(64)), len(fa.backward_tiles(64, 90))
    assert (fwd, bwd) == (4, 4)
    assert ops.attention_backend(q, rel_bias=table, grid_size=(7, 7)) == "triton@2/3"
    assert timed == [ops._triton_tiles(i, j) for i in range(fwd) for j in range(bwd)]
    assert timed[:3] == ["triton", "triton@0/1", "triton@0/2"] and timed[4] == "triton@1"
    with torch.no_grad():  # inference times the forward tiles only
        assert ops.attention_backend(q, rel_bias=table, grid_size=(7, 7)) == "triton"


def test_a_training_candidate_with_wrong_gradients_is_skipped(tuner, monkeypatch):
    """For a training call the agreement check compares gradients too: backward tiles whose forward is right and
    whose gradients are not (here doubled) are not timed, and a warning names them."""
    from fastvit.kernels import flash_attention as fa

    def run(impl, q, k, v, table, grid, p, scale):
        out = fa.attention_ref(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), table, grid)
        if impl == "triton@0/2" and out.requires_grad:
            out.register_hook(lambda grad: 2 * grad)
        return out
    monkeypatch.setattr(ops, "_run_attention", run)
    monkeypatch.setattr(autotune, "time_cuda", lambda runner: 1.0)
    qkv = torch.randn(2, 50, 3, 2, 64, requires_grad=True)
    q = qkv.permute(2, 0, 3, 1, 4).unbind(0)[0].as_subclass(_PretendCuda)
    table = torch.zeros(2, fa.num_relative_positions((7, 7)), requires_grad=True)
    with pytest.warns(RuntimeWarning, match="'triton@0/2' disagrees with the reference") as caught:
        ops.attention_backend(q, rel_bias=table, grid_size=(7, 7))
    assert len([w for w in caught if "disagrees" in str(w.message)]) == 1


@pytest.mark.parametrize("impl,tiles", [("triton", (0, 0)), ("triton@2", (2, 0)), ("triton@0/3", (0, 3)),
                                        ("triton@1/2", (1, 2))])
def test_an_implementation_name_passes_its_tiles_to_the_kernels(monkeypatch, impl, tiles):
    passed = []
    monkeypatch.setattr(ops._flash_attention, "attention", lambda *args: passed.append(args[-2:]))
    ops._run_attention(impl, *_qkv(), None, None, 0.0, None)
    assert passed == [tiles] and ops._triton_tiles(*tiles) == impl


def test_cpu_choices_are_kept_per_vector_isa(monkeypatch, tmp_path):
    """``fastest_on_cpu`` measures again where PyTorch dispatches to another vector ISA under the same CPU model
    name (one "AMD EPYC" covers AVX2 and AVX-512 machines, whose winners differ), and not on a repeat."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_cpu_name", lambda: "AMD EPYC")
    timed = []
    monkeypatch.setattr(autotune, "time_cpu", lambda run: timed.append(run) or 1.0)
    autotune.clear()
    try:
        for isa in ("AVX2", "AVX512", "AVX2"):
            monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
            assert autotune.fastest_on_cpu("op", (("rows", 8),), ("only",), lambda name: name, "only") == "only"
        assert timed == ["only", "only"]
    finally:
        autotune.clear()
