"""torch.func transforms (grad, vmap, jvp, jacrev, stack_module_state) and forward-mode AD on a fastvit model,
against timm's model with the same weights and against fastvit's own autograd: neither can run the ops' autograd
Functions, so there the ops run their plain-torch references."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import fastvit
from _helpers import images, timm_pair
from fastvit.kernels import _gemm

CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _per_sample_grads(model, x, y):
    """Per-sample gradients by vmap(grad(...)) over the batch, as torch's per-sample-gradient recipe computes them."""
    def loss(params, xb, yb):
        return F.cross_entropy(functional_call(model, params, (xb[None],)), yb[None])
    return vmap(grad(loss), in_dims=(None, 0, 0))(_params(model), x, y)


def _looped_grads(model, x, y):
    """The same gradients by autograd, one sample at a time (the model's usual path, fused ops included)."""
    out = {k: [] for k, _ in model.named_parameters()}
    for xb, yb in zip(x, y):
        model.zero_grad()
        F.cross_entropy(model(xb[None]), yb[None]).backward()
        for k, p in model.named_parameters():
            out[k].append(p.grad.clone())
    return {k: torch.stack(v) for k, v in out.items()}


def _assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_per_sample_gradients_match_timm_and_autograd():
    model, ref = timm_pair(**CFG)
    x, y = images(3), torch.tensor([1, 7, 3])
    ours = _per_sample_grads(model, x, y)
    _assert_grads_close(ours, _per_sample_grads(ref, x, y))
    _assert_grads_close(ours, _looped_grads(model, x, y))


def test_compiled_per_sample_gradients_match_timm():
    """torch.compile over vmap(grad(...)), as for timm's model: dynamo must not hide the transform from the ops."""
    model, ref = timm_pair(**{**CFG, "depth": 1})
    x, y = images(3), torch.tensor([1, 7, 3])

    def compiled_grads(m):
        def loss(params, xb, yb):
            return F.cross_entropy(functional_call(m, params, (xb[None],)), yb[None])
        return torch.compile(vmap(grad(loss), in_dims=(None, 0, 0)))(_params(m), x, y)

    _assert_grads_close(compiled_grads(model), compiled_grads(ref))


@pytest.mark.parametrize("pos_embed", ["rel", "learn_2d"])
def test_per_sample_gradients_of_the_paper_variants_match_autograd(pos_embed):
    """Variants timm does not have (the relative bias runs in our attention): the transform against the model's
    own autograd path."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(**CFG, pos_embed=pos_embed).eval()
    x, y = images(2), torch.tensor([4, 2])
    _assert_grads_close(_per_sample_grads(model, x, y), _looped_grads(model, x, y))


def test_jvp_matches_timm_with_math_attention():
    """Forward-mode AD, which torch's fused SDPA kernels lack (timm's model needs fused_attn off for it)."""
    model, ref = timm_pair(**CFG)
    for block in ref.blocks:
        block.attn.fused_attn = False
    x = images(2)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    out, dout = jvp(model, (x,), (tangent,))
    want_out, want_dout = jvp(ref, (x,), (tangent,))
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dout, want_dout, rtol=1e-4, atol=1e-5)


def test_forward_mode_ad_with_dual_tensors_matches_timm():
    """torch.autograd.forward_ad (dual tensors, no torch.func): the ops' Functions have no jvp, so a dual level
    sends them to their references as a transform does."""
    model, ref = timm_pair(**CFG)
    for block in ref.blocks:
        block.attn.fused_attn = False
    x = images(2)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    def tangent_out(m):
        with fwAD.dual_level():
            return fwAD.unpack_dual(m(fwAD.make_dual(x, tangent))).tangent

    torch.testing.assert_close(tangent_out(model), tangent_out(ref), rtol=1e-4, atol=1e-5)


def test_input_jacobian_matches_timm():
    model, ref = timm_pair(**CFG)
    x = images(1)
    torch.testing.assert_close(torch.func.jacrev(model)(x), torch.func.jacrev(ref)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [{}, dict(class_token=False, global_pool="avg"), dict(pos_embed="rel")],
                         ids=["cls", "no_cls", "rel"])
def test_vectorized_autograd_jacobian(cfg):
    """torch.autograd.functional.jacobian(vectorize=True) runs the forward as usual and the backward once on a batch
    of gradients (autograd's is_grads_batched, torch's legacy vmap) through the ops' autograd Functions: timm's
    Jacobian (pos_embed='rel', ours only: the one taken row by row)."""
    x = images(1)
    if cfg.get("pos_embed") == "rel":
        model = fastvit.VisionTransformer(**CFG, **cfg).eval()
        want = torch.autograd.functional.jacobian(model, x)
    else:
        model, ref = timm_pair(**CFG, **cfg)
        want = torch.autograd.functional.jacobian(ref, x)
    got = torch.autograd.functional.jacobian(model, x, vectorize=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_ensemble_by_stack_module_state_matches_each_model():
    """torch's model-ensembling recipe: the parameters of several models stacked, one vmap over them."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(fastvit.VisionTransformer(**CFG).eval())
    params, buffers = stack_module_state(models)
    x = images(16)  # inference at a size where a block's MLP would otherwise run oneDNN's fused GEMM
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = vmap(lambda p, b: functional_call(models[0], (p, b), (x,)))(params, buffers)
    # every op has a batching rule: no op fell back to a loop over the models
    assert not [w for w in caught if "batching rule" in str(w.message)]
    with torch.no_grad():
        torch.testing.assert_close(out, torch.stack([m(x) for m in models]), rtol=1e-4, atol=1e-5)


def test_transform_under_bf16_autocast_on_a_cpu_emulating_bf16(monkeypatch):
    """Under autocast the products a transform sees are F.linear's (the fp32 path of ``kernels/_gemm.py`` is an
    autograd Function): gradients as the model's own path gives them, within bf16 rounding."""
    monkeypatch.setattr(_gemm, "EMULATED", frozenset((torch.bfloat16, torch.float16)))
    model, _ = timm_pair(**CFG)
    x, y = images(2), torch.tensor([0, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _per_sample_grads(model, x, y)
        want = _looped_grads(model, x, y)
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(ours[k].float(), want[k].float(), rtol=0, atol=0.03 * scale + 1e-6, msg=k)
