"""Helpers shared by several test files (tests/conftest.py puts tests/ on sys.path, so tests/interpret/ can import
this too): the compiled-vs-eager check of the fused ops, the patch-embedding case builders, the interpreter's bf16
rounding factor, a pretend GPU for the measured choices of fastvit.autotune, and the registered names that stand
for all."""
import json
import re

import pytest
import torch

import fastvit
from fastvit import autotune
from fastvit.kernels._launch import capability

# Triton's interpreter casts fp32 to bf16 by truncation (round toward zero; a GPU rounds to nearest even), which
# doubles the worst-case rounding error of every bf16 store: error bounds against torch (which rounds to nearest)
# are multiplied by this factor per dtype.
INTERPRETER_ROUNDING = {torch.float16: 1, torch.bfloat16: 2}


def assert_close_to_scale(actual, expected, rtol, msg=None):
    """assert_close with an absolute tolerance of 1e-5 x the largest |expected| (at least 1e-5): fp32 summation-order
    noise grows with the values summed (on an AVX2 EPYC, 3e-5 apart in a giant's features, 1.4e-5 in a head's
    gradient of ~8, where an AVX-512 VM's BLAS met 1e-5; 1.08e-5 in a width-1024 hybrid's logits of ~7, where CPU
    inference had timed oneDNN's GEMM against MKL's and taken the other), where a wrong implementation is off by far
    more."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=rtol, msg=msg)


def assert_compiled_matches_eager(f, args):
    """torch.compile(f, fullgraph=True) (inductor; one graph, or it raises) gives eager's scalar output and its
    gradients with respect to every tensor in ``args`` that requires grad, to fp32 rounding: each result's largest
    difference is at most 1e-5 of the result's largest magnitude. Inductor compiles the ops' torch fallbacks itself
    (they are triton_ops), so it may reorder fp32 sums; an opaque op would match eager bit for bit. Both runs start
    from the same torch seed, and with ``fallback_random`` the compiled graph draws random numbers as eager does
    (dropout)."""
    def run(fn):
        leaves = [a for a in args if a is not None and a.requires_grad]
        torch.manual_seed(5)
        out = fn(*args)
        return [out, *torch.autograd.grad(out, leaves)]

    with torch._inductor.config.patch(fallback_random=True):
        compiled = run(torch.compile(f, fullgraph=True))
    for c, e in zip(compiled, run(f)):
        diff, scale = (c - e).abs().max().item(), e.abs().max().item()
        assert diff <= 1e-5 * scale, (diff, scale)


def route_launches(monkeypatch, wrap):
    """Sends every kernel launch through ``wrap(real_launch, kernel, grid, *args, **kwargs)``: the launchers' plans
    call ``fastvit.kernels._launch.launch``, patch_embed and matmul the name they import."""
    from fastvit.kernels import _launch, matmul, patch_embed
    real = _launch.launch

    def routed(kernel, grid, *args, **kwargs):
        return wrap(real, kernel, grid, *args, **kwargs)
    for module in (_launch, matmul, patch_embed):
        monkeypatch.setattr(module, "launch", routed)


def graph_calls(graphs):
    """(names of the Triton kernels, names of fastvit's ops) called in the FX graphs AOTAutograd handed over."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.jit import JITFunction
    kernels, ours = [], []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while not isinstance(kernel, JITFunction):  # launch options wrap it in a one-config Autotuner
                    kernel = kernel.fn
                kernels.append(kernel.fn.__name__)
            elif str(node.target).startswith("fastvit."):
                ours.append(str(node.target))
    return kernels, ours


def compile_capturing_graphs(f, graphs, dynamic=None):
    """torch.compile(f, fullgraph=True, dynamic=dynamic) with AOTAutograd, appending the forward and backward graphs
    it would give inductor to ``graphs`` and running them as they are."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return torch.compile(f, fullgraph=True, dynamic=dynamic,
                         backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))


def patch_embed_leaves(shape, dtype=torch.float32, cls=True, pos=True, bias=True, no_embed_class=False, seed=0):
    """x, weight, bias, pos_embed, cls_token for ``shape`` = (batch, channels, H, W, patch, dim), scaled like a
    trained ViT (unit-variance tokens); each requires grad, and a table left out is None."""
    b, c, h, w, p, d = shape
    g = torch.Generator().manual_seed(seed)
    n = (h // p) * (w // p)
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(d, c, p, p, generator=g) / (c * p * p) ** 0.5
    bias_t = 0.1 * torch.randn(d, generator=g) if bias else None
    rows = n + (1 if cls and not no_embed_class else 0)
    pos_t = 0.1 * torch.randn(1, rows, d, generator=g) if pos else None
    cls_t = 0.1 * torch.randn(1, 1, d, generator=g) if cls else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (x, weight, bias_t, pos_t, cls_t)]


def patch_embed_grads(fn, leaves, patch, no_embed_class, gy=None, wrt=None):
    """[tokens, gradients of sum(tokens * gy) for every leaf that requires grad] of ``fn`` (the patch_embed
    signature); ``gy`` defaults to a fixed random upstream gradient, ``wrt`` overrides the tensors differentiated."""
    y = fn(*leaves[:3], patch, leaves[3], leaves[4], no_embed_class)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    wrt = wrt or [t for t in leaves if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad((y.float() * gy).sum(), wrt)]


class PretendCuda(torch.Tensor):
    """A CPU tensor that reports ``is_cuda`` (``t.as_subclass(PretendCuda)``), so a dispatch takes its GPU branch."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A clean tuner on a pretend GPU (sm_90), its disk cache in tmp_path, measurements allowed; import it into a
    test module to use it."""
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_environment", lambda index: ("Fake GPU", torch.__version__, "0"))
    monkeypatch.setattr(autotune, "can_measure", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper
    autotune.clear()
    capability.cache_clear()  # asked once per device: forget what another test's pretend GPU answered
    yield tmp_path
    autotune.clear()
    capability.cache_clear()


def timm_pair(**cfg):
    """A fastvit and a timm VisionTransformer (eval mode) of one config with the same random weights, every one
    made non-trivial (timm initialises LayerNorms to 1/0 and the class token near 0)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    import fastvit
    torch.manual_seed(0)
    ref = TimmViT(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = fastvit.VisionTransformer(**cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model, ref


def images(n=2, size=32):
    """A fixed random (n, 3, size, size) image batch."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def gradient_penalty(model, x):
    """An R1 / WGAN-GP style penalty ||d sum(f(x)^2) / dx||^2 backpropagated, with attention on SDPA's math kernel
    (the fused SDPA kernels have no double backward): (the input gradient, {name: parameter gradient})."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        g, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        g.square().sum().backward()
    return g.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# the constructor arguments that size a model; the others choose its layout (tokens, norms, pooling, activation)
_SIZE_ARGS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "img_size")


# one hybrid per backbone layout: BiT R50 at stride 16 and 32, R26, the stem alone, ResNet-D 26 and 50 (stride 16),
# MobileCLIP's stem; the other names differ from these in sizes only
HYBRID_LAYOUTS = ("vit_base_r50_s16_224", "vit_large_r50_s32_224", "vit_small_r26_s32_224", "vit_tiny_r_s16_p8_224",
                  "vit_small_resnet26d_224", "vit_small_resnet50d_s16_224", "vit_base_mci_224")


def representative_names():
    """``fastvit.list_models()`` cut to the first name of each layout (timm's constructor arguments apart from the
    sizes), the paper's ViT-Ti/S/B/L/H names and one hybrid of each backbone layout (``HYBRID_LAYOUTS``): per-name
    checks on these reach every option a registered name builds, in CI time (``tests/test_model.py`` compares every
    name with timm; ``tests/test_hybrid.py`` checks every hybrid name's layout and defaults)."""
    layouts = {}
    for name, args in fastvit.registry.timm_archs().items():
        layout = json.dumps({k: v for k, v in args.items() if k not in _SIZE_ARGS}, sort_keys=True)
        layouts.setdefault(layout, name)
    keep = set(layouts.values()) | set(HYBRID_LAYOUTS)
    paper = r"vit_(tiny|small|base|large)_patch16_(224|384)|vit_(base|large)_patch32_(224|384)|vit_huge_patch14_224"
    keep |= {n for n in fastvit.list_models() if re.fullmatch(paper, n)}
    return [n for n in fastvit.list_models() if n in keep]
