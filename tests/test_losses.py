"""Each distillation loss against its definition, computed by hand (plain loops / numpy) here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import LOSSES, kd_loss, label_loss, soft_loss, student_loss


def by_hand(s, y, t, T, alpha):
    total = 0.0
    for i in range(len(y)):
        p_t = [math.exp(v / T) for v in t[i]]
        p_s = [math.exp(v / T) for v in s[i]]
        zt, zs = sum(p_t), sum(p_s)
        kl = sum((a / zt) * (math.log(a / zt) - math.log(b / zs)) for a, b in zip(p_t, p_s, strict=False))
        ce = -math.log(math.exp(s[i][y[i]]) / sum(math.exp(v) for v in s[i]))
        total += alpha * T * T * kl + (1 - alpha) * ce
    return total / len(y)


@pytest.mark.parametrize("T,alpha", [(3.0, 0.5), (2.0, 0.25), (1.0, 1.0), (4.0, 0.0)])
def test_kd_loss_equals_hand_computation(T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 10, generator=g) * 3, torch.randn(5, 10, generator=g) * 3
    y = torch.randint(0, 10, (5,), generator=g)
    got = kd_loss(s, y, t, T=T, alpha=alpha).item()
    assert got == pytest.approx(by_hand(s.tolist(), y.tolist(), t.tolist(), T, alpha), rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    s, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    assert torch.equal(kd_loss(s, y, None, T=3.0, alpha=0.0), F.cross_entropy(s, y))


def test_notebook_two_formula_is_the_same_loss():
    """Notebook 2: 0.25 * sum(p_t * (log p_t - log_softmax(s/T))) / B * T^2 + 0.75 * CE."""
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    T = 2.0
    p_t = F.softmax(t / T, dim=1)
    soft = torch.sum(p_t * (p_t.log() - F.log_softmax(s / T, dim=1))) / s.size(0) * T**2
    expected = 0.25 * soft + 0.75 * F.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, y, t, T=T, alpha=0.25), expected, atol=1e-6)


def test_fp16_cached_logits_and_bf16_student_logits_are_computed_in_fp32():
    s = torch.randn(4, 10).to(torch.bfloat16)
    t = torch.randn(4, 10).to(torch.float16)
    y = torch.tensor([0, 1, 2, 3])
    loss = kd_loss(s, y, t, T=3.0, alpha=0.5)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, kd_loss(s.float(), y, t.float(), T=3.0, alpha=0.5))


# --- kinds of distillation loss, each against its definition in numpy (float64) ---

S = [[2.0, -1.0, 0.5, 3.0], [0.1, 0.2, -0.3, 1.5], [-2.0, 4.0, 1.0, 0.0]]
TT = [[1.0, 0.0, 2.5, 2.0], [3.0, -1.0, 0.0, 0.5], [0.5, 2.0, -1.0, 1.0]]
Y = [3, 0, 1]
PARTNER = [1, 3, 0]
LAM = [0.7, 0.25, 1.0]


def tensors(s=S, t=TT, y=Y):
    return torch.tensor(s), torch.tensor(t), torch.tensor(y)


def mix():
    """The mixed-image arguments of student_loss for the batch above."""
    return dict(partner_labels=torch.tensor(PARTNER), lam=torch.tensor(LAM))


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def hand_kd(s, t, T):
    return (
        T
        * T
        * np.mean([np_kl(np_softmax(np.array(b) / T), np_softmax(np.array(a) / T)) for a, b in zip(s, t, strict=False)])
    )


def hand_tckd_nckd(s_row, t_row, y, T):
    """TCKD: KL of the (target, rest) binary split; NCKD: KL among the other classes, renormalised."""
    p_s, p_t = np_softmax(np.array(s_row) / T), np_softmax(np.array(t_row) / T)
    b_s, b_t = np.array([p_s[y], 1 - p_s[y]]), np.array([p_t[y], 1 - p_t[y]])
    rest = [c for c in range(len(s_row)) if c != y]
    q_s, q_t = p_s[rest] / p_s[rest].sum(), p_t[rest] / p_t[rest].sum()
    return np_kl(b_t, b_s), np_kl(q_t, q_s), p_t[y]


def hand_dkd(s, t, y, T, a, b):
    per = [hand_tckd_nckd(sr, tr, yi, T) for sr, tr, yi in zip(s, t, y, strict=False)]
    return T * T * np.mean([a * tckd + b * nckd for tckd, nckd, _ in per])


def hand_dist(s, t, T):
    p_s = np.array([np_softmax(np.array(r) / T) for r in s])
    p_t = np.array([np_softmax(np.array(r) / T) for r in t])
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(len(s))])
    # corrcoef over one sample is undefined; the module's convention is an intra term of 0 there.
    intra = 0.0 if len(s) == 1 else 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(len(s[0]))])
    return T * T * (inter + intra)


def hand_ls(s, t, T):
    def z(rows):
        return [(np.array(r) - np.mean(r)) / (np.std(r, ddof=1) + 1e-7) for r in rows]

    return hand_kd(z(s), z(t), T)


def hand_label(s, y, partner=None, lam=None):
    def ce(row, c):
        return -np.log(np_softmax(np.array(row))[c])

    if lam is None:
        return np.mean([ce(r, c) for r, c in zip(s, y, strict=False)])
    return np.mean([m * ce(r, a) + (1 - m) * ce(r, b) for r, a, b, m in zip(s, y, partner, lam, strict=False)])


def hand_soft(kind, s, t, y, T, a=1.0, b=8.0):
    if kind == "kd":
        return hand_kd(s, t, T)
    if kind == "dkd":
        return hand_dkd(s, t, y, T, a, b)
    if kind == "dist":
        return hand_dist(s, t, T)
    return hand_ls(s, t, T)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_by_hand(T):
    s, t, _ = tensors()
    assert soft_loss("kd", s, t, T=T).item() == pytest.approx(hand_kd(S, TT, T), rel=1e-5)


@pytest.mark.parametrize("T,a,b", [(1.0, 1.0, 8.0), (4.0, 1.0, 8.0), (2.0, 0.5, 2.0), (3.0, 1.0, 0.0), (3.0, 0.0, 1.0)])
def test_dkd_by_hand(T, a, b):
    s, t, y = tensors()
    got = soft_loss("dkd", s, t, T=T, labels=y, dkd_alpha=a, dkd_beta=b).item()
    assert got == pytest.approx(hand_dkd(S, TT, Y, T, a, b), rel=1e-5, abs=1e-7)


def test_dkd_recomposes_kd():
    """The DKD paper's identity, per sample: KD = TCKD + (1 - p_t[y]) * NCKD.

    So dkd_alpha = dkd_beta = 1 is not KD: it is KD + mean(p_t[y] * NCKD) >= KD.
    """
    T = 2.0
    s, t, y = tensors()
    extra = []
    for i in range(len(Y)):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        kd = soft_loss("kd", si, ti, T=T).item()
        tckd = soft_loss("dkd", si, ti, T=T, labels=yi, dkd_alpha=1.0, dkd_beta=0.0).item()
        nckd = soft_loss("dkd", si, ti, T=T, labels=yi, dkd_alpha=0.0, dkd_beta=1.0).item()
        p_target = F.softmax(ti / T, dim=1)[0, Y[i]].item()
        assert kd == pytest.approx(tckd + (1 - p_target) * nckd, rel=1e-5)
        extra.append(p_target * nckd)
    both = soft_loss("dkd", s, t, T=T, labels=y, dkd_alpha=1.0, dkd_beta=1.0).item()
    assert both == pytest.approx(soft_loss("kd", s, t, T=T).item() + sum(extra) / len(extra), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("n", [3, 1])
def test_dist_by_hand(T, n):
    s, t, _ = tensors(S[:n], TT[:n])
    assert soft_loss("dist", s, t, T=T).item() == pytest.approx(hand_dist(S[:n], TT[:n], T), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ls_by_hand_with_unbiased_std(T):
    s, t, _ = tensors()
    assert soft_loss("ls", s, t, T=T).item() == pytest.approx(hand_ls(S, TT, T), rel=1e-5)


def test_label_loss_by_hand():
    s, _, y = tensors()
    mixed = label_loss(s, y, torch.tensor(PARTNER), torch.tensor(LAM)).item()
    assert mixed == pytest.approx(hand_label(S, Y, PARTNER, LAM), rel=1e-6)
    assert label_loss(s, y).item() == pytest.approx(hand_label(S, Y), rel=1e-6)
    assert torch.equal(label_loss(s, y, torch.tensor(PARTNER), None), F.cross_entropy(s, y))
    with pytest.raises(ValueError, match="partner_labels"):
        label_loss(s, y, None, torch.tensor(LAM))


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_student_loss_mixes_soft_and_label_terms(kind, alpha):
    T, a, b = 3.0, 0.5, 4.0
    s, t, y = tensors()
    got = student_loss(s, y, t, kind=kind, T=T, alpha=alpha, dkd_alpha=a, dkd_beta=b, **mix()).item()
    expected = alpha * hand_soft(kind, S, TT, Y, T, a, b) + (1 - alpha) * hand_label(S, Y, PARTNER, LAM)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", LOSSES)
def test_alpha_zero_is_the_label_loss_and_needs_no_teacher(kind):
    s, _, y = tensors()
    got = student_loss(s, y, None, kind=kind, T=4.0, alpha=0.0, **mix())
    assert got.item() == pytest.approx(hand_label(S, Y, PARTNER, LAM), rel=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        student_loss(s, y, None, kind=kind, T=4.0, alpha=0.5)


def test_kd_loss_is_bit_for_bit_the_previous_formula():
    def previous(s, y, t, T, alpha):
        s = s.float()
        ce = F.cross_entropy(s, y)
        if alpha == 0.0:
            return ce
        log_p_s, log_p_t = F.log_softmax(s / T, dim=1), F.log_softmax(t.float() / T, dim=1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return alpha * (T * T) * kl + (1.0 - alpha) * ce

    g = torch.Generator().manual_seed(2)
    for T in (1.0, 2.0, 3.0, 0.7):
        for alpha in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
            s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
            y = torch.randint(0, 10, (16,), generator=g)
            assert torch.equal(kd_loss(s, y, t, T=T, alpha=alpha), previous(s, y, t, T, alpha))
            assert torch.equal(kd_loss(s, y, t, T=T, alpha=alpha), student_loss(s, y, t, T=T, alpha=alpha))


def test_unknown_kind_and_dkd_without_labels_are_errors():
    s, t, y = tensors()
    with pytest.raises(ValueError, match="kd, dkd, dist, ls"):
        soft_loss("kl", s, t, T=1.0)
    with pytest.raises(ValueError, match="kd, dkd, dist, ls"):
        student_loss(s, y, None, kind="kl", T=1.0, alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        soft_loss("dkd", s, t, T=1.0)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("n", [3, 1])
def test_a_perfect_student_has_zero_soft_loss(kind, n):
    s, _, y = tensors(S[:n], TT[:n], Y[:n])
    loss = soft_loss(kind, s, s.clone(), T=4.0, labels=y)
    if kind == "dist":  # Pearson of a vector with itself is 1 up to rounding
        assert abs(loss.item()) < 1e-5
    else:
        assert loss.item() == 0.0


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("same", [False, True])
def test_gradients_are_finite_for_a_batch_of_one(kind, same):
    s = torch.tensor(S[:1], requires_grad=True)
    t = s.detach().clone() if same else torch.tensor(TT[:1])
    y, partner, lam = torch.tensor(Y[:1]), torch.tensor([0]), torch.tensor([0.6])
    loss = student_loss(s, y, t, kind=kind, T=4.0, alpha=0.5, partner_labels=partner, lam=lam)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("kind", LOSSES)
def test_losses_under_autocast_are_fp32(kind):
    s, t, y = tensors()
    s16, t16 = s.to(torch.bfloat16), t.to(torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = student_loss(s16, y, t16, kind=kind, T=2.0, alpha=0.5, **mix())
    assert loss.dtype == torch.float32
    expected = student_loss(s16.float(), y, t16.float(), kind=kind, T=2.0, alpha=0.5, **mix())
    assert torch.allclose(loss, expected, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are only observable on CUDA")
@pytest.mark.parametrize("kind", LOSSES)
def test_no_host_sync_on_cuda(kind):
    s = torch.tensor(S, device="cuda", requires_grad=True)
    t, y = torch.tensor(TT, device="cuda"), torch.tensor(Y, device="cuda")
    extras = {k: v.cuda() for k, v in mix().items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        student_loss(s, y, t, kind=kind, T=2.0, alpha=0.5, **extras).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_one_node_kd_loss_has_the_textbook_gradient():
    """student_loss's kd path writes its gradient out (one autograd node): it must be the gradient
    autograd finds for the textbook graph, mixed or not, smoothed or not, any alpha and T."""

    def textbook(s, y, t, T, alpha, y2, lam, eps):
        logp = F.log_softmax(s, dim=1)
        if lam is None:
            ce = F.cross_entropy(s, y, label_smoothing=eps)
        else:
            nll = -(lam * logp.gather(1, y[:, None]).squeeze(1) + (1 - lam) * logp.gather(1, y2[:, None]).squeeze(1))
            ce = ((1 - eps) * nll - eps * logp.mean(1)).mean()
        kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
        return alpha * T * T * kl + (1 - alpha) * ce

    g = torch.Generator().manual_seed(5)
    for T, alpha, mixed, eps in [
        (1.0, 0.5, False, 0.0),
        (3.0, 0.5, True, 0.0),
        (2.0, 0.9, True, 0.2),
        (4.0, 1.0, False, 0.1),
        (3.0, 0.0, True, 0.0),
        (0.7, 0.3, True, 0.0),
    ]:
        s0, t = torch.randn(12, 7, generator=g) * 3, torch.randn(12, 7, generator=g) * 3
        y, y2 = torch.randint(0, 7, (12,), generator=g), torch.randint(0, 7, (12,), generator=g)
        lam = torch.rand(12, generator=g) if mixed else None
        grads = []
        for fn in (
            lambda s, y=y, t=t, T=T, alpha=alpha, y2=y2, lam=lam, eps=eps, mixed=mixed: student_loss(
                s, y, t, T=T, alpha=alpha, partner_labels=y2 if mixed else None, lam=lam, smoothing=eps
            ),
            lambda s, y=y, t=t, T=T, alpha=alpha, y2=y2, lam=lam, eps=eps: textbook(s, y, t, T, alpha, y2, lam, eps),
        ):
            s = s0.clone().requires_grad_()
            (fn(s) * 2.5).backward()  # an upstream factor reaches the gradient
            grads.append(s.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    # under no_grad no gradient is made, and the value is the same
    with torch.no_grad():
        v = student_loss(s0, y, t, T=3.0, alpha=0.5, partner_labels=y2, lam=torch.rand(12, generator=g))
    assert v.requires_grad is False and torch.isfinite(v)
