"""Run every benchmarks/bench_*.py (or those named on the command line) and print their tables.

Each module has `run() -> list[dict]`: rows of one table, printed as they are measured, and a
`TITLE`. Ratios are measured side by side in one process, never against numbers from another run.
Results are also written to .bench/results.json.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    names = argv or sorted(p.stem for p in here.glob("bench_*.py"))
    console = Console(highlight=False, width=220)
    results: dict[str, list[dict]] = {}
    failed = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.{name if name.startswith('bench_') else 'bench_' + name}")
        t0 = time.perf_counter()
        try:
            rows = module.run()
        except Exception as exc:  # one failing benchmark must not hide the others
            console.print(f"[bold red]{name} failed:[/] {type(exc).__name__}: {exc}")
            failed += 1
            continue
        results[name] = rows
        table = Table(title=f"{getattr(module, 'TITLE', name)}  ({time.perf_counter() - t0:.0f}s)", title_justify="left")
        cols = list(dict.fromkeys(k for r in rows for k in r))  # rows of two parts may differ
        for c in cols:
            table.add_column(c, justify="left" if c in ("case", "check", "method", "backend", "stage") else "right")
        for r in rows:
            table.add_row(*["" if c not in r else f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols])
        console.print(table)
    out = Path(".bench")
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
