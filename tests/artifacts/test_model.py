import json

import pytest
import torch
from torch import nn

from compresspipe.artifacts.edits import replace_edit, resize_edit, shape_snapshot
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.errors import ArtifactError
from compresspipe.models.factory import build_model

SOURCE = {"builtin": "digits-cnn", "kwargs": {"width": 8, "hidden": 16}}


def _state():
    torch.manual_seed(0)
    return ModelState(build_model(SOURCE).eval(), SOURCE, (1, 8, 8), 10)


def _same_outputs(a: nn.Module, b: nn.Module, shape=(4, 1, 8, 8)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_round_trip_is_bit_identical_and_versioned(tmp_path):
    state = _state()
    save_model(state, tmp_path)
    desc = json.loads((tmp_path / "model.json").read_text())
    assert desc["format"] == "compresspipe.model" and desc["version"] == 2 and desc["edits"] == []
    assert desc["io"]["inputs"] == [{"name": "input", "shape": [1, 8, 8], "dtype": "float32", "dynamic": {},
                                     "range": None}] and desc["io"]["task"] == "classification"
    loaded = load_model(tmp_path)
    assert _same_outputs(state.module, loaded.module)
    assert loaded.source == SOURCE and loaded.input_shape == (1, 8, 8) and loaded.spec == state.spec

    del desc["io"]  # a version 1 file: one float input of input_shape
    desc["version"] = 1
    (tmp_path / "model.json").write_text(json.dumps(desc))
    assert load_model(tmp_path).spec == state.spec


def test_replace_and_resize_edits_replay(tmp_path):
    state = _state()
    # replace fc2 with a two-layer factorised version
    new = nn.Sequential(nn.Linear(16, 4, bias=False), nn.Linear(4, 10))
    state.apply(replace_edit("fc2", new))
    # shrink c1 by hand (4 of 8 filters) and everything that depends on it
    before = shape_snapshot(state.module)
    m = state.module
    keep = torch.arange(4)
    m.c1.weight = nn.Parameter(m.c1.weight[keep].clone())
    m.c1.bias = nn.Parameter(m.c1.bias[keep].clone())
    m.c1.out_channels = 4
    m.bn1.weight = nn.Parameter(m.bn1.weight[keep].clone())
    m.bn1.bias = nn.Parameter(m.bn1.bias[keep].clone())
    m.bn1.running_mean = m.bn1.running_mean[keep].clone()
    m.bn1.running_var = m.bn1.running_var[keep].clone()
    m.bn1.num_features = 4
    m.c2.weight = nn.Parameter(m.c2.weight[:, keep].clone())
    m.c2.in_channels = 4
    state.record(resize_edit(before, m))
    save_model(state, tmp_path)
    loaded = load_model(tmp_path)
    assert [e["kind"] for e in loaded.edits] == ["replace", "resize"]
    assert loaded.module.c1.out_channels == 4 and loaded.module.c1.weight.shape[0] == 4
    assert isinstance(loaded.module.fc2, nn.Sequential)
    assert _same_outputs(state.module, loaded.module)


def test_tied_weights_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    from safetensors.torch import load_file

    from compresspipe.artifacts.model import _tensors_for_saving

    tensors, aliases = _tensors_for_saving(Tied())
    assert aliases == {"b.weight": "a.weight"} and "b.weight" not in tensors
    assert len(tensors) == 3
    del load_file


def test_corrupt_or_foreign_artifacts_are_clear_errors(tmp_path):
    state = _state()
    save_model(state, tmp_path)
    desc = json.loads((tmp_path / "model.json").read_text())
    desc["version"] = 99
    (tmp_path / "model.json").write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="model format version 99"):
        load_model(tmp_path)
    desc["version"] = 1
    desc["edits"] = [{"kind": "python_exec", "code": "print(1)"}]
    (tmp_path / "model.json").write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="unknown edit kind 'python_exec'"):
        load_model(tmp_path)
    desc["edits"] = [{"kind": "replace", "version": 1, "module": "fc2", "layer": {"type": "os.system"}}]
    (tmp_path / "model.json").write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="not allowed"):
        load_model(tmp_path)
    desc["edits"] = []
    (tmp_path / "model.json").write_text(json.dumps(desc))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read"):
        load_model(tmp_path)
    with pytest.raises(ArtifactError, match="missing"):
        load_model(tmp_path / "nowhere")


def test_edit_kinds_come_from_the_registry_with_their_versions_checked_in_one_place(tmp_path):
    from compresspipe.artifacts.edits import EDITS

    assert {"resize", "replace", "quantize"} <= set(EDITS.names()) and "cast" not in EDITS.names()
    state = _state()
    save_model(state, tmp_path)
    desc = json.loads((tmp_path / "model.json").read_text())
    for version in (2, 0, True, "1", None):
        desc["edits"] = [{"kind": "resize", "version": version, "modules": {}}]
        (tmp_path / "model.json").write_text(json.dumps(desc))
        with pytest.raises(ArtifactError, match=r"edits\[0\]: edit 'resize' has version"):
            load_model(tmp_path)


def test_recorded_edits_replay_to_the_same_structure(tmp_path):
    """`record()` logs an edit that other code applied (Torch-Pruning, in place); replaying the log must agree."""
    import torch_pruning as tp

    state = _state()
    before = shape_snapshot(state.module)
    example = torch.zeros(1, 1, 8, 8)
    pruner = tp.pruner.MetaPruner(state.module, example, importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, ignored_layers=[state.module.fc2])
    pruner.step()
    state.record(resize_edit(before, state.module))
    save_model(state, tmp_path)
    replayed = load_model(tmp_path)
    assert shape_snapshot(replayed.module) == shape_snapshot(state.module)
    assert _same_outputs(state.module, replayed.module)
    with pytest.raises(ArtifactError, match="unknown edit kind"):
        state.record({"kind": "prune-magic", "version": 1})


def test_a_quantized_artifact_loads_after_a_recipe_was_loaded_in_the_same_process(tmp_path):
    """The bug: validating a recipe imported the quantize config without torch, and the edit kind stayed unknown."""
    import subprocess
    import sys

    from tests.fixtures import SMALL_CNN

    script = f"""
import torch
from pathlib import Path
from compresspipe.artifacts.model import ModelState, save_model
from compresspipe.models.factory import build_model
from compresspipe.stages.quantize.layers import QuantLinear, quantize_edit
m = build_model({SMALL_CNN!r}).eval()
q = QuantLinear.from_float(m.fc2, "weight_only", 8, True)
m.fc2 = q
s = ModelState(m, {SMALL_CNN!r}, (1, 8, 8), 10)
s.record(quantize_edit("weight_only", {{"fc2": q}}, []))
save_model(s, Path({str(tmp_path / "q")!r}))
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    recipe = tmp_path / "q.yaml"
    recipe.write_text("compresspipe: 1\nname: q\nmodel: {builtin: digits-cnn}\ndata: {dataset: digits}\n"
                      "stages: [{type: quantize, method: static}]\n")
    load = f"""
import sys
from pathlib import Path
from compresspipe.recipe import load_recipe
load_recipe({str(recipe)!r})
assert "torch" not in sys.modules  # validation stays torch-free
from compresspipe.artifacts.model import load_model
state = load_model(Path({str(tmp_path / "q")!r}))
print(type(state.module.fc2).__name__)
"""
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "QuantLinear"


def test_module_names_pytorch_accepts_are_accepted_and_python_attributes_are_not(tmp_path):
    from compresspipe.artifacts.edits import check_name, get_submodule, set_submodule

    model = nn.Sequential()
    block = nn.Sequential()
    block.add_module("block1-0", nn.Conv2d(1, 2, 1))  # torchvision's RegNet names its blocks like this
    model.add_module("trunk", block)
    assert check_name("trunk.block1-0") == "trunk.block1-0"
    set_submodule(model, "trunk.block1-0", nn.Identity())
    assert isinstance(get_submodule(model, "trunk.block1-0"), nn.Identity)
    for bad in ("trunk.__class__", "trunk..x", "a\x1b[2J", "__dict__"):
        with pytest.raises(ArtifactError):
            check_name(bad)


def test_torchvision_models_with_odd_names_and_versioned_state_reload_after_quantize(tmp_path):
    """RegNet names blocks `block1-0`; MNASNet's loader reads the state dict's version metadata."""
    pytest.importorskip("torchvision")
    from compresspipe.stages.quantize.layers import QuantConv2d, quantize_edit

    for name in ("regnet_x_400mf", "mnasnet0_5"):
        source = {"torchvision": name, "kwargs": {"num_classes": 10}}
        torch.manual_seed(0)
        state = ModelState(build_model(source).eval(), source, (3, 32, 32), 10)
        convs = [n for n, m in state.module.named_modules() if type(m) is nn.Conv2d][:3]
        new = {n: QuantConv2d.from_float(state.module.get_submodule(n), "weight_only", 8, True, False) for n in convs}
        from compresspipe.artifacts.edits import set_submodule

        for n, m in new.items():
            set_submodule(state.module, n, m)
        state.record(quantize_edit("weight_only", new, []))
        save_model(state, tmp_path / name)
        loaded = load_model(tmp_path / name)
        assert _same_outputs(state.module, loaded.module, (2, 3, 32, 32)), name
