"""Where artifacts go: refuse to clobber, check writability up front, one writer per output,
log metrics as JSON lines."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from kdcache.errors import KDCacheError


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold `<out>.lock` (an exclusive `flock`) while a run writes `out` and its partials.

    A second run aimed at the same output is refused at once. The kernel drops a flock
    when its process dies, however it dies, so a lock file left by a killed run is
    simply taken over by the next one. The file is removed on release; whoever locked a
    file that was removed meanwhile retries on the new one.
    """
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise KDCacheError(
                f"another kdcache run (pid {holder}) is writing {out}: wait for it to finish, or choose another --out"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its holder had just removed: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: nobody can lock the old file and win
        os.close(fd)


@contextlib.contextmanager
def claim_output(out: str | Path, *, force: bool, resume: bool = False, interrupted: Path | None = None,
                 lock: bool = True) -> Iterator[Path]:  # fmt: skip
    """Take `out` for the whole `with` block, the one way a stage claims its output: check it
    can be written before any work starts (never after an hour of training), lock it, then
    refuse to clobber. The lock comes before the clobber checks, so a running twin is named
    as such, not as an interrupted run. `lock=False`: torchrun's other ranks, which write
    nothing, check the same things without taking rank 0's lock."""
    out = Path(out)
    _check_writable(out)
    with output_lock(out) if lock else contextlib.nullcontext():
        _refuse_clobber(out, force=force, resume=resume, interrupted=interrupted)
        yield out


def _check_writable(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".kdcache-write-test-"):
            pass
    except OSError as e:
        blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
        raise KDCacheError(f"cannot write to {out.parent} ({reason}): choose another --out") from None


def _refuse_clobber(out: Path, *, force: bool, resume: bool, interrupted: Path | None) -> None:
    """`interrupted`: where an interrupted run of the same output keeps its state; it is
    never thrown away silently (resume it, or --force to start over)."""
    if interrupted is not None and interrupted.exists() and not (resume or force):
        raise KDCacheError(
            f"an interrupted run left {interrupted}: pass --resume to continue it, or --force to start over"
        )
    if resume and interrupted is not None and not interrupted.exists():
        raise KDCacheError(f"nothing to resume: {interrupted} does not exist; run again without --resume")
    if out.exists() and not force:
        raise KDCacheError(f"{out} already exists: pass --force to overwrite it, or choose another --out")
    if out.exists() and out.is_dir():
        raise KDCacheError(f"{out} is a directory: pass a file path to --out")


def metrics_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".metrics.jsonl")


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)`, then rename onto `path`: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_metrics(path: Path, history: list[dict]) -> None:
    """Rewrite the whole JSON-lines log atomically (it is short: one line per epoch)."""
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in history))


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise KDCacheError(f"no metrics at {path}: run the training that writes it first")
    try:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDCacheError(f"{path} is not a kdcache metrics log ({e}): rerun the training that writes it") from None
    if not history:
        raise KDCacheError(f"{path} holds no epochs: rerun the training that writes it")
    return history
