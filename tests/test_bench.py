"""CPU smoke of the benchmark scripts (small settings, each in a subprocess). The FLOP count the throughput script
uses is tested in tests/test_flops.py, the saved-activation counter the memory script uses in tests/test_memory.py."""
import argparse
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tarfile
import types

import numpy as np
import pytest
import torch

import fastvit
from fastvit.flops import forward_flops

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load_common()


def _run(args, timeout=240):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _result(path):
    """A bench script's JSON, with the fields every one of them writes under the same names."""
    data = json.loads(path.read_text())
    assert {"args", "env", "complete", "seconds"} <= set(data) and data["env"]["torch"] == torch.__version__, path
    assert isinstance(data["complete"], bool) and data["seconds"] >= 0, path
    return data


def _positive_float(v):
    return isinstance(v, float) and v > 0 and v == v and v != float("inf")


# ---- the scripts ------------------------------------------------------------------------------------------------

def test_numerics_smoke(tmp_path):
    """Under the Triton interpreter (the script re-executes itself with TRITON_INTERPRET=1): the kernels run in
    fp32/fp16, bf16 goes through the torch fallback, and each row says which ran."""
    _run([sys.executable, "bench/numerics.py", "--interpret", "--quick", "--models", "tiny", "--out", str(tmp_path)],
         timeout=480)  # ~2 min alone; the interpreter is slow on a loaded machine
    data = _result(tmp_path / "numerics.json")
    assert data["complete"] and (tmp_path / "numerics.md").read_text().startswith("# fastvit numerics")
    rows = data["rows"]
    ops = {r["name"] for r in rows if r["kind"] == "op"}
    assert ops == {"patch_embed", "add_layer_norm", "bias_gelu", "attention", "add_layer_norm_linear",
                   "bias_gelu_linear", "ln_matmul", "gelu_matmul", "linear_residual"}
    assert {(r["dtype"], r["direction"]) for r in rows if r["kind"] == "op"} == {
        (d, p) for d in ("fp32", "fp16", "bf16") for p in ("fwd", "bwd")}
    assert {r["dtype"] for r in rows if r["kind"] == "model" and r["name"] == "tiny"} == {"fp32", "fp16", "bf16"}
    for r in rows:
        assert r["backend"] == ("torch" if r["dtype"] == "bf16" else "triton") and r["backend_reason"]
        assert r["reference"] == ("torch" if r["kind"] == "op" else "timm") + (
            " fp64" if r["dtype"] == "fp32" else " fp32")
        for key in ("ratio_max_abs", "ratio_mean_rel"):
            assert _positive_float(r[key]), r
        for impl in ("fastvit", "torch"):
            assert 0 <= r[impl]["max_abs"] < 1 and 0 <= r[impl]["mean_rel"] < 0.1, r
        assert r["ok"] == (r["ratio_max_abs"] <= 2 and r["ratio_mean_rel"] <= 2)
    assert data["failed"] == 0, [r for r in rows if not r["ok"]]
    assert len(data["fastvit_vs_timm"]) == 3 and data["env"]["triton_interpret"]


def test_gemm_smoke(tmp_path):
    """Under the interpreter: every GEMM with a fused variant timed both ways, consistent speed-ups and winners,
    and the two paths agree to fp16 rounding."""
    out = _run([sys.executable, "bench/gemm.py", "--interpret", "--smoke", "--out", str(tmp_path)])
    data = _result(tmp_path / "gemm.json")
    assert (tmp_path / "gemm.md").read_text().startswith("# Fused GEMMs")
    rows = data["rows"]
    assert [r["gemm"] for r in rows] == ["qkv", "fc1", "fc2", "proj", "fc2+r"] and "wrote" in out
    for r in rows:
        unfused, tiles, tma = {"add_layer_norm_linear": ("ln+cublas", "ln_gemm", "ln_gemm_tma"),
                               "bias_gelu_linear": ("gelu+cublas", "gelu_gemm", "gelu_gemm_tma"),
                               "linear_residual": ("cublas+add", "gemm_residual", "gemm_residual_tma")}[r["op"]]
        for impl in (unfused, tiles, tma):  # the interpreter runs the TMA kernel too
            assert _positive_float(r[impl]["fwd_s"]) and _positive_float(r[impl]["fwd_bwd_s"])
        fused = r["fused"]
        assert fused == min((tiles, tma), key=lambda i: r[i]["fwd_s"])
        assert r["speedup_fwd"] == pytest.approx(r[unfused]["fwd_s"] / r[fused]["fwd_s"])
        assert r["tma_speedup_fwd"] == pytest.approx(r[tiles]["fwd_s"] / r[tma]["fwd_s"])
        assert r["winner"] == (fused if r["speedup_fwd"] > 1 else unfused)
        assert r["max_abs_diff"] < 1e-2, r


def test_memory_smoke(tmp_path):
    _run([sys.executable, "bench/memory.py", "--models", "tiny,mini", "--batch", "2", "--no-gpu",
          "--out", str(tmp_path)])
    data = _result(tmp_path / "memory.json")
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["model"] for r in data["rows"]] == ["tiny", "mini"]
    assert data["dtype"] == "bf16" and data["autocast"] and data["batch"] == 2 and data["cpu_backend_used"] == "torch"
    for row in data["rows"]:
        f, t = row["fastvit"], row["timm"]
        for v in (f, t):
            assert _positive_float(v["activation_mib_per_image"]) and _positive_float(v["weight_copies_mib"])
            assert v["with_weight_copies_mib_per_image"] == pytest.approx(
                v["activation_mib_per_image"] + v["weight_copies_mib"] / 2)
        assert row["ratio"] == pytest.approx(f["activation_mib_per_image"] / t["activation_mib_per_image"])
        assert row["ratio"] < 0.85 and f["bf16_d_values_per_token_per_block"] < t["bf16_d_values_per_token_per_block"]


def _check_throughput(data, world, micro, modes, columns=("fastvit", "timm"), global_batch=256):
    assert data["world_size"] == world and data["smoke"] and data["global_batch"] == global_batch
    assert [r["mode"] for r in data["rows"]] == modes and data["columns"] == list(columns)
    for r in data["rows"]:
        assert r["global_batch"] == global_batch == world * r["micro_batch"] * r["accum_steps"]
        assert r["micro_batch"] == micro
        fwd = forward_flops(common.build_model("tiny", "timm"))
        assert r["flops_per_image"] == fwd * (3 if r["mode"] == "train" else 1)
        # CPU: the torch fallbacks; bf16 training at 17 tokens takes attention's torch backward (ops.attention)
        attention = "fallback" if r["mode"] == "train" and data["dtype"] == "bf16" else "torch"
        # a tiny model's last block may run on the class token alone, in training and (by default) inference
        assert r["backend_used"] == {"ops": "torch", "attention": attention, "last_block": "class token"}
        assert r["columns"] == list(columns)
        for col in columns:
            v = r[col]
            assert _positive_float(v["images_per_s"]) and _positive_float(v["tflops"])
            assert v["tflops"] == pytest.approx(v["images_per_s"] * r["flops_per_image"] / 1e12)
            assert v["mfu"] is None and v["peak_mem_gib"] is None  # CPU: no peak to divide by, no CUDA memory
            assert len(v["step_seconds"]) == data["steps"]
            # a global batch over the median step (a mean of few steps was set by one slow step on a busy machine)
            steps = sorted(v["step_seconds"])
            median = (steps[(len(steps) - 1) // 2] + steps[len(steps) // 2]) / 2
            assert v["images_per_s"] == pytest.approx(r["global_batch"] / median)
            assert v["step_spread"] == pytest.approx(steps[-1] / steps[0])
        # the ratio is the best fastvit column over the best timm column
        best = {impl: max(r[c]["images_per_s"] for c in columns if c.startswith(impl)) for impl in ("fastvit", "timm")}
        assert r[r["best"]["fastvit"]]["images_per_s"] == best["fastvit"]
        assert r[r["best"]["timm"]]["images_per_s"] == best["timm"]
        assert _positive_float(r["ratio"]) and r["ratio"] == pytest.approx(best["fastvit"] / best["timm"])
        for col in columns:
            assert r[col]["ratio_vs_best_timm"] == pytest.approx(r[col]["images_per_s"] / best["timm"])


def test_throughput_smoke(tmp_path):
    out = _run([sys.executable, "bench/throughput.py", "--smoke", "--model", "tiny", "--global-batch", "256",
                "--micro-batch", "128", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)], timeout=480)
    assert "SMOKE CONFIGURATION" in out
    data = _result(tmp_path / "throughput.json")
    _check_throughput(data, 1, 128, ["train", "infer"])
    assert data["compile"] is False and data["compile_mode"] is None and data["complete"] is True
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_compile_columns(tmp_path):
    """--compile adds torch.compile columns of both models (inductor on CPU) beside the eager ones, in one run;
    training only (DDP under compile; inference compiles the bare module) to keep the compile time down."""
    out = _run([sys.executable, "bench/throughput.py", "--smoke", "--model", "tiny", "--mode", "train",
                "--global-batch", "256", "--micro-batch", "256", "--steps", "1", "--warmup", "1", "--compile",
                "--compile-mode", "default", "--out", str(tmp_path)], timeout=600)
    assert "compile True (mode default)" in out
    data = _result(tmp_path / "throughput.json")
    assert data["compile"] is True and data["compile_mode"] == "default"
    _check_throughput(data, 1, 256, ["train"], ("fastvit", "fastvit_compile", "timm", "timm_compile"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without CUDA")
def test_throughput_cuda_graphs_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--cuda-graphs", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cuda-graphs needs a CUDA device" in proc.stderr


def test_throughput_torchrun_two_ranks(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "bench/throughput.py", "--smoke", "--model", "tiny", "--mode", "train", "--global-batch", "512",
          "--micro-batch", "64", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    _check_throughput(_result(tmp_path / "throughput.json"), 2, 64, ["train"], global_batch=512)


def test_ops_benchmark_smoke():
    """Every benchmark body ran once and its result check passed: the summary line counts only passes, and skips
    only of the GPU-only attention tiling benchmarks (Triton kernels need a GPU outside the interpreter)."""
    out = _run([sys.executable, "-m", "pytest", "bench/test_ops_benchmark.py", "--benchmark-disable", "-q", "-rs",
                "-p", "no:cacheprovider"])
    summary = re.search(r"^=*\s*(\d+ passed.*) in [\d.]+s", out, re.M)
    assert summary, out[-3000:]
    counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", summary.group(1))}
    assert counts["passed"] > 0 and set(counts) <= {"passed", "warning", "skipped"}, summary.group(0)
    reasons = re.findall(r"^SKIPPED \[(\d+)\] (.*)$", out, re.M)
    assert sum(int(n) for n, _ in reasons) == counts.get("skipped", 0)
    assert all("which need a GPU" in reason for _, reason in reasons), reasons


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("names,category", [
    (["aten::addmm"], "GEMM"),
    (["sm90_xmma_gemm_bf16bf16_bf16f32", "cudaLaunchKernel", "aten::mm", "aten::matmul", "aten::linear"], "GEMM"),
    # the GEMMs of fastvit's LayerNorm + Linear backward are GEMM time, its LayerNorm op LayerNorm time
    (["aten::mm", "autograd::engine::evaluate_function: AddLayerNormLinearFnBackward"], "GEMM"),
    (["aten::mul", "fastvit::add_layer_norm_bwd",
      "autograd::engine::evaluate_function: AddLayerNormLinearFnBackward"], "LayerNorm"),
    (["_add_ln_fwd_kernel", "cuLaunchKernel", "fastvit::add_layer_norm_fwd"], "LayerNorm"),
    (["aten::native_layer_norm", "aten::layer_norm"], "LayerNorm"),
    (["triton_per_fused_native_layer_norm_0", "cuLaunchKernel", "CompiledFunction"], "LayerNorm"),
    (["_attn_fwd_kernel", "cuLaunchKernel", "fastvit::attention_fwd"], "attention forward"),
    (["aten::bmm", "fastvit::attention_fwd"], "attention forward"),
    (["_attn_bwd_dq_kernel", "cuLaunchKernel", "fastvit::attention_bwd"], "attention backward"),
    (["pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel", "cudaLaunchKernel",
      "aten::_scaled_dot_product_flash_attention_backward"], "attention backward"),
    (["_bias_gelu_fwd_kernel", "cuLaunchKernel", "fastvit::bias_gelu_fwd"], "GELU/bias/elementwise"),
    (["aten::gelu"], "GELU/bias/elementwise"),
    (["void at::native::vectorized_elementwise_kernel<4, AddFunctor>", "cudaLaunchKernel", "aten::add"],
     "GELU/bias/elementwise"),
    # autocast's weight cast inside a linear is a copy, not GEMM time
    (["void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "cudaLaunchKernel", "aten::copy_",
      "aten::_to_copy", "aten::to", "aten::linear"], "casts and copies"),
    (["void at::native::vectorized_elementwise_kernel<4, AddFunctor>", "cudaLaunchKernel", "aten::_foreach_add_",
      "Optimizer.step#AdamW.step"], "optimizer"),
    (["ncclDevKernel_AllReduce_Sum_f32_RING_LL", "cudaLaunchKernel", "nccl:all_reduce"], "communication"),
    (["_patch_embed_fwd_kernel", "cuLaunchKernel", "fastvit::patch_embed_fwd"], "GEMM"),
    (["aten::some_unknown_op"], "other"),
])
def test_profile_categories(names, category):
    """A kernel or op lands in its category from its own name and the ops around it (innermost first)."""
    assert _load_bench("profile").classify(names) == category


@pytest.mark.parametrize("torch_links_ops", [True, False])
def test_profile_counts_each_gpu_kernel_once(torch_links_ops):
    """GPU categorisation from torch's own event objects, numbered as the profiler numbers them: a kernel and its
    launching runtime call share CUPTI's correlation id, ops carry torch's counter (which a kernel names as its
    linked id), and the two counters overlap. Each kernel counts once, with its launching call and that call's
    enclosing ops, never with a call whose CUPTI id happens to equal the kernel's op's id; a kernel whose call was
    not recorded goes to its linked op, where torch records the link (not in torch 2.11, the GPU machine's:
    ``torch_links_ops`` False); one linked to nothing counts by its own name, reported as unlinked; busy is the
    union of the kernels."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent
    profile = _load_bench("profile")

    def event(id, name, start, end, device=DeviceType.CPU, link=0, parent=None):
        e = FunctionEvent(id=id, name=name, thread=1, start_us=start, end_us=end, device_type=device)
        if torch_links_ops:
            e.linked_correlation_id = link
        elif hasattr(e, "linked_correlation_id"):
            del e.linked_correlation_id
        e.cpu_parent = parent
        return e
    step = event(1, profile.STEP, 0, 100)
    norm = event(7, "fastvit::add_layer_norm_fwd", 1, 10, parent=step)
    launch_ln = event(8, "cuLaunchKernelEx", 2, 3, link=7, parent=norm)  # CUPTI id 8, in op 7
    linear = event(8, "aten::linear", 11, 20, parent=step)  # torch's op id 8: the same number as that launch's
    launch_mm = event(9, "cudaLaunchKernel", 12, 13, link=8, parent=linear)
    events = [step, norm, launch_ln, linear, launch_mm,
              event(8, "_add_ln_fwd_kernel", 4, 14, DeviceType.CUDA, link=7),
              event(9, "nvjet_sm90_tst_192x192_NNN", 14, 34, DeviceType.CUDA, link=8),
              # its launch call missing from the trace: found through its op where torch links them
              event(60, "kernel_0", 34, 36, DeviceType.CUDA, link=7),
              event(61, "void at::native::vectorized_elementwise_kernel<4, AddFunctor>", 40, 45, DeviceType.CUDA)]
    totals, by_name, by_site, busy, wall, unlinked = profile.categorise(events, "cuda")
    assert totals["GEMM"] == 20 and totals["GELU/bias/elementwise"] == 5
    assert (totals["LayerNorm"], totals["other"]) == ((12, 0) if torch_links_ops else (10, 2))
    assert sum(totals.values()) - totals["idle"] == 37
    expected = {"void at::native::vectorized_elementwise_kernel<4, AddFunctor>": 5}
    assert unlinked == (expected if torch_links_ops else {**expected, "kernel_0": 2})
    assert busy == 37 and wall == 100 and totals["idle"] == 63
    assert by_name["LayerNorm", "_add_ln_fwd_kernel"] == 10
    # each kernel beside the ops that launched it (innermost first, the runtime call and the step left out)
    assert by_site["GEMM", "nvjet_sm90_tst_192x192_NNN <- aten::linear"] == 20
    assert by_site["LayerNorm", "_add_ln_fwd_kernel <- fastvit::add_layer_norm_fwd"] == 10
    assert by_site["LayerNorm" if torch_links_ops else "other",
                   "kernel_0 <- fastvit::add_layer_norm_fwd" if torch_links_ops else "kernel_0"] == 2


def test_profile_smoke(tmp_path):
    """CPU: the category table from CPU op self time; each side's categories and idle add up to its step."""
    out = _run([sys.executable, "bench/profile.py", "--smoke", "--global-batch", "64", "--micro-batch", "32",
                "--warmup", "1", "--out", str(tmp_path)])
    data = _result(tmp_path / "profile.json")
    assert "GEMM" in out and data["smoke"] and data["time_source"] == "CPU op self" and data["complete"]
    assert list(data["sides"]) == ["fastvit", "timm"] and data["accum_steps"] == 2
    for side, v in data["sides"].items():
        cats = v["categories"]
        assert list(cats) == data["categories"]
        assert sum(c["ms"] for c in cats.values()) == pytest.approx(v["step_ms"], rel=1e-6)
        assert sum(c["pct"] for c in cats.values()) == pytest.approx(100, rel=1e-6)
        for name in ("GEMM", "attention forward", "attention backward", "LayerNorm", "optimizer"):
            assert cats[name]["ms"] > 0 and cats[name]["top"], (side, name)
            # the same time again, by op and caller: each site's op is one of the top ops or a cheaper one
            sites = cats[name]["top_sites"]
            assert sites and sites[0][1] <= cats[name]["ms"] + 1e-9, (side, name)
            assert sum(t for _, t in sites) <= cats[name]["ms"] * (1 + 1e-9), (side, name)
        json.loads((tmp_path / v["trace"]).read_text())  # a readable Chrome trace
    # fastvit's fused ops appear by name in their own categories
    top = data["sides"]["fastvit"]["categories"]["LayerNorm"]["top"]
    assert any(name.startswith("fastvit::add_layer_norm") for name, _ in top)
    sites = data["sides"]["fastvit"]["categories"]["LayerNorm"]["top_sites"]
    assert any(" <- " in site for site, _ in sites)  # ops under the model's modules name their callers
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_keeps_the_finished_side_when_a_run_stops(tmp_path, monkeypatch):
    """profile.json is written after each side: a run that stops in timm's side (here its runner fails; in
    bench/gpu_suite.sh, a step's time limit) keeps fastvit's profile, marked incomplete."""
    profile = _load_bench("profile")
    real_runner = profile.throughput.Runner

    def runner(model, *args):
        if not isinstance(model, fastvit.VisionTransformer):
            raise RuntimeError("timm's side stops here")
        return real_runner(model, *args)
    monkeypatch.setattr(profile.throughput, "Runner", runner)
    with pytest.raises(RuntimeError, match="timm's side stops here"):
        profile.main(["--smoke", "--global-batch", "32", "--micro-batch", "32", "--warmup", "0", "--out",
                      str(tmp_path)])
    data = _result(tmp_path / "profile.json")
    assert data["complete"] is False and list(data["sides"]) == ["fastvit"]
    assert data["sides"]["fastvit"]["step_ms"] > 0


def test_overhead_smoke(tmp_path):
    """Host time per call of every fused op and of the torch ops it replaces, launches stubbed."""
    out = _run([sys.executable, "bench/overhead.py", "--number", "3", "--repeat", "2", "--depth", "2",
                "--model-number", "2", "--out", str(tmp_path)])
    data = _result(tmp_path / "overhead.json")
    assert "attention" in out
    assert data["device"] == "cpu" and data["launches"] == "stubbed"
    ops = {(r["op"], r["direction"]) for r in data["ops"]}
    assert ops == {(op, d) for op in ("patch_embed", "add_layer_norm", "bias_gelu", "attention",
                                      "add_layer_norm_linear", "bias_gelu_linear") for d in ("fwd", "fwd+bwd")}
    for r in data["ops"]:
        assert _positive_float(r["fastvit_us"]) and _positive_float(r["torch_us"])
        assert r["ratio"] == pytest.approx(r["fastvit_us"] / r["torch_us"])
        # one kernel per forward; backward kernels on top (attention: preprocess, dK/dV, dQ)
        assert r["kernel_launches"] == 1 if r["direction"] == "fwd" else r["kernel_launches"] >= 2, r
    assert {r["op"]: r["kernel_launches"] for r in data["ops"] if r["direction"] == "fwd+bwd"}["attention"] == 4
    # the whole model against timm's: per block, the forward launches qkv's LayerNorm, attention, the MLP's
    # LayerNorm and GELU (4), plus the stem's patch embedding and the final LayerNorm
    models = {r["direction"]: r for r in data["models"]}
    assert set(models) == {"fwd", "fwd+bwd"} and models["fwd"]["kernel_launches"] == 4 * 2 + 2
    assert models["fwd+bwd"]["kernel_launches"] > models["fwd"]["kernel_launches"]
    for r in models.values():
        assert r["model"] == "ViT depth 2 width 64, 1 image"
        assert _positive_float(r["fastvit_us"]) and r["ratio"] == pytest.approx(r["fastvit_us"] / r["timm_us"])


def test_overhead_on_cuda_needs_a_gpu(tmp_path):
    """--device cuda times the real launches on a GPU; without one it says so and names the default."""
    proc = subprocess.run([sys.executable, "bench/overhead.py", "--device", "cuda", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cuda needs a CUDA GPU" in proc.stderr, proc.stderr
    assert not (tmp_path / "overhead.json").exists()


def test_overhead_on_cuda_counts_the_host_work_of_other_threads(monkeypatch):
    """On a GPU autograd runs a backward in its own device thread while the caller waits: the --device cuda timer
    counts that thread's CPU time too (the caller's alone read a forward's time for a whole step); on CPU, where the
    backward runs in the calling thread, the calling thread's time is the measure."""
    import threading
    overhead = _load_bench("overhead")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    def elsewhere():  # 2 ms of CPU in another thread, the caller blocked meanwhile
        worker = threading.Thread(target=spin, args=(0.002,))
        worker.start()
        worker.join()
    calls = {"fastvit": elsewhere, "torch": lambda: spin(0.001)}
    on_gpu, _ = overhead.measure_calls(dict(calls), 5, 2, None, device="cuda")
    on_cpu, _ = overhead.measure_calls(dict(calls), 5, 2, None, device="cpu")
    assert on_gpu["fastvit"] >= 1900 and on_gpu["torch"] >= 900, on_gpu
    assert on_cpu["fastvit"] < 1000 <= on_cpu["torch"], on_cpu


def test_summary_tables_host_time_with_real_launches_apart_from_stubbed(tmp_path):
    """overhead_cuda/overhead.json (real launches, no counts) gets its own section, before the stubbed one."""
    def write(path, device, ratio, launches):
        row = {"op": "add_layer_norm", "direction": "fwd", "fastvit_us": 10.0 * ratio, "torch_us": 10.0,
               "ratio": ratio, "kernel_launches": launches}
        path.mkdir(exist_ok=True)
        (path / "overhead.json").write_text(json.dumps({"env": {"gpu": "NVIDIA H200"}, "ops": [row], "models": [],
                                                        "device": device}))
    write(tmp_path, "cpu", 2.25, 1)
    write(tmp_path / "overhead_cuda", "cuda", 0.75, None)
    summary = (_load_bench("tables").summary(tmp_path)).read_text()
    gpu, cpu = summary.split("## Host time per call on the GPU (bench/overhead.py --device cuda; real launches)")[1] \
        .split("## Host time per call (bench/overhead.py; this machine's CPU, launches stubbed)")
    assert "| add_layer_norm | fwd | 7.5 | 10.0 | 0.75 | real |" in gpu
    assert "| add_layer_norm | fwd | 22.5 | 10.0 | 2.25 | 1 |" in cpu


def test_gpu_suite_needs_a_gpu_and_dry_runs_on_cpu(tmp_path):
    """Without a GPU the suite stops at once and says so; --dry-run runs a step at smoke size on CPU, builds the
    summary tables from its JSON and, with --archive, packs the folder (traces left out) into one .tgz."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "overhead"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr
    archive = tmp_path / "gpu_results.tgz"
    out = _run(["bash", "bench/gpu_suite.sh", "--dry-run", "--archive", str(archive), "overhead", "loader"],
               timeout=480)
    folder = pathlib.Path(re.search(r"results in (\S+)", out).group(1))
    try:
        summary = (folder / "summary.md").read_text()
        assert "## Host time per call" in summary and "| add_layer_norm | fwd |" in summary
        assert json.loads((folder / "overhead.json").read_text())["ops"]
        assert "## Training loader" in summary and "| shards | cpu | 1 |" in summary
        with tarfile.open(archive) as tar:
            names = tar.getnames()
        assert f"{folder.name}/summary.md" in names and f"{folder.name}/overhead.json" in names
        assert not any("traces" in name for name in names)  # the folder exists (the profile step's traces)
    finally:
        shutil.rmtree(folder)


def test_gpu_suite_without_webdataset_measures_the_folder_loader(tmp_path):
    """The lent GPU machines' image has no webdataset: with no wheels carried in .whl/ the suite says so, and its
    loader step measures the image-folder path alone (the shard paths skipped), without failing."""
    if (ROOT / ".whl").exists():
        pytest.skip("this checkout carries wheels in .whl/, which the suite would install")
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['webdataset'] = None  # as if not installed\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "loader"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== webdataset is not installed" in proc.stdout and "skipping the shards path" in proc.stdout
    folder = pathlib.Path(re.search(r"results in (\S+)", proc.stdout).group(1))
    try:
        assert [row["path"] for row in json.loads((folder / "loader.json").read_text())["rows"]] == ["folder"]
    finally:
        shutil.rmtree(folder)


def test_gpu_suite_keeps_to_its_budget(tmp_path):
    """A step that would get less than 20 s of what is left of --budget is skipped, reported and counted as failed;
    the archive is still written."""
    archive = tmp_path / "gpu_results.tgz"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--budget", "0", "--archive", str(archive),
                           "overhead"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "== overhead: skipped" in proc.stdout and "== tables: skipped" in proc.stdout
    assert "FAILED: overhead(skipped) tables(skipped)" in proc.stderr
    folder = pathlib.Path(re.search(r"results in (\S+)", proc.stdout).group(1))
    try:
        with tarfile.open(archive) as tar:
            assert tar.getnames()[0] == folder.name and not (folder / "overhead.json").exists()
    finally:
        shutil.rmtree(folder)
    # unnamed, the loader step is optional: left without time it is skipped, not failed
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--budget", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "== loader: skipped (optional)" in proc.stdout
    assert ("FAILED: b16(skipped) l16(skipped) h14(skipped) numerics(skipped) profile(skipped) ops(skipped) "
            "overhead(skipped) latency(skipped) b16c(skipped) l16c(skipped) h14c(skipped) b16ct(skipped) resid(skipped) "
            "profilec(skipped) tables(skipped)") in proc.stderr
    shutil.rmtree(re.search(r"results in (\S+)", proc.stdout).group(1))
    bad = subprocess.run(["bash", "bench/gpu_suite.sh", "--budget", "soon"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--budget takes whole seconds, got 'soon'" in bad.stderr


def test_ablation_refuses_a_variant_without_placement_and_the_variant_flags(tmp_path):
    proc = subprocess.run([sys.executable, "bench/ablation.py", "--variants", "learn", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--variants: ['learn'] are not in Table 8" in proc.stderr, proc.stderr[-2000:]
    # the variants are the ablation's own: a trainer flag that sets one would be overwritten by each variant
    proc = subprocess.run([sys.executable, "bench/ablation.py", "--pos-embed", "none", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "choose the variants with --variants" in proc.stderr, proc.stderr[-2000:]


def test_ablation_smoke(tmp_path):
    """bench/ablation.py with tiny settings: two Table 8 variants (one named twice: it runs once) x 2 seeds, 5-shot
    accuracy per run, the table beside the paper's values, JSON and PNG."""
    out = _run([sys.executable, "bench/ablation.py", "--seeds", "2", "--fewshot-seeds", "1", "--variants",
                "none:stem,learn_2d:every_layer_shared,none:stem", "--steps", "3", "--embed-dim", "32", "--depth", "2",
                "--num-heads", "2", "--out", str(tmp_path)])
    data = _result(tmp_path / "ablation.json")
    assert [(r["variant"], r["placement"], r["seed"]) for r in data["runs"]] == [
        ("none", "stem", 0), ("none", "stem", 1), ("learn_2d", "every_layer_shared", 0),
        ("learn_2d", "every_layer_shared", 1)]
    assert all(0 < r["fewshot5"] <= 1 and len(r["fewshot5_per_draw"]) == 1 for r in data["runs"])
    table = {(r["variant"], r["placement"]): r for r in data["table"]}
    assert table[("none", "stem")]["paper"] == 0.61382 and table[("learn_2d", "every_layer_shared")]["seeds"] == 2
    mean = sum(r["fewshot5"] for r in data["runs"][:2]) / 2
    assert table[("none", "stem")]["mean"] == pytest.approx(mean)
    assert "| no pos. emb. | stem |" in out and "61.38 |" in out
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kwargs = json.loads((tmp_path / "ablation_runs" / "learn_2d-every_layer_shared-seed1" / "config.json").read_text())
    assert kwargs["model"]["kwargs"]["pos_embed_at"] == "every_layer_shared" and kwargs["train"]["seed"] == 1
    # a rerun with one variant and one seed (finished: evaluated again) adds to the table, it does not replace it
    out = _run([sys.executable, "bench/ablation.py", "--seeds", "1", "--fewshot-seeds", "1", "--variants", "none:stem",
                "--steps", "3", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--out", str(tmp_path)])
    again = _result(tmp_path / "ablation.json")
    assert "kept 3 earlier run(s)" in out
    assert "is complete (step 3 of 3)" in out and "a larger --steps" not in out  # the ablation refuses one
    assert sorted((r["variant"], r["seed"], r["fewshot5"]) for r in again["runs"]) == \
        sorted((r["variant"], r["seed"], r["fewshot5"]) for r in data["runs"])
    assert {(r["variant"], r["placement"]): r["seeds"] for r in again["table"]} == {
        ("none", "stem"): 2, ("learn_2d", "every_layer_shared"): 2}
    assert "digits, 2 seed(s)" in again["title"]  # the rows' seeds, not the rerun's --seeds 1
    # scored with another --fewshot-seeds, the runs not asked for now are dropped, and it says so
    out = _run([sys.executable, "bench/ablation.py", "--seeds", "1", "--fewshot-seeds", "2", "--variants", "none:stem",
                "--steps", "3", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--out", str(tmp_path)])
    assert "dropping 3 earlier run(s)" in out and len(_result(tmp_path / "ablation.json")["runs"]) == 1


def test_ablation_checks_every_variant_s_flags_before_the_first_run(tmp_path):
    """A trainer flag no run can take (--steps 0), or one variant cannot (learn_2d with an odd --embed-dim), is a
    usage error before anything trains or is recorded (it was a traceback, after the variants before it had
    trained, and the settings file it left refused the corrected command)."""
    base = [sys.executable, "bench/ablation.py", "--seeds", "1", "--depth", "1", "--out", str(tmp_path)]
    for flags, message in ((["--variants", "learn:stem", "--steps", "0"], "--steps must be a positive integer, got 0"),
                           (["--variants", "learn:stem,learn_2d:stem", "--steps", "3", "--embed-dim", "33",
                             "--num-heads", "3"], "learn_2d:stem: pos_embed='learn_2d' needs an even embed_dim")):
        proc = subprocess.run(base + flags, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "ablation_runs").exists()
    proc = subprocess.run(base + ["--variants", ","], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--variants names no pair" in proc.stderr


@pytest.mark.parametrize("error,code,message", [
    (KeyboardInterrupt(), 130, "stopped during learn:stem seed 0, interrupted"),
    (ValueError("--pos-embed cannot change the architecture of checkpoint X"), 2,
     "error: learn:stem seed 0: --pos-embed cannot change the architecture")])
def test_ablation_keeps_the_finished_runs_on_ctrl_c_or_an_error_outside_training(tmp_path, monkeypatch, capsys,
                                                                                 error, code, message):
    """Ctrl-C while a trained run is scored, or a setting only the second run finds wrong: ablation.json (and its
    PNG) keep the first run's scores, marked incomplete (they were held in memory to the end and lost with a
    traceback); the exit is 130 or a usage error naming the run."""
    ablation = _load_bench("ablation")
    calls = []

    def run_variant(cfg, variant, placement, seed, out, fewshot_seeds):
        calls.append(variant)
        if len(calls) == 2:
            raise error
        return {"variant": variant, "placement": placement, "seed": seed, "top1": 0.5, "fewshot5": 0.4,
                "fewshot5_per_draw": [0.4]}
    monkeypatch.setattr(ablation, "run_variant", run_variant)
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--seeds", "1", "--variants", "none:stem,learn:stem", "--steps", "3", "--embed-dim", "32",
                       "--depth", "1", "--num-heads", "2", "--out", str(tmp_path)])
    assert exit_info.value.code == code and message in capsys.readouterr().err
    data = _result(tmp_path / "ablation.json")
    assert data["complete"] is False and [r["variant"] for r in data["runs"]] == ["none"]
    assert [r["variant"] for r in data["table"]] == ["none"] and (tmp_path / "ablation.png").exists()


def test_ablation_stopped_keeps_its_runs_and_refuses_other_settings_on_rerun(tmp_path):
    """Ctrl-C during a run: the run saves, the ablation writes no table (ablation.json says incomplete), exits 130
    and names how to resume; a rerun with another schedule is refused (it would continue the saved runs under a
    schedule they did not start with)."""
    import signal
    import time
    flags = ["--seeds", "1", "--fewshot-seeds", "1", "--variants", "none:stem,learn:stem", "--embed-dim", "32",
             "--depth", "1", "--num-heads", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "bench/ablation.py", "--steps", "100000", "--eval-every", "100000",
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "ablation_runs" / "none-stem-seed0" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "stopped during none:stem seed 0" in stderr and "resumes the ablation there (0 of 2 runs" in stderr
    # only the ablation's way to resume: the trainer's (its run's --out) would start an ablation inside that run
    assert "SIGINT: saved checkpoint at step" in stdout + stderr and "resumes it)" not in stdout + stderr
    data = _result(tmp_path / "ablation.json")
    assert data["complete"] is False and data["runs"] == [] and data["table"] == []
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # of what the JSON holds
    assert not (tmp_path / "ablation_runs" / "learn-stem-seed0").exists()
    rerun = subprocess.run([sys.executable, "bench/ablation.py", "--steps", "50", *flags], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 2 and "--steps 100000 -> 50" in rerun.stderr, rerun.stderr[-2000:]
    assert "rerun with their flags to resume them, or pass another --out" in rerun.stderr


def test_loader_smoke(tmp_path):
    """bench/loader.py on a few synthetic JPEGs: ImageFolder and shard paths through the trainer's loader, rates
    per worker, the ratio to the model's training img/s taken from a throughput.json, JSON and PNG."""
    throughput = {"world_size": 2, "rows": [{"mode": "infer", "model": "tiny", "fastvit": {"images_per_s": 1e6}},
                                            {"mode": "train", "model": "tiny", "fastvit": {"images_per_s": 100.0}}]}
    (tmp_path / "throughput.json").write_text(json.dumps(throughput))
    out = _run([sys.executable, "bench/loader.py", "--images", "24", "--img-size", "32", "--batch", "8", "--steps",
                "2", "--warmup", "1", "--workers", "1", "--paths", "folder,shards,shards-gpu,shards-dali",
                "--throughput", str(tmp_path / "throughput.json"), "--out", str(tmp_path)])
    data = _result(tmp_path / "loader.json")
    assert [(r["path"], r["workers"]) for r in data["rows"]] == [("folder", 1), ("shards", 1)]  # no CUDA here
    assert "skipping the shards-gpu path: --decode gpu needs a CUDA device" in out
    assert "skipping the shards-dali path: --decode dali needs a CUDA device" in out
    assert data["model_images_per_s_per_gpu"] == 50.0 and data["synthetic"] and data["complete"]
    for r in data["rows"]:
        assert _positive_float(r["images_per_s"]) and r["ratio_to_model"] == pytest.approx(r["images_per_s"] / 50)
    assert "x, meets the 1.5x goal" in out or "x, misses the 1.5x goal" in out
    assert "model trains at 50 img/s (tiny fastvit per CPU process" in out  # the throughput file's env: no CUDA
    assert "manifest.json" not in out  # the writer's summary would name shards deleted at exit
    assert (tmp_path / "loader.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stop_at(module, function, name, monkeypatch):
    """Make ``module.function`` (a bench script's per-model step) raise for model ``name``: a run that stops
    part-way, as bench/gpu_suite.sh's time limit stops one."""
    real = getattr(module, function)

    def step(model, *args, **kwargs):
        if model == name:
            raise RuntimeError(f"stopped at {name}")
        return real(model, *args, **kwargs)
    monkeypatch.setattr(module, function, step)


def test_numerics_keeps_finished_rows_when_a_run_stops(tmp_path, monkeypatch, capsys):
    """numerics.json is rewritten after every op and model: a run that stops part-way (here at its second model;
    in bench/gpu_suite.sh, a step's time limit) leaves the rows it checked, marked incomplete. The console says
    what its ratios are and marks a row over the bound."""
    numerics = _load_bench("numerics")
    _stop_at(numerics, "run_model", "mini", monkeypatch)
    with pytest.raises(RuntimeError, match="stopped at mini"):
        numerics.main(["--quick", "--ops", "add_layer_norm", "--dtypes", "fp32", "--models", "tiny,mini", "--out",
                       str(tmp_path)])
    data = _result(tmp_path / "numerics.json")
    assert data["complete"] is False
    assert {(r["kind"], r["name"]) for r in data["rows"]} == {("op", "add_layer_norm"), ("model", "tiny")}
    assert "| add_layer_norm |" in (tmp_path / "numerics.md").read_text()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("error of fastvit / error of PyTorch") and "passes at <= 2.0x" in lines[0]
    fwd, bwd = data["rows"][:2]
    assert lines[1].startswith("add_layer_norm") and f"fwd x{fwd['ratio_max_abs']:.2f}/" in lines[1]
    assert f"bwd x{bwd['ratio_max_abs']:.2f}/" in lines[1] and "FAIL" not in lines[1]
    assert numerics.console_line(fwd, dict(bwd, ratio_max_abs=3.3, ok=False)).endswith("  FAIL")


def test_loader_keeps_finished_rows_when_a_run_stops(tmp_path, monkeypatch):
    """loader.json is rewritten after every row: a run that stops part-way (here at its second measurement; in
    bench/gpu_suite.sh, a step's time limit) leaves the rows it measured, marked incomplete."""
    loader = _load_bench("loader")
    real, calls = loader.measure, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped at the second row")
        return real(*args, **kwargs)
    monkeypatch.setattr(loader, "measure", measure)
    with pytest.raises(RuntimeError, match="stopped at the second row"):
        loader.main(["--images", "16", "--img-size", "32", "--batch", "8", "--steps", "1", "--warmup", "1",
                     "--workers", "0", "--paths", "folder,shards", "--out", str(tmp_path)])
    data = _result(tmp_path / "loader.json")
    assert data["complete"] is False and [(r["path"], r["workers"]) for r in data["rows"]] == [("folder", 0)]


def test_loader_times_past_the_workers_prefetched_batches(monkeypatch):
    """Workers have up to 2 batches each ready when the clock would start: measure() takes those in its warm-up and
    times at least 8 batches per worker, so that queued batches cannot make up most of the window (16 workers over
    8 timed batches once read 7x the decode rate of the machine's cores)."""
    import fastvit.data
    loader = _load_bench("loader")
    pulled = []

    class Source:
        workers = 4

        def sampler(self, seed):
            return None

        def loader(self, plan, seed):
            for b in plan:
                pulled.append(b)
                yield None, None, [("a sample", "broken")] * (b % 2)  # (x, y, replaced samples)
    monkeypatch.setattr(fastvit.data, "micro_batch_plan", lambda *a: list(range(a[4])))
    # a clock that reads one second per batch pulled
    monkeypatch.setattr(loader, "time", types.SimpleNamespace(perf_counter=lambda: float(len(pulled))))
    ips, bad = loader.measure(Source(), 10, steps=3, warmup=1)
    assert len(pulled) == 1 + 2 * 4 + 8 * 4  # the warm-up takes the prefetched batches; 32 timed, not 3
    assert ips == pytest.approx(10.0)  # 32 batches of 10 in 32 "seconds"
    assert bad == 20  # one in every odd batch


def test_loader_takes_training_shards_as_a_pattern_or_a_folder(tmp_path, capsys):
    """--shards takes a brace pattern or a folder of .tar files, not only the writer's output folder (both were a
    traceback asking for --val-data, a flag loader.py does not have): only training shards are read. A --shards that
    names no shards is a usage error before anything is measured."""
    pytest.importorskip("webdataset")
    from fastvit.data.shards import main as write_shards
    loader = _load_bench("loader")
    loader.synthetic_folder(tmp_path / "images", 12, classes=3)
    assert write_shards([str(tmp_path / "images"), str(tmp_path / "wds"), "--shard-size", "30KB", "--no-verify"]) == 0
    count = len(list((tmp_path / "wds" / "train").glob("*.tar")))
    assert count > 1
    args = ["--data", str(tmp_path / "images"), "--img-size", "32", "--batch", "4", "--steps", "1", "--warmup", "0",
            "--workers", "0", "--paths", "shards", "--out", str(tmp_path / "out")]
    for shards in (f"{tmp_path}/wds/train/train-{{000000..{count - 1:06d}}}.tar", str(tmp_path / "wds" / "train"),
                   str(tmp_path / "wds")):
        rows = loader.main(args + ["--shards", shards])["rows"]
        assert [(r["path"], r["workers"]) for r in rows] == [("shards", 0)] and _positive_float(rows[0]["images_per_s"])
    for shards, message in ((f"{tmp_path}/wds/train/train-{{000000..000999}}.tar", "shards do not exist"),
                            (str(tmp_path / "nothing"), "matches no file")):
        with pytest.raises(SystemExit) as exit_info:
            loader.main(args + ["--shards", shards, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"error: --shards: shard pattern {shards!r}" in err and message in err
    assert not (tmp_path / "bad").exists()


def test_loader_counts_replaced_samples_and_writes_no_images_it_does_not_read(tmp_path, monkeypatch, capsys):
    """Unreadable samples are replaced at the cost of a second read and decode: each row counts them
    (``bad_samples``) and says so. With --shards and only shard paths no synthetic images are written."""
    pytest.importorskip("webdataset")
    loader = _load_bench("loader")
    loader.synthetic_folder(tmp_path / "images", 12, classes=3)
    for path in sorted((tmp_path / "images" / "train").rglob("*.jpg"))[::2]:
        path.write_bytes(path.read_bytes()[:40])  # cut inside the header: undecodable
    args = ["--img-size", "32", "--batch", "8", "--steps", "1", "--warmup", "0", "--workers", "0",
            "--out", str(tmp_path / "out")]
    row = loader.main(args + ["--data", str(tmp_path / "images"), "--paths", "folder"])["rows"][0]
    assert row["bad_samples"] > 0
    assert f"{row['bad_samples']} unreadable sample(s) replaced" in capsys.readouterr().out
    from fastvit.data.shards import main as write_shards
    assert write_shards([str(tmp_path / "images"), str(tmp_path / "wds"), "--no-verify"]) == 0
    monkeypatch.setattr(loader, "synthetic_folder", lambda *a, **k: pytest.fail("images written, never read"))
    rows = loader.main(args + ["--shards", str(tmp_path / "wds"), "--paths", "shards"])["rows"]
    assert [r["path"] for r in rows] == ["shards"] and rows[0]["bad_samples"] > 0


@pytest.mark.parametrize("script", ["kernel_report", "memory", "paired", "overhead", "loader", "throughput",
                                    "profile", "numerics", "ablation", "residual_dtype"])
def test_an_out_that_is_a_file_is_a_usage_error_before_any_work(script, tmp_path, monkeypatch, capsys):
    """--out naming a file is refused at once (status 2, naming it), not a traceback when the results are saved at
    the end of the work (five scripts lost a whole run's results so)."""
    module = _load_bench(script)
    (tmp_path / "afile").write_text("x")
    for name in ("run", "measure", "paired", "run_model", "run_op", "tiny_cases", "synthetic_folder"):
        if hasattr(module, name):  # no work may start
            monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(f"{script} worked before checking --out"))
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(tmp_path / "afile")])
    assert exit_info.value.code == 2
    assert f"--out {tmp_path / 'afile'} is a file, expected a folder" in capsys.readouterr().err


def test_residual_dtype_smoke(tmp_path):
    """Both residual dtypes: bytes kept (16-bit fewer), a step time and a digits accuracy each."""
    _run([sys.executable, "bench/residual_dtype.py", "--model", "tiny", "--steps", "1", "--seeds", "1",
          "--digits-steps", "3", "--out", str(tmp_path)])
    rows = _result(tmp_path / "residual_dtype.json")["rows"]
    assert [r["residual_dtype"] for r in rows] == ["float32", "autocast"]
    assert rows[1]["saved_mib_per_image"] < rows[0]["saved_mib_per_image"]
    assert all(r["step_s"] > 0 and 0 <= r["digits_top1_mean"] <= 100 for r in rows)


def test_paired_smoke(tmp_path):
    """Interleaved fastvit/timm pairs, both modes: a median between the quartiles for each clock; bad flags are
    argparse errors."""
    _run([sys.executable, "bench/paired.py", "--model", "tiny", "--batch", "8", "--pairs", "4", "--warmup", "1",
          "--out", str(tmp_path)])
    rows = _result(tmp_path / "paired.json")["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [("tiny", "infer"), ("tiny", "train")]
    for row in rows:
        for clock in ("wall", "cpu"):
            stats = row[clock]
            assert all(_positive_float(v) for v in stats.values()) and stats["q1"] <= stats["median"] <= stats["q3"]
    proc = subprocess.run([sys.executable, "bench/paired.py", "--mode", "eval"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown mode 'eval'" in proc.stderr


def test_paired_cast_runs_both_models_in_the_dtype_without_autocast(tmp_path, monkeypatch):
    """--cast: fastvit and timm cast to --dtype with their images, no autocast around the calls. fastvit's
    inference runs its best mode (the class-token last block) unless --no-class-token-inference."""
    paired = _load_bench("paired")
    seen, real = set(), paired.call

    def spy(model, x, y, mode, dtype):
        seen.add((next(model.parameters()).dtype, x.dtype, dtype, getattr(model, "class_token_inference", None)))
        return real(model, x, y, mode, dtype)
    monkeypatch.setattr(paired, "call", spy)
    for flag, fastvit_mode in (([], True), (["--no-class-token-inference"], False)):
        seen.clear()
        paired.main(["--model", "tiny", "--batch", "2", "--pairs", "4", "--warmup", "1", "--mode", "infer",
                     "--cast", "--out", str(tmp_path), *flag])
        assert seen == {(torch.bfloat16, torch.bfloat16, None, fastvit_mode), (torch.bfloat16, torch.bfloat16, None,
                                                                              None)}
    data = _result(tmp_path / "paired.json")
    assert data["cast"] is True and data["dtype"] == "bf16" and len(data["rows"]) == 1


def test_throughput_keeps_finished_rows_when_a_run_stops(tmp_path, monkeypatch):
    """throughput.json is rewritten after every row: a run that stops part-way (here at its second model; in
    bench/gpu_suite.sh, a step's time limit) leaves the rows it finished, marked incomplete."""
    throughput = _load_bench("throughput")
    _stop_at(throughput, "bench_model", "mini", monkeypatch)
    with pytest.raises(RuntimeError, match="stopped at mini"):
        throughput.main(["--smoke", "--model", "tiny,mini", "--mode", "infer", "--global-batch", "256",
                         "--micro-batch", "128", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    data = _result(tmp_path / "throughput.json")
    assert data["complete"] is False and [(r["model"], r["mode"]) for r in data["rows"]] == [("tiny", "infer")]


def test_profile_table_shows_busy_and_unlinked_kernel_time():
    """The profile table ends with each side's step, busy time and, for profiles that report it, the kernel time
    the profiler tied to no CPU call; older profile.json files (no unlinked_ms) leave that row out."""
    tables = _load_bench("tables")
    cats = {"GEMM": {"ms": 600.0, "pct": 40.0}}
    data = {"categories": ["GEMM"], "sides": {
        "fastvit": {"step_ms": 1500.0, "busy_ms": 1490.0, "unlinked_ms": 12.5, "categories": cats},
        "timm": {"step_ms": 1600.0, "busy_ms": 1590.0, "unlinked_ms": 0.0, "categories": cats}}}
    table = tables.profile_table(data)
    assert "| busy (some kernel running) | 1490.0 | 1590.0 |" in table
    assert "| kernels linked to no CPU call | 12.5 | 0.0 |" in table
    for side in data["sides"].values():
        del side["unlinked_ms"]
    assert "linked to no CPU call" not in tables.profile_table(data)


def test_summary_lists_the_measured_choices(tmp_path, monkeypatch):
    """What fastvit.autotune measured during a suite run (its cache file in the results folder, as gpu_suite.sh
    sets FASTVIT_CACHE_DIR) becomes a table of op, call and winner in summary.md."""
    from fastvit import autotune
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path / "autotune"))
    monkeypatch.setattr(autotune, "_environment", lambda index: ("NVIDIA H200", torch.__version__, "3.6.0"))
    monkeypatch.setattr(autotune, "can_measure", lambda: True)
    autotune.clear()
    times = {"ln+cublas": 2.0, "ln_gemm": 1.5, "ln_gemm_tma": 1.0}
    fields = (("rows", 50432), ("in", 768), ("out", 2304), ("candidates", tuple(times)))
    try:
        assert autotune.fastest("add_layer_norm_linear", 0, fields, list(times), lambda name: name, "ln+cublas",
                                measure=times.get) == "ln_gemm_tma"
    finally:
        autotune.clear()
    (tmp_path / "overhead.json").write_text(json.dumps({"env": {"gpu": "NVIDIA H200"}, "ops": []}))
    summary = (_load_bench("tables").summary(tmp_path)).read_text()
    assert "## Measured choices" in summary
    assert ("| add_layer_norm_linear | rows 50432, in 768, out 2304, candidates ln+cublas/ln_gemm/ln_gemm_tma "
            "| ln_gemm_tma |") in summary


def test_summary_heads_each_throughput_setting_and_flags_what_is_not_a_benchmark(tmp_path):
    """Throughput files of runs with other flags get their own headings (an eager run was once headed
    "--compile"); a run stopped part-way, one under the interpreter and one from another GPU say so."""
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "timm": "1.0.31", "triton_interpret": False}
    side = {"images_per_s": 100.0, "mfu": 0.3, "peak_mem_gib": 1.0}

    def write(folder, compiled, env=env, complete=True):
        row = {"model": "B/16", "mode": "train", "micro_batch": 256, "accum_steps": 16, "fastvit": side,
               "timm": side, "ratio": 1.0, "best": {"fastvit": "fastvit", "timm": "timm"}}
        data = {"dtype": "bf16", "backend": "auto", "compile": compiled, "compile_mode": "default" if compiled
                else None, "world_size": 1, "peak_tflops": 989.0, "peak_source": "H200 dense bf16",
                "rows": [row], "complete": complete, "env": env}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "throughput.json").write_text(json.dumps(data))

    write("throughput_b16", compiled=True)
    write("throughput_l16", compiled=False, complete=False)
    write("throughput_h14", compiled=False, env={**env, "gpu": "NVIDIA H100", "triton_interpret": True})
    summary = (_load_bench("tables").summary(tmp_path)).read_text()
    assert summary.startswith("# fastvit results: NVIDIA H200")
    assert summary.count("## Throughput (bench/throughput.py --compile)") == 1
    assert summary.count("## Throughput (bench/throughput.py)") == 1
    eager = summary.split("## Throughput (bench/throughput.py)")[1]
    assert "eager only" in eager and "**incomplete**" in eager and "**TRITON_INTERPRET=1**" in eager
    assert "measured with gpu NVIDIA H100 (not as in the header)" in eager
    assert "**incomplete**" not in summary.split("## Throughput (bench/throughput.py)")[0]


def test_throughput_table_says_where_inference_ran_the_class_token_alone():
    """An inference row of fastvit with its last block on the class token (bench/throughput.py's default) says so
    in its mode cell; training rows, older files and --no-class-token-inference rows keep the bare mode."""
    side = {"images_per_s": 100.0, "mfu": None, "peak_mem_gib": None}
    rows = [{"model": "B/16", "mode": mode, "micro_batch": 8, "accum_steps": 1, "fastvit": side, "timm": side,
             "ratio": 1.0, "best": {"fastvit": "fastvit", "timm": "timm"}, **extra}
            for mode, extra in (("train", {"backend_used": {"last_block": "class token"}}),
                                ("infer", {"backend_used": {"last_block": "class token"}}),
                                ("infer", {"backend_used": {"last_block": "every row"}}), ("infer", {}))]
    table = _load_bench("tables").throughput_table([{"rows": rows}]).splitlines()[2:]
    assert [line.split(" | ")[1] for line in table] == ["train", "infer (last block: class token)", "infer",
                                                        "infer"]


def test_tables_reads_a_throughput_file_in_the_folder_itself_and_checks_its_paths(tmp_path, capsys):
    """bench/throughput.py --out FOLDER writes FOLDER/throughput.json: tables.py FOLDER tabulates it (it read
    only gpu_suite.sh's throughput_*/ sub-folders and said "no results"); a missing folder or --readme file is a
    usage error before summary.md is written, and a folder of nothing names what it looks for."""
    tables = _load_bench("tables")
    side = {"images_per_s": 100.0, "mfu": None, "peak_mem_gib": None}
    row = {"model": "tiny", "mode": "train", "micro_batch": 8, "accum_steps": 1, "fastvit": side, "timm": side,
           "ratio": 1.0, "best": {"fastvit": "fastvit", "timm": "timm"}}
    (tmp_path / "throughput.json").write_text(json.dumps(
        {"dtype": "bf16", "backend": "auto", "compile": False, "compile_mode": None, "world_size": 1,
         "peak_tflops": None, "peak_source": "unknown", "rows": [row], "complete": True, "env": {}}))
    assert "| tiny | train |" in tables.summary(tmp_path).read_text()
    for args, message in (([str(tmp_path / "none")], "none is not a folder"),
                          ([str(tmp_path), "--readme", str(tmp_path / "NOPE.md")], "NOPE.md is not a file")):
        (tmp_path / "summary.md").unlink(missing_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            tables.main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "summary.md").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds none of throughput.json"):
        tables.summary(tmp_path / "empty")


def test_numerics_worst_table_takes_the_worst_ratio_per_cell():
    """The README's numerics table: per op, dtype and direction, the largest of both error ratios over every
    shape; a dtype or direction no row has is no column, a missing cell a dash."""
    tables = _load_bench("tables")
    rng = np.random.default_rng(0)
    rows = [{"name": name, "dtype": dtype, "direction": direction, "ratio_max_abs": float(rng.uniform(0, 2)),
             "ratio_mean_rel": float(rng.uniform(0, 2))}
            for name in ("attention", "tiny") for dtype in ("fp32", "bf16") for direction in ("fwd", "bwd")
            for _ in range(3) if not (name == "tiny" and direction == "bwd")]
    lines = tables.numerics_worst_table({"rows": rows}).splitlines()
    assert lines[0] == "| op / model | fp32 fwd | fp32 bwd | bf16 fwd | bf16 bwd |"
    cells = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in lines[2:]}
    for name in ("attention", "tiny"):
        for i, (dtype, direction) in enumerate([("fp32", "fwd"), ("fp32", "bwd"), ("bf16", "fwd"), ("bf16", "bwd")]):
            mine = [max(r["ratio_max_abs"], r["ratio_mean_rel"]) for r in rows
                    if (r["name"], r["dtype"], r["direction"]) == (name, dtype, direction)]
            assert cells[name][i] == (f"{max(mine):.2f}" if mine else "—"), (name, dtype, direction)


def test_readme_tables_are_rebuilt_between_their_markers(tmp_path):
    """``tables.py FOLDER --readme README.md`` replaces what lies between the two marker lines with the folder's
    throughput tables (smaller models first, an incomplete run named), headed by GPU, versions and the run's date,
    and leaves the rest of the README as it was; without both markers it refuses."""
    tables = _load_bench("tables")
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "timm": "1.0.29", "date": "2026-12-04"}
    side = {"images_per_s": 100.0, "mfu": 0.3, "peak_mem_gib": 1.0}
    for folder, model, flops, complete in (("throughput_h14", "H/14", 3e11, False), ("throughput_b16", "B/16", 3e10,
                                                                                       True)):
        row = {"model": model, "mode": "train", "micro_batch": 64, "accum_steps": 8, "fastvit": side, "timm": side,
               "ratio": 1.0, "best": {"fastvit": "fastvit", "timm": "timm"}, "flops_per_image": flops}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "throughput.json").write_text(json.dumps(
            {"dtype": "bf16", "backend": "auto", "compile": False, "compile_mode": None, "world_size": 1,
             "peak_tflops": 989.0, "peak_source": "H200 dense bf16", "rows": [row], "complete": complete,
             "env": env}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{tables.README_START}\nold table\n{tables.README_END}\nafter\n")
    tables.readme(tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{tables.README_END}\nafter\n")
    assert "old table" not in text and "measured 2026-12-04; NVIDIA H200, torch 2.11.0, triton 3.6.0" in text
    assert text.index("| B/16 | train |") < text.index("| H/14 | train |")
    assert "> H/14: **incomplete**" in text
    tables.readme(tmp_path, readme)  # again: the same text, the markers kept
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one line"):
        tables.readme(tmp_path, readme)


def test_summary_tabulates_the_attention_tilings_against_sm80s(tmp_path):
    """pytest-benchmark's JSON of a GPU run (op benchmarks with an ``impl`` parameter, the attention tiling ones
    with ``tiles``): the op table takes the first, a second table each tiling's time and its ratio to sm80's."""
    group = "attention backward tiles bf16 B=32 N=197 H=12 d=64"
    bench = [{"group": "attention fwd bf16", "params": {"op": "attention", "impl": impl, "direction": "fwd"},
              "stats": {"median": t}} for impl, t in (("fastvit", 2e-5), ("torch", 4e-5))]
    bench += [{"group": group, "params": {"tiles": tiles}, "stats": {"median": t}}
              for tiles, t in (("sm80", 4e-4), ("sm90@0", 3e-4), ("sm90@1", 5e-4))]
    (tmp_path / "ops_benchmark.json").write_text(json.dumps({"benchmarks": bench}))
    summary = (_load_bench("tables").summary(tmp_path)).read_text()
    assert "| attention fwd bf16 | 20.0 | 40.0 | 0.50 |" in summary
    assert "## Attention dK/dV tilings" in summary
    for row in ("| sm80 | 400.0 | 1.00 |", "| sm90@0 | 300.0 | 0.75 |", "| sm90@1 | 500.0 | 1.25 |"):
        assert row in summary


def test_throughput_inference_runs_the_class_token_alone_unless_told(tmp_path, monkeypatch, capsys):
    """fastvit's inference column runs its last block on the class token alone (set_class_token_inference), and
    the row says so; --no-class-token-inference runs every row. Counted by fc1 rows of the last block's MLP."""
    from fastvit.model import Block
    throughput = _load_bench("throughput")
    rows_seen = []
    forward_pair = Block.forward_pair

    def recording(self, h, *args, **kw):
        out = forward_pair(self, h, *args, **kw)
        rows_seen.append(out[0].shape[1])
        return out
    monkeypatch.setattr(Block, "forward_pair", recording)
    for flag, last_block, rows in (([], "class token", 1), (["--no-class-token-inference"], "every row", 17)):
        rows_seen.clear()
        throughput.main(["--smoke", "--model", "tiny", "--mode", "infer", "--global-batch", "8", "--micro-batch",
                         "8", "--steps", "1", "--warmup", "1", "--out", str(tmp_path), *flag])
        row = _result(tmp_path / "throughput.json")["rows"][0]
        assert row["backend_used"]["last_block"] == last_block
        assert f"last block: {last_block}" in capsys.readouterr().out
        # tiny: 2 blocks of 16 patches + the class token; fastvit's blocks only (timm's are timm's Block)
        assert rows_seen[1::2] == [rows] * (len(rows_seen) // 2) and rows_seen[0::2] == [17] * (len(rows_seen) // 2)


def test_throughput_takes_the_median_step_and_says_when_steps_vary(tmp_path, monkeypatch, capsys):
    """One step slowed by the machine (here a 0.5 s sleep in one timed step) neither sets images/s (the median
    step does) nor passes unsaid: the row says the steps varied and points to bench/paired.py."""
    throughput = _load_bench("throughput")
    real, calls = throughput.Runner.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 4:  # after the two columns' warm-up steps: a timed one
            time.sleep(0.5)
        return real(self)
    monkeypatch.setattr(throughput.Runner, "step", step)
    throughput.main(["--smoke", "--model", "tiny", "--mode", "infer", "--global-batch", "8", "--micro-batch", "8",
                     "--steps", "3", "--warmup", "1", "--out", str(tmp_path)])
    row = _result(tmp_path / "throughput.json")["rows"][0]
    slow = max(row["columns"], key=lambda col: max(row[col]["step_seconds"]))
    assert max(row[slow]["step_seconds"]) > 0.5 and row[slow]["step_spread"] > 1.5
    assert row[slow]["images_per_s"] > 8 / 0.5  # the median step is not the slow one
    assert "steps varied up to" in capsys.readouterr().out


def test_scripts_check_their_arguments_before_running(tmp_path):
    """Bad model names, empty lists, batch and warm-up signs and --compile-mode without --compile are usage errors
    before anything runs (they were tracebacks after the first models, silent defaults, or ignored)."""
    parser = argparse.ArgumentParser(prog="x")
    for text, message in [("tiny,nosuch", "unknown model 'nosuch'"), ("", "no model given")]:
        with pytest.raises(SystemExit):
            common.model_list(parser, text)
    assert common.model_list(parser, "B/16,tiny,vit_small_patch16_224") == ["B/16", "tiny", "vit_small_patch16_224"]
    with pytest.raises(SystemExit):
        common.choice_list(parser, "", ("train", "infer"), "mode")
    cases = [(["bench/throughput.py", "--model", "tiny,nosuch"], "unknown model 'nosuch'"),
             (["bench/throughput.py", "--mode", ""], "no mode given"),
             (["bench/throughput.py", "--compile-mode", "max-autotune"], "--compile-mode max-autotune needs --compile"),
             (["bench/throughput.py", "--warmup", "0"], "--warmup must be at least 1, got 0"),
             (["bench/throughput.py", "--global-batch", "100", "--micro-batch", "30"],
              "--global-batch 100 must be a multiple of --micro-batch 30"),
             (["bench/profile.py", "--global-batch", "-64"], "--global-batch must be at least 1, got -64"),
             (["bench/profile.py", "--model", "B/16,L/16"], "profiles one model at a time"),
             (["bench/overhead.py", "--ops", "ln_matmul"], "unknown op 'ln_matmul'"),
             (["bench/loader.py", "--workers", "a"], "--workers takes a comma list of worker counts"),
             (["bench/loader.py", "--img-size", "0"], "--img-size must be at least 1"),
             (["bench/loader.py", "--throughput", str(tmp_path / "none.json")],
              "none.json: not a readable throughput.json of bench/throughput.py (FileNotFoundError")]
    if not torch.cuda.is_available():
        cases.append((["bench/numerics.py", "--device", "cuda"], "--device cuda: torch sees 0 CUDA GPU(s) here"))
    for args, message in cases:
        proc = subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-1000:])


@pytest.mark.parametrize("columns, heights", [(("fastvit", "fastvit_compile", "timm", "timm_compile"),
                                                (3000, 3100, 2700, 3400, 2900, 3050, 3300, 3200)),
                                               (("fastvit", "timm"), (30000, 9000, 300, 300))])
def test_bar_chart_legend_covers_no_bar_or_ratio(columns, heights, tmp_path, monkeypatch):
    """The throughput chart's legend sits in headroom above the bars and their ratios (four columns of the
    --compile run covered the tallest bars before), on a linear and a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    common = _load_bench("common")
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    values = iter(heights)
    rows = [{"model": m, "ratio": 1.1, **{c: next(values) for c in columns}} for m in ("B/16", "H/14")]
    common.bar_chart(rows, lambda r, c: r[c], [r["model"] for r in rows], "images / s", tmp_path / "t.png",
                     "title", log_if_spread=True, columns=columns)
    (fig,) = kept
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x1 <= ax.get_window_extent(renderer).x1  # inside the axes
    covered = [a for a in [*ax.patches, *ax.texts] if a.get_window_extent(renderer).overlaps(legend)]
    assert not covered
    plt.close(fig)
