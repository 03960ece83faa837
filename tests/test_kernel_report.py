"""bench/kernel_report.py compiles the LayerNorm and bias+GELU kernels for sm_80/sm_90 without a GPU, reports
their resources in JSON and finds no spill; its spill detector flags a kernel that does spill. The specs are those
a model's real launches get from Triton's JIT (every kernel; attention in each bias/dropout variant; the fused-GEMM
ops in each of theirs), and the attention kernels compile without spills at head dims 64 and 80."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from _helpers import route_launches
import fastvit
from fastvit import ops
from fastvit.kernels import _launch, bias_gelu, layer_norm
from fastvit.kernels import flash_attention as fa
from fastvit.kernels._launch import TRITON_VERSION
from fastvit.kernels._report import (AOT_IMAGES, MODELS, TORCH_DTYPES, collect_specs, compile_spec,
                                     serialization_reason)
from fastvit.model import Attention

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_flag_offers_the_modules_that_list_launches():
    """--kernels offers each module with aot_specs; matmul's GEMM is listed by the fused-matmul modules, so naming it
    alone is refused by the parser instead of ending in 'no kernel specs found'."""
    from fastvit.kernels._report import kernel_modules
    names = kernel_modules()
    assert "matmul" not in names and {"layer_norm", "bias_gelu", "flash_attention", "patch_embed", "ln_matmul",
                                      "gelu_matmul", "matmul_residual"} <= set(names)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--kernels", "matmul"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'matmul'" in proc.stderr, proc.stderr


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
    seen = {(r["kernel"], r["dtype"], r["arch"], r["constexprs"].get("APPROXIMATE")) for r in rows}
    expected = {(k, dt, arch, None) for k in ("add_layer_norm_fwd", "add_layer_norm_bwd")
                for dt in ("fp16", "bf16") for arch in ("sm_80", "sm_90")}
    expected |= {(k, dt, arch, approximate) for k in ("bias_gelu_fwd", "bias_gelu_bwd") for dt in ("fp16", "bf16")
                 for arch in ("sm_80", "sm_90") for approximate in bias_gelu.APPROXIMATIONS}
    assert seen == expected
    for r in rows:
        assert r["model"] == "vit_base_patch16_224"
        assert 0 < r["registers"] <= 255
        assert r["stack"] == 0 and r["local"] == 0, r
        assert 0 <= r["shared"] <= r["shared_limit"]
        assert r["num_warps"] in (1, 2, 4, 8, 16) and r["constexprs"]
    assert {r["constexprs"]["BLOCK"] for r in rows if r["module"] == "layer_norm"} == {1024}


def test_report_compiles_in_parallel_to_the_same_records(monkeypatch):
    """--jobs N compiles in N forked processes: the same records, in the same order, as one at a time."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "bench" / "kernel_report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kernel_report", report)  # the workers find _compile_job by its name
    spec.loader.exec_module(report)
    args = (["vit_base_patch16_224"], ["bf16"], [90], ["bias_gelu"])
    serial, parallel = report.run(*args, jobs=1), report.run(*args, jobs=2)
    # the exact GELU, tanh, sigmoid; each with an fp32 bias (AMP) and a bf16 one (a model cast to bf16); the
    # backward on every token and on the class token's rows
    assert [r["kernel"] for r in serial] == ["bias_gelu_fwd", "bias_gelu_bwd", "bias_gelu_bwd"] * 6
    approximations = [r["constexprs"]["APPROXIMATE"] for r in serial]
    assert approximations == [a for a in ("none", "tanh", "sigmoid") for _ in range(6)]
    assert parallel == serial


def test_report_compiles_each_variant_once(monkeypatch):
    """B/16 and L/16 launch many of the same LayerNorm variants (widths 768 and 1024 both take 1024-wide blocks):
    each distinct compilation (kernel, signature, constexprs, alignment, warps, stages, arch) runs once, and every
    record gets its variant's result."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "bench" / "kernel_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    compiled = []

    def fake_compile(spec, arch):
        compiled.append((spec, arch))
        return {"ok": True, "registers": len(compiled)}
    monkeypatch.setattr(report, "compile_spec", fake_compile)
    models = ["vit_base_patch16_224", "vit_large_patch16_224"]
    records = report.run(models, ["bf16"], [80, 90], ["layer_norm"], jobs=1)
    specs = [(s, arch) for m in models for _, s in collect_specs(MODELS[m], "bf16", ["layer_norm"])
             for arch in (80, 90) if arch in s.archs]
    assert len(records) == len(specs)

    def variant(s, arch):
        return (s.fn, tuple(s.signature.items()), sorted(s.constexprs.items()), s.aligned, s.num_warps,
                s.num_stages, arch)
    distinct = []
    for s, arch in specs:
        if variant(s, arch) not in distinct:
            distinct.append(variant(s, arch))
    assert len(compiled) == len(distinct) < len(specs)
    for (s, arch), rec in zip(specs, records):
        assert rec["registers"] == distinct.index(variant(s, arch)) + 1 and rec["kernel"] == s.name


def test_spilling_kernel_is_flagged():
    """A bias+GELU backward tile of 4x1024 values on one warp cannot fit in registers: the report says so."""
    spec = bias_gelu.aot_specs(MODELS["vit_base_patch16_224"], "fp16")[1]
    spec = dataclasses.replace(spec, constexprs={**spec.constexprs, "BLOCK_M": 4, "BLOCK_N": 1024}, num_warps=1)
    res = compile_spec(spec, 90)
    assert res["stack"] + res["local"] > 0 and res["ok"] is False


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of running."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


try:  # Triton's JIT binder: internals of triton 3.8, which other versions may lack or change
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    _JIT_BINDER = hasattr(JITFunction, "_pack_args")
except ImportError:
    _JIT_BINDER = False


def _jit_specialization(fn, args, kwargs):
    """(signature, constexprs by name, aligned names) that Triton's JIT derives for this launch on sm_90 (its own
    binder; triton 3.8 internals)."""
    backend = make_backend(GPUTarget("cuda", 90, 32))
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args,
                                                                                                      **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = fn.arg_names
    return (signature, {names[i]: v for (i,), v in constexprs.items()},
            {names[i] for (i,), a in attrs.items() if ["tt.divisibility", 16] in a})


@pytest.mark.skipif(not _JIT_BINDER, reason="this triton lacks the JIT binder internals the test reuses "
                    "(triton.runtime.jit.create_function_from_signature, JITFunction._pack_args; triton 3.8 has them)")
@pytest.mark.parametrize("model,dtype,table,dropout", [
    *((m, "bf16", t, d) for m in MODELS for t, d in ((None, False), (None, True), ("fp32", True), ("bf16", False))),
    ("vit_base_patch16_224", "fp16", "fp32", False), ("vit_base_patch16_224", "fp16", "fp16", True)])
def test_attention_specs_match_a_model_launch(monkeypatch, model, dtype, table, dropout):
    """The model's attention layer after its qkv projection (what a Block runs), forward and backward on CPU with
    the four kernels recorded: the JIT's specialisation of each launch (pointer dtypes, unit strides as constexpr
    1, 16-divisible args and pointers) and its warps/stages equal the spec aot_specs gives the report for that
    variant. A fp32 table is the AMP case (autocast), an activation-dtype table a model cast to that dtype, whose
    kernels get an fp32 copy of it (the "bias(fp32)" spec). fp16 runs on ViT-B only: CPU fp16 matmuls are slow and
    only the pointer dtypes change."""
    shape, dt = MODELS[model], TORCH_DTYPES[dtype]
    grid = shape.img_size // shape.patch
    label = f"hd={shape.head_dim} N={shape.tokens} " + (
        "+".join((["bias(fp32)"] if table else []) + (["dropout"] if dropout else [])) or "plain")
    # the launches take an sm_90's tiles (flash_attention.device_arch of a CPU tensor), compiled for 90
    specs = {s.fn: s for s in fa.aot_specs(shape, dtype)
             if s.label in (label, label.rsplit(" ", 1)[0]) and fa.device_arch(torch.device("cpu")) in s.archs}
    kernels = [fa._attn_fwd_kernel, fa._attn_bwd_preprocess_kernel, fa._attn_bwd_dkdv_kernel, fa._attn_bwd_dq_kernel]
    assert set(specs) == set(kernels)
    calls = []
    for name in ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(fa, name, _LaunchRecorder(getattr(fa, name), calls))
    monkeypatch.setattr(ops, "use_triton", lambda backend, x: True)
    attn = Attention(shape.dim, shape.heads, attn_drop=0.1 if dropout else 0.0,
                     rel_pos_grid=(grid, grid) if table else None).train()
    attn.backend = "triton"
    amp = table is None or table == "fp32"
    if not amp:
        attn.to(dt)
    qkv = torch.randn(1, shape.tokens, 3 * shape.dim, dtype=dt, requires_grad=True)
    with torch.autocast("cpu", dtype=dt, enabled=amp):
        out = attn.attend(qkv)
    out.float().sum().backward()

    assert [c[0] for c in calls] == kernels
    for fn, args, kwargs in calls:
        spec = specs[fn]
        signature, constexprs, aligned = _jit_specialization(fn, args, kwargs)
        assert signature == spec.signature, spec.name
        assert constexprs == spec.constexprs, spec.name
        assert aligned == set(spec.aligned), (spec.name, aligned ^ set(spec.aligned))
        assert (kwargs["num_warps"], kwargs["num_stages"]) == (spec.num_warps, spec.num_stages)


@pytest.mark.parametrize("model", ["vit_base_patch16_224", "vit_huge_patch14_224"])
def test_attention_kernels_do_not_spill(model):
    """Head dims 64 and 80, bf16: the preprocess and the largest variants (table + dropout) of the forward, dK/dV
    (each arch's default tiles) and dQ kernels fit in registers and shared memory on sm_80 and
    sm_90, and their dots run on wgmma on sm_90 (mma.sync on sm_80). The full set is bench/kernel_report.py's job."""
    shape = MODELS[model]
    specs = [s for s in fa.aot_specs(shape, "bf16")
             if s.name == "attn_bwd_preprocess" or s.label.endswith("bias(fp32)+dropout")]
    cfg = fa._config(shape.head_dim)
    compiled = set()
    for spec in specs:
        for arch in spec.archs:
            blocks = {"attn_fwd": cfg.fwd, "attn_bwd_dkdv": fa.backward_tiles(shape.head_dim, arch)[0],
                      "attn_bwd_dq": cfg.bwd_dq, "attn_bwd_preprocess": cfg.preprocess}[spec.name]
            assert (spec.constexprs["BLOCK_M"], spec.num_warps) == (blocks.block_m, blocks.num_warps), spec.label
            res = compile_spec(spec, arch)
            assert res["ok"] and 0 < res["registers"] <= 255, (spec.name, spec.label, arch, res)
            expected = "none" if spec.name == "attn_bwd_preprocess" else {80: "mma.sync", 90: "wgmma"}[arch]
            assert res["mma"] == expected, (spec.name, spec.label, arch, res["mma"])
            compiled.add((spec.name, arch))
    assert len(compiled) == 8  # four kernels, two archs


def test_the_default_hot_paths_keep_their_wgmma_asynchronous():
    """ViT-B/16, bf16, sm_90: ptxas serialises no wgmma (its note C7515, read from Triton's own ptxas log) in the
    attention kernels' default variants nor in any fused GEMM as sm_90 launches it (pointer loads and persistent
    TMA, every prologue; on Triton 3.6 that needs the TMA kernel's loops unflattened, matmul.FLATTEN). It does in
    the GELU-prologue GEMM at its sm_80 tiles (K steps of 32), which shows the note is read and is why sm_90 takes
    steps of 64."""
    shape = MODELS["vit_base_patch16_224"]
    specs = [s for _, s in collect_specs(shape, "bf16", ["flash_attention", "gelu_matmul", "ln_matmul",
                                                         "matmul_residual"])]
    plain = [s for s in specs if s.label == f"hd={shape.head_dim} N={shape.tokens} plain" and 90 in s.archs
             and s.name != "attn_bwd_preprocess"]
    gemms = [s for s in specs if "matmul" in s.name and 90 in s.archs and s.constexprs["APPROXIMATE"] == "none"]
    assert len(plain) == 3 and {s.name for s in gemms} == {"gelu_matmul", "ln_matmul", "matmul_residual",
                                                           "gelu_matmul_tma", "ln_matmul_tma", "matmul_residual_tma"}
    # Triton 3.6 serialises the pointer-load GEMM with an fp32 residual at 128 x 128 tiles whatever its K step and
    # stages (its TMA twin, which an sm_90 GPU also measures, it does not); 3.7 and 3.8 serialise neither
    before_37 = TRITON_VERSION < (3, 7)
    for spec in plain + gemms:
        res = compile_spec(spec, 90)
        known = before_37 and spec.name == "matmul_residual" and spec.signature["RES"] == "*fp32"
        assert res["mma"] == "wgmma" and res["wgmma_serialized"] == known, (spec.name, spec.label)
    sm80_gelu = next(s for s in specs if s.name == "gelu_matmul" and s.archs == (80,))
    res = compile_spec(sm80_gelu, 90)
    assert sm80_gelu.constexprs["BLOCK_K"] == 32 and res["wgmma_serialized"]
    assert res["wgmma_serialized_reason"].startswith("non wgmma instructions defining accumulator registers")


def test_serialization_reason_reads_ptxas_note():
    """ptxas's C7515 line (as Triton's log dump prints it) gives its reason; no note, no reason."""
    note = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
            "insufficient register resources for the wgmma pipeline in the function 'k'")
    log = f"ptxas info    : Compiling entry function 'k' for 'sm_90a'\n{note}\nptxas info    : Used 168 registers"
    assert serialization_reason(log) == "insufficient register resources for the wgmma pipeline"
    assert serialization_reason(log.replace(note, "")) is None


def test_the_report_fails_mma_sync_on_sm90():
    """The dK/dV kernel at the tiles it had before Hopper's (32 keys on 8 warps, below wgmma's 64 rows per
    warpgroup) issues mma.sync, which the report counts as a failure on sm_90 and not on sm_80."""
    shape = MODELS["vit_base_patch16_224"]
    spec = next(s for s in fa.aot_specs(shape, "bf16") if s.name == "attn_bwd_dkdv" and s.archs == (80,))
    assert spec.constexprs["BLOCK_N"] == 32
    sm80, sm90 = compile_spec(spec, 80), compile_spec(spec, 90)
    assert (sm80["mma"], sm80["ok"]) == ("mma.sync", True)
    assert (sm90["mma"], sm90["ok"]) == ("mma.sync", False) and sm90["stack"] == sm90["local"] == 0


def _fused_gemm_launches(monkeypatch, shape, dt):
    """The kernel launches of the fused-GEMM ops as a model under autocast makes them (bf16/fp16 activations, fp32
    parameters, the residual stream in the activation dtype or fp32), with each GEMM kernel (the pointer-load one
    as on an sm_80 and an sm_90 GPU, the TMA one as on sm_90), recorded instead of run."""
    from fastvit.kernels import gelu_matmul, layer_norm, ln_matmul, matmul, matmul_residual
    calls = []
    for name in ("_fused_matmul_kernel", "_fused_matmul_tma_kernel"):
        monkeypatch.setattr(matmul, name, _LaunchRecorder(getattr(matmul, name), calls))
    monkeypatch.setattr(matmul, "tma_supported", lambda a, weight, out_dtype: True)
    monkeypatch.setattr(layer_norm, "_add_ln_fwd_kernel", _LaunchRecorder(layer_norm._add_ln_fwd_kernel, calls))
    d, m = shape.dim, shape.tokens
    g = torch.Generator().manual_seed(0)

    def t(*s, dtype=torch.float32):
        return torch.randn(s, generator=g).to(dtype)
    with torch.autocast("cpu", dtype=dt):
        for arch, tma in ((80, False), (90, False), (90, True)):  # the tiles of an A100 and of an H100 / H200
            monkeypatch.setattr(matmul, "device_arch", lambda device, arch=arch: arch)
            _launch.forget()  # launch plans are per device, whose arch never changes outside this test
            for residual, fp32 in ((None, False), (t(m, d, dtype=dt), False), (t(m, d), True)):
                # qkv with its bias; fc1 without (ops.layer_norm_mlp adds it in fc2's GELU)
                for n, bias in ((3 * d, t(3 * d)), (shape.mlp_dim, None)):
                    ln_matmul.ln_matmul(t(m, d, dtype=dt), residual, t(d), t(d), t(n, d), bias, 1e-6, fp32, True, tma)
            for approximate in bias_gelu.APPROXIMATIONS:  # fc2, with fc1's bias in its GELU
                gelu_matmul.gelu_matmul(t(m, shape.mlp_dim, dtype=dt), t(shape.mlp_dim), t(d, shape.mlp_dim), t(d),
                                        True, approximate, tma)
            for k in (d, shape.mlp_dim):
                for res_dtype in (dt, torch.float32):
                    matmul_residual.matmul_residual(t(m, k, dtype=dt), t(d, k), t(d), t(m, d, dtype=res_dtype), True,
                                                    tma)
    return calls


@pytest.mark.skipif(not _JIT_BINDER, reason="this triton lacks the JIT binder internals the test reuses")
@pytest.mark.parametrize("model,dtype", [("vit_base_patch16_224", "bf16"), ("vit_huge_patch14_224", "fp16")])
def test_fused_gemm_specs_cover_every_launch(monkeypatch, model, dtype):
    """Each launch of the statistics pass and the fused GEMM (ln_matmul for qkv and fc1, gelu_matmul for fc2,
    matmul_residual for proj and fc2) specialises, in Triton's JIT, exactly as one of the specs the kernel report
    compiles, with the same warps and stages; and every GEMM spec is launched."""
    from fastvit.kernels import gelu_matmul, ln_matmul, matmul_residual
    shape = MODELS[model]
    specs = [s for mod in (ln_matmul, gelu_matmul, matmul_residual) for s in mod.aot_specs(shape, dtype)]
    calls = _fused_gemm_launches(monkeypatch, shape, TORCH_DTYPES[dtype])
    assert len(calls) == 3 * (6 + 6 + 3 + 4)  # per GEMM kernel and arch, ln_matmul: statistics + GEMM, 6 times
    matched = set()
    for fn, args, kwargs in calls:
        signature, constexprs, aligned = _jit_specialization(fn, args, kwargs)
        hits = [i for i, s in enumerate(specs) if s.fn is fn and s.signature == signature
                and s.constexprs == constexprs and set(s.aligned) == aligned
                and (s.num_warps, s.num_stages) == (kwargs["num_warps"], kwargs.get("num_stages", 1))]
        assert hits, (fn, signature, constexprs, aligned)
        matched.update(hits)
    assert {specs[i].name for i in matched} == {"add_layer_norm_stats", "ln_matmul", "gelu_matmul",
                                               "matmul_residual", "ln_matmul_tma", "gelu_matmul_tma",
                                               "matmul_residual_tma"}
    assert matched >= {i for i, s in enumerate(specs) if s.name != "add_layer_norm_stats"}


@pytest.mark.skipif(not _JIT_BINDER, reason="this triton lacks the JIT binder internals the test reuses")
@pytest.mark.parametrize("model", ["vit_base_patch16_224", "vit_huge_patch14_224"])
def test_every_model_launch_has_its_spec(monkeypatch, model):
    """A one-block model at the full width, forward (and forward_features) and backward over AOT_IMAGES images, then
    an eval-mode forward without grad, with every kernel launch recorded (CPU; nothing runs), under AMP (fp32 and
    bf16 residual stream) and cast to bf16:
    each launch of every kernel is, in Triton's JIT's own specialisation, one of the specs bench/kernel_report.py
    compiles; and every LayerNorm, bias+GELU and patch embedding spec is some launch (attention's bias and dropout
    variants: test_attention_specs_match_a_model_launch).
    """
    calls = []
    route_launches(monkeypatch, lambda real, kernel, grid, *args, **kwargs: calls.append((kernel, args, kwargs)))
    monkeypatch.setattr(ops, "use_triton", lambda backend, x: True)
    shape = MODELS[model]
    specs = [s for _, s in collect_specs(shape, "bf16")]
    matched = set()
    for variant, act_layer in (("amp", "gelu"), ("amp16", "gelu"), ("half", "gelu"), ("amp", "gelu_tanh"),
                               ("amp", "quick_gelu"), ("half", "gelu_tanh"), ("half", "quick_gelu")):
        torch.manual_seed(0)
        vit = fastvit.VisionTransformer(patch_size=shape.patch, embed_dim=shape.dim, depth=1, num_heads=shape.heads,
                                        mlp_ratio=shape.mlp_dim / shape.dim, act_layer=act_layer,
                                        residual_dtype=torch.bfloat16 if variant == "amp16" else torch.float32)
        x = torch.randn(AOT_IMAGES, 3, shape.img_size, shape.img_size)
        if variant == "half":
            vit, x = vit.to(torch.bfloat16), x.to(torch.bfloat16)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "half"):
            out = vit(x.requires_grad_())  # the final norm on the class tokens
            features = vit.forward_features(x)  # on every token, as a feature extractor trains it
        (out.float().sum() + features.float().sum()).backward()
        # eager inference launches the forward kernels without their autograd Functions (the LayerNorm keeps no
        # statistics): the same compiled variants
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "half"):
            vit.eval()(x)
        assert {c[0] for c in calls} >= {layer_norm._add_ln_fwd_kernel, layer_norm._add_ln_bwd_kernel,
                                         bias_gelu._bias_gelu_fwd_kernel, bias_gelu._bias_gelu_bwd_kernel}
        for fn, args, kwargs in calls:
            signature, constexprs, aligned = _jit_specialization(fn, args, kwargs)
            launch = (signature, constexprs, aligned, kwargs.get("num_warps"), kwargs.get("num_stages"))
            found = [s for s in specs if s.fn is fn and (s.signature, s.constexprs, set(s.aligned), s.num_warps,
                                                         s.num_stages) == launch]
            assert found, (variant, fn.fn.__name__, signature, constexprs, sorted(aligned))
            matched.update(id(s) for s in found)
    # the fused GEMMs run only where measured faster on a GPU: test_fused_gemm_specs_cover_every_launch covers them
    fused_gemm = {"add_layer_norm_stats", "ln_matmul", "gelu_matmul", "matmul_residual", "ln_matmul_tma",
                  "gelu_matmul_tma", "matmul_residual_tma"}
    unmatched = [(s.name, s.label) for s in specs
                 if not s.name.startswith("attn") and s.name not in fused_gemm and id(s) not in matched]
    assert not unmatched
