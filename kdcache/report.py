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
