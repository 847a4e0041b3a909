"""The prune stage: magnitude (mask-only) and structured/random pruning with Torch-Pruning's dependency graph."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as tprune

from compresspipe.artifacts.edits import resize_edit, shape_snapshot
from compresspipe.artifacts.files import atomic_write_json
from compresspipe.artifacts.model import ModelState
from compresspipe.errors import StageConfigError
from compresspipe.metrics.modes import model_device
from compresspipe.metrics.tasks import loss as task_loss
from compresspipe.models.inputs import forward, to_device, zeros
from compresspipe.stages.base import Need, Score, Stage, StageKind, StagePlan, StageResult
from compresspipe.stages.context import StageContext
from compresspipe.stages.prune import (
    MASK_ONLY_NOTE,
    SENSITIVITY_RATIOS,
    PruneConfig,
    PruneFinetune,
    step_amounts,
)
from compresspipe.stages.prune.decoder import Decoder, find_decoder
from compresspipe.stages.select import classifier_head, matches, select_layers
from compresspipe.training.losses import distillation_loss

if TYPE_CHECKING:
    from compresspipe.stages.prune.allocate import Allocation


@dataclass
class PruneSelection:
    """The layers a config resolves to on one model, with the amount requested for each."""

    amounts: dict[str, float]
    head: str | None
    overridden: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Importance:
    """One way of ranking what to prune, serving both paths: a score per weight (magnitude pruning) and a
    Torch-Pruning importance that scores whole channel groups (structured pruning)."""

    weight: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (weight, its gradient) -> score each
    group: Callable[[], Any]  # a Torch-Pruning Importance
    needs_grad: bool = False  # scores read loss gradients from calibration batches


IMPORTANCE: dict[str, Importance] = {
    "l1": Importance(lambda w, g: w.abs(), lambda: tp.importance.GroupMagnitudeImportance(p=1)),
    "l2": Importance(lambda w, g: w.square(), lambda: tp.importance.GroupMagnitudeImportance(p=2)),
    "taylor": Importance(lambda w, g: (w * g).abs() if g is not None else torch.zeros_like(w),
                         tp.importance.GroupTaylorImportance, needs_grad=True),
    "random": Importance(lambda w, g: torch.rand(w.shape), tp.importance.RandomImportance),
}


def _candidates() -> tuple[type, ...]:
    return (nn.modules.conv._ConvNd, nn.Linear)


def resolve_selection(cfg: PruneConfig, model: nn.Module, stage: str) -> PruneSelection:
    """Apply include/exclude/head protection and per-layer overrides; errors name the selector at fault."""

    head = classifier_head(model)
    structural = cfg.method != "magnitude"
    if head is not None and (cfg.protect_head or structural):
        named_head = [p for p in cfg.include if p == head]
        if named_head and structural:
            raise StageConfigError(stage, f"cannot prune the outputs of the classifier head {head!r}: they are the "
                                          "classes; structured pruning shrinks its inputs when the layer before shrinks")
        if named_head:
            raise StageConfigError(stage, f"include names the classifier head {head!r}, which is protected; "
                                          "set protect_head: false to prune its weights")
    exclude = list(cfg.exclude)
    if head is not None and (cfg.protect_head or structural):
        exclude.append(head)
    chosen = select_layers(model, cfg.include, exclude, _candidates(), stage)
    amounts: dict[str, float] = {}
    overridden: set[str] = set()
    for pattern in cfg.per_layer:
        if not any(matches(n, m, pattern) for n, m in chosen.items()):
            raise StageConfigError(stage, f"per_layer selector {pattern!r} matches no selected layer; selected: "
                                          + ", ".join(list(chosen)[:12]) + (" ..." if len(chosen) > 12 else ""))
    for name, module in chosen.items():
        amounts[name] = cfg.amount if cfg.amount is not None else 0.0  # a target's amounts are allocated later
        for pattern, value in cfg.per_layer.items():
            if matches(name, module, pattern):
                amounts[name] = value
                overridden.add(name)
                break
    return PruneSelection(amounts, head, overridden)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, _candidates())}  # type: ignore[attr-defined]


def calibration_grads(model: nn.Module, ctx: StageContext, batches: int) -> None:
    """Accumulate loss gradients over a few calibration batches (taylor importance reads .grad)."""

    device = model_device(model)
    model.eval()  # batch-norm statistics stay as they are
    model.zero_grad(set_to_none=True)
    for x, y in ctx.batches("calibration", batches):
        task_loss(ctx.task, forward(model, to_device(x, device)), y.to(device)).backward()


def _kd_loss(teacher: nn.Module, settings: PruneFinetune, task: str) -> Any:
    """Hinton's distillation loss (the distill stage's): T^2-scaled KL to the teacher plus the task loss."""

    def loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = forward(teacher, x)
        return distillation_loss(forward(model, x), soft, y, settings.temperature, settings.alpha,
                                 label_smoothing=settings.label_smoothing, task=task)

    return loss


def _border_layers(scope: nn.Module, example: Any) -> list[nn.Module]:
    """Layers of a submodule whose output channels cannot change on their own: they reach its outputs, or their
    pruning would also cut the channels of its inputs (a depthwise conv reading the input directly)."""
    graph = tp.DependencyGraph().build_dependency(scope, example_inputs=example)
    first = {node.module for node in graph.module2node.values() if not node.inputs}
    # nodes nothing reads: what they write is the part's output (Torch-Pruning adds no output op when a module,
    # a plain Sequential's last conv or ReLU, writes it)
    last = {node.module for node in graph.module2node.values() if not node.outputs}
    border: list[nn.Module] = []
    for group in graph.get_all_groups(root_module_types=_candidates()):
        touches = _feeds_output(group) or any(
            dep.target.module in last and (graph.is_out_channel_pruning_fn(dep.handler)
                                           or not isinstance(dep.target.module, _candidates())) for dep, _ in group) or any(
            dep.target.module in first and graph.is_in_channel_pruning_fn(dep.handler) for dep, _ in group)
        if touches:
            border += [cast(nn.Module, dep.target.module) for dep, _ in group
                       if isinstance(dep.target.module, _candidates()) and graph.is_out_channel_pruning_fn(dep.handler)]
    return border


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


# attention modules: (names of the q, k, v Linear children, or of one fused qkv Linear), head-count attribute
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("qkv",))
_HEAD_COUNT = ("num_attention_heads", "num_heads", "n_heads")
_WIDTH_ATTRS = ("all_head_size", "attn_dim")  # attention width = heads x head size, kept in step with the heads


@dataclass
class _Attention:
    """One multi-head attention module: its projections (whose outputs are heads) and its head count."""

    module: nn.Module
    projections: list[nn.Linear]
    count: str  # attribute holding the number of heads

    def update(self, heads: int) -> None:
        """After Torch-Pruning removed heads: the module's own head count and attention width follow."""
        setattr(self.module, self.count, heads)
        width = self.projections[0].out_features // (3 if len(self.projections) == 1 else 1)
        for attr in _WIDTH_ATTRS:
            if isinstance(getattr(self.module, attr, None), int):
                setattr(self.module, attr, width)


def attention_modules(model: nn.Module) -> list[_Attention]:
    """The multi-head attention modules Torch-Pruning can prune by whole heads: Hugging Face BERT-style and ViT
    self-attention (query/key/value or q_proj/k_proj/v_proj), timm's Attention (one fused qkv)."""
    found = []
    for module in model.modules():
        count = next((a for a in _HEAD_COUNT if type(getattr(module, a, None)) is int), None)
        if count is None:
            continue
        for names in _QKV_NAMES:
            layers = [getattr(module, n, None) for n in names]
            if all(type(layer) is nn.Linear for layer in layers):
                found.append(_Attention(module, layers, count))  # type: ignore[arg-type]
                break
    return found


def residual_layers(model: nn.Module, example: Any, names: list[str], where: list[str] | None = None) -> list[str]:
    """Of `names`, the layers whose output channels are the residual stream: pruning them would prune the width
    every block shares (tied to a LayerNorm or an embedding in the dependency graph). `where` collects the layer
    being analysed (for a time bound's message)."""
    if not any(isinstance(m, nn.LayerNorm | nn.Embedding) for m in model.modules()):
        return []
    where = where if where is not None else []
    where.append("the trace of the whole model")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    out = []
    for name in names:
        where.append(name)
        module = model.get_submodule(name)
        fn = graph.get_pruner_of_module(module)
        if module not in graph.module2node or fn is None:
            continue
        group = graph.get_pruning_group(module, fn.prune_out_channels, [0])
        if any(isinstance(dep.target.module, nn.LayerNorm | nn.Embedding) for dep, _ in group):
            out.append(name)
    return out


GRAPH_SECONDS = 120.0  # Torch-Pruning's dependency analysis of one model, at most


class _GraphTimeout(BaseException):
    """Raised by the alarm inside Torch-Pruning (a BaseException, so its own `except Exception` cannot swallow it)."""


@contextlib.contextmanager
def graph_time_bound(ctx: StageContext, layers: int, where: list[str]) -> Iterator[None]:
    """Torch-Pruning's dependency analysis with a progress line and a time bound (GRAPH_SECONDS): past it, a
    StageConfigError naming the layer it was on. The bound needs the main thread (signals); elsewhere the analysis
    runs unbounded, with the same line."""
    ui = getattr(ctx, "ui", None)  # absent where a caller drives the stage without a run (tests, tools)
    log = ui.log if ui is not None else (lambda _message: None)
    log(f"{ctx.name}: Torch-Pruning traces the model and groups the channels of {layers} layer(s) "
        f"(at most {GRAPH_SECONDS:.0f} s)")
    start = time.monotonic()
    bounded = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def alarm(_signum: int, _frame: Any) -> None:
        raise _GraphTimeout

    old = signal.signal(signal.SIGALRM, alarm) if bounded else None
    if bounded:
        signal.setitimer(signal.ITIMER_REAL, GRAPH_SECONDS)
    try:
        yield
    except _GraphTimeout:
        at = f" (at {where[-1]})" if where else ""
        raise StageConfigError(ctx.name, f"Torch-Pruning's dependency analysis did not finish within "
                                         f"{GRAPH_SECONDS:.0f} s{at}: structured pruning cannot handle this model in "
                                         "bounded time; exclude that layer, or use method: magnitude") from None
    finally:
        if bounded:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    log(f"{ctx.name}: dependency analysis done in {time.monotonic() - start:.1f} s")


def _feeds_output(group: Any) -> bool:
    return any(isinstance(dep.target.module, tp.ops._OutputOp) for dep, _ in group)


class PruneStage(Stage[PruneConfig]):
    def needs(self) -> list[Need]:
        cfg, out = self.config, []
        if cfg.importance == "taylor" and cfg.method != "random":
            out.append(Need("calibration_data", why="importance: taylor"))
        elif cfg.blocks and cfg.method != "random":
            out.append(Need("calibration_data", why="blocks"))
        if cfg.finetune is not None and cfg.finetune.epochs > 0:
            out.append(Need("train_data", why="finetune"))
            if cfg.finetune.distill is not None:
                out.append(Need("teacher", teacher=cfg.finetune.distill, why="finetune.distill"))
        return out

    # -- shared ----------------------------------------------------------------------------------

    def _finetune(self, model: nn.Module, ctx: StageContext, step: int) -> dict[str, Any] | None:
        ft = self.config.finetune
        if ft is None or ft.epochs == 0:
            return None
        loss_fn = None
        if ft.distill is not None:
            teacher = ctx.load_stage(ft.distill).module.to(ctx.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            loss_fn = _kd_loss(teacher, ft, ctx.task)
        label = f"{ctx.name} step {step}/{self.config.steps}" if self.config.steps > 1 else ctx.name
        result = ctx.fit(model, ft, loss_fn=loss_fn, label=label)
        return {"step": step, "best_epoch": result.best_epoch, "best_accuracy": result.best_accuracy,
                "history": result.history}

    def _write_resolved(self, ctx: StageContext, sel: PruneSelection, schedule: list[float],
                        rows: list[dict[str, Any]], alloc: Allocation | None = None) -> None:
        cfg = self.config
        atomic_write_json(ctx.stage_dir / "pruning.json", {
            "target": None if alloc is None else alloc.to_json(),
            "format": "compresspipe.pruning", "version": 1, "method": cfg.method, "scope": cfg.scope,
            "importance": "random" if cfg.method == "random" else cfg.importance, "steps": cfg.steps,
            "schedule": schedule, "protected_head": sel.head if (cfg.protect_head or cfg.method != "magnitude") else None,
            "layers": {n: {"amount": a, "override": n in sel.overridden} for n, a in sel.amounts.items()},
            "result": rows,
        })

    def _allocate(self, state: ModelState, ctx: StageContext, sel: PruneSelection) -> Allocation | None:
        """A target's per-group amounts, written into the selection (group roots rank their channels)."""
        if self.config.target is None:
            return None
        from compresspipe.stages.prune.allocate import allocate, target_groups

        if ctx.preflight:  # the run's check before anything runs: the graph, not the (measured) allocation
            target_groups(state, ctx, list(sel.amounts))
            return None

        alloc = allocate(self, state, ctx, sel)
        for root, amount in alloc.amounts.items():
            for member in alloc.members.get(root, [root]):
                if member in sel.amounts:
                    sel.amounts[member] = amount
            if amount > 0:
                sel.overridden.add(root)
        return alloc

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        cfg = self.config
        dec = self._decoder_model(state, ctx)
        if dec is not None:
            new = state.clone()
            rows, _, notes, amounts = self._decoder(new, ctx, dec, finetune=False)
            return StagePlan(state=new, layers=amounts,
                             notes=[f"shapes after {cfg.steps} pruning step(s); fine-tuning is skipped in the plan",
                                    *notes])
        sel = resolve_selection(cfg, state.module, ctx.name)
        if cfg.method == "magnitude":
            return StagePlan(layers=dict(sel.amounts), notes=[MASK_ONLY_NOTE])
        alloc = self._allocate(state, ctx, sel)
        new = state.clone()
        notes = [f"shapes after {cfg.steps} pruning step(s); fine-tuning is skipped in the plan"]
        if alloc is not None:
            from compresspipe.stages.prune.allocate import summary

            notes = [summary(alloc), *alloc.notes, "allocated on the weights the plan sees (before any training "
                     "the recipe does)", *notes]
        self._structured(new, ctx, sel, finetune=False, notes=notes)
        notes += sel.notes
        return StagePlan(state=new, layers=dict(sel.amounts), notes=notes)

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        cfg = self.config
        dec = self._decoder_model(state, ctx)
        if dec is not None:
            return self._run_decoder(state, ctx, dec)
        sel = resolve_selection(cfg, state.module, ctx.name)
        alloc = self._allocate(state, ctx, sel) if cfg.method != "magnitude" else None
        final = cfg.amount if cfg.amount is not None else max(sel.amounts.values(), default=0.0)
        schedule = step_amounts(final, cfg.steps, cfg.schedule)
        if cfg.method == "magnitude":
            rows, history = self._magnitude(state, ctx, sel)
            kind: StageKind = "mask-only"
            zeroed = sum(int((_weights(state.module)[n] == 0).sum()) for n in sel.amounts)
            total = sum(_weights(state.module)[n].numel() for n in sel.amounts)
            notes = [MASK_ONLY_NOTE, f"{100 * zeroed / max(total, 1):.1f}% of the selected layers' weights are zero"]
        else:
            params_before = sum(p.numel() for p in state.module.parameters())
            found: list[str] = []
            rows, history = self._structured(state, ctx, sel, finetune=True, notes=found)
            params_after = sum(p.numel() for p in state.module.parameters())
            kind = "structural"
            notes = [f"structural: {len(sel.amounts)} layer(s) selected; parameters {params_before} -> {params_after}"
                     f" ({params_before / max(params_after, 1):.2f}x fewer)", *found, *sel.notes]
            heads = [(a, a.module) for a in attention_modules(state.module)]
            if heads:
                counts = [int(getattr(m, a.count)) for a, m in heads]
                notes.append(f"attention heads per layer now {counts}")
        if cfg.steps > 1 and (cfg.finetune is None or cfg.finetune.epochs == 0):
            notes.append(f"{cfg.steps} steps without fine-tuning between them; add finetune: to recover accuracy")
        details: dict[str, Any] = {"method": cfg.method, "schedule": schedule, "finetune": history,
                                   "tables": {"per layer": rows}}
        if alloc is not None:
            from compresspipe.stages.prune.allocate import summary

            notes = [summary(alloc), *alloc.notes, *notes]
            details["allocation"] = alloc.to_json()
            details["tables"]["allocation"] = [
                {"group": g, "amount": a, "layers": ", ".join(alloc.members.get(g, [g]))}
                for g, a in alloc.amounts.items()]
        self._write_resolved(ctx, sel, schedule, rows, alloc)
        return StageResult(state=state, kind=kind, notes=notes, details=details)

    # -- decoder LMs: heads, MLP width and blocks by the blocks' known structure ----------------------

    def _decoder_model(self, state: ModelState, ctx: StageContext) -> Decoder | None:
        """The decoder blocks when structured pruning meets a Hugging Face causal LM; refuses what its config cannot
        state (blocks differing from each other) and `blocks` on any other model."""
        cfg = self.config
        if cfg.method == "magnitude":
            return None
        dec = find_decoder(state.module, ctx.name)
        if dec is None:
            if cfg.blocks:
                raise StageConfigError(ctx.name, "blocks: removes whole blocks of decoder LMs (Llama/Mistral/Qwen2, "
                                                 "GPT-2); this model is none")
            return None
        unsupported = [what for what, given in (("per_layer", cfg.per_layer), ("target", cfg.target),
                                                ("scope: global", cfg.scope == "global"), ("hidden: true", cfg.hidden))
                       if given]
        if unsupported:
            raise StageConfigError(ctx.name, f"{', '.join(unsupported)}: not available for decoder LMs: their Hugging "
                                             "Face config holds one head count and one MLP width for every block, so "
                                             "every block is pruned alike; give amount (MLP width), heads and blocks")
        return dec

    def _decoder_units(self, model: nn.Module, dec: Decoder, stage: str) -> tuple[bool, bool]:
        """Whether include/exclude select the attention and the MLP of the blocks: of every block or of none."""
        cfg = self.config
        first = dec.blocks[0]
        kinds = (type(model.get_submodule(first.attention)), type(model.get_submodule(first.mlp)))
        chosen = select_layers(model, cfg.include, cfg.exclude, kinds, stage, allow_empty=True)
        out = []
        for what, names in (("attention", [b.attention for b in dec.blocks]), ("MLP", [b.mlp for b in dec.blocks])):
            picked = [n for n in names if n in chosen]
            if 0 < len(picked) < len(names):
                raise StageConfigError(stage, f"include/exclude select the {what} of {len(picked)} of {len(names)} "
                                              f"decoder blocks ({', '.join(picked[:3])}); a Hugging Face config holds "
                                              "one size for every block: select all of them or none")
            out.append(bool(picked))
        if not any(out) and not cfg.blocks:
            raise StageConfigError(stage, f"include {cfg.include} / exclude {cfg.exclude} select no attention or MLP "
                                          f"of the decoder blocks ({first.attention}, {first.mlp}, ...)")
        return out[0], out[1]

    def _decoder(self, state: ModelState, ctx: StageContext, dec: Decoder, finetune: bool
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], dict[str, float]]:
        """Prune a decoder LM in `steps` steps: rows, fine-tuning history, notes and the amount per unit."""
        from compresspipe.artifacts.edits import resize_edit, shape_snapshot
        from compresspipe.stages.prune import decoder as d

        cfg, model = self.config, state.module
        attention, mlp = self._decoder_units(model, dec, ctx.name)
        head_amount = ((cfg.amount or 0.0) if cfg.heads is None else cfg.heads) if attention else 0.0
        mlp_amount = (cfg.amount or 0.0) if mlp else 0.0
        block_amount = cfg.blocks or 0.0
        scorer = self.importance().weight
        device = model_device(model)
        alive = list(range(len(dec.blocks)))  # original index of each block still there
        history: list[dict[str, Any]] = []
        notes: list[str] = []
        sizes = d.Sizes(dec.heads, dec.kv_heads, dec.intermediate, alive)
        for step in range(1, cfg.steps + 1):
            heads_now, mlp_now, blocks_now = (step_amounts(a, cfg.steps, cfg.schedule)[step]
                                              for a in (head_amount, mlp_amount, block_amount))
            sizes, found = d.target_sizes(dec, heads_now, mlp_now, blocks_now, cfg.kv_groups, cfg.round_to)
            notes += [n for n in found if n not in notes]
            now = find_decoder(model, ctx.name)
            assert now is not None  # noqa: S101 - pruning keeps it a decoder
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed + step)
                keep = list(range(len(now.blocks)))
                if len(sizes.keep_blocks) < len(keep):
                    if cfg.method == "random":
                        influence = torch.rand(len(keep)).tolist()
                    else:
                        batches = (to_device(x, device) for x, _ in ctx.batches("calibration", cfg.calibration_batches))
                        influence = d.block_influence(model, now, batches, functools.partial(forward, model))
                    ranked = sorted(keep, key=lambda i: (-influence[i], i))
                    keep = sorted(ranked[:len(sizes.keep_blocks)])
                sizes.keep_blocks = keep
                state.apply(d.decoder_edit(dec, sizes))
                model = state.module
                alive = [alive[i] for i in keep]
                now = find_decoder(model, ctx.name)
                assert now is not None  # noqa: S101
                if cfg.method != "random" and cfg.importance == "taylor":
                    calibration_grads(model, ctx, cfg.calibration_batches)
                before = shape_snapshot(model)
                for block in now.blocks:
                    d.prune_attention(now, model.get_submodule(block.attention), sizes, scorer)
                    d.prune_mlp(now, model.get_submodule(block.mlp), sizes.intermediate, scorer)
                state.record(resize_edit(before, model))
            model.zero_grad(set_to_none=True)
            model.eval()
            if finetune:
                record = self._finetune(model, ctx, step)
                if record is not None:
                    history.append(record)
        final = find_decoder(model, ctx.name)
        assert final is not None  # noqa: S101
        group = "whole key/value groups" if cfg.kv_groups == "whole" and dec.kv_heads > 1 else "query heads per group"
        kv = ("multi-head attention" if dec.kv_heads == dec.heads
              else f"key/value heads {dec.kv_heads} -> {final.kv_heads}; {group}")
        removed = [dec.blocks[i].name for i in range(len(dec.blocks)) if i not in alive]
        notes.insert(0, f"decoder LM ({dec.family} blocks, by their structure): attention heads {dec.heads} -> "
                        f"{final.heads} per block ({kv}), MLP "
                        f"width {dec.intermediate} -> {final.intermediate}, blocks {len(dec.blocks)} -> "
                        f"{len(final.blocks)}" + (f" (removed {', '.join(removed)})" if removed else ""))
        notes.append(f"attention heads per layer now {[final.heads] * len(final.blocks)}")
        if dec.family == "gpt2" and final.heads != dec.heads:
            notes.append("GPT-2's config cannot state fewer heads (its head size is n_embd / n_head): the artifact "
                         "reloads (its edits say so), but a Hugging Face folder of this model would not")
        rows: list[dict[str, Any]] = []
        for new_index, old_index in enumerate(alive):
            block = final.blocks[new_index]
            rows.append({"layer": block.attention, "unit": "attention", "block before": old_index,
                         "before": f"{dec.heads} heads / {dec.kv_heads} kv", "requested": head_amount,
                         "after": f"{final.heads} heads / {final.kv_heads} kv"})
            rows.append({"layer": block.mlp, "unit": "mlp", "block before": old_index, "before": dec.intermediate,
                         "requested": mlp_amount, "after": final.intermediate})
        for name in removed:
            rows.append({"layer": name, "unit": "block", "block before": int(name.rsplit(".", 1)[1]),
                         "before": "kept", "requested": block_amount, "after": "removed"})
        amounts = {b.attention: head_amount for b in dec.blocks} | {b.mlp: mlp_amount for b in dec.blocks}
        if block_amount:
            amounts[dec.layers] = block_amount
        return rows, history, notes, amounts

    def _run_decoder(self, state: ModelState, ctx: StageContext, dec: Decoder) -> StageResult:
        cfg = self.config
        params_before = sum(p.numel() for p in state.module.parameters())
        rows, history, found, amounts = self._decoder(state, ctx, dec, finetune=True)
        params_after = sum(p.numel() for p in state.module.parameters())
        notes = [f"structural: parameters {params_before} -> {params_after} "
                 f"({params_before / max(params_after, 1):.2f}x fewer)", *found]
        if cfg.steps > 1 and (cfg.finetune is None or cfg.finetune.epochs == 0):
            notes.append(f"{cfg.steps} steps without fine-tuning between them; add finetune: to recover accuracy")
        final = cfg.amount or 0.0
        schedule = step_amounts(final, cfg.steps, cfg.schedule)
        self._write_resolved(ctx, PruneSelection(amounts, None), schedule, rows)
        details: dict[str, Any] = {"method": cfg.method, "schedule": schedule, "finetune": history,
                                   "tables": {"per layer": rows}}
        return StageResult(state=state, kind="structural", notes=notes, details=details)

    # -- sensitivity: one group pruned alone at several ratios -------------------------------------

    def sensitivity_settings(self, ratios: list[float] | None = None) -> dict[str, Any] | None:
        cfg = self.config
        if cfg.method == "magnitude":
            return None  # zeroed weights change no size or speed: the sensitivity of structured pruning is what helps
        return {"kind": "structured pruning", "setting": "ratio of channels removed",
                "ratios": sorted(ratios or (cfg.target.ratios if cfg.target else SENSITIVITY_RATIOS)),
                "method": cfg.method, "importance": "random" if cfg.method == "random" else cfg.importance,
                "round_to": cfg.round_to, "calibration_batches": cfg.calibration_batches}

    def sensitivity_layers(self, state: ModelState, ctx: StageContext) -> dict[str, dict[str, Any]]:
        from compresspipe.stages.prune.allocate import example_input, groups

        if self._decoder_model(state, ctx) is not None:
            raise StageConfigError(ctx.name, "per-layer sensitivity of decoder LMs is not available yet: every block "
                                             "is pruned alike (heads, MLP width, blocks)")
        sel = resolve_selection(self.config, state.module, ctx.name)
        found = groups(state.module, example_input(state), list(sel.amounts))
        return {g.root: {"type": type(state.module.get_submodule(g.root)).__name__, "channels": g.channels,
                         "coupled": [m for m in g.members if m != g.root]} for g in found.values()}

    def sensitivity(self, state: ModelState, ctx: StageContext, layer: str, settings: dict[str, Any],
                    score: Score) -> list[dict[str, Any]]:
        from compresspipe.stages.prune.allocate import group_curve

        return group_curve(self, state, ctx, layer, list(settings["ratios"]), score)

    # -- magnitude: unstructured, masks folded into the weights ------------------------------------

    def importance(self) -> Importance:
        return IMPORTANCE["random" if self.config.method == "random" else self.config.importance]

    def _scores(self, model: nn.Module, ctx: StageContext, names: list[str]) -> dict[str, torch.Tensor]:
        weights, importance = _weights(model), self.importance()
        if importance.needs_grad:
            calibration_grads(model, ctx, self.config.calibration_batches)
        scores = {}
        for n in names:
            w = weights[n]
            scores[n] = importance.weight(w.detach(), None if w.grad is None else w.grad.detach()).flatten()
            scores[n][w.detach().flatten() == 0] = -1.0  # weights already zeroed stay pruned
        model.zero_grad(set_to_none=True)
        return scores

    def _masks(self, scores: dict[str, torch.Tensor], targets: dict[str, float], pooled: list[str],
               pooled_amount: float) -> dict[str, torch.Tensor]:
        """Keep-masks: the smallest scores go, per layer, or across `pooled` layers ranked together."""

        masks: dict[str, torch.Tensor] = {}

        def drop(flat: torch.Tensor, k: int) -> torch.Tensor:
            keep = torch.ones_like(flat, dtype=torch.bool)
            if k > 0:
                keep[torch.argsort(flat, stable=True)[:k]] = False
            return keep

        for n, s in scores.items():
            if n not in pooled:
                masks[n] = drop(s, round(targets[n] * s.numel()))
        if pooled:
            flat = torch.cat([scores[n] for n in pooled])
            keep = drop(flat, round(pooled_amount * flat.numel()))
            offset = 0
            for n in pooled:
                masks[n] = keep[offset:offset + scores[n].numel()]
                offset += scores[n].numel()
        return masks

    def _magnitude(self, state: ModelState, ctx: StageContext, sel: PruneSelection) -> tuple[list[dict], list[dict]]:
        cfg, model = self.config, state.module
        names = list(sel.amounts)
        modules = dict(model.named_modules())
        history: list[dict[str, Any]] = []
        pooled = [n for n in names if n not in sel.overridden] if cfg.scope == "global" else []
        for step in range(1, cfg.steps + 1):
            targets = {n: step_amounts(a, cfg.steps, cfg.schedule)[step] for n, a in sel.amounts.items()}
            pooled_amount = step_amounts(cfg.amount or 0.0, cfg.steps, cfg.schedule)[step]
            masks = self._masks(self._scores(model, ctx, names), targets, pooled, pooled_amount)
            with torch.no_grad():
                for n in names:
                    w = modules[n].weight
                    w.mul_(masks[n].view(w.shape).to(w.dtype))
            if cfg.finetune is not None and cfg.finetune.epochs > 0:
                # Masks as reparametrisation while training, so pruned weights stay zero; folded right after.
                for n in names:
                    w = modules[n].weight
                    tprune.custom_from_mask(modules[n], "weight", masks[n].view(w.shape).to(w.dtype))
                record = self._finetune(model, ctx, step)
                for n in names:
                    tprune.remove(modules[n], "weight")
                if record is not None:
                    history.append(record)
        rows = []
        for n in names:
            w = modules[n].weight
            rows.append({"layer": n, "shape": _shape(w), "requested": sel.amounts[n],
                         "removed": round(float((w == 0).sum()) / max(w.numel(), 1), 4)})
        return rows, history

    # -- structured / random: Torch-Pruning's dependency graph --------------------------------------

    def _metapruner(self, scope: nn.Module, example: Any, sel: PruneSelection, prefix: str,
                    attention: list[_Attention] | None = None, importance: Importance | None = None) -> Any:
        """Torch-Pruning's pruner for `scope` (the model, or one submodule named `prefix`, whose inputs and outputs
        must keep their channels: the rest of the model reads and writes them). Attention modules whose q, k, v
        projections are all selected lose whole heads (`heads`, default `amount`)."""
        cfg = self.config
        names = {m: _join(prefix, n) for n, m in scope.named_modules()}
        ignored = [m for n, m in scope.named_modules()
                   if isinstance(m, _candidates()) and _join(prefix, n) not in sel.amounts]
        if prefix:
            ignored += [m for m in _border_layers(scope, example) if m not in ignored]
        ratio_dict = {scope.get_submodule(n[len(prefix) + 1:] if prefix else n): a for n, a in sel.amounts.items()
                      if n in sel.overridden and (not prefix or n.startswith(prefix + "."))}
        chosen = [a for a in attention or [] if all(names.get(p) in sel.amounts for p in a.projections)]
        heads = {p: int(getattr(a.module, a.count)) for a in chosen for p in a.projections}
        head_amount = (cfg.amount or 0.0) if cfg.heads is None else cfg.heads
        return tp.pruner.MetaPruner(
            scope, example, importance=(importance or self.importance()).group(), global_pruning=cfg.scope == "global",
            pruning_ratio=cfg.amount or 0.0, pruning_ratio_dict=ratio_dict or None, ignored_layers=ignored,
            iterative_steps=cfg.steps, round_to=cfg.round_to,
            iterative_pruning_ratio_scheduler=lambda r, s: step_amounts(r, s, cfg.schedule),
            num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=not heads,
            head_pruning_ratio=head_amount if heads else 0.0,
        )

    def _pruners(self, model: nn.Module, example: Any, sel: PruneSelection, stage: str,
                 notes: list[str], attention: list[_Attention] | None = None) -> list[Any]:
        """One pruner over the whole model; where Torch-Pruning cannot trace it (a channel shuffle, say), one
        per submodule it can trace, pruning channels inside each (what crosses its border stays; no whole
        heads), with the parts it skips named in `notes`. Only when nothing at all can be pruned is it an error."""
        try:
            pruner = self._metapruner(model, example, sel, "", attention)
        except Exception as exc:  # the tracer meets an op it cannot follow
            return self._part_by_part(model, example, sel, stage, notes, f"{type(exc).__name__}: {str(exc)[:120]}")
        stuck = self._stuck(pruner, model, sel)
        outputs = [n for n in stuck if self._why_stuck(pruner, model, n, sel).endswith("the model's output")]
        if outputs and self.config.protect_head:  # like the classifier head: whatever its type, keep it
            for n in outputs:
                sel.amounts.pop(n)
            notes.append(f"kept {', '.join(outputs)} whole: its output channels are the model's output "
                         "(protect_head)")
            pruner = self._metapruner(model, example, sel, "", attention)
            stuck = self._stuck(pruner, model, sel)
        if stuck:
            raise StageConfigError(stage, "; ".join(self._why_stuck(pruner, model, n, sel) for n in stuck[:5])
                                   + ". Exclude these layers, or select the layers they are tied to as well")
        return [pruner]

    def _part_by_part(self, model: nn.Module, example: Any, sel: PruneSelection, stage: str, notes: list[str],
                      why: str) -> list[Any]:
        """Pruners for the parts that prune cleanly on their own, when the whole model cannot be pruned at once."""
        pruners, skipped = self._submodule_pruners(model, example, sel, why)
        if not pruners:
            raise StageConfigError(stage, f"Torch-Pruning cannot prune this model, nor any part of it on its own "
                                          f"({why}); structured pruning is not available for it, use method: "
                                          "magnitude") from None
        notes.append(f"Torch-Pruning cannot prune the whole model at once ({why}): pruned inside "
                     f"{len(pruners)} part(s) that prune cleanly on their own, channels crossing their borders kept"
                     + (f"; skipped: {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}"
                        if skipped else ""))
        return [p for _, p in pruners]

    def _breaks_whole(self, model: nn.Module, example: Any, sel: PruneSelection) -> str | None:
        """Prune a copy of the whole model, every step, and run it: what breaks its forward (a module that splits
        its input by channel counts it keeps as plain numbers, as timm's MixedConv2d does: Torch-Pruning changes the
        split it traced, not the numbers the module splits by), else None. Channels are ranked by magnitude here:
        only the shapes matter, and a gradient ranking would need calibration batches."""
        trial = copy.deepcopy(model).eval()
        attention = attention_modules(trial)
        try:
            pruner = self._metapruner(trial, example, sel, "", attention, importance=IMPORTANCE["l1"])
            with torch.random.fork_rng(devices=[]):
                for _ in range(self.config.steps):
                    pruner.step()
                    for att in attention:
                        if att.projections[0] in pruner.num_heads:
                            att.update(int(pruner.num_heads[att.projections[0]]))
            trial.eval()
            with torch.no_grad():
                forward(trial, example)
        except Exception as exc:  # whatever the pruned model raises is the reason it cannot be pruned whole
            return f"{type(exc).__name__}: {str(exc)[:160]}"
        finally:
            del trial
        return None

    def _stuck(self, pruner: Any, model: nn.Module, sel: PruneSelection) -> list[str]:
        """Selected layers whose output channels Torch-Pruning will not remove."""
        names = {m: n for n, m in model.named_modules()}
        prunable: set[str] = set()
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            if _feeds_output(group):
                continue  # Torch-Pruning keeps these channels: they are the model's output
            for dep, _ in group:
                if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
                    prunable.add(names[dep.target.module])
        return [n for n, a in sel.amounts.items() if a > 0 and n not in prunable]

    def _prunes_cleanly(self, module: nn.Module, args: tuple, sel: PruneSelection, name: str) -> bool:
        """Whether pruning this part on its own, all steps, leaves a part that still takes its inputs and gives
        outputs of the same shapes (tried on a copy: a tracer that misses a coupling must not break the model)."""
        inside = PruneSelection({k[len(name) + 1:]: v for k, v in sel.amounts.items() if k.startswith(name + ".")}, None)
        trial = copy.deepcopy(module).eval()
        example = args if len(args) > 1 else args[0]
        try:
            with torch.no_grad():
                before = trial(*args)
            pruner = self._metapruner(trial, example, sel, name)
            if len(self._stuck(pruner, trial, inside)) >= len(inside.amounts):
                return False  # nothing in it can be pruned
            with torch.random.fork_rng(devices=[]):
                for _ in range(self.config.steps):
                    pruner.step()
            with torch.no_grad():
                after = trial(*args)
        except Exception:  # it does not trace, or pruning broke it: its children may do better
            return False
        shapes = [tuple(t.shape) for t in (before if isinstance(before, tuple | list) else [before])]
        return shapes == [tuple(t.shape) for t in (after if isinstance(after, tuple | list) else [after])]

    def _submodule_pruners(self, model: nn.Module, example: Any, sel: PruneSelection,
                           why: str) -> tuple[list[tuple[str, Any]], list[str]]:
        """Pruners for the largest submodules Torch-Pruning can trace on their own (their inputs captured from
        one forward pass); returns them and the names of selected parts that could not be traced."""
        inputs: dict[str, tuple] = {}
        hooks = []
        for name, module in model.named_modules():
            if name and any(n == name or n.startswith(name + ".") for n in sel.amounts):
                def keep(_m: nn.Module, args: tuple, name: str = name) -> None:
                    inputs.setdefault(name, tuple(a.detach() for a in args if isinstance(a, torch.Tensor)))
                hooks.append(module.register_forward_pre_hook(keep))
        try:
            with torch.no_grad():
                forward(model, example)
        finally:
            for h in hooks:
                h.remove()
        pruners: list[tuple[str, Any]] = []
        skipped: list[str] = []

        def visit(name: str, module: nn.Module) -> None:
            if not any(n == name or n.startswith(name + ".") for n in sel.amounts):
                return
            args = inputs.get(name)
            if args and not isinstance(module, _candidates()) and self._prunes_cleanly(module, args, sel, name):
                pruners.append((name, self._metapruner(module, args if len(args) > 1 else args[0], sel, name)))
                return
            children = list(module.named_children())
            if not children:
                skipped.append(name)
            for child, sub in children:
                visit(_join(name, child), sub)

        for child, sub in model.named_children():
            visit(child, sub)
        return pruners, skipped

    @staticmethod
    def _why_stuck(pruner: Any, model: nn.Module, name: str, sel: PruneSelection) -> str:
        module = model.get_submodule(name)
        if module not in pruner.DG.module2node:
            return f"cannot prune {name!r} structurally: it is not used in the forward pass"
        fn = pruner.DG.get_pruner_of_module(module)
        channels = fn.get_out_channels(module) if fn is not None else None
        if fn is None or channels is None:
            return f"cannot prune {name!r} structurally: Torch-Pruning has no rule for {type(module).__name__}"
        group = pruner.DG.get_pruning_group(module, fn.prune_out_channels, list(range(channels)))
        if _feeds_output(group):
            return f"cannot prune {name!r} structurally: its output channels are the model's output"
        names = {m: n for n, m in model.named_modules()}
        tied = sorted({names[d.target.module] for d, _ in group if d.target.module in names
                       and pruner.DG.is_out_channel_pruning_fn(d.handler) and names[d.target.module] != name
                       and names[d.target.module] not in sel.amounts and isinstance(d.target.module, _candidates())})
        what = (f"layer(s) outside the selection (excluded, protected or not included): {', '.join(tied)}" if tied
                else "layers outside the selection")
        return f"cannot prune {name!r} structurally: its output channels are tied to {what}"

    def _structured(self, state: ModelState, ctx: StageContext, sel: PruneSelection, finetune: bool,
                    notes: list[str] | None = None) -> tuple[list[dict], list[dict]]:
        cfg, model = self.config, state.module
        model.eval()
        before = shape_snapshot(model)
        weights_before = {n: tuple(w.shape) for n, w in _weights(model).items()}
        example = zeros(state.spec, 1, device=model_device(model))
        with torch.no_grad():
            out_shape = tuple(forward(model, example).shape)
        attention = attention_modules(model)
        where: list[str] = []
        with graph_time_bound(ctx, len(sel.amounts), where):
            if not cfg.hidden:
                kept = residual_layers(model, example, [n for n, a in sel.amounts.items() if a > 0], where)
                for name in kept:
                    sel.amounts.pop(name)
                if kept:
                    sel.notes.append(f"{len(kept)} layer(s) write the residual stream and keep their width "
                                     f"({', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''}); hidden: true prunes "
                                     "it")
                if not sel.amounts:
                    raise StageConfigError(ctx.name, "every selected layer writes the residual stream; set hidden: "
                                                     "true to prune the hidden size, or select attention and MLP "
                                                     "layers")
            where.append("the pruner's grouping of the selected layers")
            pruners = self._pruners(model, example, sel, ctx.name, notes if notes is not None else [], attention)
        # it traces, but a coupling the tracer does not see may break the pruned model: tried on a copy, outside the
        # time bound (the same analysis once more: the bound judged the first)
        broken = self._breaks_whole(model, example, sel) if [getattr(p, "model", None) for p in pruners] == [model] \
            else None
        if broken:
            with graph_time_bound(ctx, len(sel.amounts), where):
                pruners = self._part_by_part(model, example, sel, ctx.name, notes if notes is not None else [],
                                             f"pruned whole, its forward fails: {broken}")
        history: list[dict[str, Any]] = []
        for step in range(1, cfg.steps + 1):
            if cfg.method != "random" and cfg.importance == "taylor":
                calibration_grads(model, ctx, cfg.calibration_batches)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed + step)
                for pruner in pruners:
                    pruner.step()
            for att in attention:
                for pruner in pruners:
                    if att.projections[0] in pruner.num_heads:
                        att.update(int(pruner.num_heads[att.projections[0]]))
            model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                new_shape = tuple(forward(model, to_device(example, model_device(model))).shape)
            if new_shape != out_shape:
                raise StageConfigError(ctx.name, f"pruning changed the model's output from {list(out_shape)} to "
                                                 f"{list(new_shape)}: a selected layer feeds the output directly; "
                                                 "exclude it")
            if finetune:  # a real run (the plan only predicts shapes)
                ctx.recalibrate_batchnorm(model)
                record = self._finetune(model, ctx, step)
                if record is not None:
                    history.append(record)
        state.record(resize_edit(before, model))
        rows = []
        for n, w in _weights(model).items():
            old = weights_before.get(n)
            if old is None or (n not in sel.amounts and tuple(w.shape) == old):
                continue
            rows.append({
                "layer": n, "shape before": "x".join(map(str, old)), "shape after": _shape(w),
                "requested": sel.amounts.get(n),
                "channels removed": round(1 - w.shape[0] / old[0], 4),
                "weights removed": round(1 - w.numel() / max(math.prod(old), 1), 4),
            })
        return rows, history
