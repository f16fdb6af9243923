"""Top-k caches: the loss against a hand computation and the dense KD loss, the file round trip,
verify, and the one-line refusals."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.losses import student_loss
from kdcache.topk import TopK, bytes_per_view, from_dense, kl_div

TEMPS = (1.0, 2.0, 4.0)


def _topk(logits: torch.Tensor, k: int) -> TopK:
    v, i, lse = from_dense(logits, k, TEMPS)
    return TopK(v, i, lse, TEMPS, logits.shape[-1])


def _dense_kl(s, t, T):
    p = torch.softmax(t / T, -1)
    return (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean()


@pytest.mark.parametrize("T", TEMPS)
def test_topk_kd_equals_dense_kd_when_k_is_c(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    t = t.half().float()  # the cache keeps fp16 values: compare like with like
    y = torch.randint(0, 10, (16,), generator=g)
    dense = student_loss(s, y, t, T=T, alpha=0.7)
    assert torch.allclose(student_loss(s, y, _topk(t, 10), T=T, alpha=0.7), dense, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_topk_kd_gap_is_the_tail_mass_times_the_kl_inside_the_tail(k):
    """KL - KL_k = p_tail * KL(teacher tail || student tail), computed by hand from full logits."""
    g = torch.Generator().manual_seed(k)
    c, T = 100, 2.0
    s, t = torch.randn(32, c, generator=g) * 2, (torch.randn(32, c, generator=g) * 4).half().float()
    top = _topk(t, k)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(1, top.indices, False)
    p_tail, q_tail = (p * tail).sum(1), (q * tail).sum(1)
    ph, qh = (p * tail) / p_tail[:, None], (q * tail) / q_tail[:, None]
    inner = torch.where(tail, ph * (ph.clamp(min=1e-30).log() - qh.clamp(min=1e-30).log()), torch.zeros_like(ph)).sum(1)
    gap = _dense_kl(s, t, T) - kl_div(s, top, T)
    assert gap >= -1e-6
    assert torch.allclose(gap, (p_tail * inner).mean(), atol=2e-5)
    _, rest = top.probs(T)
    assert torch.allclose(rest, p_tail, atol=1e-4)  # the stored log-sum-exp keeps the tail's mass exact


def test_a_temperature_outside_the_grid_is_refused():
    from kdcache.errors import KDCacheError

    with pytest.raises(KDCacheError, match="not at --T 3"):
        _topk(torch.randn(4, 10), 3).probs(3.0)


def test_bytes_per_view_for_many_classes():
    assert bytes_per_view(10, None) == 20 and bytes_per_view(1000, None) == 2000
    assert bytes_per_view(1000, 10, 6) == 10 * 4 + 24  # fp16 values + uint16 classes + 6 fp32 lse
    assert bytes_per_view(100_000, 10, 6) == 10 * 6 + 24  # int32 classes beyond 65,536


def test_topk_dump_verifies_and_trains(tmp_path, teacher_ckpt, data_dir):
    cache, student = tmp_path / "top.h5", tmp_path / "s.pt"
    invoke = lambda *a: CliRunner().invoke(app, [str(x) for x in a], env={"COLUMNS": "200"})  # noqa: E731
    r = invoke(
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--views",
        2,
        "--subset",
        64,
        "--topk",
        3,
        "--topk-temperatures",
        "1,2",
        "--data-dir",
        data_dir,
        "--out",
        cache,
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "top 3 of 10 per view" in r.output and "mean tail mass at T=2" in r.output
    with h5py.File(cache) as f:
        assert "logits" not in f and f["topk_values"].shape == (64, 2, 3) and f["topk_indices"].dtype == np.uint16
        assert list(f.attrs["lse_temperatures"]) == [1.0, 2.0]
        values, lse = f["topk_values"][...].astype(np.float32), f["topk_lse"][...]
    assert (np.diff(values, axis=-1) <= 0).all()  # sorted, largest first
    assert (lse[..., 0] >= values[..., 0] - 1e-2).all()  # a log-sum-exp is at least its largest term
    r = invoke("verify", cache, "--teacher", teacher_ckpt, "--data-dir", data_dir, "--samples", 16)
    assert r.exit_code == 0, r.output
    r = invoke(
        "student",
        "--cache",
        cache,
        "--data-dir",
        data_dir,
        "--epochs",
        1,
        "--T",
        2,
        "--out",
        student,
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    for args, needle in ((["--T", 3], "not at --T 3"), (["--loss", "dist", "--T", 2], "--loss dist needs every logit")):
        r = invoke(
            "student", "--cache", cache, "--data-dir", data_dir, "--epochs", 1, "--out", tmp_path / "x.pt", *args
        )
        assert r.exit_code == 2 and needle in r.output, r.output
    for args, needle in (
        (["--topk", 11], "[dump] topk) must be in 1..10"),
        (["--topk-temperatures", "2"], "goes with --topk"),
        (["--topk", 2, "--topk-temperatures", "0,1"], "finite numbers > 0"),
    ):
        r = invoke("dump-logits", "--teacher", teacher_ckpt, "--data-dir", data_dir, "--out", tmp_path / "y.h5", *args)
        assert r.exit_code == 2 and needle in r.output, r.output


@pytest.mark.parametrize("topk", [None, 3])
def test_a_cache_over_the_memory_budget_is_read_per_epoch_with_the_same_result(tmp_path, teacher_ckpt, data_dir, topk):
    """--resident-mb 0: the student reads each epoch's views from the file in blocks, one epoch ahead."""
    from kdcache.config import get_preset
    from kdcache.dump import dump_logits
    from kdcache.runtime import Runtime
    from kdcache.stages import train_student

    cache = tmp_path / "c.h5"
    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=cache,
        views=3,
        seed=0,
        batch_size=64,
        rt=Runtime.create("cpu", "fp32"),
        subset=96,
        block_rows=32,
        topk=topk,
    )
    recipe = get_preset("seed-cnn").override(epochs=4, batch_size=32, T=2.0, alpha=0.5)
    states = []
    for mb in (None, 0.0):
        out = tmp_path / f"s{mb}.pt"
        train_student(
            recipe, cache_file=cache, data_dir=data_dir, out=out, rt=Runtime.create("cpu", "fp32", resident_mb=mb)
        )
        states.append(torch.load(out)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
