"""fastvit.attention_pool.AttentionPoolLatent against timm's, with the same weights.

timm's module is built with a LayerNorm(eps=1e-6) norm_layer (what its ViTs pass; with None it would have no pre-MLP
norm at all), then every parameter is perturbed with seeded noise, so that no zero bias or unit LayerNorm weight can
hide a transposed or misplaced term, and its state_dict is loaded into ours with strict=True.
"""
from functools import partial

import pytest
import torch
from timm.layers import Mlp as TimmMlp
from timm.layers.attention_pool import AttentionPoolLatent as TimmAttentionPoolLatent
from torch import nn

from fastvit.attention_pool import AttentionPoolLatent
from fastvit.model import Mlp
from fastvit.weight_init import trunc_normal_tf_

DIM, HEADS, TOKENS, BATCH = 64, 4, 7, 3
LN = partial(nn.LayerNorm, eps=1e-6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread avoids thread hand-offs that, on a busy 2-core machine, made
    these tests three times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timm_mlp(in_features, hidden_features):
    return TimmMlp(in_features, hidden_features, act_layer=nn.GELU)


class PlainMlp(nn.Module):
    """A minimal MLP with only fc1 / act / fc2, as a model might pass."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def build_pair(pool_type="token", latent_len=1, qk_norm=False, fused_attn=True, mlp_layer=timm_mlp, seed=0):
    """(timm's module with perturbed weights, ours with the same weights), both in eval mode."""
    torch.manual_seed(seed)
    ref = TimmAttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=qk_norm, latent_len=latent_len, pool_type=pool_type,
                                  norm_layer=LN)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ours = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=qk_norm, latent_len=latent_len, pool_type=pool_type,
                               mlp_layer=mlp_layer)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.fused_attn = ours.fused_attn = fused_attn
    return ref.eval(), ours.eval()


def tokens(seed=2, dtype=torch.float32):
    return torch.randn(BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("latent_len", [1, 2])
def test_state_dict_keys_and_shapes_match_timm(qk_norm, latent_len):
    ref = TimmAttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=qk_norm, latent_len=latent_len, norm_layer=LN)
    for mlp_layer in (timm_mlp, PlainMlp):
        ours = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=qk_norm, latent_len=latent_len, mlp_layer=mlp_layer)
        # same keys, shapes and order
        assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    assert ours.latent.shape == (1, latent_len, DIM)
    assert (ours.num_heads, ours.head_dim, ours.latent_len, ours.pool) == (HEADS, DIM // HEADS, latent_len, "token")
    assert ours.scale == ref.scale and ours.fused_attn is True


def test_seeded_init_is_timms():
    """Same seed, same parameters bit for bit: same creation order, and the latent's truncated normal is drawn as
    timm's trunc_normal_tf_ draws it (std D^-1/2, cut at 2 std)."""
    torch.manual_seed(123)
    ref = TimmAttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, latent_len=2, norm_layer=LN)
    torch.manual_seed(123)
    ours = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, latent_len=2, mlp_layer=timm_mlp)
    ref_sd = ref.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, ref_sd[name]), name
    std = DIM ** -0.5
    assert 0 < ours.latent.abs().max() <= 2 * std


def test_truncated_normal_sampler():
    torch.manual_seed(0)
    std = 0.05
    sample = trunc_normal_tf_(torch.empty(200_000), std=std)
    assert sample.abs().max() <= 2 * std
    # a standard normal cut at +-2 has std 0.8796 and its mean at 0
    assert abs(sample.std().item() / std - 0.8796) < 0.005
    assert abs(sample.mean().item()) < 0.01 * std


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("latent_len", [1, 2])
@pytest.mark.parametrize("pool_type", ["token", "avg", ""])
def test_forward_matches_timm(pool_type, latent_len, qk_norm, fused_attn):
    ref, ours = build_pair(pool_type, latent_len, qk_norm, fused_attn)
    x = tokens()
    out = ours(x)
    expected_shape = (BATCH, latent_len, DIM) if pool_type == "" else (BATCH, DIM)
    assert out.shape == expected_shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6)


def test_fused_and_explicit_attention_agree():
    _, ours = build_pair("", latent_len=2, qk_norm=True)
    x = tokens()
    fused = ours(x)
    ours.fused_attn = False
    torch.testing.assert_close(ours(x), fused, rtol=1e-6, atol=1e-6)


def test_default_norm_layer_is_layernorm_eps_1e6():
    ours = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, mlp_layer=timm_mlp)
    for norm, dim in ((ours.norm, DIM), (ours.q_norm, DIM // HEADS), (ours.k_norm, DIM // HEADS)):
        assert type(norm) is nn.LayerNorm and norm.normalized_shape == (dim,) and norm.eps == 1e-6
    plain = AttentionPoolLatent(DIM, num_heads=HEADS, mlp_layer=timm_mlp)
    assert type(plain.q_norm) is nn.Identity and type(plain.k_norm) is nn.Identity
    custom = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, mlp_layer=timm_mlp, norm_layer=nn.RMSNorm)
    assert all(type(m) is nn.RMSNorm for m in (custom.norm, custom.q_norm, custom.k_norm))


def test_plain_mlp_module_matches_timm():
    ref, ours = build_pair("avg", latent_len=2, qk_norm=True, mlp_layer=PlainMlp)
    x = tokens()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_fastvit_mlp_matches_timm():
    """The model passes its own Mlp class (GELU fused into fc2 where it can)."""
    ref, ours = build_pair("token", latent_len=1, mlp_layer=Mlp)
    x = tokens()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("pool_type,latent_len", [("token", 1), ("avg", 2), ("", 2)])
def test_gradients_match_timm(pool_type, latent_len, qk_norm, fused_attn):
    ref, ours = build_pair(pool_type, latent_len, qk_norm, fused_attn)
    x_ref = tokens().requires_grad_()
    x_ours = x_ref.detach().clone().requires_grad_()
    g = torch.randn(ref(x_ref).shape, generator=torch.Generator().manual_seed(3))
    (ref(x_ref) * g).sum().backward()
    (ours(x_ours) * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert ours_params.keys() == ref_params.keys()
    for name, p in ours_params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)
    assert ours.q.weight.grad.abs().sum() > 0 and ours.latent.grad.abs().sum() > 0


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("pool_type,latent_len", [("token", 1), ("", 2)])
def test_autocast_bf16_matches_timm(pool_type, latent_len, qk_norm, fused_attn):
    """Same ops in the same order, so autocast casts at the same places (on CPU today the results are even bitwise
    equal; the tolerance is bf16's, so a different kernel choice does not fail the test)."""
    ref, ours = build_pair(pool_type, latent_len, qk_norm, fused_attn)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, out = ref(x), ours(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    # and both stay near the fp32 result
    torch.testing.assert_close(out.float(), ours(x), rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qk_norm", [False, True])
def test_autocast_cuda_matches_timm(qk_norm):
    ref, ours = build_pair("", 2, qk_norm)
    ref, ours, x = ref.cuda(), ours.cuda(), tokens().cuda()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            expected, out = ref(x), ours(x)
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_float_attn_mask_matches_timm(fused_attn):
    ref, ours = build_pair("", 2, qk_norm=True, fused_attn=fused_attn)
    x = tokens()
    mask = torch.zeros(BATCH, 1, 1, TOKENS)
    mask[0, ..., 3:] = float("-inf")
    mask[1, ..., :2] = -1.5
    torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask), rtol=1e-6, atol=1e-6)


def test_bool_attn_mask_keeps_true_on_both_paths():
    _, ours = build_pair("", 2)
    x = tokens()
    keep = torch.ones(BATCH, 1, 1, TOKENS, dtype=torch.bool)
    keep[0, ..., 4:] = False
    fused = ours(x, attn_mask=keep)
    ours.fused_attn = False
    torch.testing.assert_close(ours(x, attn_mask=keep), fused, rtol=1e-6, atol=1e-6)
    # masking the tail of image 0 is the same as dropping those tokens
    torch.testing.assert_close(fused[0], ours(x[:1, :4])[0], rtol=1e-6, atol=1e-6)


def test_proj_drop_acts_in_training_only():
    ours = AttentionPoolLatent(DIM, num_heads=HEADS, mlp_layer=timm_mlp, drop=0.5)
    assert ours.proj_drop.p == 0.5
    x = tokens()
    ours.train()
    torch.manual_seed(0)
    a = ours(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, ours(x))
    ours.eval()
    torch.testing.assert_close(ours(x), ours(x), rtol=0, atol=0)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"mlp_layer is required.*callable"):
        AttentionPoolLatent(DIM)
    with pytest.raises(ValueError, match=r"in_features \(65\) must be divisible by num_heads \(8\)"):
        AttentionPoolLatent(65, num_heads=8, mlp_layer=timm_mlp)
    with pytest.raises(ValueError, match=r"pool_type must be one of \('token', 'avg', ''\), got 'max'"):
        AttentionPoolLatent(DIM, pool_type="max", mlp_layer=timm_mlp)
    with pytest.raises(ValueError, match="latent_len must be >= 1"):
        AttentionPoolLatent(DIM, latent_len=0, mlp_layer=timm_mlp)


def test_builds_on_meta_device():
    """create_model(device="meta") builds under a torch.device context: nothing may be allocated elsewhere."""
    with torch.device("meta"):
        ours = AttentionPoolLatent(DIM, num_heads=HEADS, qk_norm=True, latent_len=2, mlp_layer=timm_mlp)
    assert {p.device.type for p in ours.parameters()} == {"meta"}


@pytest.mark.parametrize("fused_attn", [True, False])
def test_fx_trace_and_export(fused_attn):
    _, ours = build_pair("", 2, qk_norm=True, fused_attn=fused_attn)
    x = tokens()
    # a standalone trace fixes the optional mask (inside a traced model the head is called without one)
    traced = torch.fx.symbolic_trace(ours, concrete_args={"attn_mask": None})
    torch.testing.assert_close(traced(x), ours(x), rtol=0, atol=0)
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(ours, (x,), dynamic_shapes=({0: batch},)).module()
    x5 = tokens(seed=4)[:2].repeat(3, 1, 1)
    torch.testing.assert_close(exported(x5), ours(x5), rtol=1e-6, atol=1e-6)
