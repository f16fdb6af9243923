"""The jpeg image store: each image once as JPEG bytes, decoded per batch on a pool of threads into the
same canvases a raw store holds. Small generated folders in the real layout (JPEG, PNG, greyscale, palette)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, run_cli_peak
from PIL import Image

from kdcache import folders
from kdcache.batches import gather_rows, prefetch
from kdcache.data import load_dataset
from kdcache.errors import KDCacheError
from kdcache.views import Views, mix_params, render_views


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return folders.write_image_folder(tmp_path_factory.mktemp("imgs") / "shapes", classes=3, per_class=10)


def test_jpeg_store_round_trip_and_fingerprint(folder):
    train, val, classes, where = folders.prepare(folder, 48, store_format="jpeg")
    raw, _, _, raw_where = folders.prepare(folder, 48, store_format="raw")
    assert where != raw_where and "jpeg90" in where.name
    assert isinstance(train.images, folders.JpegImages) and train.images.shape == (30, 3, 48, 48)
    assert train.meta["store_format"] == "jpeg" and train.meta["jpeg_quality"] == 90
    assert train.images.stored_bytes < raw.images.nbytes / 3  # compressed
    # the same rows, labels and sizes as the raw store; the pixels are the JPEG's
    assert np.array_equal(train.labels, raw.labels) and np.array_equal(train.hw, raw.hw)
    canvases = np.array(train.images)
    for i in range(len(train.labels)):
        h, w = train.hw[i]
        blob = bytes(train.images.data[train.images.offsets[i] : train.images.offsets[i + 1]])
        assert np.array_equal(canvases[i, :, :h, :w], np.asarray(Image.open(io.BytesIO(blob))).transpose(2, 0, 1))
        assert (canvases[i, :, h:, :w] == canvases[i, :, h - 1 : h, :w]).all()
        assert (canvases[i, :, :, w:] == canvases[i, :, :, w - 1 : w]).all()
        # lossy (these test images are mostly noise), but the same picture: each channel's mean holds
        assert np.abs(canvases[i].mean((1, 2)) - raw.images[i].mean((1, 2))).max() < 8
    fp = folders.content_fingerprint(train.images, train.hw, train.labels)
    assert fp == train.meta["train_fingerprint"] != raw.meta["train_fingerprint"]
    # a subset's fingerprint covers its rows only, and a changed byte changes it
    assert folders.content_fingerprint(train.images, train.hw, train.labels, 10) != fp
    changed = folders.JpegImages(where, "train", np.array(train.images.data), train.images.offsets, train.hw, 48)
    changed.data[100] ^= 1
    assert folders.content_fingerprint(changed, train.hw, train.labels) != fp
    # prepared again from scratch: the same bytes (encoding is deterministic)
    again, _, _, _ = folders.prepare(folder, 48, store_format="jpeg", rebuild=True)
    assert again.meta["train_fingerprint"] == fp
    # reading rows in any order, with one or several workers, gives the same canvases
    rows = np.array([7, 2, 29, 2])
    one = folders.JpegImages(where, "train", train.images.data, train.images.offsets, train.hw, 48, workers=1)
    assert np.array_equal(one[rows], canvases[rows]) and np.array_equal(train.images[rows], canvases[rows])
    assert np.array_equal(np.array(train.images[5:9]), canvases[5:9])


def test_decoded_views_equal_raw_store_views_of_the_same_pixels(folder):
    """Rendering from the jpeg store (decoded per batch, streamed) gives exactly the views of a raw
    array holding the decoded pixels, mixed or not."""
    data = load_dataset("imagefolder", folder, image_size=24, store_size=48, store_format="jpeg")
    g, n = data.geometry, len(data.train_y)
    pixels = torch.from_numpy(np.array(data.train_x))  # what a raw store of these pixels holds
    rows = torch.tensor([4, 0, 17, 4, 29, 11])
    crop = g.params(0, range(n), [0])[:, 0][rows]
    m = mix_params(0, range(n), [1], num_rows=n, mix="both", prob=1.0, geometry=g)[:, 0].take(rows)
    for views in (Views(g, crop), Views(g, crop, m)):
        block, local, partner = gather_rows(data.train_x, rows, None if views.mix is None else views.mix.partner)
        from_jpeg = render_views(block, local, views.with_partners(partner), (0.5,) * 3, (0.25,) * 3)
        assert torch.equal(from_jpeg, render_views(pixels, rows, views, (0.5,) * 3, (0.25,) * 3))


def test_more_prefetch_workers_give_the_same_batches(folder):
    data = load_dataset("imagefolder", folder, image_size=24, store_size=48, store_format="jpeg")
    batches = list(torch.randperm(30, generator=torch.Generator().manual_seed(0)).split(7))
    partner = torch.randint(-1, 30, (30,), generator=torch.Generator().manual_seed(1))
    got = [list(prefetch(data.train_x, batches, partner, "cpu", workers=w)) for w in (1, 3)]
    assert len(got[0]) == len(got[1]) == len(batches)
    for a, b in zip(*got, strict=False):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))


@pytest.mark.e2e
def test_jpeg_store_whole_flow_replays_exactly_streamed_or_resident(folder, tmp_path):
    """teacher -> dump -> verify -> student from a jpeg store as a user runs them, then the same with
    the store streamed (decoded per batch): the same cache and weights, bit for bit."""
    import h5py

    results = []
    for mb in (None, "0"):
        d = tmp_path / f"r{mb}"
        extra = [] if mb is None else ["--resident-mb", mb]
        common = ["--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra]
        r = run_cli(
            "teacher",
            "--preset",
            "seed-cnn",
            "--data",
            str(folder),
            "--image-size",
            "24",
            "--store-format",
            "jpeg",
            "--out",
            str(d / "t.pt"),
            *common,
        )
        assert r.returncode == 0, r.stderr
        r = run_cli(
            "dump-logits",
            "--teacher",
            str(d / "t.pt"),
            "--views",
            "2",
            "--mix",
            "cutmix",
            "--device",
            "cpu",
            "--out",
            str(d / "c.h5"),
            *extra,
        )
        assert r.returncode == 0, r.stderr
        r = run_cli("verify", str(d / "c.h5"), "--teacher", str(d / "t.pt"), "--samples", "16", "--device", "cpu")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run_cli("student", "--cache", str(d / "c.h5"), "--out", str(d / "s.pt"), *common)
        assert r.returncode == 0, r.stderr
        with h5py.File(d / "c.h5") as f:
            logits = f["logits"][...]
        results.append((logits, torch.load(d / "s.pt")["state_dict"]))
    (c0, s0), (c1, s1) = results
    assert np.array_equal(c0, c1) and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert torch.load(tmp_path / "rNone" / "t.pt")["data_options"]["store_format"] == "jpeg"


def test_a_corrupt_jpeg_in_the_store_is_one_line_naming_the_image(tmp_path):
    root = folders.write_image_folder(tmp_path / "f", classes=2, per_class=10)
    train, _, _, where = folders.prepare(root, 48, store_format="jpeg")
    n = len(train.labels)
    sampled = set(folders.decode_sample(n).tolist())
    row = min(set(range(n)) - sampled)  # not among the rows every opening decodes: found when read

    def corrupt(row: int) -> str:
        with open(where / "train_jpeg.bin", "r+b") as f:  # the image's JPEG header, overwritten
            f.seek(int(train.images.offsets[row]))
            f.write(b"\0" * 16)
        return (where / "train_files.txt").read_text().splitlines()[row]

    name = corrupt(row)
    opened, _, _, _ = folders.prepare(root, 48, store_format="jpeg")
    with pytest.raises(KDCacheError, match=rf"damaged: its copy of {name} does not decode.*--rebuild-store") as e:
        np.array(opened.images)
    assert "\n" not in str(e.value)
    # a row of the decoder check's sample: the same line, when the store is opened
    name = corrupt(min(sampled))
    with pytest.raises(KDCacheError, match=rf"damaged: its copy of {name} does not decode.*--rebuild-store"):
        folders.prepare(root, 48, store_format="jpeg")
    # a short file is damage found when the store is opened
    with open(where / "train_jpeg.bin", "r+b") as f:
        f.truncate(int(train.images.offsets[row]))
    with pytest.raises(KDCacheError, match="does not match its offsets.*--rebuild-store"):
        folders.prepare(root, 48, store_format="jpeg")
    fixed, _, _, _ = folders.prepare(root, 48, store_format="jpeg", rebuild=True)
    assert np.array(fixed.images).shape == (n, 3, 48, 48)


def test_a_decoder_that_gives_other_pixels_is_refused_and_changes_the_fingerprint(folder, tmp_path, monkeypatch):
    """Two JPEG decoders may round differently (nvJPEG's IDCT against libjpeg-turbo's): a store is read
    only by a decoder that gives the pixels its builder saw, and those pixels are in the fingerprint a
    cache records, so a cache is never replayed from other pixels."""
    monkeypatch.setenv("KDCACHE_STORE_DIR", str(tmp_path / "stores"))
    train, _, _, where = folders.prepare(folder, 48, store_format="jpeg")
    meta = json.loads((where / "meta.json").read_text())
    check = meta["decode_check"]
    assert (
        check["decoder"].startswith("Pillow ")
        and (check["bytes_sha256"], check["pixels_sha256"]) == train.images.sample_digests()
    )
    subset_fp = folders.content_fingerprint(train.images, train.hw, train.labels, 20)
    real = folders.JpegImages._decode

    def rounds_otherwise(self, rows):  # one pixel of each image one level brighter, as another IDCT might
        images = [im.copy() for im in real(self, rows)]
        for im in images:
            im[0, 0, 0] = int(im[0, 0, 0]) + 1 if im[0, 0, 0] < 255 else 254
        return images

    monkeypatch.setattr(folders.JpegImages, "_decode", rounds_otherwise)
    with pytest.raises(
        KDCacheError, match="JPEG decoder that gives other pixels.*Pillow .* there.*--rebuild-store"
    ) as e:
        folders.prepare(folder, 48, store_format="jpeg")
    assert "\n" not in str(e.value)
    # the same bytes decoded otherwise are other data: a subset's fingerprint (computed when used) differs
    reader = folders.JpegImages(where, "train", train.images.data, train.images.offsets, train.hw, 48)
    assert folders.content_fingerprint(reader, train.hw, train.labels, 20) != subset_fp
    monkeypatch.setattr(folders.JpegImages, "_decode", real)
    # a changed byte of a sampled image that still decodes is damage, not another decoder
    data = bytearray((where / "train_jpeg.bin").read_bytes())
    row = int(folders.decode_sample(len(train.labels))[1])
    end = int(train.images.offsets[row + 1])
    data[end - 200] ^= 0x10  # inside the scan data, well before the end-of-image marker
    (where / "train_jpeg.bin").write_bytes(bytes(data))
    with pytest.raises(KDCacheError, match="damaged.*decoder check's sample images changed.*--rebuild-store"):
        folders.prepare(folder, 48, store_format="jpeg")
    # a jpeg store from before the check is not read on trust
    del meta["decode_check"]
    (where / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="prepared by an earlier kdcache.*--rebuild-store.*no longer match"):
        folders.prepare(folder, 48, store_format="jpeg")
    meta["decode_check"] = {"decoder": 3}
    (where / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="damaged.*decode_check is not a record"):
        folders.prepare(folder, 48, store_format="jpeg")
    assert (
        folders.prepare(folder, 48, store_format="jpeg", rebuild=True)[0].meta["train_fingerprint"]
        == meta["train_fingerprint"]
    )


def test_store_format_auto_picks_by_size_and_bad_values_are_one_line(folder, tmp_path, monkeypatch):
    assert folders.choose_format("auto", 10, 48) == "raw"
    monkeypatch.setattr(folders, "raw_limit", lambda: 10 * 3 * 48 * 48 - 1)
    assert folders.choose_format("auto", 10, 48) == "jpeg" and folders.choose_format("raw", 10, 48) == "raw"
    data = load_dataset("imagefolder", folder, image_size=24, store_size=48)  # auto, over the (patched) limit
    assert data.options["store_format"] == "jpeg" and isinstance(data.train_x, folders.JpegImages)
    for args, needle in (
        (["--store-format", "png"], "--store-format must be one of auto, raw, jpeg"),
        (["--store-format", "jpeg", "--jpeg-quality", "0"], "--jpeg-quality must be in 1..100"),
    ):
        r = run_cli(
            "teacher",
            "--preset",
            "seed-cnn",
            "--data",
            str(folder),
            "--image-size",
            "24",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "t.pt"),
            *args,
        )
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "t.pt").exists()
    meta = json.loads(
        next(p for p in folders.store_root().iterdir() if "jpeg90" in p.name).joinpath("meta.json").read_text()
    )
    assert meta["store_format"] == "jpeg"


@pytest.mark.e2e
def test_a_thousand_class_folder_end_to_end_from_a_jpeg_store_with_a_topk_cache(tmp_path):
    """1,000 classes: jpeg store, teacher, a top-10 cache, a student with the store streamed (decoded per
    batch), `inspect` and `verify`; each process stays within a stated memory budget (2 GB resident)."""
    peaks = {}

    def run(*args):
        r, peaks[args[0]] = run_cli_peak(*args)
        return r

    root = folders.write_image_folder(tmp_path / "many", classes=1000, per_class=2, val_per_class=1)
    t, c, s = tmp_path / "t.pt", tmp_path / "c.h5", tmp_path / "s.pt"
    common = ["--epochs", "1", "--batch-size", "64", "--device", "cpu"]
    r = run(
        "teacher",
        "--preset",
        "seed-cnn",
        "--arch",
        "seed-cnn-student",
        "--data",
        str(root),
        "--image-size",
        "16",
        "--store-format",
        "jpeg",
        "--out",
        str(t),
        *common,
    )
    assert r.returncode == 0, r.stderr
    r = run("dump-logits", "--teacher", str(t), "--views", "2", "--topk", "10", "--device", "cpu", "--out", str(c))
    assert r.returncode == 0, r.stderr
    r = run("inspect", str(c))
    assert r.returncode == 0 and "x 1000 classes" in r.stdout and "top 10 of 1000" in r.stdout, r.stdout + r.stderr
    r = run("verify", str(c), "--teacher", str(t), "--samples", "64", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("student", "--cache", str(c), "--out", str(s), "--resident-mb", "1", *common)
    assert r.returncode == 0 and "stream" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert torch.load(s)["data_options"]["store_format"] == "jpeg"
    assert max(peaks.values()) < 2048, peaks  # each process's own peak, in MB
