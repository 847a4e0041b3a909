"""The shared training loop: train, fine-tuning after compression, distillation and QAT all use `fit`.

Deterministic on CPU for a given seed; keeps the epoch with the best validation score (the task's default
metric: top-1 accuracy, MSE, perplexity ...; `FitResult.best_accuracy` holds that score). With a
`checkpoint_dir` it saves its state after every epoch (safetensors + JSON, no pickle) and, when run
again with the same settings, continues from the last finished epoch: an interrupted stage resumes
at epoch granularity. Under torchrun it trains data-parallel (DDP, sharded sampler).
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from compresspipe.artifacts.files import atomic_write_json, read_json, sha256_json
from compresspipe.data.sources import DataSplits
from compresspipe.metrics import evaluate
from compresspipe.metrics.tasks import TASKS, metric_direction
from compresspipe.metrics.tasks import loss as task_loss
from compresspipe.models.inputs import batch_len, forward, to_device
from compresspipe.recipe.training import TrainSettings
from compresspipe.training.distributed import Dist, current
from compresspipe.ui import UI

# (model, inputs, targets) -> scalar loss. Distillation and QAT pass their own. Inputs are a tensor or a dict of
# named tensors (models.inputs); targets whatever the (possibly wrapped) training split yields.
LossFn = Callable[[nn.Module, Any, Any], torch.Tensor]


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    best_accuracy: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    samples_per_second: float | None = None


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


# -- epoch checkpoints: tensors to safetensors, the rest to JSON ----------------------------------


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, prefix, tensors), _split_tensors(v, prefix, tensors)]
                             for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, prefix, tensors) for v in obj]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = _split_tensors(state, "t", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    atomic_write_json(tmp / "state.json", meta)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_checkpoint(folder: Path) -> dict[str, Any] | None:
    try:
        tensors = load_file(str(folder / "state.safetensors"))
        return _join_tensors(read_json(folder / "state.json"), tensors)  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError):
        return None


def _fingerprint(model: nn.Module, settings: TrainSettings, label: str, seed: int) -> str:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return sha256_json({"settings": settings.model_dump(mode="json"), "label": label, "seed": seed, "shapes": shapes})


def _train_loader(data: DataSplits, bs: int, seed: int, epoch: int, d: Dist) -> DataLoader:
    if not d.enabled:
        return data.loader("train", batch_size=bs, shuffle=True, seed=seed * 1000 + epoch)
    sampler: DistributedSampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                     seed=seed * 1000, drop_last=False)
    sampler.set_epoch(epoch)
    return DataLoader(data.train, batch_size=bs, sampler=sampler, num_workers=0)


SLOW_BN_MOMENTUM = 0.1  # below this a BatchNorm's running statistics trail its weights for many steps
BN_RECALIBRATION_BATCHES = 32


def recalibrate_batchnorm(model: nn.Module, loader: Any, device: torch.device,
                          batches: int = BN_RECALIBRATION_BATCHES, only_slow: bool = True) -> int:
    """Re-estimate BatchNorm running statistics as exact averages over training batches.

    torchvision's MobileNetV3 and EfficientNet use momentum 0.01: after a short training their running
    statistics still describe the initial weights, so the model evaluates near chance although it learned
    (`only_slow`: just those layers). After pruning or factorizing, every layer's input distribution moved, so
    every BatchNorm is re-estimated (`only_slow=False`). Momenta are restored; returns how many were re-estimated.
    """
    slow: list[nn.modules.batchnorm._BatchNorm] = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        and (not only_slow or (m.momentum is not None and m.momentum < SLOW_BN_MOMENTUM))]
    if not slow:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in slow]
    model.eval()
    for m in slow:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        with torch.no_grad():
            for i, (x, _y) in enumerate(loader):
                if i >= batches:
                    break
                forward(model, to_device(x, device))
    finally:
        for bn, momentum in momenta:
            bn.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(slow)


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
    checkpoint_dir: Path | None = None,
    task: str = "classification",
) -> FitResult:
    """Train `model` in place; on return it holds the best epoch's weights (if keep_best)."""
    ui = ui or UI(quiet=True)
    d = current()
    if settings.epochs == 0:
        return FitResult(best_epoch=0, epochs_run=0, best_accuracy=None)
    torch.manual_seed(seed)
    model.to(device)
    extra = list(extra_params or [])
    params = [p for p in model.parameters() if p.requires_grad] + extra
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = make_optimizer(params, settings)
    sched = make_scheduler(opt, settings)
    smoothing = settings.label_smoothing

    def default_loss(m: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        return task_loss(task, forward(m, x), y, label_smoothing=smoothing)

    higher = metric_direction(TASKS[task].default_metric)

    loss_fn = loss_fn or default_loss
    train_model: nn.Module = model
    if d.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    bs = settings.batch_size or batch_size
    val_loader = data.loader("val", batch_size=max(bs, 256))
    best_acc, best_epoch, best_state = (-math.inf if higher else math.inf), 0, None
    history: list[dict[str, Any]] = []
    start = 1
    fingerprint = _fingerprint(model, settings, label, seed)
    saved = _load_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if saved is not None and saved.get("fingerprint") == fingerprint:
        model.load_state_dict(saved["model"])
        for p, value in zip(extra, saved["extra"], strict=True):
            with torch.no_grad():
                p.copy_(value)
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved.get("scheduler") is not None:
            sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        best_acc, best_epoch, best_state = saved["best_acc"], saved["best_epoch"], saved["best_state"]
        if best_acc is None:  # written as null: not finite
            best_acc = -math.inf if higher else math.inf
        history = saved["history"]
        start = saved["epoch"] + 1
        ui.log(f"  {label}: resuming after epoch {saved['epoch']}")
    seen, seconds = 0, 0.0
    for epoch in range(start, settings.epochs + 1):
        loader = _train_loader(data, bs, seed, epoch, d)
        train_model.train()
        total, count = 0.0, 0
        t0 = time.perf_counter()
        with ui.progress(f"{label} epoch {epoch}/{settings.epochs}", len(loader)) as bar:
            for x, y in loader:
                x, y = to_device(x, device), to_device(y, device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(train_model, x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; lower the lr")
                loss.backward()
                if d.enabled and extra:  # parameters outside the DDP module (e.g. distillation adapters)
                    for p in extra:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= d.world
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
                n = batch_len(x)
                total += loss.item() * n
                count += n
                bar.advance(1, info=f"loss {total / max(count, 1):.4f}")
        seconds += time.perf_counter() - t0
        seen += count
        if sched is not None:
            sched.step()
        total, count = d.all_sum(total), int(d.all_sum(count))
        recalibrate_batchnorm(model, _train_loader(data, bs, seed + 1, epoch, d), device)
        acc, val_loss = evaluate(model, val_loader, device, task)
        metric = TASKS[task].default_metric
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val_loss,
                        "val_accuracy" if metric == "top1" else f"val_{metric}": acc})
        ui.log(f"  {label} epoch {epoch:>3}/{settings.epochs}  loss {total / max(count, 1):.4f}  "
               f"val_loss {val_loss:.4f}  val_{'acc' if metric == 'top1' else metric} {acc:.4f}")
        if (acc > best_acc if higher else acc < best_acc) or math.isnan(best_acc) or math.isinf(best_acc):
            best_acc, best_epoch = acc, epoch
            if settings.keep_best:
                best_state = copy.deepcopy(model.state_dict())
        if checkpoint_dir is not None and d.is_main:
            _save_checkpoint(checkpoint_dir, {
                "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                "extra": [p.detach() for p in extra], "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None, "rng": torch.get_rng_state(),
                "best_acc": best_acc, "best_epoch": best_epoch, "best_state": best_state, "history": history,
            })
    if settings.keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    throughput = d.all_sum(seen) / seconds if seconds > 0 else None  # samples/s over all ranks
    best = best_acc if math.isfinite(best_acc) else None
    return FitResult(best_epoch=best_epoch, epochs_run=settings.epochs, best_accuracy=best, history=history,
                     resumed_from_epoch=start - 1, samples_per_second=throughput)
