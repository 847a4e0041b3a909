"""Data-parallel training with 2 CPU processes under PyTorch's elastic launcher (gloo)."""

import json
import subprocess
import sys

from tests.fixtures import install_plugin, tiny_recipe, write_recipe

FAIL_ON_RANK_1 = '''
import os
from typing import ClassVar, Literal
from compresspipe.recipe.spec import StageConfig
from compresspipe.stages.base import Stage


class BreakConfig(StageConfig):
    """Fails on rank 1 only (a test plugin)."""

    type: Literal["break"]
    implementation: ClassVar[str] = "cp_break_plugin:BreakStage"


class BreakStage(Stage[BreakConfig]):
    def run(self, state, ctx):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("rank 1 broke")
        import time
        time.sleep(30)
        return None
'''


def _run(args, env=None):
    return subprocess.run([sys.executable, "-m", "compresspipe", "run", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=240)


def test_two_processes_train_and_only_rank_0_writes(tmp_path):
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 6, "lr": 1e-2}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "ddp"
    result = _run([path, "--out", out, "--nproc", "2", "-q"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    train = report["stages"][1]
    assert train["accuracy"] > 0.6  # it learned, from shards of the data
    assert train["details"]["samples_per_second"] > 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "00-baseline", "01-train", "recipe.lock.yaml", "report.html", "report.json", "report.md", "run.json"]
    assert result.stdout.count("compresspipe: tiny") == 1  # one table: only rank 0 prints


def test_a_failing_rank_stops_the_run_with_exit_3_and_keeps_finished_stages(tmp_path):
    env = install_plugin(tmp_path, "cp_break_plugin", FAIL_ON_RANK_1,
                         "[compresspipe.stages]\nbreak = cp_break_plugin:BreakConfig\n")
    recipe = tiny_recipe(stages=[{"type": "train", "epochs": 1}, {"type": "break"}])
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "ddp"
    result = _run([path, "--out", out, "--nproc", "2", "-q"], env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert (out / "01-train" / "manifest.json").exists()
    assert not (out / "02-break").exists()
    assert "rank 1 broke" in (out / "error.rank1.log").read_text()


def test_every_run_option_reaches_the_processes_nproc_launches(tmp_path, monkeypatch):
    """`run --nproc N` starts `compresspipe run` again under torch's launcher with the options rebuilt by hand: every
    option `run` has (a new one too) must reach the ranks."""
    import typer.main
    from typer.testing import CliRunner

    from compresspipe.cli import app, run_cmd

    seen: list[list[str]] = []
    monkeypatch.setattr(run_cmd, "launch", lambda nproc, argv: seen.append(argv) or 0)
    path = write_recipe(tmp_path, tiny_recipe())
    given = {"--out": str(tmp_path / "run"), "--set": "seed=3", "--junit": str(tmp_path / "gates.xml")}
    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    options = [p for p in command.params if p.opts[0].startswith("-") and p.name not in ("nproc", "help")]
    args = [str(path), "--nproc", "2"]
    for option in options:
        name = max(option.opts, key=len)
        args += [name, given[name]] if not option.is_flag else [name]
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    forwarded = seen[0]
    for option in options:
        assert set(option.opts) & set(forwarded), f"{option.opts} is not passed on to the ranks: {forwarded}"
    assert forwarded[0] == str(path) and "--nproc" not in forwarded
    assert forwarded[forwarded.index("--set") + 1] == "seed=3"
