"""`kdcache bench`: images per second of five loops, side by side, in one process.

- seed_loop: notebook 1 as written: torchvision-style dataset of PIL images,
  DataLoader(num_workers=2), RandomCrop/Flip/ToTensor/Normalize, teacher forward
  every step, fp32 (the "before").
- online:    our GPU-resident hot loop, teacher forward in every step.
- cached:    our student from the cache (teacher logits gathered from device memory).
- plain:     our student with no teacher at all (the floor).
- dump:      teacher inference over rendered views, as dump-logits runs it.
Weights are random: throughput does not depend on what a model has learned.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kdcache import __version__
from kdcache.config import SEED_RESNET_MEAN, SEED_RESNET_STD
from kdcache.data import load_dataset
from kdcache.errors import KDCacheError
from kdcache.losses import kd_loss
from kdcache.models import ARCHS, build
from kdcache.stages import cached_plan, fresh_views_plan
from kdcache.train import Runtime, ViewBatches, make_step, predict
from kdcache.views import view_params

LOOPS = ("seed_loop", "online", "cached", "plain", "dump")
NUM_VIEWS = 8


@dataclass
class BenchConfig:
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    batch_size: int = 512
    steps: int = 50
    warmup: int = 5
    data_dir: Path | None = None
    T: float = 3.0
    alpha: float = 0.5

    def validate(self) -> "BenchConfig":
        if self.batch_size < 1 or self.steps < 1 or self.warmup < 0:
            raise KDCacheError("--batch-size and --steps must be >= 1, --warmup >= 0")
        for arch in (self.teacher_arch, self.student_arch):
            if arch not in ARCHS:
                raise KDCacheError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
        return self


class _PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per sample: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: torch.device) -> float | None:
    """Peak device memory since the last reset (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _timed(run_step, batches, cfg: BenchConfig, device) -> float:
    """img/s over `steps` steps after `warmup` untimed ones; `batches` must not run dry."""
    _peak_mb(device)  # reset
    it = iter(batches)
    for _ in range(cfg.warmup):
        run_step(*next(it))
    _sync(device)
    t0 = time.perf_counter()
    seen = 0
    for _ in range(cfg.steps):
        batch = next(it)
        run_step(*batch)
        seen += len(batch[1])
    _sync(device)
    return seen / (time.perf_counter() - t0)


def _endless(source: ViewBatches):
    epoch = 0
    while True:
        yield from source.epoch(epoch)
        epoch += 1


def run_bench(cfg: BenchConfig, rt: Runtime, log=lambda msg: None) -> dict:
    """Measure every loop on the same data, models and batch size; return the JSON record."""
    cfg.validate()
    dev = rt.device
    if cfg.data_dir is not None:
        data = load_dataset("cifar10", cfg.data_dir)
        images, labels, source = data.train_x, data.train_y, f"CIFAR-10 from {cfg.data_dir}"
    else:
        n = 50000  # CIFAR-10's size: same memory footprint and partial last batch as real data
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        source = f"synthetic uint8 {tuple(images.shape)}"
    n, c = len(labels), 10
    mean, std = SEED_RESNET_MEAN, SEED_RESNET_STD
    torch.manual_seed(0)
    teacher_raw = build(cfg.teacher_arch, c).eval()
    results: dict[str, float] = {}
    peaks: dict[str, float | None] = {}

    def student_and_step(teacher=None, *, rt_: Runtime, alpha: float):
        torch.manual_seed(0)
        model = rt_.prepare(build(cfg.student_arch, c)).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loss = lambda s, y, t: kd_loss(s, y, t, T=cfg.T, alpha=alpha)  # noqa: E731
        return make_step(model, loss, opt, rt_, teacher=teacher)

    # -- seed_loop: the notebook's loop, fp32, NCHW, PIL + DataLoader workers.
    log("seed_loop: DataLoader(num_workers=2) + PIL transforms + teacher forward, fp32")
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])  # fmt: skip
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    loader = torch.utils.data.DataLoader(
        _PILImages(hwc, labels.numpy(), tf), batch_size=cfg.batch_size, shuffle=True, num_workers=2,
        pin_memory=dev.type == "cuda", drop_last=True, persistent_workers=True,
    )  # fmt: skip
    seed_rt = Runtime(dev, None, channels_last=False)
    seed_teacher = build(cfg.teacher_arch, c).to(dev).eval()
    seed_step = student_and_step(seed_teacher, rt_=seed_rt, alpha=cfg.alpha)

    def endless_loader():
        while True:
            for x, y in loader:
                yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), None

    results["seed_loop"] = _timed(seed_step, endless_loader(), cfg, dev)
    peaks["seed_loop"] = _peak_mb(dev)
    del loader, seed_teacher

    # -- our loops: device-resident uint8 data, batched rendering.
    images_d, labels_d = images.to(dev), labels.to(dev)
    teacher = rt.prepare(teacher_raw)
    fresh = ViewBatches(images_d, labels_d, fresh_views_plan(n, 0, True, dev), cfg.batch_size, 0, mean, std, rt.compile)

    log("online: hot loop, teacher forward every step")
    results["online"] = _timed(student_and_step(teacher, rt_=rt, alpha=cfg.alpha), _endless(fresh), cfg, dev)
    peaks["online"] = _peak_mb(dev)

    log("cached: hot loop, teacher logits from the device-resident cache")
    params = view_params(0, range(n), range(NUM_VIEWS)).to(dev)
    logits = torch.randn(n, NUM_VIEWS, c, generator=torch.Generator().manual_seed(1)).to(dev, torch.float16)
    cached = ViewBatches(images_d, labels_d, cached_plan(params, logits, 0), cfg.batch_size, 0, mean, std, rt.compile)
    results["cached"] = _timed(student_and_step(rt_=rt, alpha=cfg.alpha), _endless(cached), cfg, dev)
    peaks["cached"] = _peak_mb(dev)

    log("plain: hot loop, no teacher")
    results["plain"] = _timed(student_and_step(rt_=rt, alpha=0.0), _endless(fresh), cfg, dev)
    peaks["plain"] = _peak_mb(dev)

    log("dump: teacher inference over rendered views")
    rows = min(n, cfg.batch_size * (cfg.steps + cfg.warmup))
    flat = params[:rows, 0]
    if cfg.warmup:
        predict(teacher, images_d[: cfg.batch_size * cfg.warmup], mean, std, rt,
                params=flat[: cfg.batch_size * cfg.warmup], batch_size=cfg.batch_size)  # fmt: skip
    _sync(dev)
    t0 = time.perf_counter()
    predict(teacher, images_d[:rows], mean, std, rt, params=flat, batch_size=cfg.batch_size)
    _sync(dev)
    results["dump"] = rows / (time.perf_counter() - t0)
    peaks["dump"] = _peak_mb(dev)

    return {
        **{f"{k}_img_s": v for k, v in results.items()},
        "ratios": {
            "cached_over_seed_loop": results["cached"] / results["seed_loop"],
            "cached_over_online": results["cached"] / results["online"],
            "cached_over_plain": results["cached"] / results["plain"],
        },
        "peak_device_mem_mb": peaks,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "runtime": rt.describe(),
        "teacher_arch": cfg.teacher_arch,
        "student_arch": cfg.student_arch,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "data": source,
        "torch": torch.__version__,
        "kdcache": __version__,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
