"""The terminal table stays readable at 80, 100 and 120 columns: every header and stage name uncut."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from compresspipe.report.build import render_table
from tests.report.test_html import make_report


def _render(width: int) -> tuple[str, list[str], list[str]]:
    report = make_report()
    report["stages"][2]["name"] = "prune-channels-gradually"  # a long, plausible stage name
    table, hidden = render_table(report, width)
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False, color_system=None).print(table)
    headers = [c.header for c in table.columns]
    return buffer.getvalue(), headers, hidden


@pytest.mark.parametrize("width", [80, 100, 120])
def test_every_shown_header_and_stage_name_appears_uncut(width):
    text, headers, hidden = _render(width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text and "..." not in text  # nothing truncated
    for header in headers:
        assert re.search(rf"(?<![\w]){re.escape(header)}(?![\w])", text), (width, header)
    for name in ("baseline", "train", "prune-channels-gradually", "quantize", "worse"):
        assert name in text, (width, name)
    assert {"#", "stage", "accuracy", "size"} <= set(headers)  # the essentials are never dropped
    assert any(h.startswith("latency") for h in headers)
    assert not set(hidden) & set(headers)


def test_a_wider_terminal_shows_more_and_a_very_wide_one_everything():
    widths = {w: len(_render(w)[1]) for w in (80, 100, 120, 400)}
    assert widths[80] <= widths[100] <= widths[120] <= widths[400]
    assert _render(400)[2] == []


def test_the_title_says_when_gates_failed():
    report = make_report()
    report["gates_passed"] = False
    table, _ = render_table(report, 200)
    assert "gates FAILED" in str(table.title)


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_task_metric_stays_at_any_width(width):
    """A perplexity or mse task: its metric column is kept like accuracy, never the first to go."""
    report = make_report()
    for s in report["stages"]:
        s["metric"], s["score"], s["accuracy"] = "perplexity", 12.5, None
        s["metrics"] = {"perplexity": 12.5}
    table, hidden = render_table(report, width)
    headers = [c.header for c in table.columns]
    assert "perplexity" in headers and "perplexity" not in hidden, (headers, hidden)


def test_a_run_piped_to_a_file_uses_the_width_columns_asks_for(monkeypatch):
    from compresspipe.ui import UI

    monkeypatch.setenv("COLUMNS", "100")
    assert UI(stream=io.StringIO()).console.width == 100
    monkeypatch.delenv("COLUMNS")
    assert UI(stream=io.StringIO()).console.width == 120
