"""`kdcache verify` proves a cache against its teacher and data (exit 0), or says exactly what is
wrong (exit 1); `kdcache inspect` summarises one, complete or interrupted.

The session cache (conftest) is never modified: every damaged cache here is a copy.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import run_cli
from typer.testing import CliRunner

from kdcache import cli
from kdcache.data import write_fake_cifar10

ONE = {"OMP_NUM_THREADS": "1", "KDCACHE_OFFLINE": "1"}
ROW = 300  # the row damaged by hand; the session cache has 400 rows in blocks of 128 (256-383 holds it)


@pytest.fixture(autouse=True)
def _offline_and_wide(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")
    monkeypatch.setattr(cli.out_console, "_width", 200)  # one table row per line, as with COLUMNS=200


def invoke(*args):
    result = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def verify(cache: Path, teacher: Path, data_dir: Path, *extra: str):
    return invoke("verify", cache, "--teacher", teacher, "--data-dir", data_dir, "--device", "cpu", *extra)


def failed_checks(stderr: str) -> set[str]:
    """The names in `verify failed: a, b` (the last stderr line)."""
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("verify failed: "), stderr
    return set(line.removeprefix("verify failed: ").split(", "))


def check_line(stdout: str, name: str) -> str:
    """The table row of check `name`."""
    rows = [line for line in stdout.splitlines() if line.strip().strip("│").split("│")[0].strip() == name]
    assert len(rows) == 1, f"no single row for {name!r} in:\n{stdout}"
    return rows[0]


@pytest.fixture
def copy(tmp_path, cache_file):
    """A private copy of the session cache, changed by `edit(f)` with h5py."""

    def make(edit=None) -> Path:
        path = tmp_path / "cache.h5"
        shutil.copy(cache_file, path)
        if edit is not None:
            with h5py.File(path, "r+") as f:
                edit(f)
        return path

    return make


# ---- verify --------------------------------------------------------------------------------------


def test_verify_passes_a_clean_cache(cache_file, teacher_ckpt, data_dir):
    r = run_cli(
        "verify",
        str(cache_file),
        "--teacher",
        str(teacher_ckpt),
        "--data-dir",
        str(data_dir),
        "--samples",
        "64",
        "--device",
        "cpu",
        env=ONE,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and "verify failed" not in r.stderr
    for name in (
        "complete",
        "finite logits",
        "view params",
        "block checksums",
        "dataset fingerprint",
        "labels",
        "teacher",
        "teacher replay",
    ):
        assert " ok " in check_line(r.stdout, name), name
    replay = check_line(r.stdout, "teacher replay")
    assert re.search(r"64 views re-rendered: max \|error\| 0\.0\d+, argmax agreement \d+\.\d\d%", replay), replay


def add_to_logits(f):
    f["logits"][ROW] = f["logits"][ROW] + 4.0


def nan_logit(f):
    f["logits"][ROW, 1, 3] = np.nan


def other_view(f):
    p = f["view_params"][ROW]
    p[0] = (p[0] + 1) % 9
    f["view_params"][ROW] = p


# (id, damage, the checks that must fail, the check whose detail names the row, that detail)
CORRUPTIONS = [
    (
        "one-row-of-logits",
        add_to_logits,
        {"block checksums", "teacher replay"},
        "teacher replay",
        f"rows {ROW} disagree",
    ),
    ("a-nan", nan_logit, {"finite logits", "block checksums"}, "finite logits", f"non-finite logits in rows {ROW}"),
    ("a-view", other_view, {"view params", "block checksums", "teacher replay"}, "view params", f"rows {ROW} differ"),
]


@pytest.mark.parametrize("edit, failing, check, detail", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_verify_names_a_corrupted_row(edit, failing, check, detail, copy, teacher_ckpt, data_dir):
    r = verify(copy(edit), teacher_ckpt, data_dir, "--samples", "32")
    assert r.exit_code == 1, r.output
    assert failed_checks(r.stderr) == failing
    assert "FAIL" in check_line(r.stdout, check) and detail in check_line(r.stdout, check)
    assert "rows 256-383 changed after the dump" in check_line(r.stdout, "block checksums")


def test_verify_rejects_another_teacher(copy, teacher_ckpt, data_dir, tmp_path):
    record = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    record["state_dict"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in record["state_dict"].items()}
    other = tmp_path / "other-teacher.pt"
    torch.save(record, other)
    r = verify(copy(), other, data_dir, "--samples", "32")
    assert r.exit_code == 1, r.output
    assert failed_checks(r.stderr) == {"teacher", "teacher replay"}
    assert "not the teacher this cache was made with" in check_line(r.stdout, "teacher")


def test_verify_rejects_other_data(copy, teacher_ckpt, tmp_path):
    other = tmp_path / "other-data"
    write_fake_cifar10(other, num_train=1000, seed=1)
    r = verify(copy(), teacher_ckpt, other, "--samples", "32")
    assert r.exit_code == 1, r.output
    assert {"dataset fingerprint", "labels", "teacher replay"} <= failed_checks(r.stderr)
    assert "the cache says" in check_line(r.stdout, "dataset fingerprint")


def interrupted_dump(f):
    """What a dump killed after its first block leaves: later rows never written, no final metrics."""
    for name in ("logits", "view_params", "labels", "indices"):
        f[name][128:] = 0
    f.attrs.update(complete=False, rows_done=128)
    for key in ("teacher_test_acc", "teacher_view_acc", "dump_time_s"):
        if key in f.attrs:
            del f.attrs[key]


def test_verify_rejects_an_incomplete_cache(copy, teacher_ckpt, data_dir):
    r = verify(copy(interrupted_dump), teacher_ckpt, data_dir, "--samples", "32")
    assert r.exit_code == 1, r.output
    assert failed_checks(r.stderr) == {"complete"}  # the rows written are fine; the empty ones are not "wrong"
    assert "only 128 of 400 rows written" in check_line(r.stdout, "complete")
    assert "--resume" in check_line(r.stdout, "complete")


def test_verify_rejects_metadata_that_contradicts_the_data(copy, teacher_ckpt, data_dir):
    def lie(f):
        f.attrs["num_views"] = 5

    r = verify(copy(lie), teacher_ckpt, data_dir)  # refused as it is opened: nothing in it can be trusted
    assert r.exit_code == 2, r.output
    assert "its attributes say (400, 5, 10)" in r.stderr and "edited or damaged" in r.stderr


# ---- inspect -------------------------------------------------------------------------------------


def entropy(logits: np.ndarray, T: float) -> float:
    logp = torch.log_softmax(torch.from_numpy(logits).float() / T, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def shown_entropy(stdout: str, T: str) -> float:
    m = re.search(rf"mean soft-target entropy at T={re.escape(T)}\s*│\s*([\d.]+) nats", stdout)
    assert m, stdout
    return float(m.group(1))


def test_inspect_summarises_a_cache(cache_file):
    r = run_cli("inspect", str(cache_file), "--T", "2", env=ONE)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    with h5py.File(cache_file, "r") as f:
        a = dict(f.attrs)
        logits = f["logits"][...]
    expected = [
        ("format", "kdcache-logits v2"),
        ("complete", "yes"),
        ("dataset", f"cifar10 · fingerprint {a['dataset_fingerprint'][:16]}"),
        ("N x K x C", "400 images x 4 views x 10 classes"),
        ("logits", "float16"),
        ("size on disk", f"{cache_file.stat().st_size / 1e6:.1f} MB"),
        ("teacher", "seed-cnn-teacher"),
        ("teacher test accuracy", f"{100 * a['teacher_test_acc']:.2f}%"),
        ("teacher accuracy on cached views", f"{100 * a['teacher_view_acc']:.2f}%"),
        ("created", str(a["created_utc"])),
    ]
    for field, value in expected:
        assert value in check_line(out, field), (field, value)
    assert shown_entropy(out, "2") == pytest.approx(entropy(logits, 2.0), abs=1.5e-3)


@pytest.mark.parametrize(
    "views, augment, mix, prob, words, schedule",
    [
        (4, True, "none", 1, "pad-4 crop + flip · unmixed", "once every 4 epochs (crop/flip draws can coincide"),
        (1, False, "none", 1, "plain images (no augmentation) · unmixed", "one view per image, the same one every"),
        (2, False, "cutmix", 1, "plain images (no augmentation) · mixed: cutmix", "2 epochs before a student sees"),
        (2, False, "mixup", 0.5, "plain images (no augmentation) · mixed: mixup", "unmixed views are all the plain"),
    ],
)
def test_inspect_says_what_the_views_are_without_contradicting_itself(
    tmp_path, teacher_ckpt, data_dir, cpu, views, augment, mix, prob, words, schedule
):
    """A plain-image cache (the demo's) names no crop/flip recipe and no draws that could coincide."""
    from kdcache.dump import dump_logits
    from kdcache.verify import cache_summary

    out = tmp_path / "c.h5"
    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=out,
        views=views,
        seed=0,
        batch_size=128,
        rt=cpu,
        subset=60,
        augment=augment,
        mix=mix,
        mix_prob=prob,
    )
    rows = dict(cache_summary(out))
    assert words in rows["views"] and schedule in rows["view schedule"], rows
    assert rows["N x K x C"] == f"60 images x {views} view{'s' if views > 1 else ''} x 10 classes"
    assert ("pad4-crop-flip" in rows["format"]) == augment, rows["format"]
    assert ("coincide" in rows["view schedule"]) == (augment and views > 1 and mix == "none")


def test_inspect_entropy_follows_T(cache_file):
    with h5py.File(cache_file, "r") as f:
        logits = f["logits"][...]
    shown = {}
    for T in ("0.5", "1", "8"):
        r = invoke("inspect", cache_file, "--T", T)
        assert r.exit_code == 0, r.output
        shown[T] = shown_entropy(r.stdout, T)
        assert shown[T] == pytest.approx(entropy(logits, float(T)), abs=1.5e-3)
    assert shown["0.5"] < shown["1"] < shown["8"] <= np.log(10) + 1e-3


def test_inspect_an_interrupted_dump(copy):
    path = copy(interrupted_dump)
    with h5py.File(path, "r") as f:
        written = f["logits"][:128]
    r = invoke("inspect", path, "--T", "1")
    assert r.exit_code == 0, r.output
    assert "no: 128 of 400 rows written" in check_line(r.stdout, "complete")
    assert "n/a (incomplete)" in check_line(r.stdout, "teacher test accuracy")
    # Averaged over the rows written only, not the empty rest.
    assert shown_entropy(r.stdout, "1") == pytest.approx(entropy(written, 1.0), abs=1.5e-3)
