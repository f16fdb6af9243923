"""Nothing silently wrong: non-finite numbers in caches, teachers, checkpoints and flags; training
that diverges; two runs aimed at one output. Each case must stop with one line, exit 2, and
leave nothing half-written (and never overwrite good state with bad).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import TINY, assert_one_line_error, cli, dump_args, run_cli, start_cli, wait_for, written

from kdcache.cli import err_console
from kdcache.errors import KDCacheError
from kdcache.stages import train_teacher
from kdcache.train import resume_path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")
    monkeypatch.setattr(err_console, "_width", 200)  # a stage's progress note stays one line


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a cache with `edit(h5py.File)` applied, as a user editing it by hand would."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def student(cache: Path, data_dir: Path, out: Path, *extra: str):
    return cli(
        "student", "--cache", cache, "--data-dir", data_dir, "--out", out, "--epochs", "1", "--device", "cpu", *extra
    )


# ---- 1. non-finite values in a cache are refused where they are read ----------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_student_refuses_a_cache_with_one_nonfinite_logit(tmp_path, cache_file, data_dir, value):
    def poison(f):
        f["logits"][12, 1, 3] = value

    bad = edited_copy(cache_file, tmp_path / "bad.h5", poison)
    out = tmp_path / "out" / "student.pt"
    code, err, _ = student(bad, data_dir, out)
    assert_one_line_error(code, err, "non-finite", "1 row(s)", "row 12 view 1", "kdcache verify")
    assert written(out.parent) == []


def test_student_refuses_view_params_outside_the_recipe(tmp_path, cache_file, data_dir):
    def jump(f):
        f["view_params"][3, 0, 0] = 200  # a crop offset far outside the padded image

    bad = edited_copy(cache_file, tmp_path / "bad.h5", jump)
    code, err, _ = student(bad, data_dir, tmp_path / "s" / "student.pt")
    assert_one_line_error(code, err, "view parameters outside")
    assert written(tmp_path / "s") == []


def _refused_resume(tmp_path, teacher_ckpt, data_dir, edit, *resume_flags) -> tuple[int, str]:
    """Dump 400 rows, turn the cache into an interrupted partial with `edit`, resume with `resume_flags`:
    its exit code and stderr (the partial untouched, nothing published)."""
    out, partial = tmp_path / "c.h5", tmp_path / "c.h5.partial"
    args = [
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--subset",
        "400",
        "--views",
        "4",
        "--seed",
        "0",
        "--batch-size",
        "128",
        "--block-rows",
        "128",
        "--device",
        "cpu",
    ]
    code, err, _ = cli(*args)
    assert code == 0, err

    def interrupted(f):
        f.attrs["complete"] = False
        f.attrs["rows_done"] = 256
        edit(f)

    edited_copy(out, partial, interrupted)
    out.unlink()
    before = partial.read_bytes()
    code, err, _ = cli(*args, *resume_flags, "--resume")
    assert partial.read_bytes() == before and not out.exists()
    return code, err


def test_resumed_dump_refuses_a_partial_with_a_nonfinite_logit(tmp_path, teacher_ckpt, data_dir):
    code, err = _refused_resume(
        tmp_path, teacher_ckpt, data_dir, lambda f: f["logits"].__setitem__((130, 2, 0), np.nan)
    )
    assert_one_line_error(code, err, "non-finite", "row 130 view 2", "--force", started=True)


def test_resumed_dump_refuses_a_partial_started_with_another_tta(tmp_path, teacher_ckpt, data_dir):
    # the rest of the rows would be the mean of each view's and its mirror's logits
    code, err = _refused_resume(tmp_path, teacher_ckpt, data_dir, lambda f: None, "--tta", "flip")
    assert_one_line_error(code, err, "tta='none'", "'flip'", started=True)


# ---- 2. a teacher that answers NaN/inf stops the dump ---------------------------------------------


def test_dump_stops_when_the_teacher_gives_nonfinite_logits(tmp_path, teacher_ckpt, data_dir):
    record = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    last = [k for k in record["state_dict"] if k.endswith("weight")][-1]
    record["state_dict"][last] = record["state_dict"][last] * 1e30  # finite weights, logits beyond fp16
    loud = tmp_path / "loud.pt"
    torch.save(record, loud)
    out_dir = tmp_path / "out"
    code, err, _ = cli(
        "dump-logits",
        "--teacher",
        loud,
        "--data-dir",
        data_dir,
        "--out",
        out_dir / "c.h5",
        "--subset",
        "200",
        "--views",
        "2",
        "--device",
        "cpu",
    )
    line = assert_one_line_error(code, err, "non-finite logits", "first 0", "partial cache was removed", started=True)
    assert "200 row(s)" in line
    assert written(out_dir) == []


# ---- 3. divergence stops training; the last good state is kept ------------------------------------


def test_teacher_with_a_huge_lr_stops_at_the_diverged_epoch(tmp_path, data_dir):
    out = tmp_path / "t" / "teacher.pt"
    code, err, _ = cli(
        "teacher",
        "--preset",
        "seed-cnn",
        "--data-dir",
        data_dir,
        "--subset",
        "200",
        "--epochs",
        "2",
        "--lr",
        "1e6",
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert_one_line_error(code, err, "diverged in epoch 1", "lower --lr", "nothing was kept", started=True)
    assert written(out.parent) == []


def test_divergence_in_a_later_epoch_keeps_the_last_good_resume_state(tmp_path, data_dir, cpu, monkeypatch):
    import kdcache.stages as stages

    out = tmp_path / "teacher.pt"
    recipe = TINY.override(subset=128).override_teacher(epochs=3)  # 2 steps an epoch at batch 64
    steps = {"n": 0}
    real = stages.label_loss

    def nan_from_epoch_2(*args):
        steps["n"] += 1
        loss = real(*args)
        return loss * float("nan") if steps["n"] > 2 else loss

    monkeypatch.setattr(stages, "label_loss", nan_from_epoch_2)
    with pytest.raises(KDCacheError, match="diverged in epoch 2.*state after epoch 1 is kept"):
        train_teacher(recipe, data_dir=data_dir, out=out, rt=cpu)
    assert not out.exists()
    state = torch.load(resume_path(out), map_location="cpu", weights_only=True)
    assert state["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(out.with_name("teacher.pt.metrics.jsonl").read_text().splitlines()) == 1


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path, teacher_ckpt, data_dir):
    record = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    name = next(iter(record["state_dict"]))
    record["state_dict"][name][0] = float("nan")
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(record, nan_ckpt)
    for args in (
        ["dump-logits", "--teacher", nan_ckpt, "--data-dir", data_dir, "--out", tmp_path / "o" / "c.h5"],
        ["eval", nan_ckpt, "--data-dir", data_dir],
    ):
        code, err, _ = cli(*args)
        assert_one_line_error(code, err, "non-finite weights", name)
    assert written(tmp_path / "o") == []


# ---- 4. flags that are not finite numbers --------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value", [("--T", "nan"), ("--T", "inf"), ("--lr", "inf"), ("--lr", "nan"), ("--alpha", "nan")]
)
def test_nonfinite_flags_are_refused(tmp_path, cache_file, data_dir, flag, value):
    code, err, _ = student(cache_file, data_dir, tmp_path / "s" / "s.pt", flag, value)
    assert_one_line_error(code, err, flag)
    assert written(tmp_path / "s") == []


# ---- 5. two runs writing one output ----------------------------------------------------------------


def test_a_second_dump_to_the_same_out_is_refused_and_the_first_finishes(tmp_path, teacher_ckpt, data_dir):
    out = tmp_path / "cache.h5"
    longer = ["--views", "24"]  # the last --views wins: the first dump is still running when the second starts
    first = start_cli(*dump_args(teacher_ckpt, data_dir, out), *longer)
    wait_for(first, lambda: (tmp_path / "cache.h5.partial").exists(), "the first dump started writing")
    second = run_cli(*dump_args(teacher_ckpt, data_dir, out), "--force")
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    line = assert_one_line_error(second.returncode, second.stderr, "another kdcache run", str(out))
    assert f"pid {first.pid}" in line
    code, err, _ = cli("verify", out, "--teacher", teacher_ckpt, "--data-dir", data_dir, "--samples", "16")
    assert code == 0, err  # the first run's cache is whole
    assert not (tmp_path / "cache.h5.lock").exists()


def test_a_second_student_to_the_same_out_is_refused(tmp_path, cache_file, data_dir):
    out = tmp_path / "student.pt"
    args = [
        "student",
        "--cache",
        str(cache_file),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--epochs",
        "5000",
        "--device",
        "cpu",
    ]
    first = start_cli(*args)
    wait_for(first, lambda: resume_path(out).exists(), "the first student finished an epoch")
    second = run_cli(*args, "--force")
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=120)
    assert_one_line_error(second.returncode, second.stderr, "another kdcache run")
    assert first.returncode == 143, first_err
    assert torch.load(resume_path(out), map_location="cpu", weights_only=True)["epochs_done"] >= 1


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, cache_file, data_dir):
    out = tmp_path / "student.pt"
    (tmp_path / "student.pt.lock").write_text("12345\n")  # what SIGKILL leaves: the file, no flock
    code, err, _ = student(cache_file, data_dir, out)
    assert code == 0, err
    assert out.exists() and not (tmp_path / "student.pt.lock").exists()


# ---- 6. caches edited by hand ------------------------------------------------------------------


def test_a_cache_missing_an_attribute_is_refused(tmp_path, cache_file, data_dir):
    def drop(f):
        del f.attrs["num_classes"]

    bad = edited_copy(cache_file, tmp_path / "bad.h5", drop)
    for args in (
        ["student", "--cache", bad, "--data-dir", data_dir, "--out", tmp_path / "s" / "s.pt"],
        ["inspect", bad],
    ):
        code, err, _ = cli(*args)
        assert_one_line_error(code, err, "num_classes", "recreate")
