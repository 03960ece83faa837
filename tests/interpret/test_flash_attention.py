"""The Triton FlashAttention kernels (interpreted on CPU) against torch: forward, dq/dk/dv and the gradient of the
relative-position table, on strided q/k/v views of a packed qkv projection, at ViT's token counts and head dims."""
import pytest
import torch

from _helpers import route_launches
from fastvit import ops
from fastvit.kernels import flash_attention as fa

# (batch, heads, N, head_dim, grid): 7x7 + class = 50, 14x14 + 1 = 197, 16x16 + 1 = 257; N = 49 has no class
# token; 5x8 + 1 = 41 is a non-square grid; head dims 80 and 96 are padded to 128 in registers
CASES = [
    (2, 2, 1, 64, None),
    (1, 2, 50, 64, (7, 7)),
    (2, 1, 50, 80, (7, 7)),
    (1, 2, 49, 80, (7, 7)),
    (1, 2, 197, 64, (14, 14)),
    (2, 1, 197, 80, None),
    (1, 2, 257, 80, (16, 16)),
    (1, 2, 257, 64, None),
    (1, 2, 65, 32, (8, 8)),
    (1, 1, 50, 96, None),
    (1, 1, 37, 128, (6, 6)),
    (2, 1, 41, 64, (5, 8)),
]
IDS = [f"B{b}H{h}N{n}d{d}{'-rel' if g else ''}" for b, h, n, d, g in CASES]


def _packed(b, h, n, hd, grid, seed=0):
    """A packed (B, N, 3*D) qkv projection output, an optional (heads, R) table and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    packed = torch.randn(b, n, 3 * h * hd, generator=g)
    table = None
    if grid is not None:
        table = 0.5 * torch.randn(h, fa.num_relative_positions(grid, n == grid[0] * grid[1] + 1), generator=g)
    return packed, table, torch.randn(b, h, n, hd, generator=g)


def _qkv(packed, h, hd):
    """(B, heads, N, hd) views of the packed projection, as the model takes them: stride 3*D over tokens."""
    b, n, _ = packed.shape
    return packed.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)


def _run(fn, packed, table, do, h, hd, grid, dtype):
    """fn's output and its gradients (dq, dk, dv[, d table]) in float64."""
    packed = packed.to(dtype).requires_grad_()
    table = None if table is None else table.clone().requires_grad_()
    q, k, v = _qkv(packed, h, hd)
    out = fn(q, k, v, table, grid)
    inputs = [q, k, v] + ([table] if table is not None else [])
    grads = torch.autograd.grad(out, inputs, do.to(dtype))
    return [out.double()] + [t.double() for t in grads]


def _triton(q, k, v, table, grid):
    return ops.attention(q, k, v, rel_bias=table, grid_size=grid, backend="triton")


def _sdpa(q, k, v, table, grid):
    return fa.attention_ref(q, k, v, table, grid)


def _seeded_dropout(p_drop, use_triton, seed=7):
    """flash_attention with dropout whose mask comes from torch seed ``seed``: the same mask at every call."""
    def run(q, k, v, table, grid):
        torch.manual_seed(seed)
        return fa.flash_attention(q, k, v, table, grid, dropout_p=p_drop, use_triton=use_triton)
    return run


def _dense_dropout(keep, p_drop):
    """Dense attention math with the keep mask ``keep`` (dropped entries 0, the rest scaled by 1 / (1 - p))."""
    def run(q, k, v, table, grid):
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + fa.relative_bias_dense(table, grid, q.shape[-2])
        return (torch.softmax(s, -1) * keep / (1 - p_drop)) @ v
    return run


def _dropped_probabilities(q, k, table, grid, p_drop, use_triton, seed=7):
    """With v = identity (head_dim >= N) the output is the dropped, rescaled P itself, which reveals the mask."""
    b, h, n, hd = q.shape
    return _seeded_dropout(p_drop, use_triton, seed)(q, k, torch.eye(n, hd).expand(b, h, n, hd), table, grid)[..., :n]


def test_interpreter_runs_triton():
    assert ops.triton_interpreting() and ops.use_triton("auto", torch.zeros(1))


@pytest.mark.parametrize("b,h,n,hd,grid", CASES, ids=IDS)
def test_fp32_matches_reference(b, h, n, hd, grid):
    packed, table, do = _packed(b, h, n, hd, grid)
    ours = _run(_triton, packed, table, do, h, hd, grid, torch.float32)
    ref = _run(_sdpa, packed.double(), None if table is None else table.double(), do.double(), h, hd, grid,
               torch.float64)
    names = ["out", "dq", "dk", "dv", "dtable"]
    for name, a, e in zip(names, ours, ref):
        atol = 2e-5 if name == "out" else 1e-4
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-4, msg=name)


FP16 = (1, 4, 5, 6, 7)


@pytest.mark.parametrize("b,h,n,hd,grid", [CASES[i] for i in FP16], ids=[IDS[i] for i in FP16])
def test_fp16_error_within_twice_torch_fp16(b, h, n, hd, grid):
    """Against an fp64 reference on the same fp16-rounded inputs, the error (Frobenius norm of the difference)
    of each of out, dq, dk, dv (and d table) is at most twice that of torch's own fp16 SDPA.

    The norm, not the max: P and dS are rounded to fp16 before their matmuls (as FlashAttention-2 does), and the
    largest single deviation then lands on one element more or less at random (max ratios seen 0.1-2.2, norm
    ratios 0.1-1.5 over these cases and two seeds).
    """
    packed, table, do = _packed(b, h, n, hd, grid, seed=1)
    packed, do = packed.half().float(), do.half().float()
    ref = _run(_sdpa, packed.double(), None if table is None else table.double(), do.double(), h, hd, grid,
               torch.float64)
    ours = _run(_triton, packed, table, do, h, hd, grid, torch.float16)
    torch_fp16 = _run(_sdpa, packed, table, do, h, hd, grid, torch.float16)
    for name, a, t, e in zip(["out", "dq", "dk", "dv", "dtable"], ours, torch_fp16, ref):
        err, torch_err = (a - e).norm().item(), (t - e).norm().item()
        assert torch_err > 0 and err <= 2 * torch_err, (name, err, torch_err)


def test_triton_matches_fallback_including_lse():
    """The custom op's two bodies agree on both outputs, so the saved lse means the same in each."""
    packed, table, _ = _packed(2, 2, 50, 64, (7, 7))
    q, k, v = _qkv(packed, 2, 64)
    out_t, lse_t = torch.ops.fastvit.attention_fwd(q, k, v, table, None, 7, 7, 0.125, 0.0, True)
    out_f, lse_f = torch.ops.fastvit.attention_fwd(q, k, v, table, None, 7, 7, 0.125, 0.0, False)
    torch.testing.assert_close(out_t, out_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_t, lse_f, atol=1e-5, rtol=1e-5)
    assert out_t.stride() == out_f.stride()


def test_non_unit_head_dim_stride_and_custom_scale():
    """Every stride is honoured, including the head-dim one, and so is an explicit scale."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 32, 33, generator=g).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) == 33
    out = ops.attention(q, k, v, scale=0.3, backend="triton")
    torch.testing.assert_close(out, fa.attention_ref(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


def test_output_is_laid_out_for_the_projection():
    """out.transpose(1, 2) is contiguous, so the model's reshape to (B, N, D) before the projection is free."""
    packed, _, _ = _packed(2, 3, 50, 64, None)
    out = ops.attention(*_qkv(packed, 3, 64), backend="triton")
    assert out.shape == (2, 3, 50, 64) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "fallback"])
def test_dropout_mask_is_shared_by_forward_and_backward(use_triton):
    """With v = identity the output is the dropped, rescaled P itself, which reveals the keep mask; a second call
    under the same torch seed with a real v then matches dense math with that mask, gradients included."""
    b, h, n, hd, grid, p_drop = 1, 2, 50, 64, (7, 7), 0.3
    packed, table, do = _packed(b, h, n, hd, grid, seed=4)
    q, k, _ = _qkv(packed, h, hd)

    dropped = _dropped_probabilities(q, k, table, grid, p_drop, use_triton)
    keep = dropped != 0
    dense = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + fa.relative_bias_dense(table, grid, n), -1)
    torch.testing.assert_close(dropped, dense * keep / (1 - p_drop), atol=1e-6, rtol=1e-5)
    assert abs(keep.float().mean().item() - (1 - p_drop)) < 0.03
    other = _dropped_probabilities(q, k, table, grid, p_drop, use_triton, seed=8)
    assert (keep[:, 0] != keep[:, 1]).any() and ((other != 0) != keep).any()

    res = _run(_seeded_dropout(p_drop, use_triton), packed, table, do, h, hd, grid, torch.float32)
    ref = _run(_dense_dropout(keep, p_drop), packed.double(), table.double(), do.double(), h, hd, grid,
               torch.float64)
    for name, a, e in zip(["out", "dq", "dk", "dv", "dtable"], res, ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=name)


def test_ops_dropout_runs_on_triton():
    """backend='triton' and 'auto' take attention dropout on the kernels; dropout_p outside [0, 1) is refused."""
    packed, _, _ = _packed(1, 2, 50, 64, None)
    q, k, v = _qkv(packed, 2, 64)
    torch.manual_seed(3)
    out = ops.attention(q, k, v, dropout_p=0.2, backend="auto")
    torch.manual_seed(3)
    torch.testing.assert_close(out, fa.flash_attention(q, k, v, dropout_p=0.2, use_triton=True))
    assert not torch.allclose(out, fa.attention_ref(q, k, v), atol=1e-3)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        ops.attention(q, k, v, dropout_p=1.0, backend="triton")


TILE_CASES = [(1, 2, 197, 64, (14, 14)), (2, 1, 41, 64, (5, 8)), (1, 1, 50, 80, (7, 7)), (1, 2, 257, 80, None)]


def _record_launches(monkeypatch, kernel, record):
    """Patches the launcher so that each launch of ``kernel`` appends ``record(args, kwargs)`` to the list returned."""
    calls = []

    def launch(real, k, grid, *args, **kwargs):
        if k is kernel:
            calls.append(record(args, kwargs))
        return real(k, grid, *args, **kwargs)
    route_launches(monkeypatch, launch)
    return calls


# which tiling: (the kernel it sets, flash_attention's argument, the compute capability the launches act for)
TILINGS = {"forward": (fa._attn_fwd_kernel, "fwd_tiles", 90), "dkdv-sm90": (fa._attn_bwd_dkdv_kernel, "bwd_tiles", 90),
           "dkdv-sm80": (fa._attn_bwd_dkdv_kernel, "bwd_tiles", 80)}


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("b,h,n,hd,grid", TILE_CASES, ids=[f"B{b}H{h}N{n}d{d}{'-rel' if g else ''}"
                                                          for b, h, n, d, g in TILE_CASES])
def test_every_tile_choice_matches_reference(b, h, n, hd, grid, tiling, monkeypatch):
    """Each tiling backend="auto" may pick on a GPU (flash_attention.forward_tiles; backward_tiles of Hopper, or
    the one before it) is the one launched, and gives the reference's output and gradients in fp32."""
    kernel, argument, arch = TILINGS[tiling]
    launched = _record_launches(monkeypatch, kernel, lambda args, kwargs: (
        kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]))
    monkeypatch.setattr(fa, "device_arch", lambda device: arch)
    packed, table, do = _packed(b, h, n, hd, grid, seed=2)
    ref = _run(_sdpa, packed.double(), None if table is None else table.double(), do.double(), h, hd, grid,
               torch.float64)
    choices = fa.forward_tiles(hd) if argument == "fwd_tiles" else fa.backward_tiles(hd, arch)
    several = argument == "fwd_tiles" or (arch >= 90 and hd <= 64)
    assert len(set(choices)) == len(choices) and (len(choices) > 1) == several
    for i in range(len(choices)):
        ours = _run(lambda q, k, v, t, g: fa.flash_attention(q, k, v, t, g, **{argument: i}), packed, table, do, h,
                    hd, grid, torch.float32)
        assert launched[-1] == tuple(choices[i])
        for name, a, e in zip(["out", "dq", "dk", "dv", "dtable"], ours, ref):
            torch.testing.assert_close(a, e, atol=2e-5 if name == "out" else 1e-4, rtol=1e-4, msg=f"{i} {name}")
    with pytest.raises(ValueError, match=f"{argument} must be in 0..{len(choices) - 1}"):
        fa.flash_attention(*_qkv(packed, h, hd), table, grid, **{argument: len(choices)})


def test_a_16_bit_table_runs_as_its_fp32_copy(monkeypatch):
    """A model cast to fp16 holds an fp16 table: the kernels get an exact fp32 copy (no 16-bit table variant, whose
    loads made ptxas serialise the wgmma), so output and gradients are those of the fp32 table, the table's
    gradient rounded once to fp16."""
    tables = _record_launches(monkeypatch, fa._attn_fwd_kernel, lambda args, kwargs: args[5].dtype)  # TABLE
    packed, table, do = _packed(2, 2, 50, 32, (7, 7), seed=5)
    packed, do, table16 = packed.half(), do.half(), table.half()
    results = []
    for t in (table16, table16.float()):
        leaf_packed, leaf_table = packed.clone().requires_grad_(), t.clone().requires_grad_()
        out = fa.flash_attention(*_qkv(leaf_packed, 2, 32), leaf_table, (7, 7))
        results.append([out, *torch.autograd.grad(out, [leaf_packed, leaf_table], do)])
    assert tables == [torch.float32, torch.float32]
    (out16, dpacked16, dtable16), (out32, dpacked32, dtable32) = results
    assert dtable16.dtype == torch.float16 and dtable32.dtype == torch.float32
    assert torch.equal(out16, out32) and torch.equal(dpacked16, dpacked32)
    torch.testing.assert_close(dtable16, dtable32.half(), rtol=0, atol=1e-3)  # atomic adds: order may differ


def _second_order(fn, packed, table, do, h, hd, grid, dtype):
    """A gradient penalty through ``fn``: the first gradients (packed, table) taken with create_graph=True, then
    the gradients of their squared sum, in float64."""
    packed = packed.to(dtype).requires_grad_()
    table = table.to(dtype).requires_grad_()
    out = fn(*_qkv(packed, h, hd), table, grid)
    first = torch.autograd.grad(out, [packed, table], do.to(dtype), create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in first), [packed, table])
    return [t.double() for t in (*first, *second)]


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "fallback"])
def test_second_derivatives_match_dense_math(use_triton):
    """The backward that autograd records differentiates P = softmax(scores) through q, k and the table (the saved
    lse is a constant to autograd): a second derivative against dense math in fp64."""
    b, h, n, hd, grid = 1, 2, 50, 32, (7, 7)
    packed, table, do = _packed(b, h, n, hd, grid, seed=5)

    def ours(q, k, v, t, g):
        return fa.flash_attention(q, k, v, t, g, use_triton=use_triton)

    def dense(q, k, v, t, g):
        return torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + fa.relative_bias_dense(t, g, n), -1) @ v

    got = _second_order(ours, packed, table, do, h, hd, grid, torch.float32)
    want = _second_order(dense, packed, table, do, h, hd, grid, torch.float64)
    for name, a, e in zip(["d packed", "d table", "d2 packed", "d2 table"], got, want):
        torch.testing.assert_close(a, e, atol=1e-4 * e.abs().max().item(), rtol=1e-4, msg=name)


def test_second_derivatives_with_dropout():
    """The fallback regenerates its dropout mask in the recorded backward (dense math with the revealed mask);
    the kernels' Philox mask has no torch counterpart, so there a recorded backward refuses clearly."""
    b, h, n, hd, grid, p_drop = 1, 2, 50, 64, (7, 7), 0.3  # hd >= n: v = identity reveals the mask
    packed, table, do = _packed(b, h, n, hd, grid, seed=6)
    q, k, _ = _qkv(packed, h, hd)
    keep = _dropped_probabilities(q, k, table, grid, p_drop, False) != 0
    got = _second_order(_seeded_dropout(p_drop, False), packed, table, do, h, hd, grid, torch.float32)
    want = _second_order(_dense_dropout(keep, p_drop), packed, table, do, h, hd, grid, torch.float64)
    for name, a, e in zip(["d packed", "d table", "d2 packed", "d2 table"], got, want):
        torch.testing.assert_close(a, e, atol=1e-4 * e.abs().max().item(), rtol=1e-4, msg=name)
    with pytest.raises(NotImplementedError, match="attn_drop_rate=0 or backend='torch'"):
        _second_order(_seeded_dropout(p_drop, True), packed, table, do, h, hd, grid, torch.float32)


def test_deterministic_mode_takes_the_table_gradient_off_the_atomics(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) a backward with a bias table (whose kernel sums by atomic
    adds) runs the fallback math: no backward kernel launches, the fallback's gradients. With dropout there
    is no such fallback: an error naming the way out, or with warn_only a warning and the kernels."""
    b, h, n, hd, grid = 1, 2, 50, 32, (7, 7)
    packed, table, do = _packed(b, h, n, hd, grid, seed=8)
    launched = []
    route_launches(monkeypatch, lambda real, kernel, *a, **k: launched.append(kernel) or real(kernel, *a, **k))

    def grads(use_triton, dropout_p=0.0):
        return _run(_seeded_dropout(dropout_p, use_triton), packed, table, do, h, hd, grid, torch.float32)

    fallback, kernels = grads(False), grads(True)
    assert any(k is not fa._attn_fwd_kernel for k in launched)  # the kernels' backward, outside that mode
    try:
        torch.use_deterministic_algorithms(True)
        launched.clear()
        deterministic = grads(True)
        assert launched and all(k is fa._attn_fwd_kernel for k in launched)  # the forward only
        torch.testing.assert_close(deterministic[0], kernels[0], rtol=0, atol=0)  # the kernels' forward
        for a, e in zip(deterministic[1:], fallback[1:]):  # the fallback's backward, on the kernels' lse
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="use attn_drop_rate=0 or backend='torch'"):
            grads(True, dropout_p=0.2)
        torch.use_deterministic_algorithms(True, warn_only=True)
        launched.clear()
        with pytest.warns(UserWarning, match="not deterministic"):
            grads(True, dropout_p=0.2)
        assert any(k is not fa._attn_fwd_kernel for k in launched)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "fallback"])
@pytest.mark.parametrize("case", [1, 5, 11], ids=[IDS[i] for i in (1, 5, 11)])
@pytest.mark.parametrize("p_drop", [0.0, 0.2], ids=["", "dropout"])
def test_packed_qkv_gradient_in_one_piece_equals_the_split_one(case, p_drop, use_triton):
    """flash_attention_qkv takes the packed (B, N, 3, heads, hd) projection and writes dq, dk, dv straight into one
    gradient of that layout (the kernels through strided views, the fallback by copies): the same output and the
    same gradients as flash_attention on the three views, whose gradients autograd stacks and copies."""
    b, h, n, hd, grid = CASES[case]
    packed, table, do = _packed(b, h, n, hd, grid, seed=9)
    for dtype in (torch.float32, torch.float16):
        results = []
        for fn in (fa.flash_attention_qkv, None):
            qkv = packed.to(dtype).reshape(b, n, 3, h, hd).requires_grad_()
            t = None if table is None else table.clone().requires_grad_()
            torch.manual_seed(3)
            if fn is None:
                out = fa.flash_attention(*fa.split_qkv(qkv), t, grid, dropout_p=p_drop, use_triton=use_triton)
            else:
                out = fn(qkv, t, grid, dropout_p=p_drop, use_triton=use_triton)
            grads = torch.autograd.grad(out, [qkv] + ([t] if t is not None else []), do.to(dtype))
            results.append((out, *grads))
        (out, dqkv, *dt), (ref_out, ref_dqkv, *ref_dt) = results
        assert torch.equal(out, ref_out) and torch.equal(dqkv, ref_dqkv), dtype
        assert dqkv.is_contiguous() and dqkv.shape == (b, n, 3, h, hd)
        for a, e in zip(dt, ref_dt):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)


def test_packed_qkv_second_derivative_matches_dense_math():
    """A backward that autograd records (create_graph=True) through the packed Function: the gradient of the
    packed tensor and a second derivative against dense math in fp64."""
    b, h, n, hd, grid = 1, 2, 50, 32, (7, 7)
    packed, table, do = _packed(b, h, n, hd, grid, seed=5)

    def run(fn, dtype):
        qkv = packed.to(dtype).reshape(b, n, 3, h, hd).requires_grad_()
        t = table.to(dtype).requires_grad_()
        first = torch.autograd.grad(fn(qkv, t), [qkv, t], do.to(dtype), create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), [qkv, t])
        return [x.double() for x in (*first, *second)]

    def dense(qkv, t):
        q, k, v = fa.split_qkv(qkv)
        return torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + fa.relative_bias_dense(t, grid, n), -1) @ v

    got = run(lambda qkv, t: fa.flash_attention_qkv(qkv, t, grid), torch.float32)
    want = run(dense, torch.float64)
    for name, a, e in zip(["d packed", "d table", "d2 packed", "d2 table"], got, want):
        torch.testing.assert_close(a, e, atol=1e-4 * e.abs().max().item(), rtol=1e-4, msg=name)


@pytest.mark.parametrize("grid", [None, (4, 4)], ids=["plain", "rel"])
@pytest.mark.parametrize("packed_call", [False, True], ids=["views", "packed"])
def test_inference_call_gives_the_recorded_calls_output(grid, packed_call):
    """``ops.attention`` (strided views) and ``ops.attention_qkv`` (the packed projection) in eager inference
    launch the forward kernel without the autograd Function: the bits of the call autograd records."""
    h, hd, n = 2, 32, 17
    packed, table, _ = _packed(2, h, n, hd, grid)
    table = None if table is None else table.requires_grad_()

    def call(x):
        if packed_call:
            return ops.attention_qkv(x, h, rel_bias=table, grid_size=grid, backend="triton")
        return ops.attention(*_qkv(x, h, hd), rel_bias=table, grid_size=grid, backend="triton")
    recorded = call(packed.requires_grad_())
    with torch.no_grad():
        inferred = call(packed)
    assert recorded.requires_grad and not inferred.requires_grad
    assert inferred.stride() == recorded.stride() and torch.equal(inferred, recorded)
