"""The HDF5 logit cache, format v2 (see docs/cache-format.md); v1 files read as unmixed views.

The writer builds the file under `<out>.partial`, records how many rows are done
after each flushed block (so an interrupted dump resumes from there), and renames
to `<out>` only once every row is written and `complete` is true. The reader
refuses anything it cannot trust, with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from kdcache import __version__
from kdcache.artifacts import fresh_file, refuse_different, require_file
from kdcache.config import DEFAULT_BLOCK_ROWS
from kdcache.errors import KDCacheError
from kdcache.views import GEOMETRIES, MIXES, CropFlip, Geometry, Mix, ResizedCrop, Views

if TYPE_CHECKING:
    from kdcache.topk import TopK

FORMAT = "kdcache-logits"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MIX_DATASETS = ("mix_partner", "mix_crop", "mix_box", "mix_lam")  # v2, present when attrs mix != "none"
TOPK_DATASETS = ("topk_values", "topk_indices", "topk_lse")  # instead of "logits" when attrs topk > 0
VIEW_RECIPE = CropFlip.recipe  # what a file without a view_recipe attribute holds (the only recipe of v1)
_FIELDS = {CropFlip.recipe: (CropFlip.fields, "uint8"), ResizedCrop.recipe: (ResizedCrop.fields, "int16")}
BLOCK_ROWS = DEFAULT_BLOCK_ROWS  # default HDF5 chunk, checksum and resume granularity along N


@dataclass(frozen=True)
class Attr:
    """One root attribute of a cache file (docs/cache-format.md says what each means)."""

    kind: type  # the value's type (a JSON attribute's once parsed)
    identity: bool = False  # names the dump: a resumed partial, a shard and a pipeline's kept cache must agree on it
    required: int | None = 1  # every file of this format version on has it (None: optional)
    absent: object = None  # as stored: what a file without it means (one written before it existed)
    json: bool = False  # stored as JSON text


# The one table of a cache's attributes: the writer checks what a dump gives against it, the reader what a
# file holds, and resume, shards and the pipeline compare its identity attributes.
ATTRS = {
    # the file
    "format": Attr(str),
    "format_version": Attr(int),
    "complete": Attr(bool, required=None),
    "rows_done": Attr(int, required=None),
    "created_utc": Attr(str),
    "kdcache_version": Attr(str),
    # the data
    "dataset": Attr(str, identity=True),
    "dataset_fingerprint": Attr(str, identity=True),
    "data_options": Attr(dict, identity=True, required=None, absent="{}", json=True),
    "subset": Attr(int),
    "num_classes": Attr(int, identity=True),
    "classes": Attr(list, required=None, json=True),
    # the teacher
    "teacher_arch": Attr(str),
    "teacher_sha256": Attr(str, identity=True),
    "teacher_path": Attr(str, required=None),
    "ensemble_members": Attr(list, required=None, json=True),
    "normalize_mean": Attr(list),
    "normalize_std": Attr(list),
    "recipe": Attr(dict, required=None, json=True),  # the teacher's, with the dump's view settings
    # the views
    "num_views": Attr(int, identity=True),
    "seed": Attr(int, identity=True),
    "augment": Attr(bool, identity=True),
    "view_recipe": Attr(str, identity=True, required=None, absent=VIEW_RECIPE),
    "image_size": Attr(int, required=None),  # random-resized crops only, with rrc_scale and rrc_ratio
    "rrc_scale": Attr(list, required=None),
    "rrc_ratio": Attr(list, required=None),
    "mix": Attr(str, identity=True, required=2, absent="none"),
    "mix_prob": Attr(float, identity=True, required=2, absent=1.0),
    # the targets and how they were computed
    "tta": Attr(str, identity=True, required=None, absent="none"),
    "topk": Attr(int, identity=True, required=None, absent=0),
    "lse_temperatures": Attr(list, identity=True, required=None, absent=[]),
    "precision": Attr(str, identity=True, required=None),
    "batch_size": Attr(int, identity=True, required=None),
    "block_rows": Attr(int, identity=True),
    # written as the dump finishes
    "teacher_test_acc": Attr(float, required=None),
    "teacher_view_acc": Attr(float, required=None),
    "dump_time_s": Attr(float, required=None),
}
MEMBER_KEYS = ("path", "sha256", "arch")  # strings every ensemble member names


def required_attrs(version: int) -> tuple[str, ...]:
    """The attributes every file of format `version` has."""
    return tuple(k for k, a in ATTRS.items() if a.required is not None and a.required <= version)


def attr(attrs, name: str):
    """Attribute `name` as stored (plain Python), or what its absence means in an older file."""
    return _plain(attrs.get(name, ATTRS[name].absent))


def identity(attrs) -> dict:
    """The attributes that name a dump, absent ones as an older file means them: two dumps with the same
    identity write the same file."""
    return {k: attr(attrs, k) for k, a in ATTRS.items() if a.identity}


def encode(attrs: dict) -> dict:
    """A dump's attributes as a file stores them: JSON attributes as text. An attribute the table does not
    name is a bug in kdcache, not a user's mistake."""
    unknown = [k for k in attrs if k not in ATTRS]
    if unknown:
        raise ValueError(f"cache attributes {unknown} are not in cache.ATTRS: add them there (and to the docs)")
    return {k: json.dumps(v) if ATTRS[k].json and not isinstance(v, str) else v for k, v in attrs.items()}


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}")


def shard_paths(out: str | Path) -> list[Path]:
    """Every shard an interrupted torchrun dump of `out` left, whatever its process count."""
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}.shard-*-of-*"))


def shard_blocks(path: Path, attrs: dict) -> set[int]:
    """The blocks a shard holds, after checking it was made by the same dump (identity attributes)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KDCacheError(
            f"{path} cannot be read ({str(e).splitlines()[0][:80]}): rerun with --force to start over"
        ) from None
    with f:
        _same_dump(path, f.attrs, attrs)
        return {int(b) for b in np.flatnonzero(f["blocks_done"][...])}


def _same_dump(path: Path, started, attrs: dict) -> None:
    """A partial or a shard belongs to this dump only if it was started with the same identity attributes."""

    refuse_different(path, identity(started), identity(encode(attrs)), asked="this dump has")


def merge_shards(writer: CacheWriter, shards: dict[int, Path], num_rows: int, block_rows: int) -> None:
    """Copy every block, in order, from the shard holding it into `writer` (a fresh partial):
    the same writes as a one-process dump, so the same bytes whatever the process count."""
    names = [n for n in ("logits", *TOPK_DATASETS) if n in writer.ds]
    mix_names = [n for n in MIX_DATASETS if n in writer.ds]
    open_files: dict[Path, h5py.File] = {}
    try:
        for b, start in enumerate(range(0, num_rows, block_rows)):
            path = shards[b]
            f = open_files.get(path) or open_files.setdefault(path, h5py.File(path, "r"))
            stop = min(start + block_rows, num_rows)
            targets = {n: f[n][start:stop] for n in names}
            writer.write_rows(
                start,
                targets if "logits" not in targets else targets["logits"],
                f["view_params"][start:stop],
                f["labels"][start:stop],
                f["indices"][start:stop],
                {n: f[n][start:stop] for n in mix_names} or None,
            )
    finally:
        for f in open_files.values():
            f.close()


def bytes_needed(
    n: int,
    k: int,
    c: int,
    n_test: int,
    mixed: bool = False,
    view_bytes: int = 3,
    topk: int | None = None,
    grid: int = 0,
) -> int:
    from kdcache.topk import bytes_per_view

    per_view = bytes_per_view(c, topk, grid) + view_bytes + (8 + view_bytes + 4 + 4 if mixed else 0)
    return n * k * per_view + n * 16 + n_test * 2 * c


def content_digest(cache: Cache) -> str:
    """sha256 over the per-block checksums: names the cache's logits and views in 64 hex digits."""
    return hashlib.sha256(cache.file["block_sha256"][...].tobytes()).hexdigest()


def mix_arrays(mix: Mix) -> dict[str, np.ndarray]:
    """A `Mix` [rows, K] as the cache's mix datasets (numpy, their on-disk dtypes)."""
    return {
        "mix_partner": mix.partner.numpy().astype(np.int32),
        "mix_crop": mix.crop.numpy(),
        "mix_box": mix.box.numpy(),
        "mix_lam": mix.lam.numpy(),
    }


def target_names(attrs) -> tuple[str, ...]:
    """The datasets that hold a cache's teacher targets: dense logits, or the top-k record."""
    return TOPK_DATASETS if int(attr(attrs, "topk") or 0) > 0 else ("logits",)


def block_digest(targets: np.ndarray | dict, params: np.ndarray, mix: dict | None = None) -> bytes:
    """sha256 of one block's targets (dense fp16 logits, or the top-k datasets in order) + view params
    (+ mix record): `verify` finds rows changed after the dump."""
    if isinstance(targets, dict):
        h = hashlib.sha256()
        for name in TOPK_DATASETS:
            h.update(np.ascontiguousarray(targets[name]).tobytes())
    else:
        h = hashlib.sha256(np.ascontiguousarray(targets, dtype=np.float16).tobytes())
    h.update(np.ascontiguousarray(params).tobytes())  # uint8 crops, int16 boxes: as stored
    for name in MIX_DATASETS if mix is not None else ():
        h.update(np.ascontiguousarray(mix[name]).tobytes())
    return h.digest()


class CacheWriter:
    """Writes rows [start, stop) of logits and view params into `<out>.partial`, then publishes `<out>`."""

    def __init__(
        self,
        out: str | Path,
        *,
        attrs: dict,
        num_rows: int,
        num_test: int,
        resume: bool,
        store_hw: np.ndarray | None = None,
        shard: Path | None = None,
    ):
        """`shard`: write this file instead of `<out>.partial`: one process's share of a torchrun dump,
        with a `blocks_done` record (it is merged into `out` by `merge_shards`, never published)."""
        self.out, self.tmp = Path(out), Path(shard) if shard is not None else partial_path(out)
        attrs = encode(attrs)
        self.sharded = shard is not None
        self._discarded, self._fd = False, None
        if resume:
            self.file = self._reopen(attrs)
            self._remember_fd()
        else:
            self.file = h5py.File(fresh_file(self.tmp), "w")  # made exclusively: never through a planted link
            self._remember_fd()
            try:
                self._create(attrs, num_rows, num_test, store_hw)
            except BaseException:
                self.discard()  # a half-created file is neither usable nor resumable
                raise
        self._hold_handles()

    def _remember_fd(self) -> None:
        """The descriptor HDF5 writes through, and the file it is (for `discard`)."""
        fd = self.file.id.get_vfd_handle()
        st = os.fstat(fd)
        self._fd = (fd, st.st_dev, st.st_ino)

    def _hold_handles(self) -> None:
        """One open handle per dataset, and on the attributes, for the whole dump.

        A temporary h5py handle writes its cached chunks when it is garbage-collected;
        a write failing there (disk full) is only printed, and leaves HDF5 in a state
        that crashes the process at exit. With held handles the writes happen in
        `flush`, which raises, and the dump can clean up.
        """
        f = self.file
        names = (
            "logits",
            *TOPK_DATASETS,
            "view_params",
            "labels",
            "indices",
            "block_sha256",
            "test_logits",
            "blocks_done",
            *MIX_DATASETS,
        )
        self.ds = {name: f[name] for name in names if name in f}
        self.attrs = f.attrs

    def _create(self, attrs: dict, num_rows: int, num_test: int, store_hw: np.ndarray | None) -> None:
        own = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "view_recipe": VIEW_RECIPE,  # the dump's attrs name another recipe where it has one
            "complete": False,
            "rows_done": 0,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "kdcache_version": __version__,
        }
        missing = [k for k in required_attrs(FORMAT_VERSION) if k not in {**own, **attrs}]
        if missing:
            raise ValueError(f"a dump must give the cache attributes {missing} (cache.ATTRS)")
        k, c, block = attrs["num_views"], attrs["num_classes"], attrs["block_rows"]
        fields, dtype = _FIELDS[attr(attrs, "view_recipe")]
        f = self.file
        rows = min(block, num_rows)
        if topk := int(attr(attrs, "topk") or 0):
            from kdcache.topk import index_dtype

            grid = len(attrs["lse_temperatures"])
            for name, dt, tail in zip(
                TOPK_DATASETS, ("float16", index_dtype(c), "float32"), (topk, topk, grid), strict=False
            ):
                f.create_dataset(name, (num_rows, k, tail), dtype=dt, chunks=(rows, k, tail))
        else:
            f.create_dataset("logits", (num_rows, k, c), dtype="float16", chunks=(rows, k, c))
        f.create_dataset("view_params", (num_rows, k, fields), dtype=dtype, chunks=(rows, k, fields))
        if store_hw is not None:  # random-resized crops: each stored image's (h, w), so views can be checked
            f.create_dataset("store_hw", data=np.asarray(store_hw, dtype=np.int16))
        if attrs["mix"] != "none":
            for name, dt, tail in zip(
                MIX_DATASETS, ("int32", dtype, "uint8", "float32"), ((), (fields,), (4,), ()), strict=False
            ):
                f.create_dataset(name, (num_rows, k, *tail), dtype=dt, chunks=(rows, k, *tail))
        f.create_dataset("labels", (num_rows,), dtype="int64")
        f.create_dataset("indices", (num_rows,), dtype="int64")
        f.create_dataset("block_sha256", (-(-num_rows // block), 32), dtype="uint8")
        if self.sharded:
            f.create_dataset("blocks_done", (-(-num_rows // block),), dtype="uint8")
        if num_test:
            f.create_dataset("test_logits", (num_test, c), dtype="float16")
        f.attrs.update({**own, **attrs})
        f.flush()

    def _reopen(self, attrs: dict) -> h5py.File:
        if not os.path.lexists(self.tmp):
            raise KDCacheError(f"no interrupted dump at {self.tmp} to resume: run again without --resume")
        try:
            f = h5py.File(require_file(self.tmp, "an interrupted dump"), "r+")
        except OSError as e:
            raise KDCacheError(
                f"{self.tmp} cannot be resumed ({str(e).splitlines()[0][:80]}): rerun with --force to start over"
            ) from None
        try:
            _same_dump(self.tmp, f.attrs, attrs)
        except KDCacheError:
            f.close()
            raise
        return f

    @property
    def rows_done(self) -> int:
        return int(self.attrs["rows_done"])

    def write_rows(
        self, start: int, logits: np.ndarray | dict, params: np.ndarray, labels, indices, mix: dict | None = None
    ) -> None:
        """Write one block, flush it, and only then record it as done (the resume point).
        `logits`: dense fp16 [b, K, C], or the top-k datasets by name."""
        stop = start + len(params)
        ds = self.ds
        for name, value in logits.items() if isinstance(logits, dict) else [("logits", logits)]:
            ds[name][start:stop] = value
        ds["view_params"][start:stop] = params
        for name in MIX_DATASETS if mix is not None else ():
            ds[name][start:stop] = mix[name]
        ds["labels"][start:stop] = labels
        ds["indices"][start:stop] = indices
        digest = np.frombuffer(block_digest(logits, params, mix), np.uint8)
        ds["block_sha256"][start // int(self.attrs["block_rows"])] = digest
        self.file.flush()
        if self.sharded:  # blocks land in any order: each is marked done, after its data is flushed
            self.ds["blocks_done"][start // int(self.attrs["block_rows"])] = 1
        else:
            self.attrs["rows_done"] = stop
        self.file.flush()

    def finish(self, test_logits: np.ndarray | None, extra_attrs: dict) -> Path:
        f = self.file
        if test_logits is not None:
            self.ds["test_logits"][...] = test_logits
        self.attrs.update(encode(extra_attrs))
        self.attrs["complete"] = True
        f.flush()  # a failure to write shows here, while the file can still be discarded
        f.close()
        os.replace(self.tmp, self.out)
        return self.out

    def close(self) -> None:
        if not self._discarded and self.file.id.valid:
            self.file.close()

    def discard(self) -> None:
        """Give up a partial file that can no longer be written (disk full) and remove it.

        HDF5 retries its failed writes when the file is closed, fails again, and then
        crashes the process at exit (HDF5 2.0). So first point the file's descriptor
        at /dev/null, where the retries succeed, close, and delete the file.
        """
        self._discarded = True
        try:
            fd, dev, ino = self._fd
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (dev, ino):  # still our file, not a reused descriptor
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, fd)
                os.close(null)
        except (OSError, TypeError):
            pass
        try:
            if self.file.id.valid:
                self.file.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self.tmp.unlink(missing_ok=True)


def _plain(v):
    """h5py attribute values as plain Python, for comparisons and JSON."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _cat_topk(parts):
    from kdcache.topk import TopK

    first = parts[0]
    return TopK(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("values", "indices", "lse")),
        first.temperatures,
        first.num_classes,
    )


def check_finite(path: str | Path, logits: torch.Tensor, fix: str) -> None:
    """Refuse NaN/inf logits [N, K, C] (or [N, C]) with the first rows and views named.

    One reduction and one host sync on the logits' device: done once per load, not per step.
    """
    bad = ~torch.isfinite(logits)
    if not bool(bad.any()):
        return
    per_view = bad.flatten(2).any(-1) if logits.dim() == 3 else bad.any(-1, keepdim=True)  # [N, K]
    where = per_view.nonzero()[:3].tolist()
    rows = int(per_view.any(1).sum())
    first = ", ".join(f"row {r} view {v}" for r, v in where)
    raise KDCacheError(f"{path} holds non-finite logits (NaN or inf) in {rows} row(s), first at {first}: {fix}")


class Cache:
    """A validated, open cache. Attributes are plain Python in `attrs`."""

    def __init__(self, path: Path, file: h5py.File):
        self.path, self.file = path, file
        self.attrs = {k: _plain(v) for k, v in file.attrs.items()}

    @property
    def num_rows(self) -> int:
        return self.file["labels"].shape[0]

    @property
    def topk(self) -> int:
        """k of a top-k cache, 0 for dense logits."""
        return int(attr(self.attrs, "topk") or 0)

    def targets(self, rows: slice | np.ndarray = slice(None)):
        """The teacher targets of `rows` (all K views): dense fp16 logits, or a `TopK` (host memory)."""
        f = self.file
        if not self.topk:
            return torch.from_numpy(f["logits"][rows])
        from kdcache.topk import TopK

        values, idx, lse = (f[name][rows] for name in TOPK_DATASETS)
        return TopK(
            torch.from_numpy(values),
            torch.from_numpy(idx.astype(np.int64)),
            torch.from_numpy(lse),
            tuple(float(t) for t in self.attrs["lse_temperatures"]),
            int(self.attrs["num_classes"]),
        )

    @property
    def mix(self) -> str:
        return attr(self.attrs, "mix")  # v1: crop/flip views only

    def geometry(self) -> Geometry:
        """What the cached view parameters mean (rebuilt from the file alone)."""
        a = self.attrs
        if attr(a, "view_recipe") == CropFlip.recipe:
            return CropFlip()
        hw = torch.from_numpy(self.file["store_hw"][...].astype(np.int64))
        return ResizedCrop(hw, int(a["image_size"]), a["rrc_scale"], a["rrc_ratio"])

    @property
    def target_bytes(self) -> int:
        """Bytes of the teacher targets (all N x K views): what a student would hold in memory."""
        return sum(self.file[name].size * self.file[name].dtype.itemsize for name in target_names(self.attrs))

    def check_targets(self, targets, fix: str) -> None:
        """Refuse non-finite logits (or top-k values and log-sum-exps) and top-k classes out of range."""
        c = int(self.attrs["num_classes"])
        if self.topk:
            check_finite(self.path, torch.cat([targets.values.float(), targets.lse], -1), fix)
            if bool(((targets.indices < 0) | (targets.indices >= c)).any()):
                raise KDCacheError(f"{self.path} holds top-k class indices outside 0..{c - 1}: {fix}")
        else:
            check_finite(self.path, targets, fix)

    def epoch_targets(self, views: np.ndarray):
        """targets[i, views[i]] for every row i, read in contiguous blocks of `block_rows` rows (the HDF5
        chunks: h5py is slow at scattered reads) and checked block by block. For caches larger than memory."""
        n, block = self.num_rows, int(self.attrs["block_rows"])
        parts = []
        for start in range(0, n, block):
            stop = min(start + block, n)
            t = self.targets(slice(start, stop))
            self.check_targets(t, f"see `kdcache verify {self.path}`, then dump the cache again")
            parts.append(t[torch.arange(stop - start), torch.from_numpy(views[start:stop])])
        return _cat_topk(parts) if self.topk else torch.cat(parts)

    def tensors(self, targets: bool = True) -> tuple[torch.Tensor | TopK | None, Views, torch.Tensor]:
        """(targets: logits fp16 [N,K,C] or a `TopK` [N,K] (None when not `targets`), the `Views` [N,K]
        (view_params, the mix record when mixed, the geometry), labels int64 [N]) in host memory, checked:
        finite targets, view parameters, partners, classes and labels in range (a hand-edited cache is
        refused here). The student moves one epoch's slice to the device at a time."""
        f = self.file
        logits = self.targets() if targets else None  # targets=False: the caller streams them per epoch
        params, labels = (torch.from_numpy(f[name][...]) for name in ("view_params", "labels"))
        mix = None
        if self.mix != "none":
            partner, crop, box, lam = (torch.from_numpy(f[name][...]) for name in MIX_DATASETS)
            mix = Mix(partner.long(), crop, box, lam)
        fix = f"see `kdcache verify {self.path}`, then dump the cache again"
        c = int(self.attrs["num_classes"])
        if logits is not None:
            self.check_targets(logits, fix)
        n = len(labels)
        geometry = self.geometry()
        own = torch.arange(n).view(-1, 1).expand(params.shape[:2])
        bad = ~geometry.valid(params, own).all()
        if mix is not None:  # a partner's crop is checked where there is a partner
            bad |= ~(geometry.valid(mix.crop, mix.partner) | (mix.partner < 0)).all()
        if bool(bad):
            raise KDCacheError(f"{self.path} holds view parameters outside the view recipe's range: {fix}")
        if mix is not None:
            box = mix.box.int()
            h, w = geometry.size  # boxes are in output pixels
            bad = ((mix.partner < -1) | (mix.partner >= n)).any() | ~((mix.lam >= 0) & (mix.lam <= 1)).all()
            bad |= ((box[..., 0] + box[..., 2] > h) | (box[..., 1] + box[..., 3] > w)).any()
            if bool(bad):
                raise KDCacheError(f"{self.path} holds mix partners, weights or boxes out of range: {fix}")
        if bool(((labels < 0) | (labels >= c)).any()):
            raise KDCacheError(f"{self.path} holds labels outside 0..{c - 1}: {fix}")
        return logits, Views(geometry, params, mix), labels

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | Path, *, require_complete: bool = True) -> Cache:
    """Open and validate a cache; every failure is a one-line KDCacheError saying what to do."""
    path = Path(path)
    if not path.exists():
        hint = (
            f" (an interrupted dump is at {partial_path(path)}: finish it with dump-logits --resume)"
            if partial_path(path).exists()
            else ""
        )
        raise KDCacheError(f"cache {path} does not exist{hint}: create it with `kdcache dump-logits`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KDCacheError(
            f"{path} is not a readable HDF5 file ({str(e).splitlines()[0][:80]}): it may be truncated; "
            "recreate it with `kdcache dump-logits`"
        ) from None
    attrs = f.attrs
    problem = None
    if _plain(attrs.get("format")) != FORMAT:
        problem = (
            f"{path} is not a kdcache logit cache (format {_plain(attrs.get('format'))!r}): "
            "pass a file written by dump-logits"
        )
    elif _plain(attrs.get("format_version")) not in READABLE_VERSIONS:
        problem = (
            f"{path} is cache format v{_plain(attrs.get('format_version'))}, this kdcache reads v1 and v2: "
            "recreate it with this version's dump-logits"
        )
    elif attr(attrs, "view_recipe") not in GEOMETRIES:
        problem = (
            f"{path} uses view recipe {attr(attrs, 'view_recipe')!r}, this kdcache knows {' and '.join(GEOMETRIES)}"
        )
    elif require_complete and not _plain(attrs.get("complete")):
        problem = f"{path} is incomplete (an interrupted dump): finish it with `kdcache dump-logits --resume`"
    elif not all(name in f for name in (*target_names(attrs), "view_params", "labels", "indices")):
        problem = f"{path} lacks datasets of format v1: recreate it with `kdcache dump-logits`"
    elif missing := [key for key in required_attrs(_plain(attrs["format_version"])) if key not in attrs]:
        problem = (
            f"{path} lacks the attribute {missing[0]!r}: it was edited or damaged; "
            "recreate it with `kdcache dump-logits`"
        )
    elif damage := _layout_problem(f) or _json_problem(attrs):
        problem = f"{path} {damage}: it was edited or damaged; recreate it with `kdcache dump-logits`"
    if problem:
        f.close()
        raise KDCacheError(problem)
    return Cache(path, f)


def _json_problem(attrs) -> str | None:
    """Which JSON attribute does not parse to what dump-logits writes, if any: readers then need no checks."""
    for key, kind in ((k, a.kind) for k, a in ATTRS.items() if a.json):
        if key not in attrs:
            continue
        try:
            value = json.loads(_plain(attrs[key]))
        except (TypeError, ValueError):
            value = None
        ok = isinstance(value, kind)
        if ok and key == "ensemble_members":
            ok = all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in MEMBER_KEYS) for m in value)
        if not ok:
            return (
                f"has an attribute {key} that is not the JSON {'object' if kind is dict else 'list'} dump-logits writes"
            )
    return None


def _layout_problem(f: h5py.File) -> str | None:
    """What is inconsistent between the datasets' shapes and the attributes, if anything."""
    try:
        n, k, c = (int(_plain(f.attrs[a])) for a in ("subset", "num_views", "num_classes"))
    except (TypeError, ValueError):
        return "has subset, num_views or num_classes attributes that are not whole numbers"
    recipe = attr(f.attrs, "view_recipe")
    fields = _FIELDS[recipe][0]
    if topk := int(attr(f.attrs, "topk") or 0):  # the targets first: the likeliest to be edited
        grid = len(attr(f.attrs, "lse_temperatures"))
        if not 1 <= topk <= c or grid < 1:
            return f"has topk={topk} (classes {c}) or no lse_temperatures"
        expect = {"topk_values": (n, k, topk), "topk_indices": (n, k, topk), "topk_lse": (n, k, grid)}
    else:
        expect = {"logits": (n, k, c)}
    expect.update(view_params=(n, k, fields), labels=(n,), indices=(n,))
    if recipe == ResizedCrop.recipe:
        if "store_hw" not in f or any(a not in f.attrs for a in ("image_size", "rrc_scale", "rrc_ratio")):
            return "lacks the store sizes or crop attributes its random-resized-crop views need"
        expect["store_hw"] = (n, 2)
    mix, prob = attr(f.attrs, "mix"), attr(f.attrs, "mix_prob")
    if mix not in MIXES or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        return f"has mix={mix!r}, mix_prob={prob!r}, outside {'|'.join(MIXES)} and [0, 1]"
    if mix != "none":
        expect.update(mix_partner=(n, k), mix_crop=(n, k, fields), mix_box=(n, k, 4), mix_lam=(n, k))
        if any(name not in f for name in MIX_DATASETS):
            return f"lacks its mix record (attribute mix={_plain(f.attrs['mix'])!r})"
    if "test_logits" in f:
        expect["test_logits"] = (f["test_logits"].shape[0], c)
    for name, shape in expect.items():
        if f[name].shape != shape:
            return f"has {name} of shape {f[name].shape}, its attributes say {shape}"
    return None


def check_matches(cache: Cache, fingerprint: str, num_classes: int, classes: list[str] | None = None) -> None:
    """Refuse a cache made from other data (fingerprint covers --subset too) or class count."""
    a = cache.attrs
    if int(a["num_classes"]) != num_classes:
        raise KDCacheError(
            f"{cache.path} has {a['num_classes']} classes, the data has {num_classes}: use a cache of this dataset"
        )
    if "classes" in a and classes is not None and json.loads(a["classes"]) != list(classes):
        raise KDCacheError(
            f"{cache.path} names other classes than the data (e.g. class order): use a cache of this dataset"
        )
    if a["dataset_fingerprint"] != fingerprint:
        raise KDCacheError(
            f"{cache.path} was made from other training images (fingerprint {a['dataset_fingerprint'][:12]}, "
            f"these are {fingerprint[:12]}): use the same --data-dir and --subset "
            f"({cache.num_rows} rows) as the dump, or dump again"
        )
