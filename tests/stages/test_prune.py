"""prune: mask-only magnitude pruning, structured pruning that really shrinks layers, errors, artifacts."""

import json
from types import SimpleNamespace

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from compresspipe.artifacts.edits import apply_edit
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.cli import app
from compresspipe.errors import RecipeError, StageConfigError
from compresspipe.models.builtin import digits_cnn, tiny_resnet
from compresspipe.recipe import load_recipe
from compresspipe.stages.prune import PruneConfig, step_amounts
from compresspipe.stages.prune.stage import PruneStage, resolve_selection
from tests.fixtures import CNN, run, tiny_recipe, write_recipe

runner = CliRunner()
WARM = {"type": "train", "name": "warm", "epochs": 2, "lr": 3.0e-3}


def _run(tmp_path, stages, out="run", model=CNN):
    return run(tmp_path, tiny_recipe(model=model, stages=stages), out)


def _cli_run(tmp_path, prune, model=CNN):
    path = write_recipe(tmp_path, tiny_recipe(model=model, stages=[prune]))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "r"), "-q", "--force"],
                           catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def _prune(module, shape, source=None, **cfg):
    """Run the stage's structured path on a module directly (no training, so no data is needed)."""
    config = PruneConfig(type="prune", **cfg)
    state = ModelState(module.eval(), source or {}, shape, 10)
    ctx = SimpleNamespace(name="prune", seed=0, task="classification", stage_dir=None)
    sel = resolve_selection(config, module, "prune")
    rows, _ = PruneStage(config)._structured(state, ctx, sel, finetune=False)
    return state, rows


# -- config --------------------------------------------------------------------------------------


def test_schedules_reach_the_final_amount():
    geo, lin = step_amounts(0.75, 2, "geometric"), step_amounts(0.75, 2, "linear")
    assert geo == pytest.approx([0, 0.5, 0.75]) and lin == pytest.approx([0, 0.375, 0.75])


@pytest.mark.parametrize("changes,message", [
    ({"amount": 1.5}, "stages[0].amount: must be less than 1 (got 1.5)"),
    ({"importance": "l3"}, "stages[0].importance: must be one of: l1, l2, taylor (got 'l3')"),
    ({"method": "magnitud"}, "did you mean 'magnitude'"),
    ({"per_layer": {"c1": -0.1}}, "greater than or equal to 0"),
    ({"finetune": {"epochs": 1, "distill": "teacher"}}, "unknown teacher 'teacher'"),
])
def test_bad_values_exit_2_through_the_cli(tmp_path, changes, message):
    path = write_recipe(tmp_path, tiny_recipe(model=CNN, stages=[{"type": "prune", "amount": 0.5, **changes}]))
    result = runner.invoke(app, ["validate", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_distill_teacher_may_be_an_earlier_stage(tmp_path):
    stages = [WARM, {"type": "prune", "amount": 0.5, "finetune": {"distill": "warm"}}]
    assert load_recipe(write_recipe(tmp_path, tiny_recipe(model=CNN, stages=stages))).stages[1].finetune.distill
    with pytest.raises(RecipeError, match="must be the baseline or a stage that runs before"):
        load_recipe(write_recipe(tmp_path, tiny_recipe(model=CNN, stages=list(reversed(stages)))))


# -- errors that need the model: exit 2, message, no traceback ------------------------------------


def test_selector_matching_nothing_is_named(tmp_path):
    result = _cli_run(tmp_path, {"type": "prune", "amount": 0.5, "include": ["conv*"]})
    assert result.exit_code == 2 and "selector 'conv*' matches no layer" in result.output
    result = _cli_run(tmp_path, {"type": "prune", "amount": 0.5, "per_layer": {"fc9": 0.2}})
    assert result.exit_code == 2 and "per_layer selector 'fc9'" in result.output


def test_layer_tied_to_an_unselected_layer_cannot_be_pruned(tmp_path):
    model = {"builtin": "tiny-resnet", "kwargs": {"width": 4}, "input_shape": [1, 8, 8]}
    # layer1.conv2's outputs are added to the stem's outputs (residual), and the stem is not selected
    result = _cli_run(tmp_path, {"type": "prune", "amount": 0.5, "include": ["layer1.conv2"]},
                      model={**model, "kwargs": {"width": 4, "in_channels": 1}})
    assert result.exit_code == 2, result.output
    assert "cannot prune 'layer1.conv2' structurally" in result.output
    assert "tied to layer(s) outside the selection (excluded, protected or not included): conv1" in result.output


def test_classifier_head_outputs_are_never_pruned(tmp_path):
    result = _cli_run(tmp_path, {"type": "prune", "amount": 0.5, "include": ["fc2"]})
    assert result.exit_code == 2 and "classifier head 'fc2'" in result.output


def test_layer_feeding_the_output_directly_stays_whole():
    """A conv whose output channels are the logits is protected by default (any layer type, not just Linear)."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    state, rows = _prune(model, (1, 8, 8), amount=0.5)
    assert [r["shape after"] for r in rows] == ["4x1x3x3", "10x4x1x1"]
    assert rows[1]["requested"] is None and rows[1]["channels removed"] == 0.0
    assert state.module(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_model_the_graph_cannot_trace_is_pruned_part_by_part():
    """shufflenet's channel shuffle defeats the tracer: the parts it can trace are pruned, borders kept."""
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    before = sum(p.numel() for p in model.parameters())
    config = PruneConfig(type="prune", amount=0.5)
    state = ModelState(model, {}, (3, 16, 16), 10)
    notes: list[str] = []
    PruneStage(config)._structured(state, SimpleNamespace(name="prune", seed=0, stage_dir=None),
                                   resolve_selection(config, model, "prune"), finetune=False, notes=notes)
    after = sum(p.numel() for p in state.module.parameters())
    assert after < 0.9 * before
    assert state.module(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert any("cannot prune the whole model at once" in n and "part(s)" in n for n in notes), notes


class _MixedConv(nn.Module):
    """timm's MixedConv2d in small: it splits its input by channel counts it keeps as plain numbers."""

    def __init__(self, channels: int):
        super().__init__()
        self.splits = [channels // 2, channels - channels // 2]
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, (3, 5), strict=True))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, torch.split(x, self.splits, 1), strict=True)], 1)


def test_model_whose_pruned_forward_breaks_is_pruned_part_by_part():
    """Torch-Pruning traces a channel split and prunes through it, but the module splits by its own numbers: the
    model pruned whole would fail in its forward (mixnet: "split_with_sizes expects split_sizes to sum exactly
    to 12"). The stage tries the whole model on a copy first, then prunes the parts that prune cleanly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), _MixedConv(16), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU(),
                                        nn.Conv2d(32, 16, 1)), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    config = PruneConfig(type="prune", amount=0.5)
    state = ModelState(model, {}, (3, 8, 8), 10)
    notes: list[str] = []
    PruneStage(config)._structured(state, SimpleNamespace(name="prune", seed=0, stage_dir=None),
                                   resolve_selection(config, model, "prune"), finetune=False, notes=notes)
    pruned = state.module
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert pruned[4][2].out_channels == 16 and pruned[4][4].in_channels == 16  # inside the block: 32 -> 16
    assert pruned[0].out_channels == 16 and pruned[2].splits == [8, 8]  # what the split reads stays
    assert any("its forward fails" in n and "split_with_sizes" in n for n in notes), notes


def test_model_nothing_of_which_can_be_traced_is_a_config_error(monkeypatch):
    import compresspipe.stages.prune.stage as prune_stage
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    monkeypatch.setattr(prune_stage.PruneStage, "_prunes_cleanly", lambda *a, **k: False)
    with pytest.raises(StageConfigError, match="structured pruning is not available for it, use method: magnitude"):
        _prune(model, (3, 16, 16), amount=0.5)


# -- structured: shapes shrink, artifacts replay bit-identically -----------------------------------


class GroupedNet(nn.Module):
    """Grouped conv, depthwise + pointwise with a residual add: what the dependency graph must follow."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g, self.b2 = nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
        self.dw, self.pw = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.g(x)))
        return self.fc((self.pw(self.dw(x)) + x).mean((2, 3)))


def _check_replay(state, fresh, folder):
    save_model(state, folder)
    if state.source:
        reloaded = load_model(folder).module
    else:  # a model outside the registry: the same replay load_model does, by hand
        reloaded = fresh
        for edit in json.loads((folder / "model.json").read_text())["edits"]:
            reloaded = apply_edit(reloaded, edit)
        reloaded.load_state_dict(load_file(str(folder / "model.safetensors")))
        reloaded.eval()
    x = torch.randn(2, *state.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(state.module(x), reloaded(x))
    for (name, a), (_, b) in zip(state.module.named_modules(), reloaded.named_modules(), strict=True):
        if isinstance(a, nn.Conv2d):
            assert (a.in_channels, a.out_channels, a.groups) == (b.in_channels, b.out_channels, b.groups), name
    return reloaded


@pytest.mark.parametrize("case", ["digits-cnn", "tiny-resnet", "resnet18", "mobilenet_v2", "grouped"])
def test_structured_shrinks_and_reloads_bit_identically(tmp_path, case):
    torch.manual_seed(0)
    if case == "grouped":
        source, module, shape = None, GroupedNet(), (3, 8, 8)
    elif case in ("resnet18", "mobilenet_v2"):
        source = {"torchvision": case, "kwargs": {"num_classes": 10}}
        module, shape = torchvision.models.get_model(case, num_classes=10), (3, 16, 16)
    else:
        source = {"builtin": case, "kwargs": {}}
        module = digits_cnn() if case == "digits-cnn" else tiny_resnet()
        shape = (1, 8, 8) if case == "digits-cnn" else (3, 8, 8)
    params_before = sum(p.numel() for p in module.parameters())
    state, rows = _prune(module, shape, source=source, amount=0.5)
    params_after = sum(p.numel() for p in state.module.parameters())
    assert params_before / params_after > 2.5  # half the channels on both sides of most weights
    assert state.edits and state.edits[-1]["kind"] == "resize"
    assert all(r["channels removed"] == pytest.approx(0.5, abs=0.07) for r in rows if r["requested"])
    reloaded = _check_replay(state, GroupedNet() if case == "grouped" else None, tmp_path / "m")
    if case == "mobilenet_v2":  # depthwise convs stay depthwise at their new width
        dws = [m for m in reloaded.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert dws and all(m.groups == m.in_channels == m.out_channels < 960 for m in dws)
    if case == "grouped":
        assert reloaded.g.groups == 4 and reloaded.g.out_channels == 16 and reloaded.dw.groups == 16
    state.module.train()  # still trains: forward and backward run at the new shapes
    state.module(torch.randn(2, *shape)).sum().backward()


def test_per_layer_override_and_global_scope():
    state, rows = _prune(digits_cnn(), (1, 8, 8), amount=0.5, per_layer={"c1": 0.25})
    by = {r["layer"]: r for r in rows}
    assert by["c1"]["channels removed"] == 0.25 and by["c2"]["channels removed"] == 0.5
    assert by["fc2"]["shape after"] == "10x64" and by["fc2"]["requested"] is None
    torch.manual_seed(0)
    state, rows = _prune(digits_cnn(), (1, 8, 8), amount=0.5, scope="global")
    kept = {r["layer"]: r["shape after"] for r in rows}
    assert kept["fc2"].startswith("10x")
    removed = [r["channels removed"] for r in rows if r["requested"]]
    assert 0.3 < sum(removed) / len(removed) < 0.7


# -- through the executor ------------------------------------------------------------------------


def test_structured_random_and_taylor_in_a_run(tmp_path):
    stages = [WARM,
              {"type": "prune", "name": "l2", "amount": 0.5, "steps": 2, "finetune": {"epochs": 1, "lr": 3e-3}},
              {"type": "prune", "name": "rand", "method": "random", "amount": 0.3},
              {"type": "prune", "name": "taylor", "amount": 0.3, "importance": "taylor", "calibration_batches": 2,
               "finetune": {"epochs": 1, "distill": "warm"}}]
    result = _run(tmp_path, stages)
    rows = {s["name"]: s for s in result.report["stages"]}
    warm, l2, rand, taylor = rows["warm"], rows["l2"], rows["rand"], rows["taylor"]
    assert l2["kind"] == rand["kind"] == taylor["kind"] == "structural"
    assert l2["vs_reference"]["mac_reduction"] > 3.0 and l2["vs_reference"]["param_reduction"] > 3.0
    assert taylor["params"] < rand["params"] < l2["params"] < warm["params"]
    assert len(l2["details"]["finetune"]) == 2 and l2["details"]["schedule"][-1] == 0.5
    assert l2["accuracy"] == l2["details"]["finetune"][-1]["best_accuracy"] > 0.3  # a working classifier (chance: 0.1)
    resolved = json.loads((result.folder / l2["folder"] / "pruning.json").read_text())
    assert resolved["layers"]["c1"]["amount"] == 0.5 and resolved["protected_head"] == "fc2"
    report_md = (result.folder / "report.md").read_text()
    assert "## l2: per layer" in report_md and "| c2 | 16x8x3x3 | 8x4x3x3 | 0.5 | 0.5 | 0.75 |" in report_md
    for name in ("l2", "taylor"):  # every pruned stage reloads with the same outputs
        folder = result.folder / rows[name]["folder"]
        a, b = load_model(folder).module, load_model(folder).module
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(a(x), b(x))


def test_magnitude_is_mask_only_and_keeps_zeros_through_finetuning(tmp_path):
    stages = [WARM,
              {"type": "prune", "name": "mag", "method": "magnitude", "amount": 0.75, "steps": 2,
               "finetune": {"epochs": 1}},
              {"type": "prune", "name": "glob", "method": "magnitude", "amount": 0.5, "scope": "global",
               "per_layer": {"c1": 0.0}}]
    result = _run(tmp_path, stages)
    rows = {s["name"]: s for s in result.report["stages"]}
    mag, glob = rows["mag"], rows["glob"]
    assert mag["kind"] == "mask-only" and any(n.startswith("mask-only") for n in mag["notes"])
    assert mag["params"] == rows["warm"]["params"] and mag["macs"] == rows["warm"]["macs"]
    assert mag["sparsity"] > 0.7
    by = {r["layer"]: r["removed"] for r in mag["details"]["tables"]["per layer"]}
    assert set(by) == {"c1", "c2", "fc1"} and all(v == pytest.approx(0.75, abs=1e-3) for v in by.values())
    loaded = load_model(result.folder / mag["folder"])
    assert not any(k.endswith(("_orig", "_mask")) for k in loaded.module.state_dict())
    assert not any(m._forward_pre_hooks for m in loaded.module.modules())
    gby = {r["layer"]: r["removed"] for r in glob["details"]["tables"]["per layer"]}
    assert gby["c1"] == pytest.approx(0.75, abs=1e-3)  # earlier zeros stay; c1 gets nothing more
    model = json.loads((result.folder / glob["folder"] / "pruning.json").read_text())
    assert model["layers"]["c1"] == {"amount": 0.0, "override": True}


def test_plan_predicts_the_pruned_shapes(tmp_path):
    from compresspipe.run.plan import plan_recipe

    stages = [{"type": "prune", "amount": 0.5, "per_layer": {"c1": 0.25}},
              {"type": "prune", "name": "mag", "method": "magnitude", "amount": 0.5}]
    plan = plan_recipe(load_recipe(write_recipe(tmp_path, tiny_recipe(model=CNN, stages=stages))))
    rows = plan["stages"]
    base, pruned, mag = rows[0], rows[1], rows[2]
    assert pruned["layers"] == {"c1": 0.25, "c2": 0.5, "fc1": 0.5}
    assert base["params"] / pruned["params"] > 3.0 and mag["params"] == pruned["params"]
    assert any("mask-only" in n for n in mag["notes"])


def test_taylor_magnitude_ranks_by_weight_times_gradient():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    ctx = SimpleNamespace(name="prune", seed=0, task="classification",
                          batches=lambda split, count, batch_size=None: [(x, y)] if split == "calibration" else None)
    masks = {}
    for importance in ("l1", "taylor"):
        torch.manual_seed(0)
        model = digits_cnn(width=4, hidden=16).eval()
        config = PruneConfig(type="prune", method="magnitude", amount=0.6, importance=importance, steps=2)
        state = ModelState(model, {}, (1, 8, 8), 10)
        rows, _ = PruneStage(config)._magnitude(state, ctx, resolve_selection(config, model, "prune"))
        assert [r["removed"] for r in rows] == pytest.approx([0.6, 0.6, 0.6], abs=0.02)
        masks[importance] = model.c2.weight != 0
        assert model.c2.weight.grad is None  # calibration gradients are not left behind
    assert not torch.equal(masks["l1"], masks["taylor"])



# -- transformers: whole heads and MLP width; the residual stream only when asked ----------------------------


@pytest.mark.parametrize("hidden", [False, True])
def test_transformer_heads_and_mlp_width_reload_to_the_same_outputs(tmp_path, hidden):
    pytest.importorskip("transformers")
    from compresspipe.artifacts.io import ModelIO
    from compresspipe.models.factory import build_model
    from compresspipe.models.inputs import example, forward
    from compresspipe.recipe.spec import InputTensor
    from tests.fixtures import TINY_BERT

    io = ModelIO(task="sequence_classification", inputs=[
        InputTensor(name="input_ids", shape=[16], dtype="int64", dynamic={0: "sequence"}, range=(0, 64)),
        InputTensor(name="attention_mask", shape=[16], dtype="int64", dynamic={0: "sequence"}, range=(1, 2))])
    source = {"huggingface": {"config": {**TINY_BERT, "num_attention_heads": 4}}}
    torch.manual_seed(0)
    module = build_model(source, io.task).eval()
    state = ModelState(module, source, (16,), 2, io=io)
    config = PruneConfig(type="prune", amount=0.5, heads=0.5, hidden=hidden)
    ctx = SimpleNamespace(name="prune", seed=0, task=io.task, stage_dir=None)
    PruneStage(config)._structured(state, ctx, resolve_selection(config, module, "prune"), finetune=False)
    layer = state.module.model.bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 16
    assert layer.intermediate.dense.out_features == 32  # MLP width halved
    assert (layer.attention.output.dense.out_features == 32) != hidden  # the residual stream, only when asked
    save_model(state, tmp_path)
    loaded = load_model(tmp_path)
    x = example(io, 3, seed=2, sizes={"sequence": 9})
    with torch.no_grad():
        assert torch.equal(forward(state.module, x), forward(loaded.module, x))
