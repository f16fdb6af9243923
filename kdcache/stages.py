"""The teacher and student stages: data + model + batch plan + loss, handed to `train.fit`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcache import cache as cache_io
from kdcache.artifacts import claim_output, metrics_path, write_metrics
from kdcache.config import Recipe, validate
from kdcache.data import Dataset, load_dataset
from kdcache.errors import KDCacheError
from kdcache.losses import kd_loss
from kdcache.models import build, num_params, save_checkpoint
from kdcache.train import (
    Plan,
    Progress,
    NoProgress,
    Diverged,
    Runtime,
    ViewBatches,
    build_optimizer,
    fit,
    load_resume,
    resume_path,
    save_resume,
)
from kdcache.views import STREAM_TRAIN, view_params, view_schedule


@dataclass
class StageResult:
    out: Path
    arch: str
    params: int
    history: list[dict]
    train_time_s: float

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
) -> StageResult:
    """Shared by both stages: seed, build, (resume), fit with per-epoch state, checkpoint."""
    progress = progress or NoProgress()
    torch.manual_seed(recipe.seed)
    raw = build(arch, data.num_classes)
    model = rt.prepare(raw)
    optimizer, scheduler = build_optimizer(
        raw, optimizer=recipe.optimizer, lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay, epochs=epochs, schedule=recipe.schedule,
        warmup_epochs=recipe.warmup_epochs, nesterov=recipe.nesterov,
    )  # fmt: skip
    identity = {"role": role, "arch": arch, "fingerprint": data.fingerprint, "epochs": epochs,
                "recipe": {k: repr(v) for k, v in dataclasses.asdict(dataclasses.replace(recipe, subset=None)).items()},
                **{k: str(v) for k, v in extra_meta.items()}}  # fmt: skip
    state_file, log_file = resume_path(out), metrics_path(out)
    start, history = 0, []
    if resume:
        start, history = load_resume(state_file, model=raw, optimizer=optimizer, scheduler=scheduler, identity=identity)
    extra = f" · T={extra_meta['T']:g} alpha={extra_meta['alpha']:g}" if "alpha" in extra_meta else ""
    progress.note(
        f"{role} {arch} ({num_params(raw):,} parameters) on {len(data.train_y):,} {data.name} images{extra} · "
        f"{rt.describe()}" + (f" · resuming after epoch {start}" if resume else "")
    )

    def after_epoch(epoch: int, metrics: dict) -> None:
        metrics["elapsed_s"] = (history[-1]["elapsed_s"] if history else 0.0) + metrics["train_time_s"]
        history.append(metrics)
        save_resume(state_file, model=raw, optimizer=optimizer, scheduler=scheduler,
                    epochs_done=epoch + 1, history=history, identity=identity)  # fmt: skip
        write_metrics(log_file, history)  # after the state: a logged epoch is always resumable
        if on_epoch:
            on_epoch(metrics)

    try:
        fit(model, batches, loss_fn, optimizer, scheduler, rt, epochs=epochs, start_epoch=start,
            test=(data.test_x, data.test_y), on_epoch=after_epoch, progress=progress)  # fmt: skip
    except Diverged as e:
        kept = f"the state after epoch {e.epoch - 1} is kept in {state_file}" if e.epoch > 1 else "nothing was kept"
        raise KDCacheError(f"{e}; {kept}: try a lower --lr, then run again with --force") from None
    train_time = sum(m["train_time_s"] for m in history)
    save_checkpoint(
        out, raw, arch=arch,
        meta={
            "role": role, "num_classes": data.num_classes, "dataset": data.name,
            "dataset_fingerprint": data.fingerprint, "num_train": len(data.train_y),
            "normalize_mean": list(batches.mean), "normalize_std": list(batches.std),
            "classes": data.classes, "params": num_params(raw),
            "metrics": {"test_acc": history[-1]["test_acc"], "epochs": epochs, "train_time_s": train_time},
            "recipe": dataclasses.asdict(recipe), **extra_meta,
        },
    )  # fmt: skip
    state_file.unlink(missing_ok=True)
    return StageResult(out, arch, num_params(raw), history, train_time)


def fresh_views_plan(n: int, seed: int, augment: bool, device) -> Plan:
    """Teacher training: a new deterministic crop+flip of every image each epoch."""
    idx = torch.arange(n)

    def plan(epoch: int):
        return view_params(seed, idx, [epoch], augment=augment, stream=STREAM_TRAIN)[:, 0].to(device), None

    return plan


def cached_plan(params: torch.Tensor, logits: torch.Tensor, seed: int) -> Plan:
    """Student training: each sample's scheduled cached view [N,K,3] and its teacher logits [N,K,C]."""
    n, k = params.shape[:2]
    rows = torch.arange(n, device=params.device)

    def plan(epoch: int):
        v = view_schedule(seed, n, k, epoch).to(params.device)
        return params[rows, v], logits[rows, v]

    return plan


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
) -> StageResult:
    """Train `recipe.teacher_arch` with cross-entropy on fresh crop+flip views every epoch."""
    validate(recipe)
    with claim_output(out, force=force, resume=resume, interrupted=resume_path(out)) as out:
        data = load_dataset(recipe.dataset, data_dir, recipe.subset)
        plan = fresh_views_plan(len(data.train_y), recipe.seed, recipe.augment, rt.device)
        batches = ViewBatches(data.train_x.to(rt.device), data.train_y.to(rt.device), plan,
                              recipe.batch_size, recipe.seed, recipe.mean, recipe.std, drop_last=rt.compile)  # fmt: skip
        return _train_and_save(
            role="teacher", arch=recipe.teacher_arch, data=data, recipe=recipe, epochs=recipe.teacher_recipe_epochs,
            batches=batches, loss_fn=lambda s, y, t: kd_loss(s, y, None, T=1.0, alpha=0.0), rt=rt, out=out,
            resume=resume, extra_meta={}, progress=progress, on_epoch=on_epoch,
        )  # fmt: skip


def train_student(
    recipe: Recipe,
    *,
    cache_file: str | Path,
    data_dir: str | Path,
    out: str | Path,
    rt: Runtime,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch=None,
) -> StageResult:
    """Train `recipe.student_arch` on the cached views, against the cached soft targets.

    Each epoch every sample shows one of its K cached views (each view once per K
    epochs), rendered exactly as the dump rendered it; alpha = 0 ignores the logits.
    """
    validate(recipe)
    with claim_output(out, force=force, resume=resume, interrupted=resume_path(out)) as out:
        with cache_io.open_cache(cache_file) as cache:
            attrs = cache.attrs
            subset = recipe.subset if recipe.subset is not None else attrs.get("subset")
            data = load_dataset(attrs["dataset"], data_dir, subset)
            cache_io.check_matches(cache, data.fingerprint, data.num_classes)
            logits, params, labels = cache.tensors(rt.device)
        if not torch.equal(labels.cpu(), data.train_y):
            raise KDCacheError(f"{cache_file}: labels differ from the data's: dump the cache again")
        plan = cached_plan(params, logits, recipe.seed)
        k = params.shape[1]
        mean, std = tuple(attrs["normalize_mean"]), tuple(attrs["normalize_std"])
        # The views and normalisation are the cache's, whatever the preset said: record those.
        recipe = dataclasses.replace(recipe, views=k, augment=bool(attrs["augment"]), mean=mean, std=std)
        batches = ViewBatches(data.train_x.to(rt.device), data.train_y.to(rt.device), plan,
                              recipe.batch_size, recipe.seed, mean, std, drop_last=rt.compile)  # fmt: skip
        T, alpha = recipe.T, recipe.alpha
        return _train_and_save(
            role="student", arch=recipe.student_arch, data=data, recipe=recipe, epochs=recipe.epochs,
            batches=batches, loss_fn=lambda s, y, t: kd_loss(s, y, t, T=T, alpha=alpha), rt=rt, out=out,
            resume=resume, progress=progress, on_epoch=on_epoch,
            extra_meta={"T": T, "alpha": alpha, "cache_teacher_sha256": attrs["teacher_sha256"],
                        "cache_num_views": k, "cache_seed": attrs["seed"], "cache_augment": attrs["augment"],
                        "teacher_arch": attrs["teacher_arch"]},
        )  # fmt: skip
