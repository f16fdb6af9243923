"""Comparison report of a pipeline run: teacher / student alone / student with KD.

Everything is derived from the saved artifacts (checkpoints, metrics logs, cache
attributes), so `kdcache report` can re-render it at any time, for several runs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from kdcache.artifacts import atomic_write, atomic_write_text, metrics_of, read_metrics
from kdcache.checkpoints import read_checkpoint
from kdcache.errors import KDCacheError
from kdcache.guard import weak_teacher

MODELS = (("teacher", "teacher.pt"), ("student alone", "student_alone.pt"), ("student with KD", "student_kd.pt"))
ONLINE = ("student, online KD", "student_online.pt")  # only with pipeline --with-online
CACHE_NAME = "teacher_logits.h5"
REPORT_FILES = ("report.json", "report.md", "accuracy.png")


def _img_s(history: list[dict]) -> float:
    images = sum(m["train_img_s"] * m["train_time_s"] for m in history)
    return images / max(sum(m["train_time_s"] for m in history), 1e-9)


def load_run(run_dir: str | Path) -> dict:
    """The report record of one run directory, from its saved files alone."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KDCacheError(f"{run_dir} is not a run directory: pass the --out of a `kdcache pipeline` run")
    rows, curves, times = [], {}, {}
    numbers = sorted(
        int(p.stem[len("teacher_") :]) for p in run_dir.glob("teacher_*.pt") if p.stem[len("teacher_") :].isdigit()
    )
    members = tuple((f"teacher {i}", f"teacher_{i}.pt") for i in numbers)  # pipeline --teachers N: the others
    models = MODELS[:1] + members + MODELS[1:] + ((ONLINE,) if (run_dir / ONLINE[1]).exists() else ())
    for label, name in models:
        ckpt = run_dir / name
        if not ckpt.exists():
            raise KDCacheError(
                f"{run_dir} has no {name}: finish the run with `kdcache pipeline --resume --out {run_dir}`"
            )
        meta = {k: v for k, v in read_checkpoint(ckpt).items() if k != "state_dict"}
        if metrics_of(ckpt).is_file() or label != "teacher":
            history = read_metrics(metrics_of(ckpt))
        else:  # an imported teacher reused by the pipeline: trained elsewhere, no epochs to show
            history = [{"test_acc": meta["metrics"]["test_acc"], "train_time_s": 0.0, "train_img_s": 0.0}]
        curves[label] = [m["test_acc"] for m in history]
        times[label] = list(itertools.accumulate(m["train_time_s"] for m in history))  # training seconds so far
        rows.append(
            {
                "model": label,
                "arch": meta["arch"],
                "params": meta["params"],
                "test_acc": history[-1]["test_acc"],
                "best_test_acc": max(curves[label]),
                "epochs": meta["metrics"].get("epochs", len(history)),
                "train_time_s": sum(m["train_time_s"] for m in history),
                "img_s": _img_s(history),
                **({"T": meta["T"], "alpha": meta["alpha"]} if "alpha" in meta else {}),
                **{k: history[-1][k] for k in ("teacher_agreement", "teacher_kl") if k in history[-1]},
                **{k: v for k, v in meta["metrics"].items() if k.startswith("test_acc_tta_")},  # --tta-eval's
            }
        )
    record = {"run_dir": str(run_dir), "rows": rows, "curves": curves, "times": times}
    cache = run_dir / CACHE_NAME
    if cache.exists():
        from kdcache.cache import open_cache

        with open_cache(cache) as c:  # a damaged cache is one line, as everywhere
            n, k = c.file["view_params"].shape[:2]
            t = float(c.attrs.get("dump_time_s", 0.0))
            record["dump"] = {
                "images": n,
                "views": k,
                "time_s": t,
                "img_s": n * k / t if t else None,
                "size_mb": cache.stat().st_size / 1e6,
            }
            if "ensemble_members" in c.attrs and "teacher_test_acc" in c.attrs:  # pipeline --teachers N
                record["ensemble_test_acc"] = float(c.attrs["teacher_test_acc"])
                teachers = [r for r in rows if r["model"].startswith("teacher")]
                rows.insert(
                    len(teachers),
                    {
                        "model": f"teacher ensemble ({len(teachers)})",
                        "arch": c.attrs["teacher_arch"],
                        "params": sum(r["params"] for r in teachers),
                        "test_acc": record["ensemble_test_acc"],
                        "best_test_acc": record["ensemble_test_acc"],
                        "epochs": max(r["epochs"] for r in teachers),
                        "train_time_s": sum(r["train_time_s"] for r in teachers),
                        "img_s": sum(r["img_s"] for r in teachers) / len(teachers),
                    },
                )
    by = {r["model"]: r for r in rows}
    record["kd_gain"] = by["student with KD"]["test_acc"] - by["student alone"]["test_acc"]
    record["warnings"] = [
        w
        for w in [
            weak_teacher(
                record.get("ensemble_test_acc", by["teacher"]["test_acc"]),
                by["student alone"]["test_acc"],
                "the student alone",
            )
        ]
        if w
    ]
    previous = run_dir / "report.json"
    if previous.exists():
        try:
            record["run"] = json.loads(previous.read_text()).get("run", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise KDCacheError(
                f"{previous} is not a kdcache report: remove it and run `kdcache report {run_dir}` again"
            ) from None
    return record


def tta_lines(record: dict) -> list[str]:
    """A sentence per row whose checkpoint measured test-time augmentation (a teacher's --tta-eval)."""
    return [
        f"{r['model'].capitalize()} with test-time augmentation: "
        + ", ".join(f"{k.removeprefix('test_acc_tta_')} {100 * v:.2f}%" for k, v in tta.items())
        + "."
        for r in record["rows"]
        if (tta := {k: v for k, v in r.items() if k.startswith("test_acc_tta_")})
    ]


def markdown(record: dict) -> str:
    lines = [
        f"# kdcache run `{record['run_dir']}`",
        "",
        "| model | arch | parameters | test accuracy | agrees with teacher | KL to teacher "
        "| training time | images/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        agree = f"{100 * r['teacher_agreement']:.2f}%" if "teacher_agreement" in r else ""
        kl = f"{r['teacher_kl']:.3f}" if "teacher_kl" in r else ""
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['params']:,} | {100 * r['test_acc']:.2f}% | {agree} | {kl} | "
            f"{r['train_time_s']:.0f} s | {r['img_s']:,.0f} |"
        )
    lines += ["", f"KD gain over the student alone: {100 * record['kd_gain']:+.2f} points."]
    lines += tta_lines(record)
    lines += [f"**Warning:** {w}." for w in record.get("warnings", [])]
    if "dump" in record:
        d = record["dump"]
        rate = f", {d['img_s']:,.0f} img/s" if d["img_s"] else ""
        lines.append(
            f"Cache: {d['images']:,} images x {d['views']} views, {d['size_mb']:.1f} MB, "
            f"dumped in {d['time_s']:.0f} s{rate}."
        )
    run = record.get("run", {})
    if run:
        lines.append(
            f"Preset `{run.get('preset')}` on {run.get('runtime')}; "
            f"pipeline wall time {run.get('pipeline_wall_s', 0):.0f} s."
        )
    lines += ["", "![test accuracy per epoch and per second of training](accuracy.png)", ""]
    return "\n".join(lines)


def plot_curves(records: list[dict]) -> list[dict]:
    """What the plot draws: one curve per model of each run, with its label, epochs, test accuracies (%),
    cumulative training seconds, colour, marker and line style. Each model (row) has its own colour from
    a fixed qualitative palette (tab10; tab20 beyond ten), given in row order, the same in both panels
    and for the same model in every run, and its own marker (curves that coincide, as a cached and an
    online KD student's per epoch can, still both show); each run has its own line style."""
    import matplotlib
    from matplotlib.colors import to_hex

    labels = list(dict.fromkeys(label for record in records for label in record["curves"]))
    palette = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
    colors = {label: to_hex(palette[i % len(palette)]) for i, label in enumerate(labels)}
    markers = dict(zip(labels, itertools.cycle("osD^vPX*")))
    styles = ["-", "--", ":", "-."]
    out = []
    for i, record in enumerate(records):
        suffix = f" ({Path(record['run_dir']).name})" if len(records) > 1 else ""
        for label, accs in record["curves"].items():
            out.append(
                {
                    "label": label + suffix,
                    "epochs": list(range(1, len(accs) + 1)),
                    "acc": [100 * a for a in accs],
                    "time_s": record["times"][label],
                    "color": colors[label],
                    "marker": markers[label],
                    "linestyle": styles[i % len(styles)],
                }
            )
    return out


def figure(records: list[dict]):
    """The report's figure: test accuracy against the epoch (left) and against cumulative training
    time (right), where a cached student's head start over the online-KD student shows; one legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120, layout="constrained")
    for c in plot_curves(records):
        for ax, x in ((by_epoch, c["epochs"]), (by_time, c["time_s"])):
            ax.plot(x, c["acc"], c["linestyle"], color=c["color"], marker=c["marker"], markersize=4, label=c["label"])
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_epoch.set_xlabel("epoch")
    by_epoch.set_title("per epoch", fontsize=10)
    by_time.set_xlabel("cumulative training time (s; a cache's one-off dump not included)")
    by_time.set_xlim(left=0)
    by_time.set_title("per second of training", fontsize=10)
    for ax in (by_epoch, by_time):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("kdcache: teacher vs student alone vs student with KD")
    handles, labels = by_epoch.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8)
    return fig


def plot(records: list[dict], path: str | Path) -> Path:
    """`figure(records)` as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = figure(records)
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def write_report(run_dir: str | Path, extra: dict | None = None) -> dict:
    """(Re)write report.json, report.md and accuracy.png in `run_dir`; return the record."""
    run_dir = Path(run_dir)
    record = load_run(run_dir)
    if extra is not None:
        record["run"] = extra
    atomic_write_text(run_dir / "report.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", markdown(record))
    plot([record], run_dir / "accuracy.png")
    return record


# ---- sweeps ----------------------------------------------------------------------------------------

SWEEP_RECORD = "sweep.json"


def pm(s: dict, scale: float = 100.0, sign: bool = False) -> str:
    """A summary (see `sweep.summary`) as 'mean ± std' in points; '-' when there is none."""
    if not s or s.get("mean") is None:
        return "-"
    fmt = "{:+.2f}" if sign else "{:.2f}"
    text = fmt.format(scale * s["mean"])
    return text + (f" ± {scale * s['std']:.2f}" if s.get("std") is not None else "")


def interval(s: dict) -> str:
    """The 95% interval of a summary's mean, in points: '[+0.76, +1.80]'; '-' with fewer than 2 values."""
    if not s or s.get("ci95") is None:
        return "-"
    lo, hi = s["ci95"]
    return f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"


def sweep_verdict(row: dict) -> str:
    """'within noise' where the paired interval covers 0, 'better'/'worse' where it does not."""
    if row["setting"]["alpha"] == 0:
        return "baseline"
    if row["within_noise"] is None:
        return "one seed"
    if row["within_noise"]:
        return "within noise"
    return "better" if row["gain"]["mean"] > 0 else "worse"


def sweep_markdown(record: dict) -> str:
    pick, on = record["pick"], record["pick_on"]
    spec = record["spec"]
    lines = [
        f"# kdcache sweep `{record.get('out', '')}`".replace(" ``", ""),
        "",
        f"{len(record['students'])} students from `{record['cache']}` · {record['data']['train_images']:,} training "
        f"images, {record['data']['val_images']:,} held out · {record['recipe']['epochs']} epoch(s) · seeds "
        f"{', '.join(map(str, spec['seeds']))} · {record['runtime']} · backend {record['backend']} · "
        f"{record['wall_s']:.0f} s",
        "",
        f"| setting | val acc (%) | test acc (%) | gain over alone ({on}, points) | 95% interval | "
        "agrees with teacher (%) | KL to teacher | step time (s) | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["table"]:
        marks = (" **(picked)**" if r["key"] == pick["key"] else "") + (
            " (design card)" if r["key"] == pick.get("design_card") else ""
        )
        lines.append(
            f"| {r['key']}{marks} | {pm(r['val'])} | {pm(r['test'])} | "
            + (
                "- | - | "
                if r["setting"]["alpha"] == 0
                else f"{pm(r['gain'], sign=True)} (n={r['gain']['n']}) | {interval(r['gain'])} | "
            )
            + f"{pm(r['agreement'])} | {pm(r['kl'], 1.0)} | "
            f"{pm(r['step_time_s'], 1.0)} | {sweep_verdict(r)}"
            + (f" · diverged: seeds {r['diverged']}" if r["diverged"] else "")
            + " |"
        )
    lines += ["", sweep_pick_line(record), "", "![paired gain over the student alone](sweep.png)", ""]
    return "\n".join(lines)


def sweep_pick_line(record: dict) -> str:
    pick = record["pick"]
    if pick["key"] is None:
        return "No student finished: nothing was picked."
    row = next(r for r in record["table"] if r["key"] == pick["key"])
    text = (
        f"Picked on {'validation' if pick['on'] == 'val' else 'TEST'}: {pick['key']}, test {pm(row['test'])}% "
        f"({pm(row['test_gain'], sign=True)} points over alone on test)"
    )
    if pick.get("checkpoint"):
        text += f"; checkpoint {pick['checkpoint']['path']}"
    if pick["optimistic"]:
        text += ". The pick was made on the test set (--val-fraction 0): its test accuracy is optimistic."
    return text + "."


def sweep_plot(record: dict, path: str | Path) -> Path:
    """The paired gain over alone per setting with its 95% interval; beside it, a T x alpha heat map of
    the mean gain when the sweep has one architecture and one loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["table"] if r["setting"]["alpha"] > 0 and r["gain"]["mean"] is not None]
    spec = record["spec"]
    heat = len(spec["T"]) > 1 and len([a for a in spec["alpha"] if a > 0]) > 1 and len(spec["loss"]) == 1
    heat = heat and len({r["setting"]["arch"] for r in rows}) == 1
    fig, axes = plt.subplots(1, 2 if heat else 1, figsize=(12 if heat else 7, 0.45 * len(rows) + 2), squeeze=False)
    ax = axes[0][0]
    means = [100 * r["gain"]["mean"] for r in rows]
    errs = [[0, 0] if r["gain"]["ci95"] is None else [m - 100 * r["gain"]["ci95"][0], 100 * r["gain"]["ci95"][1] - m]
            for r, m in zip(rows, means, strict=True)]  # fmt: skip
    colors = ["tab:green" if r["key"] == record["pick"]["key"] else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), means, xerr=list(zip(*errs, strict=True)) if rows else None, color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), [r["key"] for r in rows])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"gain over alone, {record['pick_on']} accuracy (points)")
    ax.set_title(f"paired by seed: mean and 95% interval ({len(spec['seeds'])} seeds)", fontsize=10)
    if heat:
        Ts, alphas = spec["T"], [a for a in spec["alpha"] if a > 0]
        grid = [[float("nan")] * len(alphas) for _ in Ts]
        for r in rows:
            if r["setting"]["T"] in Ts and r["setting"]["alpha"] in alphas:
                grid[Ts.index(r["setting"]["T"])][alphas.index(r["setting"]["alpha"])] = 100 * r["gain"]["mean"]
        hx = axes[0][1]
        im = hx.imshow(grid, cmap="RdYlGn", aspect="auto")
        hx.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        hx.set_yticks(range(len(Ts)), [f"{t:g}" for t in Ts])
        hx.set_xlabel("alpha")
        hx.set_ylabel("T")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                hx.text(j, i, "-" if v != v else f"{v:+.2f}", ha="center", va="center")
        fig.colorbar(im, ax=hx, label="mean gain (points)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def write_sweep_report(out: str | Path, record: dict) -> None:
    """DIR/report.md and DIR/sweep.png from a sweep's record."""
    out = Path(out)
    atomic_write_text(out / "report.md", sweep_markdown(record | {"out": str(out)}))
    sweep_plot(record, out / "sweep.png")


def load_sweep(out: str | Path) -> dict | None:
    """A sweep folder's record, or None when `out` holds no sweep."""
    path = Path(out) / SWEEP_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KDCacheError(f"{path} is unreadable ({type(e).__name__}): run the sweep again") from None
    if not isinstance(record, dict) or record.get("kind") != "kdcache-sweep":
        raise KDCacheError(f"{path} is not a kdcache sweep record: pass a folder written by kdcache sweep")
    return record
