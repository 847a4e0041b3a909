"""report.json (a public, versioned contract), report.md and the terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

REPORT_FORMAT = "compresspipe.report"
REPORT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # compare and verify read reports of earlier versions too

# what a row's figures are measured on, in the words of the report
FORMAT_LABELS = {"torch": "PyTorch model", "onnx": "model.onnx", "onnx_int8": "model.int8.onnx",
                 "onnx_int4": "model.int4.onnx", "executorch": "model.pte", "executorch_int8": "model.int8.pte"}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a < 0:
        return None
    return a / b


def compare(fig: dict[str, Any], ref: dict[str, Any], row: dict[str, Any], ref_row: dict[str, Any]) -> dict[str, Any]:
    """Ratios of a file's figures to the reference's shipped file; > 1 means smaller or faster.

    `fig`/`ref`: the measured file entries (bytes, accuracy, speedup per batch); `row`/`ref_row`: the rows, for
    the model's own counts (parameters, MACs).
    """
    acc, ref_acc = fig.get("accuracy"), ref.get("accuracy")
    mine, theirs = dict(fig.get("metrics") or {}), dict(ref.get("metrics") or {})
    mine["loss"], theirs["loss"] = fig.get("loss"), ref.get("loss")
    return {
        "accuracy_delta": None if acc is None or ref_acc is None else acc - ref_acc,
        "metric_delta": {k: (None if v is None or theirs.get(k) is None else v - theirs[k])
                         for k, v in mine.items()},
        "param_reduction": _ratio(ref_row.get("params"), row.get("params")),
        "size_reduction": _ratio(ref.get("bytes"), fig.get("bytes")),
        "mac_reduction": _ratio(ref_row.get("macs"), row.get("macs")),
        "speedup": dict(fig.get("speedup") or {}),
        "speedup_iqr": dict(fig.get("speedup_iqr") or {}),
    }


def _shipped(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(format, figures) of the file a row ships; rows written before deploy existed are their PyTorch model."""
    formats = row.get("formats") or {}
    fmt = (row.get("deploy") or {}).get("format")
    if fmt in formats:
        return str(fmt), formats[fmt]
    return "torch", {"bytes": row.get("bytes"), "accuracy": row.get("accuracy"), "loss": row.get("loss"),
                     "metric": row.get("metric"), "score": row.get("score"), "metrics": row.get("metrics"),
                     "latency_ms": row.get("latency_ms") or {}, "files": ["model.safetensors", "model.json"]}


def build_report(recipe_name: str, rows: list[dict[str, Any]], reference: str, status: str, extra: dict | None = None) -> dict:
    """report.json: every figure from the file that ships (deploy runtime); PyTorch's under `torch`."""
    ref_row = next((r for r in rows if r["name"] == reference), rows[0])
    _, ref = _shipped(ref_row)
    stages = []
    for row in rows:
        fmt, fig = _shipped(row)
        formats = {}
        for name, entry in (row.get("formats") or {fmt: fig}).items():
            formats[name] = {k: entry.get(k) for k in (
                "files", "bytes", "accuracy", "loss", "metric", "score", "metrics", "agreement", "max_abs_diff",
                "latency_ms", "latency_iqr_ms", "timed", "decode_tokens_per_s", "peak_memory_mib", "runtime_memory_mib",
                "int8", "fidelity")}
            formats[name]["files"] = [f"{row.get('folder')}/{f}" for f in entry.get("files") or []]
            formats[name]["vs_reference"] = compare(entry, ref, row, ref_row)
        notes = list(row.get("notes") or [])
        for entry in (row.get("formats") or {}).values():
            notes += [n for n in entry.get("notes") or [] if n not in notes]
        if row.get("emulated"):
            notes.append("PyTorch figures of the int8 layers are a float emulation of the int8 arithmetic (not "
                         "faster in PyTorch); speed comes from the deploy runtime's int8 file")
        out = {k: row.get(k) for k in ("index", "name", "type", "kind", "folder")}
        out.update({
            "runtime": (row.get("deploy") or {}).get("runtime", "torch"),
            "format": fmt,
            "files": formats[fmt]["files"],
            "accuracy": fig.get("accuracy"),
            "loss": fig.get("loss"),
            "metric": fig.get("metric") or row.get("metric") or "top1",
            "score": fig.get("score") if fig.get("metric") else fig.get("accuracy"),
            "metrics": dict(fig.get("metrics") or {}),
            "agreement": fig.get("agreement"),
            "fidelity": formats[fmt].get("fidelity"),
            "bytes": fig.get("bytes"),
            "latency_ms": dict(fig.get("latency_ms") or {}),
            "latency_iqr_ms": dict(fig.get("latency_iqr_ms") or {}),
            "timed": formats[fmt].get("timed"),
            "decode_tokens_per_s": formats[fmt].get("decode_tokens_per_s"),
            "peak_memory_mib": formats[fmt].get("peak_memory_mib"),
            "runtime_memory_mib": formats[fmt].get("runtime_memory_mib"),
            **{k: row.get(k) for k in ("params", "nonzero_params", "sparsity", "macs")},
            "torch": {"accuracy": row.get("accuracy"), "loss": row.get("loss"), "metrics": row.get("metrics") or {},
                      "bytes": row.get("bytes"),
                      "latency_ms": row.get("latency_ms") or {}, "emulated": bool(row.get("emulated"))},
            "formats": formats,
            "vs_reference": formats[fmt]["vs_reference"],
            "seconds": row.get("seconds"),
            "notes": notes,
        })
        if row.get("details"):
            out["details"] = row["details"]
        stages.append(out)
    _int8_slower_notes(stages)
    _pruned_slower_notes(stages)
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "recipe": recipe_name,
        "status": status,
        "reference": ref_row["name"],
        "stages": stages,
        "recommendation": recommend(stages, rows),
        **(extra or {}),
    }


NOISE = 0.05  # latencies closer than this share are a tie: the smaller file wins


def recommend(stages: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The file to ship from the last stage: the fastest of its candidates that follow their source (deploy.fidelity)
    at the first deploy batch size, timed interleaved in the same rounds; a tie within NOISE goes to the smaller file.

    Candidates: the last row's shipped file, its other files in the same runtime that are not float emulations of
    int8 layers, and for an int8 row the float file of the stage it quantized (int8 may be slower than float on a
    CPU without fast int8 instructions, or for a tiny model whose time is per-call overhead)."""
    if not stages or not rows:
        return None
    last, raw = stages[-1], rows[-1]
    candidates: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    for fmt, entry in (last.get("formats") or {}).items():
        emulation = bool(raw.get("emulated")) and fmt not in INT8_FORMATS and fmt != "torch"
        if fmt == last["format"] or (not emulation and _same_runtime(fmt, last["format"])):
            candidates.append((last, fmt, entry))
    if last.get("format") in INT8_FORMATS or raw.get("emulated"):
        source = next((s for s in reversed(stages[:-1]) if s.get("kind") != "quantized" and s.get("kind") != "export"
                       and s.get("format") not in INT8_FORMATS), None)
        if source is not None and _same_runtime(source["format"], last["format"]):
            candidates.append((source, source["format"], source["formats"][source["format"]]))
    if not candidates:
        return None
    batches = sorted({bs for _, _, e in candidates for bs in (e.get("latency_ms") or {})}, key=int)
    batch = next((bs for bs in batches if all(isinstance((e.get("latency_ms") or {}).get(bs), float)
                                               for _, _, e in candidates)), None)
    listed = [{"stage": s["name"], "format": f, "files": e.get("files"), "bytes": e.get("bytes"),
               "latency_ms": e.get("latency_ms") or {}, "fidelity_passed": bool((e.get("fidelity") or {}).get(
                   "passed", True))} for s, f, e in candidates]
    right = [c for c in listed if c["fidelity_passed"]]
    if not right:
        return {"stage": None, "format": None, "files": [], "batch": batch, "candidates": listed,
                "reason": "no candidate file follows its source model within deploy.fidelity: ship none of them"}
    if batch is None:  # not timed: the smallest right file
        best = min(right, key=lambda c: c["bytes"] or 0)
        reason = "latency was not measured: the smallest file that follows its source"
    else:
        fastest = min(right, key=lambda c: c["latency_ms"][batch])
        ties = [c for c in right if c["latency_ms"][batch] <= fastest["latency_ms"][batch] * (1 + NOISE)]
        best = min(ties, key=lambda c: c["bytes"] or 0)
        others = [c for c in listed if c is not best]
        parts = [f"{c['format']} of '{c['stage']}' runs at {best['latency_ms'][batch] / c['latency_ms'][batch]:.2f}x "
                 f"its speed" + ("" if c["fidelity_passed"] else " but does not follow its source (deploy.fidelity)")
                 for c in others]
        reason = (f"at batch {batch} on this CPU, {best['format']} of '{best['stage']}' is the fastest file that "
                  f"follows its source ({best['latency_ms'][batch]:.3f} ms)" + ("; " + "; ".join(parts) if parts else "")
                  + ("; within 5% the smaller file wins" if len(ties) > 1 else ""))
    return {"stage": best["stage"], "format": best["format"], "files": best["files"], "batch": batch,
            "reason": reason, "candidates": listed}


def _same_runtime(a: str, b: str) -> bool:
    return a.split("_")[0] == b.split("_")[0]


INT8_FORMATS = ("onnx_int8", "onnx_int4", "executorch_int8")  # quantized files, judged against their float source


def _int8_slower_notes(stages: list[dict[str, Any]]) -> None:
    """An int8 file slower than the float file of the stage before it says so: int8 does not pay there."""
    last_float: dict[str, Any] | None = None
    for row in stages:
        if row.get("format") not in INT8_FORMATS:
            if row.get("format") is not None and row.get("latency_ms"):
                last_float = row
            continue
        if last_float is None:
            continue
        slower = [bs for bs, ms in (row.get("latency_ms") or {}).items()
                  if isinstance(ms, float) and isinstance(last_float["latency_ms"].get(bs), float)
                  and ms > last_float["latency_ms"][bs]]
        if slower:
            at = ", ".join(f"batch {bs} ({row['latency_ms'][bs]:.3f} ms vs {last_float['latency_ms'][bs]:.3f} ms)"
                           for bs in slower)
            bits = "int4" if row.get("format") == "onnx_int4" else "int8"
            row["notes"].append(f"{bits} does not pay here: at {at} the {bits} file is slower than the float file of "
                                f"'{last_float['name']}'")


CHANNEL_BLOCK = 8  # ONNX Runtime's blocked (NCHWc) and XNNPACK's convolutions work on channels in blocks of 8


def _pruned_slower_notes(stages: list[dict[str, Any]]) -> None:
    """A structurally pruned float file slower than the file of the row before it says so, and names the layers
    whose channel counts pruning moved off a multiple of 8 (the usual cause: `round_to: 8` keeps them aligned)."""
    for before, row in zip(stages, stages[1:], strict=False):
        if row.get("kind") != "structural" or row.get("format") in INT8_FORMATS:
            continue
        mine, theirs = row.get("latency_ms") or {}, before.get("latency_ms") or {}
        slower = [bs for bs, ms in mine.items()
                  if isinstance(ms, float) and isinstance(theirs.get(bs), float) and ms > theirs[bs]]
        if not slower:
            continue
        at = ", ".join(f"batch {bs} ({mine[bs]:.3f} ms vs {theirs[bs]:.3f} ms)" for bs in slower)
        off = []
        for r in ((row.get("details") or {}).get("tables") or {}).get("per layer") or []:
            try:
                was, now = (int(str(r[k]).split("x")[0]) for k in ("shape before", "shape after"))
            except (KeyError, ValueError):
                continue
            if was % CHANNEL_BLOCK == 0 and now % CHANNEL_BLOCK and now != was:
                off.append(f"{r.get('layer')}: {was} -> {now}")
        cause = (f"; {len(off)} layer(s) now have channel counts off a multiple of {CHANNEL_BLOCK} ("
                 + ", ".join(off[:3]) + (", ..." if len(off) > 3 else "") + "), which ONNX Runtime's and XNNPACK's "
                 f"convolutions run on slower paths: round_to: {CHANNEL_BLOCK} keeps them aligned") if off else ""
        row["notes"].append(f"pruning does not pay here: at {at} the pruned file is slower than the file of "
                            f"'{before['name']}'{cause}")


def deploy_summary(recipe: Any) -> dict[str, Any]:
    """The report's `deploy` block: what the figures are measured on, and on which machine."""
    from compresspipe.runtimes.cpu import machine_record, resolve

    return {"runtime": recipe.deploy_runtime(), "cpu": recipe.deploy.cpu, "cpu_target": resolve(recipe.deploy.cpu),
            "threads": recipe.deploy_threads(), "batch_sizes": recipe.deploy_batch_sizes(),
            "rounds": recipe.deploy.rounds, "machine": machine_record()}


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):  # binary units, labelled as such everywhere we print sizes
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def fmt_count(n: int | None) -> str:
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


def _speed(ms: float | None, ratio: float | None, iqr: list[float] | None, spread: bool) -> str:
    if ms is None:
        return "n/a"
    text = f"{ms:.3f} ms"
    if ratio is not None:
        text += f" ({ratio:.2f}x" + (f", {iqr[0]:.2f}-{iqr[1]:.2f}" if spread and iqr else "") + ")"
    return text


def table_rows(report: dict[str, Any], spread: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the markdown report and the terminal table: the shipped files' figures.

    `spread`: latency cells also give the interquartile range of the per-round speedups.
    """
    stages = report["stages"]
    sizes = list(stages[0].get("latency_ms") or {}) if stages else []
    for s in stages:
        sizes += [bs for bs in s.get("latency_ms") or {} if bs not in sizes]
    metric = report_metric(report)
    label = "accuracy" if metric == "top1" else metric
    header = ["#", "stage", "kind", "file", label, f"Δ{'acc' if metric == 'top1' else ''}", "params", "sparsity",
              "size", "MACs"]
    per_token = any(str(s.get("timed") or "").startswith("decode") for s in stages)
    header += [f"{'decode' if per_token else 'latency'} b{bs}" for bs in sizes]
    peak_bs = next((bs for s in stages for bs in s.get("peak_memory_mib") or {}), None)
    if peak_bs is not None:  # files that generate: peak resident memory of a process of their own
        header.append(f"peak mem b{peak_bs}")
    ref_peak = next(((s.get("peak_memory_mib") or {}).get(peak_bs) for s in stages
                     if s.get("name") == report.get("reference")), None) if peak_bs else None
    rows = []
    for s in stages:
        v = s["vs_reference"]
        acc, dacc = metric_cells(s, metric)
        row = [
            str(s["index"]), s["name"], s["kind"] or "", FORMAT_LABELS.get(s.get("format") or "torch", ""), acc, dacc,
            fmt_count(s["params"]) + _x(v["param_reduction"]),
            "n/a" if s["sparsity"] is None else f"{100 * s['sparsity']:.1f}%",
            fmt_bytes(s["bytes"]) + _x(v["size_reduction"]),
            fmt_count(s["macs"]) + _x(v["mac_reduction"]),
        ]
        for bs in sizes:
            row.append(_speed((s.get("latency_ms") or {}).get(bs), (v.get("speedup") or {}).get(bs),
                              (v.get("speedup_iqr") or {}).get(bs), spread))
        if peak_bs is not None:
            row.append(_peak((s.get("peak_memory_mib") or {}).get(peak_bs), ref_peak))
        rows.append(row)
    return header, rows


def _peak(mib: float | None, ref: float | None) -> str:
    if mib is None:
        return "n/a"
    return f"{mib:.1f} MiB" + (f" ({ref / mib:.2f}x)" if ref and mib > 0 else "")


def report_metric(report: dict[str, Any]) -> str:
    """The metric the report leads with: the task's default (top-1 accuracy for classification)."""
    stages = report.get("stages") or []
    return str(stages[0].get("metric") or "top1") if stages else "top1"


def metric_value(row: dict[str, Any], metric: str) -> float | None:
    if metric == "top1":
        value = row.get("accuracy")
        return value if value is not None else (row.get("metrics") or {}).get("top1")
    return (row.get("metrics") or {}).get(metric)


def metric_cells(row: dict[str, Any], metric: str) -> tuple[str, str]:
    """(value, change vs the reference) of a row's lead metric: accuracy in %, others as numbers."""
    value = metric_value(row, metric)
    v = row.get("vs_reference") or {}
    delta = v.get("accuracy_delta") if metric == "top1" else (v.get("metric_delta") or {}).get(metric)
    if metric == "top1":
        return ("n/a" if value is None else f"{100 * value:.2f}%"), ("" if delta is None else f"{100 * delta:+.2f}")
    return ("n/a" if value is None else f"{value:.4g}"), ("" if delta is None else f"{delta:+.4g}")


def torch_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The PyTorch model's own figures (secondary): accuracy, saved bytes and eager latency per stage."""
    stages = report["stages"]
    sizes = list((stages[0].get("torch") or {}).get("latency_ms") or {}) if stages else []
    metric = report_metric(report)
    header = ["#", "stage", "accuracy" if metric == "top1" else metric, "size",
              *[f"latency b{bs}" for bs in sizes], "note"]
    rows = []
    for s in stages:
        t = s.get("torch") or {}
        acc = metric_value(t, metric)
        text = "n/a" if acc is None else (f"{100 * acc:.2f}%" if metric == "top1" else f"{acc:.4g}")
        rows.append([str(s["index"]), s["name"], text,
                     fmt_bytes(t.get("bytes")),
                     *[_speed((t.get("latency_ms") or {}).get(bs), None, None, False) for bs in sizes],
                     "int8 emulated in float" if t.get("emulated") else ""])
    return header, rows


def measured_on(report: dict[str, Any]) -> str:
    """One line: which runtime and CPU target the figures come from."""
    d = report.get("deploy") or {}
    if not d:
        return "Figures of the PyTorch model."
    where = f"{d.get('runtime')}, {d.get('threads')} thread(s)"
    if d.get("runtime") != "torch":
        where += f", int8 files for cpu {d.get('cpu_target')}"
    machine = d.get("machine") or {}
    decode = next((s["timed"] for s in report.get("stages", []) if str(s.get("timed") or "").startswith("decode")),
                  None)
    per_token = (f" Files with a key/value cache are timed per generated token: one {decode} at each batch size "
                 "(tokens/s = batch / step time, `decode_tokens_per_s` in report.json); `peak mem` is the peak "
                 "resident memory of a process of its own that loads the file, prefills and decodes with it, ONNX "
                 "Runtime's own included (`peak_memory_mib`, the runtime alone `runtime_memory_mib`).") \
        if decode else ""
    return (f"Figures of the files that ship ({where}), measured on {machine.get('cpu', '?')}; latency is the median "
            f"of {d.get('rounds')} interleaved rounds, speedups the median of the per-round ratios.{per_token}")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report, spread=True)
    lines = [
        f"# compresspipe report: {report['recipe']}",
        "",
        f"Status: **{report['status']}**. Ratios in parentheses compare with the reference "
        f"`{report['reference']}` (> 1 is smaller or faster; latency cells give the speedup and the interquartile "
        f"range of its per-round values). {measured_on(report)}",
        "",
        *_md_table(header, rows),
    ]
    if any(s.get("format") not in (None, "torch") for s in report["stages"]):
        t_header, t_rows = torch_rows(report)
        lines += ["", "## The PyTorch model (secondary)", "", *_md_table(t_header, t_rows)]
    gates = report.get("gates") or []
    if gates:
        verdict = "all passed" if all(g["passed"] for g in gates) else "FAILED"
        lines += ["", f"## Quality gates: {verdict}", "", "| scope | gate | value | limit | result |", "|---|---|---|---|---|"]
        lines += [f"| {g['scope']} | {g['gate']} | {table_cell(g['value'])} | {table_cell(g['limit'])} | "
                  f"{'pass' if g['passed'] else '**FAIL**'}{' (within noise)' if g.get('within_noise') else ''} |"
                  for g in gates]
    rec = report.get("recommendation")
    if rec:
        lines += ["", "## The file to ship", "",
                  f"**{', '.join(rec['files']) or 'none'}**: {rec['reason']}" if rec.get("files") else rec["reason"]]
    failed_fidelity = [g for g in gates if g.get("scope") == "deploy.fidelity" and not g["passed"]]
    if failed_fidelity:
        lines += ["", "## Files that do not follow their source (deploy.fidelity)", ""]
        lines += [f"- **{g['stage']}** {g['format']}: {g['description']}" for g in failed_fidelity]
    warnings = report.get("warnings") or []
    if warnings:
        lines[3:3] = ["", *[f"> **Warning:** {w}" for w in warnings]]
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
            lines += ["| " + " | ".join(table_cell(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def table_cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# Terminal columns in the order they are dropped last: a narrow terminal shows the first ones that fit.
PRIORITY = ("#", "stage", "accuracy", "size", "latency", "file", "peak mem", "MACs", "params", "kind", "sparsity")


def render_table(report: dict[str, Any], width: int = 200) -> tuple[Table, list[str]]:
    """The stage table for a terminal `width` columns wide: ratios stacked under their values, and columns
    that do not fit left out (least useful first, as PRIORITY says). Returns the table and what was left out."""
    header, rows = table_rows(report)
    metric, delta = header[4], header[5]  # the task's metric (accuracy, mse, perplexity, ...) and its change
    kinds = {h: h for h in header}
    kinds[metric] = "accuracy"  # the task's own metric is kept like accuracy at any width
    for h in header:
        if h.startswith(("latency", "decode")):
            kinds[h] = "latency"
        if h.startswith("peak mem"):
            kinds[h] = "peak mem"
    stacked = [[stack_rows(cell) for cell in row] for row in rows]
    merged_header = [h for h in header if h != delta]
    cells: dict[str, list[str]] = {h: [] for h in merged_header}
    for row in stacked:
        values = dict(zip(header, row, strict=True))
        for h in merged_header:
            text = values[h]
            if h == metric and values[delta]:
                text = f"{text}\n{values[delta]}"
            cells[h].append(text)
    need = {h: max(len(h), *(len(line) for c in cells[h] for line in c.split("\n"))) + 3 for h in merged_header}
    shown, used = [], 1
    for kind in PRIORITY:
        for h in merged_header:
            if kinds[h] == kind and h not in shown and used + need[h] <= width:
                shown.append(h)
                used += need[h]
    shown = [h for h in merged_header if h in shown]  # back in reading order
    hidden = [h for h in merged_header if h not in shown]
    table = Table(title=f"compresspipe: {report['recipe']} ({status_line(report)})", title_justify="left",
                  show_lines=True)
    for h in shown:
        table.add_column(h, justify="left" if h in ("stage", "kind", "file") else "right", no_wrap=h != "stage",
                         overflow="fold")
    for i in range(len(rows)):
        table.add_row(*[cells[h][i] for h in shown])
    return table, hidden


def stack_rows(cell: str) -> str:
    """`593.4 KiB (17.69x)` -> two lines, value over ratio, so a column needs half the width."""
    if cell.endswith(")") and " (" in cell:
        value, _, ratio = cell.rpartition(" (")
        return f"{value}\n({ratio}"
    return cell


def status_line(report: dict[str, Any]) -> str:
    """`complete`, or `complete, gates FAILED` when a gate missed: the header never says only complete then."""
    status = str(report.get("status"))
    if report.get("gates_passed") is False:
        return f"{status}, gates FAILED"
    return status
