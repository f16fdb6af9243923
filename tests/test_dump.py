"""The cache holds what the teacher says about exactly the views the student will replay."""

import h5py
import numpy as np
import torch

from kdcache.cache import MIX_DATASETS, open_cache, partial_path
from kdcache.checkpoints import file_sha256, load_checkpoint
from kdcache.data import load_dataset
from kdcache.dump import dump_logits
from kdcache.inference import predict
from kdcache.views import CropFlip, Views, render, view_params


def test_cache_follows_format_v2(cache_file, teacher_ckpt, data_dir):
    data = load_dataset("cifar10", data_dir, 400)
    with h5py.File(cache_file, "r") as f:
        assert f["logits"].dtype == np.float16 and f["logits"].shape == (400, 4, 10)
        assert f["view_params"].dtype == np.uint8 and f["view_params"].shape == (400, 4, 3)
        assert f["labels"].dtype == np.int64 and np.array_equal(f["labels"][...], data.train_y.numpy())
        assert np.array_equal(f["indices"][...], np.arange(400))
        assert f["test_logits"].shape == (len(data.test_y), 10)
        a = f.attrs
        assert (
            a["format"] == "kdcache-logits" and a["format_version"] == 2 and a["mix"] == "none" and bool(a["complete"])
        )
        assert a["num_views"] == 4 and a["num_classes"] == 10 and a["dataset"] == "cifar10" and a["seed"] == 0
        assert a["dataset_fingerprint"] == data.fingerprint
        assert a["teacher_arch"] == "seed-cnn-teacher" and a["teacher_sha256"] == file_sha256(teacher_ckpt)
        for key in ("normalize_mean", "normalize_std", "created_utc", "kdcache_version"):
            assert key in a
        assert np.array_equal(f["view_params"][...], view_params(0, range(400), range(4)).numpy())
        assert not any(name in f for name in MIX_DATASETS)  # unmixed views need no mix record
    assert not partial_path(cache_file).exists()


def test_replay_fidelity(cache_file, teacher_ckpt, data_dir, cpu):
    """Teacher on the re-rendered view (i, v) == cached logits[i, v] within fp16 rounding."""
    teacher, meta = load_checkpoint(teacher_ckpt)
    data = load_dataset("cifar10", data_dir, 400)
    g = np.random.default_rng(0)
    rows, vs = g.integers(0, 400, 64), g.integers(0, 4, 64)
    with open_cache(cache_file) as cache:
        logits, views, _ = cache.tensors()
    params = views.crop
    x = render(data.train_x[rows], params[rows, vs], meta["normalize_mean"], meta["normalize_std"])
    with torch.no_grad():
        fresh = teacher(x)
    cached = logits[rows, vs].float()
    assert torch.allclose(fresh, cached, atol=1e-2, rtol=1e-3)
    assert torch.equal(fresh.argmax(1), cached.argmax(1))


def test_two_dumps_with_the_same_seed_are_identical(tmp_path, cache_file, teacher_ckpt, data_dir, cpu):
    again = tmp_path / "again.h5"
    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=again,
        views=4,
        seed=0,
        batch_size=128,
        rt=cpu,
        subset=400,
        augment=True,
        block_rows=128,
    )
    with h5py.File(cache_file, "r") as a, h5py.File(again, "r") as b:
        assert a["view_params"][...].tobytes() == b["view_params"][...].tobytes()
        assert a["logits"][...].tobytes() == b["logits"][...].tobytes()


def test_another_seed_gives_other_views(tmp_path, teacher_ckpt, data_dir, cpu):
    out = tmp_path / "seed1.h5"
    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=out,
        views=2,
        seed=1,
        batch_size=128,
        rt=cpu,
        subset=100,
        augment=True,
    )
    with h5py.File(out, "r") as f:
        assert not np.array_equal(f["view_params"][...], view_params(0, range(100), range(2)).numpy())


def test_dump_in_bf16_autocast_channels_last_stays_close(tmp_path, teacher_ckpt, data_dir, cache_file):
    """The CUDA settings (bf16 autocast, channels_last) exercised on CPU: same views, close logits."""
    from kdcache.runtime import Runtime

    out = tmp_path / "bf16.h5"
    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=out,
        views=4,
        seed=0,
        batch_size=128,
        rt=Runtime.create("cpu", "bf16"),
        subset=400,
        augment=True,
        block_rows=128,
    )
    with h5py.File(cache_file, "r") as a, h5py.File(out, "r") as b:
        assert np.array_equal(a["view_params"][...], b["view_params"][...])
        fp32, bf16 = a["logits"][...].astype(np.float32), b["logits"][...].astype(np.float32)
        assert b.attrs["precision"] == "bf16"
        assert np.abs(fp32 - bf16).max() < 0.1 * max(1.0, np.abs(fp32).max())
        assert (fp32.argmax(-1) == bf16.argmax(-1)).mean() > 0.95


def test_predict_on_views_equals_rendering_then_forward(teacher_ckpt, data_dir, cpu):
    teacher, meta = load_checkpoint(teacher_ckpt)
    data = load_dataset("cifar10", data_dir, 50)
    params = view_params(0, range(50), [1])[:, 0]
    got = predict(
        teacher,
        data.train_x,
        meta["normalize_mean"],
        meta["normalize_std"],
        cpu,
        rows=torch.arange(50),
        views=Views(CropFlip(), params),
        batch_size=16,
    )
    with torch.no_grad():
        expected = teacher(render(data.train_x, params, meta["normalize_mean"], meta["normalize_std"]))
    assert torch.allclose(got, expected, atol=1e-5)
