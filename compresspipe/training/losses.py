"""Losses the training loop's users share: knowledge distillation (the distill stage, pruning's fine-tuning)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
    label_mask: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, targets)``.

    The T^2 factor keeps the soft loss's gradients on the scale of the hard loss (Hinton et al.).
    The KL term averages over the whole batch; the cross-entropy averages over the samples whose
    `label_mask` is True (all when None), and is 0 for a batch with no labelled sample.
    """
    s = student_logits.float()
    loss = s.sum() * 0.0  # connected to the graph, so a batch with nothing to learn still backpropagates
    if alpha > 0:
        log_s = F.log_softmax(s / temperature, dim=1)
        log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
        loss = loss + alpha * temperature**2 * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    if alpha < 1 and targets is not None:
        if label_mask is not None:
            s, targets = s[label_mask], targets[label_mask]
        if targets.numel() > 0:
            loss = loss + (1 - alpha) * F.cross_entropy(s, targets, label_smoothing=label_smoothing)
    return loss
