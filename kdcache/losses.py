"""Distillation losses from raw logits (the cache stores raw logits, so any T works)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    T: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    KL is averaged over the batch (`batchmean`), as in both seed notebooks; T^2 keeps
    the soft-target gradients on the scale of the hard-label ones. alpha = 0 is
    plain cross-entropy and needs no teacher logits.
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, labels)
    if alpha == 0.0:
        return ce
    if teacher_logits is None:
        raise ValueError("alpha > 0 needs teacher logits")
    kl = F.kl_div(
        F.log_softmax(s / T, dim=1),
        F.log_softmax(teacher_logits.float() / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * (T * T) * kl + (1.0 - alpha) * ce
