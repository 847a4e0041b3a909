import subprocess
import sys

import pytest

from compresspipe.errors import RegistryError
from compresspipe.registry import Registry, unknown_message
from tests.fixtures import install_plugin

PLUGIN = '''
from typing import ClassVar, Literal
from compresspipe.recipe.spec import StageConfig
from compresspipe.stages.base import Stage, StageResult
from pydantic import Field


class ScaleConfig(StageConfig):
    """Multiply every weight by a factor (a test plugin)."""

    type: Literal["scale"]
    factor: float = Field(1.0, gt=0)
    implementation: ClassVar[str] = "cp_test_plugin:ScaleStage"


class ScaleStage(Stage[ScaleConfig]):
    def run(self, state, ctx):
        import torch
        with torch.no_grad():
            for p in state.module.parameters():
                p.mul_(self.config.factor)
        return StageResult(state=state, kind="weights", notes=[f"scaled by {self.config.factor}"])
'''


def _install_plugin(tmp_path, entry="cp_test_plugin:ScaleConfig", name="scale"):
    install_plugin(tmp_path, "cp_test_plugin", PLUGIN, f"[compresspipe.stages]\n{name} = {entry}\n")


def _cli(tmp_path, *args):
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "compresspipe", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)


def test_lazy_registry_and_collisions():
    reg = Registry("widget", "compresspipe.test-none")
    reg.register("a", "json:dumps")
    assert reg.names() == ["a"] and reg.get("a").__name__ == "dumps"
    with pytest.raises(RegistryError, match="name collision: 'a'"):
        reg.register("a", "json:loads", source="plugin package 'x'")
    reg.register("broken", "no_such_module_xyz:thing", source="plugin package 'bad'")
    with pytest.raises(RegistryError, match="widget 'broken' from plugin package 'bad' failed to import: "
                                            "ModuleNotFoundError"):
        reg.get("broken")
    with pytest.raises(RegistryError, match="unknown widget 'b'"):
        reg.get("b")
    assert unknown_message("stage", "prun", ["prune", "train"]).startswith("unknown stage 'prun'; did you mean 'prune'?")


def test_plugin_stage_joins_schema_validation_and_runs(tmp_path):
    _install_plugin(tmp_path)
    from tests.fixtures import tiny_recipe, write_recipe

    stages = [{"type": "train", "epochs": 1}, {"type": "scale", "factor": 0.5}]
    path = write_recipe(tmp_path, tiny_recipe(stages=stages))
    listed = _cli(tmp_path, "stages")
    assert listed.returncode == 0 and "scale" in listed.stdout and "cp-test-plugin" in listed.stdout
    assert '"scale"' in _cli(tmp_path, "schema").stdout
    bad = write_recipe(tmp_path, tiny_recipe(stages=[{"type": "scale", "factor": -1}]), "bad.yaml")
    out = _cli(tmp_path, "validate", bad)
    assert out.returncode == 2 and "stages[0].factor: must be greater than 0" in out.stderr
    run = _cli(tmp_path, "run", path, "--out", tmp_path / "run", "-q")
    assert run.returncode == 0, run.stderr
    assert "scale" in run.stdout


def test_plugin_collision_and_import_failure_are_named(tmp_path):
    _install_plugin(tmp_path, name="train")
    from tests.fixtures import tiny_recipe, write_recipe

    path = write_recipe(tmp_path, tiny_recipe())
    out = _cli(tmp_path, "validate", path)
    assert out.returncode == 2 and "name collision: 'train'" in out.stderr and "cp-test-plugin" in out.stderr
    other = tmp_path / "other"
    other.mkdir()
    _install_plugin(other, entry="cp_missing_module:Config", name="ghost")
    path = write_recipe(other, tiny_recipe(stages=[{"type": "ghost"}]))
    out = _cli(other, "validate", path)
    assert out.returncode == 2
    assert "stage 'ghost' from plugin package 'cp-test-plugin'" in out.stderr and "failed to import" in out.stderr


def test_plugins_can_be_switched_off(tmp_path):
    _install_plugin(tmp_path)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "COMPRESSPIPE_NO_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-m", "compresspipe", "stages"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "cp-test-plugin" not in out.stdout


