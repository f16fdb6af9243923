"""Self-describing checkpoints: written atomically, read with `weights_only=True`, rebuilt from the file
alone; a module:factory architecture is built only when the user named it."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import torch
from torch import nn

from kdcache import __version__
from kdcache.artifacts import atomic_write
from kdcache.errors import KDCacheError
from kdcache.models import build, first_nonfinite, refuse_code, unwrap

CHECKPOINT_FORMAT = "kdcache-checkpoint"


CHECKPOINT_VERSION = 1


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through `atomic_write`: a reader never sees half a file, a full disk is one line."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, model: nn.Module, *, arch: str, meta: dict) -> None:
    """A self-describing checkpoint: arch, num_classes, dataset, normalisation, metrics, weights."""
    record = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "kdcache_version": __version__,
        "arch": arch,
        **meta,
        "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
    }
    for key in ("num_classes", "dataset", "dataset_fingerprint", "normalize_mean", "normalize_std"):
        if key not in record:
            raise ValueError(f"checkpoint meta lacks {key!r}")
    atomic_torch_save(record, path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint record, validated; one-line KDCacheError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise KDCacheError(f"checkpoint {path} does not exist: train one with `kdcache teacher` or pass its path")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        if not zipfile.is_zipfile(path):  # torch's own text is then cryptic ("101", "central directory")
            reason = "not a PyTorch zip file, or only part of one"
        raise KDCacheError(
            f"{path} is not a readable kdcache checkpoint ({reason}): it may be truncated; retrain or pass another file"
        ) from None
    if (
        not isinstance(record, dict)
        or record.get("format") != CHECKPOINT_FORMAT
        or not isinstance(record.get("arch"), str)
    ):
        raise KDCacheError(f"{path} is not a kdcache checkpoint: pass a file written by `kdcache teacher` or `student`")
    if record.get("format_version") != CHECKPOINT_VERSION:
        raise KDCacheError(
            f"{path} is checkpoint format v{record.get('format_version')}, this kdcache reads "
            f"v{CHECKPOINT_VERSION}: retrain it with this version"
        )
    return record


def check_arch(path: str | Path, recorded: str, arch: str | None = None, trust_arch: bool = False) -> None:
    """Refuse a checkpoint of another architecture than `arch`, and a module:factory one that the user named
    neither as `arch` nor by `trust_arch`."""
    if arch is not None and recorded != arch:
        raise KDCacheError(f"{path} holds a {recorded} checkpoint, not {arch}: pass --arch {recorded} or another file")
    if arch is None and not trust_arch:
        refuse_code(recorded, str(path), "pass --trust-arch if you trust that code")


def load_checkpoint(
    path: str | Path, *, arch: str | None = None, device: str | torch.device = "cpu", trust_arch: bool = False
):
    """(model in eval mode, metadata) rebuilt from the file alone. `arch`: refuse any other. A module:factory
    architecture is built only when the user named it: as `arch`, or by `trust_arch` (--trust-arch)."""
    record = read_checkpoint(path)
    check_arch(path, record["arch"], arch, trust_arch)
    model = build(
        record["arch"],
        record["num_classes"],
        image_size=record.get("image_size", 32),
        small_stem=record.get("small_stem"),
    )
    try:
        model.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        raise KDCacheError(f"{path}: weights do not fit {record['arch']} ({str(e).splitlines()[0][:100]})") from None
    broken = first_nonfinite(model)
    if broken:
        raise KDCacheError(
            f"{path} holds non-finite weights (NaN or inf, first in {broken}): it was saved from a diverged run; "
            "retrain it (a lower --lr helps) or pass another file"
        )
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    return model.to(device).eval(), meta


def check_classes(path: str | Path, meta: dict, dataset: str, num_classes: int) -> None:
    """Refuse to run a checkpoint on data with another class count."""
    if meta["num_classes"] != num_classes:
        raise KDCacheError(
            f"{path} predicts {meta['num_classes']} classes, {dataset} has {num_classes}: "
            "use a checkpoint of this dataset"
        )


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
