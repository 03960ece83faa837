"""fastvit.flops: the FLOP count from the config against torch's FLOP counter and the published GMACs, and the
peak lookup MFU divides by."""
import pytest
import torch

import fastvit
from fastvit.flops import forward_flops, peak_flops, train_flops_per_image


@pytest.mark.parametrize("block_fn, mlp_layer", [("Block", None), ("ParallelThingsBlock", None),
                                                 ("ParallelScalingBlock", None), ("Block", "SwiGLU"),
                                                 ("ParallelThingsBlock", "SwiGLU"), ("Block", "GluMlp")])
def test_flops_match_torch_flop_counter(block_fn, mlp_layer):
    """Exact: every matmul and the patch conv. Counted on timm's plain-torch model (fastvit's custom ops are opaque
    to the counter) with the math SDPA backend, which runs attention as counted matmuls. A gated MLP counts its
    gate (SwiGLU has no fc1: an AttributeError; GluMlp's fc1 is twice fc2's width: counted as twice the MLP)."""
    import timm.layers
    import timm.models.vision_transformer as tv
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    if mlp_layer:
        cfg.update(mlp_layer=getattr(timm.layers, mlp_layer), act_layer="silu")
    ref = tv.VisionTransformer(**cfg, block_fn=getattr(tv, block_fn))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        ref(torch.randn(2, 3, 32, 32))
    ours = fastvit.VisionTransformer(**cfg, block_fn=block_fn)
    assert forward_flops(ours) == forward_flops(ref) == counter.get_total_flops() / 2
    assert train_flops_per_image(ours) == 3 * forward_flops(ours)


@pytest.mark.parametrize("name,gmacs", [("vit_base_patch16_224", 17.6), ("vit_large_patch16_224", 61.6),
                                        ("vit_huge_patch14_224", 167.4)])
def test_flops_match_published_gmacs(name, gmacs):
    with torch.device("meta"):
        model = fastvit.create_model(name)
    assert forward_flops(model) / 2 / 1e9 == pytest.approx(gmacs, rel=0.005)


def test_peak_flops(monkeypatch):
    """--peak-tflops wins; CPU has no peak; GPU names match the table first-match-first ("H100 PCIe" before "H100",
    so a PCIe card is not graded against the SXM peak)."""
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12
    assert peak_flops(torch.device("cpu")) is None
    for bad in (0.0, -1.0):  # never a silent fall-back to the table or a negative MFU
        with pytest.raises(ValueError, match=f"must be > 0, got {bad}"):
            peak_flops(torch.device("cpu"), bad)
    for name, tflops in (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0),
                         ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0)) == (None if tflops is None else tflops * 1e12)
