"""pytest-benchmark micro-benchmarks of each fused op, fastvit vs the torch reference, forward and forward+backward.

    pytest bench/ --benchmark-only                      # timings (GPU: Triton kernels in bf16)
    pytest bench/test_ops_benchmark.py --benchmark-disable -q   # smoke: each body once, results checked

Shapes are ViT-B/16's at batch 8 on a GPU and batch 1 on CPU (fp32 there; CPU fastvit runs its torch fallback
unless TRITON_INTERPRET=1). Each benchmark also checks its result against the torch reference in higher precision
(fp32 for bf16, fp64 for fp32: an fp32 reference cannot grade an fp32 result), outputs and, for fwd+bwd, the
gradients of every input, so the smoke run is a real test.
Grouped per op and direction, so pytest-benchmark prints fastvit and torch side by side.
"""
import pytest
import torch

import common
import numerics
from fastvit.kernels import flash_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
REF_DTYPE = torch.float64 if DTYPE == torch.float32 else torch.float32
# loose enough for bf16 on GPU; on CPU fp32 fastvit and torch agree far closer
TOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def _cases():
    gen = torch.Generator().manual_seed(0)
    batch = 8 if CUDA else 1
    return {"patch_embed": numerics.patch_embed_case(gen, batch, 224, 16, 768),
            "add_layer_norm": numerics.add_layer_norm_case(gen, batch, 197, 768),
            "bias_gelu": numerics.bias_gelu_case(gen, batch, 197, 3072),
            "attention": numerics.attention_case(gen, batch, 197, 12, 64),
            "add_layer_norm_linear": numerics.add_layer_norm_linear_case(gen, batch, 197, 768, 2304, True),
            "bias_gelu_linear": numerics.bias_gelu_linear_case(gen, batch, 197, 3072, 768)}


CASES = _cases()


def _backend():
    return numerics.resolve_backend("auto", DEVICE, DTYPE)[0]


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["fastvit", "torch"])
@pytest.mark.parametrize("op", list(CASES))
def test_op(benchmark, op, impl, direction):
    case = CASES[op]
    backend = _backend()
    benchmark.group = f"{op} {direction} {numerics.dtype_name(DTYPE)}"
    benchmark.extra_info["backend"] = backend if impl == "fastvit" else "torch"
    grads = direction == "fwd+bwd"
    inputs = {k: v.to(DEVICE, DTYPE).requires_grad_(grads and k in case["grads"]) for k, v in case["inputs"].items()}
    fn = (lambda t: case["fastvit"](t, backend)) if impl == "fastvit" else case["torch"]
    leaves = [inputs[k] for k in case["grads"]] if grads else []
    upstream = _upstream(fn(inputs)) if grads else None

    def run():
        outs = fn(inputs)
        result = list(outs) + (list(torch.autograd.grad(outs, leaves, upstream)) if grads else [])
        if CUDA:
            torch.cuda.synchronize()
        return result

    results = _timed(benchmark, run)
    # the reference: torch in higher precision, forward and (fwd+bwd) the gradients of every input
    ref_inputs = {k: v.detach().to(DEVICE, REF_DTYPE).requires_grad_(grads and k in case["grads"])
                  for k, v in inputs.items()}
    ref_outs = case["torch"](ref_inputs)
    ref = list(ref_outs)
    if grads:
        ref += torch.autograd.grad(ref_outs, [ref_inputs[k] for k in case["grads"]],
                                   [u.to(REF_DTYPE) for u in upstream])
    names = [f"out{i}" for i in range(len(ref_outs))] + ([f"d{k}" for k in case["grads"]] if grads else [])
    assert len(results) == len(ref) == len(names)
    for name, o, r in zip(names, results, ref):
        err = common.error_stats(o, r)
        assert err["mean_rel"] < TOL[DTYPE], f"{op} {impl} {name}: mean relative error {err['mean_rel']:.2e}"


def _timed(benchmark, run, warmup=3):
    """``benchmark(run)`` after ``warmup`` untimed calls when timing: a first call compiles the Triton kernels and
    measures fastvit.autotune's candidates (~100 ms), which pytest-benchmark would both time and use to pick a
    handful of rounds (on the H200, bias_gelu_linear's forward: mean 887 us over 5 rounds, median 214 us)."""
    if not benchmark.disabled:
        for _ in range(warmup):
            run()
    return benchmark(run)


def _upstream(outs):
    """Fixed random gradients reaching the outputs (ones would hide a wrong sign or permutation in backward)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outs]


# the dK/dV tilings of our attention backward: the pre-Hopper one, then each that sm_90 may run
BACKWARD_TILES = ["sm80", *(f"sm90@{j}" for j in range(len(flash_attention.backward_tiles(64, 90))))]


@pytest.mark.skipif(not CUDA, reason="times the Triton attention kernels, which need a GPU")
@pytest.mark.parametrize("tiles", BACKWARD_TILES)
def test_attention_backward_tiles(benchmark, monkeypatch, tiles):
    """Our attention's forward + backward at ViT-B/16's shape, batch 32, with each dK/dV tiling side by side: the
    one sm_80 runs (mma.sync on Hopper) and sm_90's (wgmma, ``flash_attention.backward_tiles``), which
    backend="auto" chooses among for a training call; gradients checked against SDPA in fp32."""
    arch, _, index = tiles.partition("@")
    if arch == "sm90" and flash_attention.device_arch(DEVICE) < 90:
        pytest.skip("sm_90's tiles need a Hopper GPU")
    monkeypatch.setattr(flash_attention, "device_arch", lambda device: int(arch[2:]))
    benchmark.group = f"attention backward tiles {numerics.dtype_name(DTYPE)} B=32 N=197 H=12 d=64"
    qkv = torch.randn(32, 197, 3, 12, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    qkv.requires_grad_()
    upstream = torch.randn(32, 12, 197, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)

    def run():
        out = flash_attention.flash_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), bwd_tiles=int(index or 0))
        (grad,) = torch.autograd.grad(out, [qkv], upstream)
        torch.cuda.synchronize()
        return grad

    grad = _timed(benchmark, run)
    ref_qkv = qkv.detach().float().requires_grad_()
    ref = torch.autograd.grad(flash_attention.attention_ref(*ref_qkv.permute(2, 0, 3, 1, 4).unbind(0)), [ref_qkv],
                              upstream.float())[0]
    err = common.error_stats(grad, ref)
    assert err["mean_rel"] < TOL[DTYPE], f"{tiles}: mean relative error {err['mean_rel']:.2e}"
