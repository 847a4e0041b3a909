"""The shared training loop: train, fine-tuning after compression, distillation and QAT all use `fit`.

Deterministic on CPU for a given seed; keeps the epoch with the best validation accuracy.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compresspipe.data.sources import DataSplits
from compresspipe.engine.ui import UI
from compresspipe.metrics import evaluate
from compresspipe.stages.common import TrainSettings

# (model, inputs, targets) -> scalar loss. Distillation and QAT pass their own.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    best_accuracy: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def make_optimizer(params: list[torch.nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, s: TrainSettings) -> Any:
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs))
    if s.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma)
    return None


def fit(
    model: nn.Module,
    data: DataSplits,
    settings: TrainSettings,
    *,
    device: torch.device,
    seed: int,
    batch_size: int,
    loss_fn: LossFn | None = None,
    extra_params: list[torch.nn.Parameter] | None = None,
    ui: UI | None = None,
    label: str = "train",
) -> FitResult:
    """Train `model` in place; on return it holds the best epoch's weights (if keep_best)."""
    ui = ui or UI(quiet=True)
    if settings.epochs == 0:
        return FitResult(best_epoch=0, epochs_run=0, best_accuracy=None)
    torch.manual_seed(seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = make_optimizer(params, settings)
    sched = make_scheduler(opt, settings)
    smoothing = settings.label_smoothing

    def default_loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(x), y, label_smoothing=smoothing)

    loss_fn = loss_fn or default_loss
    bs = settings.batch_size or batch_size
    val_loader = data.loader("val", batch_size=max(bs, 256))
    best_acc, best_epoch, best_state = -1.0, 0, None
    history: list[dict[str, Any]] = []
    for epoch in range(1, settings.epochs + 1):
        loader = data.loader("train", batch_size=bs, shuffle=True, seed=seed * 1000 + epoch)
        model.train()
        total, count = 0.0, 0
        with ui.progress(f"{label} epoch {epoch}/{settings.epochs}", len(loader)) as bar:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; lower the lr")
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
                total += loss.item() * len(y)
                count += len(y)
                bar.advance(1, info=f"loss {total / max(count, 1):.4f}")
        if sched is not None:
            sched.step()
        acc, val_loss = evaluate(model, val_loader, device)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss, "val_accuracy": acc})
        ui.log(f"  {label} epoch {epoch:>3}/{settings.epochs}  loss {total / max(count, 1):.4f}  "
               f"val_loss {val_loss:.4f}  val_acc {acc:.4f}")
        if acc > best_acc or math.isnan(best_acc):
            best_acc, best_epoch = acc, epoch
            if settings.keep_best:
                best_state = copy.deepcopy(model.state_dict())
    if settings.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch=best_epoch, epochs_run=settings.epochs, best_accuracy=best_acc, history=history)
