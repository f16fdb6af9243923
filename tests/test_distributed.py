"""torchrun: teacher and student train with DDP (gloo on CPU, 2 processes); the global batch, views
and schedule do not depend on the number of processes, so a 2-process run matches 1 process within
float tolerance on a model without BatchNorm or dropout, and a run resumes under another N."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, THREAD_ENV, run_cli

from kdcache.stages import train_student

pytestmark = pytest.mark.torchrun

ARCH = "byo_models:make_net"  # no BatchNorm, no dropout: the processes' shares add up exactly


def recipe_of(cache_file):
    """The recipe `kdcache student` builds for student_args: the cache's, with these flags."""
    import dataclasses
    import json

    from kdcache.cache import open_cache
    from kdcache.config import Recipe

    with open_cache(cache_file) as c:
        base = Recipe.from_dict(json.loads(c.attrs["recipe"]))
    return dataclasses.replace(base.override(student_arch=ARCH, epochs=3, batch_size=32, T=2.0, alpha=0.5), subset=None)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "COLUMNS": "200"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kdcache",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def student_args(cache_file, data_dir, out, *extra):
    return (
        "student",
        "--cache",
        str(cache_file),
        "--data-dir",
        str(data_dir),
        "--arch",
        ARCH,
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--T",
        "2",
        "--alpha",
        "0.5",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    )


def test_two_processes_train_the_same_student_as_one(tmp_path, cache_file, data_dir, cpu):
    one = tmp_path / "one.pt"
    train_student(recipe_of(cache_file), cache_file=cache_file, data_dir=data_dir, out=one, rt=cpu)
    r = torchrun(*student_args(cache_file, data_dir, tmp_path / "two.pt"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 processes (torchrun, DDP)" in r.stderr
    assert r.stdout.count("checkpoint") == 1  # only rank 0 prints the summary
    assert close(weights(one), weights(tmp_path / "two.pt"))
    assert not (tmp_path / "two.pt.lock").exists() and not (tmp_path / "two.pt.resume").exists()


def test_a_run_interrupted_in_one_process_resumes_under_two(tmp_path, cache_file, data_dir, cpu):
    out, ref = tmp_path / "s.pt", tmp_path / "ref.pt"
    train_student(recipe_of(cache_file), cache_file=cache_file, data_dir=data_dir, out=ref, rt=cpu)

    def stop_after_first(metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(
            recipe_of(cache_file), cache_file=cache_file, data_dir=data_dir, out=out, rt=cpu, on_epoch=stop_after_first
        )
    assert (tmp_path / "s.pt.resume").exists() and not out.exists()
    r = torchrun(*student_args(cache_file, data_dir, out, "--resume"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming after epoch 1" in r.stderr
    assert close(weights(ref), weights(out))


def test_commands_that_run_in_one_process_say_so_under_torchrun(tmp_path, teacher_ckpt, data_dir):
    r = torchrun("eval", str(teacher_ckpt), "--data-dir", str(data_dir))
    assert r.returncode != 0 and "this command runs in one process" in r.stderr


def _datasets(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {name: f[name][...] for name in f}


def _same_cache(a: Path, b: Path) -> None:
    import numpy as np

    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        assert np.array_equal(da[name], db[name]), name


def dump_args(teacher, data_dir, out, *extra):
    return (
        "dump-logits",
        "--teacher",
        str(teacher),
        "--data-dir",
        str(data_dir),
        "--views",
        "4",
        "--mix",
        "cutmix",
        "--block-rows",
        "8",
        "--batch-size",
        "4",
        "--subset",
        "400",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    )


def test_a_two_process_dump_is_the_one_process_dump(tmp_path, teacher_ckpt, data_dir):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    assert run_cli(*dump_args(teacher_ckpt, data_dir, one)).returncode == 0
    r = torchrun(*dump_args(teacher_ckpt, data_dir, two))
    assert r.returncode == 0, r.stdout + r.stderr
    _same_cache(one, two)
    assert not list(tmp_path.glob("two.h5.shard-*")) and not (tmp_path / "two.h5.partial").exists()


def test_a_killed_two_process_dump_resumes_in_one_process_without_redoing_blocks(tmp_path, teacher_ckpt, data_dir):
    import signal
    import time

    import h5py

    ref, out = tmp_path / "ref.h5", tmp_path / "c.h5"
    assert run_cli(*dump_args(teacher_ckpt, data_dir, ref)).returncode == 0
    env = {**os.environ, **THREAD_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kdcache",
        *dump_args(teacher_ckpt, data_dir, out),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:  # the shards appear when the processes start dumping; a second later some blocks are done
        while len(list(tmp_path.glob("c.h5.shard-*"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        # kill as soon as a shard grows (its first blocks are flushed), not after a fixed sleep: how many of
        # the 50 blocks a second holds depends on the machine
        size = lambda: sum(p.stat().st_size for p in tmp_path.glob("c.h5.shard-*"))  # noqa: E731
        start = size()
        while size() == start and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
    finally:  # the workers first (torchrun may start them in their own process groups), then torchrun
        subprocess.run(["pkill", "-KILL", "-f", str(out)], check=False)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 0:
            time.sleep(0.05)  # gone, with their file locks
    done = 0
    for path in tmp_path.glob("c.h5.shard-*"):
        for _ in range(100):  # the kernel drops a killed writer's file lock a moment after it is gone
            try:
                f = h5py.File(path, "r")
                break
            except BlockingIOError:
                time.sleep(0.1)
        with f:
            done += int(f["blocks_done"][...].sum())
    print(f"killed with {done} of 50 blocks done")
    assert 0 < done < 50 and not out.exists(), f"the dump was not caught mid-way ({done} of 50 blocks)"
    refused = run_cli(*dump_args(teacher_ckpt, data_dir, out))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    r = run_cli(*dump_args(teacher_ckpt, data_dir, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "kept from the interrupted dump's shards" in r.stderr
    _same_cache(ref, out)
    assert not list(tmp_path.glob("c.h5.shard-*"))
