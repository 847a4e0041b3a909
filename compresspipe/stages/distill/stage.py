"""The distill stage: a frozen teacher's softened outputs (and optional features) train the student."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from compresspipe.artifacts.model import ModelState
from compresspipe.data.sources import DictTensorDataset
from compresspipe.errors import StageConfigError
from compresspipe.metrics import count_params, evaluate
from compresspipe.metrics.modes import eval_mode
from compresspipe.metrics.tasks import TASKS
from compresspipe.models.factory import build_from_spec, build_recorded, recorded_source
from compresspipe.models.inputs import forward, to_device, zeros
from compresspipe.recipe.spec import ModelSpec
from compresspipe.registry import unknown_message
from compresspipe.stages.base import Need, Stage, StagePlan, StageResult
from compresspipe.stages.context import StageContext
from compresspipe.stages.distill import DistillConfig, FeatureLoss
from compresspipe.training.losses import distillation_loss


def labelled_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """The training-split indices whose labels a `labels_fraction` run keeps: a seeded subset, sorted.

    It depends on the recipe's seed only, so every distill stage of a recipe sees the same labels.
    """

    k = min(n, max(1, round(fraction * n)))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _tensor(value: Any) -> Any:
    """A module's output as one tensor: the first item of a tuple (transformer layers return (hidden, ...))."""
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return value


class _Capture:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names: list[str], stage: str, who: str):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in dict.fromkeys(names):
            if name not in modules or not name:

                known = [n for n in modules if n]
                raise StageConfigError(stage, f"features: {unknown_message(f'{who} module', name, known)}")
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _make_adapter(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], stage: str,
                  pair: FeatureLoss) -> nn.Module | None:
    """None when the shapes match; a 1x1 conv (4-D), or a linear map of the last axis (2-D features, 3-D hidden
    states of a transformer: batch, tokens, width) when only the width differs."""

    if student_shape == teacher_shape:
        return None
    same_rest = (student_shape[:2] == teacher_shape[:2] if len(student_shape) == 3
                 else student_shape[2:] == teacher_shape[2:])
    if len(student_shape) != len(teacher_shape) or not same_rest or len(student_shape) not in (2, 3, 4):
        raise StageConfigError(
            stage, f"features: student {pair.student!r} gives {list(student_shape[1:])} per sample and teacher "
                   f"{pair.teacher!r} gives {list(teacher_shape[1:])}; adapters only bridge a different width "
                   "(channels of a conv output, features of a linear output, the hidden size of a transformer)")
    if len(student_shape) == 4:
        return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=False)
    return nn.Linear(student_shape[-1], teacher_shape[-1], bias=False)


class _Indexed(Dataset):
    """The training split yielding (x, {"index": i, "label": y}): the loss finds a sample's cached teacher
    outputs and whether its label is kept by its index."""

    def __init__(self, train: Any):
        self.train = train

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, i: int) -> tuple[Any, dict[str, torch.Tensor]]:
        x, y = self.train[i]
        return x, {"index": torch.tensor(i, dtype=torch.int64), "label": torch.as_tensor(y)}


def _indexed_train(data: Any) -> tuple[Any, int]:
    """The training split yielding (x, {"index", "label"}), and its number of samples."""

    return _Indexed(data.train), len(data.train)


class DistillStage(Stage[DistillConfig]):
    def needs(self) -> list[Need]:
        teacher = self.config.teacher
        return [Need("train_data"), Need("teacher", teacher=teacher if isinstance(teacher, str) else None)]

    def plan(self, state: ModelState, ctx: StageContext) -> StagePlan:
        cfg = self.config
        notes = [f"{cfg.epochs} epoch(s) from teacher {cfg.teacher_label()}, T={cfg.temperature}, alpha={cfg.alpha}"]
        student = state if isinstance(cfg.student, str) else self._new_student(cfg.student, state, ctx)
        teacher, _ = self._teacher(ctx)
        captures = (_Capture(student.module, [f.student for f in cfg.features], ctx.name, "student"),
                    _Capture(teacher, [f.teacher for f in cfg.features], ctx.name, "teacher"))
        try:  # the checks the run makes first, on the planned shapes
            self._check_shapes(student.module, teacher.eval(), *captures, student, ctx)
        finally:
            for capture in captures:
                capture.remove()
        if isinstance(cfg.student, str):
            return StagePlan(notes=[*notes, "weights change, structure does not"])
        return StagePlan(state=student, notes=[*notes, f"new student {cfg.student_label()}"])

    @staticmethod
    def _new_student(spec: ModelSpec, state: ModelState, ctx: StageContext) -> ModelState:
        given = spec.input_spec()
        if given is not None and [(i.name, i.shape) for i in given] != [(i.name, i.shape) for i in state.spec.inputs]:
            raise StageConfigError(ctx.name, f"student inputs {[(i.name, i.shape) for i in given]} differ from the "
                                             f"data's {[(i.name, i.shape) for i in state.spec.inputs]}")
        torch.manual_seed(ctx.seed)  # the student's initial weights depend on the seed only
        source = recorded_source(spec, ctx.task, state.num_classes, state.spec.classes)
        module, _ = build_recorded(spec, source, ctx.task)
        return ModelState(module, source, tuple(state.input_shape), state.num_classes, io=state.io)

    def _teacher(self, ctx: StageContext) -> tuple[nn.Module, str]:
        teacher = self.config.teacher
        if isinstance(teacher, str):
            label = f"{ctx.reference} (baseline)" if teacher == "baseline" and ctx.reference != "baseline" \
                else teacher
            return ctx.load_stage(teacher).module, label
        return build_from_spec(teacher, ctx.task, ctx.data.num_classes, ctx.data.classes), teacher.label

    def run(self, state: ModelState, ctx: StageContext) -> StageResult:
        cfg, device = self.config, ctx.device
        student_state = state if isinstance(cfg.student, str) else self._new_student(cfg.student, state, ctx)
        student = student_state.module
        if not any(p.requires_grad for p in student.parameters()):
            raise StageConfigError(ctx.name, "the student has no trainable parameters (e.g. already converted to "
                                             "integer kernels); distill before such a stage")
        teacher, teacher_name = self._teacher(ctx)
        teacher.to(device).eval().requires_grad_(False)

        # Hooks first, so the shape check below also captures feature shapes.
        s_capture = _Capture(student, [f.student for f in cfg.features], ctx.name, "student")
        t_capture = _Capture(teacher, [f.teacher for f in cfg.features], ctx.name, "teacher")
        try:
            adapters = self._check_shapes(student, teacher, s_capture, t_capture, student_state, ctx)
            val_loader = ctx.data.loader("val", batch_size=ctx.recipe.data.eval_batch_size)
            teacher_acc, _ = evaluate(teacher, val_loader, device, ctx.task)

            train, n = _indexed_train(ctx.data)
            labelled: torch.Tensor | None = None
            n_labelled = n
            if cfg.labels_fraction < 1:
                kept = labelled_indices(n, cfg.labels_fraction, ctx.recipe.seed)
                n_labelled = len(kept)
                labelled = torch.zeros(n, dtype=torch.bool)
                labelled[kept] = True
                labelled = labelled.to(device)

            cached: torch.Tensor | None = None
            cacheable = isinstance(ctx.data.train, TensorDataset | DictTensorDataset)
            # per-token outputs (a vocabulary per position) are too big to keep for every sample
            if cfg.cache_teacher and cacheable and not cfg.features and not TASKS[ctx.task].per_position:
                cached = self._teacher_logits(teacher, ctx)
            counter = {"teacher_batches": 0}

            def loss_fn(model: nn.Module, x: Any, t: dict[str, torch.Tensor]) -> torch.Tensor:
                index, y = t["index"], t["label"]
                s_logits = forward(model, x)
                if cached is not None:
                    t_logits = cached[index]
                else:
                    with torch.no_grad():
                        t_logits = forward(teacher, x)
                    counter["teacher_batches"] += 1
                mask = labelled[index] if labelled is not None else None
                loss = distillation_loss(s_logits, t_logits, y, cfg.temperature, cfg.alpha, mask,
                                         label_smoothing=cfg.label_smoothing, task=ctx.task)
                for pair, adapter in zip(cfg.features, adapters, strict=True):
                    s_feat = _tensor(s_capture.outputs[pair.student])
                    if adapter is not None:
                        s_feat = adapter(s_feat)
                    loss = loss + pair.weight * F.mse_loss(s_feat.float(), _tensor(t_capture.outputs[pair.teacher]).float())
                return loss

            extra = [p for a in adapters if a is not None for p in a.parameters()]
            fit_ctx = dataclasses.replace(ctx, data=dataclasses.replace(ctx.data, train=train))
            result = fit_ctx.fit(student, cfg, loss_fn=loss_fn, extra_params=extra)
        finally:
            s_capture.remove()
            t_capture.remove()
        teacher.to("cpu")

        new_student = not isinstance(cfg.student, str)
        student_params, teacher_params = count_params(student), count_params(teacher)
        student_acc = result.best_accuracy if result.best_accuracy is not None else \
            evaluate(student, val_loader, device, ctx.task)[0]
        feature_rows = [
            {"student": f.student, "teacher": f.teacher, "weight": f.weight,
             "adapter": "none" if a is None else type(a).__name__,
             "adapter_params": 0 if a is None else sum(p.numel() for p in a.parameters())}
            for f, a in zip(cfg.features, adapters, strict=True)
        ]
        notes = [f"teacher {teacher_name} ({teacher_params} params, val acc {teacher_acc:.4f}) -> "
                 f"{'new student ' + cfg.student_label() if new_student else 'current model'} "
                 f"({student_params} params)"]
        if result.epochs_run:
            notes.append(f"best epoch {result.best_epoch} of {result.epochs_run}")
        if result.resumed_from_epoch:
            notes.append(f"resumed after epoch {result.resumed_from_epoch}")
        if labelled is not None:
            notes.append(f"hard loss on {n_labelled} of {n} training labels ({cfg.labels_fraction:g})")
        details: dict[str, Any] = {
            "teacher": teacher_name, "teacher_params": teacher_params, "teacher_accuracy": teacher_acc,
            "student": cfg.student_label(), "student_params": student_params,
            "temperature": cfg.temperature, "alpha": cfg.alpha, "labels_fraction": cfg.labels_fraction,
            "labelled_samples": n_labelled, "train_samples": n,
            "teacher_cached": cached is not None, "teacher_batches_run": counter["teacher_batches"],
            "history": result.history, "best_epoch": result.best_epoch,
            "samples_per_second": result.samples_per_second,
            "tables": {"distillation": [
                {"role": "teacher", "model": teacher_name, "params": teacher_params, "val_accuracy": teacher_acc},
                {"role": "student", "model": cfg.student_label(), "params": student_params,
                 "val_accuracy": student_acc},
            ]},
        }
        if feature_rows:
            details["tables"]["feature losses"] = feature_rows
        # adapters live only in this function: they are never part of the saved model
        return StageResult(state=student_state, kind="structural" if new_student else "weights",
                           notes=notes, details=details)

    def _check_shapes(self, student: nn.Module, teacher: nn.Module, s_capture: _Capture, t_capture: _Capture,
                      state: ModelState, ctx: StageContext) -> list[nn.Module | None]:
        """Output sizes must agree (teacher, student, labels); returns one adapter (or None) per feature pair."""

        device = ctx.device
        student.to(device)
        x = zeros(state.spec, 2, device=device)
        with torch.no_grad(), eval_mode(student):
            s_out, t_out = forward(student, x), forward(teacher, x)
        s_size, t_size = tuple(s_out.shape[1:]), tuple(t_out.shape[1:])
        if s_size != t_size:
            raise StageConfigError(ctx.name, f"the student's output size {list(s_size)} differs from the teacher's "
                                             f"{list(t_size)}; both must give one logit per class")
        if not TASKS[ctx.task].float_targets and s_size[-1] != ctx.data.num_classes:
            raise StageConfigError(ctx.name, f"the models give {list(s_size)} outputs per sample but the dataset has "
                                             f"{ctx.data.num_classes} classes")
        adapters: list[nn.Module | None] = []
        torch.manual_seed(ctx.seed)
        for pair in self.config.features:
            shapes: list[tuple[int, ...]] = []
            for who, name, capture in (("student", pair.student, s_capture), ("teacher", pair.teacher, t_capture)):
                feat = capture.outputs.get(name)
                feat = _tensor(feat) if feat is not None else None
                if not isinstance(feat, torch.Tensor):
                    raise StageConfigError(ctx.name, f"features: {who} module {name!r} "
                                                     f"{'did not run' if feat is None else 'does not return a tensor'}"
                                                     " in a forward pass")
                shapes.append(tuple(feat.shape))
            adapter = _make_adapter(shapes[0], shapes[1], ctx.name, pair)
            adapters.append(adapter.to(device) if adapter is not None else None)
        return adapters

    @staticmethod
    def _teacher_logits(teacher: nn.Module, ctx: StageContext) -> torch.Tensor:
        """The teacher's logits for every training sample, in split order (one pass, no augmentation)."""

        out = []
        with torch.no_grad():
            for x, _ in ctx.data.loader("train", batch_size=ctx.recipe.data.eval_batch_size):
                out.append(forward(teacher, to_device(x, ctx.device)))
        return torch.cat(out)
