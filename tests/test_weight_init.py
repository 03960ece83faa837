"""fastvit.weight_init against timm's samplers: the same seed gives the same bits, and the draws have the truncated
normal's moments (torch's nn.init.trunc_normal_ draws the same distribution as other numbers)."""
import math

import pytest
import torch
from timm.layers import lecun_normal_ as timm_lecun_normal_
from timm.layers import trunc_normal_ as timm_trunc_normal_
from timm.layers import trunc_normal_tf_ as timm_trunc_normal_tf_

from fastvit.weight_init import lecun_normal_, trunc_normal_, trunc_normal_tf_


@pytest.mark.parametrize("ours, theirs, kwargs", [
    (trunc_normal_, timm_trunc_normal_, dict(std=0.02)),
    (trunc_normal_, timm_trunc_normal_, dict(mean=0.5, std=1.0, a=-1.0, b=1.5)),
    (trunc_normal_tf_, timm_trunc_normal_tf_, dict(std=0.125)),
    (trunc_normal_tf_, timm_trunc_normal_tf_, dict(mean=-0.1, std=0.3, a=-1.0, b=3.0)),
])
def test_samplers_draw_timms_bits(ours, theirs, kwargs):
    got, want = torch.empty(64, 100), torch.empty(64, 100)
    torch.manual_seed(7)
    ours(got, **kwargs)
    torch.manual_seed(7)
    theirs(want, **kwargs)
    assert torch.equal(got, want)


def test_lecun_normal_draws_timms_bits_and_moments():
    got, want = torch.empty(256, 3, 8, 8), torch.empty(256, 3, 8, 8)
    torch.manual_seed(1)
    lecun_normal_(got)
    torch.manual_seed(1)
    timm_lecun_normal_(want)
    assert torch.equal(got, want)
    std = math.sqrt(1 / (3 * 8 * 8))  # the cut's std correction gives back 1 / fan_in as the variance
    assert abs(got.std().item() / std - 1) < 0.02 and got.abs().max() <= 2 * std / 0.87962566103423978 + 1e-7


def test_trunc_normal_cuts_at_absolute_bounds():
    torch.manual_seed(0)
    sample = trunc_normal_(torch.empty(200_000), std=1.0, a=-0.5, b=2.0)
    assert sample.min() >= -0.5 and sample.max() <= 2.0
    # mean of N(0, 1) cut to [-0.5, 2]: (phi(-0.5) - phi(2)) / (Phi(2) - Phi(-0.5))
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    assert abs(sample.mean().item() - (phi(-0.5) - phi(2.0)) / (cdf(2.0) - cdf(-0.5))) < 0.01
