"""Many students from one cache in one pass: `kdcache sweep`.

A grid over the settings that move distillation most (temperature, alpha, loss, architecture), each
for several seeds, always with the student alone (alpha 0) on the same views and the design card's
setting (T=3, alpha 0.5, kd). The data, the cache and the test set are loaded once; for each seed every
batch is rendered once and every student of that seed takes its step on it (a seed fixes a student's
initial weights and its batch order, so students of one seed are paired: they see the very same
batches). A held-out, recorded part of the training images (`--val-fraction`) picks the winner, so
the test accuracy reported for it is not optimistic.

Backends: `loop` (students one after another on each batch: any mix of architectures; on a CPU each
student ends bit for bit as `kdcache student` with the same settings) and `stacked` (the students of
one architecture fused into one vmapped model, `stacked.Stacked`); `auto` times both on a few batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.artifacts import atomic_write_text, claim_output, refuse_different
from kdcache.batches import RowsOf
from kdcache.checkpoints import atomic_torch_save, save_checkpoint
from kdcache.config import Recipe
from kdcache.errors import KDCacheError
from kdcache.losses import LOSSES
from kdcache.models import check_spec, num_params
from kdcache.runtime import NoProgress, Progress, Runtime
from kdcache.stages import (
    CachedData,
    cache_fixes,
    cache_source,
    cached_plan,
    check_served,
    checkpoint_meta,
    load_cached,
    new_model,
    new_optimizer,
    student_loss_fn,
    view_batches,
)
from kdcache.train import Member, WeightAverage, fit
from kdcache.views import hash_u64

DESIGN_CARD = {"T": 3.0, "alpha": 0.5, "loss": "kd"}  # the setting the method is known by, always reported
BACKENDS = ("auto", "loop", "stacked")
KEEP = ("best", "all")
STREAM_VAL = 6  # views.STREAM_*: the draw that holds images out for validation
RECORD, STATE, REPORT, PLOT, BEST, STUDENTS = (
    "sweep.json",
    "sweep.resume",
    "report.md",
    "sweep.png",
    "best.pt",
    "students",
)


# ---- what to train -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the table: an architecture and its distillation setting (alpha 0: the student alone)."""

    arch: str
    T: float
    alpha: float
    loss: str

    @property
    def alone(self) -> bool:
        return self.alpha == 0

    @property
    def label(self) -> str:
        return "alone" if self.alone else f"{self.loss} T={self.T:g} alpha={self.alpha:g}"

    @property
    def key(self) -> str:
        return f"{self.arch} · {self.label}"

    def is_design_card(self) -> bool:
        return not self.alone and (self.T, self.alpha, self.loss) == tuple(DESIGN_CARD.values())


@dataclass(frozen=True)
class SweepSpec:
    """The grid: every (arch, seed) gets the student alone, every T x alpha x loss with alpha > 0, and the
    design card's setting; `val_fraction` of the cache's images is held out to pick the winner on."""

    T: tuple[float, ...] = (1.0, 2.0, 4.0)
    alpha: tuple[float, ...] = (0.5, 0.9)
    loss: tuple[str, ...] = ("kd",)
    seeds: tuple[int, ...] = (0, 1, 2)
    arch: tuple[str, ...] = ()  # () : the recipe's student
    val_fraction: float = 0.1
    backend: str = "auto"
    keep: str = "best"

    def __post_init__(self) -> None:
        for name in ("T", "alpha", "loss", "seeds", "arch"):
            values = getattr(self, name)
            flag = "--seeds" if name == "seeds" else f"--{name}"
            if name != "arch" and not values:
                raise KDCacheError(f"{flag} is empty: give at least one value")
            if len(set(values)) != len(values):
                dup = next(v for v in values if list(values).count(v) > 1)
                raise KDCacheError(f"{flag} names {dup} twice: give each value once")
        if (bad := next((t for t in self.T if not (math.isfinite(t) and t > 0)), None)) is not None:
            raise KDCacheError(f"--T {bad:g} is not a temperature: give values > 0, e.g. --T 1,2,4")
        if (bad := next((a for a in self.alpha if not 0 <= a <= 1), None)) is not None:
            raise KDCacheError(f"--alpha {bad:g} is outside [0, 1]: e.g. --alpha 0.5,0.9")
        if bad := next((k for k in self.loss if k not in LOSSES), None):
            raise KDCacheError(f"--loss {bad!r} is not a loss: choose from {', '.join(LOSSES)}")
        if (bad := next((s for s in self.seeds if s < 0), None)) is not None:
            raise KDCacheError(f"--seeds {bad} is negative: seeds are integers >= 0")
        for a in self.arch:
            check_spec(a)
        if not 0 <= self.val_fraction < 1:
            raise KDCacheError(
                f"--val-fraction {self.val_fraction:g} is outside [0, 1): e.g. 0.1, or 0 to pick on test"
            )
        if self.backend not in BACKENDS:
            raise KDCacheError(f"--backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.keep not in KEEP:
            raise KDCacheError(f"--keep {self.keep!r}: choose best (the winner only) or all")

    def settings(self, default_arch: str) -> list[Setting]:
        """Every row, per architecture: alone first, then the grid, then the design card if the grid lacks it."""
        rows = []
        for arch in self.arch or (default_arch,):
            grid = [Setting(arch, 0.0, 0.0, "kd")]
            for T, alpha, loss in itertools.product(self.T, self.alpha, self.loss):
                if alpha > 0:
                    grid.append(Setting(arch, T, alpha, loss))
            card = Setting(arch, **DESIGN_CARD)
            rows += grid + ([card] if card not in grid else [])
        return rows


def parse_list(flag: str, text: str, kind=float) -> tuple:
    """'1,2,4' -> (1.0, 2.0, 4.0); one line naming the flag for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise KDCacheError(f"{flag} is empty: give a comma list, e.g. {flag} 1,2")
    if "" in parts[:-1] or (parts[-1] == "" and len(parts) == 1):
        raise KDCacheError(f"{flag} {text!r} has an empty item: give a comma list such as 1,2")
    try:
        return tuple(kind(p) for p in parts if p)
    except ValueError:
        raise KDCacheError(f"{flag} {text!r} is not a comma list of {kind.__name__} values") from None


def parse_seeds(text: str) -> tuple[int, ...]:
    """'3' -> seeds 0, 1, 2 (a count); '0,1,2' or '5,' (a list); '3-5' (a range)."""
    text = str(text).strip()
    try:
        if "," in text:
            return parse_list("--seeds", text, int)
        if "-" in text[1:]:
            lo, hi = (int(v) for v in text.split("-", 1))
            if hi < lo:
                raise KDCacheError(f"--seeds {text}: a range runs low-high, e.g. 3-5")
            return tuple(range(lo, hi + 1))
        count = int(text)
    except ValueError:
        raise KDCacheError(f"--seeds {text!r}: give a count (3), a list (0,1,2) or a range (3-5)") from None
    if count < 1:
        raise KDCacheError(
            f"--seeds {count} is a count of seeds: give at least 1 (--seeds 1 is seed 0; one other seed: --seeds 5,)"
        )
    return tuple(range(count))


# ---- the held-out images -------------------------------------------------------------------------


def val_rows(n: int, fraction: float) -> np.ndarray:
    """The rows held out for validation: the round(fraction * n) rows with the smallest hash of their
    index in the validation stream, ascending. A pure function of (n, fraction): recorded, repeatable."""
    count = round(fraction * n)
    if fraction == 0:
        return np.zeros(0, dtype=np.int64)
    if not 1 <= count < n:
        raise KDCacheError(
            f"--val-fraction {fraction:g} of {n:,} images holds out {count}: leave at least one image each to "
            "train and to pick on, or pass --val-fraction 0"
        )
    keys = hash_u64(0, STREAM_VAL, np.arange(n))
    return np.sort(np.argsort(keys, kind="stable")[:count]).astype(np.int64)


def _held_out(cached: CachedData, rows: np.ndarray, cache_file) -> tuple[CachedData, tuple]:
    """The cache and data without `rows` (what every student trains on) and the rows' plain images and
    labels (what picks the winner)."""
    if len(rows) == 0:
        return cached, None
    if cached.mix != "none":
        raise KDCacheError(
            f"{cache_file} holds mixed views (each blends two images), so no held-out image stays unseen: "
            "pass --val-fraction 0 (the pick is then on test, and said to be optimistic) or use a cache "
            "dumped with --mix none"
        )
    data = cached.data
    keep = torch.from_numpy(np.setdiff1d(np.arange(len(data.train_y)), rows))
    held = torch.from_numpy(rows)
    if isinstance(data.train_x, torch.Tensor):
        train_x, val_x = data.train_x[keep], data.train_x[held]
    else:  # a host store (an image folder's): train from the kept rows as lazily; the held-out ones in memory
        train_x, val_x = RowsOf(data.train_x, keep.numpy()), torch.from_numpy(np.asarray(data.train_x[rows]))
    train = dataclasses.replace(data, train_x=train_x, train_y=data.train_y[keep])
    kept = dataclasses.replace(cached, data=train, views=cached.views[keep], targets=cached.targets[keep])
    return kept, (val_x, data.train_y[held])


# ---- statistics ----------------------------------------------------------------------------------

# Student's t, two-sided 95%: the quantile for n - 1 degrees of freedom (1..30; beyond, 1.96 + 2.4 / df)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def summary(values: list[float]) -> dict:
    """mean, sample std, n and the 95% interval of the mean (Student's t); one value: no spread."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(values)
    df = n - 1
    half = (_T95[df - 1] if df <= len(_T95) else 1.96 + 2.4 / df) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def table(students: list[dict], pick_on: str) -> list[dict]:
    """One row per setting: val and test accuracy over seeds, the paired difference to the student alone
    (same architecture, same seed), agreement and KL with the teacher, time; diverged students left out."""
    by_key: dict[str, list[dict]] = {}
    for s in students:
        by_key.setdefault(s["setting"]["key"], []).append(s)
    alone = {(s["setting"]["arch"], s["seed"]): s for s in students if s["setting"]["alpha"] == 0 and s["final"]}
    rows = []
    for key, group in by_key.items():
        done = [s for s in group if s["final"]]
        setting = group[0]["setting"]
        metric = f"{pick_on}_acc"
        pairs = [
            s["final"][metric] - alone[(setting["arch"], s["seed"])]["final"][metric]
            for s in done
            if (setting["arch"], s["seed"]) in alone
        ]
        test_pairs = [
            s["final"]["test_acc"] - alone[(setting["arch"], s["seed"])]["final"]["test_acc"]
            for s in done
            if (setting["arch"], s["seed"]) in alone
        ]
        row = {
            "key": key,
            "setting": setting,
            "seeds": [s["seed"] for s in done],
            "diverged": [s["seed"] for s in group if s.get("diverged")],
            "val": summary([s["final"]["val_acc"] for s in done if "val_acc" in s["final"]]),
            "test": summary([s["final"]["test_acc"] for s in done]),
            "gain": summary(pairs),  # on the pick's split
            "test_gain": summary(test_pairs),
            "agreement": summary([s["final"]["teacher_agreement"] for s in done if "teacher_agreement" in s["final"]]),
            "kl": summary([s["final"]["teacher_kl"] for s in done if "teacher_kl" in s["final"]]),
            "step_time_s": summary([s["step_time_s"] for s in done]),
        }
        ci = row["gain"]["ci95"]
        row["within_noise"] = None if ci is None or setting["alpha"] == 0 else ci[0] <= 0 <= ci[1]
        rows.append(row)
    return rows


def pick(rows: list[dict], pick_on: str) -> dict | None:
    """The row with the highest mean accuracy on `pick_on` ('val' or 'test'), among those with a value."""
    scored = [r for r in rows if r[pick_on]["mean"] is not None]
    complete = [r for r in scored if not r["diverged"]]  # a setting judged on every seed, not its survivors
    return max(complete or scored, key=lambda r: r[pick_on]["mean"]) if scored else None


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    out: Path
    record: dict

    @property
    def rows(self) -> list[dict]:
        return self.record["table"]

    @property
    def winner(self) -> dict | None:
        return next((r for r in self.rows if r["key"] == self.record["pick"]["key"]), None)


def _students(spec: SweepSpec, base: Recipe) -> list[tuple[Setting, int]]:
    """(setting, seed) for every student, seed-major: the students of a seed train together."""
    return [(s, seed) for seed in spec.seeds for s in spec.settings(base.student_arch)]


def _recipe_of(base: Recipe, setting: Setting, seed: int) -> Recipe:
    return dataclasses.replace(
        base,
        student_arch=setting.arch,
        T=setting.T if not setting.alone else base.T,
        alpha=setting.alpha,
        loss=setting.loss if not setting.alone else base.loss,
        seed=seed,
    )


def _check_disk(out: Path, spec: SweepSpec, base: Recipe, data, n_students: int) -> None:
    """Every student's checkpoint is written as its seed finishes (the winner's is kept, or all with
    --keep all), and the resume state after every epoch: one seed's students with their optimiser
    moments and weight average (4 copies of the weights at most), twice while a new state replaces
    the old. Refuse up front when the folder's disk cannot hold them."""
    per = max(num_params(new_model(a, data, 0, _NoBatches())) for a in spec.arch or (base.student_arch,)) * 4
    per_seed = n_students // len(spec.seeds)
    need = int(per * (n_students + 2 * 4 * per_seed) * 1.1)
    free = shutil.disk_usage(out).free
    if free < need:
        raise KDCacheError(
            f"{out} has {free / 1e6:,.0f} MB free, the sweep's {n_students} student checkpoints and its resume "
            f"state need about {need / 1e6:,.0f} MB: free space, choose another --out, or sweep fewer students"
        )


class _NoBatches:  # new_model's normalisation for a data-initialised architecture when only sizes matter
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def run_sweep(
    base: Recipe,
    spec: SweepSpec,
    *,
    cache_file: str | Path,
    data_dir: str | Path | None,
    out: str | Path,
    rt: Runtime,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
    rebuild_store: bool = False,
    command: str | None = None,
) -> SweepResult:
    """Train the sweep's students from `cache_file` into the folder `out` (see the module's docstring):
    `out/sweep.json` (the spec, every student's history and final metrics, the table, the pick),
    `out/report.md`, `out/sweep.png`, `out/best.pt` (the winner, a student checkpoint that records the
    sweep) and, with keep 'all', every student under `out/students/`. `--resume` continues a killed
    sweep from its last finished epoch."""
    progress = progress or NoProgress()
    out = Path(out)
    if rt.world > 1:
        raise KDCacheError("kdcache sweep runs in one process: start it without torchrun")
    t_start = time.perf_counter()
    students = _students(spec, base)
    claim = claim_output(
        out / RECORD, force=force, resume=resume, interrupted=out / STATE, sides=(out / REPORT, out / PLOT, out / BEST)
    )
    with claim:
        if (out / STUDENTS).exists() and not resume:
            if not force:
                raise KDCacheError(
                    f"{out / STUDENTS} already exists: pass --force to overwrite it, or choose another --out"
                )
            for f in (out / STUDENTS).glob("*-s[0-9]*.pt"):  # the checkpoints a sweep writes, nothing else
                f.unlink()
        cached = load_cached(
            cache_file,
            data_dir=data_dir,
            rt=rt,
            batch_size=base.batch_size,
            seed=spec.seeds[0],
            subset=base.subset,
            progress=progress,
            rebuild_store=rebuild_store,
        )
        if callable(cached.targets):
            raise KDCacheError(
                f"{cache_file}'s targets are over the memory budget; a sweep holds them in memory: "
                "raise --resident-mb, or train students one by one with kdcache student"
            )
        base = cache_fixes(base, cached.attrs)  # the views and normalisation are the cache's, whatever was asked
        for setting, _ in students[: len(spec.settings(base.student_arch))]:
            check_served(_recipe_of(base, setting, 0), cached.attrs, cache_file)
        full = cached.data
        rows = val_rows(len(full.train_y), spec.val_fraction)
        train, val = _held_out(cached, rows, cache_file)
        _check_disk(out, spec, base, full, len(students))
        pick_on = "val" if val is not None else "test"
        identity = {
            "spec": {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(spec).items()
                if k not in ("backend", "keep")
            },
            "recipe": {
                k: repr(v) for k, v in dataclasses.asdict(base).items() if k not in ("T", "alpha", "loss", "seed")
            },
            "cache": cached.digest,
            "fingerprint": full.fingerprint,
        }
        # what every student trained on and was picked on: in the record and in each student's checkpoint
        held = {"train_images": len(train.data.train_y), "val_images": len(rows), "val_rows_sha256": _digest(rows)}
        state = _load_state(out / STATE, identity) if resume else {"identity": identity, "done": [], "current": None}
        if state.get("backend") and spec.backend != "auto":  # auto resumes with the backend it picked
            fix = f"resume with --backend {state['backend']} (or auto), or pass --force to start over"
            refuse_different(out / STATE, state, {"backend": spec.backend}, fix=fix)
        record = {
            "kind": "kdcache-sweep",
            "command": command,
            "cache": str(cache_file),
            "spec": identity["spec"] | {"backend": spec.backend, "keep": spec.keep},
            "recipe": dataclasses.asdict(base),
            "teacher_test_acc": cached.attrs.get("teacher_test_acc"),
            "data": {"dataset": full.name, **held, "test_images": len(full.test_y)},
            "pick_on": pick_on,
            "runtime": rt.describe(),
        }
        progress.note(
            f"sweep: {len(students)} students ({len(spec.settings(base.student_arch))} settings x "
            f"{len(spec.seeds)} seed{'s' if len(spec.seeds) > 1 else ''}) from {cache_file} · "
            f"{len(train.data.train_y):,} training images"
            + (f", {len(rows):,} held out to pick on" if len(rows) else " · no held-out images: the pick is on test")
            + f" · {rt.describe()}"
        )
        wall0 = state.get("wall_s", 0.0)  # a resumed sweep's time so far (what ran before its last saved epoch)
        state["clock"] = lambda: wall0 + time.perf_counter() - t_start
        for seed in spec.seeds:
            group = [(s, sd) for s, sd in students if sd == seed]
            if any(d["seed"] == seed for d in state["done"]):
                continue
            results = _train_seed(seed, group, base, spec, train, val, held, full, rt, out, state, progress, cached)
            state["done"] += results
            state["current"] = None
            _save_state(state, out / STATE)
        done = state["done"]
        record["students"] = done
        record["backend"] = state["backend"]
        record["table"] = table(done, pick_on)
        winner = pick(record["table"], pick_on)
        arch = winner["setting"]["arch"] if winner else base.student_arch
        rows_of = [r for r in record["table"] if r["setting"]["arch"] == arch]
        alone_row = next((r for r in rows_of if r["setting"]["alpha"] == 0), None)
        card = next((r for r in rows_of if Setting(**_fields(r["setting"])).is_design_card()), None)
        record["pick"] = {
            "key": winner and winner["key"],
            "on": pick_on,
            "optimistic": pick_on == "test",
            "design_card": card and card["key"],
            "alone": alone_row and alone_row["key"],
        }
        record["wall_s"] = state["clock"]()
        if winner is not None:
            best = _best_student(done, winner, pick_on)
            _write_best(out / STUDENTS / f"{best['name']}.pt", out / BEST, record["pick"])
            record["pick"]["checkpoint"] = {"path": str(out / BEST), "student": best["name"]}
        from kdcache.report import write_sweep_report

        atomic_write_text(out / RECORD, json.dumps(record, indent=1, default=_plain) + "\n")
        write_sweep_report(out, record)
        (out / STATE).unlink(missing_ok=True)
        if spec.keep == "best":  # only the files this sweep wrote
            for s in done:
                (out / STUDENTS / f"{s['name']}.pt").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (out / STUDENTS).rmdir()
        return SweepResult(out, record)


def _fields(setting: dict) -> dict:
    return {k: setting[k] for k in ("arch", "T", "alpha", "loss")}


def _write_best(src: Path, dst: Path, pick: dict) -> None:
    """The winner's checkpoint as `dst`, written atomically, recording how it was picked (on val, or on test:
    optimistic)."""
    record = torch.load(src, map_location="cpu", weights_only=True)
    record["sweep"] = dict(record.get("sweep", {})) | {
        "picked_on": pick["on"],
        "optimistic": pick["optimistic"],
        "winner": pick["key"],
    }
    atomic_torch_save(record, dst)


def _best_student(done: list[dict], winner: dict, pick_on: str) -> dict:
    """The winning setting's student with the best accuracy on the pick's split (the first seed on ties)."""
    key = "val_acc" if pick_on == "val" else "test_acc"
    return max((s for s in done if s["setting"]["key"] == winner["key"] and s["final"]), key=lambda s: s["final"][key])


def _digest(rows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def _plain(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v).__name__)


def _save_state(state: dict, path: Path) -> None:
    """The resume state, with the sweep's wall time so far (its clock stays in memory)."""
    atomic_torch_save({k: v for k, v in state.items() if k != "clock"} | {"wall_s": state["clock"]()}, path)


def _load_state(path: Path, identity: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDCacheError(f"{path} is unreadable ({type(e).__name__}): pass --force to start over") from None
    refuse_different(path, state["identity"], identity)
    return state


def _name(setting: Setting, seed: int) -> str:
    label = "alone" if setting.alone else f"{setting.loss}-T{setting.T:g}-a{setting.alpha:g}"
    return f"{setting.arch.replace(':', '_').replace('/', '_')}-{label}-s{seed}"


def _train_seed(seed, group, base, spec, train: CachedData, val, held: dict, full, rt, out, state, progress, cached):
    """Train every student of one seed on that seed's batches, one pass; save their checkpoints."""
    plan = cached_plan(train.views, train.targets, seed, rt.device)
    attrs = cached.attrs
    batches = view_batches(train.data, plan, base.batch_size, seed, attrs["normalize_mean"], attrs["normalize_std"], rt)
    recipes = [_recipe_of(base, s, sd) for s, sd in group]
    backend, members = _members(state.get("backend") or spec.backend, group, recipes, train.data, batches, rt, progress)
    state["backend"] = backend  # the probe runs once: every seed and a resumed run keep its answer
    n = len(group)
    histories: list[list[dict]] = [[] for _ in range(n)]
    diverged: dict[int, str] = {}
    start = 0
    current = state.get("current")
    if current and current["seed"] == seed:  # resume mid-seed
        start, histories, diverged = current["epochs_done"], current["histories"], current["diverged"]
        for m, s in zip(members, current["members"], strict=True):
            m.load_state_dict(s)
    progress.note(
        f"seed {seed}: {n} students on the same batches · backend {backend}"
        + (f" · resuming after epoch {start}" if start else "")
    )
    t0 = time.perf_counter()

    def on_epoch(epoch: int, results: list[dict | None]) -> None:
        for i, m in enumerate(results):
            if m is not None:
                histories[i].append(m)
        live = [(i, m) for i, m in enumerate(results) if m is not None]
        key = "val_acc" if val is not None else "test_acc"
        best_i, best = max(live, key=lambda im: im[1][key]) if live else (None, None)
        alone = [m[key] for i, m in live if group[i][0].alone]
        if best is not None:
            progress.note(
                f"seed {seed} epoch {epoch + 1:>3}/{base.epochs}  best {key.split('_')[0]} "
                f"{100 * best[key]:5.2f}% ({group[best_i][0].label})"
                + (f"  alone {100 * alone[0]:5.2f}%" if alone else "")
                + f"  {best['train_img_s'] * len(live):,.0f} student-img/s  {best['train_time_s']:.1f} s"
            )
        state["current"] = {
            "seed": seed,
            "epochs_done": epoch + 1,
            "histories": histories,
            "diverged": diverged,
            "members": [m.state_dict() for m in members],
        }
        _save_state(state, out / STATE)

    def on_diverged(i: int, e) -> None:
        diverged[i] = str(e)
        progress.note(f"seed {seed}: {group[i][0].label} stopped: {e}; the others go on")

    fit(
        members,
        batches,
        rt,
        epochs=base.epochs,
        test=(full.test_x, full.test_y),
        on_epoch=on_epoch,
        start_epoch=start,
        progress=progress,
        teacher_test_logits=cached.test_logits,
        val=val,
        on_diverged=on_diverged,
        stopped=set(diverged),
    )
    wall = time.perf_counter() - t0
    (out / STUDENTS).mkdir(exist_ok=True)
    results = []
    models = [mod for m in members for mod, _ in m.evaluated()]
    source = cache_source(cached)
    for i, ((setting, sd), recipe) in enumerate(zip(group, recipes, strict=True)):
        name = _name(setting, sd)
        final = histories[i][-1] if histories[i] and i not in diverged else None
        entry = {
            "name": name,
            "seed": sd,
            "setting": dataclasses.asdict(setting) | {"key": setting.key, "label": setting.label},
            "history": histories[i],
            "final": final,
            "diverged": diverged.get(i),
            "step_time_s": sum(m.get("step_time_s", m["train_time_s"]) for m in histories[i]),
        }
        if final is not None:
            metrics = {"test_acc": final["test_acc"], "epochs": base.epochs, "train_time_s": entry["step_time_s"]}
            sweep_meta = {
                "sweep": {
                    "out": str(out),
                    "setting": setting.key,
                    "val_fraction": spec.val_fraction,
                    **held,  # num_train is the images it was drawn from (what --subset chains on); these, what it saw
                    "val_acc": final.get("val_acc"),
                }
            }
            meta = checkpoint_meta(
                "student",
                full,
                batches,
                num_params(models[i]),
                metrics,
                recipe,
                {"T": recipe.T, "alpha": recipe.alpha, "loss": recipe.loss, **source, **sweep_meta},
            )
            save_checkpoint(out / STUDENTS / f"{name}.pt", models[i], arch=setting.arch, meta=meta)
        results.append(entry)
    results[0]["wall_s"] = wall
    return results


def _members(backend: str, group, recipes, data, batches, rt: Runtime, progress):
    """The backend that trains `group` and its members (one per student for loop; one per architecture for
    stacked)."""

    def loop():
        members = []
        for (setting, seed), recipe in zip(group, recipes, strict=True):
            raw = new_model(setting.arch, data, seed, batches)
            model = rt.prepare(raw)
            optimizer, scheduler = new_optimizer(raw, recipe, recipe.epochs, len(batches))
            ema = WeightAverage(model, recipe.ema) if recipe.ema > 0 else None
            m = Member(model, student_loss_fn(recipe), optimizer, scheduler, rt, ema=ema)
            m.rng = torch.get_rng_state()  # as `kdcache student` continues after building its model
            members.append(m)
        return members

    def stacked():
        from kdcache.stacked import Stacked

        members = []
        by_arch: dict[str, list[int]] = {}
        for i, (setting, _) in enumerate(group):
            by_arch.setdefault(setting.arch, []).append(i)
        order = [i for idx in by_arch.values() for i in idx]
        if order != list(range(len(group))):
            raise KDCacheError("stacked: the students of one architecture must be listed together")
        for idx in by_arch.values():
            raws = [new_model(group[i][0].arch, data, group[i][1], batches) for i in idx]
            first = recipes[idx[0]]
            members.append(
                Stacked(
                    raws,
                    [student_loss_fn(recipes[i]) for i in idx],
                    rt,
                    lambda shell, r=first: new_optimizer(shell, r, r.epochs, len(batches)),
                )
            )
        return members

    if any(r.ema > 0 for r in recipes) and backend == "stacked":
        raise KDCacheError("--backend stacked trains without a weight average: pass --ema 0 or --backend loop")
    if backend == "auto":
        backend = _probe(loop, stacked, batches, recipes, progress)
    members = (stacked if backend == "stacked" else loop)()
    return backend, members


def _probe(loop, stacked, batches, recipes, progress, rounds: int = 5, steps: int = 3) -> str:
    """Time each backend on the sweep's own first batches and name the faster: after a warm-up step each, `rounds`
    alternating rounds of `steps` steps (so a machine that slows down mid-probe slows both alike), the median
    round of each compared. The probe's students are thrown away. Loop when stacking cannot apply."""
    if any(r.ema > 0 for r in recipes) or len(recipes) < 2:
        return "loop"
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    built = {"loop": loop(), "stacked": stacked()}
    batches_seen = list(itertools.islice(batches.epoch(0), 1 + steps))
    if len(batches_seen) < 2:  # too few batches to time: nothing to gain from fusing either
        return "loop"
    rates: dict[str, list[float]] = {name: [] for name in built}
    for members in built.values():
        for m in members:
            m.train()
            m.step(batches_seen[0])
    sync = torch.cuda.synchronize if batches_seen[0].x.is_cuda else (lambda: None)  # time the work, not launches
    for _ in range(rounds):
        for name, members in built.items():
            sync()
            t0 = time.perf_counter()
            for batch in batches_seen[1:]:
                for m in members:
                    m.step(batch)
            sync()
            rates[name].append(sum(len(b.y) for b in batches_seen[1:]) / (time.perf_counter() - t0))
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    speeds = {name: statistics.median(r) for name, r in rates.items()}
    choice = max(speeds, key=speeds.get)
    progress.note(
        "backend auto: "
        + ", ".join(f"{k} {v * len(recipes):,.0f} student-img/s" for k, v in speeds.items())
        + f" (median of {rounds} alternating rounds) -> {choice}"
    )
    return choice
