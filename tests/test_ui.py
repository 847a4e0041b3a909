"""Progress: nested steps share one display on a terminal; without one, a line at least every heartbeat."""

from __future__ import annotations

import io
import time

from rich.console import Console

from compresspipe import ui as ui_module
from compresspipe.ui import UI


def test_nested_steps_on_a_terminal_share_one_display():
    ui = UI()
    ui.err = Console(file=io.StringIO(), force_terminal=True, width=100)
    with ui.progress("outer", 2) as outer:
        with ui.progress("inner", 3) as inner:  # rich allows one live display: nesting must not open a second
            inner.advance(1, info="a")
            assert ui.live is not None and len(ui.bars) == 2
        outer.advance(1)
    assert ui.live is None and ui.bars == []


def test_without_a_terminal_a_status_line_comes_every_heartbeat(monkeypatch, capsys):
    monkeypatch.setattr(ui_module, "HEARTBEAT_S", 0.2)
    ui = UI()
    with ui.progress("exporting", 4) as bar:
        bar.advance(1, info="onnx")
        time.sleep(1.6)
    err = capsys.readouterr().err
    assert "exporting: 1/4" in err and "left" in err and "onnx" in err
    quiet = UI(quiet=True)
    with quiet.progress("silent", 1):
        time.sleep(1.3)
    assert "silent" not in capsys.readouterr().err


NOISY_MODEL = '''
import logging
import warnings

import torch
from torch import nn


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        logging.getLogger("torch.utils._pytree").warning("\\x1b[33mregister_constant() is deprecated\\x1b[0m")
        warnings.warn("Unwrapped parameters detected", UserWarning)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def build():
    return Noisy()
'''


def test_library_warnings_become_the_rows_notes_once_without_escape_codes(tmp_path, capfd):
    """torch's log warnings and Python warnings raised while a model is built or a stage runs are the row's notes,
    each once, not raw lines in the terminal; report.md has no escape codes."""
    import logging

    import torch  # noqa: F401 - torch sets up its logging on import

    from tests.fixtures import run

    torch_logger = logging.getLogger("torch")
    handlers = torch_logger.handlers[:]
    (tmp_path / "noisy.py").write_text(NOISY_MODEL, encoding="utf-8")
    recipe = {"compresspipe": 1, "name": "noisy", "seed": 0, "device": "cpu",
              "model": {"python": str(tmp_path / "noisy.py") + ":build", "input_shape": [1, 8, 8]},
              "data": {"dataset": "digits", "max_samples": 200},
              "evaluate": {"latency": {"enabled": False}},
              "stages": [{"type": "train", "epochs": 1}]}
    result = run(tmp_path, recipe, allow_code=True)
    baseline = result.report["stages"][0]
    warned = [n for n in baseline["notes"] if n.startswith("warning: ")]
    assert any("torch.utils._pytree: register_constant() is deprecated" in n for n in warned), baseline["notes"]
    assert any("UserWarning: Unwrapped parameters detected" in n for n in warned), baseline["notes"]
    assert len(warned) == len(set(warned))
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert "register_constant() is deprecated" in report and "\x1b" not in report
    assert "register_constant" not in capfd.readouterr().err  # the terminal does not get the raw line
    assert torch_logger.handlers == handlers  # the libraries' logging is as it was


def test_plan_counts_library_warnings_instead_of_printing_them(tmp_path):
    """`plan` keeps the terminal for what the user acts on: a dependency's warning is counted in the row's notes,
    and --json lists it whole."""
    import json

    from typer.testing import CliRunner

    from compresspipe.cli import app
    from tests.fixtures import write_recipe

    (tmp_path / "noisy.py").write_text(NOISY_MODEL, encoding="utf-8")
    recipe = write_recipe(tmp_path, {
        "compresspipe": 1, "name": "noisy", "seed": 0, "device": "cpu",
        "model": {"python": str(tmp_path / "noisy.py") + ":build", "input_shape": [1, 8, 8]},
        "data": {"dataset": "digits", "max_samples": 200}, "stages": [{"type": "train", "epochs": 1}]})
    runner = CliRunner()
    table = runner.invoke(app, ["plan", str(recipe), "--allow-code"], env={"COLUMNS": "100"})
    assert table.exit_code == 0, table.output
    assert "register_constant" not in table.output and "Unwrapped" not in table.output
    assert "2 library warning(s): plan --json lists them" in " ".join(table.output.split()).replace("│ ", "")
    listed = runner.invoke(app, ["plan", str(recipe), "--allow-code", "--json"])
    notes = json.loads(listed.output)["stages"][0]["notes"]
    assert any("register_constant() is deprecated" in n for n in notes)
