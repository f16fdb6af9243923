"""Teachers trained elsewhere: wrap their weights into a kdcache checkpoint, and ensembles of teachers."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from kdcache.artifacts import claim_output
from kdcache.checkpoints import save_checkpoint
from kdcache.data import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from kdcache.errors import KDCacheError
from kdcache.inference import accuracy, predict
from kdcache.models import build, check_spec, first_nonfinite, num_params
from kdcache.runtime import Runtime


def _keys(keys, limit: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]  # after PROTO, before STOP
EXPORT_HINT = "export a state dict with torch.save(model.state_dict(), PATH)"


def _is_torch_file(path: Path) -> bool:
    """Written by torch.save: a zip holding data.pkl, or the legacy format (its magic number first)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    with open(path, "rb") as f:
        head = f.read(2 + len(_LEGACY_MAGIC))
    return head[:1] == b"\x80" and head[2:] == _LEGACY_MAGIC


def read_weights(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain state dict, or one nested under "state_dict"/"model"/"model_state_dict"
    (training checkpoints); always loaded with weights_only=True, which runs no code from the file. A whole
    pickled nn.Module needs `trust_pickle` (weights_only=False: unpickling it runs whatever the file says)."""
    if not path.is_file():
        raise KDCacheError(f"weights file {path} does not exist: pass the .pt/.pth file the teacher was saved to")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for files it cannot read
        if not _is_torch_file(path):
            raise KDCacheError(
                f"{path} cannot be read as PyTorch weights (not a PyTorch file, or only part of one): {EXPORT_HINT}"
            ) from None
        if not isinstance(e, pickle.UnpicklingError):
            raise KDCacheError(
                f"{path} cannot be read as PyTorch weights ({_reason(e)}): it may be truncated; pass an intact file"
            ) from None
        if not trust_pickle:
            raise KDCacheError(
                f"{path} holds pickled Python objects beyond tensors (a whole saved model?), and loading those runs "
                f"code from the file: {EXPORT_HINT}, or pass --trust-pickle if you trust the file"
            ) from None
        obj = _load_pickled(path)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and obj.get("format") == "kdcache-checkpoint":
        raise KDCacheError(f"{path} is already a kdcache checkpoint: use it directly as --teacher")
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), (dict, nn.Module)):
            inner = obj[key]
            obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KDCacheError(f"{path} holds no state dict (a mapping of names to tensors): pass the model's state_dict()")
    # weights saved from DataParallel/DDP or torch.compile carry a prefix on every key
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__


def _load_pickled(path: Path):
    """The full unpickler, which runs code named in the file: only behind --trust-pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - the file's own code may raise anything
        raise KDCacheError(
            f"{path} cannot be loaded even as a trusted pickle ({_reason(e)}): "
            f"put the model's code on PYTHONPATH, or {EXPORT_HINT}"
        ) from None


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, spec: str, num_classes: int) -> None:
    """Load strictly; every mismatch is one line naming the first few keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing {_keys(missing)}"] if missing else []) + (
            [f"unexpected {_keys(unexpected)}"] if unexpected else []
        )
        raise KDCacheError(
            f"{path} does not fit {spec}: {'; '.join(parts)}: pass the --arch these weights were trained as"
        )
    shapes = [k for k in own if own[k].shape != state[k].shape]
    if shapes:
        first = shapes[0]
        head = [k for k in shapes if own[k].shape[0] == num_classes and own[k].shape[1:] == state[k].shape[1:]]
        if head:  # only the classifier's rows differ: another class count
            raise KDCacheError(
                f"{path} is for {state[head[0]].shape[0]} classes ({head[0]}), the data has {num_classes}: "
                "import weights trained on these classes"
            )
        raise KDCacheError(
            f"{path} does not fit {spec}: {first} is {tuple(state[first].shape)}, the model's is "
            f"{tuple(own[first].shape)} ({len(shapes)} such key(s)): check --arch, --image-size and --small-stem"
        )
    model.load_state_dict(state)


def import_teacher(
    weights: str | Path,
    *,
    arch: str,
    dataset: str,
    data_dir,
    data_options: dict,
    out: str | Path,
    rt: Runtime,
    mean=None,
    std=None,
    small_stem: bool | None = None,
    batch_size: int = 512,
    force: bool = False,
    progress=None,
    trust_pickle: bool = False,
) -> dict:
    """Write a kdcache teacher checkpoint for weights trained elsewhere; returns its metadata.
    `trust_pickle`: a whole pickled model may be loaded (see `read_weights`)."""
    check_spec(arch)
    if batch_size < 1:
        raise KDCacheError(f"--batch-size must be >= 1 (got {batch_size})")
    weights = Path(weights)
    with claim_output(out, force=force) as out:
        state = read_weights(weights, trust_pickle)
        data = load_dataset(dataset, data_dir, progress=progress, **data_options)
        image_size = data.geometry.size[0]
        if mean is None:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if data.name == "imagefolder" else _cifar_stats()
        model = build(arch, data.num_classes, image_size=image_size, small_stem=small_stem)
        fit_weights(model, state, weights, arch, data.num_classes)
        if broken := first_nonfinite(model):
            raise KDCacheError(f"{weights} holds non-finite weights (first in {broken}): pass another file")
        model = rt.prepare(model.eval())
        logits = predict(model, data.test_x, tuple(mean), tuple(std), rt, batch_size=batch_size)
        acc = accuracy(logits, data.test_y)
        meta = {
            "role": "teacher",
            "num_classes": data.num_classes,
            "dataset": data.name,
            "dataset_fingerprint": data.fingerprint,
            "num_train": len(data.train_y),
            "normalize_mean": list(mean),
            "normalize_std": list(std),
            "classes": data.classes,
            "params": num_params(model),
            "image_size": image_size,
            "small_stem": _stem_of(small_stem, image_size),
            "data_options": data.options,
            "imported_from": str(weights),
            "metrics": {"test_acc": acc, "epochs": 0, "train_time_s": 0.0},
            "recipe": {"teacher_arch": arch, "dataset": data.name},
        }
        save_checkpoint(out, model, arch=arch, meta=meta)
        return meta


def _cifar_stats():
    from kdcache.config import SEED_RESNET_MEAN, SEED_RESNET_STD

    return SEED_RESNET_MEAN, SEED_RESNET_STD


def _stem_of(small_stem: bool | None, image_size: int) -> bool:
    from kdcache.models import SMALL_IMAGES

    return small_stem if small_stem is not None else image_size <= SMALL_IMAGES


class Ensemble(nn.Module):
    """Members' mean softmax as logits: log(mean_m softmax(f_m(x_m))), where x_m is the batch in each
    member's own normalisation. Input: pixels scaled to [0, 1] (render with mean 0, std 1)."""

    def __init__(self, members: list[nn.Module], means: list, stds: list):
        super().__init__()
        self.members = nn.ModuleList(members)
        for i, (m, s) in enumerate(zip(means, stds, strict=False)):
            self.register_buffer(f"mean{i}", torch.tensor(m, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer(f"std{i}", torch.tensor(s, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = [
            torch.log_softmax(member((x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")).float(), dim=1)
            for i, member in enumerate(self.members)
        ]
        return torch.logsumexp(torch.stack(logp), dim=0) - torch.log(torch.tensor(float(len(logp)), device=x.device))


def ensemble_sha256(shas: list[str]) -> str:
    """The identity of an ensemble: sha256 over its members' sha256s, in order."""
    import hashlib

    return hashlib.sha256("".join(shas).encode()).hexdigest()


def load_teachers(paths, *, rt: Runtime, arch: str | None = None, trust_arch: bool = False):
    """One teacher or an ensemble, ready to predict: (model, first member's meta, render mean, render std,
    cache attributes naming the teacher). An ensemble renders pixels in [0, 1] and normalises inside,
    each member its own way; the first member's normalisation is what the student will use.
    `arch`, `trust_arch`: as `load_checkpoint`'s, for every member."""
    import json

    from kdcache.checkpoints import file_sha256, load_checkpoint

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if len(set(map(str, paths))) != len(paths):
        raise KDCacheError("the same --teacher is given twice: an ensemble needs different members")
    loaded = [load_checkpoint(p, arch=arch, device=rt.device, trust_arch=trust_arch) for p in paths]
    model, meta = loaded[0]
    shas = [file_sha256(p) for p in paths]
    if len(paths) == 1:
        attrs = {"teacher_arch": meta["arch"], "teacher_sha256": shas[0], "teacher_path": str(paths[0])}
        return rt.prepare(model), meta, tuple(meta["normalize_mean"]), tuple(meta["normalize_std"]), attrs
    for p, (_, m) in zip(paths[1:], loaded[1:], strict=False):
        for key in ("dataset", "num_classes", "image_size", "classes"):
            if m.get(key) != meta.get(key):
                raise KDCacheError(
                    f"ensemble members differ in {key}: {paths[0]} has {meta.get(key)!r}, {p} has {m.get(key)!r}: "
                    "ensemble teachers of the same data, classes and image size"
                )
    members = [
        {"path": str(p), "sha256": s, "arch": m["arch"], "test_acc": m.get("metrics", {}).get("test_acc")}
        for p, s, (_, m) in zip(paths, shas, loaded, strict=False)
    ]
    ens = (
        Ensemble(
            [mdl for mdl, _ in loaded],
            [m["normalize_mean"] for _, m in loaded],
            [m["normalize_std"] for _, m in loaded],
        )
        .to(rt.device)
        .eval()
    )
    attrs = {
        "teacher_arch": "ensemble(" + ", ".join(m["arch"] for m in members) + ")",
        "teacher_sha256": ensemble_sha256(shas),
        "teacher_path": ";".join(map(str, paths)),
        "ensemble_members": json.dumps(members),
    }
    return rt.prepare(ens), meta, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), attrs
