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
