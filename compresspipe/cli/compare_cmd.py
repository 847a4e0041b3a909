"""`compresspipe compare RUN_A RUN_B`: two runs side by side, stage by stage, with deltas (B - A)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

import typer

from compresspipe.cli.base import app, handle_errors

COMPARE_FORMAT = "compresspipe.compare"
COMPARE_VERSION = 1
# Metrics compared per stage; latency is compared per batch size on top of these.
METRICS = ("accuracy", "params", "bytes", "macs")
LABELS = {"accuracy": "accuracy", "params": "params", "bytes": "size", "macs": "MACs"}


def load_report(path: Path) -> dict[str, Any]:
    """A run folder's report.json (or the file itself), checked to be a compresspipe report we can read."""
    from compresspipe.artifacts.files import read_json
    from compresspipe.errors import InputError
    from compresspipe.report.build import READABLE_VERSIONS, REPORT_FORMAT

    file = path / "report.json" if path.is_dir() else path
    if not path.exists():
        raise InputError(f"{path}: no such run folder")
    if not file.is_file():
        raise InputError(f"{path}: no report.json (is the run finished? `compresspipe run` writes it at the end)")
    try:
        report = read_json(file)
    except (OSError, ValueError) as exc:
        raise InputError(f"{file}: not a readable report: {str(exc)[:200]}") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise InputError(f"{file}: not a compresspipe report (format {REPORT_FORMAT!r} expected)")
    if type(report.get("version")) is not int or report["version"] not in READABLE_VERSIONS:
        raise InputError(f"{file}: report version {report.get('version')!r} is not supported "
                         f"(this compresspipe reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    if not isinstance(report.get("stages"), list):
        raise InputError(f"{file}: report has no stage list")
    from compresspipe.report.schema import validate_report

    validate_report(report, file)  # every figure compare reads has its type and range, or exit 2 naming the key
    report["stages"] = [_clean_row(file, i, row) for i, row in enumerate(report["stages"])]
    return report


def _number(value: Any) -> float | int | None:
    """A figure as compare reads it: a finite number, else None (n/a); a tampered string or bool is n/a."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _clean_row(file: Path, index: int, row: Any) -> dict[str, Any]:
    """One stage row checked: a name, numbers where numbers belong (anything else reads as n/a)."""
    from compresspipe.errors import InputError

    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        raise InputError(f"{file}: stages[{index}] is not a stage row with a name")
    latency = row.get("latency_ms")
    return {"name": row["name"], "type": row.get("type") if isinstance(row.get("type"), str) else None,
            **{m: _number(row.get(m)) for m in METRICS},
            "latency_ms": {str(k): _number(v) for k, v in latency.items()} if isinstance(latency, dict) else {}}


def _delta(a: Any, b: Any) -> float | int | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or isinstance(a, bool) or isinstance(b, bool):
        return None
    return b - a


def _merged_names(a: list[str], b: list[str]) -> list[str]:
    """A's stage order, with B's extra stages placed after the stage they follow in B."""
    names = list(a)
    for i, name in enumerate(b):
        if name in names:
            continue
        before = next((p for p in reversed(b[:i]) if p in names), None)
        names.insert(0 if before is None else names.index(before) + 1, name)
    return names


def compare_reports(report_a: dict[str, Any], report_b: dict[str, Any]) -> dict[str, Any]:
    """Stages matched by name; `in` says whether a stage is in both runs or only one."""
    by_a = {str(s["name"]): s for s in report_a["stages"]}
    by_b = {str(s["name"]): s for s in report_b["stages"]}
    batch_sizes = sorted({str(bs) for s in [*by_a.values(), *by_b.values()] for bs in (s.get("latency_ms") or {})},
                         key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    stages = []
    for name in _merged_names(list(by_a), list(by_b)):
        sa, sb = by_a.get(name), by_b.get(name)
        row: dict[str, Any] = {"name": name, "in": "both" if sa and sb else ("a" if sa else "b"),
                               "type": (sb or sa or {}).get("type"), "a": None, "b": None, "delta": None}
        for side, s in (("a", sa), ("b", sb)):
            if s is not None:
                lat = {str(k): v for k, v in (s.get("latency_ms") or {}).items()}
                row[side] = {**{m: s.get(m) for m in METRICS}, "latency_ms": {bs: lat.get(bs) for bs in batch_sizes}}
        if sa is not None and sb is not None:
            row["delta"] = {m: _delta(row["a"][m], row["b"][m]) for m in METRICS}
            row["delta"]["latency_ms"] = {bs: _delta(row["a"]["latency_ms"][bs], row["b"]["latency_ms"][bs])
                                          for bs in batch_sizes}
        stages.append(row)
    return {
        "format": COMPARE_FORMAT,
        "version": COMPARE_VERSION,
        "a": {"recipe": report_a.get("recipe"), "status": report_a.get("status"), "reference": report_a.get("reference")},
        "b": {"recipe": report_b.get("recipe"), "status": report_b.get("status"), "reference": report_b.get("reference")},
        "batch_sizes": batch_sizes,
        "stages": stages,
    }


def _fmt(metric: str, v: Any) -> str:
    from compresspipe.report.build import fmt_bytes, fmt_count

    if v is None:
        return "n/a"
    if metric == "accuracy":
        return f"{100 * v:.2f}%"
    if metric == "bytes":
        return fmt_bytes(v)
    if metric == "latency":
        return f"{v:.3f} ms"
    return fmt_count(v)


def _fmt_delta(metric: str, a: Any, d: Any) -> tuple[str, str]:
    """The delta in the metric's unit, and relative to A (accuracy: in points, so no percentage)."""
    if d is None:
        return "n/a", ""
    if metric == "accuracy":
        return f"{100 * d:+.2f} pts", ""
    if metric == "bytes":
        text = ("+" if d >= 0 else "-") + _fmt("bytes", abs(d))
    elif metric == "latency":
        text = f"{d:+.3f} ms"
    else:
        text = ("+" if d >= 0 else "-") + _fmt(metric, abs(d))
    rel = "" if not a or not math.isfinite(a) else f"{100 * d / a:+.1f}%"
    return text, rel


def _latency_at(batch: str) -> Callable[[dict[str, Any]], Any]:
    return lambda side: side["latency_ms"][batch]


@app.command()
@handle_errors
def compare(
    run_a: Path = typer.Argument(..., help="First run folder (or its report.json): the 'before'."),
    run_b: Path = typer.Argument(..., help="Second run folder (or its report.json): the 'after'."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Compare two runs stage by stage (matched by name): accuracy, params, size, MACs, latency; deltas are B - A."""
    from rich.console import Console
    from rich.table import Table

    from compresspipe.cli.base import escape

    result = compare_reports(load_report(run_a), load_report(run_b))
    result["a"]["path"], result["b"]["path"] = str(run_a), str(run_b)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    console = Console(highlight=False, width=160)
    a, b = result["a"], result["b"]
    console.print(f"A: {escape(str(run_a))} (recipe {escape(str(a['recipe']))}, {escape(str(a['status']))})")
    console.print(f"B: {escape(str(run_b))} (recipe {escape(str(b['recipe']))}, {escape(str(b['status']))})")
    table = Table(title="compare: B - A per stage", title_justify="left")
    for i, col in enumerate(("stage", "metric", "A", "B", "Δ (B - A)", "Δ %")):
        table.add_column(col, justify="left" if i < 2 else "right", no_wrap=True)
    # (label, unit kind, getter); a delta has the same shape as a side, so one getter reads all three.
    specs: list[tuple[str, str, Callable[[dict[str, Any]], Any]]] = [(LABELS[m], m, itemgetter(m)) for m in METRICS]
    specs += [(f"latency b{bs}", "latency", _latency_at(bs)) for bs in result["batch_sizes"]]
    for row in result["stages"]:
        label = escape(row["name"]) + ("" if row["in"] == "both" else f" (only in {row['in'].upper()})")
        for k, (metric, kind, get) in enumerate(specs):
            va, vb = (None if row[side] is None else get(row[side]) for side in ("a", "b"))
            text, rel = _fmt_delta(kind, va, get(row["delta"])) if row["delta"] is not None else ("", "")
            table.add_row(label if k == 0 else "", metric,
                          "-" if row["a"] is None else _fmt(kind, va), "-" if row["b"] is None else _fmt(kind, vb),
                          text, rel, end_section=k == len(specs) - 1)
    console.print(table)
