"""Image folders: the prepared store, random-resized-crop views, errors, and the whole flow on a
small generated folder written with PIL in the real layout (JPEG, PNG, greyscale, palette)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image
from typer.testing import CliRunner

from kdcache import folders
from kdcache.cli import app
from kdcache.data import load_dataset
from kdcache.errors import KDCacheError
from kdcache.views import ResizedCrop, Views, mix_params, render_views


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return folders.write_image_folder(tmp_path_factory.mktemp("imgs") / "shapes", classes=3, per_class=10)


def test_store_is_made_once_and_holds_every_image_as_rgb(folder):
    train, val, classes, where = folders.prepare(folder, 48)
    assert classes == ["class_00", "class_01", "class_02"]
    assert train.images.shape == (30, 3, 48, 48) and len(val.labels) == 9
    assert sorted(np.bincount(train.labels).tolist()) == [10, 10, 10]
    # every image fits the store, aspect kept; the canvas repeats the last row and column
    for i in range(len(train.labels)):
        h, w = train.hw[i]
        assert max(h, w) <= 48
        assert (train.images[i, :, h:, :w] == train.images[i, :, h - 1 : h, :w]).all()
        assert (train.images[i, :, :, w:] == train.images[i, :, :, w - 1 : w]).all()
    fp = folders.content_fingerprint(train.images, train.hw, train.labels)
    assert train.meta["train_fingerprint"] == fp
    changed = np.array(train.images)
    changed[3, 0, 0, 0] ^= 1
    assert folders.content_fingerprint(changed, train.hw, train.labels) != fp
    stamp = (where / "meta.json").stat().st_mtime_ns
    folders.prepare(folder, 48)
    assert (where / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_decoding_handles_greyscale_palette_cmyk_and_exif_rotation(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    for name, im in {"l.png": rgb.convert("L"), "p.png": rgb.convert("P"), "cmyk.jpg": rgb.convert("CMYK")}.items():
        im.save(tmp_path / name)
        assert folders.decode(tmp_path / name, 64).shape == (3, 20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rgb.save(tmp_path / "rot.jpg", exif=exif)
    assert folders.decode(tmp_path / "rot.jpg", 64).shape == (3, 40, 20)
    assert folders.decode(tmp_path / "rot.jpg", 10).shape == (3, 10, 5)  # shrunk to fit, aspect kept


def test_val_fraction_is_a_deterministic_stratified_holdout(tmp_path):
    root = folders.write_image_folder(tmp_path / "noval", classes=3, per_class=10, with_val=False)
    _, train, val = folders.scan(root, 0.2)
    assert np.bincount(val.labels).tolist() == [2, 2, 2]
    assert not set(train.files) & set(val.files)
    assert folders.scan(root, 0.2)[2].files == val.files


def test_dataset_views_and_eval_split(folder):
    data = load_dataset("imagefolder", folder, image_size=24, store_size=48)
    assert data.train_x.shape == (30, 3, 48, 48) and data.test_x.shape == (9, 3, 24, 24)
    assert data.options["image_size"] == 24 and data.classes[0] == "class_00"
    sub = load_dataset("imagefolder", folder, subset=12, image_size=24, store_size=48)
    assert len(sub.train_y) == 12 and sub.fingerprint != data.fingerprint
    assert len(set(sub.train_y.tolist())) > 1  # the row order mixes the classes


def test_random_resized_crop_params_follow_torchvision_and_are_pure():
    hw = torch.tensor([[90, 120], [120, 90], [40, 200]])
    g = ResizedCrop(hw, 32)
    p = g.params(3, range(3), range(500)).long()
    assert torch.equal(p, g.params(3, range(3), range(500)).long())
    assert torch.equal(p[1:2, 7:9], g.params(3, [1], [7, 8]).long())  # any subset of (row, view)
    y0, x0, h, w, flip = p.unbind(-1)
    H, W = hw[:, None, 0], hw[:, None, 1]
    assert ((y0 >= 0) & (x0 >= 0) & (y0 + h <= H) & (x0 + w <= W)).all()
    area = (h * w).float() / (H * W)
    assert area[:2].min() >= 0.07 and area[:2].max() <= 1.0
    assert 0.35 < flip.float().mean() < 0.65
    plain = g.params(3, range(3), [0], augment=False)[:, 0].long()
    assert plain[0].tolist() == [6, 20, 79, 79, 0]  # centred (as CenterCrop rounds) square of 0.875 x 90


def test_rrc_rendering_is_close_to_torchvision_on_pil(tmp_path):
    """The measured difference quoted in docs/image-folders.md: mean well under one grey level."""
    from torchvision.transforms import functional as F

    rng = np.random.default_rng(1)
    pils, hw = [], []
    canvas = np.zeros((12, 3, 64, 64), np.uint8)
    for i in range(12):
        h, w = int(rng.integers(30, 65)), int(rng.integers(30, 65))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.clip(
            128 + 100 * np.sin(xx / 3 + i)[..., None] * np.cos(yy / 5)[..., None] + rng.normal(0, 10, (h, w, 3)), 0, 255
        )
        a = img.astype(np.uint8)
        pils.append(Image.fromarray(a))
        canvas[i, :, :h, :w] = a.transpose(2, 0, 1)
        canvas[i, :, h:, :w] = canvas[i, :, h - 1 : h, :w]
        canvas[i, :, :, w:] = canvas[i, :, :, w - 1 : w]
        hw.append((h, w))
    g = ResizedCrop(torch.tensor(hw), 24)
    params = g.params(0, range(12), range(4)).reshape(-1, 5)
    rows = torch.arange(12).repeat_interleave(4)
    ours = g.pixels(torch.from_numpy(canvas), rows, params).numpy().astype(int)
    ref = []
    for r, (y0, x0, h, w, fl) in zip(rows.tolist(), params.tolist(), strict=False):
        im = F.resized_crop(pils[r], y0, x0, h, w, [24, 24], antialias=True)
        ref.append(np.asarray(F.hflip(im) if fl else im).transpose(2, 0, 1))
    err = np.abs(ours - np.stack(ref).astype(int))
    assert err.mean() < 1.5, err.mean()


def test_mixed_rrc_views_fit_the_partner_and_render(folder):
    data = load_dataset("imagefolder", folder, image_size=24, store_size=48)
    g, n = data.geometry, len(data.train_y)
    images = torch.from_numpy(np.array(data.train_x))  # the store, loaded as Runtime.place loads it
    m = mix_params(0, range(n), range(6), num_rows=n, mix="both", prob=1.0, geometry=g)
    assert g.valid(m.crop, m.partner).all()
    crop = g.params(0, range(n), [0])[:, 0]
    x = render_views(images, torch.arange(n), Views(g, crop, m[:, 0]), (0.5,) * 3, (0.25,) * 3)
    assert x.shape == (n, 3, 24, 24) and torch.isfinite(x).all()
    # an unmixed view in a mixed batch renders as the plain view
    plain = render_views(images, torch.arange(n), Views(g, crop), (0.5,) * 3, (0.25,) * 3)
    unmixed = mix_params(0, range(n), [0], num_rows=n, mix="both", prob=0.0, geometry=g)[:, 0]
    assert torch.equal(render_views(images, torch.arange(n), Views(g, crop, unmixed), (0.5,) * 3, (0.25,) * 3), plain)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda r: r.mkdir(), "has no train/ folder"),
        (lambda r: (r / "train").mkdir(parents=True), "has no class folders"),
        (lambda r: (folders.write_image_folder(r), (r / "train" / "zz_empty").mkdir()), "zz_empty has no images"),
        (lambda r: (folders.write_image_folder(r), (r / "val" / "extra").mkdir()), "val has other classes"),
        (
            lambda r: (folders.write_image_folder(r), (r / "train" / "class_00" / "x.jpg").write_text("no image")),
            "x.jpg does not decode as an image",
        ),
        (lambda r: folders.write_image_folder(r, with_val=False), "no val/ folder"),
    ],
)
def test_bad_folders_are_one_line_errors(tmp_path, make, needle):
    root = tmp_path / "d"
    make(root)
    res = CliRunner().invoke(
        app,
        [
            "teacher",
            "--preset",
            "seed-cnn",
            "--data",
            str(root),
            "--dataset",
            "imagefolder",
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "t.pt"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert not (tmp_path / "t.pt").exists()
    assert not list(Path(os.environ["KDCACHE_STORE_DIR"]).glob("*.partial"))


def test_bad_images_can_be_skipped_and_are_listed(tmp_path):
    root = folders.write_image_folder(tmp_path / "d")
    (root / "train" / "class_01" / "broken.png").write_bytes(b"\x89PNG not really")
    train, _, _, where = folders.prepare(root, 32, skip_bad=True)
    assert len(train.labels) == 24 and train.images.shape[0] == 24
    meta = json.loads((where / "meta.json").read_text())
    assert meta["train_skipped"][0].startswith("train/class_01/broken.png")


def test_a_changed_folder_is_noticed_and_rebuilt_on_request(tmp_path):
    root = folders.write_image_folder(tmp_path / "d")
    folders.prepare(root, 32)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(root / "train" / "class_00" / "new.png")
    with pytest.raises(KDCacheError, match="changed since its store .* --rebuild-store"):
        folders.prepare(root, 32)
    train, *_ = folders.prepare(root, 32, rebuild=True)
    assert len(train.labels) == 25


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--image-size", "4"], "--image-size must be in 8..255"),
        (["--image-size", "64", "--store-size", "48"], "above the store size 48"),
        (["--arch", "torchvision:no_such_net"], "torchvision has no classification model"),
        (["--arch", "no_such_module_xyz:make"], "cannot import no_such_module_xyz"),
        (["--arch", "os:getcwd"], "raised TypeError"),
        (["--arch", "byo_models:not_a_module"], "returned a dict, not a torch nn.Module"),
        (["--arch", "byo_models:nothing"], "byo_models has no 'nothing'"),
    ],
)
def test_bad_sizes_and_model_specs(folder, tmp_path, args, needle):
    res = CliRunner().invoke(
        app,
        [
            "teacher",
            "--preset",
            "seed-cnn",
            "--data",
            str(folder),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "t.pt"),
            *args,
        ],
    )
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "t.pt").exists()


def test_image_size_flags_need_an_image_folder(data_dir, tmp_path):
    res = CliRunner().invoke(
        app, ["teacher", "--data-dir", str(data_dir), "--image-size", "64", "--out", str(tmp_path / "t.pt")]
    )
    assert res.exit_code == 2 and "--image-size applies to image folders" in res.output


@pytest.mark.e2e
def test_whole_flow_on_an_image_folder(folder, tmp_path):
    """teacher -> dump (mixed RRC views) -> verify -> student -> eval, as a user runs them."""
    t, c, s = tmp_path / "t.pt", tmp_path / "c.h5", tmp_path / "s.pt"
    common = ["--epochs", "1", "--batch-size", "16"]
    r = run_cli(
        "teacher", "--preset", "seed-cnn", "--data", str(folder), "--image-size", "24", "--out", str(t), *common
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("dump-logits", "--teacher", str(t), "--views", "3", "--mix", "cutmix", "--out", str(c))
    assert r.returncode == 0, r.stderr
    assert "random-resized crop to 24 px" in r.stdout
    r = run_cli("verify", str(c), "--teacher", str(t), "--samples", "32")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("student", "--cache", str(c), "--out", str(s), *common)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(s))
    assert r.returncode == 0 and "imagefolder test split, 9 images" in r.stdout, r.stdout + r.stderr


def test_a_streamed_store_trains_and_dumps_exactly_as_a_resident_one(folder, tmp_path):
    """Over the resident budget, batches are gathered from the memory-mapped store in a background
    thread; the weights and the cache come out bit for bit the same."""
    import h5py

    from kdcache.config import get_preset
    from kdcache.dump import dump_logits
    from kdcache.runtime import Runtime
    from kdcache.stages import train_student, train_teacher

    recipe = (
        get_preset("seed-cnn")
        .override(dataset="imagefolder", epochs=2, batch_size=8, mix="both", augment=True)
        .override_teacher(epochs=2)
    )
    opts = {"image_size": 24, "store_size": 48}
    results = []
    for mb in (None, 0.0):
        rt = Runtime.create("cpu", "fp32", resident_mb=mb)
        d = tmp_path / str(mb)
        train_teacher(recipe, data_dir=folder, out=d / "t.pt", rt=rt, data_options=opts)
        dump_logits(
            teacher_path=d / "t.pt", data_dir=None, out=d / "c.h5", views=3, seed=0, batch_size=16, rt=rt, mix="both"
        )
        train_student(recipe, cache_file=d / "c.h5", data_dir=None, out=d / "s.pt", rt=rt)
        with h5py.File(d / "c.h5") as f:
            logits = f["logits"][...]
        results.append((torch.load(d / "t.pt")["state_dict"], logits, torch.load(d / "s.pt")["state_dict"]))
    (t0, c0, s0), (t1, c1, s1) = results
    assert all(torch.equal(t0[k], t1[k]) for k in t0)
    assert np.array_equal(c0, c1)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_a_sweep_holds_images_out_of_a_folder_store_streamed_or_resident(folder, tmp_path, monkeypatch):
    """An image folder's images stay in their store: the sweep trains on its kept rows, read lazily, and
    picks on the held-out ones; streamed from the memory-mapped store it gives the same students."""
    from kdcache.config import get_preset
    from kdcache.dump import dump_logits
    from kdcache.runtime import Runtime
    from kdcache.stages import student_recipe, train_teacher
    from kdcache.sweeps import SweepSpec, run_sweep

    recipe = get_preset("seed-cnn").override(dataset="imagefolder", epochs=1, batch_size=8).override_teacher(epochs=1)
    rt = Runtime.create("cpu", "fp32")
    train_teacher(recipe, data_dir=folder, out=tmp_path / "t.pt", rt=rt, data_options={"image_size": 24})
    cache = dump_logits(
        teacher_path=tmp_path / "t.pt", data_dir=None, out=tmp_path / "c.h5", views=2, seed=0, batch_size=16, rt=rt
    )
    base = student_recipe(cache, None, {}, {"epochs": 2})
    spec = SweepSpec(T=(2.0,), alpha=(0.5,), seeds=(0,), val_fraction=0.2, backend="loop", keep="all")
    import kdcache.batches as batches

    streamed, real = [], batches.prefetch
    monkeypatch.setattr(batches, "prefetch", lambda store, *a, **k: streamed.append(store) or real(store, *a, **k))
    weights = []
    for mb in (None, 0.01):  # 10 kB: the cached targets (720 bytes) fit, the images (60 kB) stream
        out = tmp_path / f"sweep-{mb}"
        rec = run_sweep(
            base, spec, cache_file=cache, data_dir=None, out=out, rt=Runtime.create("cpu", "fp32", resident_mb=mb)
        )
        assert rec.record["pick_on"] == "val" and rec.record["data"]["val_images"] == 6
        assert bool(streamed) == (mb is not None)
        assert rec.record["data"]["train_images"] == 24
        weights.append(
            {s["name"]: torch.load(out / "students" / f"{s['name']}.pt")["state_dict"] for s in rec.record["students"]}
        )
        best = torch.load(out / "best.pt")
        assert (best["sweep"]["train_images"], best["sweep"]["val_images"]) == (24, 6)
    assert streamed and all(isinstance(s, batches.RowsOf) for s in streamed)
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        assert all(torch.equal(w[k], weights[1][name][k]) for k in w), name


def test_gather_rows_renumbers_own_and_partner_rows():
    from kdcache.batches import gather_rows

    store = np.arange(10 * 3 * 2 * 2, dtype=np.uint8).reshape(10, 3, 2, 2)
    rows, partner = torch.tensor([7, 2, 7, 5]), torch.tensor([2, -1, 9, 5])
    block, local, lp = gather_rows(store, rows, partner)
    assert block.shape[0] == 4  # rows 2, 5, 7, 9, each read once
    assert torch.equal(block[local], torch.from_numpy(store[rows.numpy()]))
    assert lp[1] == -1 and torch.equal(block[lp[[0, 2, 3]]], torch.from_numpy(store[[2, 9, 5]]))


def _reference_view(img: np.ndarray, box, size: int) -> np.ndarray:
    """The documented meaning of an rrc-flip view in plain numpy: box rows y0:y0+h, columns x0:x0+w of the
    image (pixel i covers [i, i+1)); each output pixel averages ceil(h/size) x ceil(w/size) bilinear
    samples (edges clamped) at the centres of its sub-cells; rounded to uint8; mirrored if flip."""
    y0, x0, h, w, flip = box
    H, W = img.shape[1:]
    gy, gx = -(-h // size), -(-w // size)
    out = np.zeros((3, size, size))

    def sample(y, x):
        y, x = min(max(y, 0.0), H - 1.0), min(max(x, 0.0), W - 1.0)
        yl, xl = int(y), int(x)
        yh, xh = min(yl + 1, H - 1), min(xl + 1, W - 1)
        ly, lx = y - yl, x - xl
        return (
            (1 - ly) * (1 - lx) * img[:, yl, xl]
            + (1 - ly) * lx * img[:, yl, xh]
            + ly * (1 - lx) * img[:, yh, xl]
            + ly * lx * img[:, yh, xh]
        )

    for oy in range(size):
        for ox in range(size):
            acc = 0.0
            for iy in range(gy):
                for ix in range(gx):
                    y = y0 + (oy + (iy + 0.5) / gy) * h / size - 0.5
                    x = x0 + (ox + (ix + 0.5) / gx) * w / size - 0.5
                    acc = acc + sample(y, x)
            out[:, oy, ox] = acc / (gy * gx)
    out = np.clip(np.round(out), 0, 255)
    return out[:, :, ::-1] if flip else out


def test_rrc_renderer_matches_a_numpy_reference_of_the_documented_box_meaning():
    rng = np.random.default_rng(3)
    hw = [(20, 31), (40, 17), (9, 12)]
    canvas = np.zeros((3, 3, 40, 40), np.uint8)
    images = []
    for i, (h, w) in enumerate(hw):
        img = rng.integers(0, 256, (3, h, w)).astype(np.uint8)
        images.append(img.astype(np.float64))
        canvas[i, :, :h, :w] = img
        canvas[i, :, h:, :w] = img[:, h - 1 : h]
        canvas[i, :, :, w:] = canvas[i, :, :, w - 1 : w]
    g = ResizedCrop(torch.tensor(hw), 8)
    params = g.params(1, range(3), range(6)).reshape(-1, 5)
    rows = torch.arange(3).repeat_interleave(6)
    ours = g.pixels(torch.from_numpy(canvas), rows, params).numpy().astype(int)
    ref = np.stack(
        [_reference_view(images[r], p, 8) for r, p in zip(rows.tolist(), params.tolist(), strict=False)]
    ).astype(int)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1 and diff.mean() < 0.01  # float rounding at .5 only


@pytest.mark.e2e
def test_pipeline_resume_refuses_a_teacher_of_another_image_size(folder, tmp_path):
    from kdcache.config import get_preset
    from kdcache.pipeline import run_pipeline
    from kdcache.runtime import Runtime

    rt = Runtime.create("cpu", "fp32")
    recipe = get_preset("seed-cnn").override(dataset="imagefolder", epochs=1, batch_size=16).override_teacher(epochs=1)
    run_pipeline(recipe, preset="t", run_dir=tmp_path / "p", data_dir=folder, rt=rt, data_options={"image_size": 16})
    with pytest.raises(KDCacheError, match="image_size=16, this run asks for 24"):
        run_pipeline(
            recipe,
            preset="t",
            run_dir=tmp_path / "p",
            data_dir=folder,
            rt=rt,
            resume=True,
            data_options={"image_size": 24},
        )
