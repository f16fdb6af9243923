"""What the CLI prints: the progress bar, epoch lines, result tables and one-line summaries.

Every function takes finished results (records, reports) and writes to the consoles; none decides
anything a command does.
"""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class LineConsole(Console):
    """A rich console that wraps printed text only on a terminal: into a file or a pipe, each line it
    prints (an epoch's, a note, a warning) stays one line whatever the width, so logs can be grepped
    and diffed line by line. Tables are laid out to the width as before."""

    def print(self, *objects, soft_wrap: bool | None = None, **kwargs) -> None:
        super().print(*objects, soft_wrap=(not self.is_terminal) if soft_wrap is None else soft_wrap, **kwargs)


out_console = LineConsole()
err_console = LineConsole(stderr=True)


class RichProgress:
    """`train.Progress` on one live rich bar (stderr); epoch lines print above it."""

    def __init__(self, console: Console = err_console):
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = None

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def note(self, message: str) -> None:
        self.bar.console.print(message, highlight=False)

    def begin(self, description: str, total: int) -> None:
        self.task = self.bar.add_task(description, total=total)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def end(self) -> None:
        self.bar.remove_task(self.task)


def print_epoch(m: dict) -> None:
    err_console.print(
        f"epoch {m['epoch']:>3}  loss {m['train_loss']:.4f}  train {100 * m['train_acc']:5.2f}%  "
        f"test {100 * m['test_acc']:5.2f}%  lr {m['lr']:.4g}  {m['train_img_s']:,.0f} img/s  {m['train_time_s']:.1f} s"
        + (
            f"  agrees with teacher {100 * m['teacher_agreement']:5.2f}%  KL {m['teacher_kl']:.3f}"
            if "teacher_kl" in m
            else ""
        ),
        highlight=False,
    )


def results_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


def stage_summary(title: str, result) -> None:
    out_console.print(
        results_table(
            title,
            [
                ("architecture", f"{result.arch} ({result.params:,} parameters)"),
                ("test accuracy", f"{100 * result.test_acc:.2f}%"),
                *[
                    (f"  with tta {k.removeprefix('test_acc_tta_')}", f"{100 * v:.2f}%")
                    for k, v in result.history[-1].items()
                    if k.startswith("test_acc_tta_")
                ],
                ("epochs", str(len(result.history))),
                ("training time", f"{result.train_time_s:.1f} s"),
                ("checkpoint", str(result.out)),
            ],
        )
    )


def warn_weak_teacher(teacher_acc, student_acc, student: str) -> None:
    from kdcache.guard import weak_teacher

    print_warnings({"warnings": [w for w in [weak_teacher(teacher_acc, student_acc, student)] if w]})


def print_warnings(record: dict) -> None:
    """A run's warnings (a teacher no better than its student), one line each, never silently."""
    for warning in record.get("warnings", []):
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)


def print_cache_summary(path: Path, T: float) -> None:
    from kdcache.verify import cache_summary

    out_console.print(results_table(f"cache {path}", cache_summary(path, T)))


def report_table(records: list[dict]) -> Table:
    several = len(records) > 1
    table = Table(title="teacher vs student alone vs student with KD", title_justify="left", box=box.SIMPLE_HEAD)
    for col in (["run"] if several else []) + ["model", "arch", "params", "test acc", "time", "img/s"]:
        table.add_column(
            col, justify="left" if col in ("run", "model", "arch") else "right", min_width=16 if col == "arch" else None
        )
    for rec in records:
        for r in rec["rows"]:
            cells = [
                r["model"],
                r["arch"],
                f"{r['params']:,}",
                f"{100 * r['test_acc']:.2f}%",
                f"{r['train_time_s']:.1f} s",
                f"{r['img_s']:,.0f}",
            ]
            table.add_row(*([Path(rec["run_dir"]).name] if several else []) + cells)
        table.add_section()
    return table


def print_imported(meta: dict, arch: str, out: Path) -> None:
    out_console.print(
        results_table(
            f"imported teacher {out}",
            [
                ("architecture", f"{meta['arch']} ({meta['params']:,} parameters)" if "arch" in meta else arch),
                ("data", f"{meta['dataset']} · {meta['num_classes']} classes · {meta['image_size']} px"),
                ("validation accuracy", f"{100 * meta['metrics']['test_acc']:.2f}%"),
                ("normalisation", f"mean {tuple(meta['normalize_mean'])} std {tuple(meta['normalize_std'])}"),
                ("checkpoint", str(out)),
            ],
        )
    )


def print_eval(checkpoint, arch: str, params: int, data, tta: str, acc: float) -> None:
    out_console.print(
        results_table(
            f"eval {checkpoint}",
            [
                ("architecture", f"{arch} ({params:,} parameters)"),
                ("dataset", f"{data.name} test split, {len(data.test_y):,} images"),
                ("test accuracy" + ("" if tta == "none" else f" (tta {tta})"), f"{100 * acc:.2f}%"),
            ],
        )
    )


def print_verify(cache, report) -> None:
    table = Table(title=f"verify {cache}", title_justify="left")
    table.add_column("check")
    table.add_column("")
    table.add_column("detail")
    for c in report.checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    out_console.print(table)


def print_bench(record: dict) -> None:
    table = Table(title=f"kdcache bench · {record['device']} · {record['data']}", title_justify="left")
    table.add_column("loop")
    table.add_column("img/s", justify="right")
    table.add_column("spread", justify="right")
    table.add_column("cached is", justify="right")
    notes = {
        "seed_loop": "reference recipe: DataLoader + PIL, teacher every step, fp32",
        "online": "our hot loop, teacher every step",
        "cached": "our hot loop, logits from the cache",
        "cached_mixed": "the same, mixed views (CutMix/MixUp replayed)",
        "cached_mixed_alone": "the same mixed views, alpha 0 (no KD loss)",
        "plain": "our hot loop, no teacher (floor)",
        "plain_mixed": "the same, fresh mixed views (what mixing costs)",
        "dump": "teacher inference over views",
    }
    m = record.get("sweep_students")
    if m:
        notes |= {
            "sweep_separate": f"{m} students, each its own batch (as {m} separate runs); img/s x {m} = student-img/s",
            "sweep_loop": f"{m} students, one batch each step, one after another (kdcache sweep, loop)",
            "sweep_stacked": f"{m} students fused with torch.func (kdcache sweep, stacked)",
        }
    peaks = record["peak_working_mem_mb"]
    show_mem = any(v is not None for v in peaks.values())
    if show_mem:
        table.add_column("working MiB", justify="right")
    table.add_column("what")
    for loop, what in notes.items():
        v = record[f"{loop}_img_s"]
        rounds = record["rounds_img_s"][loop]
        spread = f"±{50 * (max(rounds) - min(rounds)) / v:.0f}%"  # half the range, relative to the median
        ratio = (
            ""
            if loop in ("cached", "cached_mixed", "cached_mixed_alone", "plain_mixed", "dump")
            or loop.startswith("sweep")
            else f"{record['cached_img_s'] / v:.2f}x"
        )
        table.add_row(loop, f"{v:,.0f}", spread, ratio, *([f"{peaks[loop]:,.0f}"] if show_mem else []), what)
    out_console.print(table)
    sizes = " · ".join(
        f"C={int(c):,}: {b['dense']:,} B dense, {b['top10']} B top-10"
        for c, b in record["cache_bytes_per_view"].items()
    )
    out_console.print(f"cached targets per view: {sizes}", highlight=False)
    r = record["ratios"]
    out_console.print(
        f"cached_mixed/plain {r['cached_mixed_over_plain']:.2f} · cached_mixed_alone/plain_mixed "
        f"{r['cached_mixed_alone_over_plain_mixed']:.2f} (the cache's own cost) · the KD loss adds "
        f"{100 * r['kd_loss_overhead']:+.1f}% to a step (cached_mixed_alone/cached_mixed - 1)",
        highlight=False,
    )
    if m:
        out_console.print(
            f"{m} students in one pass against {m} separate runs (student-images/s): loop backend "
            f"{r['sweep_loop_over_separate']:.2f}x · stacked backend {r['sweep_stacked_over_separate']:.2f}x",
            highlight=False,
        )


def print_procs_bench(record: dict, cfg, procs: int) -> None:
    from kdcache.bench import PROCS_LOOPS

    table = Table(title=f"kdcache bench --procs {procs} · {record['device']} · {record['data']}", title_justify="left")
    for col, justify in (
        ("loop", "left"),
        ("1 process img/s", "right"),
        (f"{procs} processes img/s", "right"),
        (f"{procs} / 1", "right"),
        ("what", "left"),
    ):
        table.add_column(col, justify=justify)
    notes = {
        "cached": f"student from the cache, DDP, global batch {cfg.batch_size}",
        "dump": f"teacher inference, each process its own rows, batch {cfg.batch_size}",
    }
    for loop in PROCS_LOOPS:
        one, many = record[f"{loop}_img_s"]["1"], record[f"{loop}_img_s"][str(procs)]
        table.add_row(loop, f"{one:,.0f}", f"{many:,.0f}", f"{many / one:.2f}x", notes[loop])
    out_console.print(table)


def print_folder_bench(record: dict) -> None:
    table = Table(
        title=f"kdcache bench · {record['device']} · {record['data']} · store {record['store']}", title_justify="left"
    )
    for col in ("loop", "img/s", "spread", "what"):
        table.add_column(col, justify="right" if col in ("img/s", "spread") else "left")
    notes = {
        "imagefolder_online": f"ImageFolder + DataLoader workers, {record['teacher_arch']} teacher every step",
        "imagefolder_plain": "ImageFolder + DataLoader workers, no teacher",
        "plain": "raw store on the device, no teacher",
        "cached": "raw store on the device, logits from the cache",
        "plain_streamed": "raw store streamed from host memory, no teacher",
        "cached_streamed": "raw store streamed from host memory, logits from the cache",
        "cached_jpeg": "jpeg store decoded per batch, logits from the cache",
    }
    for loop, what in notes.items():
        v, rounds = record[f"{loop}_img_s"], record["rounds_img_s"][loop]
        table.add_row(loop, f"{v:,.0f}", f"±{50 * (max(rounds) - min(rounds)) / v:.0f}%", what)
    out_console.print(table)
    r, b = record["ratios"], record["store_bytes"]
    out_console.print(
        f"cached over the ImageFolder online-KD loop: {r['cached_jpeg_over_imagefolder_online']:.2f}x (jpeg store), "
        f"{r['cached_over_imagefolder_online']:.2f}x (raw, resident) · "
        f"cached/plain {r['cached_over_plain']:.2f} (resident), "
        f"{r['cached_streamed_over_plain_streamed']:.2f} (streamed) · "
        f"streamed/resident {r['streamed_over_resident']:.2f} · "
        f"jpeg/resident {r['jpeg_over_resident']:.2f}",
        highlight=False,
    )
    out_console.print(
        f"bytes: folder {b['folder'] / 1e6:,.1f} MB · raw store {b['raw'] / 1e6:,.1f} MB · "
        f"jpeg store {b['jpeg'] / 1e6:,.1f} MB · "
        f"prepared at {record['prepare_img_s']:,.0f} (raw), {record['prepare_jpeg_img_s']:,.0f} (jpeg) images/s "
        f"({record['prepare_images']:,} images)",
        highlight=False,
    )


def print_pipeline(record: dict, out: Path) -> None:
    out_console.print(report_table([record]))
    agree = [f"{r['model']} {100 * r['teacher_agreement']:.2f}%" for r in record["rows"] if "teacher_agreement" in r]
    if agree:
        out_console.print("top-1 agreement with the teacher on the test set: " + ", ".join(agree), highlight=False)
    from kdcache.report import tta_lines

    for line in tta_lines(record):  # pipeline --tta-eval
        out_console.print(line, highlight=False)
    by = {r["model"]: r for r in record["rows"]}
    if "student, online KD" in by:
        cached, online = by["student with KD"], by["student, online KD"]
        out_console.print(
            f"cached vs online KD: {100 * (cached['test_acc'] - online['test_acc']):+.2f} points, "
            f"{online['train_time_s'] / cached['train_time_s']:.1f}x less training time (the one-off dump aside)",
            highlight=False,
        )
    out_console.print(
        f"KD gain over the student alone: {100 * record['kd_gain']:+.2f} points · "
        f"report: {out / 'report.md'} · plot: {out / 'accuracy.png'}",
        highlight=False,
    )
    print_warnings(record)


def print_sweep(record: dict, out) -> None:
    """The sweep's table (one row per setting, over seeds), the pick and where the files are."""
    from rich.table import Table

    from kdcache.report import interval, pm, sweep_pick_line, sweep_verdict

    on = record["pick_on"]
    epochs = record["recipe"]["epochs"]
    archs = {r["setting"]["arch"] for r in record["table"]}
    t = Table(
        title=f"kdcache sweep · {len(record['students'])} students"
        + (f" of {next(iter(archs))}" if len(archs) == 1 else "")
        + f" · {epochs} epoch{'s' if epochs != 1 else ''} · seeds {', '.join(map(str, record['spec']['seeds']))}"
        + f" · {record['wall_s']:.0f} s · mean ± std over seeds; gain: paired with alone, same seed, in points",
        title_justify="left",
    )
    for name, justify in (
        ("setting", "left"),
        ("val %", "right"),
        ("test %", "right"),
        (f"gain ({on})", "right"),
        ("95% interval", "right"),
        ("agrees %", "right"),
        ("KL", "right"),
        ("s/student", "right"),
        ("", "left"),
    ):
        t.add_column(name, justify=justify, no_wrap=True)
    one_arch = len({r["setting"]["arch"] for r in record["table"]}) == 1
    for r in record["table"]:
        style = "bold green" if r["key"] == record["pick"]["key"] else None
        label = r["setting"]["label"] if one_arch else r["key"]
        label += " (card)" if r["key"] == record["pick"].get("design_card") else ""
        verdict = sweep_verdict(r) + (f", diverged: seeds {r['diverged']}" if r["diverged"] else "")
        verdict += " · picked" if r["key"] == record["pick"]["key"] else ""
        t.add_row(
            label,
            pm(r["val"]),
            pm(r["test"]),
            "-" if r["setting"]["alpha"] == 0 else f"{pm(r['gain'], sign=True)} (n={r['gain']['n']})",
            "-" if r["setting"]["alpha"] == 0 else interval(r["gain"]),
            pm(r["agreement"]),
            pm(r["kl"], 1.0),
            f"{r['step_time_s']['mean']:.1f}" if r["step_time_s"]["mean"] is not None else "-",
            verdict,
            style=style,
        )
    # a pipe or a file gets the whole table (rich would squeeze it into 80 columns)
    console = out_console if out_console.is_terminal else Console(file=out_console.file, width=200)
    console.print(t)
    console.print(sweep_pick_line(record), highlight=False)
    console.print(f"report: {out}/report.md · plot: {out}/sweep.png · record: {out}/sweep.json", highlight=False)
