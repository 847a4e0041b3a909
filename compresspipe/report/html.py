"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) to share a run.

The plots are drawn here rather than by a plotting library so the page opens anywhere, offline, and the
package gains no dependency. Every string that comes from a user's file is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

from compresspipe import __version__
from compresspipe.report.build import (
    fmt_bytes,
    measured_on,
    metric_value,
    report_metric,
    stack_rows,
    status_line,
    table_cell,
    table_rows,
)

_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #ffffff; --band: #f6f8fa;
        --pareto: #cf222e; --point: #8c959f; --ok: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0 auto; padding: 24px 32px 48px; max-width: 1200px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
p.meta { color: var(--muted); margin: 0 0 16px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: var(--band); font-weight: 600; }
td.text, th.text { text-align: left; }
tr.reference td { font-weight: 600; }
tr.pareto td.name::after { content: " \\2605"; color: var(--pareto); }
.plots { display: flex; flex-wrap: wrap; gap: 24px; }
figure { margin: 0; }
figcaption { color: var(--muted); font-size: 12px; max-width: 480px; }
svg text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; fill: var(--fg); }
svg .axis { stroke: var(--fg); stroke-width: 1; }
svg .grid { stroke: var(--line); stroke-width: 1; }
svg .tick { fill: var(--muted); }
svg .point { fill: var(--point); stroke: #ffffff; stroke-width: 1.5; }
svg .point.pareto { fill: var(--pareto); }
svg .front { fill: none; stroke: var(--pareto); stroke-width: 1.5; stroke-dasharray: 4 3; }
svg .label.pareto { font-weight: 600; }
.pass { color: var(--ok); font-weight: 600; }
.fail { color: var(--bad); font-weight: 600; }
ul.notes li { margin: 2px 0; }
"""

# Plot geometry in SVG user units.
_W, _H = 480, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 24, 20, 52


def pareto_optimal(points: Sequence[tuple[float, float] | None]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point is at least as good in both and better in one.

    None (a stage without that metric) is never optimal and never dominates.
    """
    flags = []
    for i, p in enumerate(points):
        if p is None:
            flags.append(False)
            continue
        dominated = any(
            q is not None and j != i and q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])
            for j, q in enumerate(points)
        )
        flags.append(not dominated)
    return flags


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-6:
        if v >= lo - step * 1e-6:
            ticks.append(round(v, 12))
        v += step
    return ticks


def _domain(values: list[float], from_zero: bool, clamp: tuple[float, float] | None = None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo
    pad = span * 0.08 if span > 0 else max(abs(hi) * 0.1, 1e-9)
    lo, hi = (0.0 if from_zero else lo - pad), hi + pad
    if clamp:
        lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
    ticks = _nice_ticks(lo, hi)
    return min(lo, ticks[0]), max(hi, ticks[-1])


def _scatter(
    title: str,
    x_label: str,
    names: list[str],
    xs: list[float | None],
    accs: list[float | None],
    x_fmt: Callable[[float], str],
    x_tip: Callable[[float], str],
    metric: str = "top1",
    higher: bool = True,
) -> str:
    """One metric-vs-cost scatter plot as an inline <svg> (accuracy in %, or the task's metric as it is); Pareto
    points highlighted and joined."""
    scale = 100.0 if metric == "top1" else 1.0
    y_name = "accuracy (%)" if metric == "top1" else metric + ("" if higher else " (lower is better)")
    pts = [None if x is None or a is None else (float(x), scale * a) for x, a in zip(xs, accs, strict=True)]
    have = [p for p in pts if p is not None]
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
           f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}">', f"<title>{escape(title)}</title>"]
    if not have:
        out.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="tick">no data</text></svg>')
        return "\n".join(out)
    x0, x1 = _domain([p[0] for p in have], from_zero=True)
    y0, y1 = _domain([p[1] for p in have], from_zero=False, clamp=(0.0, 100.0) if metric == "top1" else None)
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(v: float) -> float:
        return _LEFT + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return _TOP + ph - (v - y0) / (y1 - y0) * ph

    for t in _nice_ticks(x0, x1):
        out.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{_TOP}" x2="{sx(t):.1f}" y2="{_TOP + ph}"/>')
        out.append(f'<text class="tick" x="{sx(t):.1f}" y="{_TOP + ph + 15}" text-anchor="middle">{escape(x_fmt(t))}</text>')
    for t in _nice_ticks(y0, y1):
        out.append(f'<line class="grid" x1="{_LEFT}" y1="{sy(t):.1f}" x2="{_LEFT + pw}" y2="{sy(t):.1f}"/>')
        out.append(f'<text class="tick" x="{_LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<line class="axis" x1="{_LEFT}" y1="{_TOP + ph}" x2="{_LEFT + pw}" y2="{_TOP + ph}"/>')
    out.append(f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + ph}"/>')
    out.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 10}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{_TOP + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_TOP + ph / 2})">{escape(y_name)}</text>')

    best = pareto_optimal(pts if higher else [None if p is None else (p[0], -p[1]) for p in pts])
    front = sorted((p for p, b in zip(pts, best, strict=True) if b and p is not None), key=lambda p: (p[0], -p[1]))
    if len(front) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in front)
        out.append(f'<polyline class="front" points="{path}"/>')
    # Non-optimal points first so the highlighted ones are drawn on top.
    order = sorted((i for i, p in enumerate(pts) if p is not None), key=lambda i: best[i])
    labels = []
    for i in order:
        x, y = pts[i]  # type: ignore[misc]
        cls = "point pareto" if best[i] else "point"
        value = f"accuracy {y:.2f}%" if metric == "top1" else f"{metric} {y:.4g}"
        tip = f"{names[i]}: {value}, {x_tip(x)}" + (" (Pareto-optimal)" if best[i] else "")
        out.append(f'<circle class="{cls}" data-stage="{escape(names[i])}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" '
                   f'r="{6.5 if best[i] else 5}"><title>{escape(tip)}</title></circle>')
        labels.append((i, sx(x), sy(y)))
    out += _labels(labels, names, best)
    out.append("</svg>")
    return "\n".join(out)


def _labels(points: list[tuple[int, float, float]], names: list[str], best: list[bool]) -> list[str]:
    """Stage names beside their points, placed where they overlap neither each other nor a point.

    Points drawn on the same spot (a stage that changed nothing measurable) share one label ("quantize, export").
    Each label tries right of its point, then left, each at growing offsets up and down; boxes are
    (left, top, right, bottom) in SVG units, with text about 6.6 units per character at 11px.
    """
    taken = [(px - 7, py - 7, px + 7, py + 7) for _, px, py in points]
    spots: dict[tuple[int, int], list[int]] = {}
    where: dict[tuple[int, int], tuple[float, float]] = {}
    for i, px, py in points:
        key = (round(px), round(py))
        spots.setdefault(key, []).append(i)
        where[key] = (px, py)
    out = []
    for key in sorted(spots, key=lambda k: (k[1], k[0])):
        members = spots[key]
        px, py = where[key]
        text = ", ".join(names[i] for i in members)
        width = 6.6 * len(text) + 4
        placed = None
        for shift in (0, -13, 13, -26, 26, -39, 39, -52, 52, -65, 65):
            for right in (True, False):
                left = px + 9 if right else px - 9 - width
                y = py + 4 + shift
                box = (left, y - 11, left + width, y + 3)
                inside = left >= 2 and left + width <= _W - 2 and 12 <= y <= _H - _BOTTOM + 4
                if inside and all(box[0] >= t[2] or t[0] >= box[2] or box[1] >= t[3] or t[1] >= box[3]
                                  for t in taken):
                    placed = (left, y, right, box)
                    break
            if placed:
                break
        if placed is None:  # nowhere free: keep it readable beside its point, even if it touches another
            right = px + 9 + width <= _W - 2
            left = px + 9 if right else px - 9 - width
            placed = (left, py + 4, right, (left, py - 7, left + width, py + 7))
        left, y, right, box = placed
        taken.append(box)
        cls = "label pareto" if any(best[i] for i in members) else "label"
        x = left if right else left + width
        out.append(f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{"start" if right else "end"}">'
                   f"{escape(text)}</text>")
    return out


def _fmt_ms(v: float) -> str:
    return f"{v:g}"


def _html_table(header: list[str], rows: list[list[str]], text_cols: set[int], row_classes: list[str] | None = None,
                table_class: str = "", cell_classes: dict[str, str] | None = None) -> str:
    """A plain <table>; `cell_classes` maps a cell's text to an extra class (e.g. pass/FAIL colours)."""
    def attr(classes: list[str]) -> str:
        classes = [c for c in classes if c]
        return f' class="{" ".join(classes)}"' if classes else ""

    out = [f"<div class=\"scroll\"><table{attr([table_class])}>", "<thead><tr>"]
    out += [f"<th{attr(['text' if i in text_cols else ''])}>{escape(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr></thead>")
    out.append("<tbody>")
    for r, row in enumerate(rows):
        out.append(f"<tr{attr([row_classes[r] if row_classes else ''])}>")
        for i, cell in enumerate(row):
            classes = ["text" if i in text_cols else "", (cell_classes or {}).get(cell, "")]
            if row_classes is not None and i == 1:
                classes.append("name")
            out.append(f"<td{attr(classes)}>{escape(cell).replace(chr(10), '<br/>')}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    """The whole report (table, plots, gates, notes, per-layer tables) as one HTML page."""
    stages = report.get("stages") or []
    names = [str(s["name"]) for s in stages]
    metric = report_metric(report)
    higher = metric not in ("mse", "mae", "perplexity", "loss")
    what = "accuracy" if metric == "top1" else metric
    accs = [metric_value(s, metric) for s in stages]
    sizes = [s.get("bytes") for s in stages]
    batch = next(iter(stages[0].get("latency_ms") or {}), None) if stages else None
    lats = [None if batch is None else (s.get("latency_ms") or {}).get(batch) for s in stages]
    on_size_front = pareto_optimal([None if b is None or a is None else (b, a if higher else -a)
                                    for b, a in zip(sizes, accs, strict=True)])

    unit, scale = _size_unit([b for b in sizes if b is not None])
    header, rows = table_rows(report, spread=True)
    rows = [[stack_rows(cell) for cell in row] for row in rows]  # ratios under their values: a narrower table
    row_classes = [" ".join(c for c in ("reference" if s["name"] == report.get("reference") else "",
                                        "pareto" if on_size_front[i] else "") if c)
                   for i, s in enumerate(stages)]
    title = f"compresspipe report: {report.get('recipe', '')}"
    meta = f"Status: {status_line(report)}. Reference: {report.get('reference', '?')} (ratios in parentheses: " \
           f"reference / stage, > 1 is smaller or faster). {measured_on(report)}"
    if report.get("device"):
        meta += f" Device: {report['device']}."
    parts = [
        '<!DOCTYPE html>',
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        f'<meta name="generator" content="compresspipe {escape(__version__)}"/>',
        f"<title>{escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{escape(meta)}</p>',
        *[f'<p class="fail">Warning: {escape(str(w))}</p>' for w in report.get("warnings") or []],
        '<h2 id="stages">Stages</h2>',
        _html_table(header, rows, {1, 2}, row_classes, "stages"),
        f'<p class="meta">\u2605 Pareto-optimal in {escape(what)} vs size. Bold row: the reference.</p>',
        '<h2 id="tradeoffs">Trade-offs</h2>',
        '<div class="plots">',
        "<figure>",
        _scatter(f"{what} vs size", f"size of the shipped file ({unit})", names,
                 [None if b is None else b / scale for b in sizes], accs, _fmt_ms,
                 lambda v: f"{fmt_bytes(round(v * scale))} ({round(v * scale):,} bytes)", metric, higher),
        "<figcaption>Red points are Pareto-optimal: no other stage is both at least as accurate and at least as "
        "small. The dashed line joins them.</figcaption>",
        "</figure>",
    ]
    if batch is not None:
        parts += [
            "<figure>",
            _scatter(f"{what} vs latency (batch {batch})", f"latency at batch {batch} (ms)", names, lats, accs,
                     _fmt_ms, lambda v: f"{v:.3f} ms at batch {batch}", metric, higher),
            "<figcaption>Red points are Pareto-optimal: no other stage is both at least as accurate and at least as "
            "fast. Latency is a measurement and varies between runs.</figcaption>",
            "</figure>",
        ]
    parts.append("</div>")
    if batch is None:
        parts.append('<p class="meta">No latency was measured, so there is no latency plot.</p>')

    gates = report.get("gates") or []
    if gates:
        verdict = "all passed" if all(g.get("passed") for g in gates) else "FAILED"
        parts.append(f'<h2 id="gates">Quality gates: {escape(verdict)}</h2>')
        gate_rows = [[str(g.get("scope", "")), str(g.get("gate", "")), table_cell(g.get("value")), table_cell(g.get("limit")),
                      "pass" if g.get("passed") else "FAIL"] for g in gates]
        parts.append(_html_table(["scope", "gate", "value", "limit", "result"], gate_rows, {0, 1, 4},
                                 cell_classes={"pass": "pass", "FAIL": "fail"}))

    failed = [g for g in gates if g.get("scope") == "deploy.fidelity" and not g.get("passed")]
    if failed:
        parts.append('<h2 id="fidelity">Files that do not follow their source (deploy.fidelity)</h2><ul class="notes">')
        parts += [f'<li class="fail"><strong>{escape(str(g.get("stage")))}</strong> {escape(str(g.get("format")))}: '
                  f'{escape(str(g.get("description")))}</li>' for g in failed]
        parts.append("</ul>")
    rec = report.get("recommendation")
    if isinstance(rec, dict) and rec.get("reason"):
        files = ", ".join(str(f) for f in rec.get("files") or []) or "none"
        parts.append(f'<h2 id="ship">The file to ship</h2><p><strong>{escape(files)}</strong>: '
                     f'{escape(str(rec["reason"]))}</p>')

    notes = [(s["name"], n) for s in stages for n in (s.get("notes") or [])]
    if notes:
        parts.append('<h2 id="notes">Notes</h2>')
        parts.append('<ul class="notes">')
        parts += [f"<li><strong>{escape(str(name))}</strong>: {escape(str(note))}</li>" for name, note in notes]
        parts.append("</ul>")

    for s in stages:
        for table_title, table in ((s.get("details") or {}).get("tables") or {}).items():
            if not table:
                continue
            cols = list(table[0])
            parts.append(f"<h2>{escape(str(s['name']))}: {escape(str(table_title))}</h2>")
            text_cols = {i for i, c in enumerate(cols) if any(isinstance(r.get(c), str) for r in table)}
            parts.append(_html_table([str(c) for c in cols], [[table_cell(r.get(c)) for c in cols] for r in table], text_cols))
    parts += [f'<p class="meta">Written by compresspipe {escape(__version__)}.</p>', "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _size_unit(sizes: list[int]) -> tuple[str, int]:
    """One unit for a whole axis, so ticks are round numbers (0, 50, 100 KB) rather than 97.7 KB."""
    top = max(sizes, default=0)
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if top >= 2 * scale:
            return unit, scale
    return "bytes", 1


# -- pieces other pages share (the search's Pareto page, the sensitivity curves) ------------------------------------

_SERIES = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#6e7781", "#d4a72c", "#a475f9",
           "#e16f24")


def scatter(title: str, x_label: str, names: list[str], xs: list[float | None], accs: list[float | None],
            x_fmt: Callable[[float], str] = _fmt_ms, x_tip: Callable[[float], str] | None = None) -> str:
    """An accuracy-vs-cost scatter plot (lower cost is better) with its Pareto front, as an inline <svg>."""
    return _scatter(title, x_label, names, xs, accs, x_fmt, x_tip or (lambda v: f"{v:g}"))


def table(header: list[str], rows: list[list[str]], text_cols: set[int], row_classes: list[str] | None = None,
          cell_classes: dict[str, str] | None = None) -> str:
    """A plain <table> in the report's style; with `row_classes`, rows marked `pareto` get a star by their name."""
    return _html_table(header, rows, text_cols, row_classes, cell_classes=cell_classes)


def line_plot(title: str, x_label: str, y_label: str, series: list[tuple[str, list[tuple[float, float]]]],
              y_percent: bool = True) -> str:
    """Curves (one per named series, points joined in x order) as an inline <svg>, with a legend."""
    pts = [p for _, s in series for p in s]
    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H + 16 * len(series)}" '
           f'viewBox="0 0 {_W} {_H + 16 * len(series)}" role="img" aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>"]
    if not pts:
        out.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="tick">no data</text></svg>')
        return "\n".join(out)
    scale = 100.0 if y_percent else 1.0
    x0, x1 = _domain([p[0] for p in pts], from_zero=True)
    y0, y1 = _domain([p[1] * scale for p in pts], from_zero=False, clamp=(0.0, 100.0) if y_percent else None)
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(v: float) -> float:
        return _LEFT + (v - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return _TOP + ph - (v * scale - y0) / (y1 - y0) * ph

    for t in _nice_ticks(x0, x1):
        out.append(f'<line class="grid" x1="{sx(t):.1f}" y1="{_TOP}" x2="{sx(t):.1f}" y2="{_TOP + ph}"/>')
        out.append(f'<text class="tick" x="{sx(t):.1f}" y="{_TOP + ph + 15}" text-anchor="middle">{t:g}</text>')
    for t in _nice_ticks(y0, y1):
        y = _TOP + ph - (t - y0) / (y1 - y0) * ph
        out.append(f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + pw}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<line class="axis" x1="{_LEFT}" y1="{_TOP + ph}" x2="{_LEFT + pw}" y2="{_TOP + ph}"/>')
    out.append(f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + ph}"/>')
    out.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 10}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{_TOP + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_TOP + ph / 2})">{escape(y_label)}</text>')
    for i, (name, points) in enumerate(series):
        color = _SERIES[i % len(_SERIES)]
        ordered = sorted(points)
        if len(ordered) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y in ordered:
            tip = f"{name}: {x:g} -> {y * scale:.2f}{'%' if y_percent else ''}"
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>{escape(tip)}'
                       "</title></circle>")
        ly = _H + 16 * i + 4
        out.append(f'<line x1="{_LEFT}" y1="{ly:.1f}" x2="{_LEFT + 18}" y2="{ly:.1f}" stroke="{color}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{_LEFT + 24}" y="{ly + 4:.1f}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def page(title: str, meta: str, body: list[str]) -> str:
    """A whole self-contained page (inline CSS, no scripts, no network) around already-escaped body parts."""
    head = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8"/>',
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
            f'<meta name="generator" content="compresspipe {escape(__version__)}"/>',
            f"<title>{escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
            f"<h1>{escape(title)}</h1>", f'<p class="meta">{escape(meta)}</p>']
    tail = [f'<p class="meta">Written by compresspipe {escape(__version__)}.</p>', "</body>", "</html>"]
    return "\n".join(head + body + tail) + "\n"
