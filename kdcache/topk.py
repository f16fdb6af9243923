"""Top-k caches for many classes: per view, the k largest raw logits and their classes, plus the
log-sum-exp of all C logits at a grid of temperatures, so the tail's total mass stays exact.

With values v (the top k raw logits, fp16) and L_T = logsumexp(z / T) over all C logits (fp32,
stored for every T in the grid), the teacher's softmax at temperature T is known exactly on the
top k classes, p_i = exp(v_i / T - L_T), and the rest of its mass, p_tail = 1 - sum_i p_i, is
known as one number. The KD loss treats the tail as one bucket:

    KL_k(p || q) = sum_{i in top k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),

where q_tail = 1 - sum_{i in top k} q_i is the student's mass outside the teacher's top k. It is
never renormalised away. KL_k is the KL between the two distributions with the tail classes
merged into one, and exactly

    KL - KL_k = p_tail * KL(p_tail-conditional || q_tail-conditional) >= 0,

so KL_k equals KL when k = C (no tail) or when the student's tail is shaped like the teacher's,
and the gap shrinks with the teacher's tail mass (`inspect` shows it). A temperature outside the
grid cannot be served exactly and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 5.0, 8.0)


@dataclass
class TopK:
    """Top-k teacher targets for a batch of views (any leading shape S)."""

    values: torch.Tensor  # float16 S+[k]: the k largest raw logits, descending
    indices: torch.Tensor  # int64 S+[k]: their classes
    lse: torch.Tensor  # float32 S+[G]: logsumexp(z / T) over all classes, for each T of the grid
    temperatures: tuple[float, ...]
    num_classes: int

    def map(self, fn) -> TopK:
        return TopK(fn(self.values), fn(self.indices), fn(self.lse), self.temperatures, self.num_classes)

    def __getitem__(self, idx) -> TopK:
        return self.map(lambda t: t[idx])

    def index_select(self, dim: int, rows: torch.Tensor) -> TopK:
        """As a tensor's: the batch code takes rows of targets whatever they are."""
        return self.map(lambda t: t.index_select(dim, rows))

    def to(self, device) -> TopK:
        return self.map(lambda t: t.to(device, non_blocking=True))

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def column(self, T: float) -> int:
        """Which lse column serves temperature T; a KDCacheError when none does."""
        return grid_column(self.temperatures, T, self.k)

    def probs(self, T: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(p over the top k [.., k], p_tail [..]) of the teacher's softmax at T, in float32."""
        lse = self.lse[..., self.column(T)].float()
        p = torch.exp(self.values.float() / T - lse.unsqueeze(-1))
        return p, (1.0 - p.sum(-1)).clamp(min=0.0)


def grid_column(temperatures, T: float, k: int) -> int:
    """Which of a top-`k` cache's temperatures serves T (its lse column); a KDCacheError naming the grid
    when none does: the tail's mass is exact only at the temperatures it was dumped with."""
    for g, t in enumerate(temperatures):
        if abs(t - T) <= 1e-6 * max(1.0, T):
            return g
    from kdcache.errors import KDCacheError

    grid = ", ".join(f"{t:g}" for t in temperatures)
    raise KDCacheError(
        f"this top-{k} cache holds the tail's mass at T = {grid} only, not at --T {T:g}: "
        f"choose one of those, or dump again with --topk-temperatures including {T:g}"
    )


def from_dense(logits: torch.Tensor, k: int, temperatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values fp16, indices, lse fp32 [.., G]) of float logits [.., C]: what a top-k dump stores."""
    z = logits.float()
    values, indices = z.topk(k, dim=-1)  # sorted, largest first
    lse = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temperatures], dim=-1)
    return values.to(torch.float16), indices, lse


def kl_div(student: torch.Tensor, target: TopK, T: float) -> torch.Tensor:
    """KL_k(p_T || q_T), batch mean, with the tail as one bucket (see the module docstring).
    The KD loss is T^2 times this, as for dense logits."""
    p, p_tail = target.probs(T)
    logq = torch.log_softmax(student.float() / T, dim=-1)
    logq_top = logq.gather(-1, target.indices)
    # the student's log mass outside the teacher's top k, computed without cancellation
    eps = torch.finfo(torch.float32).tiny
    top = (p * (torch.log(p.clamp(min=eps)) - logq_top)).sum(-1)
    if target.k == target.num_classes:  # no tail: what rounding leaves of 1 - sum(p) is not a class
        return top.mean()
    masked = logq.scatter(-1, target.indices, float("-inf"))
    logq_tail = torch.logsumexp(masked, dim=-1).clamp(min=float(np.log(eps)))
    tail = torch.where(p_tail > 0, p_tail * (torch.log(p_tail.clamp(min=eps)) - logq_tail), torch.zeros_like(p_tail))
    return (top + tail).mean()


def index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes <= np.iinfo(np.uint16).max + 1 else "int32"


def bytes_per_view(num_classes: int, k: int | None, grid: int = len(DEFAULT_TEMPERATURES)) -> int:
    """Stored bytes of one view's targets: dense fp16 logits, or top-k values + indices + the lse grid."""
    if not k:
        return 2 * num_classes
    return k * (2 + np.dtype(index_dtype(num_classes)).itemsize) + 4 * grid
