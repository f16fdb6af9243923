"""Looking into a cache: `inspect` summarises it, `verify` proves it against data and teacher."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcache import cache as cache_io
from kdcache.data import load_dataset, recorded_options
from kdcache.errors import KDCacheError
from kdcache.imports import load_teachers
from kdcache.inference import TTAModel, predict
from kdcache.runtime import Runtime
from kdcache.views import Mix, Views, draw_views

SCAN_ROWS = 4096


def _scan(cache: cache_io.Cache, name: str, stop: int | None = None):
    """Yield (start, block) over a dataset's rows [0, stop) in blocks: bounded memory for any N."""
    ds = cache.file[name]
    stop = ds.shape[0] if stop is None else stop
    for start in range(0, stop, SCAN_ROWS):
        yield start, ds[start : min(start + SCAN_ROWS, stop)]


def rows_written(cache: cache_io.Cache) -> int:
    """Rows that hold data: all of a complete cache, the first `rows_done` of an interrupted one."""
    n = cache.num_rows
    return min(int(cache.attrs.get("rows_done", n)), n)


def soft_target_entropy(cache: cache_io.Cache, T: float) -> tuple[float, float]:
    """(mean entropy in nats of the teacher's softmax at T, mean tail mass) over the written N x K views.
    A top-k cache: the entropy of its top k plus the tail as one bucket (a lower bound), and the
    tail's mass; a dense cache's tail mass is 0."""
    total, tail, count = 0.0, 0.0, 0
    for start in range(0, rows_written(cache), SCAN_ROWS):
        t = cache.targets(slice(start, min(start + SCAN_ROWS, rows_written(cache))))
        if cache.topk:
            p, rest = t.probs(T)
            p = torch.cat([p, rest.unsqueeze(-1)], -1)
            tail += float(rest.sum())
        else:
            p = torch.softmax(t.float() / T, dim=-1)
        total += float(-(p * p.clamp(min=1e-30).log()).sum(-1).sum())
        count += p.shape[0] * p.shape[1]
    return total / max(count, 1), tail / max(count, 1)


def cache_summary(path: str | Path, T: float = 1.0) -> list[tuple[str, str]]:
    """Human-readable facts about a cache, complete or not."""
    with cache_io.open_cache(path, require_complete=False) as cache:
        a = cache.attrs
        n, k, c = cache.num_rows, int(a["num_views"]), int(a["num_classes"])
        pct = lambda key: f"{100 * a[key]:.2f}%" if key in a else "n/a (incomplete)"  # noqa: E731
        complete = bool(a.get("complete"))
        rows = [
            (  # a plain-image cache stores its views in a recipe's layout, but holds none of its draws
                "format",
                f"{a['format']} v{a['format_version']}"
                + (f" · view recipe {a.get('view_recipe', cache_io.VIEW_RECIPE)}" if a["augment"] else ""),
            ),
            ("complete", "yes" if complete else f"no: {a.get('rows_done', 0):,} of {n:,} rows written"),
            (
                "dataset",
                f"{a['dataset']}"
                + (f" {recorded_options(a)['data_path']}" if a["dataset"] == "imagefolder" else "")
                + f" · fingerprint {a['dataset_fingerprint'][:16]}",
            ),
            ("N x K x C", f"{n:,} images x {k} view{'s' * (k != 1)} x {c} classes"),
            _targets_row(cache, T),
            ("size on disk", f"{Path(path).stat().st_size / 1e6:.1f} MB"),
            ("teacher", f"{a['teacher_arch']} · sha256 {a['teacher_sha256'][:16]}"),
            *(
                [
                    (
                        "ensemble members",
                        "; ".join(
                            f"{m['arch']} {_pct(m.get('test_acc'))} · sha256 {m['sha256'][:12]}"
                            for m in json.loads(a["ensemble_members"])
                        ),
                    )
                ]
                if "ensemble_members" in a
                else []
            ),
            ("teacher test accuracy", pct("teacher_test_acc")),
            ("teacher accuracy on cached views", pct("teacher_view_acc")),
            *_entropy_rows(cache, T, c),
            (
                "views",
                f"seed {a['seed']} · {_view_words(a)}"
                + (f" · mixed: {a['mix']}, p={a['mix_prob']:g}" if cache.mix != "none" else " · unmixed"),
            ),
            ("view schedule", _schedule_words(a, k, cache.mix)),
            (
                "normalisation",
                f"mean {tuple(round(x, 4) for x in a['normalize_mean'])} "
                f"std {tuple(round(x, 4) for x in a['normalize_std'])}",
            ),
            ("created", f"{a['created_utc']} by kdcache {a['kdcache_version']}"),
        ]
    return rows


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(ok), detail))


def _rows_list(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _targets_row(cache: cache_io.Cache, T: float) -> tuple[str, str]:
    from kdcache.topk import bytes_per_view

    c = int(cache.attrs["num_classes"])
    if not cache.topk:
        return ("logits", f"{cache.file['logits'].dtype} raw logits, all {c} classes")
    grid = cache.attrs["lse_temperatures"]
    dense, ours = bytes_per_view(c, None), bytes_per_view(c, cache.topk, len(grid))
    return (
        "logits",
        f"top {cache.topk} of {c} per view (fp16 values + classes) + log-sum-exp at T = "
        f"{', '.join(f'{t:g}' for t in grid)}: {ours} bytes a view, dense {dense} ({dense / ours:.1f}x)",
    )


def _entropy_rows(cache: cache_io.Cache, T: float, c: int) -> list[tuple[str, str]]:
    if cache.topk and not any(abs(t - T) < 1e-6 for t in cache.attrs["lse_temperatures"]):
        return [(f"soft targets at T={T:g}", "not served by this top-k cache: see its temperatures above")]
    entropy, tail = soft_target_entropy(cache, T)
    rows = [
        (
            f"mean soft-target entropy at T={T:g}",
            f"{entropy:.3f} nats (max {np.log(c):.3f})" + (" (top k + the tail as one class)" if cache.topk else ""),
        )
    ]
    return rows + (
        [(f"mean tail mass at T={T:g}", f"{tail:.4f} of the teacher's probability outside its top {cache.topk}")]
        if cache.topk
        else []
    )


def _pct(acc) -> str:
    return f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "accuracy unknown"


def _schedule_words(a: dict, k: int, mix: str) -> str:
    """How a student meets the K views, and whether they differ: a view-coincidence remark only where
    random crop/flip draws were made (several augmented views, not all of them mixed)."""
    if k == 1:
        return "one view per image, the same one every epoch"
    words = f"each view once every {k} epochs"
    if mix != "none" and a["mix_prob"] == 1:
        return words + f": {k} epochs before a student sees any view twice"
    if not a["augment"]:
        return words + (" (its unmixed views are all the plain image)" if mix != "none" else " (all the plain image)")
    if a.get("view_recipe", cache_io.VIEW_RECIPE) == cache_io.VIEW_RECIPE:
        return words + " (crop/flip draws can coincide: 162 distinct ones exist)"
    return words


def _view_words(a: dict) -> str:
    if a.get("view_recipe", cache_io.VIEW_RECIPE) == cache_io.VIEW_RECIPE:
        return "pad-4 crop + flip" if a["augment"] else "plain images (no augmentation)"
    size = a["image_size"]
    if not a["augment"]:
        return f"resize + centre crop to {size} px (no augmentation)"
    (s0, s1), (r0, r1) = a["rrc_scale"], a["rrc_ratio"]
    return f"random-resized crop to {size} px (scale {s0:g}-{s1:g}, ratio {r0:.2f}-{r1:.2f}) + flip"


def verify_cache(
    path: str | Path,
    *,
    teacher: str | Path,
    data_dir: str | Path,
    samples: int,
    rt: Runtime,
    seed: int = 0,
    arch: str | None = None,
    trust_arch: bool = False,
) -> Report:
    """Check metadata, shapes, values, view params, block hashes; re-run the teacher on views.
    `arch`, `trust_arch`: see `load_checkpoint`."""
    if samples < 0:
        raise KDCacheError(f"--samples must be >= 0 (got {samples})")
    report = Report()
    with cache_io.open_cache(path, require_complete=False) as cache:
        a, f = cache.attrs, cache.file
        n, k = cache.num_rows, int(a["num_views"])
        report.add(
            "complete",
            a.get("complete"),
            "every row written"
            if a.get("complete")
            else f"only {a.get('rows_done', 0):,} of {n:,} rows written: finish it with dump-logits --resume",
        )
        geometry = cache.geometry()  # open_cache has checked the shapes against the attributes

        done = rows_written(cache)  # an interrupted dump's later rows are empty, not wrong
        bad = [
            start + np.nonzero(~np.isfinite(b).all(axis=(1, 2)))[0]
            for name in cache_io.target_names(a)
            for start, b in _scan(cache, name, done)
            if name != "topk_indices"
        ]
        bad = np.unique(np.concatenate(bad)) if bad else np.zeros(0, np.int64)
        report.add(
            "finite logits",
            len(bad) == 0,
            "all finite" if len(bad) == 0 else f"non-finite logits in rows {_rows_list(bad)}",
        )

        indices = f["indices"][:done]
        differs = np.zeros(done, bool)
        for start in range(0, done, SCAN_ROWS):  # in blocks: bounded memory for any N x K
            stop = min(start + SCAN_ROWS, done)
            rows = indices[start:stop]
            drawn = draw_views(
                geometry,
                a["seed"],
                rows,
                range(k),
                augment=a["augment"],
                mix=cache.mix,
                prob=float(a.get("mix_prob", 1.0)),
                num_rows=n,
            )
            expected = {"view_params": drawn.crop.numpy()}
            if drawn.mix is not None:  # the mix record too: partner, partner crop, box and weight
                expected |= cache_io.mix_arrays(drawn.mix)
            for name, want in expected.items():
                differs[start:stop] |= (f[name][start:stop] != want).reshape(stop - start, -1).any(axis=1)
        wrong = np.nonzero(differs)[0]
        report.add(
            "view params",
            len(wrong) == 0,
            f"all {done:,} x {k} match seed {a['seed']}"
            if len(wrong) == 0
            else f"rows {_rows_list(wrong)} differ from the views of seed {a['seed']}",
        )

        changed = []
        block = int(a["block_rows"])
        for b, start in enumerate(range(0, done, block)):
            stop = min(start + block, done)
            mix = {name: f[name][start:stop] for name in cache_io.MIX_DATASETS} if cache.mix != "none" else None
            names = cache_io.target_names(a)
            targets = {name: f[name][start:stop] for name in names} if cache.topk else f["logits"][start:stop]
            digest = cache_io.block_digest(targets, f["view_params"][start:stop], mix)
            if digest != bytes(f["block_sha256"][b]):
                changed.append((start, stop))
        report.add(
            "block checksums",
            not changed,
            f"{-(-done // block)} blocks intact"
            if not changed
            else f"rows {', '.join(f'{s}-{e - 1}' for s, e in changed[:5])} changed after the dump",
        )

        try:
            data = load_dataset(a["dataset"], data_dir, a.get("subset"), **recorded_options(a))
            fp_ok = data.fingerprint == a["dataset_fingerprint"]
            where = data_dir if data_dir is not None else recorded_options(a).get("data_path", "data")
            report.add(
                "dataset fingerprint",
                fp_ok,
                f"{a['dataset']} in {where} matches"
                if fp_ok
                else f"{a['dataset']} in {where} (first {a.get('subset')}) is {data.fingerprint[:12]}, "
                f"the cache says {a['dataset_fingerprint'][:12]}",
            )
            labels_ok = np.array_equal(f["labels"][:done], data.train_y[indices].numpy())
            report.add("labels", labels_ok, "match the dataset" if labels_ok else "differ from the dataset's")
        except KDCacheError as e:
            report.add("dataset fingerprint", False, str(e))
            return report

        teachers = [teacher] if isinstance(teacher, (str, Path)) else list(teacher)
        members = json.loads(a["ensemble_members"]) if "ensemble_members" in a else None
        if members is not None and len(teachers) != len(members):
            report.add(
                "teacher",
                False,
                f"the cache is an ensemble of {len(members)} teachers "
                f"({', '.join(m['path'] for m in members)}): pass each with --teacher, in that order",
            )
            return report
        model, meta, mean, std, who = load_teachers(teachers, rt=rt, arch=arch, trust_arch=trust_arch)
        if a.get("tta", "none") != "none":  # the dump's test-time augmentation, replayed
            model = TTAModel(model, a["tta"])
        sha_ok = who["teacher_sha256"] == a["teacher_sha256"]
        named = " and ".join(map(str, teachers))
        report.add(
            "teacher",
            sha_ok,
            f"{who['teacher_arch']} matches the cache's sha256"
            if sha_ok
            else f"{named} is not the teacher this cache was made with (sha256 differs)",
        )

        # Random (row, view) pairs, plus every view of every row in a changed block.
        g = np.random.default_rng(seed)
        rows = g.integers(0, done, samples) if done else np.zeros(0, np.int64)
        vs = g.integers(0, k, samples)
        for s, e in changed:
            rows = np.concatenate([rows, np.repeat(np.arange(s, e), k)])
            vs = np.concatenate([vs, np.tile(np.arange(k), e - s)])
        if len(rows):
            order = np.argsort(rows, kind="stable")
            rows, vs = rows[order], vs[order]
            uniq, inv = np.unique(rows, return_inverse=True)
            cached = cache.targets(uniq)[inv, vs]
            params = torch.from_numpy(f["view_params"][uniq][inv, vs])
            mixed = None
            if cache.mix != "none":
                mixed = Mix(*(torch.from_numpy(f[name][uniq][inv, vs]) for name in cache_io.MIX_DATASETS))
                mixed.partner = mixed.partner.long()
            fresh = predict(
                model,
                rt.place(data.train_x),
                mean,
                std,
                rt,
                rows=torch.from_numpy(indices[rows]),
                views=Views(geometry, params, mixed),
                batch_size=512,
            ).cpu()
            fresh_top1 = fresh.argmax(1)
            if cache.topk:  # the fresh logits at the cached classes, and the fresh log-sum-exp on the grid
                from kdcache.topk import from_dense

                _, _, lse = from_dense(fresh, 1, cached.temperatures)
                cached_top1 = cached.indices[:, 0]  # sorted, largest first
                fresh = torch.cat([fresh.gather(1, cached.indices), lse], 1)
                cached = torch.cat([cached.values.float(), cached.lse], 1)
            else:
                cached = cached.float()
                cached_top1 = cached.argmax(1)
            err = (fresh - cached).abs()
            bf16 = a.get("precision") == "bf16" or rt.amp_dtype is not None
            tol = (0.15 + 0.03 * fresh.abs()) if bf16 else (0.01 + 2e-3 * fresh.abs())
            off = np.unique(rows[(err > tol).any(dim=1).numpy()])
            agree = (fresh_top1 == cached_top1).float().mean().item()
            report.add(
                "teacher replay",
                len(off) == 0,
                f"{len(rows):,} views re-rendered: max |error| {err.max().item():.4f}, "
                f"argmax agreement {100 * agree:.2f}%"
                + (f"; rows {_rows_list(off)} disagree with the teacher" if len(off) else ""),
            )
    return report
