import json

import pytest
import torch
from torch import nn

from compresspipe.engine.artifacts import ModelState, load_model, save_model
from compresspipe.engine.edits import replace_edit, resize_edit, shape_snapshot
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
    assert desc["format"] == "compresspipe.model" and desc["version"] == 1 and desc["edits"] == []
    loaded = load_model(tmp_path)
    assert _same_outputs(state.module, loaded.module)
    assert loaded.source == SOURCE and loaded.input_shape == (1, 8, 8)


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

    from compresspipe.engine.artifacts import _tensors_for_saving

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
    desc["edits"] = [{"kind": "replace", "module": "fc2", "layer": {"type": "os.system"}}]
    (tmp_path / "model.json").write_text(json.dumps(desc))
    with pytest.raises(ArtifactError, match="not allowed"):
        load_model(tmp_path)
    desc["edits"] = []
    (tmp_path / "model.json").write_text(json.dumps(desc))
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read weights"):
        load_model(tmp_path)
    with pytest.raises(ArtifactError, match="missing"):
        load_model(tmp_path / "nowhere")


def test_cast_edit_round_trip(tmp_path):
    state = _state()
    state.apply({"kind": "cast", "version": 1, "dtype": "bfloat16", "modules": ["fc1", "fc2"]})
    save_model(state, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.module.fc1.weight.dtype == torch.bfloat16 and loaded.module.c1.weight.dtype == torch.float32
    assert torch.equal(loaded.module.fc1.weight, state.module.fc1.weight)
