"""``torch.library.opcheck`` on the Triton path of every fastvit custom op (TRITON_INTERPRET=1).

The other opcheck tests run the torch fallbacks (``use_triton=False``). On a GPU the kernels run instead, and
torch.compile plans their buffers from the fake implementations: so here each op's Triton outputs are checked
against its schema (no output aliases an input or another output), its fake implementation (shapes, strides,
dtypes) and AOT dispatch. In plain eager mode an op skips the dispatcher (``_launch.EagerOp``), where torch 2.14
checks nothing; torch 2.11 (the GPU machine's) raised on two outputs sharing one buffer, which this test now catches
on any version. fp32 and fp16 only: the interpreter computes bf16 dots wrongly."""
import pytest
import torch

from fastvit.kernels import flash_attention as fa

EPS = 1e-6
F32, F16 = torch.float32, torch.float16


def _randn(*shape, dtype=F32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _layer_norm():
    x, r = _randn(6, 48), _randn(6, 48, seed=1)
    w, b = 1 + 0.1 * _randn(48, seed=2), 0.1 * _randn(48, seed=3)
    fwd = torch.ops.fastvit.add_layer_norm_fwd
    y, res, mean, rstd = fwd(x, r, w, b, EPS, True, True)
    return [(fwd, (x, r, w, b, EPS, False, True)), (fwd, (x, None, w, b, EPS, True, True)),
            (fwd, (x.half(), r.half(), w, b, EPS, False, True)), (fwd, (x, None, w, b, EPS, False, True, F16)),
            (torch.ops.fastvit.add_layer_norm_bwd, (x, r, res, w, mean, rstd, False, True)),
            (torch.ops.fastvit.add_layer_norm_bwd, (x.half(), None, res, w, mean, rstd, True, True))]


def _bias_gelu():
    x, b = _randn(6, 40), _randn(40, seed=1)
    fwd, bwd = torch.ops.fastvit.bias_gelu_fwd, torch.ops.fastvit.bias_gelu_bwd
    return [(fwd, (x, b, True)), (fwd, (x.half(), None, True, "tanh")),
            (bwd, (x, x, b, True)), (bwd, (x, x, None, True, "sigmoid")), (bwd, (x, x, b, True, "none", True))]


def _fused_gemms():
    x, r = _randn(6, 48), _randn(6, 48, seed=1)
    w, b = 1 + 0.1 * _randn(48, seed=2), 0.1 * _randn(48, seed=3)
    lw, lb = 0.1 * _randn(32, 48, seed=4), 0.1 * _randn(32, seed=5)
    ln, gelu, res = (torch.ops.fastvit.ln_matmul_fwd, torch.ops.fastvit.gelu_matmul_fwd,
                     torch.ops.fastvit.matmul_residual_fwd)
    return [(ln, (x, r, w, b, lw, lb, EPS, False, True)), (ln, (x, None, w, b, lw, None, EPS, True, True)),
            (ln, (x, r, w, b, lw, lb, EPS, False, True, True)),
            (gelu, (x, b, lw, lb, True)), (gelu, (x, None, lw, None, True, "tanh", True)),
            (res, (x, lw, lb, _randn(6, 32, seed=6), True)), (res, (x, lw, None, _randn(6, 32, seed=6), True, True))]


def _attention():
    packed = _randn(2, 50, 3, 2, 32)
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    table = _randn(2, fa.num_relative_positions((7, 7)), seed=1)
    seed = torch.tensor([1234])
    fwd, bwd, bwd_qkv = (torch.ops.fastvit.attention_fwd, torch.ops.fastvit.attention_bwd,
                         torch.ops.fastvit.attention_bwd_qkv)
    out, lse = fwd(q, k, v, table, seed, 7, 7, 0.2, 0.25, True)
    do = _randn(*out.shape, seed=2)
    return [(fwd, (q, k, v, table, None, 7, 7, 0.2, 0.0, True)), (fwd, (q, k, v, None, None, 0, 0, 0.2, 0.0, True)),
            (fwd, (q.half(), k.half(), v.half(), None, None, 0, 0, 0.2, 0.0, True)),
            (bwd, (do, q, k, v, out, lse, table, seed, 7, 7, 0.2, 0.25, True)),
            (bwd, (do, q, k, v, out, lse, None, None, 0, 0, 0.2, 0.0, True)),
            (bwd_qkv, (do, packed, out, lse, table, seed, 7, 7, 0.2, 0.25, True)),
            (bwd_qkv, (do, packed, out, lse, None, None, 0, 0, 0.2, 0.0, True))]


def _patch_embed():
    x = _randn(2, 3, 30, 28)
    w, b = 0.1 * _randn(40, 3, 14, 14, seed=1), _randn(40, seed=2)
    pos, cls = _randn(1, 5, 40, seed=3), _randn(1, 1, 40, seed=4)
    fwd, bwd = torch.ops.fastvit.patch_embed_fwd, torch.ops.fastvit.patch_embed_bwd
    dy = _randn(2, 5, 40, seed=5)
    return [(fwd, (x, w, b, pos, cls, 14, 14, False, F32, F32, True)),
            (fwd, (x, w, None, None, None, 14, 14, False, F32, F32, True)),
            (fwd, (x.to(memory_format=torch.channels_last), w, b, pos[:, 1:], cls, 14, 14, True, F16, F32, True)),
            (bwd, (dy, x, w, 14, 14, True, F32, True, True, True, True)),
            (bwd, (dy[:, 1:], x, w, 14, 14, False, F32, False, True, True, True)),
            (bwd, (dy, x.to(memory_format=torch.channels_last), w, 14, 14, True, F16, True, False, False, True))]


CASES = {"layer_norm": _layer_norm, "bias_gelu": _bias_gelu, "fused_gemms": _fused_gemms, "attention": _attention,
         "patch_embed": _patch_embed}


@pytest.mark.parametrize("family", CASES)
def test_triton_path_passes_opcheck(family):
    for op, args in CASES[family]():
        torch.library.opcheck(op, args)


def test_an_aliasing_output_is_caught():
    """The check this file relies on fails where two outputs share a buffer (the mistake it guards against)."""
    def aliasing(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = x.new_empty((2,) + x.shape)
        return both[0], both[1]

    op = torch.library.custom_op("fastvit_test::aliasing", aliasing, mutates_args=())
    op.register_fake(lambda x: (torch.empty_like(x), torch.empty_like(x)))
    with pytest.raises(Exception, match="alias"):
        torch.library.opcheck(op, (_randn(3),))
