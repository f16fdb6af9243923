"""`--tensorboard DIR`: each epoch's metrics (the lines of OUT.metrics.jsonl) as TensorBoard scalars.

It wraps the `on_epoch` callback the stages already call once per epoch, on the main process
only (rank 0 under torchrun), so nothing else learns about TensorBoard. The step is the epoch;
a tag is the metrics log's key under a group: accuracy/test_acc, training/train_loss, teacher/teacher_kl.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable
from pathlib import Path

from kdcache.artifacts import check_writable
from kdcache.errors import KDCacheError

INSTALL = "pip install 'kdcache[tensorboard]'"


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KDCacheError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL}") from None
    return SummaryWriter


def check(log_dir: Path | None, *, main: bool = True) -> None:
    """Refuse --tensorboard DIR before any training: tensorboard missing, or DIR not writable (checked,
    and so created, by the main process only)."""
    if log_dir is None:
        return
    _summary_writer()
    if main:
        check_writable(Path(log_dir), "choose another --tensorboard DIR")


def tag(key: str) -> str:
    """The scalar's tag for a metrics-log key: the key itself, grouped so that TensorBoard puts the
    accuracies (train, test, test_acc_raw, the teacher's TTA ones) on one card row."""
    if "acc" in key.split("_") and not key.startswith("teacher_"):
        return f"accuracy/{key}"
    return f"teacher/{key}" if key.startswith("teacher_") else f"training/{key}"


def run_name(row: str) -> str:
    """A report row ("student with KD") as a subdirectory name (student_with_kd)."""
    return re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")


class EpochScalars:
    """An `on_epoch` callback that writes the epoch's metrics to `log_dir` with a SummaryWriter, then
    calls `on_epoch`. A context manager: the writer (made at the first epoch) is closed on exit, errors
    included. At close, keys the stage added to the last epoch's record after handing it over (a
    teacher's TTA accuracies, measured after training, as its metrics log holds them) are written too."""

    def __init__(self, log_dir: str | Path, on_epoch: Callable[[dict], None] | None = None):
        self.log_dir, self.on_epoch = Path(log_dir), on_epoch
        self.writer = None
        self.last: dict | None = None  # the last record handed over, and the keys written from it
        self.written: set[str] = set()

    def __enter__(self) -> EpochScalars:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, metrics: dict) -> None:
        if self.on_epoch is not None:
            self.on_epoch(metrics)
        if self.writer is None:
            self.writer = _summary_writer()(log_dir=str(self.log_dir))
        self.last, self.written = metrics, set()
        self._write(metrics)

    def _write(self, metrics: dict) -> None:
        step = metrics["epoch"]
        for key, value in metrics.items():
            if key == "epoch" or key in self.written or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            self.writer.add_scalar(tag(key), value, global_step=step)
            self.written.add(key)
        self.writer.flush()  # a live `tensorboard --logdir` sees the epoch now, not two minutes later

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self._write(self.last)
        finally:
            self.writer.close()
            self.writer = None


def epoch_scalars(log_dir: str | Path | None, on_epoch: Callable[[dict], None] | None):
    """`EpochScalars(log_dir, on_epoch)`, or `on_epoch` unchanged without --tensorboard."""
    import contextlib

    return contextlib.nullcontext(on_epoch) if log_dir is None else EpochScalars(log_dir, on_epoch)
