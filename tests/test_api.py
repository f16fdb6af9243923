"""kdcache as a library: its names without the CLI, and examples/own_loop.py against `kdcache student`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, THREAD_ENV, TINY, run_cli

import kdcache
from kdcache.cache import MIX_DATASETS
from kdcache.checkpoints import load_checkpoint
from kdcache.data import load_dataset, write_fake_cifar10
from kdcache.views import view_schedule

EXAMPLE = ROOT / "examples" / "own_loop.py"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")


def _cached(path, *names):
    import h5py

    with h5py.File(path, "r") as f:
        return [torch.from_numpy(f[name][...]) for name in names]


def test_import_kdcache_loads_no_torch_until_a_name_is_used():
    code = (
        "import sys, kdcache; before = 'torch' in sys.modules; kdcache.CachedBatches; "
        "print(before, 'torch' in sys.modules, kdcache.__version__, 'student_loss' in dir(kdcache))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["False", "True", kdcache.__version__, "True"]
    assert sorted(kdcache.__all__) == sorted(["__version__", *kdcache._EXPORTS])
    assert all(getattr(kdcache, name) is not None for name in kdcache.__all__)
    assert kdcache.build_model is kdcache.models.build and kdcache.open_cache is kdcache.cache.open_cache
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdcache.nope  # noqa: B018


def test_cached_batches_cover_every_row_once_with_the_logits_of_the_scheduled_view(
    cache_file, data_dir, cpu, teacher_ckpt
):
    views = kdcache.CachedBatches(cache_file, data_dir=data_dir, batch_size=64, seed=3, runtime=cpu)
    (logits,) = _cached(cache_file, "logits")
    data = load_dataset("cifar10", data_dir, 400)
    assert (views.num_samples, views.num_views, views.num_classes, len(views)) == (400, 4, 10, 7)
    with kdcache.open_cache(cache_file) as c:
        assert views.mean == tuple(c.attrs["normalize_mean"]) and views.std == tuple(c.attrs["normalize_std"])
    teacher = load_checkpoint(teacher_ckpt)[0].to(memory_format=torch.channels_last)
    for epoch in (0, 5, 0):  # any epoch, in any order
        batches = list(views.epoch(epoch))
        assert len(batches) == len(views) and sum(len(b.y) for b in batches) == 400
        rows = torch.cat([b.index for b in batches])
        assert torch.equal(rows.sort().values, torch.arange(400))  # every row once
        shown = view_schedule(3, 400, 4, epoch)
        for b in batches:
            assert b.x.shape == (len(b.y), 3, 32, 32) and b.x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(b.y, data.train_y[b.index]) and b.y2 is None and b.lam is None
            assert torch.equal(b.t, logits[b.index, shown[b.index]])
        with torch.no_grad():  # the rendered images are the very views the teacher was shown
            assert torch.allclose(teacher(batches[0].x), batches[0].t.float(), atol=1e-2, rtol=1e-3)
    assert [b.index.tolist() for b in views.epoch(1)] != [b.index.tolist() for b in views.epoch(2)]
    tests = list(views.test_batches(batch_size=64))
    assert torch.equal(torch.cat([y for _, y in tests]), data.test_y) and tests[0][0].shape == (64, 3, 32, 32)


def test_a_mixed_cache_gives_partner_labels_and_weights_for_the_scheduled_view(tmp_path, teacher_ckpt, data_dir, cpu):
    recipe = TINY.override(subset=96, views=3, mix="both", mix_prob=0.6, seed=2)
    cache = kdcache.dump_logits(recipe, teacher=teacher_ckpt, out=tmp_path / "mixed.h5", data_dir=data_dir, runtime=cpu)
    views = kdcache.CachedBatches(cache, data_dir=data_dir, batch_size=40, seed=1, runtime=cpu)
    assert views.mix == "both" and len(views) == 3
    logits, partner, lam = _cached(cache, "logits", MIX_DATASETS[0], MIX_DATASETS[3])
    labels = load_dataset("cifar10", data_dir, 96).train_y
    shown, mixed = view_schedule(1, 96, 3, 4), 0
    for b in views.epoch(4):
        v = shown[b.index]
        assert b.y2.shape == b.y.shape == b.lam.shape == (len(b.index),) and b.lam.dtype == torch.float32
        assert torch.equal(b.lam, lam[b.index, v]) and torch.equal(b.t, logits[b.index, v])
        p = partner[b.index, v].long()
        assert torch.equal(b.y2[p >= 0], labels[p[p >= 0]]) and bool((b.lam[p < 0] == 1).all())
        mixed += int((p >= 0).sum())
    assert 0 < mixed < 96
    loss = kdcache.student_loss(torch.zeros(len(b.y), 10), b.y, b.t, T=2.0, alpha=0.5, partner_labels=b.y2, lam=b.lam)
    assert torch.isfinite(loss)


def test_the_stage_functions_chain_as_the_commands_do(tmp_path, teacher_ckpt, cache_file, data_dir, cpu):
    recipe = TINY.override(views=4, seed=0)
    cache = kdcache.dump_logits(
        recipe,
        teacher=teacher_ckpt,
        out=tmp_path / "c.h5",
        data_dir=data_dir,
        runtime=cpu,
        batch_size=128,
        block_rows=128,
    )
    assert torch.equal(_cached(cache, "logits")[0], _cached(cache_file, "logits")[0])  # = the fixture's dump_logits
    result = kdcache.train_student(None, cache=cache, out=tmp_path / "s.pt", data_dir=data_dir, runtime=cpu)
    meta = load_checkpoint(tmp_path / "s.pt")[1]
    assert len(result.history) == TINY.epochs and meta["arch"] == TINY.student_arch and meta["alpha"] == TINY.alpha
    teacher = kdcache.train_teacher(
        TINY.override(subset=64).override_teacher(epochs=1), out=tmp_path / "t.pt", data_dir=data_dir, runtime=cpu
    )
    assert teacher.arch == TINY.teacher_arch and (tmp_path / "t.pt").exists()


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda c, d: kdcache.CachedBatches(c, data_dir=d, batch_size=0), "batch_size must be an integer >= 1"),
        (lambda c, d: kdcache.CachedBatches(c, data_dir=d).epoch(-1), "epoch must be an integer >= 0"),
        (lambda c, d: kdcache.CachedBatches(c, data_dir=d, seed=0.5), "seed must be an integer"),
        (lambda c, d: kdcache.CachedBatches(c, data_dir=d, subset=300), "made from other training images"),
        (lambda c, d: kdcache.CachedBatches(d / "missing.h5", data_dir=d), "does not exist"),
        (lambda c, d: kdcache.train_student(None, cache=None, out=d / "s.pt"), "needs a cache or an online_teacher"),
        (lambda c, d: kdcache.train_teacher("seed-cnn", out=d / "t.pt"), "expected a kdcache.Recipe"),
    ],
)
def test_mistakes_are_one_line_errors(cache_file, data_dir, call, needle):
    with pytest.raises(kdcache.KDCacheError, match=needle) as e:
        call(cache_file, data_dir)
    assert "\n" not in str(e.value)


def test_own_loop_example_reaches_the_same_weights_as_kdcache_student(tmp_path):
    """examples/own_loop.py (torchvision's resnet18 with the CIFAR stem, plain SGD, the library's batches and
    student_loss) against `kdcache student --arch resnet18` with the same settings and seed, on a mixed
    cache (so partner labels and weights reach the loss), CPU, one thread each: 2 epochs x 2 steps. The
    state dicts are equal bit for bit (max abs difference 0): same initialisation (seeded, then built),
    same batches from the same function, same loss, SGD with the constant schedule's factor exactly 1.0;
    evaluation between epochs (eval mode, no grad) changes no weight or BatchNorm statistic."""
    data = tmp_path / "data"
    write_fake_cifar10(data, num_train=160)  # 32 images a batch file, a 32-image test split
    cpu = kdcache.Runtime.create("cpu", "fp32")
    teacher_recipe = kdcache.get_preset("seed-cnn").override(subset=64, epochs=1, batch_size=32)
    kdcache.train_teacher(teacher_recipe, out=tmp_path / "t.pt", data_dir=data, runtime=cpu)
    cache = kdcache.dump_logits(
        teacher_recipe.override(views=2, mix="cutmix", mix_prob=0.5),
        teacher=tmp_path / "t.pt",
        out=tmp_path / "c.h5",
        data_dir=data,
        runtime=cpu,
    )
    same = [
        "--cache",
        str(cache),
        "--data-dir",
        str(data),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.05",
        "--seed",
        "7",
        "--T",
        "2",
        "--alpha",
        "0.6",
        "--device",
        "cpu",
    ]
    r = run_cli(
        "student",
        "--preset",
        "seed-resnet",
        "--arch",
        "resnet18",
        "--optimizer",
        "sgd",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "0",
        "--momentum",
        "0.9",
        "--weight-decay",
        "5e-4",
        *same,
        "--out",
        str(tmp_path / "cli.pt"),
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), *same, "--out", str(tmp_path / "own.pt")],
        env={**os.environ, **THREAD_ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "epoch 2  loss" in r.stdout and "test acc" in r.stdout and "2 views" in r.stdout
    cli = torch.load(tmp_path / "cli.pt", weights_only=True)["state_dict"]
    own = torch.load(tmp_path / "own.pt", weights_only=True)
    assert list(cli) == list(own)
    differ = {k: (cli[k].double() - own[k].double()).abs().max().item() for k in cli if not torch.equal(cli[k], own[k])}
    assert not differ, f"{len(differ)} tensors differ, max {max(differ.values())}: {sorted(differ)[:5]}"
    torch.manual_seed(7)
    assert not torch.equal(own["fc.weight"], kdcache.build_model("resnet18", 10).fc.weight)  # it trained
