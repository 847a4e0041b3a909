"""A real model whose blocks train with parallel branches (timm's RepGhost) is written folded (models.reparam)."""

from __future__ import annotations

import os

import pytest
import torch

ACCEPTANCE = bool(os.environ.get("COMPRESSPIPE_ACCEPTANCE"))


@pytest.mark.skipif(not ACCEPTANCE, reason="a timm RepGhost exported twice: make acceptance")
def test_the_onnx_file_of_a_reparameterizable_timm_model_is_written_folded(tmp_path):
    """timm's RepGhost: its identity-branch BatchNorms cannot fold into a convolution (ONNX Runtime keeps them,
    and an int8 file had to keep them float); the file is written from the folded copy, follows the model, and
    says so."""
    timm = pytest.importorskip("timm")
    import onnx
    import onnxruntime as ort

    from compresspipe.artifacts.model import ModelState
    from compresspipe.runtimes.onnx_float import write_onnx
    from compresspipe.stages.export import ExportConfig
    from compresspipe.stages.export.stage import build_job
    from tests.fixtures import digits_cnn_recipe, stage_context

    torch.manual_seed(0)
    model = timm.create_model("repghostnet_050", num_classes=10).eval()
    state = ModelState(model, {}, (3, 32, 32), 10)
    recipe = digits_cnn_recipe()
    recipe["model"]["input_shape"] = [3, 32, 32]
    recipe["data"].update(size=32, channels=3, max_samples=64)
    ctx = stage_context(tmp_path, recipe, "export", stage_dir=tmp_path / "stage")[1]
    job = build_job(ExportConfig.model_validate({"type": "export", "formats": ["onnx"]}), state, ctx, ["onnx"], 1,
                    None)
    path = write_onnx(model, job, tmp_path / "m.onnx")[0]
    assert any("inference form" in n and "block(s)" in n for n in job.notes), job.notes
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops  # the branch BatchNorms are folded away
    assert any("fusion_bn" in n for n, _ in model.named_modules())  # the model keeps its training form
    x = torch.randn(2, 3, 32, 32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(got - want).max() <= 1e-4 * max(1.0, abs(want).max())
