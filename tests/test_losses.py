"""The KD loss is the one written in the issue, computed by hand here."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import kd_loss


def by_hand(s, y, t, T, alpha):
    total = 0.0
    for i in range(len(y)):
        p_t = [math.exp(v / T) for v in t[i]]
        p_s = [math.exp(v / T) for v in s[i]]
        zt, zs = sum(p_t), sum(p_s)
        kl = sum((a / zt) * (math.log(a / zt) - math.log(b / zs)) for a, b in zip(p_t, p_s))
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
