"""Distillation losses from raw logits (the cache stores raw logits, so any T works).

Everything is computed in float32 (logits are cast first, so fp16 caches and autocast
students give the same numbers) and without host syncs, for any batch size >= 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("kd", "dkd", "dist", "ls")

# DIST: a vector whose norm is below this has no direction; its correlation counts as 0.
DIST_EPS = 1e-8
# LS: added to the row std, as in the official code, so constant rows stay finite.
LS_EPS = 1e-7


def label_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    partner_labels: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy; for a mixed batch, lam * CE(s, y_i) + (1 - lam) * CE(s, y_j), batch mean.

    lam[i] is the share of sample i in its mixed image, y_j the label of its partner.
    lam None is plain CE (partner labels are then ignored). `smoothing`: label smoothing,
    each target is (1 - smoothing) on its class + smoothing / C on every class.
    """
    if lam is None:
        return F.cross_entropy(student_logits.float(), labels, label_smoothing=smoothing)
    if partner_labels is None:
        raise ValueError("lam needs partner_labels")
    return _LabelAndKD.apply(student_logits.float(), labels, partner_labels, lam, smoothing, None, 1.0, 0.0)


def _mixed_nll(logp: torch.Tensor, labels, partner_labels, lam, smoothing: float) -> torch.Tensor:
    """lam * NLL(y_i) + (1 - lam) * NLL(y_j), label-smoothed, batch mean, from log-probabilities."""
    own = logp.gather(1, labels[:, None]).squeeze(1)
    partner = logp.gather(1, partner_labels[:, None]).squeeze(1)
    nll = -torch.lerp(partner, own, lam.float())  # lam * own + (1 - lam) * partner
    if smoothing:
        nll = (1.0 - smoothing) * nll - smoothing * logp.mean(1)
    return nll.mean()


class _LabelAndKD(torch.autograd.Function):
    """(1 - alpha) * label loss + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) as one autograd node.

    The value is computed by the same calls as the textbook graph (so the numbers are bit for bit
    those of `F.cross_entropy` / `F.kl_div`); the gradient is written out instead of recorded:
    (1 - alpha)/B * (softmax(s) - q) + alpha*T/B * (softmax(s/T) - softmax(t/T)), q the label
    distribution (lam on the own label, 1 - lam on the partner's, then label smoothing). In a CPU
    step of a small student, recording and replaying the dozen small ops of that graph was a
    visible share of the time. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, s, labels, partner_labels, lam, smoothing, teacher, T, alpha):
        b, c = s.shape
        logp = F.log_softmax(s, dim=1)
        if lam is None:
            loss = F.cross_entropy(s, labels, label_smoothing=smoothing)
        else:
            loss = _mixed_nll(logp, labels, partner_labels, lam, smoothing)
        want_grad = ctx.needs_input_grad[0]
        if want_grad:
            q = torch.zeros_like(logp)
            if lam is None:
                q.scatter_(1, labels[:, None], 1.0)
            else:
                share = lam.to(q.dtype)[:, None]
                q.scatter_(1, partner_labels[:, None], 1.0 - share).scatter_add_(1, labels[:, None], share)
            if smoothing:
                q.mul_(1.0 - smoothing).add_(smoothing / c)
            grad = logp.exp_().sub_(q)
        if alpha:
            log_s = F.log_softmax(s / T, dim=1)
            log_t = F.log_softmax(teacher.float() / T, dim=1)
            kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
            loss = alpha * (T * T) * kl + (1.0 - alpha) * loss  # alpha * (T * T) first, as kd_loss always did
            if want_grad:
                grad = grad.mul_((1.0 - alpha) / b).add_(log_s.exp_().sub_(log_t.exp_()), alpha=alpha * T / b)
        elif want_grad:
            grad = grad.div_(b)
        ctx.save_for_backward(grad if want_grad else None)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None, None, None, None, None, None


def _kl(student_scaled: torch.Tensor, teacher_scaled: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(softmax(teacher) || softmax(student)) over dim 1."""
    return F.kl_div(
        F.log_softmax(student_scaled, dim=1),
        F.log_softmax(teacher_scaled, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def _dkd(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, dkd_alpha: float, dkd_beta: float) -> torch.Tensor:
    """dkd_alpha * TCKD + dkd_beta * NCKD on already temperature-scaled logits.

    The non-target logits are gathered out (not masked with -1000 as in mdistiller): the
    same value, but exact for any logit range, and both binary log-probabilities come
    from logsumexp, so log(1 - p_target) cannot hit log(0).
    """
    b, c = s.shape
    y = labels.view(b, 1)
    others = torch.arange(c - 1, device=s.device).expand(b, c - 1)
    others = others + (others >= y).long()  # the column indices of all classes but y

    def binary_and_rest(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rest = z.gather(1, others)
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, y) - lse
        log_other = torch.logsumexp(rest, dim=1, keepdim=True) - lse
        return torch.cat([log_target, log_other], dim=1), rest

    bin_s, rest_s = binary_and_rest(s)
    bin_t, rest_t = binary_and_rest(t)
    tckd = F.kl_div(bin_s, bin_t, reduction="batchmean", log_target=True)
    return dkd_alpha * tckd + dkd_beta * _kl(rest_s, rest_t)


def _mean_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Pearson correlation between a[i, :] and b[i, :].

    Each centred row's norm is clamped at DIST_EPS (as in F.cosine_similarity) rather than
    adding eps to the product of norms as the DIST code does: that bias is large for the
    intra term, whose per-class probability columns vary little over a batch. A constant
    row (a zero centred vector) gets correlation 0 and zero gradient.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    na = (a * a).sum(dim=1).clamp_min(DIST_EPS**2).sqrt()
    nb = (b * b).sum(dim=1).clamp_min(DIST_EPS**2).sqrt()
    return ((a * b).sum(dim=1) / (na * nb)).mean()


def _dist(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """inter + intra relation loss (DIST, beta = gamma = 1) on temperature-scaled logits.

    With one sample there is no across-batch relation to match, so the intra term is 0
    (a branch on the shape, not on values); otherwise it would be a constant 1 with no
    gradient, and the loss would not vanish for a perfect student.
    """
    p_s, p_t = s.softmax(dim=1), t.softmax(dim=1)
    inter = 1.0 - _mean_pearson(p_s, p_t)
    if s.shape[0] == 1:
        return inter
    return inter + (1.0 - _mean_pearson(p_s.t(), p_t.t()))


def _standardise(z: torch.Tensor) -> torch.Tensor:
    """Row z-score with the unbiased (n - 1) std, as torch.std in the LS paper's code."""
    std, mean = torch.std_mean(z, dim=1, keepdim=True)
    return (z - mean) / (std + LS_EPS)


def _check_kind(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown distillation loss {kind!r}; choose from {', '.join(LOSSES)}")


def _divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    T: float,
    labels: torch.Tensor | None,
    dkd_alpha: float,
    dkd_beta: float,
) -> torch.Tensor:
    """The soft term without its T^2 factor, so callers can fold T^2 into their weight."""
    _check_kind(kind)
    s, t = student_logits.float(), teacher_logits.float()
    if kind == "kd":
        return _kl(s / T, t / T)
    if kind == "dkd":
        if labels is None:
            raise ValueError("dkd needs the target labels")
        return _dkd(s / T, t / T, labels, dkd_alpha, dkd_beta)
    if kind == "dist":
        return _dist(s / T, t / T)
    return _kl(_standardise(s) / T, _standardise(t) / T)


def soft_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    T: float,
    labels: torch.Tensor | None = None,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
) -> torch.Tensor:
    """Batch-mean distillation term of `kind` (one of LOSSES) at temperature T, times T^2.

    T^2 keeps the soft-target gradients on the scale of the hard-label ones.
    kd: KL(softmax(t/T) || softmax(s/T)).
    dkd: dkd_alpha * TCKD + dkd_beta * NCKD (Zhao et al. 2022); needs `labels`.
    dist: inter + intra Pearson relation loss on softmax(./T) (Huang et al. 2022).
    ls: kd on row-standardised logits (Sun et al. 2024).
    """
    div = _divergence(kind, student_logits, teacher_logits, T=T, labels=labels, dkd_alpha=dkd_alpha, dkd_beta=dkd_beta)
    return (T * T) * div


def student_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    kind: str = "kd",
    T: float,
    alpha: float,
    partner_labels: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """alpha * soft_loss(kind, ...) + (1 - alpha) * label_loss(..., smoothing).

    alpha = 0 is the label loss alone and needs no teacher logits. dkd's target class
    is `labels` (sample i's own label, also for a mixed image).
    """
    _check_kind(kind)
    if alpha == 0.0:
        return label_loss(student_logits, labels, partner_labels, lam, smoothing)
    if teacher_logits is None:
        raise ValueError("alpha > 0 needs teacher logits")
    if kind == "kd" and isinstance(teacher_logits, torch.Tensor):  # the common case, as one autograd node
        if lam is not None and partner_labels is None:
            raise ValueError("lam needs partner_labels")
        s = student_logits.float()
        return _LabelAndKD.apply(s, labels, partner_labels, lam, smoothing, teacher_logits, T, alpha)
    ce = label_loss(student_logits, labels, partner_labels, lam, smoothing)
    if not isinstance(teacher_logits, torch.Tensor):  # a top-k cache's targets: kd only, the tail as one bucket
        from kdcache.topk import kl_div

        if kind != "kd":
            raise ValueError(f"--loss {kind} needs every logit; a top-k cache serves kd only")
        return alpha * (T * T) * kl_div(student_logits, teacher_logits, T) + (1.0 - alpha) * ce
    div = _divergence(kind, student_logits, teacher_logits, T=T, labels=labels, dkd_alpha=dkd_alpha, dkd_beta=dkd_beta)
    # alpha * (T * T) first, as kd_loss always did.
    return alpha * (T * T) * div + (1.0 - alpha) * ce


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    T: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    KL is averaged over the batch (`batchmean`), as in both seed notebooks. alpha = 0 is
    plain cross-entropy and needs no teacher logits. Kept for existing callers.
    """
    return student_loss(student_logits, labels, teacher_logits, kind="kd", T=T, alpha=alpha)
