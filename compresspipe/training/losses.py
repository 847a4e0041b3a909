"""Losses the training loop's users share: knowledge distillation (the distill stage, pruning's fine-tuning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compresspipe.metrics.tasks import IGNORE_INDEX, TASKS
from compresspipe.metrics.tasks import loss as task_loss


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
    label_mask: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    task: str = "classification",
) -> torch.Tensor:
    """``alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * task loss(student, targets)``.

    The T^2 factor keeps the soft loss's gradients on the scale of the hard loss (Hinton et al.). For per-token
    tasks the distributions are per position (positions without a label are left out); for regression the soft
    loss is the mean squared difference to the teacher's outputs. The soft term averages over the whole batch;
    the hard term over the samples whose `label_mask` is True (all when None), and is 0 for a batch with no
    labelled sample.
    """
    info = TASKS[task]
    s = student_logits.float()
    t = teacher_logits.detach().float()
    loss = s.sum() * 0.0  # connected to the graph, so a batch with nothing to learn still backpropagates
    if alpha > 0:
        if info.float_targets:
            loss = loss + alpha * F.mse_loss(s, t)
        else:
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            if info.per_position and targets is not None:
                keep = targets.reshape(-1) != IGNORE_INDEX
                s2, t2 = s2[keep], t2[keep]
            if s2.shape[0]:
                log_s = F.log_softmax(s2 / temperature, dim=1)
                log_t = F.log_softmax(t2 / temperature, dim=1)
                loss = loss + alpha * temperature**2 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    if alpha < 1 and targets is not None:
        if label_mask is not None:
            s, targets = s[label_mask], targets[label_mask]
        if targets.shape[0] > 0:
            loss = loss + (1 - alpha) * task_loss(task, s, targets, label_smoothing=label_smoothing)
    return loss
