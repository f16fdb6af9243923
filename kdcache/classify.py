"""`kdcache predict`: image files through a checkpoint or an exported model, top-k classes.

Images are prepared as kdcache evaluates an image folder at the model's image size: decoded
(EXIF-rotated, RGB) and shrunk to fit the store size, then the central square of 0.875 x the short
side resized to the image size (Resize(size / 0.875) + CenterCrop(size)), the same code that
renders a folder's validation images. A CIFAR checkpoint's own kind of image (exactly its image
size, square) passes through unchanged, as CIFAR is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import KDCacheError


@dataclass
class Classifier:
    """What `predict` needs of a model, whatever file it came from."""

    path: Path
    kind: str  # checkpoint | onnx | safetensors
    arch: str
    classes: list[str]
    image_size: int
    dataset: str
    data_options: dict
    logits: Callable[[torch.Tensor], torch.Tensor]  # uint8 [B, 3, S, S] -> float32 [B, C]


def open_model(path: str | Path, *, trust_arch: bool = False) -> Classifier:
    """A kdcache checkpoint, an exported .onnx file or an exported .safetensors file, ready to classify.
    Opening it runs no code from it; a damaged or foreign file is one line."""
    path = Path(path)
    if not path.is_file():
        raise KDCacheError(f"{path} does not exist: pass a kdcache checkpoint or an exported .onnx/.safetensors file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return _open_onnx(path)
    if suffix == ".pt2":
        raise KDCacheError(
            f"{path} is a torch-export program: load it with torch.export.load; predict reads kdcache checkpoints "
            "and .onnx/.safetensors exports"
        )
    from kdcache.data import recorded_options
    from kdcache.inference import predict
    from kdcache.runtime import Runtime

    rt = Runtime.create("cpu", "fp32")
    if suffix == ".safetensors":
        from kdcache.export import fresh_model, load_safetensors

        weights = load_safetensors(path, trust_arch=trust_arch)
        model, f = fresh_model(weights, trust_arch=trust_arch), weights.facts
        meta = f
    else:
        from kdcache.checkpoints import load_checkpoint

        model, meta = load_checkpoint(path, trust_arch=trust_arch)
    mean, std = meta["normalize_mean"], meta["normalize_std"]
    return Classifier(
        path,
        "safetensors" if suffix == ".safetensors" else "checkpoint",
        meta["arch"],
        list(meta.get("classes") or map(str, range(meta["num_classes"]))),
        int(meta.get("image_size", 32)),
        meta["dataset"],
        recorded_options(meta),
        lambda x: predict(model, x, mean, std, rt),
    )


def _open_onnx(path: Path) -> Classifier:
    from kdcache.export import EXPORT_EXTRA, read_facts

    try:
        import onnxruntime as ort
    except ImportError:
        raise KDCacheError(f"{path}: running ONNX needs onnxruntime, not installed here: {EXPORT_EXTRA}") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors are of its own pybind types
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise KDCacheError(
            f"{path} is not a readable ONNX model ({reason}): it may be truncated; export it again"
        ) from None
    f = read_facts(session.get_modelmeta().custom_metadata_map, str(path))
    name, uint8 = session.get_inputs()[0].name, f.get("input_dtype") == "uint8"

    def logits(x: torch.Tensor) -> torch.Tensor:
        feed = x.numpy() if uint8 else (x.to(torch.float32) / 255.0).numpy()
        return torch.from_numpy(np.asarray(session.run(None, {name: feed})[0], dtype=np.float32))

    return Classifier(path, "onnx", f["arch"], f["classes"], f["image_size"], f["dataset"], f["data_options"], logits)


# ---- images --------------------------------------------------------------------------------------


def image_files(args: list[Path]) -> list[Path]:
    """The files named, and the images (by extension) found under the folders named, sorted per folder."""
    from kdcache.folders import EXTENSIONS

    files = []
    for arg in args:
        if arg.is_dir():
            found = sorted(p for p in arg.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
            if not found:
                raise KDCacheError(f"{arg} holds no image files (extensions read: {' '.join(EXTENSIONS)})")
            files += found
        elif arg.is_file():
            files.append(arg)
        else:
            raise KDCacheError(f"{arg} does not exist: pass image files or folders of them")
    return files


def prepare(path: Path, model: Classifier) -> np.ndarray:
    """uint8 [3, S, S]: the image as kdcache evaluates one at the model's image size (see the module doc)."""
    from kdcache.folders import DEFAULT_MAX_PIXELS, decode, default_store_size, fill_canvas
    from kdcache.views import ResizedCrop

    size = model.image_size
    store = int(model.data_options.get("store_size") or default_store_size(size))
    image = decode(path, store, int(model.data_options.get("max_image_pixels") or DEFAULT_MAX_PIXELS))
    h, w = image.shape[1:]
    if model.dataset != "imagefolder" and (h, w) == (size, size):
        return image
    canvas = np.empty((3, max(store, h, w), max(store, h, w)), np.uint8)
    fill_canvas(canvas, image)
    crop = ResizedCrop(torch.tensor([[h, w]]), size)
    rows = torch.zeros(1, dtype=torch.int64)
    return crop.pixels(torch.from_numpy(canvas)[None], rows, crop.params(0, [0], [0], augment=False)[:, 0])[0].numpy()


def read_images(files: list[Path], model: Classifier, *, skip_bad: bool, warn: Callable[[str], None]):
    """(the files that decoded, uint8 [N, 3, S, S]). A file that does not decode is one line: the error
    (at the first such file), or with `skip_bad` a note per file while the rest go on."""
    from kdcache.folders import TooLarge

    good, images = [], []
    for path in files:
        try:
            images.append(prepare(path, model))
            good.append(path)
            continue
        except TooLarge as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - PIL raises many types; reported per file
            why = f"does not decode as an image ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
        if not skip_bad:
            raise KDCacheError(f"{path} {why}: remove or replace it, or pass --skip-bad-images")
        warn(f"skipped {path}: {why}")
    return good, torch.from_numpy(np.stack(images)) if images else None


def top_k(logits: torch.Tensor, classes: list[str], k: int) -> list[list[dict]]:
    probs = logits.float().softmax(1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [{"class": classes[i], "index": int(i), "probability": float(p)} for p, i in zip(row_p, row_i, strict=True)]
        for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def classify(
    model_path: str | Path,
    images: list[Path],
    *,
    topk: int = 5,
    skip_bad: bool = False,
    trust_arch: bool = False,
    batch_size: int = 256,
    warn: Callable[[str], None] = print,
) -> tuple[Classifier, list[dict]]:
    """[{"image", "top": [{"class", "index", "probability"}]}] for every image that decoded."""
    if topk < 1:
        raise KDCacheError(f"--topk must be >= 1 (got {topk})")
    files = image_files(images)
    model = open_model(model_path, trust_arch=trust_arch)
    rows = []
    for start in range(0, len(files), batch_size):  # a batch of images in memory at a time
        good, x = read_images(files[start : start + batch_size], model, skip_bad=skip_bad, warn=warn)
        if good:
            top = top_k(model.logits(x), model.classes, topk)
            rows += [{"image": str(p), "top": t} for p, t in zip(good, top, strict=True)]
    if not rows:
        raise KDCacheError("no image decoded: pass image files that PIL reads")
    return model, rows
