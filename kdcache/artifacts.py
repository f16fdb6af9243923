"""Where artifacts go: refuse to clobber, check writability up front, log metrics as JSON lines."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kdcache.errors import KDCacheError


def prepare_output(out: str | Path, *, force: bool, resume: bool = False, interrupted: Path | None = None) -> Path:
    """Check `out` can be written before any work starts (never after an hour of training).

    `interrupted`: where an interrupted run of the same output keeps its state; it is
    never thrown away silently (resume it, or --force to start over).
    """
    out = Path(out)
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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".kdcache-write-test-"):
            pass
    except OSError as e:
        blocker = next((p for p in (out.parent, *out.parent.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a directory" if blocker else (e.strerror or str(e))
        raise KDCacheError(f"cannot write to {out.parent} ({reason}): choose another --out") from None
    return out


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
