"""Interrupted runs: a dump or a training run killed with SIGKILL (or stopped with Ctrl-C)
leaves nothing at the final path, and `--resume` finishes it with exactly the result of an
uninterrupted run of the same command (CPU, same arguments).

Every run here uses one intra-op thread (OMP_NUM_THREADS=1 in the children, the `one_thread`
fixture in this process): all runs compared must use the same thread count to be bit-equal,
and on a busy 2-core machine one thread is 10-25x faster than two for these small models.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import h5py
import pytest
import torch
from helpers import (
    DUMP_BATCH,
    DUMP_BLOCK,
    DUMP_ROWS,
    DUMP_SEED,
    DUMP_VIEWS,
    dump_args,
    run_cli,
    start_cli,
    wait_for,
)
from typer.testing import CliRunner

from kdcache.checkpoints import read_checkpoint
from kdcache.cli import app
from kdcache.config import get_preset
from kdcache.data import write_fake_cifar10
from kdcache.dump import dump_logits
from kdcache.stages import train_student, train_teacher

ONE = {"OMP_NUM_THREADS": "1", "KDCACHE_OFFLINE": "1"}

# The dump under test: helpers.dump_args (400 images x 8 views in 20 blocks of 20 rows).
# The teacher under test: seed-cnn-teacher on 40 images for 6 epochs, with the default recipe's
# SGD + momentum + cosine schedule, crop+flip views and dropout: every kind of state is exercised.
TEACHER = dict(subset=40, epochs=6, batch_size=20, lr=0.01, seed=1)
# The student under test: seed-cnn-student (Adam, KD loss) on the session cache (400 x 4 views),
# so the per-epoch view schedule cycles through the K views.
STUDENT = dict(epochs=12, batch_size=64, T=2.0, alpha=0.5, seed=0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill(proc: subprocess.Popen, sig: int) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return err


def rows_done(partial: Path) -> int:
    """The writer's resume point, read while it may be mid-write (-1 when unreadable right now)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["rows_done"])
    except Exception:
        return -1


def metrics_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def cli_ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr}"


def assert_refused(args: list[str], *needles: str) -> str:
    """In-process CLI run that must fail with exit 2 and one `error:` line containing `needles`."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---- dump-logits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_dump(tmp_path_factory, teacher_ckpt, data_dir, cpu) -> Path:
    """The same dump, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("ref-dump") / "cache.h5"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dump_logits(
            teacher_path=teacher_ckpt,
            data_dir=data_dir,
            out=out,
            views=DUMP_VIEWS,
            seed=DUMP_SEED,
            batch_size=DUMP_BATCH,
            rt=cpu,
            subset=DUMP_ROWS,
            augment=True,
            block_rows=DUMP_BLOCK,
        )
    finally:
        torch.set_num_threads(before)
    return out


def partial_state(path: Path) -> tuple:
    with h5py.File(path, "r") as f:
        return int(f.attrs["rows_done"]), bool(f.attrs["complete"]), f["logits"][...].tobytes()


def assert_same_cache(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa.attrs["complete"] and fb.attrs["complete"]
        assert int(fa.attrs["rows_done"]) == int(fb.attrs["rows_done"]) == DUMP_ROWS
        for name in ("view_params", "logits", "labels", "indices", "block_sha256", "test_logits"):
            x, y = fa[name][...], fb[name][...]
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert x.tobytes() == y.tobytes(), f"{name} differs after resume"
        for key in (
            "dataset_fingerprint",
            "teacher_sha256",
            "num_views",
            "seed",
            "teacher_test_acc",
            "teacher_view_acc",
        ):
            assert fa.attrs[key] == fb.attrs[key], key


def test_dump_sigkill_then_resume_equals_uninterrupted(tmp_path, teacher_ckpt, data_dir, reference_dump, one_thread):
    out = tmp_path / "cache.h5"
    partial = tmp_path / "cache.h5.partial"
    args = dump_args(teacher_ckpt, data_dir, out)

    proc = start_cli(*args)
    wait_for(proc, lambda: rows_done(partial) > 0, "the first block was written")
    kill(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL

    # Killed mid-way: nothing at the final path, a partial that says how far it got.
    assert not out.exists()
    with h5py.File(partial, "r") as f:
        done = int(f.attrs["rows_done"])
        assert not f.attrs["complete"]
    assert 0 < done < DUMP_ROWS and done % DUMP_BLOCK == 0

    # The interrupted state is never thrown away silently, nor resumed with other arguments.
    snapshot = partial_state(partial)
    assert_refused(args, "--resume", "--force")
    assert_refused([*args, "--resume", "--views", "4"], "num_views", "--force")
    assert partial_state(partial) == snapshot and not out.exists()

    cli_ok(run_cli(*args, "--resume", env=ONE))
    assert out.exists() and not partial.exists()
    assert_same_cache(out, reference_dump)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_dump_ctrl_c_keeps_a_resumable_partial(
    tmp_path, teacher_ckpt, data_dir, reference_dump, cpu, one_thread, sig, code
):
    out = tmp_path / "cache.h5"
    partial = tmp_path / "cache.h5.partial"

    proc = start_cli(*dump_args(teacher_ckpt, data_dir, out))
    wait_for(proc, lambda: rows_done(partial) > 0, "the first block was written")
    err = kill(proc, sig)

    assert proc.returncode == code, err
    assert not (tmp_path / "cache.h5.lock").exists()  # released on the way out
    assert "Traceback" not in err
    assert "--resume" in err.strip().splitlines()[-1]
    assert not out.exists()
    with h5py.File(partial, "r") as f:  # closed cleanly: readable, flagged incomplete, at a block boundary
        done = int(f.attrs["rows_done"])
        assert not f.attrs["complete"]
    assert 0 < done < DUMP_ROWS and done % DUMP_BLOCK == 0

    # A student refuses the missing cache and points at the interrupted dump.
    assert_refused(
        ["student", "--cache", str(out), "--data-dir", str(data_dir), "--out", str(tmp_path / "s.pt")],
        str(partial),
        "--resume",
    )
    # Even pointed at the partial file itself, a student refuses it as incomplete.
    assert_refused(
        ["student", "--cache", str(partial), "--data-dir", str(data_dir), "--out", str(tmp_path / "s.pt")],
        "incomplete",
        "--resume",
    )
    assert not (tmp_path / "s.pt").exists()

    dump_logits(
        teacher_path=teacher_ckpt,
        data_dir=data_dir,
        out=out,
        views=DUMP_VIEWS,
        seed=DUMP_SEED,
        batch_size=DUMP_BATCH,
        rt=cpu,
        subset=DUMP_ROWS,
        augment=True,
        block_rows=DUMP_BLOCK,
        resume=True,
    )
    assert not partial.exists()
    assert_same_cache(out, reference_dump)


# ---- training ----------------------------------------------------------------------------------


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(out: Path, ref: Path, epochs: int) -> None:
    a, b = state_dict(out), state_dict(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    history = [json.loads(line) for line in out.with_name(out.name + ".metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in ref.with_name(ref.name + ".metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == list(range(1, epochs + 1))
    for m, r in zip(history, reference, strict=False):
        for key in ("lr", "train_loss", "train_acc", "test_acc"):
            assert m[key] == r[key], f"epoch {m['epoch']}: {key} {m[key]} != {r[key]}"
    assert not out.with_name(out.name + ".resume").exists(), "the resume state outlived the finished run"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-data")
    write_fake_cifar10(root, num_train=100)  # 100 train, 20 test images: fast per-epoch evaluation
    return root


def test_teacher_sigkill_then_resume_equals_uninterrupted(tmp_path, small_data, cpu, one_thread):
    out = tmp_path / "teacher.pt"
    args = [
        "teacher",
        "--preset",
        "seed-resnet",
        "--arch",
        "seed-cnn-teacher",
        "--data-dir",
        str(small_data),
        "--subset",
        str(TEACHER["subset"]),
        "--epochs",
        str(TEACHER["epochs"]),
        "--batch-size",
        str(TEACHER["batch_size"]),
        "--lr",
        str(TEACHER["lr"]),
        "--seed",
        str(TEACHER["seed"]),
        "--augment",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    log, state = tmp_path / "teacher.pt.metrics.jsonl", tmp_path / "teacher.pt.resume"

    proc = start_cli(*args)
    wait_for(proc, lambda: metrics_lines(log) >= 1, "the first epoch was logged")
    kill(proc, signal.SIGKILL)
    assert not out.exists(), "the run finished before it could be killed: give it more epochs"
    assert state.exists() and 1 <= metrics_lines(log) < TEACHER["epochs"]
    saved = torch.load(state, map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng_cpu", "epochs_done", "history"} <= saved.keys()
    assert saved["epochs_done"] >= 1 and saved["optimizer"]["state"], "no momentum buffers saved"

    snapshot = state.read_bytes()
    assert_refused(args, "--resume", "--force")  # never clobbered silently
    assert_refused([*args, "--resume", "--lr", "0.02"], "lr=", "same arguments", "--force")  # nor resumed differently
    assert state.read_bytes() == snapshot and not out.exists()

    cli_ok(run_cli(*args, "--resume", env=ONE))

    ref = tmp_path / "ref" / "teacher.pt"
    recipe = (
        get_preset("seed-resnet")
        .override(
            teacher_arch="seed-cnn-teacher",
            subset=TEACHER["subset"],
            batch_size=TEACHER["batch_size"],
            lr=TEACHER["lr"],
            seed=TEACHER["seed"],
            augment=True,
        )
        .override_teacher(epochs=TEACHER["epochs"])
    )
    train_teacher(recipe, data_dir=small_data, out=ref, rt=cpu)
    assert_same_run(out, ref, TEACHER["epochs"])
    lrs = [json.loads(line)["lr"] for line in log.read_text().splitlines()]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs), f"not a cosine schedule: {lrs}"


def test_student_sigkill_then_resume_equals_uninterrupted(tmp_path, cache_file, data_dir, cpu, one_thread):
    out = tmp_path / "student.pt"
    args = [
        "student",
        "--preset",
        "seed-cnn",
        "--cache",
        str(cache_file),
        "--data-dir",
        str(data_dir),
        "--epochs",
        str(STUDENT["epochs"]),
        "--batch-size",
        str(STUDENT["batch_size"]),
        "--T",
        str(STUDENT["T"]),
        "--alpha",
        str(STUDENT["alpha"]),
        "--seed",
        str(STUDENT["seed"]),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    log, state = tmp_path / "student.pt.metrics.jsonl", tmp_path / "student.pt.resume"

    proc = start_cli(*args)
    wait_for(proc, lambda: metrics_lines(log) >= 1, "the first epoch was logged")
    kill(proc, signal.SIGKILL)
    assert not out.exists(), "the run finished before it could be killed: give it more epochs"
    assert state.exists() and 1 <= metrics_lines(log) < STUDENT["epochs"]

    # Resumed in this process (the teacher and dump tests resume in real ones): the same CLI code path.
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, (result.output, result.exception)

    ref = tmp_path / "ref" / "student.pt"
    recipe = get_preset("seed-cnn").override(**STUDENT)
    train_student(recipe, cache_file=cache_file, data_dir=data_dir, out=ref, rt=cpu)
    assert_same_run(out, ref, STUDENT["epochs"])
    recorded = read_checkpoint(out)["recipe"]  # the cache's 4 crop+flip views, not the preset's one plain view
    assert (recorded["views"], recorded["augment"]) == (4, True)
