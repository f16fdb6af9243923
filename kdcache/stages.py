"""The teacher and student stages: data + model + batch plan + loss, handed to `train.fit`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache import cache as cache_io
from kdcache.artifacts import claim_output, metrics_path, write_metrics
from kdcache.batches import EpochViews, Plan, ViewBatches
from kdcache.checkpoints import check_classes, file_sha256, load_checkpoint, read_checkpoint, save_checkpoint
from kdcache.config import DumpSettings, Recipe, tta_levels
from kdcache.data import IMAGENET_MEAN, IMAGENET_STD, Dataset, load_dataset, recorded_options
from kdcache.errors import KDCacheError
from kdcache.inference import TTAModel, accuracy, predict
from kdcache.losses import label_loss, student_loss
from kdcache.models import InitFromData, build, num_params
from kdcache.runtime import NoProgress, Progress, Runtime
from kdcache.topk import grid_column
from kdcache.train import (
    Diverged,
    Member,
    WeightAverage,
    build_optimizer,
    fit,
    load_resume,
    resume_path,
    save_resume,
)
from kdcache.views import STREAM_ONLINE, STREAM_TRAIN, CropFlip, Geometry, Views, draw_views, normalize, view_schedule


@dataclass
class StageResult:
    out: Path
    arch: str
    params: int
    history: list[dict]
    train_time_s: float
    teacher_test_acc: float | None = None  # a student's teacher, as its checkpoint or cache recorded it

    @property
    def test_acc(self) -> float:
        return self.history[-1]["test_acc"]


def _train_and_save(
    *,
    role: str,
    arch: str,
    data: Dataset,
    recipe: Recipe,
    epochs: int,
    batches: ViewBatches,
    loss_fn,
    rt: Runtime,
    out: Path,
    resume: bool,
    extra_meta: dict,
    progress: Progress | None,
    on_epoch=None,
    teacher=None,
    teacher_test_logits=None,
    recorded: Recipe | None = None,
) -> StageResult:
    """Shared by both stages: seed, build, (resume), fit with per-epoch state, checkpoint.
    Under torchrun every process trains its share; only rank 0 prints and writes files.
    `recorded`: the recipe the checkpoint records, when it is not the one trained with (a teacher
    records the whole recipe, its own settings and the students')."""
    progress = progress if progress is not None and rt.main else NoProgress()
    raw = new_model(arch, data, recipe.seed, batches)
    model = rt.prepare(raw)
    optimizer, scheduler = new_optimizer(raw, recipe, epochs, len(batches))
    ema = WeightAverage(model, recipe.ema) if recipe.ema > 0 else None
    identity = {
        "role": role,
        "arch": arch,
        "fingerprint": data.fingerprint,
        "epochs": epochs,
        "recipe": {  # what training depends on: --tta-eval measures after it, and may change on --resume
            k: repr(v)
            for k, v in dataclasses.asdict(dataclasses.replace(recipe, subset=None)).items()
            if k != "tta_eval"
        },
        **{k: str(v) for k, v in extra_meta.items()},
    }
    state_file, log_file = resume_path(out), metrics_path(out)
    start, history = 0, []
    if resume:
        start, history = load_resume(
            state_file, model=raw, optimizer=optimizer, scheduler=scheduler, identity=identity, ema=ema
        )
    extra = f" · T={extra_meta['T']:g} alpha={extra_meta['alpha']:g}" if "alpha" in extra_meta else ""
    extra += f" · views: {_view_family(recipe, data)}"
    progress.note(
        f"{role} {arch} ({num_params(raw):,} parameters) on {len(data.train_y):,} {data.name} images{extra} · "
        f"{rt.describe()}"
        + (f" · resuming after epoch {start}" if resume else "")
        + (
            ""
            if isinstance(batches.images, torch.Tensor)
            else f" · {batches.images.nbytes / 1e6:,.0f} MB store streamed from host memory (over the resident budget)"
        )
    )

    def after_epoch(epoch: int, results: list[dict | None]) -> None:
        metrics = results[0]
        metrics["elapsed_s"] = (history[-1]["elapsed_s"] if history else 0.0) + metrics["train_time_s"]
        history.append(metrics)
        if not rt.main:
            return
        save_resume(
            state_file,
            model=raw,
            optimizer=optimizer,
            scheduler=scheduler,
            epochs_done=epoch + 1,
            history=history,
            identity=identity,
            ema=ema,
        )
        write_metrics(log_file, history)  # after the state: a logged epoch is always resumable
        if on_epoch:
            on_epoch(metrics)

    try:
        member = Member(model, loss_fn, optimizer, scheduler, rt, ema=ema, teacher=teacher)
        fit(
            [member],
            batches,
            rt,
            epochs=epochs,
            start_epoch=start,
            test=(data.test_x, data.test_y),
            on_epoch=after_epoch,
            progress=progress,
            teacher_test_logits=teacher_test_logits,
        )
    except Diverged as e:
        kept = f"the state after epoch {e.epoch - 1} is kept in {state_file}" if e.epoch > 1 else "nothing was kept"
        raise KDCacheError(f"{e}; {kept}: try a lower --lr, then run again with --force") from None
    train_time = sum(m["train_time_s"] for m in history)
    if not rt.main:
        return StageResult(out, arch, num_params(raw), history, train_time)
    final = raw if ema is None else ema.module  # the average is what gets evaluated, dumped and saved
    metrics = {"test_acc": history[-1]["test_acc"], "epochs": epochs, "train_time_s": train_time}
    levels = tta_levels(recipe.tta_eval) if role == "teacher" else ()
    if levels:  # asked for (--tta-eval): what test-time augmentation would add (a dump can use --tta flip)
        prepared = rt.prepare(final).eval()
        passes = sum(TTAModel.PASSES[level] for level in levels)
        progress.note(
            f"evaluating with test-time augmentation ({', '.join(levels)}: {passes} passes over the "
            f"{len(data.test_y):,} test images)"
        )
        for level in levels:
            tta = TTAModel(prepared, level)
            metrics[f"test_acc_tta_{level}"] = accuracy(
                predict(tta, data.test_x, batches.mean, batches.std, rt, batch_size=batches.batch_size), data.test_y
            )
        # into the very record on_epoch was handed last: --tensorboard writes these when it closes
        history[-1].update({k: v for k, v in metrics.items() if k.startswith("test_acc_tta")})
        write_metrics(log_file, history)
    save_checkpoint(
        out,
        final,
        arch=arch,
        meta=checkpoint_meta(role, data, batches, num_params(raw), metrics, recorded or recipe, extra_meta),
    )
    state_file.unlink(missing_ok=True)
    return StageResult(out, arch, num_params(raw), history, train_time)


def checkpoint_meta(
    role: str, data: Dataset, batches: ViewBatches, params: int, metrics: dict, recipe: Recipe, extra: dict
) -> dict:
    """What a checkpoint says of itself beside its weights: role, data, normalisation, metrics, recipe."""
    return {
        "role": role,
        "num_classes": data.num_classes,
        "dataset": data.name,
        "dataset_fingerprint": data.fingerprint,
        "num_train": len(data.train_y),
        "normalize_mean": list(batches.mean),
        "normalize_std": list(batches.std),
        "classes": data.classes,
        "params": params,
        "image_size": data.geometry.size[0],
        "data_options": data.options,
        "metrics": metrics,
        "recipe": dataclasses.asdict(recipe),
        **extra,
    }


def new_model(arch: str, data: Dataset, seed: int, batches: ViewBatches) -> torch.nn.Module:
    """A fresh `arch` for `data`, its initial weights fixed by `seed` (the global generator is seeded here, so
    what draws from it next, dropout, continues from the same state)."""
    torch.manual_seed(seed)
    raw = build(arch, data.num_classes, image_size=data.geometry.size[0])
    if isinstance(raw, InitFromData):  # e.g. airbench's whitening filters, from the first 5,000 plain images
        raw.init_from_data(normalize(torch.as_tensor(np.asarray(data.train_x[:5000])), batches.mean, batches.std))
    return raw


def new_optimizer(raw: torch.nn.Module, recipe: Recipe, epochs: int, steps_per_epoch: int):
    """The recipe's optimiser and schedule for `raw` (see `train.build_optimizer`)."""
    return build_optimizer(
        raw,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        epochs=epochs,
        schedule=recipe.schedule,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=recipe.warmup_epochs,
        nesterov=recipe.nesterov,
        bn_bias_lr=recipe.bn_bias_lr,
    )


def student_loss_fn(recipe: Recipe):
    """The student's loss on a batch: alpha * the soft-target loss + (1 - alpha) * the label loss."""
    T, alpha, kind, smoothing = recipe.T, recipe.alpha, recipe.loss, recipe.label_smoothing

    def loss_fn(s, b):
        return student_loss(
            s, b.y, b.t, kind=kind, T=T, alpha=alpha, partner_labels=b.y2, lam=b.lam, smoothing=smoothing
        )

    return loss_fn


def cache_source(cached: CachedData) -> dict:
    """What a student checkpoint records of the cache it learnt from."""
    attrs = cached.attrs
    return {
        "cache_teacher_sha256": attrs["teacher_sha256"],
        "cache_num_views": cached.num_views,
        "cache_blocks_sha256": cached.digest,
        "cache_precision": attrs.get("precision"),
        "cache_seed": attrs["seed"],
        "cache_augment": attrs["augment"],
        "teacher_arch": attrs["teacher_arch"],
    }


def _view_family(recipe: Recipe, data: Dataset) -> str:
    """What a training run shows, in words: "crop + flip, cutmix on 50% of them"."""
    shape = "plain images"
    if recipe.augment:
        shape = "crop + flip" if isinstance(data.geometry, CropFlip) else "random-resized crop + flip"
    return shape + ("" if recipe.mix == "none" else f", {recipe.mix} on {recipe.mix_prob:.0%} of them")


def fresh_views_plan(
    geometry: Geometry,
    n: int,
    seed: int,
    augment: bool,
    device,
    *,
    mix: str = "none",
    mix_prob: float = 1.0,
    stream: int = STREAM_TRAIN,
) -> Plan:
    """A new deterministic view of every image each epoch (view index = epoch in `stream`):
    a crop of `geometry`, mixed with a partner when `mix` is set. Teacher training and online students."""
    idx = np.arange(n)

    def plan(epoch: int) -> EpochViews:
        views = draw_views(
            geometry, seed, idx, [epoch], augment=augment, mix=mix, prob=mix_prob, num_rows=n, stream=stream
        )
        return EpochViews(views[:, 0].to(device), None)

    return plan


def cached_plan(views: Views, logits, seed: int, device) -> Plan:
    """Students: each sample's scheduled cached view (`views` [N,K]) and its teacher targets
    ([N,K,C] logits or a `TopK`). The cache stays in host memory; only the epoch's slice
    goes to the device. `logits` may instead be a reader, views [N] -> that epoch's targets [N]
    (a cache larger than memory): the next epoch's are then read in a background thread."""
    n, k = views.crop.shape[:2]
    rows = torch.arange(n)
    if callable(logits):
        epoch_targets = _prefetched(logits, lambda e: view_schedule(seed, n, k, e).numpy())
    else:
        epoch_targets = lambda e: logits[rows, view_schedule(seed, n, k, e)]  # noqa: E731

    def plan(epoch: int) -> EpochViews:
        v = view_schedule(seed, n, k, epoch)
        return EpochViews(views[rows, v].to(device), epoch_targets(epoch).to(device))

    return plan


def _prefetched(read, views_of):
    """epoch -> read(views_of(epoch)), with epoch + 1's read started in a background thread."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-cache")
    pending: dict = {}

    def targets(epoch: int):
        future = pending.pop(epoch, None) or pool.submit(read, views_of(epoch))
        pending.clear()  # an epoch asked out of order: drop stale reads
        pending[epoch + 1] = pool.submit(read, views_of(epoch + 1))
        return future.result()

    return targets


def view_batches(data: Dataset, plan: Plan, batch_size: int, seed: int, mean, std, rt: Runtime) -> ViewBatches:
    """Every stage's batches (and the library's `CachedBatches`): the training images placed where the loop
    reads them, this process's share under torchrun, the last partial batch dropped when compiled."""
    batches = ViewBatches(
        rt.place(data.train_x),
        data.train_y.to(rt.device),
        plan,
        batch_size,
        seed,
        tuple(mean),
        tuple(std),
        drop_last=rt.compile,
    )
    batches.rank, batches.world = rt.rank, rt.world
    return batches


@dataclass
class CachedData:
    """A cache and the training data it was dumped from, checked against each other, as a student's batches."""

    data: Dataset
    batches: ViewBatches  # each epoch's cached views, with the teacher's targets for exactly those views
    attrs: dict  # the cache's attributes
    test_logits: torch.Tensor | None  # the teacher's on the test split, when the dump stored them
    digest: str  # the cache's content digest (block checksums)
    mix: str  # the cache's mixing: none | cutmix | mixup | both
    num_views: int  # K
    views: Views | None = None  # every cached view [N, K] (a sweep plans other seeds' epochs from them)
    targets: object = None  # the teacher's targets [N, K, C] or a `TopK`, or a reader when streamed


def load_cached(
    cache_file: str | Path,
    *,
    data_dir: str | Path | None,
    rt: Runtime,
    batch_size: int,
    seed: int,
    subset: int | None = None,
    progress: Progress | None = None,
    rebuild_store: bool = False,
) -> CachedData:
    """Open a cache, load the data it records (`subset`: None for the cache's rows), refuse any mismatch, and
    plan its views: each epoch every sample shows one of its K cached views (`cached_plan`). Targets over the
    host budget stay in the file and are read one epoch ahead."""
    with cache_io.open_cache(cache_file) as cache:
        attrs = cache.attrs
        subset = subset if subset is not None else attrs.get("subset")
        data = load_dataset(
            attrs["dataset"],
            data_dir,
            subset,
            progress=progress,
            rebuild_store=rebuild_store,
            **recorded_options(attrs),
        )
        cache_io.check_matches(cache, data.fingerprint, data.num_classes, data.classes)
        streamed = cache.target_bytes > rt.host_budget()  # larger than memory: read per epoch
        logits, views, labels = cache.tensors(targets=not streamed)
        if streamed:
            (progress or NoProgress()).note(
                f"{cache.target_bytes / 1e6:,.0f} MB of cached targets are over the "
                "memory budget: each epoch's views are read from the file in blocks, "
                "one epoch ahead"
            )
            logits = _cache_reader(cache_file)
        test_logits = torch.from_numpy(cache.file["test_logits"][...]) if "test_logits" in cache.file else None
        digest, cache_mix = cache_io.content_digest(cache), cache.mix
    if not torch.equal(labels, data.train_y):
        raise KDCacheError(f"{cache_file}: labels differ from the data's: dump the cache again")
    plan = cached_plan(views, logits, seed, rt.device)
    batches = view_batches(data, plan, batch_size, seed, attrs["normalize_mean"], attrs["normalize_std"], rt)
    return CachedData(data, batches, attrs, test_logits, digest, cache_mix, views.crop.shape[1], views, logits)


def train_teacher(
    recipe: Recipe,
    *,
    data_dir: str | Path,
    out: str | Path,
    rt: Runtime,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch=None,
    data_options: dict | None = None,
) -> StageResult:
    """Train `recipe.teacher_arch` with cross-entropy (against the mixed labels on mixed views)
    on a fresh view of every image each epoch, of the family the cache will hold.
    `data_options`: an image folder's (image size, store size, ...; see `data.load_folder`)."""
    recorded, recipe = recipe, recipe.for_teacher()
    with claim_output(
        out, force=force, resume=resume, interrupted=resume_path(out), sides=(metrics_path(out),), lock=rt.main
    ) as out:
        data = load_dataset(recipe.dataset, data_dir, recipe.subset, progress=progress, **(data_options or {}))
        _check_mixable(recipe, len(data.train_y))
        if data.name == "imagefolder":  # photographs: ImageNet's statistics, as pretrained models expect
            recipe = dataclasses.replace(recipe, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            recorded = dataclasses.replace(recorded, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        plan = fresh_views_plan(
            data.geometry,
            len(data.train_y),
            recipe.seed,
            recipe.augment,
            rt.device,
            mix=recipe.mix,
            mix_prob=recipe.mix_prob,
        )
        batches = view_batches(data, plan, recipe.batch_size, recipe.seed, recipe.mean, recipe.std, rt)
        return _train_and_save(
            role="teacher",
            arch=recipe.teacher_arch,
            data=data,
            recipe=recipe,
            epochs=recipe.epochs,
            batches=batches,
            loss_fn=lambda s, b: label_loss(s, b.y, b.y2, b.lam, recipe.label_smoothing),
            rt=rt,
            out=out,
            resume=resume,
            extra_meta={},
            progress=progress,
            on_epoch=on_epoch,
            recorded=recorded,
        )


def _cache_reader(path):
    """views [N] -> that epoch's targets, through the reader thread's own handle on the file."""
    handle = {}

    def read(views):
        if "cache" not in handle:
            handle["cache"] = cache_io.open_cache(path)
        return handle["cache"].epoch_targets(views)

    return read


def _check_mixable(recipe: Recipe, n: int) -> None:
    if recipe.mix != "none" and n < 2:
        raise KDCacheError(f"--mix {recipe.mix} needs at least 2 training images (got {n}): use --mix none")


def cache_fixes(recipe: Recipe, attrs: dict) -> Recipe:
    """`recipe` with the settings a cache fixes: its K views, their family (crop/flip or not, mix and
    mix share) and the teacher's normalisation. A cache student sees these, whatever its preset says."""
    return dataclasses.replace(
        recipe,
        views=int(attrs["num_views"]),
        augment=bool(attrs["augment"]),
        mean=tuple(attrs["normalize_mean"]),
        std=tuple(attrs["normalize_std"]),
        mix=cache_io.attr(attrs, "mix"),  # v1: crop/flip views only
        mix_prob=float(cache_io.attr(attrs, "mix_prob")),
    )


def check_served(recipe: Recipe, attrs: dict, cache_file) -> None:
    """Refuse a soft-target loss the cache's targets cannot serve: a top-k cache serves kd at the
    temperatures of its grid (alpha 0 uses no targets)."""
    if not attrs.get("topk") or recipe.alpha == 0:
        return
    if recipe.loss != "kd":
        raise KDCacheError(
            f"--loss {recipe.loss} needs every logit, {cache_file} keeps the top "
            f"{attrs['topk']}: use --loss kd, or a dense cache"
        )
    grid_column(attrs["lse_temperatures"], recipe.T, attrs["topk"])


_CACHE_VIEW_FLAGS = {"augment": "--augment/--no-augment", "mix": "--mix", "mix_prob": "--mix-prob"}


def student_recipe(
    cache: str | Path | None,
    preset: str | None,
    config: dict,
    flags: dict,
    *,
    online_teacher: str | Path | None = None,
    trust_arch: bool = False,
    config_path: Path | None = None,
) -> Recipe:
    """The recipe a student trains with: the one policy of `kdcache student` and `kdcache.train_student`.

    Starts from `preset` (or the config file's `preset`), else the recipe the cache (or `online_teacher`,
    with `cache` None) recorded, else the default preset; then `config` (`read_config`'s table), then
    `flags`: typed values by Recipe field name (None: not typed), plus `image_size`. What the upstream
    artifact fixes is its own: `dataset`, `image_size` and a cache's `views` may only repeat it, and a cache
    student's views, their family and normalisation are the cache's (`cache_fixes`; --augment, --mix and
    --mix-prob go with an online teacher, whose view family is the teacher's where they leave it open).
    `subset`: typed or the file's, else None (the cache's rows). A module:factory student architecture
    that a file names, not `flags`, is refused unless `trust_arch`. Vary the result (T, alpha, loss, seed,
    student_arch) with `dataclasses.replace`; `check_served` says whether the cache serves a variant."""
    import json

    from kdcache.config import config_given, fixed_by, resolve, teacher_views
    from kdcache.models import check_spec, refuse_code

    flags = {k: v for k, v in flags.items() if v is not None}
    fixed = {k: flags.pop(k) for k in ("dataset", "image_size", "views") if k in flags}
    if flags.get("student_arch"):
        check_spec(flags["student_arch"])
    attrs = None
    if online_teacher is None:
        if given := next((flag for k, flag in _CACHE_VIEW_FLAGS.items() if k in flags), None):
            raise KDCacheError(f"{given} goes with --online-teacher; a cache student replays the cache's views")
        with cache_io.open_cache(cache) as c:
            attrs = c.attrs
            size = c.geometry().size[0]
        recorded = json.loads(attrs["recipe"]) if "recipe" in attrs else None
        source = cache
        fixed_by(
            cache,
            dataset=(fixed.get("dataset"), attrs.get("dataset")),
            image_size=(fixed.get("image_size"), size),
            views=(fixed.get("views"), attrs["num_views"]),
        )
    else:
        meta = read_checkpoint(online_teacher)
        recorded, source = meta.get("recipe"), online_teacher
        fixed_by(
            online_teacher,
            dataset=(fixed.get("dataset"), meta.get("dataset")),
            image_size=(fixed.get("image_size"), meta.get("image_size")),
        )
        if "views" in fixed:
            raise KDCacheError(
                "--views goes with a cache (its K views); an online student sees a fresh view every epoch"
            )
    subset = flags.pop("subset", None)
    recipe = resolve(preset, config, recorded, flags, config_path=config_path)
    recipe = dataclasses.replace(recipe, subset=subset if subset is not None else config.get("subset"))
    if "student_arch" not in flags and not trust_arch:  # an architecture a file names, not the user
        refuse_code(
            recipe.student_arch,
            f"the config file {config_path}" if "student_arch" in config else f"the recipe recorded in {source}",
            f"pass --arch {recipe.student_arch} (or --trust-arch) if you trust that code, or another --arch",
        )
    if online_teacher is not None:  # as a cache student replays the dump's views
        views = {k: flags.get(k) for k in _CACHE_VIEW_FLAGS}
        return teacher_views(recipe, recorded, **config_given(config, **views))
    for key in ("views", "augment", "mix", "mix_prob"):  # a file that says otherwise about the views is wrong
        if key in config and key in (recorded or {}) and recorded[key] != config[key]:
            raise KDCacheError(
                f"{config_path}: {key} = {config[key]!r} but {cache} holds {key} = {recorded[key]!r}: the views "
                f"are the cache's; remove {key} from the file or dump a cache with it"
            )
    return cache_fixes(recipe, attrs)


def train_student(
    recipe: Recipe,
    *,
    cache_file: str | Path | None,
    data_dir: str | Path,
    out: str | Path,
    rt: Runtime,
    online_teacher: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch=None,
    rebuild_store: bool = False,
    trust_arch: bool = False,
) -> StageResult:
    """Train `recipe.student_arch` against the teacher's soft targets.

    From a cache: each epoch every sample shows one of its K cached views (each view once
    per K epochs, so K >= epochs means a view never seen before every epoch), rendered
    exactly as the dump rendered it. With `online_teacher` (no cache): the teacher runs on
    a fresh view of the recipe's family every epoch, the honest comparison for a cache.
    alpha = 0 ignores the teacher. `trust_arch`: the online teacher may be a module:factory
    architecture (see `load_checkpoint`).
    """
    with claim_output(
        out, force=force, resume=resume, interrupted=resume_path(out), sides=(metrics_path(out),), lock=rt.main
    ) as out:
        teacher = None
        if online_teacher is not None:
            teacher, meta = load_checkpoint(online_teacher, device=rt.device, trust_arch=trust_arch)
            subset = recipe.subset if recipe.subset is not None else meta.get("num_train")
            data = load_dataset(
                meta["dataset"],
                data_dir,
                subset,
                progress=progress,
                rebuild_store=rebuild_store,
                **recorded_options(meta),
            )
            check_classes(online_teacher, meta, data.name, data.num_classes)
            _check_mixable(recipe, len(data.train_y))
            mean, std = tuple(meta["normalize_mean"]), tuple(meta["normalize_std"])
            plan = fresh_views_plan(
                data.geometry,
                len(data.train_y),
                recipe.seed,
                recipe.augment,
                rt.device,
                mix=recipe.mix,
                mix_prob=recipe.mix_prob,
                stream=STREAM_ONLINE,
            )
            teacher = rt.prepare(teacher)
            test_logits = predict(teacher, data.test_x.to(rt.device), mean, std, rt, batch_size=recipe.batch_size)
            source = {"online_teacher_sha256": file_sha256(online_teacher), "teacher_arch": meta["arch"]}
            teacher_acc = meta.get("metrics", {}).get("test_acc")
            batches = view_batches(data, plan, recipe.batch_size, recipe.seed, mean, std, rt)
        else:
            cached = load_cached(
                cache_file,
                data_dir=data_dir,
                rt=rt,
                batch_size=recipe.batch_size,
                seed=recipe.seed,
                subset=recipe.subset,
                progress=progress,
                rebuild_store=rebuild_store,
            )
            data, batches, attrs, test_logits = cached.data, cached.batches, cached.attrs, cached.test_logits
            teacher_acc = attrs.get("teacher_test_acc")
            check_served(recipe, attrs, cache_file)
            recipe = cache_fixes(recipe, attrs)  # whatever the preset said: record what the student sees
            source = cache_source(cached)
        T, alpha, kind = recipe.T, recipe.alpha, recipe.loss
        result = _train_and_save(
            role="student",
            arch=recipe.student_arch,
            data=data,
            recipe=recipe,
            epochs=recipe.epochs,
            batches=batches,
            loss_fn=student_loss_fn(recipe),
            rt=rt,
            out=out,
            resume=resume,
            progress=progress,
            on_epoch=on_epoch,
            extra_meta={"T": T, "alpha": alpha, "loss": kind, **source},
            teacher=teacher if alpha > 0 else None,
            teacher_test_logits=test_logits,
        )
        result.teacher_test_acc = None if teacher_acc is None else float(teacher_acc)
        return result


def recorded_recipe(path: Path) -> tuple[dict, str, DumpSettings | None]:
    """The recipe a checkpoint or a cache recorded, a note naming the command that repeats it, and
    for a cache the dump's own settings (None for a checkpoint)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise KDCacheError(f"{path}: no such file: pass a checkpoint (.pt) or a cache (.h5) written by kdcache")
    if h5py.is_hdf5(path):
        import json

        with cache_io.open_cache(path) as c:
            attrs = c.attrs
            recipe = json.loads(attrs["recipe"]) if "recipe" in attrs else None
            dump = DumpSettings.recorded(attrs)
        members = json.loads(attrs.get("ensemble_members") or "[]")
        teachers = " ".join(f"--teacher {m['path']}" for m in members) or "--teacher TEACHER.pt"  # checked when opened
        note = (
            f"the recipe recorded in {path}\nrepeat: kdcache dump-logits --config FILE {teachers}"
            f" --precision {attrs.get('precision', 'fp32')}"
            "\n(a student from this cache: kdcache student --config FILE --cache CACHE)"
        )
    else:
        meta = read_checkpoint(path)
        recipe, dump = meta.get("recipe"), None
        command = "teacher" if meta.get("role") == "teacher" else "student --cache CACHE"
        note = f"the recipe recorded in {path}\nrepeat: kdcache {command} --config FILE"
    if not recipe:
        raise KDCacheError(
            f"{path} records no recipe (an imported teacher, or a file from an older kdcache): nothing to repeat"
        )
    return recipe, note, dump
