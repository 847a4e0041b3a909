"""factorize: rank rules, exact low-rank reconstruction, skip reasons, errors (exit 2), artifacts, the recipe."""

import json

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.cli import app
from compresspipe.errors import StageConfigError
from compresspipe.metrics import count_macs, count_params
from compresspipe.models.builtin import digits_cnn
from compresspipe.stages.factorize import FactorizeConfig, RankRule
from compresspipe.stages.factorize.stage import choose_rank, factorize_model
from tests.fixtures import CNN, tiny_recipe, write_recipe

runner = CliRunner()


def _factorize(module, shape, source=None, **cfg):
    state = ModelState(module.eval(), source or {}, shape, 10)
    rows = factorize_model(state, FactorizeConfig(type="factorize", **cfg), "factorize")
    return state, {r["layer"]: r for r in rows}


def _low_rank(out, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, r, generator=g) @ torch.randn(r, n, generator=g)


# -- config and rank rules -------------------------------------------------------------------------


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # squared: 16, 4, 1, 1 of 22
    assert choose_rank(s, RankRule(energy=0.7)) == 1  # 16/22 = 0.727
    assert choose_rank(s, RankRule(energy=0.9)) == 2  # 20/22 = 0.909
    assert choose_rank(s, RankRule(energy=0.95)) == 3
    assert choose_rank(s, RankRule(energy=1.0)) == 4
    assert choose_rank(s, RankRule(ratio=0.3)) == 2  # ceil(1.2)
    assert choose_rank(s, RankRule(ratio=0.25)) == 1
    assert choose_rank(s, RankRule(fixed=3)) == 3


@pytest.mark.parametrize("changes,message", [
    ({"rank": {"energy": 0.9, "fixed": 4}}, "give exactly one rank rule"),
    ({"rank": {}}, "give exactly one rank rule"),
    ({"rank": {"energy": 1.5}}, "stages[0].rank.energy"),
    ({"rank": {"fixed": 0}}, "stages[0].rank.fixed"),
    ({"rank": {"ratio": 0.5}, "method": "tuker"}, "did you mean 'tucker'"),
    ({"rank": {"ratio": 0.5}, "min_saving": 1.0}, "stages[0].min_saving"),
])
def test_bad_values_exit_2_through_the_cli(tmp_path, changes, message):
    path = write_recipe(tmp_path, tiny_recipe(model=CNN, stages=[{"type": "factorize", **changes}]))
    result = runner.invoke(app, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


# -- the factorization itself ------------------------------------------------------------------------


def test_linear_1000_at_rank_100_keeps_201000_params():
    torch.manual_seed(0)
    state, rows = _factorize(nn.Sequential(nn.Linear(1000, 1000)), (1000,), rank={"fixed": 100})
    assert count_params(state.module) == 201_000
    row = rows["0"]
    assert (row["params before"], row["params after"], row["MACs before"], row["MACs after"]) == (
        1_001_000, 201_000, 1_000_000, 200_000)
    assert [tuple(m.weight.shape) for m in state.module[0]] == [(100, 1000), (1000, 100)]
    assert state.module[0][0].bias is None and state.module[0][1].bias is not None


def test_low_rank_weights_are_reproduced_and_singular_values_split():
    layer = nn.Linear(40, 30)
    with torch.no_grad():
        layer.weight.copy_(_low_rank(30, 40, 5))
    x = torch.randn(7, 40)
    expected = layer(x)
    state, rows = _factorize(nn.Sequential(layer), (40,), rank={"fixed": 5})
    assert torch.allclose(state.module(x), expected, atol=1e-4)
    assert rows["0"]["rel. error"] < 1e-6
    first, second = state.module[0]
    # sqrt(S) on each side: both factors carry the same singular values
    assert torch.allclose(torch.linalg.svdvals(first.weight)[:5], torch.linalg.svdvals(second.weight)[:5], rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_conv_factorization_keeps_stride_padding_dilation(method):
    conv = nn.Conv2d(6, 12, 3, stride=2, padding=2, dilation=2)
    with torch.no_grad():  # Tucker ranks (in 3, out 4) and matrix rank 4 at once
        core = torch.randn(4, 3, 3, 3)
        conv.weight.copy_(torch.einsum("rshw,or,is->oihw", core, torch.randn(12, 4), torch.randn(6, 3)))
    x = torch.randn(2, 6, 11, 11)
    expected = conv(x)
    rank = {"energy": 0.9999999}
    state, rows = _factorize(nn.Sequential(conv), (6, 11, 11), method=method, rank=rank, min_saving=0.0)
    seq = state.module[0]
    assert torch.allclose(state.module(x), expected, atol=1e-4)
    assert rows["0"]["rank"] == ("in 3 / out 4" if method == "tucker" else 4)
    kxk = seq[1] if method == "tucker" else seq[0]
    assert (kxk.stride, kxk.padding, kxk.dilation) == ((2, 2), (2, 2), (2, 2))
    assert [m.kernel_size for m in seq] == ([(1, 1), (3, 3), (1, 1)] if method == "tucker" else [(3, 3), (1, 1)])
    assert count_macs(state.module, (6, 11, 11)) == rows["0"]["MACs after"] < rows["0"]["MACs before"]


def test_skip_reasons_and_report_columns():
    state, rows = _factorize(digits_cnn(width=8, hidden=32), (1, 8, 8), rank={"ratio": 0.9})
    # fc1 is 32x256: rank ceil(0.9 * 32) = 29 >= 32 * 256 / 288
    assert rows["fc1"]["skipped"] == "rank 29 >= mn/(m+n) = 28.4: no saving"
    assert rows["fc1"]["params after"] == rows["fc1"]["params before"] == 32 * 256 + 32
    assert isinstance(state.module.fc1, nn.Linear)
    state, rows = _factorize(digits_cnn(width=8, hidden=32), (1, 8, 8), rank={"ratio": 0.6}, min_saving=0.25)
    assert rows["fc1"]["skipped"] is None and rows["fc1"]["rank"] == 20  # 20 * 288 + 32 of 8224: saves 29.6%
    assert rows["fc1"]["params after"] == 5792 and 0 < rows["fc1"]["rel. error"] < 1
    assert rows["c2"]["skipped"] == "saves 23.3% of its parameters < min_saving 25%"  # 10 * 88 + 16 of 1168
    assert rows["c1"]["skipped"] == "rank 5 >= mn/(m+n) = 4.2: no saving"
    assert [e["module"] for e in state.edits] == ["fc1"]
    assert set(rows["fc1"]) >= {"layer", "shape", "rank", "params before", "params after", "MACs before",
                                "MACs after", "rel. error", "skipped"}


def test_min_saving_skips_layers_that_save_too_little():
    state, rows = _factorize(nn.Sequential(nn.Linear(100, 100)), (100,), rank={"fixed": 40}, min_saving=0.25)
    # 40 * 200 + 100 = 8100 of 10100: saves 19.8%
    assert rows["0"]["skipped"] == "saves 19.8% of its parameters < min_saving 25%"
    assert isinstance(state.module[0], nn.Linear) and not state.edits


def test_fixed_rank_larger_than_the_layer_is_a_stage_config_error():
    with pytest.raises(StageConfigError, match=r"layer 'fc2' \(Linear 10x32\): its max rank is 10"):
        _factorize(digits_cnn(width=8, hidden=32), (1, 8, 8), rank={"fixed": 16}, include=["fc*"])
    with pytest.raises(StageConfigError, match=r"selector 'nothing\*' matches no layer"):
        _factorize(digits_cnn(width=8, hidden=32), (1, 8, 8), rank={"fixed": 4}, include=["nothing*"])


def test_grouped_convs_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3))
    state, rows = _factorize(model, (8, 9, 9), rank={"ratio": 0.25}, min_saving=0.0)
    assert rows["0"]["skipped"] == "grouped convolution (groups=8)"
    assert rows["1"]["skipped"] is None and isinstance(state.module[1], nn.Sequential)


def test_resnet18_convs_factorize_train_and_reload_identically(tmp_path):
    torch.manual_seed(0)
    source = {"builtin": None, "torchvision": "resnet18", "kwargs": {"num_classes": 10}}
    model = torchvision.models.resnet18(num_classes=10)
    before = count_params(model)
    state = ModelState(model.eval(), source, (3, 32, 32), 10)
    svd = factorize_model(state, FactorizeConfig(type="factorize", rank={"ratio": 0.25}, include=["layer2.0.*"]), "f")
    tucker = factorize_model(state, FactorizeConfig(type="factorize", method="tucker", rank={"ratio": 0.25},
                                                    include=["conv1", "layer3.0.conv1"]), "f")
    rows = {r["layer"]: r for r in svd + tucker}
    assert set(rows) == {"layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "conv1", "layer3.0.conv1"}
    assert all(r["skipped"] is None for r in rows.values())
    assert rows["conv1"]["method"] == "tucker2" and rows["layer2.0.downsample.0"]["method"] == "svd"
    assert count_params(state.module) == before - sum(r["params before"] - r["params after"] for r in rows.values())
    assert state.module.conv1[1].stride == (2, 2) and state.module.layer2[0].conv1[0].stride == (2, 2)
    state.module.train()
    state.module(torch.randn(2, 3, 32, 32)).logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in state.module.parameters())
    state.module.eval()
    save_model(state, tmp_path / "m")
    reloaded = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(state.module(x), reloaded.module(x))
    assert [e["kind"] for e in json.loads((tmp_path / "m" / "model.json").read_text())["edits"]] == ["replace"] * 5


# -- through the executor and the CLI -----------------------------------------------------------------


def test_fixed_rank_too_large_exits_2_naming_the_layer(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(model=CNN, stages=[{"type": "factorize", "rank": {"fixed": 12}}]))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r"), "-q"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "layer 'c1' (Conv2d 8x1x3x3): its max rank is 8" in result.output
    assert "Traceback" not in result.output

