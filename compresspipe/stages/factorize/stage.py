"""The factorize stage: truncated SVD and Tucker-2 of the selected layers, recorded as `replace` edits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from compresspipe.artifacts.edits import get_submodule, replace_edit
from compresspipe.artifacts.files import atomic_write_json
from compresspipe.artifacts.io import ModelIO
from compresspipe.artifacts.model import ModelState
from compresspipe.errors import StageConfigError
from compresspipe.metrics.modes import eval_mode, model_device
from compresspipe.models.inputs import forward, zeros
from compresspipe.stages.base import Need, Score, Stage, StagePlan, StageResult
from compresspipe.stages.context import StageContext
from compresspipe.stages.factorize import SENSITIVITY_RATIOS, FactorizeConfig, RankRule
from compresspipe.stages.select import breaks_model, select_layers


def _candidates() -> tuple[type, ...]:
    return (nn.Linear, nn.Conv2d)


def _weight(module: nn.Module) -> torch.Tensor:
    return cast("torch.Tensor", module.weight)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return cast("torch.Tensor | None", module.bias)


def _spatial(conv: nn.Conv2d) -> dict[str, Any]:
    """The k x k part of a conv (kept by the factor that does the spatial work)."""
    return {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
            "dilation": conv.dilation, "padding_mode": conv.padding_mode}


def choose_rank(singular_values: torch.Tensor, rule: RankRule) -> int:
    """Rank the rule asks for, given singular values in descending order (not checked against the layer)."""
    full = int(singular_values.numel())
    if rule.fixed is not None:
        return int(rule.fixed)
    if rule.ratio is not None:
        return max(1, min(full, math.ceil(rule.ratio * full - 1e-9)))
    energy = (singular_values.double() ** 2).cumsum(0)
    total = float(energy[-1]) if full else 0.0
    if total <= 0:
        return 1
    target = float(rule.energy or 1.0) * total * (1 - 1e-12)
    return max(1, min(full, int((energy < target).sum()) + 1))


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD on CPU: float64 where it is cheap, float32 for large matrices (float64 is ~8x slower)."""

    dtype = torch.float64 if max(matrix.shape) <= 512 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.detach().to("cpu", dtype), full_matrices=False)
    return u, s, vh


@dataclass
class LayerPlan:
    """What happens to one selected layer: its factor weights (as float tensors), or why it is skipped."""

    name: str
    kind: str  # Linear | Conv2d
    shape: tuple[int, ...]
    method: str  # svd | tucker2 | -
    rank: int | tuple[int, int] | None
    full_rank: int | tuple[int, int] | None
    params_before: int
    params_after: int
    skipped: str | None = None
    factors: tuple[torch.Tensor, ...] = ()
    rel_error: float | None = None

    @property
    def saving(self) -> float:
        return 1 - self.params_after / max(self.params_before, 1)

    def rank_text(self) -> str | int | None:
        if isinstance(self.rank, tuple):
            return f"in {self.rank[0]} / out {self.rank[1]}"
        return self.rank


def _rank_error(stage: str, name: str, module: nn.Module, asked: int, full: int, mode: str = "") -> Exception:
    what = f"{type(module).__name__} {'x'.join(str(d) for d in _weight(module).shape)}"
    return StageConfigError(
        stage, f"rank {{fixed: {asked}}} does not fit layer {name!r} ({what}): its max rank{mode} is {full}; "
               f"lower the rank, use {{ratio: ...}} or {{energy: ...}}, or exclude the layer"
    )


def plan_layer(name: str, module: nn.Module, cfg: FactorizeConfig, stage: str, shared: bool = False,
               rule: RankRule | None = None) -> LayerPlan:
    """Choose the rank of one layer (by `rule`, default the config's) and compute its factors; decide whether it is
    worth it."""
    rule = rule or cfg.rank

    weight, bias_tensor = _weight(module), _bias(module)
    bias = 0 if bias_tensor is None else int(bias_tensor.numel())
    shape = tuple(int(d) for d in weight.shape)
    before = int(weight.numel()) + bias
    kind = type(module).__name__
    skip = LayerPlan(name, kind, shape, "-", None, None, before, before)
    if type(module) not in (nn.Linear, nn.Conv2d):
        skip.skipped = f"{kind} subclasses {type(module).__mro__[1].__name__}; only plain Linear/Conv2d are factorized"
        return skip
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        skip.skipped = f"grouped convolution (groups={module.groups})"
        return skip
    if shared:
        skip.skipped = "its weight is shared with another module"
        return skip
    if not weight.is_floating_point():
        skip.skipped = f"weight dtype {weight.dtype} is not floating point"
        return skip
    w = weight.detach()
    out_ch, n = shape[0], int(math.prod(shape[1:]))
    kernel = shape[2:]
    if cfg.method == "tucker" and isinstance(module, nn.Conv2d) and math.prod(kernel) > 1:
        in_ch = shape[1]
        u0, s0, _ = _svd(w.reshape(out_ch, -1))
        u1, s1, _ = _svd(w.transpose(0, 1).reshape(in_ch, -1))
        r_out, r_in = choose_rank(s0, rule), choose_rank(s1, rule)
        full = (int(s1.numel()), int(s0.numel()))
        if rule.fixed is not None and r_in > full[0]:
            raise _rank_error(stage, name, module, r_in, full[0], " (input channels)")
        if rule.fixed is not None and r_out > full[1]:
            raise _rank_error(stage, name, module, r_out, full[1], " (output channels)")
        kk = int(math.prod(kernel))
        after = in_ch * r_in + r_in * r_out * kk + r_out * out_ch + bias
        plan = LayerPlan(name, kind, shape, "tucker2", (r_in, r_out), full, before, after)
        if after >= before:
            plan.skipped = f"ranks (in {r_in}, out {r_out}) save nothing: {after - bias} weights vs {before - bias}"
            plan.params_after = before
            return plan
        u_out, u_in = u0[:, :r_out].double(), u1[:, :r_in].double()  # the two SVDs may differ in precision
        core = torch.einsum("oihw,or,is->rshw", w.double().cpu(), u_out, u_in)
        plan.factors = (u_in.T.reshape(r_in, in_ch, 1, 1), core, u_out.reshape(out_ch, r_out, 1, 1))
    else:
        u, s, vh = _svd(w.reshape(out_ch, n))
        full_rank = int(s.numel())
        r = choose_rank(s, rule)
        if r > full_rank:
            raise _rank_error(stage, name, module, r, full_rank)
        after = r * (out_ch + n) + bias
        plan = LayerPlan(name, kind, shape, "svd", r, full_rank, before, after)
        if after >= before:
            plan.skipped = f"rank {r} >= mn/(m+n) = {out_ch * n / (out_ch + n):.1f}: no saving"
            plan.params_after = before
            return plan
        root = s[:r].sqrt()
        first = (root[:, None] * vh[:r]).reshape(r, *shape[1:])
        second = (u[:, :r] * root[None, :]).reshape(out_ch, r, *([1] * len(kernel)))
        plan.factors = (first, second)
    if plan.saving < cfg.min_saving:
        plan.skipped = f"saves {plan.saving:.1%} of its parameters < min_saving {cfg.min_saving:.0%}"
        plan.params_after, plan.factors = before, ()
    return plan


def build_factorized(module: nn.Module, plan: LayerPlan) -> nn.Sequential:
    """The replacement for `module`: plain torch layers holding the plan's factors (and the original bias)."""

    weight, bias = _weight(module), _bias(module)
    layers: list[nn.Module]
    if isinstance(module, nn.Linear):
        r = cast(int, plan.rank)
        layers = [nn.Linear(module.in_features, r, bias=False), nn.Linear(r, module.out_features, bias=bias is not None)]
    elif isinstance(module, nn.Conv2d) and plan.method == "svd":
        r = cast(int, plan.rank)
        layers = [nn.Conv2d(module.in_channels, r, bias=False, **_spatial(module)),
                  nn.Conv2d(r, module.out_channels, 1, bias=bias is not None)]
    elif isinstance(module, nn.Conv2d):
        r_in, r_out = cast("tuple[int, int]", plan.rank)
        layers = [nn.Conv2d(module.in_channels, r_in, 1, bias=False),
                  nn.Conv2d(r_in, r_out, bias=False, **_spatial(module)),
                  nn.Conv2d(r_out, module.out_channels, 1, bias=bias is not None)]
    else:
        raise TypeError(f"cannot factorize a {type(module).__name__}")
    new = nn.Sequential(*layers).to(dtype=weight.dtype)
    with torch.no_grad():
        for layer, factor in zip(layers, plan.factors, strict=True):
            _weight(layer).copy_(factor.to(weight.dtype))
            _weight(layer).requires_grad_(weight.requires_grad)
        last = _bias(layers[-1])
        if bias is not None and last is not None:
            last.copy_(bias.detach().cpu())
            last.requires_grad_(bias.requires_grad)
    return new


def reconstruct(new: nn.Sequential) -> torch.Tensor:
    """The weight the factor layers compute together, in the original layer's shape (float64)."""

    weights = [_weight(m).detach().double().cpu() for m in new]
    if len(weights) == 2:
        first, second = weights
        full = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
        return full.reshape(second.shape[0], *first.shape[1:])
    a, core, b = weights  # 1x1 in->r_in, core, 1x1 r_out->out
    return torch.einsum("rshw,or,si->oihw", core, b[:, :, 0, 0], a[:, :, 0, 0])


def _io_sizes(model: nn.Module, names: list[str], io: ModelIO) -> dict[str, tuple[int, int]] | None:
    """Per layer, for one sample: (input rows or pixels, output rows or pixels), summed over calls; None: cannot run."""

    sizes: dict[str, tuple[int, int]] = {n: (0, 0) for n in names}
    handles = []

    def hook(name: str) -> Any:
        def record(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            x = args[0]
            if isinstance(mod, nn.Linear):
                rows = x.numel() // max(mod.in_features, 1)
                step = (rows, rows)
            else:
                step = (int(math.prod(x.shape[-2:])), int(math.prod(out.shape[-2:])))
            old = sizes[name]
            sizes[name] = (old[0] + step[0], old[1] + step[1])
        return record

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
        x = zeros(io, 1, device=model_device(model))
        with eval_mode(model), torch.no_grad():
            forward(model, x)
    except Exception:  # a model that cannot run on zeros of this shape: MACs are reported as n/a
        return None
    finally:
        for h in handles:
            h.remove()
    return sizes


def layer_macs(plan: LayerPlan, io: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """(before, after) multiply-accumulates of one sample, from the layer shapes and the rows/pixels it sees."""
    if io is None:
        return None, None
    rows_in, rows_out = io
    if plan.kind == "Linear":
        out_f, in_f = plan.shape
        before = rows_out * out_f * in_f
    else:
        out_ch, in_per_group, kh, kw = plan.shape
        before = rows_out * out_ch * in_per_group * kh * kw
    if plan.skipped is not None or plan.rank is None:
        return before, before
    if plan.method == "tucker2":
        r_in, r_out = cast("tuple[int, int]", plan.rank)
        out_ch, in_ch, kh, kw = plan.shape
        return before, rows_in * in_ch * r_in + rows_out * r_in * r_out * kh * kw + rows_out * r_out * out_ch
    r = cast(int, plan.rank)
    out_ch = plan.shape[0]
    n = int(math.prod(plan.shape[1:]))
    return before, rows_out * r * (n + out_ch)


def _keep_runnable(model: nn.Module, plans: list[LayerPlan], state: ModelState) -> None:
    """Skip the layers the model's own code needs as they are (e.g. Hugging Face ViT reads its patch projection's
    `.weight`)."""
    todo = {p.name: p for p in plans if p.skipped is None}
    new: dict[str, nn.Module] = {n: build_factorized(get_submodule(model, n), plan) for n, plan in todo.items()}
    for name, why in breaks_model(model, new, state.spec).items():
        plan = todo[name]
        plan.skipped, plan.params_after, plan.factors = why, plan.params_before, ()


def factorize_model(state: ModelState, cfg: FactorizeConfig, stage: str,
                    ranks: dict[str, float | None] | None = None) -> list[dict[str, Any]]:
    """Factorize the selected layers of `state` in place (recording `replace` edits); one report row per layer.

    `ranks`: a rank ratio per layer instead of the config's rule (None, or a layer left out: the layer stays whole).
    """

    model = state.module
    chosen = select_layers(model, cfg.include, cfg.exclude, _candidates(), stage, allow_empty=True)
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    plans = []
    for n, m in chosen.items():
        if ranks is not None and ranks.get(n) is None:
            weight, bias = _weight(m), _bias(m)
            before = int(weight.numel()) + (0 if bias is None else int(bias.numel()))
            plans.append(LayerPlan(n, type(m).__name__, tuple(int(d) for d in weight.shape), "-", None, None, before,
                                   before, skipped="kept whole: at no rank ratio does the accuracy drop stay within "
                                                   "max_accuracy_drop"))
            continue
        rule = RankRule(ratio=ranks[n]) if ranks is not None else None
        plans.append(plan_layer(n, m, cfg, stage, shared=owners.get(id(_weight(m)), 0) > 1, rule=rule))
    io = _io_sizes(model, list(chosen), state.spec)
    _keep_runnable(model, plans, state)
    rows: list[dict[str, Any]] = []
    for plan in plans:
        macs_before, macs_after = layer_macs(plan, None if io is None else io.get(plan.name))
        if plan.skipped is None:
            original = get_submodule(state.module, plan.name)
            new = build_factorized(original, plan)
            weight = _weight(original).detach().double().cpu()
            norm = float(weight.norm())
            plan.rel_error = float((weight - reconstruct(new)).norm()) / norm if norm > 0 else 0.0
            state.apply(replace_edit(plan.name, new))
            # replay builds fresh layers; the factor weights go in afterwards (on reload they come from safetensors)
            installed = get_submodule(state.module, plan.name).to(_weight(original).device)
            with torch.no_grad():
                installed.load_state_dict(new.state_dict())
            for p_new, p_src in zip(installed.parameters(), new.parameters(), strict=True):
                p_new.requires_grad_(p_src.requires_grad)
            installed.train(original.training)
        rows.append({
            "layer": plan.name, "type": plan.kind, "shape": "x".join(map(str, plan.shape)), "method": plan.method,
            "rank": plan.rank_text(),
            "full rank": (f"in {plan.full_rank[0]} / out {plan.full_rank[1]}" if isinstance(plan.full_rank, tuple)
                          else plan.full_rank),
            "params before": plan.params_before, "params after": plan.params_after,
            "MACs before": macs_before, "MACs after": macs_after,
            "rel. error": None if plan.rel_error is None else round(plan.rel_error, 6),
            "skipped": plan.skipped,
        })
    return rows


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    done = [r for r in rows if r["skipped"] is None]
    if not rows:
        return ["no layer matches include/exclude in this model (its type: selectors name layers it lacks): "
                "the model is unchanged"]
    if not done:
        return [f"no layer factorized: all {len(rows)} selected layer(s) were skipped (see the per-layer table)"]
    before = sum(r["params before"] for r in done)
    after = sum(r["params after"] for r in done)
    note = (f"structural: {len(done)} of {len(rows)} selected layer(s) factorized; their parameters "
            f"{before} -> {after} ({before / max(after, 1):.2f}x fewer)")
    if all(r["MACs before"] is not None for r in done):
        mb, ma = sum(r["MACs before"] for r in done), sum(r["MACs after"] for r in done)
        note += f", MACs {mb} -> {ma} ({mb / max(ma, 1):.2f}x fewer)"
    notes = [note]
    if len(done) < len(rows):
        notes.append(f"{len(rows) - len(done)} layer(s) skipped; the reasons are in the per-layer table")
    return notes


class FactorizeStage(Stage[FactorizeConfig]):
    def needs(self) -> list[Need]:
        finetune = self.config.finetune
        return [Need("train_data", why="finetune")] if finetune is not None and finetune.epochs > 0 else []

    # -- sensitivity, and ranks from an accuracy limit -------------------------------------------------------

    def sensitivity_settings(self, ratios: list[float] | None = None) -> dict[str, Any] | None:
        return {"kind": "low-rank factorization", "setting": "rank / full rank",
                "ratios": sorted(ratios or SENSITIVITY_RATIOS), "method": self.config.method}

    def sensitivity_layers(self, state: ModelState, ctx: StageContext) -> dict[str, dict[str, Any]]:
        cfg = self.config
        chosen = select_layers(state.module, cfg.include, cfg.exclude, _candidates(), ctx.name,
                               allow_empty=True)
        return {n: {"type": type(m).__name__, "shape": "x".join(str(d) for d in _weight(m).shape),
                    "params": sum(p.numel() for p in m.parameters())}
                for n, m in chosen.items() if type(m) in (nn.Linear, nn.Conv2d)
                and not (isinstance(m, nn.Conv2d) and m.groups != 1)}

    def sensitivity(self, state: ModelState, ctx: StageContext, layer: str, settings: dict[str, Any],
                    score: Score) -> list[dict[str, Any]]:
        one = self.config.model_copy(update={"include": [layer], "exclude": [], "min_saving": 0.0})
        points = []
        for ratio in settings["ratios"]:
            copy = state.clone()
            row = factorize_model(copy, one, ctx.name, ranks={layer: ratio})[0]
            if row["skipped"] is not None:
                points.append({"setting": ratio, "accuracy": None, "loss": None, "rank": row["rank"],
                               "skipped": row["skipped"]})
                continue
            acc, loss = score(copy.module)
            points.append({"setting": ratio, "accuracy": acc, "loss": loss, "rank": row["rank"],
                           "params": row["params after"]})
        return points

    def _ranks(self, state: ModelState, ctx: StageContext) -> tuple[dict[str, float | None], list[dict], list[str]]:
        """rank: {max_accuracy_drop}: each layer's smallest rank ratio whose own drop fits, then larger ratios for
        the layers that hurt most until the drop of the whole factorized model (before fine-tuning) fits."""
        from compresspipe.sensitivity.measure import Scorer, measure

        limit = float(self.config.rank.max_accuracy_drop or 0.0)
        settings = self.sensitivity_settings() or {}
        result = measure(self, state, ctx, settings, samples=10**9)
        ratios = list(settings["ratios"])
        curves = {r["layer"]: {p["setting"]: p["drop"] for p in r["points"] if p.get("drop") is not None}
                  for r in result["layers"]}
        ranks: dict[str, float | None] = {
            n: next((r for r in ratios if r in c and c[r] <= limit), None) for n, c in curves.items()}
        scorer = Scorer(ctx, 10**9)
        base, _ = scorer(state.module)
        rows: list[dict[str, Any]] = []
        while True:
            trial = state.clone()
            factorize_model(trial, self.config, ctx.name, ranks=ranks)
            acc, _ = scorer(trial.module)
            rows.append({"ranks": ", ".join(f"{n}: {r}" for n, r in ranks.items() if r is not None) or "(none)",
                         "accuracy": acc, "drop": base - acc, "fits": "yes" if base - acc <= limit + 1e-12 else "no"})
            active = [n for n, r in ranks.items() if r is not None]
            if base - acc <= limit + 1e-12 or not active:
                break
            worst = max(active, key=lambda n: curves[n].get(ranks[n], 1.0))  # type: ignore[arg-type]
            larger = [r for r in ratios if r > ranks[worst] and r in curves[worst]]  # type: ignore[operator]
            ranks[worst] = larger[0] if larger else None
        notes = [f"rank max_accuracy_drop {limit}: {sum(r is not None for r in ranks.values())} of {len(ranks)} "
                 f"layer(s) factorized, drop {rows[-1]['drop']:.4f} before fine-tuning (ranks from each layer's "
                 f"sensitivity at ratios {ratios}, {result['samples']} validation samples)"]
        return ranks, rows, notes

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        new = state.clone()
        ranks: dict[str, float | None] | None = None
        rank_notes: list[str] = []
        if self.config.rank.max_accuracy_drop is not None:  # the run's preflight checks the selection, measures nothing
            ranks, _, rank_notes = self._ranks(state, ctx) if not ctx.preflight else ({}, [], [])
        rows = factorize_model(new, self.config, ctx.name, ranks=ranks)
        layers = {r["layer"]: (r["rank"] if r["skipped"] is None else f"skipped: {r['skipped']}") for r in rows}
        notes = [*rank_notes, *_summary(rows), "fine-tuning is skipped in the plan"]
        if self.config.rank.energy is not None or ranks is not None:
            notes.append("energy ranks depend on the weights: the plan sees them before any training runs")
        return StagePlan(state=new, layers=layers, notes=notes)

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        cfg = self.config
        ranks, allocation, rank_notes = self._ranks(state, ctx) if cfg.rank.max_accuracy_drop is not None \
            else (None, [], [])
        rows = factorize_model(state, cfg, ctx.name, ranks=ranks)
        notes = [*rank_notes, *_summary(rows)]
        if ctx.recalibrate_batchnorm(state.module):
            notes.append("BatchNorm statistics re-estimated on training batches after factorizing")
        history: dict[str, Any] | None = None
        factorized = any(r["skipped"] is None for r in rows)
        if cfg.finetune is not None and cfg.finetune.epochs > 0:
            result = ctx.fit(state.module, cfg.finetune)
            history = {"best_epoch": result.best_epoch, "best_accuracy": result.best_accuracy,
                       "history": result.history}
            notes.append(f"fine-tuned {result.epochs_run} epoch(s), best epoch {result.best_epoch}; "
                         "rel. error is the weight's before fine-tuning")
        atomic_write_json(ctx.stage_dir / "factorization.json", {
            "format": "compresspipe.factorization", "version": 1, "method": cfg.method,
            "rank": cfg.rank.model_dump(exclude_none=True), "min_saving": cfg.min_saving, "layers": rows,
        })
        return StageResult(
            state=state, kind="structural" if factorized else "weights",
            notes=notes,
            details={"method": cfg.method, "rank": cfg.rank.describe(), "finetune": history,
                     "tables": {"per layer": rows, **({"rank search": allocation} if allocation else {})}},
        )
