"""The whole tiny ViT with every op on Triton kernels (interpreted on CPU) against the torch backend."""
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastvit
from _helpers import gradient_penalty, route_launches
from fastvit import ops
from fastvit.kernels import bias_gelu, flash_attention, layer_norm, patch_embed

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def test_interpreter_is_on():
    assert ops.triton_interpreting() and ops.use_triton("auto", torch.zeros(1))


@pytest.mark.parametrize("kwargs", [{}, dict(pos_embed="rel"), dict(no_embed_class=True, global_pool="avg"),
                                    dict(patch_size=4, embed_dim=80, num_heads=1),
                                    dict(reg_tokens=4, init_values=1e-5),
                                    dict(reg_tokens=2, no_embed_class=True, class_token=False, global_pool="map",
                                         act_layer="gelu_tanh"),
                                    dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5),
                                         act_layer="quick_gelu"),
                                    dict(proj_bias=False, qkv_bias=False),
                                    dict(mlp_layer="swiglu", act_layer="silu", norm_layer="rmsnorm"),
                                    dict(block_fn="ParallelThingsBlock", init_values=1e-5),
                                    dict(block_fn="ParallelScalingBlock", qkv_bias=False, qk_norm=True),
                                    dict(attn_layer="diff", init_values=1e-5)],
                         ids=["default", "rel", "no_embed_class-avg", "head_dim80", "registers", "registers-map",
                              "clip", "no-proj-bias", "swiglu", "parallel-things", "parallel-scaling", "diff"])
def test_triton_model_matches_torch(kwargs):
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**{**CFG, **kwargs}, backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model(x)
    expected.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    x_grad = x.grad.clone()
    model.zero_grad()
    x.grad = None
    model.set_backend("triton")
    out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-3, msg=n)
    torch.testing.assert_close(x.grad, x_grad, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kwargs", [{}, dict(pos_embed="rel"),
                                    dict(no_embed_class=True, global_pool="avg", act_layer="gelu_tanh",
                                         reg_tokens=2)],
                         ids=["default", "rel", "avg-tanh-registers"])
def test_inference_runs_the_forward_bodies_alone_with_the_same_bits(kwargs, dtype, monkeypatch):
    """An eager no-grad forward on the kernels runs each fused op's forward body without its autograd Function
    (no LayerNorm, GELU or attention Function is applied) and gives the bits of the forward autograd records;
    inference_mode too."""
    applied = []
    for module in (bias_gelu, flash_attention, layer_norm):
        def recording(function, *args, _real=module.apply):
            applied.append(function.__name__)
            return _real(function, *args)
        monkeypatch.setattr(module, "apply", recording)
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**{**CFG, **kwargs}, backend="triton").to(dtype).eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    recorded = model(x)
    assert recorded.requires_grad
    assert {"AddLayerNormLinearFn", "BiasGeluLinearFn", "FlashAttentionQKVFn"} <= set(applied)
    for context in (torch.no_grad, torch.inference_mode):
        applied.clear()
        with context():
            out = model(x)
        assert not applied, context
        assert torch.equal(out, recorded.detach()), context


def test_auto_runs_the_kernels_and_matches_torch(monkeypatch):
    """backend="auto" resolves to the Triton kernels here (every op's kernels launch) and gives the torch
    backend's outputs and gradients; "torch" launches none."""
    launched = {}

    def counting(real, kernel, grid, *args, **kwargs):  # by the module that defines the kernel
        launched[kernel.fn.__module__] = launched.get(kernel.fn.__module__, 0) + 1
        return real(kernel, grid, *args, **kwargs)
    route_launches(monkeypatch, counting)
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**CFG)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for backend in ("torch", "auto"):
        launched.clear()
        model.set_backend(backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        results[backend] = [out] + [p.grad.clone() for p in model.parameters()]
        expected = set() if backend == "torch" else {m.__name__ for m in (bias_gelu, flash_attention, layer_norm,
                                                                             patch_embed)}
        assert set(launched) == expected, backend
    for a, e in zip(results["auto"], results["torch"]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3)


def test_export_of_the_triton_backend_keeps_the_kernels():
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**CFG, backend="triton").eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    ours = {str(n.target).split(".")[1] for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("fastvit.")}
    assert {"patch_embed_fwd", "add_layer_norm_fwd", "bias_gelu_fwd", "attention_fwd"} <= ours
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, dict(pos_embed="rel")], ids=["default", "rel"])
def test_gradient_penalty_through_the_kernels_matches_torch(kwargs):
    """A backward taken with create_graph=True runs the fallback math (the kernels have no derivative), so a
    gradient penalty's parameter gradients are the torch backend's (with SDPA's math kernel: the fused ones have no
    double backward)."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**{**CFG, **kwargs}, backend="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for backend in ("torch", "triton"):
        model.set_backend(backend)
        g, grads = gradient_penalty(model, x)
        results[backend] = {"input grad": g, **grads}
    for name, e in results["torch"].items():
        torch.testing.assert_close(results["triton"][name], e, atol=1e-4 * e.abs().max().item(), rtol=1e-3,
                                   msg=name)


def test_float64_takes_the_fallback_on_auto_and_is_refused_by_triton():
    """The kernels compute in fp32: "auto" keeps an fp64 model on the fallbacks (fp64 throughout, no launch), and
    "triton" says which dtypes it runs."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**CFG).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.set_backend("torch")
    expected = model(x)
    model.set_backend("auto")
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    model.set_backend("triton")
    with pytest.raises(TypeError, match="backend='triton' runs float32, float16 and bfloat16 tensors, got "
                                        "torch.float64"):
        model(x)
