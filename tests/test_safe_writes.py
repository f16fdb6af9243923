"""Writes are safe: never through a planted link, whole or not at all (a full disk is one line),
nothing overwritten unasked; the image-folder store is a locked artifact, published whole.

A full disk is a real tiny tmpfs where this machine lets us mount one (root in a container),
and a simulated ENOSPC everywhere. Second processes are real processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, THREAD_ENV, assert_one_line_error, cli

from kdcache import folders
from kdcache.artifacts import lock_path, output_lock, write_metrics
from kdcache.checkpoints import atomic_torch_save, read_checkpoint
from kdcache.errors import KDCacheError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("KDCACHE_OFFLINE", "1")


def assert_last_line_error(code: int, stderr: str, *needles: str) -> str:
    """Exit 2, no traceback, one `error:` line and it is the last: for failures after a run started
    (its notes and epoch lines stand before the error)."""
    assert code == 2, f"exit {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True) if shutil.which("mount") else None
    if r is None or r.returncode:
        pytest.skip(
            f"cannot mount here ({r.stderr.strip() if r else 'no mount command'}); the simulated cases still run"
        )


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs at `path`: a tiny disk (size=64k) or a read-only folder (ro)."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", options, "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # lazy: a store may still be mapped


@contextlib.contextmanager
def read_only(path: Path):
    """`path`, with what it holds, made read-only (a read-only bind mount onto itself): even for root."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)  # lazy: a store may still be mapped


def teacher_args(data_dir: Path, out: Path, *extra) -> list:
    return [
        "teacher",
        "--preset",
        "seed-cnn",
        "--data-dir",
        data_dir,
        "--subset",
        "100",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        out,
        *extra,
    ]


def folder_teacher_args(root: Path, out: Path, *extra) -> list:
    """An image folder at --image-size 16: the store size is 32."""
    return [
        "teacher",
        "--preset",
        "seed-cnn",
        "--data",
        root,
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        out,
        *extra,
    ]


# ---- links ----------------------------------------------------------------------------------------


def test_a_link_planted_at_the_lock_is_refused_and_its_target_untouched(tmp_path, data_dir):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "t.pt"
    lock_path(out).symlink_to(victim)
    code, err, _ = cli(*teacher_args(data_dir, out))
    assert_one_line_error(code, err, "t.pt.lock is a symbolic link", "remove it")
    assert victim.read_text() == "precious\n" and not out.exists()


def test_a_lock_that_is_a_hard_link_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.link(victim, lock_path(tmp_path / "t.pt"))
    with pytest.raises(KDCacheError, match="not a kdcache lock"):
        with output_lock(tmp_path / "t.pt"):
            pass
    assert victim.read_text() == "precious\n"


OLD_TEMP_NAMES = ("t.pt.tmp", "t.pt.resume.tmp", ".t.pt.metrics.jsonl.tmp")  # fixed names kdcache once wrote


def test_links_at_every_name_a_run_writes_are_replaced_never_written_through(tmp_path, data_dir):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out, log, state = tmp_path / "t.pt", tmp_path / "t.pt.metrics.jsonl", tmp_path / "t.pt.resume"
    for path in (out, log, state, *(tmp_path / n for n in OLD_TEMP_NAMES)):
        path.symlink_to(victim)
    code, err, _ = cli(*teacher_args(data_dir, out))
    assert_one_line_error(code, err, "interrupted run left", "t.pt.resume", "--force")  # a link counts as a file
    code, err, _ = cli(*teacher_args(data_dir, out, "--force"))
    assert code == 0, err
    assert victim.read_text() == "precious\n"
    assert not out.is_symlink() and read_checkpoint(out)["role"] == "teacher"
    assert not log.is_symlink() and len(log.read_text().splitlines()) == 1
    assert not os.path.lexists(state)  # replaced by the real state after the epoch, removed at the end
    assert all((tmp_path / n).is_symlink() for n in OLD_TEMP_NAMES)  # no fixed temporary name is used
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_links_at_the_partial_and_the_final_cache_are_never_written_through(
    tmp_path, teacher_ckpt, data_dir, cache_file
):
    """The victim is a cache made with the same arguments: resumed through the link, it would be written."""
    victim = tmp_path / "victim.h5"
    shutil.copy(cache_file, victim)
    before = victim.read_bytes()
    out, partial = tmp_path / "c.h5", tmp_path / "c.h5.partial"
    partial.symlink_to(victim)
    args = [
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--views",
        "4",
        "--seed",
        "0",
        "--batch-size",
        "128",
        "--subset",
        "400",
        "--augment",
        "--block-rows",
        "128",
        "--device",
        "cpu",
    ]
    code, err, _ = cli(*args, "--resume")
    assert_one_line_error(code, err, "c.h5.partial is a symbolic link", "--force")
    out.symlink_to(victim)
    code, err, _ = cli(*args, "--force")
    assert code == 0, err
    assert victim.read_bytes() == before
    assert not out.is_symlink() and not os.path.lexists(partial)


# ---- nothing overwritten unasked --------------------------------------------------------------------


def test_a_pt_and_a_pth_keep_separate_metrics(tmp_path, data_dir):
    code, err, _ = cli(*teacher_args(data_dir, tmp_path / "a.pt"))
    assert code == 0, err
    first = (tmp_path / "a.pt.metrics.jsonl").read_text()
    code, err, _ = cli(*teacher_args(data_dir, tmp_path / "a.pth", "--seed", "1"))
    assert code == 0, err
    assert (tmp_path / "a.pt.metrics.jsonl").read_text() == first
    assert (tmp_path / "a.pth.metrics.jsonl").read_text() != first
    assert not (tmp_path / "a.metrics.jsonl").exists()


def test_a_side_file_without_its_output_is_not_overwritten_unasked(tmp_path, data_dir):
    log = tmp_path / "t.pt.metrics.jsonl"
    log.write_text("my notes\n")
    code, err, _ = cli(*teacher_args(data_dir, tmp_path / "t.pt"))
    assert_one_line_error(code, err, "t.pt.metrics.jsonl already exists", "--force")
    assert log.read_text() == "my notes\n" and not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("name", ["c.h5", "c.h5.partial"])
def test_a_directory_where_a_file_is_written_is_refused_up_front(tmp_path, teacher_ckpt, data_dir, name):
    (tmp_path / name).mkdir()
    code, err, _ = cli(
        "dump-logits",
        "--teacher",
        teacher_ckpt,
        "--data-dir",
        data_dir,
        "--out",
        tmp_path / "c.h5",
        "--subset",
        "20",
        "--views",
        "1",
        "--device",
        "cpu",
        "--force",
    )
    assert_one_line_error(code, err, f"{name} is a directory where kdcache writes a file", "remove it")
    assert os.listdir(tmp_path) == [name]


def test_a_directory_at_the_metrics_is_refused_before_training(tmp_path, data_dir):
    (tmp_path / "t.pt.metrics.jsonl").mkdir()
    code, err, _ = cli(*teacher_args(data_dir, tmp_path / "t.pt", "--force"))
    assert_one_line_error(code, err, "t.pt.metrics.jsonl is a directory where kdcache writes a file")


# ---- a full disk ---------------------------------------------------------------------------------


def _full_torch_save(obj, f) -> None:
    """torch.save on a full disk, as torch 2.x reports it: a RuntimeError whose context is the OSError."""
    f.write(b"PK\x03\x04 half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from e


def test_a_simulated_full_disk_on_a_checkpoint_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "t.pt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(torch, "save", _full_torch_save)
    with pytest.raises(KDCacheError) as e:
        atomic_torch_save({"w": torch.zeros(3)}, target)
    assert "disk filled up while writing" in str(e.value) and "\n" not in str(e.value)
    assert target.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["t.pt"]


class _Stop(KeyboardInterrupt):
    """What the CLI's SIGTERM handler raises (a KeyboardInterrupt)."""


def test_an_interrupt_in_the_middle_of_torch_save_stops_cleanly_and_keeps_the_old_file(tmp_path, monkeypatch):
    """A real signal lands inside torch.save's file writes, which torch reports as a RuntimeError; the run
    must stop as for any Ctrl-C (exit 130/143, resumable), not fail with a traceback."""
    target = tmp_path / "t.pt"
    target.write_bytes(b"the previous checkpoint")
    real_save = torch.save

    class Interrupted:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 2:
                signal.raise_signal(signal.SIGUSR1)  # its handler runs at the next bytecode: inside this write
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def _raise(signum, frame):
        raise _Stop()

    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, Interrupted(f)))
    old = signal.signal(signal.SIGUSR1, _raise)
    try:
        with pytest.raises(_Stop):
            atomic_torch_save({"w": torch.zeros(1000), "b": torch.ones(3)}, target)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert target.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == ["t.pt"]


def test_a_full_disk_when_the_checkpoint_is_written_is_one_line_and_leaves_no_partial(tmp_path, data_dir, teacher_ckpt):
    """Sized to hold the resume state (weights and Adam's two moments: 3x the checkpoint) and the metrics,
    not the checkpoint beside them."""
    size_kb = int(3.5 * teacher_ckpt.stat().st_size) // 1024
    with tmpfs(tmp_path / "disk", f"size={size_kb}k") as disk:
        code, err, _ = cli(*teacher_args(data_dir, disk / "t.pt"))
        assert_last_line_error(code, err, "disk filled up while writing", "t.pt (", "free space")
        assert "epoch   1" in err  # it failed at the end, not before
        assert sorted(os.listdir(disk)) == ["t.pt.metrics.jsonl", "t.pt.resume"]  # the epoch is kept; no partial


def test_a_full_disk_on_the_metrics_keeps_the_last_whole_log(tmp_path):
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        log = disk / "t.pt.metrics.jsonl"
        write_metrics(log, [{"epoch": 1}])
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        with pytest.raises(KDCacheError, match="disk filled up while writing .*t.pt.metrics.jsonl"):
            write_metrics(log, [{"epoch": i, "note": "x" * 1000} for i in range(100)])
        assert [json.loads(line) for line in log.read_text().splitlines()] == [{"epoch": 1}]
        assert sorted(os.listdir(disk)) == ["filler", log.name]


def test_a_full_disk_while_preparing_a_store_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    root = folders.write_image_folder(tmp_path / "d")
    with tmpfs(tmp_path / "stores", "size=1m") as stores:
        monkeypatch.setenv("KDCACHE_STORE_DIR", str(stores))
        with pytest.raises(KDCacheError, match="disk filled up while preparing the store .* KDCACHE_STORE_DIR"):
            folders.prepare(root, 256)  # 33 images x 3 x 256^2: 6.5 MB
        assert os.listdir(stores) == []
        code, err, _ = cli(*folder_teacher_args(root, tmp_path / "t.pt", "--store-size", "256"))
        assert_last_line_error(code, err, "disk filled up", "nothing was kept")
        assert os.listdir(stores) == [] and not (tmp_path / "t.pt").exists()


def test_a_simulated_full_disk_while_preparing_a_store_leaves_nothing(tmp_path, monkeypatch):
    root = folders.write_image_folder(tmp_path / "d")
    monkeypatch.setenv("KDCACHE_STORE_DIR", str(tmp_path / "stores"))

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(KDCacheError, match="disk filled up while preparing"):
        folders.prepare(root, 32)
    assert os.listdir(tmp_path / "stores") == []


# ---- read-only and misnamed outputs --------------------------------------------------------------


def test_a_pipeline_out_that_is_a_file_or_read_only_is_one_line(tmp_path, data_dir):
    mine = tmp_path / "mine.txt"
    mine.write_text("not a folder\n")
    base = ["pipeline", "--preset", "seed-cnn", "--data-dir", data_dir, "--subset", "100", "--device", "cpu"]
    for out in (mine, mine / "run"):
        code, err, _ = cli(*base, "--out", out)
        assert_one_line_error(code, err, "mine.txt is a file, not a directory", "--out")
    assert mine.read_text() == "not a folder\n"
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        for out in (ro, ro / "run"):
            code, err, _ = cli(*base, "--out", out)
            assert_one_line_error(code, err, "cannot write to", "read-only file system", "--out")


def test_a_read_only_store_folder_is_one_line_and_a_ready_store_in_it_is_still_read(tmp_path, monkeypatch):
    root = folders.write_image_folder(tmp_path / "d")
    stores = tmp_path / "stores"
    monkeypatch.setenv("KDCACHE_STORE_DIR", str(stores))
    with tmpfs(stores, "size=1m,ro"):
        with pytest.raises(KDCacheError, match="Read-only file system.*KDCACHE_STORE_DIR"):
            folders.prepare(root, 32)
        code, err, _ = cli(*folder_teacher_args(root, tmp_path / "t.pt"))
        assert_one_line_error(code, err, "cannot write to", "KDCACHE_STORE_DIR")
    train, *_ = folders.prepare(root, 32)
    with read_only(stores):
        again, *_ = folders.prepare(root, 32)
        assert again.meta["train_fingerprint"] == train.meta["train_fingerprint"]
        with pytest.raises(KDCacheError, match="Read-only file system"):
            folders.prepare(root, 32, rebuild=True)


# ---- the store ---------------------------------------------------------------------------------------


def _drop_key(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    del meta["listing_sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: os.truncate(d / "train_images.npy", 500), "train_images.npy is short"),
        (lambda d: (d / "meta.json").unlink(), "it has no meta.json"),
        (lambda d: (d / "meta.json").write_text((d / "meta.json").read_text()[:40]), "meta.json does not read as JSON"),
        (_drop_key, "meta.json lacks 'listing_sha256'"),
        (lambda d: np.save(d / "val_labels.npy", np.zeros(2, np.int64)), "its val arrays do not match meta.json"),
    ],
    ids=["short-images", "no-meta", "truncated-meta", "incomplete-meta", "wrong-labels"],
)
def test_a_damaged_store_is_one_line_and_rebuild_store_rebuilds_it(tmp_path, damage, needle):
    root = folders.write_image_folder(tmp_path / "d")
    train, _, _, where = folders.prepare(root, 32)
    fingerprint = train.meta["train_fingerprint"]
    damage(where)
    with pytest.raises(KDCacheError) as e:
        folders.prepare(root, 32)
    message = str(e.value)
    assert needle in message and f"image store {where} is damaged" in message and "--rebuild-store" in message
    assert "\n" not in message
    train, *_ = folders.prepare(root, 32, rebuild=True)
    assert train.meta["train_fingerprint"] == fingerprint
    assert folders.content_fingerprint(train.images, train.hw, train.labels) == fingerprint


def test_a_damaged_store_through_the_cli_and_its_rebuild(tmp_path):
    root = folders.write_image_folder(tmp_path / "d")
    *_, where = folders.prepare(root, 32)
    os.truncate(where / "val_images.npy", 100)
    code, err, _ = cli(*folder_teacher_args(root, tmp_path / "t.pt"))
    assert_one_line_error(code, err, "is damaged", "val_images.npy", "--rebuild-store")
    code, err, _ = cli(*folder_teacher_args(root, tmp_path / "t.pt", "--rebuild-store"))
    assert code == 0, err
    assert read_checkpoint(tmp_path / "t.pt")["role"] == "teacher"


def test_rebuild_store_prepares_an_unchanged_store_again(tmp_path):
    root = folders.write_image_folder(tmp_path / "d")
    *_, where = folders.prepare(root, 32)
    (where / "stray").write_text("left by hand\n")
    (where.parent / f".{where.name}.killed.partial").mkdir()  # what a run killed mid-preparation leaves
    folders.prepare(root, 32, rebuild=True)
    assert not (where / "stray").exists()
    assert [p.name for p in where.parent.iterdir() if where.name in p.name] == [where.name]  # no lock, no partial


PREPARE = """
import json, sys
from kdcache import folders

class Notes:
    def note(self, message): print("note:", message, flush=True)
    def begin(self, description, total): pass
    def advance(self): pass
    def end(self): pass

train, _, _, where = folders.prepare(sys.argv[1], int(sys.argv[2]), progress=Notes())
print(json.dumps({"where": str(where), "recorded": train.meta["train_fingerprint"],
                  "pixels": folders.content_fingerprint(train.images, train.hw, train.labels)}))
"""


def start_prepare(root: Path, size: int, stdout) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PREPARE, str(root), str(size)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **THREAD_ENV, "PYTHONPATH": str(ROOT)},
    )


def test_two_first_preparations_at_once_both_end_well_with_one_store(tmp_path, monkeypatch):
    root = folders.write_image_folder(tmp_path / "d", classes=4, per_class=40)
    monkeypatch.setenv("KDCACHE_STORE_DIR", str(tmp_path / "stores"))
    procs = [start_prepare(root, 128, subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=False):
        assert p.returncode == 0 and "Traceback" not in err, err
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    assert results[0] == results[1] and results[0]["recorded"] == results[0]["pixels"]
    assert os.listdir(tmp_path / "stores") == [Path(results[0]["where"]).name]


def test_a_second_preparation_waits_for_the_first(tmp_path, monkeypatch):
    root = folders.write_image_folder(tmp_path / "d")
    monkeypatch.setenv("KDCACHE_STORE_DIR", str(tmp_path / "stores"))
    where = folders.store_dir(root, 32, None)
    where.parent.mkdir()
    log = tmp_path / "second.log"
    with output_lock(where), open(log, "w") as out:  # this process is the first run
        second = start_prepare(root, 32, out)
        deadline = time.monotonic() + 120
        while f"waiting for kdcache run {os.getpid()}" not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert not where.exists()
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    result = json.loads(log.read_text().splitlines()[-1])
    assert result["where"] == str(where) and result["recorded"] == result["pixels"]


# ---- images that declare a huge canvas -------------------------------------------------------------


def huge_png(path: Path, width: int, height: int) -> Path:
    """A 70-byte PNG whose header declares width x height (1-bit grey): PIL opens it, decoding would cost
    width x height x 3 bytes once converted to RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


class Notes:
    def __init__(self):
        self.lines = []

    def note(self, message: str) -> None:
        self.lines.append(message)

    def begin(self, description: str, total: int) -> None: ...
    def advance(self) -> None: ...
    def end(self) -> None: ...


@pytest.mark.parametrize(
    "width, needle",
    [
        (8_000, "declares 8000x8000 pixels, over --max-image-pixels 40,000,000"),  # under PIL's own limit
        (30_000, "declares more pixels than PIL decodes"),  # over it
    ],
)
def test_an_image_declaring_a_huge_canvas_is_refused_before_decoding_or_skipped(tmp_path, width, needle):
    root = folders.write_image_folder(tmp_path / "d")
    huge_png(root / "train" / "class_01" / "huge.png", width, width)
    with pytest.raises(KDCacheError) as e:
        folders.prepare(root, 32)
    assert needle in str(e.value) and "huge.png" in str(e.value) and "--skip-bad-images" in str(e.value)
    notes = Notes()
    train, _, _, where = folders.prepare(root, 32, skip_bad=True, progress=notes)
    assert len(train.labels) == 24  # the 24 generated training images, without huge.png
    assert json.loads((where / "meta.json").read_text())["train_skipped"][0].startswith(
        "train/class_01/huge.png: declares"
    )
    assert any("left out 1 bad image" in line and "huge.png" in line for line in notes.lines)


def test_max_image_pixels_is_a_flag_and_a_store_skipping_by_it_remembers_it(tmp_path, data_dir):
    root = folders.write_image_folder(tmp_path / "d")
    code, err, _ = cli(*folder_teacher_args(root, tmp_path / "t.pt", "--max-image-pixels", "1000"))
    assert_last_line_error(code, err, "over --max-image-pixels 1,000", "--skip-bad-images")
    code, err, _ = cli(*teacher_args(data_dir, tmp_path / "t.pt", "--max-image-pixels", "1000"))
    assert_one_line_error(code, err, "--max-image-pixels applies to image folders")
    huge_png(root / "train" / "class_01" / "huge.png", 8_000, 8_000)
    folders.prepare(root, 32, skip_bad=True)
    with pytest.raises(KDCacheError, match=r"\(--max-image-pixels differ\): pass --rebuild-store"):
        folders.prepare(root, 32, skip_bad=True, max_pixels=100_000_000)


def test_bench_json_is_not_overwritten_unasked(tmp_path):
    mine = tmp_path / "figures.json"
    mine.write_text('{"mine": true}\n')
    code, err, _ = cli("bench", "--device", "cpu", "--steps", "1", "--json", mine)
    assert_one_line_error(code, err, "figures.json already exists", "--force", "another --json")
    assert mine.read_text() == '{"mine": true}\n'
