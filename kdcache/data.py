"""Datasets as uint8 tensors [N, 3, H, W] + int64 labels, read from the python batches.

CIFAR-10/100 are small enough (150 MB as uint8) to live whole in device memory, so
this module returns plain tensors, not a DataLoader. Readers check types, shapes, counts
and labels, never the md5 sums of the batch files (local copies may differ). The batches
are pickles: they are read by an unpickler that builds nothing but numpy arrays and plain
Python values, so a crafted copy cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import KDCacheError
from kdcache.views import CropFlip, Geometry, ResizedCrop

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # image folders: what pretrained torchvision and timm models expect
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # the folder torchvision's reader uses under its root
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    num_train: int
    num_test: int


SPECS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        10,
        50000,
        10000,
    ),
    "cifar100": DatasetSpec(
        "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", 100, 50000, 10000
    ),
}


@dataclass
class Dataset:
    """A train split (possibly the first N rows) and the full test split, all uint8 on CPU."""

    name: str
    train_x: torch.Tensor | np.ndarray  # uint8 [N, 3, H, W]; an image folder's memory-mapped store [N, 3, S, S]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    fingerprint: str  # sha256 of the train images + labels used (after --subset)
    geometry: Geometry = field(default_factory=CropFlip)  # what a view of train_x is
    options: dict = field(default_factory=dict)  # how to load it again (image folders), kept in every artifact

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


INTACT = "replace it with an intact copy of the dataset"


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """How a protocol-2 pickle written by Python 3 spells bytes; no other codec is looked up."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it encodes bytes as {encoding!r}")
    return text.encode("latin1")


_ARRAY = np.zeros(2)
# What CIFAR's batches name, in numpy 1 and 2 spellings: arrays, their dtypes and scalars, Python 3 bytes.
_BATCH_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _ARRAY.__reduce__()[0] for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _ARRAY.__reduce_ex__(5)[0] for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): np.int64(0).__reduce__()[0] for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """The full unpickler calls whatever a pickle names; this one resolves only `_BATCH_GLOBALS`."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _BATCH_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, code a CIFAR batch never holds")
        return _BATCH_GLOBALS[(module, name)]


def _unpickle(path: Path) -> dict:
    """A CIFAR python batch or metadata file: a dict of plain values and numpy arrays."""
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - a damaged or crafted pickle fails in many ways
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise KDCacheError(f"cannot read {path} ({reason}): {INTACT}") from None
    if not isinstance(d, dict):
        raise KDCacheError(f"{path} holds a {type(d).__name__}, not the dict of a CIFAR batch: {INTACT}")
    return d


def _labels(value) -> np.ndarray | None:
    """int64 [n] from a list or array of whole numbers, else None."""
    try:
        y = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return y.astype(np.int64) if y.ndim == 1 and (y.dtype.kind in "iu" or y.size == 0) else None


def _read_batch(path: Path, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """One batch's pixels (uint8 [n, 3072]: the R, G and B planes of 32x32 images) and labels, checked."""
    d = _unpickle(path)
    if "data" not in d or spec.label_key not in d:
        raise KDCacheError(f"{path} has no 'data'/'{spec.label_key}' keys: it is not a {spec.folder} batch")
    x, y = d["data"], _labels(d[spec.label_key])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        what = f"a {x.dtype} array" if isinstance(x, np.ndarray) else f"a {type(x).__name__}"
        raise KDCacheError(f"{path} holds its pixels as {what}, not uint8: {INTACT}")
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise KDCacheError(f"{path} holds pixels of shape {list(x.shape)}, not [N, 3072] (32x32 RGB): {INTACT}")
    if y is None:
        raise KDCacheError(f"{path} holds '{spec.label_key}' that are not a list of whole numbers: {INTACT}")
    if len(y) != len(x):
        raise KDCacheError(f"{path} holds {len(x)} images but {len(y)} labels: {INTACT}")
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise KDCacheError(f"{path} has labels outside 0..{spec.num_classes - 1}: {INTACT}")
    return x, y


def _read_split(folder: Path, files: tuple[str, ...], spec: DatasetSpec, expected: int):
    xs, ys = zip(*(_read_batch(folder / name, spec) for name in files), strict=False)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) != expected:
        raise KDCacheError(f"{folder} holds {len(y)} images where {expected} are expected: {INTACT}")
    return x.reshape(-1, 3, 32, 32), y


def _read_meta(folder: Path, spec: DatasetSpec) -> tuple[list[str], int | None]:
    """The class names and, where stated (CIFAR-10, generated copies), the images per batch."""
    path = folder / spec.meta_file
    meta = _unpickle(path) if path.is_file() else {}
    names = meta.get(spec.names_key, [str(i) for i in range(spec.num_classes)])
    per_batch = meta.get("num_cases_per_batch")
    if not isinstance(names, list) or len(names) != spec.num_classes or not all(isinstance(n, str) for n in names):
        raise KDCacheError(f"{path} does not name {spec.num_classes} classes under '{spec.names_key}': {INTACT}")
    if per_batch is not None and (type(per_batch) is not int or per_batch < 1):
        raise KDCacheError(f"{path} states {per_batch!r} images per batch, not a positive whole number: {INTACT}")
    return names, per_batch


def find_folder(name: str, data_dir: Path) -> Path | None:
    """The batches folder for `name` under `data_dir` (or `data_dir` itself), if present."""
    spec = SPECS[name]
    for candidate in (data_dir / spec.folder, data_dir):
        if (candidate / spec.test_file).is_file() and all((candidate / f).is_file() for f in spec.train_files):
            return candidate
    return None


def _download(name: str, data_dir: Path) -> Path:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    spec = SPECS[name]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        cls(root=str(data_dir), train=True, download=True)  # md5-checked by torchvision
    except Exception as e:  # network errors come in many types
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise KDCacheError(
            f"{name} is not in {data_dir} and downloading it failed ({reason}): "
            f"put the python batches in {data_dir / spec.folder} (make data links ../shared/cifar10 there)"
        ) from None
    return data_dir / spec.folder


DATASETS = (*SPECS, "imagefolder")


def recorded_options(meta: dict) -> dict:
    """The data options an artifact recorded (a checkpoint's dict, a cache's JSON attribute)."""
    import json

    options = meta.get("data_options") or {}
    return json.loads(options) if isinstance(options, str) else dict(options)


def load_dataset(
    name: str = "cifar10",
    data_dir: str | Path | None = None,
    subset: int | None = None,
    download: bool = True,
    **folder_options,
) -> Dataset:
    """Read `name` from `data_dir` (downloading through torchvision if allowed) as uint8 tensors.

    `imagefolder`: `data_dir` is the folder (or `folder_options["data_path"]`, as an artifact
    recorded it); the options are `load_folder`'s."""
    if name == "imagefolder":
        return load_folder(data_dir, subset=subset, **folder_options)
    if name not in SPECS:
        raise KDCacheError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    spec, data_dir = SPECS[name], Path(data_dir if data_dir is not None else "data")
    folder = find_folder(name, data_dir)
    if folder is None:
        if not download or os.environ.get("KDCACHE_OFFLINE"):
            raise KDCacheError(
                f"{name} not found in {data_dir}: put the python batches in {data_dir / spec.folder} "
                "(make data links ../shared/cifar10 there), or unset KDCACHE_OFFLINE to download it"
            )
        folder = _download(name, data_dir)
    classes, per_batch = _read_meta(folder, spec)  # CIFAR-10's meta states the batch size; generated copies theirs
    num_train = per_batch * len(spec.train_files) if per_batch else spec.num_train
    num_test = per_batch if per_batch else spec.num_test
    if subset is not None and not 1 <= subset <= num_train:
        raise KDCacheError(
            f"--subset {subset} is outside 1..{num_train}, the size of the {name} training set in {folder}: "
            f"use at most {num_train}, or leave --subset out for all"
        )
    # --subset N reads only the batches that hold the first N rows (one of CIFAR-10's five for N <= 10,000),
    # each checked as a whole; the rows used, and so the fingerprint, are the same as from all of them
    files = spec.train_files if subset is None or not per_batch else spec.train_files[: -(-subset // per_batch)]
    train_x, train_y = _read_split(folder, files, spec, per_batch * len(files) if per_batch else num_train)
    test_x, test_y = _read_split(folder, (spec.test_file,), spec, num_test)
    if subset is not None:
        train_x, train_y = train_x[:subset], train_y[:subset]
    return Dataset(
        name=name,
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(test_y),
        classes=classes,
        fingerprint=fingerprint(train_x, train_y),
    )


def load_folder(
    data_dir: str | Path | None,
    *,
    subset: int | None = None,
    image_size: int | None = None,
    store_size: int | None = None,
    val_fraction: float | None = None,
    skip_bad_images: bool = False,
    max_image_pixels: int | None = None,
    rebuild_store: bool = False,
    data_path: str | None = None,
    progress=None,
    store_format: str | None = None,
    jpeg_quality: int | None = None,
    **_ignored,
) -> Dataset:
    """An image folder through its prepared store (see `folders`): train rows as store canvases with
    random-resized-crop views, val rendered once as Resize(size / 0.875) + CenterCrop(size)."""
    from kdcache import folders

    root = Path(data_dir if data_dir is not None else data_path or "data")
    image_size = int(image_size or folders.DEFAULT_IMAGE_SIZE)
    store_size = int(store_size or folders.default_store_size(image_size))
    if not 8 <= image_size <= 255:
        raise KDCacheError(f"--image-size must be in 8..255 for image folders (got {image_size})")
    if image_size > store_size:
        raise KDCacheError(
            f"--image-size {image_size} is above the store size {store_size}: lower it, or raise --store-size"
        )
    max_image_pixels = folders.DEFAULT_MAX_PIXELS if max_image_pixels is None else int(max_image_pixels)
    if max_image_pixels < 1:
        raise KDCacheError(f"--max-image-pixels must be >= 1 (got {max_image_pixels})")
    jpeg_quality = folders.DEFAULT_JPEG_QUALITY if jpeg_quality is None else int(jpeg_quality)
    train, val, classes, _ = folders.prepare(
        root,
        store_size,
        val_fraction=val_fraction,
        skip_bad=skip_bad_images,
        max_pixels=max_image_pixels,
        rebuild=rebuild_store,
        store_format=store_format or "auto",
        jpeg_quality=jpeg_quality,
        progress=progress,
    )
    jpeg = train.meta.get("store_format") == "jpeg"
    n = len(train.labels)
    if subset is not None and not 1 <= subset <= n:
        raise KDCacheError(f"--subset {subset} is outside 1..{n}, the training images in {root}: use at most {n}")
    rows = n if subset is None else subset
    fp = (
        train.meta["train_fingerprint"]
        if rows == n
        else folders.content_fingerprint(train.images, train.hw, train.labels, rows)
    )
    train_hw = torch.from_numpy(train.hw[:rows].astype(np.int64))
    evaluate = ResizedCrop(torch.from_numpy(val.hw.astype(np.int64)), image_size)
    val_images = torch.from_numpy(np.array(val.images))
    val_rows = torch.arange(len(val.labels))
    params = evaluate.params(0, val_rows, [0], augment=False)[:, 0]
    test_x = torch.cat(
        [evaluate.pixels(val_images, val_rows[i : i + 256], params[i : i + 256]) for i in range(0, len(val_rows), 256)]
    )
    options = {
        "data_path": str(root.resolve()),
        "image_size": image_size,
        "store_size": store_size,
        "val_fraction": val_fraction,
        "skip_bad_images": skip_bad_images,
        "max_image_pixels": max_image_pixels,
        "store_format": "jpeg" if jpeg else "raw",
        "jpeg_quality": jpeg_quality if jpeg else None,
    }
    return Dataset(
        name="imagefolder",
        train_x=train.images[:rows],  # the memory-mapped store: `Runtime.place` loads it, or streams it
        train_y=torch.from_numpy(train.labels[:rows].astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(val.labels.astype(np.int64)),
        classes=classes,
        fingerprint=fp,
        geometry=ResizedCrop(train_hw, image_size),
        options=options,
    )


def write_fake_cifar10(root: str | Path, num_train: int = 1000, seed: int = 0) -> Path:
    """Write a generated dataset in the real CIFAR-10 on-disk layout (for tests and benchmarks).

    Images are class-dependent colour patterns plus noise, so small models can learn them.
    Five train batches of num_train/5 images and a test batch of the same size, as
    `batches.meta` (num_cases_per_batch) states.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / SPECS["cifar10"].folder
    folder.mkdir(parents=True, exist_ok=True)

    def make(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, n)
        base = np.stack([np.full((32, 32), 25 * c, np.float32) for c in range(10)])  # [10, 32, 32]
        yy, xx = np.mgrid[0:32, 0:32]
        img = np.empty((n, 3, 32, 32), np.float32)
        for ch in range(3):
            img[:, ch] = base[(labels + 3 * ch) % 10]
        img += 40 * np.sin((xx + 3 * labels[:, None, None]) / 4.0)[:, None]
        img += rng.normal(0, 70, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8).reshape(n, -1), labels.tolist()

    per_batch = num_train // 5
    for i in range(5):
        x, y = make(per_batch)
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": f"fake {i + 1}"}, f)
    x, y = make(per_batch)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x, "labels": y, "batch_label": "fake test"}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": per_batch}, f)
    return folder
