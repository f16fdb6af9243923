"""Datasets are read from the python batches, checked by shape/count/labels, fingerprinted."""

import numpy as np
import pytest
from helpers import SHARED_CALTECH, SHARED_CIFAR, TINY

from kdcache.data import load_dataset
from kdcache.errors import KDCacheError


def test_generated_dataset_reads_like_cifar10(data_dir):
    d = load_dataset("cifar10", data_dir)
    assert d.train_x.shape == (1000, 3, 32, 32) and d.train_x.dtype.is_floating_point is False
    assert d.test_x.shape == (200, 3, 32, 32) and len(d.classes) == 10


def test_subset_is_a_prefix_with_its_own_fingerprint(data_dir):
    full, sub = load_dataset("cifar10", data_dir), load_dataset("cifar10", data_dir, subset=100)
    assert np.array_equal(sub.train_x.numpy(), full.train_x[:100].numpy())
    assert sub.fingerprint != full.fingerprint
    assert sub.fingerprint == load_dataset("cifar10", data_dir, subset=100).fingerprint


def test_a_subset_reads_only_the_batches_that_hold_it(tmp_path):
    """--subset N reads the batches holding the first N rows, each checked whole: the same images and
    fingerprint as reading all five, and a damaged batch beyond them is not read (one within them is)."""
    from kdcache.data import fingerprint, write_fake_cifar10

    folder = write_fake_cifar10(tmp_path, num_train=100)  # five batches of 20
    full = load_dataset("cifar10", tmp_path, download=False)
    (folder / "data_batch_5").write_bytes(b"not a pickle")
    sub = load_dataset("cifar10", tmp_path, subset=30, download=False)  # batches 1 and 2
    assert np.array_equal(sub.train_x.numpy(), full.train_x[:30].numpy())
    assert sub.train_y.tolist() == full.train_y[:30].tolist()
    assert sub.fingerprint == fingerprint(full.train_x[:30].numpy(), full.train_y[:30].numpy())
    with pytest.raises(KDCacheError, match="data_batch_5"):
        load_dataset("cifar10", tmp_path, subset=81, download=False)


def test_subset_larger_than_the_dataset_is_refused(data_dir):
    with pytest.raises(KDCacheError, match="--subset 1001 is outside 1..1000"):
        load_dataset("cifar10", data_dir, subset=1001)


def test_missing_data_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")
    with pytest.raises(KDCacheError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="real CIFAR-10 not at ../shared/cifar10")
def test_real_cifar10_from_shared_copy():
    """The shared copy's md5 sums differ from the original; shapes, counts, labels and stats hold."""
    d = load_dataset("cifar10", SHARED_CIFAR, download=False)
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert np.bincount(d.train_y.numpy()).tolist() == [5000] * 10
    assert np.bincount(d.test_y.numpy()).tolist() == [1000] * 10
    assert d.classes[0] == "airplane" and d.classes[9] == "truck"
    mean = d.train_x.float().mean(dim=(0, 2, 3)) / 255
    assert np.allclose(mean.numpy(), [0.4914, 0.4822, 0.4465], atol=1e-3)


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="real CIFAR-10 not at ../shared/cifar10")
def test_real_cifar10_teacher_cache_student(tmp_path, cpu):
    """The whole flow on 1,000 real images: learns above chance, replays the real views."""
    import h5py

    from kdcache.pipeline import run_pipeline

    # The small CNN as teacher too: this checks the flow on real data, not the teacher.
    recipe = TINY.override(
        subset=1000, teacher_arch="seed-cnn-student", epochs=2, views=2, augment=True
    ).override_teacher(epochs=2)
    record = run_pipeline(recipe, preset="test", run_dir=tmp_path / "real", data_dir=SHARED_CIFAR, rt=cpu)
    by = {r["model"]: r for r in record["rows"]}
    assert by["teacher"]["test_acc"] > 0.15  # 10 classes: chance is 0.10, on all 10,000 test images
    with h5py.File(tmp_path / "real" / "teacher_logits.h5", "r") as f:
        assert f["logits"].shape == (1000, 2, 10) and bool(f.attrs["complete"])
        assert f.attrs["dataset_fingerprint"] == load_dataset("cifar10", SHARED_CIFAR, 1000).fingerprint


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_CALTECH / "train").is_dir(), reason="real Caltech-101 not at ../shared/caltech101")
def test_real_caltech101_store_and_flow(tmp_path, cpu):
    """Real photographs: 101 unequal classes, greyscale images, every file decodes; the flow runs and verifies."""
    from kdcache.pipeline import run_pipeline
    from kdcache.verify import verify_cache

    d = load_dataset("imagefolder", SHARED_CALTECH, image_size=32)
    counts = np.bincount(d.train_y.numpy(), minlength=101)
    assert d.num_classes == 101 and len(d.train_y) == 5784 and len(d.test_y) == 2893
    assert counts[d.classes.index("airplanes")] == 534 and counts.min() >= 1
    assert d.train_x.shape[1:] == (3, 56, 56) and d.test_x.shape[1:] == (3, 32, 32)
    grey = [(x[0] == x[1]).all() and (x[1] == x[2]).all() for x in d.train_x[:800]]
    assert 0 < sum(grey) < 800  # the greyscale photographs became RGB, the colour ones stayed colour

    recipe = TINY.override(
        dataset="imagefolder", subset=600, epochs=1, views=2, mix="cutmix", augment=True
    ).override_teacher(epochs=1)
    run_pipeline(
        recipe,
        preset="test",
        run_dir=tmp_path / "caltech",
        data_dir=SHARED_CALTECH,
        rt=cpu,
        data_options={"image_size": 32},
    )
    report = verify_cache(
        tmp_path / "caltech" / "teacher_logits.h5",
        teacher=tmp_path / "caltech" / "teacher.pt",
        data_dir=None,
        samples=32,
        rt=cpu,
    )
    assert report.ok, [(c.name, c.detail) for c in report.checks if not c.ok]
