"""FLOPs of a ViT from its config, and the GPU peaks to divide them by: the one place MFU is computed from, for
training logs (``fastvit.train``) and the benchmarks (``bench/throughput.py``).

FLOPs are 2 x the multiply-accumulates of every matmul, attention's QK^T and AV included. Norms, softmax, GELU and
adds are left out (they are memory-bound, and the usual MFU convention skips them); so is a hybrid model's CNN
backbone (only its patch projection is counted).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PEAK_TFLOPS", "vit_config", "forward_flops", "train_flops_per_image", "peak_flops"]

# Dense bf16 peak TFLOP/s by device name (first match wins, so "H100 PCIe" precedes "H100"); --peak-tflops overrides.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def _linear_macs(mlp):
    """Multiply-accumulates per token of an MLP's Linears: fc1 and fc2, and a gated MLP's gate (SwiGLU's fc1_g and
    fc1_x; GluMlp's fc1 is twice as wide as fc2's input)."""
    return sum(m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))


def _mlp_macs_and_branches(block):
    """(MLP multiply-accumulates per token, attention + MLP branch pairs) of a block, timm's or ours: a
    ParallelScalingBlock's MLP is the first part of its one input projection (and of its output projection), a
    ParallelThingsBlock runs ``num_parallel`` pairs."""
    if hasattr(block, "in_split"):
        return 2 * block.in_split[0] * block.in_proj.in_features, 1
    if hasattr(block, "ffns"):
        return _linear_macs(block.ffns[0].mlp), block.num_parallel
    return _linear_macs(block.mlp), 1


def vit_config(model):
    """The sizes that decide a ViT's FLOPs, read from a fastvit or timm VisionTransformer."""
    pe = model.patch_embed
    kh, kw = pe.proj.kernel_size
    mlp_macs, branches = _mlp_macs_and_branches(model.blocks[0]) if len(model.blocks) else (0, 1)
    return dict(num_patches=pe.num_patches, prefix_tokens=model.num_prefix_tokens, embed_dim=model.embed_dim,
                depth=len(model.blocks), mlp_macs=mlp_macs, branches=branches,
                patch_dim=kh * kw * pe.proj.in_channels, num_classes=model.num_classes)


def forward_flops(model) -> int:
    """Forward FLOPs per image of ``model``: patch projection, per block (per branch pair of a parallel block) qkv /
    attention scores and mix / output projection / MLP, and the head on the pooled token."""
    c = vit_config(model)
    n, d = c["num_patches"] + c["prefix_tokens"], c["embed_dim"]
    macs = c["num_patches"] * c["patch_dim"] * d
    per_block = n * d * 3 * d + n * d * d               # qkv, attention output projection
    per_block += 2 * n * n * d                          # q k^T and softmax(.) v over all heads
    per_block += n * c["mlp_macs"]                      # fc1 (and a gate), fc2
    macs += c["depth"] * c["branches"] * per_block + d * c["num_classes"]
    return 2 * macs


def train_flops_per_image(model) -> int:
    """FLOPs of one training step per image: 3x the forward (the backward costs twice the forward)."""
    return 3 * forward_flops(model)


def peak_flops(device, override_tflops=None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, the denominator of MFU: ``override_tflops`` (TFLOP/s) if given,
    else looked up by GPU name in :data:`PEAK_TFLOPS`; None on CPU or an unlisted GPU (MFU is then not reported)."""
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"peak TFLOP/s must be > 0, got {override_tflops}")
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_TFLOPS if key in name), None)
