"""`kdcache pipeline`: teacher -> dump-logits -> student with KD -> the same student alone.

All four artifacts go into one run directory, beside the report that compares them.
With --resume, finished stages are kept and an interrupted one continues.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from kdcache import cache as cache_io
from kdcache import tblog
from kdcache.artifacts import atomic_write, check_writable, metrics_of, metrics_path, output_lock, refuse_different
from kdcache.checkpoints import check_arch, file_sha256, read_checkpoint
from kdcache.config import DumpSettings, Recipe
from kdcache.dump import dump_logits
from kdcache.errors import KDCacheError
from kdcache.imports import ensemble_sha256
from kdcache.report import MODELS, ONLINE, REPORT_FILES, write_report
from kdcache.runtime import Progress, Runtime
from kdcache.stages import train_student, train_teacher
from kdcache.train import resume_path

TEACHER, CACHE, STUDENT_KD, STUDENT_ALONE = "teacher.pt", "teacher_logits.h5", "student_kd.pt", "student_alone.pt"

STUDENT_ONLINE = "student_online.pt"


def member_name(i: int) -> str:
    """An ensemble's i-th teacher (1-based) in a run directory: teacher.pt, teacher_2.pt, ..."""
    return TEACHER if i == 1 else f"teacher_{i}.pt"


def dump_batch_size(recipe: Recipe) -> int:
    """The pipeline's dump batch unless a [dump] table sets one: inference needs no gradients, so at
    least 256 images, and never fewer than the recipe trains with."""
    return max(256, recipe.batch_size)


def _done(path: Path, expect: dict) -> bool:
    """Is `path` a finished artifact of *this* run? A complete file made with other settings is refused.

    Partials live under other names, so a file at the final name is complete; `expect`
    holds what it must have been made with (compared with its recorded metadata and,
    for checkpoints, the recipe they recorded).
    """
    if not path.exists():
        return False
    if path.suffix == ".h5":
        with cache_io.open_cache(path) as cache:  # raises if it cannot be trusted
            got = cache_io.identity(cache.attrs)  # what names a dump; an older cache's missing ones as they mean
    else:
        record = read_checkpoint(path)
        recorded = Recipe.from_dict(record.get("recipe", {}))  # fields added since: defaults
        # a teacher records the whole recipe: what it trained with is the teacher stage's own settings
        recorded = dataclasses.asdict(recorded.for_teacher() if record.get("role") == "teacher" else recorded)
        got = {**recorded, **record, "epochs": record["metrics"]["epochs"]}
    refuse_different(
        path,
        got,
        expect,
        made="was made with",
        asked="this run asks for",
        fix="pass --force to redo the run, or choose another --out",
    )
    return True


def _refuse_other_teacher(teacher: Path, paths: dict[str, Path], resume: bool) -> None:
    """`--teacher B` on a run that holds another teacher replaces it only with --force; a resumed run
    keeps its teacher, or its cache and students would match no teacher. A run that lost its teacher
    is resumed with B only if its cache was dumped from B."""
    if os.path.lexists(paths[TEACHER]):
        raise KDCacheError(
            f"{paths[TEACHER]} is another teacher than {teacher}: pass --force to redo the run with {teacher.name}, "
            f"or {'leave --teacher out to resume the run' if resume else 'choose another --out'}"
        )
    if resume and paths[CACHE].exists():
        _done(paths[CACHE], {"teacher_sha256": file_sha256(teacher)})


def _copy_teacher(teacher: Path, into: Path) -> None:
    """Copy the reused teacher, and its metrics (or none: never the run's old ones), into the run."""
    with output_lock(into):
        with open(teacher, "rb") as src:
            atomic_write(into, lambda f: shutil.copyfileobj(src, f))
        if (metrics := metrics_of(teacher)).is_file():
            with open(metrics, "rb") as src:
                atomic_write(metrics_path(into), lambda f: shutil.copyfileobj(src, f))
        else:
            metrics_path(into).unlink(missing_ok=True)


def _image_size(data_options: dict | None) -> dict:
    """An image folder's view size, which a kept teacher must share with this run."""
    from kdcache.folders import DEFAULT_IMAGE_SIZE

    return {"image_size": data_options.get("image_size") or DEFAULT_IMAGE_SIZE} if data_options else {}


def _training(recipe: Recipe) -> dict:
    """The optimisation settings a finished stage must share with this run to be kept."""
    keys = (
        "optimizer",
        "lr",
        "momentum",
        "nesterov",
        "weight_decay",
        "schedule",
        "warmup_epochs",
        "batch_size",
        "seed",
    )
    return {k: getattr(recipe, k) for k in keys}


def run_pipeline(
    recipe: Recipe,
    *,
    preset: str,
    run_dir: str | Path,
    data_dir: str | Path,
    rt: Runtime,
    teacher: str | Path | None = None,
    with_online: bool = False,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda msg: None,
    on_epoch=None,
    data_options: dict | None = None,
    trust_arch: bool = False,
    teachers: int = 1,
    tensorboard: str | Path | None = None,
    dump: DumpSettings | None = None,
) -> dict:
    """Run every stage not already done; write and return the report.

    `dump`: the dump stage's own settings (a config file's [dump] table: --tta, --topk, ...); None: the
    exact view's dense logits, in batches of `dump_batch_size(recipe)`.

    `teachers` N > 1: train N teachers (seeds seed, seed + 1, ...; teacher.pt, teacher_2.pt, ...) and
    cache their ensemble (the log of their mean softmax), which the students then distil.

    `teacher`: reuse this checkpoint (copied into the run, with its metrics) instead
    of training one, so several student recipes can share one teacher. `with_online`: also
    train the KD student with the teacher in the loop on fresh views of the same family
    (no cache), the equal-budget comparison of cached and online distillation. `trust_arch`: the
    reused `teacher` may be a module:factory architecture (see `load_checkpoint`). `tensorboard`: also
    write every training stage's `on_epoch` metrics as TensorBoard scalars, in a subfolder of this
    folder named after the stage's report row (teacher, student_alone, ...).
    """
    if teachers < 1:
        raise KDCacheError(f"--teachers must be >= 1 (got {teachers})")
    if teachers > 1 and (teacher is not None or with_online):
        flag = "--teacher" if teacher is not None else "--with-online"
        raise KDCacheError(f"--teachers {teachers} trains an ensemble; {flag} takes one teacher: drop one of the two")
    tblog.check(tensorboard)
    trusted = trust_arch or teacher is None  # a teacher this run trains, or keeps, is --teacher-arch's
    run_dir = Path(run_dir)
    members = [TEACHER] + [member_name(i) for i in range(2, teachers + 1)]
    paths = {name: run_dir / name for name in (*members, CACHE, STUDENT_KD, STUDENT_ALONE, STUDENT_ONLINE)}
    rows = {name: label for label, name in (*MODELS, ONLINE)}  # the report's row names: --tensorboard's subfolders
    rows.update({member_name(i): f"teacher {i}" for i in range(2, teachers + 1)})
    same_teacher = False
    if teacher is not None:  # checked before anything is written: a bad file, or another teacher than the run's
        check_arch(teacher, read_checkpoint(teacher)["arch"], trust_arch=trust_arch)
        same_teacher = paths[TEACHER].is_file() and file_sha256(teacher) == file_sha256(paths[TEACHER])
        if not (same_teacher or force):
            _refuse_other_teacher(Path(teacher), paths, resume)
    check_writable(run_dir, "choose another --out")
    left = [*paths.values(), *(run_dir / name for name in REPORT_FILES)]
    existing = [p for p in left if os.path.lexists(p) or resume_path(p).exists() or cache_io.partial_path(p).exists()]
    if same_teacher:
        existing.remove(paths[TEACHER])  # the very teacher this run reuses
    if existing and not (force or resume):
        raise KDCacheError(f"{run_dir} already holds a run: pass --resume to continue it, or --force to redo it")
    log(f"pipeline preset {preset} -> {run_dir} · {rt.describe()}")
    t0 = time.perf_counter()

    def stage(name: str, title: str, run, expect: dict) -> None:
        path = paths[name]
        if resume and _done(path, expect):
            log(f"{title}: kept {path}")
            return
        interrupted = resume and (resume_path(path).exists() or cache_io.partial_path(path).exists())
        log(f"{title}: {'resuming' if interrupted else 'running'} -> {path}")
        kw = {"force": force or (resume and not interrupted), "resume": interrupted}
        if name == CACHE:  # a dump has no epochs
            run(path, kw)
            return
        log_dir = None if tensorboard is None else Path(tensorboard) / tblog.run_name(rows[name])
        with tblog.epoch_scalars(log_dir, on_epoch) as stage_epoch:  # closed when the stage ends, or fails
            run(path, {**kw, "on_epoch": stage_epoch})

    if teacher is not None:
        if not same_teacher:
            _copy_teacher(Path(teacher), paths[TEACHER])
        log(f"teacher: reusing {teacher}")
    else:
        for i, name in enumerate(members):
            own = dataclasses.replace(recipe, seed=recipe.seed + i)  # members differ by their seed alone
            taught = own.for_teacher()
            stage(
                name,
                "teacher" if teachers == 1 else f"teacher {i + 1} of {teachers} (seed {own.seed})",
                lambda out, kw, own=own: train_teacher(
                    own, data_dir=data_dir, out=out, rt=rt, progress=progress, data_options=data_options, **kw
                ),
                expect={
                    "arch": taught.teacher_arch,
                    "epochs": taught.epochs,
                    "augment": taught.augment,
                    "dataset": recipe.dataset,
                    **_image_size(data_options),
                    "mix": taught.mix,
                    "mix_prob": taught.mix_prob,
                    **_training(taught),
                },
            )

    def teacher_sha() -> str:  # the teacher may only exist later
        shas = [file_sha256(paths[name]) for name in members]
        return shas[0] if teachers == 1 else ensemble_sha256(shas)

    dump = dump or DumpSettings(batch_size=dump_batch_size(recipe))
    own = dump.dump_args()
    stage(
        CACHE,
        "dump-logits" if teachers == 1 else f"dump-logits (ensemble of {teachers})",
        lambda out, kw: dump_logits(
            teacher_path=paths[TEACHER] if teachers == 1 else [paths[name] for name in members],
            data_dir=data_dir,
            out=out,
            views=recipe.views,
            seed=recipe.seed,
            rt=rt,
            subset=recipe.subset,
            augment=recipe.augment,
            mix=recipe.mix,
            mix_prob=recipe.mix_prob,
            progress=progress,
            trust_arch=trusted,
            **own,
            **kw,
        ),
        expect={
            "teacher_sha256": teacher_sha(),
            "num_views": recipe.views,
            "seed": recipe.seed,
            "augment": recipe.augment,
            "mix": recipe.mix,
            "mix_prob": recipe.mix_prob,
            "tta": dump.tta,
            "topk": dump.topk,
            # an explicit grid is compared; the default one follows from the teacher, compared above
            **({"lse_temperatures": sorted(set(dump.topk_temperatures))} if dump.topk_temperatures else {}),
        },
    )
    for name, title, student in (
        (STUDENT_KD, f"student with KD (T={recipe.T:g}, alpha={recipe.alpha:g})", recipe),
        (STUDENT_ALONE, "student alone (alpha=0, same views, seed and budget)", dataclasses.replace(recipe, alpha=0.0)),
    ):
        stage(
            name,
            title,
            lambda out, kw, student=student: train_student(
                student, cache_file=paths[CACHE], data_dir=data_dir, out=out, rt=rt, progress=progress, **kw
            ),
            expect={
                "arch": student.student_arch,
                "epochs": student.epochs,
                "T": student.T,
                "alpha": student.alpha,
                "loss": student.loss,
                "cache_teacher_sha256": teacher_sha(),
                **_training(student),
            },
        )
    online_expect = {
        "arch": recipe.student_arch,
        "epochs": recipe.epochs,
        "T": recipe.T,
        "alpha": recipe.alpha,
        "loss": recipe.loss,
        "online_teacher_sha256": teacher_sha(),
        **_training(recipe),
    }
    if with_online:
        stage(
            STUDENT_ONLINE,
            f"student with online KD (teacher in the loop, T={recipe.T:g}, alpha={recipe.alpha:g})",
            lambda out, kw: train_student(
                recipe,
                cache_file=None,
                online_teacher=paths[TEACHER],
                data_dir=data_dir,
                out=out,
                rt=rt,
                progress=progress,
                trust_arch=trusted,
                **kw,
            ),
            expect=online_expect,
        )
    elif paths[STUDENT_ONLINE].exists():  # from an earlier --with-online run: never report it stale
        if force:
            for stale in (paths[STUDENT_ONLINE], metrics_of(paths[STUDENT_ONLINE])):
                stale.unlink(missing_ok=True)
        else:
            _done(paths[STUDENT_ONLINE], online_expect)  # refuses one made with other settings
    return write_report(
        run_dir,
        extra={
            "preset": preset,
            "recipe": dataclasses.asdict(recipe),
            "dump": dataclasses.asdict(dump),
            "runtime": rt.describe(),
            "pipeline_wall_s": time.perf_counter() - t0,
        },
    )
