"""Teacher inference over N x K deterministic views, streamed into the cache writer."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import cache as cache_io
from kdcache.artifacts import claim_output, no_room
from kdcache.checkpoints import check_classes
from kdcache.config import DumpSettings
from kdcache.data import load_dataset, recorded_options
from kdcache.errors import KDCacheError
from kdcache.imports import load_teachers
from kdcache.inference import TTAModel, accuracy, predict
from kdcache.runtime import NoProgress, Progress, Runtime
from kdcache.topk import DEFAULT_TEMPERATURES, from_dense
from kdcache.views import Geometry, draw_views


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{max(nbytes / 1e3, 1):.0f} kB"


def _refuse_nonfinite(logits: torch.Tensor, start: int, teacher_path, writer, what: str = "row") -> None:
    """A teacher answering NaN/inf stops the dump; the partial file goes (it would never be usable)."""
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    if bool(bad.any()):
        rows = (bad.nonzero().flatten()[:3] + start).tolist()
        writer.discard()
        raise KDCacheError(
            f"the teacher {teacher_path} gives non-finite logits (NaN or inf, or beyond fp16's range) for "
            f"{int(bad.sum())} {what}(s), first {', '.join(map(str, rows))}; the partial cache was removed: "
            "check the teacher with `kdcache eval`, or retrain it"
        )


def _topk_grid(topk: int | None, temperatures, num_classes: int, meta: dict) -> tuple[float, ...]:
    """The temperatures a top-k cache keeps the tail's mass at: the given grid, or the default one
    plus the teacher recipe's T. Checked: 1 <= k <= C (the rest: `DumpSettings`)."""
    if not topk:
        return ()
    if not 1 <= topk <= num_classes:
        raise KDCacheError(
            f"--topk (or a config file's [dump] topk) must be in 1..{num_classes}, the class count (got {topk})"
        )
    grid = tuple(temperatures) if temperatures else DEFAULT_TEMPERATURES
    if not temperatures and (t := float(meta.get("recipe", {}).get("T", 0) or 0)) > 0 and t not in grid:
        grid = (*grid, t)
    return tuple(sorted(set(float(t) for t in grid)))


def _sharded_blocks(out, attrs, shards, num_test, hw, job: _Job) -> None:
    """torchrun: the blocks no shard holds yet, dealt round-robin to the processes; each writes its
    own shard `OUT.shard-R-of-N`, flushing and marking every block (the resume unit). Shards of an
    earlier run with any process count are read first, before anyone writes, and their blocks kept."""
    rt, n, block_rows = job.rt, job.num_rows, job.settings.block_rows
    held = set().union(*(cache_io.shard_blocks(p, attrs) for p in shards)) if shards else set()
    _barrier(rt)  # everyone has read the old shards before any is written again
    left = [b for b in range(-(-n // block_rows)) if b not in held]
    if held:
        job.progress.note(
            f"{len(held)} block(s) kept from the interrupted dump's shards, {len(left)} to do "
            f"over {rt.world} process(es)"
        )
    todo = left[rt.rank :: rt.world]
    mine = cache_io.shard_path(out, rt.rank, rt.world)
    writer = cache_io.CacheWriter(
        out, attrs=attrs, num_rows=n, num_test=num_test, resume=mine.exists(), store_hw=hw, shard=mine
    )
    try:
        job.progress.begin(f"dump {n}x{job.views} views (this process's share)", len(todo))
        for b in todo:
            job.block(b * block_rows, min((b + 1) * block_rows, n), writer)
        job.progress.end()
    finally:
        writer.close()
    _barrier(rt)  # every shard is complete and closed


def _barrier(rt: Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as dist

        dist.barrier()


@dataclass
class _Job:
    """What each block of a dump needs: the teacher, the training images and the views to show it,
    and what is kept of its answers."""

    teacher: torch.nn.Module
    teacher_path: str
    images: object  # resident on the device, or a host store streamed per batch
    labels: torch.Tensor
    render: tuple  # (mean, std) the teacher's inputs are normalised with
    geometry: Geometry
    views: int
    seed: int
    augment: bool
    mix: str
    mix_prob: float
    settings: DumpSettings
    temperatures: tuple[float, ...]  # a top-k cache's grid, () for dense logits
    num_classes: int
    rt: Runtime
    progress: Progress

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def block(self, start: int, stop: int, writer: cache_io.CacheWriter) -> None:
        """Views, teacher, targets of rows [start, stop): one written block."""
        rt, k, c = self.rt, self.views, self.num_classes
        drawn = draw_views(
            self.geometry,
            self.seed,
            range(start, stop),
            range(k),
            augment=self.augment,
            mix=self.mix,
            prob=self.mix_prob,
            num_rows=self.num_rows,
        )  # [b, K]
        rows = torch.arange(start, stop, device=rt.device).repeat_interleave(k)
        logits = predict(  # one copy to the device per block, not per batch
            self.teacher,
            self.images,
            *self.render,
            rt,
            rows=rows,
            views=drawn.flatten().to(rt.device),
            batch_size=self.settings.batch_size,
        ).view(stop - start, k, c)
        _refuse_nonfinite(logits.to(torch.float16), start, self.teacher_path, writer)  # fp16: > 65504 is inf too
        if self.settings.topk:  # the k largest, their classes, and the tail's log-sum-exp on the grid
            values, classes, lse = from_dense(logits, self.settings.topk, self.temperatures)
            targets = {
                "topk_values": values.cpu().numpy(),
                "topk_lse": lse.cpu().numpy(),
                "topk_indices": classes.cpu().numpy().astype(writer.ds["topk_indices"].dtype),
            }
        else:
            targets = logits.to(torch.float16).cpu().numpy()
        writer.write_rows(
            start,
            targets,
            drawn.crop.numpy(),
            self.labels[start:stop].numpy(),
            np.arange(start, stop, dtype=np.int64),
            None if drawn.mix is None else cache_io.mix_arrays(drawn.mix),
        )
        self.progress.advance()

    def view_accuracy(self, file) -> float:
        """How often the teacher's class for a cached view is the label that dominates the view (the
        partner's where it holds more than half the image). Top-k lists are sorted: the first is the argmax."""
        if self.settings.topk:
            predicted = torch.from_numpy(file["topk_indices"][:, :, 0].astype(np.int64))
        else:
            predicted = torch.from_numpy(file["logits"][...]).float().argmax(-1)
        target = self.labels[:, None].expand(-1, self.views)
        if self.mix != "none":
            part = torch.from_numpy(file["mix_partner"][...]).long()
            lam = torch.from_numpy(file["mix_lam"][...])
            target = torch.where(lam < 0.5, self.labels[part.clamp(min=0)], target)
        return (predicted == target).float().mean().item()


def _attrs(data, meta: dict, who: dict, job: _Job, precision: str) -> dict:
    """The cache's attributes (`cache.ATTRS` says what each is): the data, the teacher, the views and the
    dump's own settings; the teacher's recipe with this dump's view settings, which students start from."""
    settings, geometry, n = job.settings, job.geometry, job.num_rows
    return {
        "num_views": job.views,
        "num_classes": job.num_classes,
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint,
        "subset": n,
        **who,
        "seed": job.seed,
        "augment": job.augment,
        "mix": job.mix,
        "mix_prob": job.mix_prob,
        "normalize_mean": list(meta["normalize_mean"]),
        "normalize_std": list(meta["normalize_std"]),
        "batch_size": settings.batch_size,
        "block_rows": settings.block_rows,
        "precision": precision,
        "tta": settings.tta,
        "view_recipe": geometry.recipe,
        **geometry.attrs(),
        "data_options": data.options,
        **({"topk": settings.topk, "lse_temperatures": list(job.temperatures)} if settings.topk else {}),
        "classes": data.classes,
        "recipe": {
            **meta.get("recipe", {}),
            "views": job.views,
            "augment": job.augment,
            "seed": job.seed,
            "subset": n,
            "mix": job.mix,
            "mix_prob": job.mix_prob,
        },
    }


def _check_room(out: Path, job: _Job, num_test: int) -> int:
    """The bytes the cache needs; refused when its folder has less than that, with 10% to spare."""
    geometry = job.geometry
    need = cache_io.bytes_needed(
        job.num_rows,
        job.views,
        job.num_classes,
        num_test,
        mixed=job.mix != "none",
        view_bytes=geometry.fields * geometry.dtype.itemsize,
        topk=job.settings.topk or None,
        grid=len(job.temperatures),
    )
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.1:
        raise KDCacheError(
            f"{out.parent} has {free / 1e6:.1f} MB free, the cache needs about {need / 1e6:.1f} MB: "
            "free space or choose another --out"
        )
    return need


def _earlier_shards(out: Path, rt: Runtime, resume: bool, force: bool) -> list[Path]:
    """The shards an interrupted torchrun dump left, to resume from; without --resume they go (--force),
    and so does a partial file."""
    shards = cache_io.shard_paths(out)
    if shards and not (resume or force):
        raise KDCacheError(
            f"an interrupted torchrun dump left {shards[0]}: pass --resume to continue it, or --force to start over"
        )
    if resume:
        return shards
    cache_io.partial_path(out).unlink(missing_ok=True)
    if rt.main:
        for path in shards:
            path.unlink(missing_ok=True)
    return []


def dump_logits(
    *,
    teacher_path: str | Path | list,
    data_dir: str | Path,
    out: str | Path,
    views: int,
    seed: int,
    batch_size: int,
    rt: Runtime,
    subset: int | None = None,
    augment: bool = True,
    mix: str = "none",
    mix_prob: float = 1.0,
    arch: str | None = None,
    trust_arch: bool = False,
    block_rows: int = cache_io.BLOCK_ROWS,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    rebuild_store: bool = False,
    topk: int | None = None,
    topk_temperatures=None,
    tta: str = "none",
) -> Path:
    """Write `out` (cache format v2): raw teacher logits for `views` views of every training image,
    each view a crop/flip, mixed with a partner (CutMix or MixUp) when `mix` is set: the teacher
    sees exactly the mixed image the student will see (function matching).

    `tta` "flip": each view's logits are the mean of the teacher's answers to the view and its mirror
    (a two-member ensemble, recorded in the cache as `tta`); default the exact view.

    Rows are processed in blocks of `block_rows` samples; each block is flushed
    before it counts as done, so `resume` restarts at the first unfinished block and
    yields the same bytes as an uninterrupted dump (same arguments, CPU). `arch`, `trust_arch`: see
    `load_checkpoint`. The view settings are a `Recipe`'s, checked there; the dump's own (tta, topk,
    topk_temperatures, batch_size, block_rows) are checked as a `DumpSettings`.
    """
    if not augment and views > 1 and mix == "none":
        raise KDCacheError(f"--no-augment caches the one un-augmented view: pass --views 1 (got --views {views})")
    settings = DumpSettings(tta, topk or 0, tuple(topk_temperatures or ()), batch_size, block_rows)
    partial = cache_io.partial_path(out)
    left = [partial] if partial.exists() else cache_io.shard_paths(out)  # what an interrupted dump left
    with claim_output(out, force=force, resume=resume, interrupted=left[0] if left else partial, lock=rt.main) as out:
        # One teacher, or an ensemble (several paths): the log of the members' mean softmax.
        teacher, meta, render_mean, render_std, who = load_teachers(
            teacher_path, rt=rt, arch=arch, trust_arch=trust_arch
        )
        # By default, the images the teacher was trained on (its --subset), so the commands chain.
        data = load_dataset(
            meta["dataset"],
            data_dir,
            subset if subset is not None else meta.get("num_train"),
            progress=progress,
            rebuild_store=rebuild_store,
            **recorded_options(meta),
        )
        check_classes(who["teacher_path"], meta, data.name, data.num_classes)
        t0 = time.perf_counter()
        job = _Job(
            teacher=TTAModel(teacher, tta) if tta != "none" else teacher,
            teacher_path=who["teacher_path"],
            images=rt.place(data.train_x),
            labels=data.train_y,
            render=(render_mean, render_std),
            geometry=data.geometry,
            views=views,
            seed=seed,
            augment=augment,
            mix=mix,
            mix_prob=mix_prob,
            settings=settings,
            temperatures=_topk_grid(settings.topk, settings.topk_temperatures, data.num_classes, meta),
            num_classes=data.num_classes,
            rt=rt,
            progress=progress if progress is not None and rt.main else NoProgress(),
        )
        attrs = _attrs(data, meta, who, job, "bf16" if rt.amp_dtype is not None else "fp32")
        need = _check_room(out, job, len(data.test_y))
        shards = _earlier_shards(out, rt, resume, force)
        sharded = rt.world > 1 or (resume and bool(shards))  # torchrun, or finishing what one left
        job.progress.note(
            f"dump {job.num_rows:,} {data.name} images x {views} view(s) through {who['teacher_arch']} · "
            f"{rt.describe()}"
        )
        if sharded:
            _sharded_blocks(out, attrs, shards, len(data.test_y), _store_hw(data), job)
            if not rt.main:
                return out  # rank 0 merges the shards and finishes the cache
        return _write(out, job, data, attrs, resume=resume, sharded=sharded, need=need, t0=t0)


def _store_hw(data):
    """Each stored image's (h, w) for random-resized crops (None for equal-size images)."""
    return None if data.geometry.hw is None else data.geometry.hw.numpy()


def _write(out: Path, job: _Job, data, attrs: dict, *, resume: bool, sharded: bool, need: int, t0: float) -> Path:
    """The cache itself: every block not yet written (or, after a torchrun dump, the shards merged in
    order), the teacher's test logits and accuracies, then published under `out`. A disk that fills
    up removes the partial file and says how much room to make."""
    rt, n, block_rows = job.rt, job.num_rows, job.settings.block_rows
    writer = None
    try:
        writer = cache_io.CacheWriter(
            out,
            attrs=attrs,
            num_rows=n,
            num_test=len(data.test_y),
            resume=resume and not sharded,
            store_hw=_store_hw(data),
        )
        if sharded:  # every block is in some shard now: merge them in order, as one process writes them
            owner = {b: p for p in cache_io.shard_paths(out) for b in cache_io.shard_blocks(p, attrs)}
            cache_io.merge_shards(writer, owner, n, block_rows)
        elif resume:  # what an earlier run wrote must be sound before more is added to it
            done = [
                torch.from_numpy(writer.ds[name][: writer.rows_done]).float()
                for name in cache_io.target_names(attrs)
                if name != "topk_indices"
            ]
            cache_io.check_finite(writer.tmp, torch.cat(done, -1), "start the dump over with --force")
        blocks = range(n if sharded else writer.rows_done, n, block_rows)
        job.progress.begin(f"dump {n}x{job.views} views", len(blocks))
        for start in blocks:
            job.block(start, min(start + block_rows, n), writer)
        job.progress.end()
        test_logits = predict(job.teacher, data.test_x, *job.render, rt, batch_size=job.settings.batch_size)
        _refuse_nonfinite(test_logits.to(torch.float16)[:, None], 0, job.teacher_path, writer, "test image")
        view_acc = job.view_accuracy(writer.file)
        for path in cache_io.shard_paths(out):
            path.unlink(missing_ok=True)  # merged: the partial now holds every block
        return writer.finish(
            test_logits.to(torch.float16).cpu().numpy(),
            {
                "teacher_test_acc": accuracy(test_logits, data.test_y),
                "teacher_view_acc": view_acc,
                "dump_time_s": time.perf_counter() - t0,  # this (last) session's only, when resumed
            },
        )
    except (OSError, RuntimeError) as e:
        reason = no_room(e)
        if reason is None:
            raise
        if writer is not None:
            writer.discard()  # HDF5 lost the writes that failed: the partial is not resumable
        cache_io.partial_path(out).unlink(missing_ok=True)
        raise KDCacheError(
            f"the disk filled up while writing {out} ({reason}); the partial file was removed: "
            f"free about {_size(need)} in {out.parent} and run again"
        ) from None
    finally:
        if writer is not None:
            writer.close()
