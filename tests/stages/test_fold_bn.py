"""fold_bn: conv -> BatchNorm pairs become one conv; outputs unchanged, layers fewer, artifact reloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresspipe.artifacts.model import load_model
from compresspipe.errors import StageConfigError, StageError
from tests.fixtures import CNN, run, tiny_recipe

RESNET = {"builtin": "tiny-resnet", "kwargs": {"in_channels": 1, "width": 8}, "input_shape": [1, 8, 8]}


@pytest.mark.parametrize("model", [CNN, RESNET], ids=["digits-cnn", "tiny-resnet"])
def test_folding_keeps_outputs_and_removes_every_batchnorm(tmp_path, model):
    result = run(tmp_path, tiny_recipe(model=model, stages=[{"type": "train", "epochs": 2}, {"type": "fold_bn"}]))
    train, folded = result.report["stages"][-2:]
    assert folded["kind"] == "structural" and folded["params"] < train["params"]
    assert folded["accuracy"] == pytest.approx(train["accuracy"], abs=1e-9)
    before, after = load_model(result.folder / "01-train").module, load_model(result.folder / "02-fold_bn").module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in after.modules())
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(before(x), after(x), atol=1e-5)
    pairs = folded["details"]["tables"]["folded"]
    expected = 2 if model is CNN else 6  # tiny-resnet: stem, two blocks of two, one downsample
    assert len(pairs) == expected


def test_a_model_without_convolutions_is_a_clear_error(tmp_path):
    with pytest.raises(StageConfigError, match="leave no Conv2d layer to work on"):
        run(tmp_path, tiny_recipe(stages=[{"type": "fold_bn"}]))  # digits-mlp: nothing to fold


def test_the_output_change_is_judged_relative_to_the_outputs_scale(tmp_path):
    """Folding rounds differently in float32: the change is judged against atol + rtol x the largest |output|, and
    rtol: 0 judges by atol alone."""
    with pytest.raises(StageError, match=r"> atol 1e-12 \+ rtol 0 x the largest \|output\|"):
        (tmp_path / "a").mkdir()
        run(tmp_path / "a", tiny_recipe(model=CNN, stages=[{"type": "fold_bn", "atol": 1e-12, "rtol": 0}]))
    (tmp_path / "b").mkdir()
    result = run(tmp_path / "b", tiny_recipe(model=CNN, stages=[{"type": "fold_bn", "atol": 1e-12}]))
    assert 0 < result.report["stages"][-1]["details"]["max_abs_diff"] <= 1e-4 * 10
