"""kdcache as a library: the three stages as functions, and a cache's batches for a loop of your own.

    import kdcache
    views = kdcache.CachedBatches("saved_models/teacher_logits.h5", batch_size=128)
    for batch in views.epoch(0):
        loss = kdcache.student_loss(model(batch.x), batch.y, batch.t, T=3.0, alpha=0.5,
                                    partner_labels=batch.y2, lam=batch.lam)

`CachedBatches` builds its batches with the function `kdcache student` uses (`stages.load_cached`), so a
loop of your own sees exactly the views, order and teacher targets the command trains on (docs/python-api.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from numbers import Integral
from pathlib import Path

import torch

from kdcache.batches import Batch
from kdcache.config import DEFAULT_DUMP_BATCH, DumpSettings, Recipe, validate
from kdcache.errors import KDCacheError
from kdcache.runtime import Progress, Runtime


def _integer(name: str, value, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or (low is not None and value < low):
        raise KDCacheError(f"{name} must be an integer{'' if low is None else f' >= {low}'} (got {value!r})")
    return int(value)


def _runtime(runtime: Runtime | None) -> Runtime:
    return runtime if runtime is not None else Runtime.create("auto", "auto")


class CachedBatches:
    """A logit cache and the training data it was dumped from, as batches on the runtime's device.

    `epoch(e)` yields `kdcache.batches.Batch`es covering every training row once, in an order fixed by
    (seed, e): `x` the normalised views [B, 3, H, W] (channels_last where the runtime uses it), `y` the
    labels, `t` the teacher's logits for exactly those views [B, C] (float16; for a top-k cache a
    `kdcache.topk.TopK`, which `student_loss` takes with kind "kd"), `index` the rows; for a mixed cache
    `y2` the partner's label and `lam` the share of the row's own image ([B] each; None otherwise).
    Epoch e shows each row its view number `view_schedule(seed, N, K, e)`: each of the K views once per
    K epochs. `test_batches()`, `mean` and `std` are for evaluating on the data's test split. Under
    torchrun (a runtime created there) each process gets its share of every batch, its loss weight in
    `scale`, as `kdcache student` does.

    `data_dir`: where the data is (CIFAR: the folder holding cifar-10-batches-py, default data/; an
    image folder: the path the cache recorded). `subset`: None for the rows the cache holds.
    """

    def __init__(
        self,
        cache: str | Path,
        *,
        data_dir: str | Path | None = None,
        batch_size: int = 128,
        seed: int = 0,
        runtime: Runtime | None = None,
        subset: int | None = None,
        progress: Progress | None = None,
    ):
        from kdcache.stages import load_cached

        batch_size, seed = _integer("batch_size", batch_size, 1), _integer("seed", seed)
        self.runtime = _runtime(runtime)
        loaded = load_cached(
            cache,
            data_dir=data_dir,
            rt=self.runtime,
            batch_size=batch_size,
            seed=seed,
            subset=subset,
            progress=progress,
        )
        self.path, self.seed, self.batch_size = Path(cache), seed, batch_size
        self.attrs, self.mix, self.num_views = loaded.attrs, loaded.mix, loaded.num_views
        self.teacher_test_logits = loaded.test_logits
        self._data, self._batches = loaded.data, loaded.batches

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._batches)

    def __repr__(self) -> str:
        return (
            f"CachedBatches({str(self.path)!r}: {self.num_samples:,} {self._data.name} images x {self.num_views} "
            f"views, {self.num_classes} classes, mix {self.mix}, {len(self)} batches of {self.batch_size} "
            f"on {self.device})"
        )

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of epoch `epoch` (0-based), rendered on the device; any epoch, in any order."""
        batches, rt = self._batches.epoch(_integer("epoch", epoch, 0)), self.runtime
        return (batch._replace(x=rt.input(batch.x)) for batch in batches)

    def test_batches(self, batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised test images, labels) on the device, in the split's order: for evaluation."""
        from kdcache.views import normalize

        x, y, rt, size = self._data.test_x, self._data.test_y, self.runtime, _integer("batch_size", batch_size, 1)
        parts = (slice(start, start + size) for start in range(0, len(y), size))
        return ((rt.input(normalize(x[p].to(rt.device), self.mean, self.std)), y[p].to(rt.device)) for p in parts)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def mean(self) -> tuple[float, ...]:
        """The normalisation the teacher saw (per channel, images in [0, 1]): use it for any evaluation."""
        return self._batches.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self._batches.std

    @property
    def num_samples(self) -> int:
        return len(self._data.train_y)

    @property
    def num_classes(self) -> int:
        return self._data.num_classes

    @property
    def classes(self) -> list[str]:
        return self._data.classes

    @property
    def labels(self) -> torch.Tensor:
        """The training labels [N] (on the device)."""
        return self._batches.labels

    @property
    def test_images(self) -> torch.Tensor:
        """The test split's uint8 images [N_test, 3, H, W] (host memory), as stored: normalise with mean/std."""
        return self._data.test_x

    @property
    def test_labels(self) -> torch.Tensor:
        return self._data.test_y

    @property
    def teacher_test_acc(self) -> float | None:
        acc = self.attrs.get("teacher_test_acc")
        return None if acc is None else float(acc)


def train_teacher(
    recipe: Recipe,
    *,
    out: str | Path,
    data_dir: str | Path | None = None,
    runtime: Runtime | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch=None,
    data_options: dict | None = None,
):
    """`kdcache teacher`: train `recipe.teacher_arch` (with `recipe.for_teacher()`'s settings) and write the
    checkpoint `out`. Returns a `StageResult` (history of per-epoch metrics, test accuracy)."""
    from kdcache.stages import train_teacher as stage

    return stage(
        _recipe(recipe),
        data_dir=data_dir,
        out=out,
        rt=_runtime(runtime),
        force=force,
        resume=resume,
        progress=progress,
        on_epoch=on_epoch,
        data_options=data_options,
    )


def dump_logits(
    recipe: Recipe | None,
    *,
    teacher: str | Path | list,
    out: str | Path,
    data_dir: str | Path | None = None,
    runtime: Runtime | None = None,
    batch_size: int = DEFAULT_DUMP_BATCH,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    dump: DumpSettings | None = None,
    **options,
) -> Path:
    """`kdcache dump-logits`: cache the teacher's logits for `recipe.views` views of every training image.

    The views: `recipe`'s views, augment, seed and subset (None: the images the teacher trained on), mixed as
    its teacher stage was (`recipe.for_teacher()`'s mix and mix_prob). `recipe` None: the recipe the teacher's
    checkpoint recorded, as the command does without --preset. `teacher`: a checkpoint, or a list of them (an
    ensemble). The dump's own settings (tta, topk, topk_temperatures, batch_size, block_rows: a config file's
    [dump] table) come as `dump`, a `DumpSettings`, or as keywords, not both. `options`: `dump.dump_logits`'s
    others (arch, ...). Returns the cache's path."""
    from kdcache.checkpoints import read_checkpoint
    from kdcache.dump import dump_logits as dump_stage

    first = teacher[0] if isinstance(teacher, (list, tuple)) else teacher
    if recipe is None:
        recipe = Recipe.from_dict(read_checkpoint(first).get("recipe") or {})
    recipe = _recipe(recipe)
    taught = recipe.for_teacher()
    loose = {name: options.pop(name) for name in [*options] if name in DumpSettings.__dataclass_fields__}
    if dump is not None and (loose or batch_size != DEFAULT_DUMP_BATCH):
        raise KDCacheError(
            f"dump_logits: the dump's settings came twice (dump= and {', '.join([*loose] or ['batch_size'])}=): "
            "pass them in dump=DumpSettings(...) or as keywords, not both"
        )
    dump = dump or DumpSettings(batch_size=batch_size, **loose)
    return dump_stage(
        teacher_path=teacher,
        data_dir=data_dir,
        out=out,
        views=recipe.views,
        seed=recipe.seed,
        rt=_runtime(runtime),
        subset=recipe.subset,
        augment=recipe.augment,
        mix=taught.mix,
        mix_prob=taught.mix_prob,
        force=force,
        resume=resume,
        progress=progress,
        **dump.dump_args(),
        **options,
    )


def train_student(
    recipe: Recipe | None,
    *,
    cache: str | Path | None,
    out: str | Path,
    data_dir: str | Path | None = None,
    runtime: Runtime | None = None,
    online_teacher: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch=None,
    trust_arch: bool = False,
):
    """`kdcache student`: train `recipe.student_arch` against the cache's soft targets (or, with
    `online_teacher` and `cache=None`, a teacher run on fresh views) and write the checkpoint `out`.
    The views and normalisation are the cache's; `recipe.subset` must be None or the cache's rows.
    `recipe` None: the recipe `kdcache student` resolves without flags (`stages.student_recipe`): the one
    the cache (or the online teacher) recorded, a module:factory student architecture it names built only
    with `trust_arch`. Returns a `StageResult`."""
    from kdcache.stages import student_recipe
    from kdcache.stages import train_student as stage

    if (cache is None) == (online_teacher is None):
        raise KDCacheError("train_student needs a cache or an online_teacher (one of them): pass cache=PATH")
    if recipe is None:
        recipe = student_recipe(cache, None, {}, {}, online_teacher=online_teacher, trust_arch=trust_arch)
    return stage(
        _recipe(recipe),
        cache_file=cache,
        data_dir=data_dir,
        out=out,
        rt=_runtime(runtime),
        online_teacher=online_teacher,
        force=force,
        resume=resume,
        progress=progress,
        on_epoch=on_epoch,
        trust_arch=trust_arch,
    )


def _recipe(recipe) -> Recipe:
    if not isinstance(recipe, Recipe):
        raise KDCacheError(
            f"expected a kdcache.Recipe, got a {type(recipe).__name__}: pass e.g. kdcache.get_preset('seed-cnn')"
        )
    return validate(recipe)


def sweep(
    cache: str | Path,
    *,
    out: str | Path,
    recipe: Recipe | None = None,
    T=(1.0, 2.0, 4.0),
    alpha=(0.5, 0.9),
    loss=("kd",),
    seeds=(0, 1, 2),
    arch=(),
    val_fraction: float = 0.1,
    backend: str = "auto",
    keep: str = "best",
    data_dir: str | Path | None = None,
    runtime: Runtime | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    trust_arch: bool = False,
) -> list[dict]:
    """`kdcache sweep`: train every (arch, seed) x {alone, T x alpha x loss, the design card} student from
    `cache` in one pass and write `out/` (sweep.json, report.md, sweep.png, best.pt). `recipe` None: the one
    `kdcache student` resolves without flags; its T, alpha, loss, seed and student_arch are the sweep's
    to vary. Returns the table: one dict per setting (`key`, `setting`, `val`, `test`, `gain`: mean, std,
    n, 95% interval, ...); the whole record, pick included, is in `out/sweep.json`."""
    from kdcache.stages import student_recipe
    from kdcache.sweeps import SweepSpec, run_sweep

    if recipe is None:
        recipe = student_recipe(cache, None, {}, {}, trust_arch=trust_arch)
    as_tuple = lambda v: tuple(v) if isinstance(v, list | tuple) else (v,)  # noqa: E731
    spec = SweepSpec(
        T=tuple(float(t) for t in as_tuple(T)),
        alpha=tuple(float(a) for a in as_tuple(alpha)),
        loss=as_tuple(loss),
        seeds=tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds),  # an int: a count
        arch=as_tuple(arch),
        val_fraction=val_fraction,
        backend=backend,
        keep=keep,
    )
    result = run_sweep(
        _recipe(recipe),
        spec,
        cache_file=cache,
        data_dir=data_dir,
        out=out,
        rt=_runtime(runtime),
        force=force,
        resume=resume,
        progress=progress,
    )
    return result.rows
