"""Score one-shot per-layer changes on a fixed validation slice, and cache each layer's curve.

The cache key of a curve is the sha256 of the model (its structure and every tensor), the stage's sensitivity
settings, and the validation samples scored; one JSON file per (model, settings, samples) holds the curves
of every layer measured so far, updated under a file lock, so parallel workers and later runs add to it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from torch import nn

from compresspipe.artifacts.files import atomic_write_json, read_json
from compresspipe.cache import cache_root
from compresspipe.metrics.modes import eval_mode, model_device
from compresspipe.sensitivity import SENSITIVITY_FORMAT, SENSITIVITY_VERSION

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.base import Stage
    from compresspipe.stages.context import StageContext

CACHE_VERSION = 2  # 2: every curve carries the sha256 of its key, layer and points (hand edits are found)


def model_hash(state: ModelState) -> str:
    """sha256 of what the model computes: its description (source, edits, records) and every tensor."""
    digest = hashlib.sha256()
    desc = state.describe()
    digest.update(json.dumps({k: desc[k] for k in ("source", "input_shape", "num_classes", "edits", "records")},
                             sort_keys=True, default=str).encode())
    for name, tensor in state.module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f";{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Scorer:
    """The task's default metric (top-1 accuracy, mse, perplexity, ...) and its loss on the first `samples`
    validation samples, held in memory (the same batches every time); any input the model takes (one tensor or
    named inputs). `higher` says whether more of the metric is better (a drop is measured that way round)."""

    def __init__(self, ctx: StageContext, samples: int):
        from compresspipe.metrics.tasks import TASKS, metric_direction
        from compresspipe.models.inputs import batch_len, take

        self.task = ctx.task
        self.higher = metric_direction(TASKS[self.task].default_metric)
        self.batches: list[tuple[Any, torch.Tensor]] = []
        count = 0
        for x, y in ctx.batches("val", None):
            n = min(batch_len(x), samples - count)
            self.batches.append((take(x, slice(0, n)), y[:n]))
            count += n
            if count >= samples:
                break
        self.samples = count
        digest = hashlib.sha256()
        for x, y in self.batches:
            for t in (*(x.values() if isinstance(x, dict) else [x]), y):
                digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.fingerprint = digest.hexdigest()
        self.calls = 0

    def __call__(self, model: nn.Module) -> tuple[float, float]:
        from compresspipe.metrics import evaluate

        self.calls += 1
        if not self.batches:
            return 0.0, 0.0
        with eval_mode(model):
            return evaluate(model, self.batches, model_device(model), self.task)

    def drop(self, base: float, value: float) -> float:
        """How much worse `value` is than `base` (positive: worse), whichever way the metric points."""
        return base - value if self.higher else value - base


class CurveCache:
    """Curves of one key: {layer: points}; read and merged under an exclusive lock.

    The key is what produced a curve: the model's hash, the stage's settings, the validation samples' fingerprint
    and the code (compresspipe's version and the cache format). Each curve is stored with the sha256 of the key, its
    layer and its points, checked on every read: an entry edited by hand, or written by other code, is measured
    again (`rejected` names them) rather than trusted."""

    def __init__(self, key: dict[str, Any], root: Path | None = None):
        from compresspipe import __version__

        key = {**key, "code": {"compresspipe": __version__, "cache": CACHE_VERSION}}
        text = json.dumps(key, sort_keys=True, default=str)
        self.key = key
        self.digest = hashlib.sha256(text.encode()).hexdigest()
        self.path = (root or cache_root()) / "sensitivity" / f"{self.digest[:32]}.json"
        self.rejected: list[str] = []

    def _seal(self, layer: str, points: list[dict[str, Any]]) -> str:
        body = json.dumps([self.digest, layer, points], sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()

    def read(self) -> dict[str, list[dict[str, Any]]]:
        try:
            data = read_json(self.path)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("key") != self.digest:
            self.rejected = ["(the whole file)"] if self.path.exists() else []
            return {}
        layers = data.get("layers")
        out: dict[str, list[dict[str, Any]]] = {}
        self.rejected = []
        for layer, entry in (layers if isinstance(layers, dict) else {}).items():
            points = entry.get("points") if isinstance(entry, dict) else None
            if isinstance(points, list) and entry.get("sha256") == self._seal(layer, points):
                out[layer] = points
            else:
                self.rejected.append(layer)
        return out

    def add(self, layer: str, points: list[dict[str, Any]]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(self.path.with_suffix(".lock")):
                layers = {n: {"points": p, "sha256": self._seal(n, p)} for n, p in self.read().items()}
                layers[layer] = {"points": points, "sha256": self._seal(layer, points)}
                atomic_write_json(self.path, {"version": CACHE_VERSION, "key": self.digest, "settings": self.key,
                                              "layers": layers})
        except OSError:
            pass  # a read-only or full cache only costs a re-measurement next time


def measure(stage: Stage, state: ModelState, ctx: StageContext, settings: dict[str, Any], samples: int,
            layers: list[str] | None = None, progress: Callable[[str, bool], None] | None = None,
            use_cache: bool = True, precomputed: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Every layer's curve (`layers`: a subset of the stage's), from `precomputed` (other processes measured it) or
    the cache where it is there.

    Returns sensitivity.json's content (without the recipe): the unchanged model's score and, per layer, its
    points with the accuracy drop against it."""
    t0 = time.perf_counter()
    scorer = Scorer(ctx, samples)
    state.module.eval()
    base_acc, base_loss = scorer(state.module)
    available = stage.sensitivity_layers(state, ctx)
    wanted = list(available) if layers is None else [n for n in layers if n in available]
    cache = CurveCache({"model": model_hash(state), "settings": settings, "data": scorer.fingerprint,
                        "samples": scorer.samples})
    stored = cache.read() if use_cache else {}
    if cache.rejected:
        ctx.ui.log(f"sensitivity cache {cache.path}: {len(cache.rejected)} curve(s) do not match the checksum of what "
                   f"produced them ({', '.join(cache.rejected[:5])}); measured again")
    cached = {**stored, **(precomputed or {})}
    rows, hits = [], 0
    for name in wanted:
        points = cached.get(name)
        hit = name in stored and name not in (precomputed or {})
        if points is None:
            points = stage.sensitivity(state, ctx, name, settings, scorer)
            if use_cache:
                cache.add(name, points)
        hits += hit
        for p in points:
            p["drop"] = None if p.get("accuracy") is None else scorer.drop(base_acc, p["accuracy"])
        rows.append({"layer": name, **available[name], "points": points})
        if progress is not None:
            progress(name, hit)
    return {
        "format": SENSITIVITY_FORMAT, "version": SENSITIVITY_VERSION, "stage": ctx.name,
        "type": ctx.recipe.stages[ctx.index - 1].type if 0 < ctx.index <= len(ctx.recipe.stages) else None,
        "settings": settings, "samples": scorer.samples, "model_sha256": cache.key["model"],
        "baseline": {"accuracy": base_acc, "loss": base_loss}, "layers": rows,
        "cached_layers": hits, "measured_layers": len(rows) - hits, "seconds": round(time.perf_counter() - t0, 3),
        "cache": str(cache.path),
    }


def monotone_drop(points: list[dict[str, Any]], settings: list[float]) -> list[float]:
    """A layer's accuracy drop at each setting, made non-decreasing (a larger change never counts as safer)."""
    by = {p["setting"]: p.get("drop") for p in points}
    out, worst = [], 0.0
    for s in settings:
        d = by.get(s)
        worst = max(worst, 1.0 if d is None else float(d))
        out.append(worst)
    return out
