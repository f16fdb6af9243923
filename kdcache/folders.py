"""Image folders (`PATH/train/<class>/*`, optional `PATH/val/<class>/*`) as a prepared store.

Decoding JPEGs in the hot loop is what makes training slow, so the first use of a
folder decodes every image once (threads; PIL releases the GIL while decoding and
resizing), shrinks it to fit a square of `store_size` pixels (aspect ratio kept,
never enlarged) and writes uint8 arrays under the store directory
(`$KDCACHE_STORE_DIR`, default `~/.cache/kdcache/stores`, one folder per data path,
store size and split). Later runs map the arrays back in a fraction of a second.

Each image sits top-left in a square canvas [3, S, S]; the canvas beyond it repeats the
image's last row and column, so a bilinear sample at the image's edge reads the edge
(as clamping would). Its true (h, w) is stored beside it. Rows are in a fixed order
drawn from a hash of each file's relative path, so `--subset N` takes a class-mixed
first N.

The store remembers the folder's listing (relative path, size, modification time of
every file). A run that finds the folder changed, or the store damaged, stops with a
one-line error; pass `rebuild=True` (`--rebuild-store`) to prepare it again. A store is
prepared under a lock (a second run waits for it), in a private folder published with
one rename once complete.

A store is `raw` (the uint8 canvases themselves, read by memory map) or `jpeg` (each shrunk image
once as JPEG bytes in one file, with an offsets index: about a tenth of the raw bytes). A jpeg
store's rows are decoded per batch, on a pool of threads, into the same canvases a raw store
holds (`JpegImages`); every reader decodes with the same decoder on the CPU, so a dump, a student
and `verify` see the same pixels. That is checked on a sample, not assumed: a jpeg store records the
digests of 16 of its images, as bytes and as decoded pixels (and which decoder made them); every
opening decodes them again and refuses a decoder that gives other pixels; and those pixels are part
of the data fingerprint a checkpoint or cache records, so a cache dumped where the decoder differs
is refused as other data rather than replayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdcache.artifacts import check_writable, no_room, output_lock, unique_beside
from kdcache.errors import KDCacheError

STORE_VERSION = 1
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# PIL decodes these and nothing else, whatever a file's name says: its EPS reader, for one, runs Ghostscript
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
DEFAULT_IMAGE_SIZE = 224
# Decoding costs memory in proportion to the canvas a file declares (3 bytes a pixel and more, per
# decode thread); 40 megapixels holds any camera photo up to 7,700 x 5,200.
DEFAULT_MAX_PIXELS = 40_000_000
STORE_FORMATS = ("auto", "raw", "jpeg")
# q90 keeps a photo's detail (it is what FFCV and most ImageNet copies use) at about a tenth of the
# raw bytes; chroma 4:2:0, as camera files have.
DEFAULT_JPEG_QUALITY = 90
_META_KEYS = (
    "store_size",
    "skip_bad",
    "classes",
    "listing_sha256",
    "train_fingerprint",
    "train_num_images",
    "val_num_images",
)


def default_store_size(image_size: int) -> int:
    """Long side of the store: a 4:3 photo's short side then equals image_size / 0.875, the
    evaluation resize, so neither the evaluation crop nor a full-image random crop is enlarged.
    Rounded up to a multiple of 8 (64 -> 104, 224 -> 344)."""
    return -(-int(np.ceil(image_size * 4 / 3 / 0.875)) // 8) * 8


def store_root() -> Path:
    env = os.environ.get("KDCACHE_STORE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kdcache" / "stores"


@dataclass
class Split:
    files: list[Path]  # absolute paths, in store row order
    labels: np.ndarray  # int64


@dataclass
class Store:
    """One prepared split: canvas uint8 [N,3,S,S] (memory-mapped, or `JpegImages` decoding on read),
    hw int16 [N,2], labels int64 [N]."""

    images: np.ndarray | JpegImages
    hw: np.ndarray
    labels: np.ndarray
    meta: dict


def _rel_key(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def scan(root: Path, val_fraction: float | None) -> tuple[list[str], Split, Split]:
    """Classes (sorted folder names) and the train/val file lists, checked."""
    train_dir = root / "train"
    if not root.is_dir():
        raise KDCacheError(f"image folder {root} does not exist: pass a folder with train/<class>/ image sub-folders")
    if not train_dir.is_dir():
        raise KDCacheError(f"{root} has no train/ folder: lay the images out as {root}/train/<class>/*.jpg")
    class_dirs = _class_folders(train_dir)
    if not class_dirs:
        raise KDCacheError(f"{train_dir} has no class folders: put each class's images in {train_dir}/<class>/")
    classes = [p.name for p in class_dirs]
    per_class = {c: _images_in(train_dir / c) for c in classes}
    if empty := [c for c, files in per_class.items() if not files]:
        raise KDCacheError(
            f"class folder {train_dir / empty[0]} has no images ({len(empty)} such folder(s); "
            f"extensions read: {' '.join(EXTENSIONS)}): add images or remove the folder"
        )
    val_dir = root / "val"
    if val_dir.is_dir():
        if val_fraction is not None:
            raise KDCacheError(f"{root} has a val/ folder, so --val-fraction does not apply: leave it out")
        val_classes = [p.name for p in _class_folders(val_dir)]
        if val_classes != classes:
            diff = sorted(set(val_classes) ^ set(classes))
            raise KDCacheError(
                f"{val_dir} has other classes than {train_dir} ({len(diff)} differ, e.g. {diff[0]!r}): "
                "give val/ the same class folders as train/"
            )
        val = {c: _images_in(val_dir / c) for c in classes}
        train = per_class
    else:
        if val_fraction is None:
            raise KDCacheError(
                f"{root} has no val/ folder: add one, or hold out part of train/ with --val-fraction 0.1"
            )
        if not 0.0 < val_fraction < 1.0:
            raise KDCacheError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
        train, val = {}, {}
        for c, files in per_class.items():  # stratified: the same share of every class, by a hash of the path
            ranked = sorted(files, key=lambda p: _rel_key(str(p.relative_to(root))))
            hold = min(len(files) - 1, round(val_fraction * len(files)))
            val[c], train[c] = ranked[:hold], ranked[hold:]

    def split(groups: dict[str, list[Path]]) -> Split:
        pairs = [(p, i) for i, c in enumerate(classes) for p in groups[c]]
        pairs.sort(key=lambda pl: _rel_key(str(pl[0].relative_to(root))))
        return Split([p for p, _ in pairs], np.array([i for _, i in pairs], dtype=np.int64))

    train_split, val_split = split(train), split(val)
    if not len(val_split.files):
        raise KDCacheError(f"{root}: the validation split is empty: add images to val/ or raise --val-fraction")
    return classes, train_split, val_split


def raw_limit() -> int:
    """The largest raw store `auto` picks: half the machine's physical memory (the part of a store
    the page cache can keep; past it every epoch reads the disk at raw size)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def choose_format(store_format: str, num_images: int, store_size: int) -> str:
    """`raw` or `jpeg`: as asked, or for `auto` raw while the raw store fits `raw_limit()`, jpeg beyond."""
    if store_format != "auto":
        return store_format
    return "raw" if num_images * 3 * store_size**2 <= raw_limit() else "jpeg"


def listing_digest(root: Path, files: list[Path]) -> str:
    """sha256 of (relative path, size, mtime_ns) of every file: notices added, removed or rewritten files."""
    h = hashlib.sha256()
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class TooLarge(Exception):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""


def decode(path: Path, store_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [3, h, w]: an image in one of `FORMATS`, EXIF-rotated, as RGB, shrunk to fit store_size (bicubic).
    The size its header declares is checked first: a small file can declare a huge canvas."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency and EXIF warnings
        with Image.open(path, formats=FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise TooLarge(f"declares {im.width}x{im.height} pixels, over --max-image-pixels {max_pixels:,}")
            im.draft("RGB", (store_size, store_size))  # JPEG: decode at the smallest scale still >= the store
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "LA", "PA") else im.convert("RGB")
            im.thumbnail((store_size, store_size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """uint8 [3, h, w] -> JPEG bytes (Pillow's libjpeg-turbo; chroma 4:2:0)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _try_decode(args) -> np.ndarray | tuple[int, int, bytes] | tuple[str, str]:
    """The image (or with a JPEG quality: its (h, w, JPEG bytes)), or (what is wrong with the file,
    what to do): its part of the one-line error."""
    path, store_size, max_pixels, quality = args
    from PIL import Image

    try:
        image = decode(path, store_size, max_pixels)
        return image if quality is None else (*image.shape[1:], encode_jpeg(image, quality))
    except TooLarge as e:
        return str(e), "remove or shrink it, raise --max-image-pixels if it is genuine"
    except Image.DecompressionBombError as e:  # over PIL's own limit, which stops it before ours
        return f"declares more pixels than PIL decodes ({str(e).split(',')[0]})", "remove or shrink it"
    except Exception as e:  # noqa: BLE001 - PIL raises many types; reported per file
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        return f"does not decode as an image ({why})", "remove or replace it"


def _new_array(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A uint8 .npy file of `shape`, allocated whole before it is mapped: past a full disk, a write to
    a memory map is a SIGBUS that kills the process without a word; here it is an OSError (ENOSPC)
    before any image is decoded."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.flush()
        os.posix_fallocate(f.fileno(), f.tell(), int(np.prod(shape)))
    return np.lib.format.open_memmap(path, mode="r+")


def fill_canvas(canvas: np.ndarray, image) -> None:
    """Put `image` [3, h, w] top-left in `canvas` [3, S, S]; beyond it repeat its last row and column."""
    h, w = image.shape[1:]
    canvas[:, :h, :w] = image
    canvas[:, h:, :w] = image[:, h - 1 : h, :]
    canvas[:, :, w:] = canvas[:, :, w - 1 : w]


def _write_split(
    folder: Path,
    name: str,
    root: Path,
    split: Split,
    store_size: int,
    skip_bad: bool,
    max_pixels: int,
    quality: int | None,
    progress,
) -> dict:
    """Decode (and for a jpeg store, `quality` not None, re-encode) every image of the split on a pool
    of threads, writing it as it comes: canvases into a preallocated array, or JPEG bytes appended
    to one file with their offsets."""
    n, s = len(split.files), store_size
    if quality is None:
        images = _new_array(folder / f"{name}_images.npy", (n, 3, s, s))
    else:
        data, offsets = open(folder / f"{name}_jpeg.bin", "wb"), [0]
    hw = np.zeros((n, 2), np.int16)
    bad: list[tuple[str, str, str]] = []
    keep = np.ones(n, bool)
    progress.begin(f"preparing {name} ({n:,} images)", n)
    jobs = [(p, s, max_pixels, quality) for p in split.files]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for i, result in enumerate(pool.map(_try_decode, jobs, chunksize=16)):
            if isinstance(result, tuple) and isinstance(result[0], str):
                bad.append((str(split.files[i].relative_to(root)), *result))
                keep[i] = False
            elif quality is None:
                fill_canvas(images[i], result)
                hw[i] = result.shape[1:]
            else:
                h, w, jpeg = result
                data.write(jpeg)
                offsets.append(offsets[-1] + len(jpeg))
                hw[i] = (h, w)
            progress.advance()
    progress.end()
    if bad and not skip_bad:
        path, problem, fix = bad[0]
        raise KDCacheError(
            f"{root / path} {problem} ({len(bad)} bad file(s) in {name}): {fix}, "
            "or pass --skip-bad-images to leave such files out"
        )
    labels, files = split.labels, split.files
    if bad:  # compact the kept rows to the front, in order; readers take the first num_images rows
        kept = np.flatnonzero(keep)
        if not len(kept):
            raise KDCacheError(f"no image in {root}'s {name} split decodes: check the files")
        if quality is None:
            for dst, src in enumerate(kept):
                if dst != src:
                    images[dst] = images[src]
        hw, labels, files = hw[kept], labels[kept], [files[i] for i in kept]
    if quality is None:
        images.flush()
        del images
    else:
        data.close()
        np.save(folder / f"{name}_offsets.npy", np.array(offsets, np.int64))
        # which file each row came from: a damaged row is then named by its source
        (folder / f"{name}_files.txt").write_text("".join(f"{p.relative_to(root)}\n" for p in files))
    np.save(folder / f"{name}_hw.npy", hw)
    np.save(folder / f"{name}_labels.npy", labels)
    return {"num_images": int(len(labels)), "skipped": [f"{p}: {problem}" for p, problem, _ in bad]}


class JpegImages:
    """One split of a jpeg store, read like a raw store's uint8 array [N, 3, S, S]: `images[rows]`
    decodes those rows into canvases on `workers` threads, `images[:n]` is the first n rows.

    Every reader decodes with Pillow's libjpeg-turbo on the CPU (its default integer IDCT and
    upsampling give the same pixels on every CPU, SIMD or not; torchvision's CPU `decode_jpeg`, also
    libjpeg-turbo, gives the same bytes), so the dump, the student and `verify` see the same pixels
    whichever device trains. A GPU decoder (nvJPEG) rounds its IDCT differently, so it is not used:
    a cache replayed with other pixels would no longer be the views its teacher saw.
    """

    dtype = np.dtype(np.uint8)

    def __init__(
        self,
        folder: Path,
        name: str,
        data: np.ndarray,
        offsets: np.ndarray,
        hw: np.ndarray,
        size: int,
        first: int = 0,
        workers: int | None = None,
    ):
        self.folder, self.name, self.data, self.offsets, self.hw = folder, name, data, offsets, hw
        self.size, self.first = size, first
        self.workers = workers or max(1, os.cpu_count() or 1)
        self._digests: dict[int, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), 3, self.size, self.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded canvases (what holding them resident takes)."""
        return len(self) * 3 * self.size * self.size

    @property
    def stored_bytes(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a jpeg store is sliced with step 1 only")
            stop = max(start, stop)
            return JpegImages(
                self.folder,
                self.name,
                self.data,
                self.offsets[start : stop + 1],
                self.hw[start:stop],
                self.size,
                self.first + start,
                self.workers,
            )
        rows = np.asarray(key, dtype=np.int64)
        return self.decode(rows.reshape(-1)).reshape(*rows.shape, 3, self.size, self.size)

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.uint8)
        for start in range(0, len(self), 1024):
            rows = np.arange(start, min(len(self), start + 1024))
            out[start : start + len(rows)] = self.decode(rows)
        return out if dtype is None else out.astype(dtype)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), 3, S, S]: the canvases of `rows`, decoded on up to `workers` threads."""
        out = np.empty((len(rows), 3, self.size, self.size), np.uint8)
        parts = [p for p in np.array_split(np.arange(len(rows)), min(self.workers, max(1, len(rows)))) if len(p)]

        def work(part: np.ndarray) -> None:
            for i, image in zip(part, self._decode([int(rows[i]) for i in part]), strict=False):
                fill_canvas(out[i], image)

        if len(parts) == 1:
            work(parts[0])
        elif parts:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                list(pool.map(work, parts))
        return out

    def _decode(self, rows: list[int]) -> list[np.ndarray]:
        import io

        from PIL import Image

        images = []
        for r in rows:
            if not 0 <= r < len(self):
                raise IndexError(f"row {r} is outside 0..{len(self) - 1}")
            try:
                with Image.open(io.BytesIO(self.data[self.offsets[r] : self.offsets[r + 1]]), formats=("JPEG",)) as im:
                    image = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            except Exception as e:  # noqa: BLE001 - PIL raises many types; one line naming the image
                raise self._bad(
                    r, f"does not decode ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
                ) from None
            if image.shape[1:] != tuple(int(v) for v in self.hw[r]):
                h, w = (int(v) for v in self.hw[r])
                raise self._bad(r, f"decodes to {image.shape[2]}x{image.shape[1]} pixels, not the {w}x{h} recorded")
            images.append(image)
        return images

    def sample_digests(self, rows: int | None = None) -> tuple[str, str]:
        """sha256 of the stored bytes and of the decoded canvases of a fixed sample (`decode_sample`) of the
        first `rows` rows: the bytes tell damage from a decoder that rounds otherwise."""
        n = len(self) if rows is None else rows
        if n not in self._digests:  # made once per reader (a build fingerprints what it just checked)
            sample = decode_sample(n)
            stored = hashlib.sha256(
                b"".join(self.data[self.offsets[r] : self.offsets[r + 1]].tobytes() for r in sample)
            )
            self._digests[n] = (stored.hexdigest(), hashlib.sha256(self.decode(sample).tobytes()).hexdigest())
        return self._digests[n]

    def _bad(self, row: int, what: str) -> KDCacheError:
        try:
            source = (self.folder / f"{self.name}_files.txt").read_text().splitlines()[self.first + row]
        except (OSError, IndexError):
            source = f"row {self.first + row}"
        return KDCacheError(
            f"the image store {self.folder} is damaged: its copy of {source} {what}: "
            "run again with --rebuild-store to prepare it anew"
        )


DECODE_SAMPLE = 16  # images of a jpeg store decoded at every opening to check the decoder
DECODE_CHECK_KEYS = ("decoder", "bytes_sha256", "pixels_sha256")  # meta.json's decode_check record


def decode_sample(n: int) -> np.ndarray:
    """The rows of the first `n` whose decoded pixels stand for the decoder: up to 16, evenly spread."""
    return (
        np.unique(np.linspace(0, n - 1, min(n, DECODE_SAMPLE)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
    )


def jpeg_decoder() -> str:
    """Which decoder this process reads a jpeg store with (named in a refusal; the pixels decide)."""
    import PIL
    from PIL import features

    return f"Pillow {PIL.__version__}, libjpeg-turbo {features.version('libjpeg_turbo') or 'absent (libjpeg)'}"


def content_fingerprint(images, hw: np.ndarray, labels: np.ndarray, rows: int | None = None) -> str:
    """sha256 over the first `rows` stored images (each its own h x w pixels, or a jpeg store's
    bytes and offsets and the decoded pixels of its `decode_sample`), sizes and labels."""
    n = len(labels) if rows is None else rows
    h = hashlib.sha256()
    if isinstance(images, JpegImages):
        h.update(b"jpeg\0")
        for start in range(0, n, 4096):
            stop = min(n, start + 4096)
            h.update(np.asarray(images.data[images.offsets[start] : images.offsets[stop]]).tobytes())
        h.update(np.ascontiguousarray(images.offsets[: n + 1] - images.offsets[0], dtype=np.int64).tobytes())
        h.update(b"decoded\0" + images.sample_digests(n)[1].encode())  # the same bytes decoded otherwise differ
    else:
        for block in range(0, n, 1024):
            h.update(np.ascontiguousarray(images[block : min(n, block + 1024)]).tobytes())
    h.update(np.ascontiguousarray(hw[:n]).tobytes())
    h.update(np.ascontiguousarray(labels[:n], dtype=np.int64).tobytes())
    return h.hexdigest()


def store_dir(root: Path, store_size: int, val_fraction: float | None, jpeg_quality: int | None = None) -> Path:
    """The store's folder: one per data path, store size, split and format (a jpeg store per quality)."""
    key = f"{root.resolve()}\0{store_size}\0{val_fraction}\0{STORE_VERSION}"
    kind = ""
    if jpeg_quality is not None:
        key, kind = f"{key}\0jpeg{jpeg_quality}", f"jpeg{jpeg_quality}-"
    return store_root() / f"{root.resolve().name}-{store_size}-{kind}{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare(
    root: str | Path,
    store_size: int,
    *,
    val_fraction: float | None = None,
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rebuild: bool = False,
    store_format: str = "raw",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    progress=None,
) -> tuple[Store, Store, list[str], Path]:
    """(train store, val store, classes, store folder): made once per folder, store size and format
    (`raw`, `jpeg` at `jpeg_quality`, or `auto`: see `choose_format`), then reused.

    The store is checked, opened and prepared under its lock; `rebuild` prepares it again
    whatever state it is in. A store root that cannot be written still serves a ready store."""
    from kdcache.runtime import NoProgress

    progress = progress or NoProgress()
    root = Path(root)
    if store_format not in STORE_FORMATS:
        raise KDCacheError(f"--store-format must be one of {', '.join(STORE_FORMATS)} (got {store_format!r})")
    if not 1 <= jpeg_quality <= 100:
        raise KDCacheError(f"--jpeg-quality must be in 1..100 (got {jpeg_quality})")
    classes, train, val = scan(root, val_fraction)
    listing = listing_digest(root, train.files + val.files)
    if choose_format(store_format, len(train.files) + len(val.files), store_size) == "raw":
        jpeg_quality = None
    folder = store_dir(root, store_size, val_fraction, jpeg_quality)
    record = {
        "val_fraction": val_fraction,
        "listing_sha256": listing,
        "skip_bad": skip_bad,
        "max_image_pixels": max_pixels,
        "store_format": "raw" if jpeg_quality is None else "jpeg",
        "jpeg_quality": jpeg_quality,
    }
    try:
        check_writable(folder.parent, "make it writable, or point KDCACHE_STORE_DIR at a writable folder")
    except KDCacheError:
        if rebuild or _published(folder) is None:
            raise
        lock = contextlib.nullcontext()  # read-only: nobody prepares the store here, it is read as it is
    else:
        lock = output_lock(
            folder, wait=lambda pid: progress.note(f"waiting for kdcache run {pid}, which is preparing {folder}")
        )
    with lock:
        meta = None if rebuild else _published(folder)
        if meta is None:
            meta = _build(root, folder, classes, {"train": train, "val": val}, store_size, record, progress)
        else:
            _refuse_stale(root, folder, meta, classes, record)
        return _open(folder, meta) + (classes, folder)


def _damaged(folder: Path, why: str) -> KDCacheError:
    return KDCacheError(
        f"the image store {folder} is damaged ({why}): run again with --rebuild-store to prepare it anew"
    )


def _published(folder: Path) -> dict | None:
    """The checked meta.json of the store at `folder`, or None when there is none."""
    if not os.path.lexists(folder):
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise _damaged(folder, "it has no meta.json") from None
    except (OSError, ValueError) as e:
        raise _damaged(folder, f"meta.json does not read as JSON: {str(e).splitlines()[0][:60]}") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != "kdcache-image-store"
        or meta.get("version") != STORE_VERSION
    ):
        raise _damaged(folder, f"meta.json is not a version-{STORE_VERSION} kdcache store record")
    if missing := [k for k in _META_KEYS if k not in meta]:
        raise _damaged(folder, f"meta.json lacks {missing[0]!r}")
    if not all(isinstance(meta[f"{name}_num_images"], int) for name in ("train", "val")):
        raise _damaged(folder, "meta.json's image counts are not numbers")
    if meta.get("store_format") == "jpeg":
        if "decode_check" not in meta:
            raise KDCacheError(
                f"the image store {folder} was prepared by an earlier kdcache, before jpeg stores checked their "
                "decoder: run again with --rebuild-store to prepare it anew (checkpoints and caches made from the old "
                "store will no longer match: train and dump them again)"
            )
        check = meta["decode_check"]
        if not (isinstance(check, dict) and all(isinstance(check.get(k), str) for k in DECODE_CHECK_KEYS)):
            raise _damaged(folder, "meta.json's decode_check is not a record of strings")
    return meta


def _refuse_stale(root: Path, folder: Path, meta: dict, classes: list[str], current: dict) -> None:
    """A store made from another listing, other classes or another bad-image policy is not reused (the
    pixel limit counts only where bad images are left out: elsewhere it changes no row)."""
    if meta["classes"] != classes:
        what = "its classes"
    elif meta["listing_sha256"] != current["listing_sha256"]:
        what = "its files"
    elif meta["skip_bad"] != current["skip_bad"]:
        what = "--skip-bad-images"
    elif current["skip_bad"] and meta.get("max_image_pixels") != current["max_image_pixels"]:
        what = "--max-image-pixels"
    else:
        return
    raise KDCacheError(
        f"{root} changed since its store in {folder} was prepared ({what} differ): "
        "pass --rebuild-store to prepare it again (artifacts made from the old store will no longer match)"
    )


def _build(
    root: Path, folder: Path, classes: list[str], splits: dict[str, Split], store_size: int, record: dict, progress
) -> dict:
    """Decode every image into a new private folder beside `folder`, fingerprint what was written, and
    publish it as `folder` with one rename; a full disk is one line and leaves nothing behind."""
    for old in folder.parent.iterdir():  # what killed runs left: we hold the lock, nobody writes them
        if old.name.startswith(f".{folder.name}.") and old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    _, tmp = unique_beside(folder, ".partial", os.mkdir)
    try:
        progress.note(f"preparing a {store_size}-pixel store of {root} in {folder} (once)")
        info = {
            name: _write_split(
                tmp,
                name,
                root,
                split,
                store_size,
                record["skip_bad"],
                record["max_image_pixels"],
                record["jpeg_quality"],
                progress,
            )
            for name, split in splits.items()
        }
        meta = {
            "format": "kdcache-image-store",
            "version": STORE_VERSION,
            "root": str(root.resolve()),
            "store_size": store_size,
            "classes": classes,
            **record,
            **{f"{name}_{k}": v for name, d in info.items() for k, v in d.items()},
        }
        train = _open(tmp, meta)[0]  # the store as its readers will open it
        if isinstance(train.images, JpegImages):  # what this decoder makes of it, checked at every opening
            stored, pixels = train.images.sample_digests()
            meta["decode_check"] = {"decoder": jpeg_decoder(), "bytes_sha256": stored, "pixels_sha256": pixels}
        meta["train_fingerprint"] = content_fingerprint(train.images, train.hw, train.labels)
        del train
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _remove(folder)
        os.replace(tmp, folder)
    except OSError as e:
        raise _store_write_failed(root, folder, splits, store_size, e, record["jpeg_quality"] is not None) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if skipped := [f for name in splits for f in meta[f"{name}_skipped"]]:
        progress.note(f"left out {len(skipped)} bad image(s), listed in {folder / 'meta.json'}; first: {skipped[0]}")
    return meta


def _remove(path: Path) -> None:
    """Whatever stands at `path` goes: a damaged store, a file, a link (never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _store_write_failed(
    root: Path, folder: Path, splits: dict[str, Split], store_size: int, e: OSError, jpeg: bool = False
) -> KDCacheError:
    where = folder.parent
    if reason := no_room(e):
        need = sum(len(split.files) for split in splits.values()) * 3 * store_size**2
        need //= 8 if jpeg else 1  # a jpeg store: about an eighth of the raw bytes
        return KDCacheError(
            f"the disk filled up while preparing the store of {root} ({reason}); nothing was kept: free about "
            f"{need / 1e6:,.0f} MB in {where}, or point KDCACHE_STORE_DIR at a larger disk, and run again"
        )
    return KDCacheError(
        f"cannot write the store of {root} in {where} ({e.strerror or e}): make it writable, "
        "or point KDCACHE_STORE_DIR at a writable folder"
    )


def _bytes_map(path: Path) -> np.ndarray:
    """A file's bytes, memory-mapped (an empty file is an empty array: mmap refuses length 0)."""
    return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)


def _open(folder: Path, meta: dict) -> tuple[Store, Store]:
    """Both splits, memory-mapped, each array checked against meta.json: a short or replaced file is damage."""
    size = meta["store_size"]
    jpeg = meta.get("store_format", "raw") == "jpeg"

    def load(name: str, mmap_mode: str | None = None) -> np.ndarray:
        try:
            return np.load(folder / name, mmap_mode=mmap_mode)  # no pickles: allow_pickle stays False
        except (OSError, ValueError, EOFError) as e:
            raise _damaged(folder, f"{name} is short or not an array: {str(e).splitlines()[0][:60]}") from None

    def one(name: str) -> Store:
        n = meta[f"{name}_num_images"]
        labels, hw = load(f"{name}_labels.npy"), load(f"{name}_hw.npy")
        if jpeg:
            offsets = load(f"{name}_offsets.npy")
            try:
                data = _bytes_map(folder / f"{name}_jpeg.bin")
            except OSError as e:
                raise _damaged(folder, f"{name}_jpeg.bin cannot be read: {e.strerror or e}") from None
            ok = offsets.shape == (n + 1,) and offsets.dtype == np.int64 and offsets[0] == 0
            if not ok or (np.diff(offsets) <= 0).any() or offsets[-1] != len(data):
                raise _damaged(folder, f"its {name}_jpeg.bin does not match its offsets (short, or replaced)")
            images = JpegImages(folder, name, data, offsets, hw, size)
            shapes = True
        else:
            images = load(f"{name}_images.npy", mmap_mode="r")
            shapes = images.shape[1:] == (3, size, size) and len(images) >= n and images.dtype == np.uint8
        shapes = shapes and labels.shape == (n,) and hw.shape == (n, 2)
        if not shapes or (labels.dtype, hw.dtype) != (np.int64, np.int16):
            raise _damaged(folder, f"its {name} arrays do not match meta.json")
        return Store(images[:n], hw, labels, meta)

    train = one("train")
    if jpeg and "decode_check" in meta:  # (absent only while the store is being built)
        check = meta["decode_check"]
        stored, pixels = train.images.sample_digests()
        if stored != check["bytes_sha256"]:
            raise _damaged(folder, "the JPEG bytes of its decoder check's sample images changed since it was prepared")
        if pixels != check["pixels_sha256"]:
            raise KDCacheError(
                f"the image store {folder} was prepared with a JPEG decoder that gives other pixels than this one "
                f"({check['decoder']} there, {jpeg_decoder()} here), so views rendered here would not be the ones "
                "its caches recorded: run again with --rebuild-store to prepare it with this decoder, then dump the "
                "cache again"
            )
    return train, one("val")


def write_image_folder(
    root: str | Path,
    classes: int = 3,
    per_class: int = 8,
    val_per_class: int = 3,
    seed: int = 0,
    with_val: bool = True,
    sizes: tuple[int, int] = (24, 90),
) -> Path:
    """Write a small generated image folder in the real layout (tests, benchmarks): JPEG and PNG files of
    several sizes (each side drawn from `sizes`), some greyscale, one palette image; each class has its
    own colour and stripe pattern."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", per_class), ("val", val_per_class if with_val else 0)):
        for c in range(classes if count else 0):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(*sizes)), int(rng.integers(*sizes))
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.array([40 + 70 * (c % 3), 40 + 50 * ((c // 3) % 3), 200 - 60 * (c % 2)], np.float32)
                img = base + 50 * np.sin((xx * (c + 1) + yy) / 5.0)[..., None] + rng.normal(0, 20, (h, w, 3))
                im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                kind = i % 4
                if kind == 1:
                    im.convert("L").save(d / f"img{i}.png")
                elif kind == 2:
                    im.convert("P").save(d / f"img{i}.png")
                else:
                    im.save(d / f"img{i}.jpg", quality=90)
    return root
