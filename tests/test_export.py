"""torch.export and ONNX export (the torch backend's program holds only aten ops and runs in onnxruntime)."""
import warnings

import numpy as np
import onnxruntime
import pytest
import torch

import fastvit
from _helpers import timm_pair

MODELS = [("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
          ("vit_base_r50_s16_224", dict(img_size=64, depth=1))]


def test_exporting_is_true_while_torch_export_traces_and_only_then():
    """The export branches (plain aten ops, a symbolic image size kept symbolic) ask ``exporting()``: True under
    torch.export, False in eager code and inside a torch.compile trace (torch 2.11's dynamo answered
    ``torch.compiler.is_exporting()`` True there, and compiled code took those branches)."""
    from fastvit.kernels._launch import exporting

    class Branch(torch.nn.Module):
        def forward(self, x):
            return x + 1 if exporting() else x - 1
    x, model = torch.zeros(2), Branch()
    assert model(x).tolist() == [-1, -1]
    assert torch.compile(model, fullgraph=True, backend="eager")(x).tolist() == [-1, -1]
    assert torch.export.export(model, (x,)).module()(x).tolist() == [1, 1]


def _model(name, kwargs, **extra):
    torch.manual_seed(0)
    return fastvit.create_model(name, **kwargs, **extra).eval()


def _images(kwargs):
    size = kwargs["img_size"]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_export_matches_eager_with_plain_aten_ops(backend):
    model = _model(*MODELS[0], backend=backend)
    x = _images(MODELS[0][1])
    program = torch.export.export(model, (x,))
    ours = [n.target for n in program.graph.nodes if n.op == "call_function" and "fastvit" in str(n.target)]
    assert not ours
    # a fixed size resamples no position table (as timm's program: an identity bicubic resize was left in it)
    assert not [n for n in program.graph.nodes if "upsample" in str(n.target)]
    torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)
    rows_and_columns = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                 pos_embed="learn_2d").eval()  # its 1-D tables: no resample either
    program = torch.export.export(rows_and_columns, (x,))
    assert not [n for n in program.graph.nodes if "upsample" in str(n.target)]


@pytest.mark.parametrize("pos_embed", ["learn", "learn_2d"])
def test_torch_export_with_a_dynamic_image_size_runs_other_sizes(pos_embed):
    """dynamic_img_size with symbolic H and W: the program runs (and matches eager) at sizes other than the traced
    one, as timm's does; nothing fixes the grid to the example's while tracing."""
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                                      dynamic_img_size=True, pos_embed=pos_embed).eval()
    h, w = torch.export.Dim("h", min=2, max=8), torch.export.Dim("w", min=2, max=8)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({2: 8 * h, 3: 8 * w},))
    for size in ((48, 40), (32, 32), (16, 64)):
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_torch_export_keeps_relative_position_bias():
    model = fastvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                      num_classes=5, pos_embed="rel").eval()
    with torch.no_grad():
        model.blocks[0].attn.rel_pos_table.normal_()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_onnx_export_runs_in_onnxruntime_like_eager(name, kwargs):
    model = _model(name, kwargs, backend="torch")
    x = _images(kwargs)
    onnx_program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    expected = model(x).detach().numpy()
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-4


def _tracer_warnings(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, (x,), check_trace=False)
    return [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


@pytest.mark.parametrize("rel", [False, True])
def test_jit_trace_warns_per_model_not_per_block(rel):
    """torch.jit.trace warns where Python compares a traced size. timm's ViT does so a fixed number of times (its
    image checks); so does ours (its image checks compare a couple of sizes more), while attention's argument
    checks, about 20 warnings a block before, stay quiet."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    counts = {}
    for depth in (1, 3):
        torch.manual_seed(0)
        kwargs = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=depth, num_classes=5)
        model = fastvit.VisionTransformer(**kwargs, pos_embed="rel" if rel else "learn").eval()
        x = torch.randn(1, 3, 32, 32)
        counts[depth] = len(_tracer_warnings(model, x))
        if not rel:
            timm_count = len(_tracer_warnings(TimmViT(**kwargs).eval(), x))
            assert counts[depth] <= timm_count + 2
    assert counts[1] == counts[3]


def test_legacy_onnx_exporter_and_jit_trace_record_plain_ops(tmp_path):
    """torch.onnx.export(dynamo=False) traces with torch.jit.trace, which recorded our autograd Functions as Python
    operators ONNX cannot export: under tracing the torch fallback's aten ops are recorded instead."""
    name, kwargs = MODELS[0]
    model = _model(name, kwargs)
    x = _images(kwargs)
    traced = torch.jit.trace(model, (x,))
    assert "prim::PythonOp" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": x.numpy()})[0]
    assert np.abs(out - model(x).detach().numpy()).max() <= 1e-4
    with pytest.raises(RuntimeError, match="do not support TorchScript scripting .* use torch.export.export"):
        torch.jit.script(model)


def test_jit_trace_of_a_model_in_training_mode():
    """A model as create_model returns it (train mode) traces: its training step's class-token-only last block
    is left out under a trace, whose check traces again without grad (the two graphs differed), and the traced
    training forward and its gradients are timm's."""
    model, ref = timm_pair(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    model.train(), ref.train()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, (x,))
    out, expected = traced(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward(), expected.sum().backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
