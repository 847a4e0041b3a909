"""report.json (a public, versioned contract), report.md and the terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

REPORT_FORMAT = "compresspipe.report"
REPORT_VERSION = 1


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a < 0:
        return None
    return a / b


def compare(row: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Ratios of a stage to the reference; > 1 means smaller or faster."""
    acc, ref_acc = row.get("accuracy"), ref.get("accuracy")
    return {
        "accuracy_delta": None if acc is None or ref_acc is None else acc - ref_acc,
        "param_reduction": _ratio(ref.get("params"), row.get("params")),
        "size_reduction": _ratio(ref.get("bytes"), row.get("bytes")),
        "mac_reduction": _ratio(ref.get("macs"), row.get("macs")),
        "speedup": {bs: _ratio(ref.get("latency_ms", {}).get(bs), ms) for bs, ms in row.get("latency_ms", {}).items()},
    }


def build_report(recipe_name: str, rows: list[dict[str, Any]], reference: str, status: str, extra: dict | None = None) -> dict:
    ref = next((r for r in rows if r["name"] == reference), rows[0])
    stages = []
    for row in rows:
        out = {k: row.get(k) for k in (
            "index", "name", "type", "kind", "folder", "accuracy", "loss", "params", "nonzero_params", "sparsity",
            "bytes", "macs", "latency_ms", "seconds", "notes",
        )}
        out["vs_reference"] = compare(row, ref)
        if row.get("details"):
            out["details"] = row["details"]
        stages.append(out)
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "recipe": recipe_name,
        "status": status,
        "reference": ref["name"],
        "stages": stages,
        **(extra or {}),
    }


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _x(r: float | None) -> str:
    return "" if r is None else f" ({r:.2f}x)"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the markdown report and the terminal table."""
    sizes = list(report["stages"][0].get("latency_ms") or {}) if report["stages"] else []
    header = ["#", "stage", "kind", "accuracy", "Δacc", "params", "sparsity", "size", "MACs"]
    header += [f"latency b{bs}" for bs in sizes]
    rows = []
    for s in report["stages"]:
        v = s["vs_reference"]
        acc = "n/a" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}%"
        dacc = "" if v["accuracy_delta"] is None else f"{100 * v['accuracy_delta']:+.2f}"
        row = [
            str(s["index"]), s["name"], s["kind"] or "", acc, dacc,
            _fmt_count(s["params"]) + _x(v["param_reduction"]),
            "n/a" if s["sparsity"] is None else f"{100 * s['sparsity']:.1f}%",
            _fmt_bytes(s["bytes"]) + _x(v["size_reduction"]),
            _fmt_count(s["macs"]) + _x(v["mac_reduction"]),
        ]
        for bs in sizes:
            ms = (s.get("latency_ms") or {}).get(bs)
            row.append("n/a" if ms is None else f"{ms:.3f} ms" + _x(v["speedup"].get(bs)))
        rows.append(row)
    return header, rows


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [
        f"# compresspipe report: {report['recipe']}",
        "",
        f"Status: **{report['status']}**. Ratios in parentheses compare with the reference "
        f"`{report['reference']}` (> 1 is smaller or faster). Latency: CPU, median per forward pass.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    gates = report.get("gates") or []
    if gates:
        verdict = "all passed" if all(g["passed"] for g in gates) else "FAILED"
        lines += ["", f"## Quality gates: {verdict}", "", "| scope | gate | value | limit | result |", "|---|---|---|---|---|"]
        lines += [f"| {g['scope']} | {g['gate']} | {_cell(g['value'])} | {_cell(g['limit'])} | "
                  f"{'pass' if g['passed'] else '**FAIL**'} |" for g in gates]
    notes = [(s["name"], n) for s in report["stages"] for n in (s.get("notes") or [])]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- **{name}**: {note}" for name, note in notes]
    for s in report["stages"]:
        for title, table in (s.get("details") or {}).get("tables", {}).items():
            if not table:
                continue
            cols = list(table[0])
            lines += ["", f"## {s['name']}: {title}", "", "| " + " | ".join(cols) + " |",
                      "|" + "|".join("---" for _ in cols) + "|"]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def render_table(report: dict[str, Any]) -> Table:
    header, rows = table_rows(report)
    table = Table(title=f"compresspipe: {report['recipe']} ({report['status']})", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (1, 2) else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    return table
