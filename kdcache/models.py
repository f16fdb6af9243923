"""Architecture registry and self-describing checkpoints.

Architectures are named data: `build(name, num_classes)`. ResNets get the CIFAR
stem (3x3 stride-1 conv1, no max-pool) inside the builder, before any weights are
loaded, so a checkpoint can never be paired with an untrained stem.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdcache import __version__
from kdcache.errors import KDCacheError

CHECKPOINT_FORMAT = "kdcache-checkpoint"
CHECKPOINT_VERSION = 1


def _cifar_resnet(factory: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        model = factory(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        return model

    return build


class SeedCNNTeacher(nn.Module):
    """Notebook 2's teacher: 4 convs + 2 linears, 1,186,986 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(32 * 8 * 8, 512), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SeedCNNStudent(nn.Module):
    """Notebook 2's student: 2 convs + 2 linears, 267,738 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(16 * 8 * 8, 256), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _torchvision_resnet(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision import models as tv  # only here: importing it costs 1-2 s per command

        return _cifar_resnet(getattr(tv, name))(num_classes)

    return build


def _registry() -> dict[str, Callable[[int], nn.Module]]:
    return {
        "resnet18": _torchvision_resnet("resnet18"),
        "resnet34": _torchvision_resnet("resnet34"),
        "resnet50": _torchvision_resnet("resnet50"),
        "seed-cnn-teacher": SeedCNNTeacher,
        "seed-cnn-student": SeedCNNStudent,
    }


ARCHS = ("resnet18", "resnet34", "resnet50", "seed-cnn-teacher", "seed-cnn-student")


def build(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model of a registered architecture."""
    registry = _registry()
    if name not in registry:
        raise KDCacheError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHS)}")
    return registry[name](num_classes)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise KDCacheError(f"{path} is not a kdcache checkpoint: pass a file written by `kdcache teacher` or `student`")
    if record.get("format_version") != CHECKPOINT_VERSION:
        raise KDCacheError(
            f"{path} is checkpoint format v{record.get('format_version')}, this kdcache reads "
            f"v{CHECKPOINT_VERSION}: retrain it with this version"
        )
    return record


def load_checkpoint(path: str | Path, *, arch: str | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, metadata) rebuilt from the file alone. `arch`: refuse any other."""
    record = read_checkpoint(path)
    if arch is not None and record["arch"] != arch:
        raise KDCacheError(
            f"{path} holds a {record['arch']} checkpoint, not {arch}: pass --arch {record['arch']} or another file"
        )
    model = build(record["arch"], record["num_classes"])
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


def finite_weights(model: nn.Module) -> bool:
    """All floating parameters and buffers finite: one reduction, one host sync."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, or None."""
    if finite_weights(model):
        return None
    return next(n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all())


def check_classes(path: str | Path, meta: dict, dataset: str, num_classes: int) -> None:
    """Refuse to run a checkpoint on data with another class count."""
    if meta["num_classes"] != num_classes:
        raise KDCacheError(f"{path} predicts {meta['num_classes']} classes, {dataset} has {num_classes}: use a checkpoint of this dataset")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
