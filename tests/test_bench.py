"""CPU smoke of the benchmark scripts (small settings, each in a subprocess). The FLOP count the throughput script
uses is tested in tests/test_flops.py, the saved-activation counter the memory script uses in tests/test_memory.py."""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

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


def _positive_float(v):
    return isinstance(v, float) and v > 0 and v == v and v != float("inf")


# ---- the scripts ------------------------------------------------------------------------------------------------

def test_numerics_smoke(tmp_path):
    """Under the Triton interpreter (the script re-executes itself with TRITON_INTERPRET=1): the kernels run in
    fp32/fp16, bf16 goes through the torch fallback, and each row says which ran."""
    _run([sys.executable, "bench/numerics.py", "--interpret", "--quick", "--models", "tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "numerics.json").read_text())
    assert (tmp_path / "numerics.md").read_text().startswith("# fastvit numerics")
    rows = data["rows"]
    ops = {r["name"] for r in rows if r["kind"] == "op"}
    assert ops == {"patch_embed", "add_layer_norm", "bias_gelu", "attention", "add_layer_norm_linear",
                   "bias_gelu_linear"}
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


def test_memory_smoke(tmp_path):
    _run([sys.executable, "bench/memory.py", "--models", "tiny,mini", "--batch", "2", "--no-gpu",
          "--out", str(tmp_path)])
    data = json.loads((tmp_path / "memory.json").read_text())
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


def _check_throughput(data, world, micro, modes):
    assert data["world_size"] == world and data["smoke"] and data["global_batch"] == 512
    assert [r["mode"] for r in data["rows"]] == modes
    for r in data["rows"]:
        assert r["global_batch"] == 512 == world * r["micro_batch"] * r["accum_steps"] and r["micro_batch"] == micro
        fwd = forward_flops(common.build_model("tiny", "timm"))
        assert r["flops_per_image"] == fwd * (3 if r["mode"] == "train" else 1)
        assert r["backend_used"] == {"ops": "torch", "attention": "torch"}
        for impl in ("fastvit", "timm"):
            v = r[impl]
            assert _positive_float(v["images_per_s"]) and _positive_float(v["tflops"])
            assert v["tflops"] == pytest.approx(v["images_per_s"] * r["flops_per_image"] / 1e12)
            assert v["mfu"] is None and v["peak_mem_gib"] is None  # CPU: no peak to divide by, no CUDA memory
            assert len(v["step_seconds"]) == data["steps"]
        assert _positive_float(r["ratio"])
        assert r["ratio"] == pytest.approx(r["fastvit"]["images_per_s"] / r["timm"]["images_per_s"])


def test_throughput_smoke(tmp_path):
    out = _run([sys.executable, "bench/throughput.py", "--smoke", "--model", "tiny", "--global-batch", "512",
                "--micro-batch", "128", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert "SMOKE CONFIGURATION" in out
    data = json.loads((tmp_path / "throughput.json").read_text())
    _check_throughput(data, 1, 128, ["train", "infer"])
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_torchrun_two_ranks(tmp_path):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "bench/throughput.py", "--smoke", "--model", "tiny", "--mode", "train", "--global-batch", "512",
          "--micro-batch", "64", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    _check_throughput(json.loads((tmp_path / "throughput.json").read_text()), 2, 64, ["train"])


def test_ops_benchmark_smoke():
    """Every benchmark body ran once and its result check passed: the summary line counts only passes."""
    out = _run([sys.executable, "-m", "pytest", "bench/test_ops_benchmark.py", "--benchmark-disable", "-q",
                "-p", "no:cacheprovider"])
    summary = re.search(r"^=*\s*(\d+ passed.*) in [\d.]+s", out, re.M)
    assert summary, out[-3000:]
    counts = {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", summary.group(1))}
    assert counts["passed"] > 0 and set(counts) <= {"passed", "warning"}, summary.group(0)


def test_ablation_smoke(tmp_path):
    """bench/ablation.py with tiny settings: two Table 8 variants x 2 seeds, 5-shot accuracy per run, the table
    beside the paper's values, JSON and PNG."""
    out = _run([sys.executable, "bench/ablation.py", "--seeds", "2", "--fewshot-seeds", "1", "--variants",
                "none:stem,learn_2d:every_layer_shared", "--steps", "3", "--embed-dim", "32", "--depth", "2",
                "--num-heads", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "ablation.json").read_text())
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


def test_loader_smoke(tmp_path):
    """bench/loader.py on a few synthetic JPEGs: ImageFolder and shard paths through the trainer's loader, rates
    per worker, the ratio to the model's training img/s taken from a throughput.json, JSON and PNG."""
    throughput = {"world_size": 2, "rows": [{"mode": "infer", "model": "tiny", "fastvit": {"images_per_s": 1e6}},
                                            {"mode": "train", "model": "tiny", "fastvit": {"images_per_s": 100.0}}]}
    (tmp_path / "throughput.json").write_text(json.dumps(throughput))
    out = _run([sys.executable, "bench/loader.py", "--images", "24", "--img-size", "32", "--batch", "8", "--steps",
                "2", "--warmup", "1", "--workers", "1", "--paths", "folder,shards,shards-gpu",
                "--throughput", str(tmp_path / "throughput.json"), "--out", str(tmp_path)])
    data = json.loads((tmp_path / "loader.json").read_text())
    assert [(r["path"], r["workers"]) for r in data["rows"]] == [("folder", 1), ("shards", 1)]  # no CUDA here
    assert "no CUDA device: skipping the shards-gpu path" in out
    assert data["model_images_per_s_per_gpu"] == 50.0 and data["synthetic"]
    for r in data["rows"]:
        assert _positive_float(r["images_per_s"]) and r["ratio_to_model"] == pytest.approx(r["images_per_s"] / 50)
    assert "x, meets the 1.5x goal" in out or "x, misses the 1.5x goal" in out
    assert (tmp_path / "loader.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
