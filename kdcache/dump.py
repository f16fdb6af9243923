"""Teacher inference over N x K deterministic views, streamed into the cache writer."""

from __future__ import annotations

import json
import shutil
import time
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
from kdcache.views import MIXES, draw_views


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


def _sharded_blocks(out, attrs, shards, n, num_test, block_rows, hw, rt, block, progress, views) -> None:
    """torchrun: the blocks no shard holds yet, dealt round-robin to the processes; each writes its
    own shard `OUT.shard-R-of-N`, flushing and marking every block (the resume unit). Shards of an
    earlier run with any process count are read first, before anyone writes, and their blocks kept."""
    held = set().union(*(cache_io.shard_blocks(p, attrs) for p in shards)) if shards else set()
    _barrier(rt)  # everyone has read the old shards before any is written again
    left = [b for b in range(-(-n // block_rows)) if b not in held]
    if held:
        progress.note(
            f"{len(held)} block(s) kept from the interrupted dump's shards, {len(left)} to do "
            f"over {rt.world} process(es)"
        )
    todo = left[rt.rank :: rt.world]
    mine = cache_io.shard_path(out, rt.rank, rt.world)
    writer = cache_io.CacheWriter(
        out, attrs=attrs, num_rows=n, num_test=num_test, resume=mine.exists(), store_hw=hw, shard=mine
    )
    try:
        progress.begin(f"dump {n}x{views} views (this process's share)", len(todo))
        for b in todo:
            block(b * block_rows, min((b + 1) * block_rows, n), writer)
        progress.end()
    finally:
        writer.close()
    _barrier(rt)  # every shard is complete and closed


def _barrier(rt: Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as dist

        dist.barrier()


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
    `load_checkpoint`.
    """
    if views < 1:
        raise KDCacheError(f"--views must be >= 1 (got {views})")
    if not augment and views > 1 and mix == "none":
        raise KDCacheError(f"--no-augment caches the one un-augmented view: pass --views 1 (got --views {views})")
    if mix not in MIXES:
        raise KDCacheError(f"--mix must be one of {', '.join(MIXES)} (got {mix!r})")
    if not (0.0 <= mix_prob <= 1.0):  # also refuses nan
        raise KDCacheError(f"--mix-prob must be in [0, 1] (got {mix_prob})")
    DumpSettings(tta, topk or 0, tuple(topk_temperatures or ()), batch_size, block_rows)  # checks them, one place
    partial = cache_io.partial_path(out)
    left = [partial] if partial.exists() else cache_io.shard_paths(out)  # what an interrupted dump left
    with claim_output(out, force=force, resume=resume, interrupted=left[0] if left else partial, lock=rt.main) as out:
        # One teacher, or an ensemble (several paths): the log of the members' mean softmax.
        teacher, meta, render_mean, render_std, who = load_teachers(
            teacher_path, rt=rt, arch=arch, trust_arch=trust_arch
        )
        teacher = TTAModel(teacher, tta) if tta != "none" else teacher
        teacher_path = who["teacher_path"]
        # By default, the images the teacher was trained on (its --subset), so the commands chain.
        data = load_dataset(
            meta["dataset"],
            data_dir,
            subset if subset is not None else meta.get("num_train"),
            progress=progress,
            rebuild_store=rebuild_store,
            **recorded_options(meta),
        )
        check_classes(teacher_path, meta, data.name, data.num_classes)
        geometry = data.geometry
        mean, std = tuple(meta["normalize_mean"]), tuple(meta["normalize_std"])
        n, c = len(data.train_y), data.num_classes
        temps = _topk_grid(topk, topk_temperatures, c, meta)
        attrs = {
            "num_views": views,
            "num_classes": c,
            "dataset": data.name,
            "dataset_fingerprint": data.fingerprint,
            "subset": n,
            **who,
            "seed": seed,
            "augment": augment,
            "mix": mix,
            "mix_prob": mix_prob,
            "normalize_mean": list(mean),
            "normalize_std": list(std),
            "batch_size": batch_size,
            "block_rows": block_rows,
            "precision": "bf16" if rt.amp_dtype is not None else "fp32",
            "tta": tta,
            "view_recipe": geometry.recipe,
            **geometry.attrs(),
            "data_options": json.dumps(data.options),
            **({"topk": topk, "lse_temperatures": list(temps)} if topk else {}),
            "classes": json.dumps(data.classes),
            # The teacher's recipe with this dump's view settings: students start from it.
            "recipe": json.dumps(
                {
                    **meta.get("recipe", {}),
                    "views": views,
                    "augment": augment,
                    "seed": seed,
                    "subset": n,
                    "mix": mix,
                    "mix_prob": mix_prob,
                }
            ),
        }
        need = cache_io.bytes_needed(
            n,
            views,
            c,
            len(data.test_y),
            mixed=mix != "none",
            view_bytes=geometry.fields * geometry.dtype.itemsize,
            topk=topk,
            grid=len(temps),
        )
        free = shutil.disk_usage(out.parent).free
        if free < need * 1.1:
            raise KDCacheError(
                f"{out.parent} has {free / 1e6:.1f} MB free, the cache needs about {need / 1e6:.1f} MB: "
                "free space or choose another --out"
            )
        shards = cache_io.shard_paths(out)
        sharded = rt.world > 1 or (resume and bool(shards))  # torchrun, or finishing what one left
        if shards and not (resume or force):
            raise KDCacheError(
                f"an interrupted torchrun dump left {shards[0]}: pass --resume to continue it, or --force to start over"
            )
        if not resume:
            cache_io.partial_path(out).unlink(missing_ok=True)
            if rt.main:
                for path in shards:
                    path.unlink(missing_ok=True)
            shards = []
        progress = progress if progress is not None and rt.main else NoProgress()
        progress.note(
            f"dump {n:,} {data.name} images x {views} view(s) through {who['teacher_arch']} · {rt.describe()}"
        )
        t0 = time.perf_counter()
        writer = None
        images = rt.place(data.train_x)  # resident, or a host store streamed per batch
        hw = None if geometry.hw is None else geometry.hw.numpy()

        def block(start: int, stop: int, writer) -> None:
            """Views, teacher, targets of rows [start, stop): one written block."""
            drawn = draw_views(
                geometry, seed, range(start, stop), range(views), augment=augment, mix=mix, prob=mix_prob, num_rows=n
            )  # [b, K]
            rows = torch.arange(start, stop, device=rt.device).repeat_interleave(views)
            # one copy to the device per block, not per batch
            logits = predict(
                teacher,
                images,
                render_mean,
                render_std,
                rt,
                rows=rows,
                views=drawn.flatten().to(rt.device),
                batch_size=batch_size,
            )
            logits = logits.view(stop - start, views, c)
            _refuse_nonfinite(logits.to(torch.float16), start, teacher_path, writer)  # fp16: > 65504 is inf too
            if topk:  # the k largest, their classes, and the tail's log-sum-exp on the grid
                values, classes, lse = from_dense(logits, topk, temps)
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
                data.train_y[start:stop].numpy(),
                np.arange(start, stop, dtype=np.int64),
                None if drawn.mix is None else cache_io.mix_arrays(drawn.mix),
            )
            progress.advance()

        if sharded:
            _sharded_blocks(out, attrs, shards, n, len(data.test_y), block_rows, hw, rt, block, progress, views)
            if not rt.main:
                return out  # rank 0 merges the shards and finishes the cache
        try:
            writer = cache_io.CacheWriter(
                out, attrs=attrs, num_rows=n, num_test=len(data.test_y), resume=resume and not sharded, store_hw=hw
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
            progress.begin(f"dump {n}x{views} views", len(blocks))
            for start in blocks:
                block(start, min(start + block_rows, n), writer)
            progress.end()
            test_logits = predict(teacher, data.test_x, render_mean, render_std, rt, batch_size=batch_size)
            _refuse_nonfinite(test_logits.to(torch.float16)[:, None], 0, teacher_path, writer, "test image")
            # The teacher's class for every cached view (top-k lists are sorted: the first is the argmax).
            if topk:
                predicted = torch.from_numpy(writer.file["topk_indices"][:, :, 0].astype(np.int64))
            else:
                predicted = torch.from_numpy(writer.file["logits"][...]).float().argmax(-1)
            # The label that dominates each view: the partner's where it holds more than half the image.
            target = data.train_y[:, None].expand(-1, views)
            if mix != "none":
                part = torch.from_numpy(writer.file["mix_partner"][...]).long()
                lam = torch.from_numpy(writer.file["mix_lam"][...])
                target = torch.where(lam < 0.5, data.train_y[part.clamp(min=0)], target)
            view_acc = (predicted == target).float().mean().item()
            for path in cache_io.shard_paths(out):
                path.unlink(missing_ok=True)  # merged: the partial now holds every block
            return writer.finish(
                test_logits.to(torch.float16).cpu().numpy(),
                {
                    "teacher_test_acc": accuracy(test_logits, data.test_y),
                    "teacher_view_acc": view_acc,
                    # time of this (last) session only, when resumed
                    "dump_time_s": time.perf_counter() - t0,
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
