"""Take the student home: a kdcache checkpoint as one file that runs without kdcache.

- `onnx`: the model behind its normalisation (float RGB in [0, 1] or uint8 0-255, NCHW, the
  checkpoint's image size, any batch size) -> logits, for onnxruntime and every ONNX runtime;
  the facts (classes, architecture, normalisation, data fingerprint) in `metadata_props`.
- `torch-export`: the same module as a `torch.export` program (.pt2), for PyTorch without the model's
  code (`torch.export.load(FILE).module()`); the facts in FILE.json beside it and inside it (as JSON
  values there: lists are lists, counts numbers).
- `safetensors`: the bare state dict (no normalisation folded in), the facts in its metadata; the keys
  are the architecture's own, so a `torchvision:NAME` / `timm:NAME` model loads them directly.

Every export runs the file it wrote, on a few test images of the checkpoint's dataset (or random
images where the data is not here), against the checkpoint's own logits, before it is published:
a file that does not reproduce them (fp32: max |diff| <= 1e-4 x max(1, largest |logit|), the same
top-1) is never left behind.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdcache import __version__
from kdcache.artifacts import claim_output, temp_file, write_failed
from kdcache.errors import KDCacheError, error_chain

FORMATS = ("onnx", "safetensors", "torch-export")
INPUTS = ("float", "uint8")
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "torch-export": ".pt2"}
EXPORT_FORMAT = "kdcache-export"
# Max |logit difference| an fp32 export may show against the checkpoint, per unit of the largest |logit|
# (at least 1): fp32 keeps ~7 digits, so logits near 100 differ by ~1e-3 between two memory layouts of
# the same model in PyTorch itself.
TOLERANCE = 1e-4
CHECK_IMAGES = 8
EXPORT_EXTRA = "pip install 'kdcache[export]'"
INPUT_TEXT = {
    "float": "float32 RGB in [0, 1], NCHW",
    "uint8": "uint8 RGB 0-255, NCHW",
}


class Normalized(nn.Module):
    """A model behind its normalisation: images (float in [0, 1], or uint8 0-255) in, logits out.
    Computed as kdcache normalises (x / 255, minus mean, over std), so the logits match its own."""

    def __init__(self, model: nn.Module, mean, std, uint8: bool = False):
        super().__init__()
        self.model, self.uint8 = model, uint8
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) / 255.0 if self.uint8 else images
        return self.model((x - self.mean) / self.std)


def facts(meta: dict, model: nn.Module, *, input: str | None) -> dict[str, str]:
    """What an exported file says of itself, as strings (JSON for lists): enough to use it without kdcache.
    `input`: what the file takes (None: safetensors, whose user normalises)."""
    from kdcache.data import recorded_options
    from kdcache.models import SMALL_IMAGES

    size = int(meta.get("image_size", 32))
    small_stem = meta.get("small_stem")
    record = {
        "format": EXPORT_FORMAT,
        "kdcache_version": __version__,
        "arch": meta["arch"],
        "num_classes": str(meta["num_classes"]),
        "classes": json.dumps(list(meta.get("classes") or map(str, range(meta["num_classes"])))),
        "image_size": str(size),
        "normalize_mean": json.dumps([float(v) for v in meta["normalize_mean"]]),
        "normalize_std": json.dumps([float(v) for v in meta["normalize_std"]]),
        "normalization": "folded in" if input else "not folded in: feed (x / 255 - mean) / std",
        "dataset": str(meta["dataset"]),
        "dataset_fingerprint": str(meta["dataset_fingerprint"]),
        "data_options": json.dumps(recorded_options(meta)),
        "small_stem": json.dumps(_has_small_stem(model, size <= SMALL_IMAGES if small_stem is None else small_stem)),
        "role": str(meta.get("role", "")),
    }
    if input:
        record |= {"input": INPUT_TEXT[input], "input_dtype": input, "output": "logits [batch, num_classes]"}
    return record


def _has_small_stem(model: nn.Module, small: bool) -> bool:
    """Whether `build` gave this model the CIFAR stem: asked for, and a ResNet-style `conv1` + `maxpool`."""
    return bool(small) and isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")


def read_facts(raw: dict[str, str], where: str) -> dict:
    """An exported file's facts, parsed back (lists from JSON); a file kdcache did not export is one line."""
    if raw.get("format") != EXPORT_FORMAT:
        raise KDCacheError(f"{where} holds no kdcache export metadata: export it with `kdcache export`")
    try:
        out = dict(raw)
        for key in ("classes", "normalize_mean", "normalize_std", "data_options", "small_stem"):
            out[key] = json.loads(raw[key])
        out["num_classes"], out["image_size"] = int(raw["num_classes"]), int(raw["image_size"])
    except (KeyError, ValueError, TypeError) as e:
        raise KDCacheError(
            f"{where}: its kdcache metadata is damaged ({type(e).__name__}: {e}): export it again"
        ) from None
    return out


# ---- the exporters ---------------------------------------------------------------------------------


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1 << 16)


def _reason(e: BaseException) -> str:
    """What an exporter stumbled on, in a few words: the operator it could not translate (else the
    deepest cause's first line), and the line of the model's code where that happened."""
    chain = list(itertools.islice(error_chain(e), 10))
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(str(c) for c in chain))
    patterns = (r"target=(torch\.ops\.[\w.]+)", r"op='(aten\.[\w.]+)'", r"\b(aten::\w+)")  # dynamo, dispatch, legacy
    op = next((m for p in patterns if (m := re.search(p, text))), None)
    deepest = next((line.strip() for line in str(chain[-1]).splitlines() if line.strip()), type(chain[-1]).__name__)
    what = f"operator {op.group(1)} is not supported" if op else re.sub(r"\x1b\[[0-9;]*m", "", deepest)[:140]
    code = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    user = [c for c in code if "site-packages" not in c[0] and "/torch/" not in c[0]]
    if user:
        file, line, fn = user[-1]
        what += f" (at {Path(file).name}:{line}, in {fn})"
    return what


def _onnx_bytes(module: Normalized, example: torch.Tensor, record: dict) -> bytes:
    try:
        import onnx  # noqa: F401 - the exporter needs it, and onnxscript
        import onnxruntime  # noqa: F401 - the self-check
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise KDCacheError(f"--format onnx needs {e.name}, which is not installed: {EXPORT_EXTRA}") from None
    import onnx

    try:
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: _batch_dim()}},
            verbose=False,
        )
        proto = program.model_proto
    except Exception as e:  # noqa: BLE001 - exporters raise many types; one line names what failed
        raise KDCacheError(
            f"{record['arch']} does not export to ONNX ({_reason(e)}): try --format torch-export or safetensors, "
            "or replace that module with ONNX-friendly operators"
        ) from None
    onnx.helper.set_model_props(proto, record)
    proto.doc_string = f"kdcache {record['arch']}: {record['input']} -> logits"
    return proto.SerializeToString()


def _torch_export_program(module: Normalized, example: torch.Tensor, arch: str):
    try:
        return torch.export.export(module, (example,), dynamic_shapes={"images": {0: _batch_dim()}})
    except Exception as e:  # noqa: BLE001
        raise KDCacheError(
            f"{arch} does not export with torch.export ({_reason(e)}): try --format safetensors, "
            "or rewrite that module without data-dependent Python control flow"
        ) from None


def _safetensors_bytes(model: nn.Module, record: dict) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights); each key gets its own copy
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save(state, metadata=record)


# ---- checking and publishing -----------------------------------------------------------------------


@dataclass
class Check:
    runtime: str
    images: str  # what the check ran on
    max_diff: float
    tolerance: float
    agree: int
    total: int


def check_images(meta: dict, data_dir: Path | None) -> tuple[torch.Tensor, str]:
    """uint8 [n, 3, S, S]: the first test images of the checkpoint's dataset (with its recorded options),
    or random images, with a note saying why, where that data is not here."""
    from kdcache.data import load_dataset, recorded_options

    size = int(meta.get("image_size", 32))
    try:
        data = load_dataset(meta["dataset"], data_dir, subset=1, download=False, **recorded_options(meta))
        x = data.test_x[:CHECK_IMAGES]
        if tuple(x.shape[1:]) == (3, size, size) and len(x):
            return x.contiguous(), f"{len(x)} {data.name} test images"
        why = f"its test images are {tuple(x.shape[2:])}, not {size}x{size}"
    except KDCacheError as e:
        why = str(e).split(":")[0]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (CHECK_IMAGES, 3, size, size), dtype=torch.uint8, generator=g), (
        f"{CHECK_IMAGES} random images (no {meta['dataset']} test images here: {why}; --data-dir points at them)"
    )


def tolerance(want: torch.Tensor) -> float:
    """The largest |logit difference| an export may show: TOLERANCE, scaled by logits larger than 1."""
    return TOLERANCE * max(1.0, want.abs().max().item())


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int]:
    """(max |difference|, how many rows share the top-1). A row whose top two classes are within the
    tolerance of each other is a tie: either answer agrees."""
    got, want = got.float(), want.float()
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if got.shape != want.shape:
        return diff, 0
    mine = got.argmax(1)
    tie = want.max(1).values - want.gather(1, mine[:, None])[:, 0] <= tolerance(want)
    return diff, int(((mine == want.argmax(1)) | tie).sum())


def _publish(out: Path, write: Callable, check: Callable[[Path], Check]) -> tuple[int, float, Check]:
    """Write the file under a temporary name beside `out`, run `check` on it, then rename it to `out`:
    a file that fails its check (or a write that fails) leaves nothing behind. (bytes, seconds the
    write took, the check)."""
    try:
        with temp_file(out) as (fd, tmp):
            start = time.perf_counter()
            with os.fdopen(fd, "wb") as f:
                write(f)
            seconds = time.perf_counter() - start
            try:
                result = check(tmp)
            except KDCacheError:
                raise
            except Exception as e:  # noqa: BLE001 - a runtime that cannot run the file raises its own types
                raise KDCacheError(
                    f"the exported {out.name} does not run ({_reason(e)}): nothing was written; try another --format"
                ) from None
            size = tmp.stat().st_size
            os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        if (error := write_failed(out, e)) is None:
            raise
        raise error from None
    return size, seconds, result


@dataclass
class Exported:
    path: Path
    format: str
    bytes: int
    seconds: float
    check: Check
    side: Path | None = None  # torch-export's JSON


def side_json(out: Path) -> Path:
    """Where a torch-export file's facts go: FILE.json beside FILE."""
    return out.with_name(out.name + ".json")


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    format: str,
    input: str = "float",
    data_dir: str | Path | None = None,
    force: bool = False,
    trust_arch: bool = False,
) -> Exported:
    """Export `checkpoint` as `format` to `out`, checked against the checkpoint's own logits first."""
    from kdcache.checkpoints import load_checkpoint
    from kdcache.views import normalize

    if format not in FORMATS:
        raise KDCacheError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    if input not in INPUTS:
        raise KDCacheError(f"--input must be one of {', '.join(INPUTS)} (got {input!r})")
    if format == "safetensors" and input != "float":
        raise KDCacheError("--input applies to onnx and torch-export (safetensors holds weights only): leave it out")
    if format == "onnx":
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
        if missing:
            raise KDCacheError(f"--format onnx needs {', '.join(missing)}, not installed here: {EXPORT_EXTRA}")
    out = Path(out)
    sides = (side_json(out),) if format == "torch-export" else ()
    with claim_output(out, force=force, sides=sides):
        model, meta = load_checkpoint(checkpoint, trust_arch=trust_arch)
        images, what = check_images(meta, Path(data_dir) if data_dir is not None else None)
        # the checkpoint's fp32 logits in the plain (NCHW) layout the exported files run in (eval's
        # channels_last differs by float rounding only)
        with torch.no_grad():
            want = model(normalize(images, meta["normalize_mean"], meta["normalize_std"]))
        record = facts(meta, model, input=None if format == "safetensors" else input)
        module = Normalized(model, meta["normalize_mean"], meta["normalize_std"], uint8=input == "uint8").eval()
        feed = images if input == "uint8" else images.float() / 255.0
        example = feed[:2] if len(feed) > 1 else feed.repeat(2, 1, 1, 1)  # a batch of 1 would fix the batch size

        def judged(runtime: str, got: torch.Tensor) -> Check:
            diff, agree = compare(got, want)
            if not (diff <= tolerance(want) and agree == len(want)):
                raise KDCacheError(
                    f"the exported {format} file does not reproduce {checkpoint} on {what} (max |logit diff| "
                    f"{diff:.2g}, top-1 agrees on {agree}/{len(want)}): nothing was written; report it with the "
                    "architecture"
                )
            return Check(runtime, what, diff, tolerance(want), agree, len(want))

        start = time.perf_counter()
        with _quiet(), torch.no_grad():
            if format == "onnx":
                blob = _onnx_bytes(module, example, record)
                write = lambda f: f.write(blob)

                def check(path: Path) -> Check:
                    import onnxruntime as ort

                    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
                    _one_alone(run, feed)
                    return judged(f"onnxruntime {ort.__version__}", run(feed))

            elif format == "torch-export":
                program = _torch_export_program(module, example, meta["arch"])
                extra = {"kdcache.json": json.dumps(read_facts(record, str(out)), indent=1)}
                write = lambda f: torch.export.save(program, f, extra_files=extra)

                def check(path: Path) -> Check:
                    with open(path, "rb") as f:  # a file object: torch.export.load wants a .pt2 name otherwise
                        loaded = torch.export.load(f).module()
                    _one_alone(loaded, feed)
                    return judged(f"torch.export.load (torch {torch.__version__})", loaded(feed))

            else:
                blob = _safetensors_bytes(model, record)
                write = lambda f: f.write(blob)

                def check(path: Path) -> Check:
                    fresh = fresh_model(load_safetensors(path, trust_arch=True), trust_arch=True)
                    got = fresh(normalize(images, meta["normalize_mean"], meta["normalize_std"]))
                    return judged("a freshly built model", got)

            seconds = time.perf_counter() - start
            size, writing, result = _publish(out, write, check)
        if sides:
            from kdcache.artifacts import atomic_write_text

            atomic_write_text(sides[0], json.dumps(read_facts(record, str(out)), indent=1) + "\n")
    return Exported(out, format, size, seconds + writing, result, sides[0] if sides else None)


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and log lines (graph dumps on a failure) kept off the terminal: what went
    wrong is said in one line."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            with _devnull_fds():
                yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def _devnull_fds():
    """File descriptors 1 and 2 pointed at /dev/null for a while: what compiled code prints directly."""
    saved = []
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                copy = os.dup(fd)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
                saved.append((fd, copy))
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _one_alone(run, feed: torch.Tensor) -> None:
    """A batch of one must run too (the batch dimension is dynamic)."""
    with torch.no_grad():
        run(feed[:1])


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- reading a safetensors export back (the check, and `kdcache predict`) --------------------------


@dataclass
class Weights:
    path: Path
    facts: dict
    state: dict[str, torch.Tensor]


def load_safetensors(path: str | Path, *, trust_arch: bool = False) -> Weights:
    """A kdcache safetensors export: its facts and tensors (no code runs; a damaged header is one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kdcache.models import refuse_code

    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise KDCacheError(f"{path} is not a readable safetensors file ({reason}): export it again") from None
    record = read_facts(raw, str(path))
    if not trust_arch:
        refuse_code(record["arch"], str(path), "pass --trust-arch if you trust that code")
    return Weights(path, record, state)


def fresh_model(weights: Weights, *, trust_arch: bool = False) -> nn.Module:
    """The architecture the facts name, built afresh, with the weights loaded (eval mode)."""
    from kdcache.models import build, refuse_code

    f = weights.facts
    if not trust_arch:
        refuse_code(f["arch"], str(weights.path), "pass --trust-arch if you trust that code")
    model = build(f["arch"], f["num_classes"], image_size=f["image_size"], small_stem=f["small_stem"])
    try:
        model.load_state_dict(weights.state)
    except RuntimeError as e:
        raise KDCacheError(
            f"{weights.path}: weights do not fit {f['arch']} ({str(e).splitlines()[0][:100]}): export it again"
        ) from None
    return model.eval()
