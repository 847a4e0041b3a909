"""A float model exported twice in one process is exported once: the second file is a copy, found by content."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresspipe.runtimes import onnx_cache
from compresspipe.runtimes.onnx_float import write_onnx
from compresspipe.stages.export.stage import build_job
from tests.fixtures import digits_cnn_recipe, stage_context, trained_cnn


@pytest.fixture
def exports(monkeypatch):
    """Count the calls into torch.onnx.export; start with an empty cache."""
    onnx_cache.clear()
    calls = []
    real = torch.onnx.export

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting)
    yield calls
    onnx_cache.clear()


def _job(tmp_path, state):
    from compresspipe.stages.export import ExportConfig

    ctx = stage_context(tmp_path, digits_cnn_recipe(), "export", stage_dir=tmp_path / "stage")[1]
    return build_job(ExportConfig.model_validate({"type": "export", "formats": ["onnx"]}), state, ctx, ["onnx"], 1, None)


def test_the_same_model_is_exported_once_and_a_changed_weight_exports_again(tmp_path, exports):
    import onnxruntime as ort

    state = trained_cnn()
    job = _job(tmp_path, state)
    first = write_onnx(state.module, job, tmp_path / "a.onnx")[0]
    again = trained_cnn()  # another instance, the same weights
    second = write_onnx(again.module, _job(tmp_path, again), tmp_path / "b.onnx")[0]
    assert len(exports) == 1
    assert first.read_bytes() == second.read_bytes()

    last = [m for m in again.module.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[0] += 1.0  # the first logit moves by 1
    third = write_onnx(again.module, _job(tmp_path, again), tmp_path / "c.onnx")[0]
    assert len(exports) == 2
    x = torch.randn(2, 1, 8, 8).numpy()
    out = {p.name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
           for p in (second, third)}
    want = again.module(torch.from_numpy(x)).detach().numpy()
    assert abs(out["c.onnx"] - want).max() < 1e-4  # the changed model, not the cached file
    assert abs(out["b.onnx"] - want).max() > 0.5


def test_what_the_weights_cannot_vouch_for_is_not_cached(tmp_path):
    state = trained_cnn()
    key = onnx_cache.fingerprint(state.module, {})
    assert key == onnx_cache.fingerprint(trained_cnn().module, {})
    assert key != onnx_cache.fingerprint(state.module, {"opset": 18})  # export settings are part of the key

    class Other(type(state.module)):  # the same weights, another forward
        def forward(self, x):
            return super().forward(x) * 2

    other = trained_cnn().module
    other.__class__ = Other
    assert onnx_cache.fingerprint(other, {}) not in (None, key)

    patched = trained_cnn().module
    patched.forward = lambda x: x  # an instance's own forward
    assert onnx_cache.fingerprint(patched, {}) is None
    hooked = trained_cnn().module
    hooked.fc1.register_forward_hook(lambda m, i, o: o * 0)
    assert onnx_cache.fingerprint(hooked, {}) is None
    scaled = trained_cnn().module
    scaled.fc1.extra = 3.0  # a plain attribute a forward may read
    assert onnx_cache.fingerprint(scaled, {}) != key


def test_tied_weights_are_part_of_the_key():
    a, b = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    b.load_state_dict(a.state_dict())
    assert onnx_cache.fingerprint(a, {}) == onnx_cache.fingerprint(b, {})
    with torch.no_grad():
        b[1].weight.copy_(b[0].weight)
        a[1].weight.copy_(a[0].weight)
    a[1].weight = a[0].weight  # tied: one tensor
    assert onnx_cache.fingerprint(a, {}) != onnx_cache.fingerprint(b, {})


@pytest.mark.int8
def test_the_same_int8_file_is_calibrated_once_and_another_cpu_target_is_built_anew(tmp_path):
    from compresspipe.runtimes.onnx_int8 import export
    from compresspipe.stages.export import ExportConfig

    onnx_cache.clear()
    state = trained_cnn()
    ctx = stage_context(tmp_path, digits_cnn_recipe(), "export", stage_dir=tmp_path / "stage")[1]
    config = ExportConfig.model_validate({"type": "export", "formats": ["onnx_int8"],
                                          "int8": {"calibration": {"batches": 2, "batch_size": 32}}})

    def build(folder, cpu="portable"):
        job = build_job(config, state, ctx, ["onnx_int8"], 1, None)
        job.cpu = cpu
        (tmp_path / folder).mkdir()
        return export(job, tmp_path / folder)[0], job.notes

    first, notes = build("a")
    again, again_notes = build("b")
    other, other_notes = build("c", cpu="x86-vnni")
    reused = "reused, not calibrated again"
    assert not any(reused in n for n in notes) and any(reused in n for n in again_notes)
    assert first.read_bytes() == again.read_bytes()
    assert not any(reused in n for n in other_notes)  # 8-bit weights for a VNNI CPU: another file
    assert other.read_bytes() != first.read_bytes()
    onnx_cache.clear()
