"""bench/kernel_report.py compiles the LayerNorm and bias+GELU kernels for sm_80/sm_90 without a GPU, reports
their resources in JSON and finds no spill; its spill detector flags a kernel that does spill."""
import dataclasses
import json
import pathlib
import subprocess
import sys

from fastvit.kernels import bias_gelu
from fastvit.kernels._report import MODELS, compile_spec

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_report_for_vit_base_has_no_spills(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--models", "vit_base_patch16_224",
         "--kernels", "layer_norm", "bias_gelu", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    rows = report["kernels"]
    seen = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    expected = {(k, dt, arch) for k in ("add_layer_norm_fwd", "add_layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd")
                for dt in ("fp16", "bf16") for arch in ("sm_80", "sm_90")}
    assert seen == expected
    for r in rows:
        assert r["model"] == "vit_base_patch16_224"
        assert 0 < r["registers"] <= 255
        assert r["stack"] == 0 and r["local"] == 0, r
        assert 0 <= r["shared"] <= r["shared_limit"]
        assert r["num_warps"] in (1, 2, 4, 8, 16) and r["constexprs"]
    assert {r["constexprs"]["BLOCK"] for r in rows if r["module"] == "layer_norm"} == {1024}


def test_spilling_kernel_is_flagged():
    """A bias+GELU backward tile of 4x1024 values on one warp cannot fit in registers: the report says so."""
    spec = bias_gelu.aot_specs(MODELS["vit_base_patch16_224"], "fp16")[1]
    spec = dataclasses.replace(spec, constexprs={**spec.constexprs, "BLOCK_M": 4, "BLOCK_N": 1024}, num_warps=1)
    res = compile_spec(spec, 90)
    assert res["stack"] + res["local"] > 0 and res["ok"] is False
