"""Where artifacts go: refuse to clobber, check writability up front, one writer per output,
write every file whole (or not at all) and never through a link, log metrics as JSON lines."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from kdcache.errors import KDCacheError, error_chain

T = TypeVar("T")
# Create a new file for writing, exclusively: an existing name, a planted link included, is never opened.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_room(e: BaseException | None) -> str | None:
    """Why a write failed for lack of room ("No space left on device", ...), or None.

    The errno may sit anywhere in the chain: torch.save reports its file object's failed
    write as a RuntimeError whose context is the OSError; h5py reports a failed write as
    OSError, or a failed flush as RuntimeError, with the C errno only in its text.
    """
    for link in error_chain(e):
        for code in _NO_ROOM:
            if getattr(link, "errno", None) == code or f"errno = {code}," in str(link):
                return os.strerror(code)
        if "no space left" in str(link).lower():
            return os.strerror(errno.ENOSPC)
    return None


def write_failed(path: Path, e: BaseException) -> KDCacheError | None:
    """The one-line error for a write to `path` that failed for want of room or access, or None
    (anything else is a bug, and shows as one)."""
    if reason := no_room(e):
        return KDCacheError(
            f"the disk filled up while writing {path} ({reason}); nothing was left half-written: "
            f"free space in {path.parent} and run again"
        )
    if isinstance(e, OSError):
        return KDCacheError(
            f"cannot write {path} ({e.strerror or e}): make {path.parent} writable, or choose another path"
        )
    return None


def fresh_file(path: Path) -> Path:
    """Make `path` a new, empty file of ours, for partials that keep one name to be resumed:
    whatever stood there (a stale partial, a planted link) is removed first, never written through."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, _NEW_FILE, 0o666))
    return path


def require_file(path: Path, what: str) -> Path:
    """Refuse to reopen `path` for writing (resuming a partial) unless it is a plain file: a link
    there would be written through."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a plain file (or a hard link)"
        raise KDCacheError(f"{path} is {kind}, not {what}: remove it, or pass --force to start over")
    return path


def unique_beside(beside: Path, suffix: str, make: Callable[[Path], T]) -> tuple[T, Path]:
    """(make(path), path) for a new hidden name in `beside`'s folder, so that a rename publishes it as
    `beside`; `make` must create it exclusively (os.mkdir, or os.open with O_EXCL): a name that
    exists, a planted link included, is never used."""
    while True:
        path = beside.with_name(f".{beside.name[:200]}.{secrets.token_hex(4)}{suffix}")
        try:
            return make(path), path
        except FileExistsError:
            continue


@contextlib.contextmanager
def temp_file(beside: Path) -> Iterator[tuple[int, Path]]:
    """(descriptor, path) of a new file beside `beside` (see `unique_beside`), open for writing;
    the name is removed on the way out unless it was renamed."""
    fd, tmp = unique_beside(beside, ".tmp", lambda p: os.open(p, _NEW_FILE, 0o666))
    try:
        yield fd, tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a new temporary file beside `path`, then rename it onto `path`: a reader
    never sees half a file, a link at `path` is replaced (never written through), and a write that
    fails for want of room or access is one line and leaves `path` as it was."""
    path = Path(path)
    try:
        with temp_file(path) as (fd, tmp):
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if (stop := interrupt_in(e)) is not None:
            raise stop from None  # Ctrl-C or SIGTERM mid-write: a clean stop, not a failed write
        if (error := write_failed(path, e)) is None:
            raise
        raise error from None
    return path


def interrupt_in(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) an error stands for, if any: torch.save turns an interrupt that
    lands in its file object's write into a RuntimeError whose context is the interrupt."""
    return next((link for link in error_chain(e) if isinstance(link, KeyboardInterrupt)), None)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _open_lock(path: Path) -> int:
    """Open or create the lock file, never through a link: a planted link or other non-file is refused."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise KDCacheError(f"{path} is a symbolic link, not a kdcache lock: remove it and run again") from None
        raise KDCacheError(f"cannot create the lock file {path} ({e.strerror}): make {path.parent} writable") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise KDCacheError(f"{path} is not a kdcache lock (not a plain file, or a hard link): remove it and run again")
    return fd


@contextlib.contextmanager
def output_lock(out: str | Path, wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold `<out>.lock` (an exclusive `flock`) while a run writes `out` and its partials.

    A second run aimed at the same output is refused at once, or, with `wait`, told
    `wait(holder pid)` and blocked until the first is done. The kernel drops a flock
    when its process dies, however it dies, so a lock file left by a killed run is
    simply taken over by the next one. The file is removed on release; whoever locked a
    file that was removed meanwhile retries on the new one.
    """
    path = lock_path(out)
    while True:
        fd = _open_lock(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if wait is None:
                    raise KDCacheError(
                        f"another kdcache run (pid {holder}) is writing {out}: "
                        "wait for it to finish, or choose another --out"
                    ) from None
                wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
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
def claim_output(
    out: str | Path,
    *,
    force: bool,
    resume: bool = False,
    interrupted: Path | None = None,
    sides: tuple[Path, ...] = (),
    lock: bool = True,
    flag: str = "--out",
) -> Iterator[Path]:
    """Take `out` for the whole `with` block, the one way a stage claims its output: check it
    can be written before any work starts (never after an hour of training), lock it, then
    refuse to clobber it or its side files (`sides`: its metrics log). The lock comes before the
    clobber checks, so a running twin is named as such, not as an interrupted run. `lock=False`:
    torchrun's other ranks, which write nothing, check the same things without taking rank 0's lock.
    `flag`: the option that named `out`, for the messages."""
    out = Path(out)
    check_writable(out.parent, f"choose another {flag}")
    with output_lock(out) if lock else contextlib.nullcontext():
        _refuse_clobber(out, force=force, resume=resume, interrupted=interrupted, sides=sides, flag=flag)
        yield out


def check_writable(folder: Path, fix: str) -> None:
    """Create `folder` if need be and check a file can be made in it; else one line that ends with `fix`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kdcache-write-test-"):
            pass
    except OSError as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
        raise KDCacheError(f"cannot write to {folder} ({reason}): {fix}") from None


def _refuse_clobber(
    out: Path, *, force: bool, resume: bool, interrupted: Path | None, sides: tuple[Path, ...], flag: str
) -> None:
    """`interrupted`: where an interrupted run of the same output keeps its state; it is
    never thrown away silently (resume it, or --force to start over). A link counts as a file."""
    if interrupted is not None and os.path.lexists(interrupted) and not (resume or force):
        raise KDCacheError(
            f"an interrupted run left {interrupted}: pass --resume to continue it, or --force to start over"
        )
    if resume and interrupted is not None and not os.path.lexists(interrupted):
        raise KDCacheError(f"nothing to resume: {interrupted} does not exist; run again without --resume")
    if resume and interrupted is not None:
        require_file(interrupted, "an interrupted run's state")
    if os.path.lexists(out) and not force:
        raise KDCacheError(f"{out} already exists: pass --force to overwrite it, or choose another {flag}")
    if folder := next((p for p in (out, interrupted, *sides) if p and p.is_dir() and not p.is_symlink()), None):
        raise KDCacheError(f"{folder} is a directory where kdcache writes a file: remove it, or choose another {flag}")
    if (side := next((p for p in sides if os.path.lexists(p)), None)) and not (force or resume):
        raise KDCacheError(
            f"{side} already exists (beside {out.name}): pass --force to overwrite it, or choose another {flag}"
        )


RESUME_FIX = "resume with the same arguments, or pass --force to start over"


def refuse_different(
    path: Path,
    recorded: dict,
    wanted: dict,
    *,
    made: str = "was started with",
    asked: str = "this run has",
    fix: str = RESUME_FIX,
) -> None:
    """The one "same settings?" check (resume, a dump's shards, a pipeline's finished stages): the
    first setting in `wanted` that `path` recorded otherwise, in one line; in a nested record (a
    recipe), the field that differs is named."""
    for key, want in wanted.items():
        got = recorded.get(key)
        if got == want:
            continue
        if isinstance(got, dict) and isinstance(want, dict):
            key = next(k for k in [*want, *got] if got.get(k) != want.get(k))
            got, want = got.get(key), want.get(key)
        raise KDCacheError(f"{path} {made} {key}={got!r}, {asked} {want!r}: {fix}")


def metrics_path(out: str | Path) -> Path:
    """`OUT.metrics.jsonl`, from the whole name: `a.pt` and `a.pth` never share one."""
    out = Path(out)
    return out.with_name(out.name + ".metrics.jsonl")


def metrics_of(checkpoint: str | Path) -> Path:
    """Where to read a checkpoint's metrics: `metrics_path`, or the `STEM.metrics.jsonl` that
    kdcache 0.1 wrote before it (runs made then still report)."""
    path, old = metrics_path(checkpoint), Path(checkpoint).with_suffix(".metrics.jsonl")
    return old if not path.exists() and old.is_file() else path


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
