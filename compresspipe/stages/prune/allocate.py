"""Per-layer pruning amounts from a target (`target: {macs: 0.25}`), and each layer's pruning sensitivity.

Structured pruning removes a coupled *group* of channels at once (a convolution's outputs with the batch norm and
the next layer's inputs; residual branches that are added share one group). A group is named by its root layer,
the one Torch-Pruning ranks it by, and gets one amount.

- Sensitivity: on a copy of the model, one group alone loses the least important share of its channels at each
  ratio (the stage's importance; each step removes more of the same ranking), scored without fine-tuning.
- `allocate: sensitivity`: every group gets the largest amount whose own accuracy drop stays under a common
  threshold (linear between the measured ratios, capped at `max_amount`); the threshold is raised by bisection
  until the pruned model meets the target.
- `allocate: global`: Torch-Pruning's global ranking of channels across the groups, with the global ratio found
  by bisection; each group's amount is what that ranking removed from it.

MACs and parameter targets are counted on the pruned copy; a batch-1 latency target is timed in the deploy runtime,
the candidate's file interleaved with the unpruned model's. Allocations are cached by model hash and settings like
sensitivity curves, so a re-run (and `verify`) prunes the same channels even where latency decided them.
"""

from __future__ import annotations

import copy
import math
import shutil
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from compresspipe.errors import StageConfigError
from compresspipe.metrics import count_macs, count_params
from compresspipe.metrics.modes import model_device
from compresspipe.sensitivity.measure import CurveCache, measure, model_hash, monotone_drop

if TYPE_CHECKING:
    from compresspipe.artifacts.model import ModelState
    from compresspipe.stages.base import Score
    from compresspipe.stages.context import StageContext
    from compresspipe.stages.prune import PruneTarget
    from compresspipe.stages.prune.stage import PruneSelection, PruneStage

BISECTION_STEPS = 16
LATENCY_STEPS = 6  # each step builds and times a file in the deploy runtime


@dataclass
class Group:
    """Channels that are pruned together, named by the layer Torch-Pruning ranks them by."""

    root: str
    members: list[str]
    channels: int


@dataclass
class Allocation:
    """Per-group amounts meeting a target, and how they were found."""

    amounts: dict[str, float]  # group root -> fraction of its channels removed
    members: dict[str, list[str]]  # group root -> the layers whose output channels go with it
    metric: str
    share: float  # the share of the metric that remains after pruning with these amounts
    target: float
    method: str
    threshold: float | None = None  # sensitivity: the accuracy drop every group's amount stays under
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "target": self.target, "achieved": self.share, "allocate": self.method,
                "threshold": self.threshold, "amounts": self.amounts, "members": self.members}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Allocation:
        return Allocation({str(k): float(v) for k, v in data["amounts"].items()},
                          {str(k): list(v) for k, v in data["members"].items()}, str(data["metric"]),
                          float(data["achieved"]), float(data["target"]), str(data["allocate"]),
                          None if data.get("threshold") is None else float(data["threshold"]))


def _candidates() -> tuple[type[nn.Module], ...]:
    return (nn.modules.conv._ConvNd, nn.Linear)


def _feeds_output(group: Any) -> bool:
    return any(isinstance(dep.target.module, tp.ops._OutputOp) for dep, _ in group)


def example_input(state: ModelState) -> torch.Tensor:
    return torch.zeros((1, *state.input_shape), device=model_device(state.module))


def groups(model: nn.Module, example: torch.Tensor, selected: list[str]) -> dict[str, Group]:
    """The groups structured pruning can remove channels from, using only the selected layers."""
    names = {m: n for n, m in model.named_modules()}
    outside: list[nn.Module] = [m for n, m in model.named_modules()
                                if isinstance(m, _candidates()) and n not in selected]
    ignored: list[nn.Module] = [sub for m in outside for sub in m.modules()]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    out: dict[str, Group] = {}
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_candidates()):
        if _feeds_output(group):
            continue
        root = group[0][0].target.module
        members = [names[d.target.module] for d, _ in group
                   if dg.is_out_channel_pruning_fn(d.handler) and isinstance(d.target.module, _candidates())
                   and d.target.module in names]
        out[names[root]] = Group(names[root], list(dict.fromkeys(members)), int(dg.get_out_channels(root)))
    order = {n: i for i, n in enumerate(names.values())}
    return {k: out[k] for k in sorted(out, key=lambda n: order.get(n, 0))}  # in model order


def kept(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels left after removing `ratio` of them (Torch-Pruning's count), rounded up to `round_to`; at least one."""
    keep = int(channels * (1 - ratio))
    if round_to and keep % round_to:
        keep = min(channels, keep + round_to - keep % round_to)
    return max(1, keep)


def group_curve(stage: PruneStage, state: ModelState, ctx: StageContext, root: str, ratios: list[float],
                score: Score) -> list[dict[str, Any]]:
    """One group pruned alone at each ratio (increasing), one-shot, scored after each."""
    from compresspipe.stages.prune.stage import calibration_grads

    cfg = stage.config
    model = copy.deepcopy(state.module).eval()
    example = example_input(state)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    module = model.get_submodule(root)
    fn = dg.get_pruner_of_module(module)
    channels = int(dg.get_out_channels(module))
    importance = stage.importance().group()
    if stage.importance().needs_grad:
        calibration_grads(model, ctx, cfg.calibration_batches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        imp = importance(dg.get_pruning_group(module, fn.prune_out_channels, list(range(channels))))
    model.zero_grad(set_to_none=True)
    if imp is None:
        raise StageConfigError(ctx.name, f"the importance cannot rank the channels of {root!r}")
    imp = imp.detach().float().cpu()
    if imp.numel() != channels:  # grouped layers: one score per channel, averaged over the groups
        imp = imp.view(-1, channels).mean(0)
    order = torch.argsort(imp, stable=True).tolist()
    remaining = list(range(channels))
    removed = 0
    points = []
    for ratio in ratios:
        keep = kept(channels, ratio, cfg.round_to)
        drop = order[removed:channels - keep]
        if drop:
            gone = set(drop)
            positions = [i for i, c in enumerate(remaining) if c in gone]
            dg.get_pruning_group(module, fn.prune_out_channels, positions).prune()
            remaining = [c for c in remaining if c not in gone]
            removed = channels - keep
        model.eval()
        acc, loss = score(model)
        points.append({"setting": ratio, "accuracy": acc, "loss": loss, "channels": f"{len(remaining)}/{channels}",
                       "params": count_params(model), "macs": count_macs(model, tuple(state.input_shape))})
    return points


# -- allocation ---------------------------------------------------------------------------------------------------


def _pruned_copy(stage: PruneStage, state: ModelState, selected: list[str], amounts: dict[str, float] | None,
                 global_ratio: float | None, max_amount: float) -> nn.Module:
    """A copy of the model pruned one-shot: per-group amounts, or one global ratio ranked across the groups."""
    cfg = stage.config
    model = copy.deepcopy(state.module).eval()
    example = example_input(state)
    ignored = [m for n, m in model.named_modules() if isinstance(m, _candidates()) and n not in selected]
    ratio_dict = {model.get_submodule(n): a for n, a in (amounts or {}).items() if a > 0}
    pruner = tp.pruner.MetaPruner(
        model, example, importance=stage.importance().group(), global_pruning=global_ratio is not None,
        pruning_ratio=global_ratio or 0.0, pruning_ratio_dict=ratio_dict or None, ignored_layers=ignored,
        round_to=cfg.round_to, max_pruning_ratio=max_amount,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pruner.step()
    return model.eval()


class _Cost:
    """The share of the metric that remains in a pruned copy (MACs, parameters, or batch-1 latency)."""

    def __init__(self, stage: PruneStage, state: ModelState, ctx: StageContext, metric: str):
        self.stage, self.state, self.ctx, self.metric = stage, state, ctx, metric
        shape = tuple(state.input_shape)
        if metric == "macs":
            base = count_macs(state.module, shape)
            if base is None:
                raise StageConfigError(ctx.name, "target macs: the MACs of this model cannot be counted; use "
                                                 "target params or latency_b1")
            self.base = float(base)
        elif metric == "params":
            self.base = float(count_params(state.module))
        else:
            self.latency = _LatencyShare(state, ctx)

    def __call__(self, model: nn.Module) -> float:
        shape = tuple(self.state.input_shape)
        if self.metric == "macs":
            return float(count_macs(model, shape) or 0) / self.base
        if self.metric == "params":
            return count_params(model) / self.base
        return self.latency(model)

    def close(self) -> None:
        if self.metric == "latency_b1":
            self.latency.close()


class _LatencyShare:
    """Batch-1 latency of a candidate in the deploy runtime (its float file), over the unpruned model's, timed
    interleaved in the same rounds (the median of the per-round ratios)."""

    def __init__(self, state: ModelState, ctx: StageContext):
        from compresspipe.recipe.spec import RUNTIME_FORMATS

        self.ctx, self.state = ctx, state
        self.fmt = RUNTIME_FORMATS[ctx.recipe.deploy_runtime()][0]
        self.root = ctx.stage_dir / ".latency-target"
        shutil.rmtree(self.root, ignore_errors=True)
        self.count = 0
        self.reference = self._file(state)

    def _file(self, state: ModelState) -> tuple[Path, list[str]]:
        from compresspipe.artifacts.model import save_model
        from compresspipe.stages.ship import ship

        folder = self.root / f"{self.count:02d}"
        self.count += 1
        save_model(state, folder)
        entry = ship(self.fmt, state, self.ctx, folder, {}, {})
        return folder, list(entry["files"])

    def __call__(self, model: nn.Module) -> float:
        from compresspipe.deploy.timing import caller, interleaved, ratio, set_threads

        candidate = self._file(self._around(model))
        recipe = self.ctx.recipe
        threads = recipe.deploy_threads()
        previous = set_threads(threads, self.fmt.startswith("executorch"))
        try:
            calls: dict[Hashable, Callable[[], Any]] = {}
            for key, (folder, files) in (("reference", self.reference), ("candidate", candidate)):
                call = caller(self.fmt, folder, files, 1, self.state.spec, threads)
                if call is None:
                    raise StageConfigError(self.ctx.name, f"target latency_b1: {self.fmt} cannot run batch 1")
                calls[key] = call
            spec = recipe.evaluate.latency
            samples = interleaved(calls, max(recipe.deploy.rounds, 5), spec.warmup, spec.iters)
        finally:
            torch.set_num_threads(previous)
        speedup, _, _ = ratio(samples["reference"], samples["candidate"])
        shutil.rmtree(candidate[0], ignore_errors=True)
        return 1.0 / speedup if speedup > 0 else math.inf

    def _around(self, model: nn.Module) -> ModelState:
        """A model state around a pruned copy (its resize edit recorded, so it saves and reloads)."""
        from compresspipe.artifacts.edits import resize_edit, shape_snapshot
        from compresspipe.artifacts.model import ModelState

        base = self.state
        new = ModelState(model, dict(base.source), tuple(base.input_shape), base.num_classes, list(base.edits),
                         dict(base.records))
        new.record(resize_edit(shape_snapshot(base.module), model))
        return new

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _interpolated(ratios: list[float], drops: list[float], threshold: float, cap: float) -> float:
    """The largest amount whose (monotone, piecewise-linear from (0, 0)) drop stays under `threshold`."""
    amount, prev_r, prev_d = 0.0, 0.0, 0.0
    for r, d in zip(ratios, drops, strict=True):
        if d <= threshold:
            amount, prev_r, prev_d = r, r, d
            continue
        if d > prev_d:
            amount = prev_r + (threshold - prev_d) / (d - prev_d) * (r - prev_r)
        break
    return round(min(amount, cap), 4)


def target_groups(state: ModelState, ctx: StageContext, selected: list[str]) -> Any:
    """The coupled groups a target allocates over; a config error where the whole model cannot be traced."""
    try:
        found = groups(state.module, example_input(state), selected)
    except Exception as exc:  # the tracer meets an op it cannot follow (a channel shuffle, say)
        raise StageConfigError(ctx.name, f"a target needs Torch-Pruning's dependency graph of the whole model, "
                                         f"which it cannot build ({type(exc).__name__}: {str(exc)[:120]}); give "
                                         "amount: instead (the model is then pruned part by part)") from None
    if not found:
        raise StageConfigError(ctx.name, "no prunable group among the selected layers")
    return found


def allocate(stage: PruneStage, state: ModelState, ctx: StageContext, sel: PruneSelection) -> Allocation:
    """Per-group amounts for the stage's target, from the cache when this model and these settings were seen."""
    target: PruneTarget = stage.config.target  # type: ignore[assignment]
    selected = list(sel.amounts)
    found = target_groups(state, ctx, selected)
    settings = {"target": target.model_dump(mode="json"), "selected": selected,
                "sensitivity": stage.sensitivity_settings(target.ratios)}
    if target.metric == "latency_b1":
        from compresspipe.runtimes.cpu import machine_record

        settings["deploy"] = {"runtime": ctx.recipe.deploy_runtime(), "threads": ctx.recipe.deploy_threads(),
                              "machine": machine_record().get("cpu")}
    cache = CurveCache({"allocation": settings, "model": model_hash(state)})
    hit = cache.read().get("allocation")
    if hit:
        alloc = Allocation.from_json(hit[0])
        alloc.notes.append("allocation read from the cache (same model and settings)")
        return alloc
    cost = _Cost(stage, state, ctx, target.metric)
    try:
        if target.allocate == "global":
            alloc = _global(stage, state, ctx, selected, found, cost, target)
        else:
            alloc = _by_sensitivity(stage, state, ctx, selected, found, cost, target)
    finally:
        cost.close()
    cache.add("allocation", [alloc.to_json()])
    return alloc


def _unreachable(ctx: StageContext, target: PruneTarget, best: float) -> StageConfigError:
    return StageConfigError(
        ctx.name, f"target {target.metric}: {target.share} cannot be reached: removing up to max_amount "
                  f"{target.max_amount} of every selected group leaves {best:.1%} of the {target.metric}; raise "
                  "target.max_amount, select more layers, or ask for less")


def _by_sensitivity(stage: PruneStage, state: ModelState, ctx: StageContext, selected: list[str],
                    found: dict[str, Group], cost: _Cost, target: PruneTarget) -> Allocation:
    result = measure(stage, state, ctx, stage.sensitivity_settings(target.ratios) or {}, target.samples,
                     layers=list(found))
    ratios = list(target.ratios)
    curves = {r["layer"]: monotone_drop(r["points"], ratios) for r in result["layers"]}
    steps = LATENCY_STEPS if target.metric == "latency_b1" else BISECTION_STEPS

    def amounts_at(threshold: float) -> dict[str, float]:
        return {g: _interpolated(ratios, curves[g], threshold, target.max_amount) for g in found}

    def share_at(amounts: dict[str, float]) -> float:
        return cost(_pruned_copy(stage, state, selected, amounts, None, target.max_amount))

    top = max((d for c in curves.values() for d in c), default=0.0) + 1e-9
    most = amounts_at(math.inf)
    best = share_at(most)
    if best > target.share:
        raise _unreachable(ctx, target, best)
    # bisect the threshold: below `lo` the target is missed, at `hi` it is met
    lo, lo_amounts = 0.0, {g: 0.0 for g in found}
    hi, hi_amounts, hi_share = top, most, best
    for _ in range(steps):
        mid = (lo + hi) / 2
        amounts = amounts_at(mid)
        share = share_at(amounts)
        if share <= target.share:
            hi, hi_amounts, hi_share = mid, amounts, share
        else:
            lo, lo_amounts = mid, amounts
    # flat curves (or a coarse grid) can overshoot the target at one threshold: blend toward the amounts just below
    # it, so the model is no more pruned than the target asks
    t_lo, t_hi = 0.0, 1.0
    for _ in range(steps // 2):
        t = (t_lo + t_hi) / 2
        amounts = {g: round(lo_amounts[g] + t * (hi_amounts[g] - lo_amounts[g]), 4) for g in found}
        share = share_at(amounts)
        if share <= target.share:
            t_hi, hi_amounts, hi_share = t, amounts, share
        else:
            t_lo = t
    members = {g: found[g].members for g in found}
    return Allocation(hi_amounts, members, target.metric, hi_share, target.share, "sensitivity", threshold=hi,
                      notes=[f"sensitivity of {len(found)} group(s) at ratios {ratios} on {result['samples']} "
                             f"validation samples ({result['measured_layers']} measured, {result['cached_layers']} "
                             "from the cache)"])


def _global(stage: PruneStage, state: ModelState, ctx: StageContext, selected: list[str],
            found: dict[str, Group], cost: _Cost, target: PruneTarget) -> Allocation:
    steps = LATENCY_STEPS if target.metric == "latency_b1" else BISECTION_STEPS

    def pruned(ratio: float) -> nn.Module:
        return _pruned_copy(stage, state, selected, None, ratio, target.max_amount)

    # Torch-Pruning skips a group that the global threshold would take past max_amount, so the share is not monotone
    # in the global ratio near the top: scan up from zero for the first ratio that meets the target, then bisect
    lo, found_at, best = 0.0, None, 1.0
    for i in range(1, 20):
        ratio = round(min(i * 0.05, target.max_amount), 4)
        model = pruned(ratio)
        share = cost(model)
        best = min(best, share)
        if share <= target.share:
            found_at = (ratio, model, share)
            break
        lo = ratio
        if ratio >= target.max_amount:
            break
    if found_at is None:
        raise _unreachable(ctx, target, best)
    hi, hi_model, hi_share = found_at
    for _ in range(steps // 2):
        mid = (lo + hi) / 2
        model = pruned(mid)
        share = cost(model)
        if share <= target.share:
            hi, hi_model, hi_share = mid, model, share
        else:
            lo = mid
    amounts = {}
    for g, group in found.items():
        after = _out_channels(hi_model.get_submodule(g))
        amounts[g] = round(1 - after / group.channels, 4) if after is not None else 0.0
    return Allocation(amounts, {g: found[g].members for g in found}, target.metric, hi_share, target.share, "global",
                      notes=[f"Torch-Pruning's global ranking at ratio {hi:.4f}"])


def _out_channels(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels)
    return None


def summary(alloc: Allocation) -> str:
    spread = sorted(alloc.amounts.values())
    median = statistics.median(spread) if spread else 0.0
    how = (f"threshold {alloc.threshold:.4f} accuracy drop per group" if alloc.threshold is not None
           else "Torch-Pruning's global ranking")
    return (f"target {alloc.metric} {alloc.target:g}: {alloc.share:.1%} of the {alloc.metric} remains "
            f"({alloc.method}: {how}); amounts {spread[0] if spread else 0:.2f}..{spread[-1] if spread else 0:.2f}, "
            f"median {median:.2f}, over {len(spread)} group(s)")
