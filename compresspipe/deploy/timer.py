"""Time every row's shipped file after the run, interleaved with the reference's, and keep the spread."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compresspipe.artifacts.files import sha256_file
from compresspipe.deploy.timing import caller, interleaved, quartiles, ratio, row_io, set_threads

if TYPE_CHECKING:
    from compresspipe.recipe.spec import Recipe

Target = tuple[int, str]  # (row position, format)


class DeployTimer:
    """Fills each row's `formats[fmt]` with latency_ms, latency_iqr_ms, speedup and speedup_iqr per batch size."""

    def __init__(self, recipe: Recipe, folder: Path, rows: list[dict[str, Any]], reference: str):
        self.recipe, self.folder, self.rows = recipe, folder, rows
        self.ref = next((i for i, r in enumerate(rows) if r["name"] == reference), 0)
        self.threads = recipe.deploy_threads()
        self.sizes = recipe.deploy_batch_sizes()
        self.enabled = recipe.evaluate.latency.enabled
        self.samples: dict[tuple[int, str, int], list[float]] = {}

    def _primary(self, i: int) -> str:
        return str(self.rows[i]["deploy"]["format"])

    def targets(self) -> list[Target]:
        return [(i, fmt) for i, row in enumerate(self.rows) for fmt in row.get("formats", {})]

    def measure(self, targets: list[Target] | None = None, rounds: int | None = None, bar: Any = None) -> None:
        """Time `targets` (default: every row's every format) with the reference, in the same rounds."""
        targets = list(targets or self.targets())
        if (self.ref, self._primary(self.ref)) not in targets:
            targets.insert(0, (self.ref, self._primary(self.ref)))
        if not self.enabled:
            for i, fmt in targets:
                self.rows[i]["formats"][fmt].update(latency_ms={}, latency_iqr_ms={}, speedup={}, speedup_iqr={})
            return
        spec = self.recipe.evaluate.latency
        previous = set_threads(self.threads, any(f.startswith("executorch") for _, f in targets))
        try:
            calls: dict[Hashable, Callable[[], Any]] = {}
            key_of: dict[tuple[int, str, int], Hashable] = {}
            decode: dict[tuple[int, str], int] = {}  # targets timed per generated token: tokens cached
            for i, fmt in targets:
                row, entry = self.rows[i], self.rows[i]["formats"][fmt]
                stage = self.folder / row["folder"]
                ident = (fmt, sha256_file(stage / entry["files"][0]))  # identical files are timed once
                for bs in self.sizes:
                    key: Hashable = (ident, bs)
                    if key not in calls:
                        call = caller(fmt, stage, entry["files"], bs, row_io(row), self.threads)
                        if call is None:
                            continue
                        calls[key] = call
                    key_of[(i, fmt, bs)] = key
                    prompt = getattr(calls[key], "per_token_after", None)  # a DecodeStep (kv_cache)
                    if prompt is not None:
                        decode[(i, fmt)] = int(prompt)
            samples = interleaved(calls, rounds or self.recipe.deploy.rounds, spec.warmup, spec.iters,
                                  None if bar is None else lambda: bar.advance(1))
        finally:
            torch.set_num_threads(previous)
        for target, key in key_of.items():
            self.samples[target] = samples[key]
        for i, fmt in targets:
            self.rows[i]["formats"][fmt]["timed"] = f"decode step ({decode[(i, fmt)]} tokens cached)" \
                if (i, fmt) in decode else "forward"
        self._summarise(targets)
        self._peak_memory([t for t in targets if t in decode])

    def _peak_memory(self, targets: list[Target]) -> None:
        """Files that generate: peak resident memory of a process of their own that prefills and decodes with
        them at each batch size (`peak_memory_mib`, the runtime's own in `runtime_memory_mib`); measured once."""
        from compresspipe.runtimes.kv_cache import DECODE_PROMPT
        from compresspipe.runtimes.memory import peak_memory

        seen: dict[tuple[str, int], dict[str, float] | None] = {}
        for i, fmt in targets:
            row, entry = self.rows[i], self.rows[i]["formats"][fmt]
            if "peak_memory_mib" in entry:
                continue
            path = self.folder / row["folder"] / entry["files"][0]
            digest, peaks, runtime = sha256_file(path), {}, None
            for bs in self.sizes:
                key = (digest, bs)
                if key not in seen:
                    seen[key] = peak_memory(path, bs, self.threads, prompt=DECODE_PROMPT)
                got = seen[key]
                if got is not None:
                    peaks[str(bs)], runtime = got["peak_mib"], got["runtime_mib"]
            entry["peak_memory_mib"], entry["runtime_memory_mib"] = peaks, runtime

    def remeasure(self, wanted: list[tuple[str, str | None, str]], bar: Any = None) -> None:
        """Time again, with twice the rounds, the (stage name, format or None: the shipped one, batch) given."""
        by_name = {r["name"]: i for i, r in enumerate(self.rows)}
        targets = []
        for name, fmt, _batch in wanted:
            i = by_name[name]
            targets.append((i, fmt or self._primary(i)))
        self.measure(list(dict.fromkeys(targets)), rounds=2 * self.recipe.deploy.rounds, bar=bar)

    def _summarise(self, targets: list[Target]) -> None:
        ref_fmt = self._primary(self.ref)
        for i, fmt in targets:
            entry = self.rows[i]["formats"][fmt]
            latency, spread, speedup, speedup_iqr = {}, {}, {}, {}
            for bs in self.sizes:
                mine = self.samples.get((i, fmt, bs))
                if not mine:
                    continue
                q1, med, q3 = quartiles(mine)
                latency[str(bs)], spread[str(bs)] = med, [q1, q3]
                ref = self.samples.get((self.ref, ref_fmt, bs))
                if ref and len(ref) == len(mine):
                    r_med, r_q1, r_q3 = ratio(ref, mine)
                    speedup[str(bs)], speedup_iqr[str(bs)] = r_med, [r_q1, r_q3]
            entry.update(latency_ms=latency, latency_iqr_ms=spread, speedup=speedup, speedup_iqr=speedup_iqr)
            if entry.get("timed", "").startswith("decode"):  # per generated token: every sequence of the batch
                entry["decode_tokens_per_s"] = {bs: 1000.0 * int(bs) / ms for bs, ms in latency.items() if ms > 0}
