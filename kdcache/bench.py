"""`kdcache bench`: images per second of its loops, side by side, in one process.

- seed_loop: notebook 1 as written: torchvision-style dataset of PIL images,
  DataLoader(num_workers=2), RandomCrop/Flip/ToTensor/Normalize, teacher forward
  every step, fp32 (the "before").
- online:    our GPU-resident hot loop, teacher forward in every step.
- cached:    our student from the cache (teacher logits gathered from device memory).
- cached_mixed / cached_mixed_alone: the student on mixed cached views with KD, and with alpha 0
  (same views, no soft term): their ratio is what the KD loss adds to a step.
- plain:     our student with no teacher at all (the floor).
- plain_mixed: the same, on fresh mixed views (CutMix/MixUp, no cache, no teacher): what mixing
  itself costs (a second image rendered and blended), so cached_mixed_alone/plain_mixed (both alpha 0,
  the same kind of views) is the cache's own cost.
- dump:      teacher inference over rendered views, as dump-logits runs it.
- sweep_separate / sweep_loop / sweep_stacked: M students from the cache, as M separate runs, in one
  pass (kdcache sweep's loop backend) and fused (its stacked backend); one step trains all M.
Weights are random: throughput does not depend on what a model has learned.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from kdcache import __version__
from kdcache.batches import Batch, ViewBatches
from kdcache.config import SEED_RESNET_MEAN, SEED_RESNET_STD
from kdcache.data import load_dataset
from kdcache.errors import KDCacheError
from kdcache.inference import predict
from kdcache.losses import student_loss
from kdcache.models import ARCHS, build
from kdcache.runtime import Runtime
from kdcache.stages import cached_plan, fresh_views_plan
from kdcache.train import make_step
from kdcache.views import CropFlip, draw_views

NUM_VIEWS = 8
# Mixed views, cached and fresh alike (so cached_mixed_alone/plain_mixed compares like with like): every
# view CutMix or MixUp, the worst case for rendering.
MIX, MIX_PROB = "both", 1.0


@dataclass
class BenchConfig:
    teacher_arch: str = "resnet50"
    student_arch: str = "resnet18"
    batch_size: int = 512
    steps: int = 50
    warmup: int = 5
    repeats: int = 3
    data_dir: Path | None = None
    T: float = 3.0
    alpha: float = 0.5
    sweep_students: int = 8  # M: the sweep loops train M students of student_arch (0: no sweep loops)

    def validate(self) -> BenchConfig:
        if self.batch_size < 1 or self.steps < 1 or self.repeats < 1 or self.warmup < 0:
            raise KDCacheError("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
        if self.sweep_students < 0 or self.sweep_students == 1:
            raise KDCacheError(f"--sweep-students {self.sweep_students}: give 2 or more, or 0 for no sweep loops")
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


def _working_mb(run, device: torch.device):
    """Run `run()`; return its result and the device memory it needed above what was
    already allocated (every loop's models, optimiser state and data stay resident
    throughout, so this is the loop's own working memory: activations, temporaries).
    None on CPU."""
    if device.type != "cuda":
        return run(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = run()
    return result, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _window(run_step, it, steps: int, device) -> float:
    """img/s over `steps` steps of one loop (the device is drained before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    seen = 0
    for _ in range(steps):
        batch = next(it)
        run_step(batch)
        seen += len(batch[0][1]) if isinstance(batch, list) else len(batch[1])  # a list: one batch per student
    _sync(device)
    return seen / (time.perf_counter() - t0)


def _endless(source: ViewBatches):
    epoch = 0
    while True:
        yield from source.epoch(epoch)
        epoch += 1


def _measure(loops: dict, cfg: BenchConfig, device, log) -> tuple[dict, dict, dict]:
    """Warm every loop up, then time them in turn, `repeats` rounds: per loop the median img/s,
    every round's figure, and the peak working memory. Taking turns means a machine that
    slows down or speeds up mid-run moves every loop alike, and the ratios stay fair."""
    its = {name: iter(batches) for name, (_, batches) in loops.items()}
    rounds: dict[str, list[float]] = {name: [] for name in loops}
    peaks: dict[str, float | None] = {name: None for name in loops}
    for name, (step, _) in loops.items():
        log(f"warming up {name}")
        for _ in range(cfg.warmup):
            step(next(its[name]))
    for r in range(cfg.repeats):
        for name, (step, _) in loops.items():
            log(f"round {r + 1}/{cfg.repeats}: {name}")
            img_s, mb = _working_mb(lambda step=step, it=its[name]: _window(step, it, cfg.steps, device), device)
            rounds[name].append(img_s)
            peaks[name] = mb if peaks[name] is None else max(peaks[name], mb)
    return {name: statistics.median(v) for name, v in rounds.items()}, rounds, peaks


def _cache_bytes(k: int = 10) -> dict:
    """Stored target bytes per view, dense fp16 against a top-k cache, for C = 10, 100 and 1,000
    (from the datasets' dtypes; HDF5 adds its chunk overhead to both)."""
    from kdcache.topk import bytes_per_view

    return {str(c): {"dense": bytes_per_view(c, None), f"top{k}": bytes_per_view(c, k)} for c in (10, 100, 1000)}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _about(cfg: BenchConfig, data: str) -> dict:
    """What every bench record states besides its figures: the settings, the data, the versions, the date."""
    return {
        "teacher_arch": cfg.teacher_arch,
        "student_arch": cfg.student_arch,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "data": data,
        "torch": torch.__version__,
        "kdcache": __version__,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _synthetic(n: int = 50000) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of CIFAR-10's shape and size (the same memory footprint and partial last batch
    as real data), and labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def _student_step(arch: str, num_classes: int, rt: Runtime, *, T: float, alpha: float, teacher=None):
    """A freshly seeded student (DDP under torchrun), its optimiser and loss, as one training step."""
    torch.manual_seed(0)
    model = rt.distribute(rt.prepare(build(arch, num_classes)).train())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss = lambda s, b: student_loss(s, b.y, b.t, T=T, alpha=alpha, partner_labels=b.y2, lam=b.lam)  # noqa: E731
    return make_step(model, loss, opt, rt, teacher=teacher)


def _sweep_loops(cfg: BenchConfig, rt: Runtime, c: int, images, labels, views, logits, mean, std) -> dict:
    """M students of `cfg.student_arch` from the cache, three ways, each step training all M once:
    sweep_separate (each student renders and takes its own batch, as M separate runs would), sweep_loop
    (one batch rendered, every student's step on it: kdcache sweep's loop backend, each with its own random
    stream) and sweep_stacked (the M students fused by torch.func: the stacked backend). img/s counts one
    batch per step; times M for student-images/s."""
    from kdcache.stacked import Stacked
    from kdcache.train import Member

    m = cfg.sweep_students

    def students():
        out = []
        for i in range(m):
            torch.manual_seed(i)
            out.append(build(cfg.student_arch, c))
        return out

    def optimizer(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    def loss_fn(T):
        return lambda s, b: student_loss(s, b.y, b.t, T=T, alpha=cfg.alpha, partner_labels=b.y2, lam=b.lam)

    def member(model, i):
        model = rt.prepare(model).train()
        return Member(model, loss_fn(1.0 + i), *optimizer(model), rt)

    def batches(seed):
        plan = cached_plan(views, logits, seed, rt.device)
        return ViewBatches(images, labels, plan, cfg.batch_size, seed, mean, std, rt.compile)

    separate = [member(model, i) for i, model in enumerate(students())]
    shared = [member(model, i) for i, model in enumerate(students())]
    for one in shared:
        one.rng = torch.get_rng_state()
    models = [model.to(rt.device).train() for model in students()]
    stacked = Stacked(models, [loss_fn(1.0 + i) for i in range(m)], rt, optimizer)
    own = [_endless(batches(i)) for i in range(m)]

    def step_separate(batch_list):
        for one, batch in zip(separate, batch_list, strict=True):
            one.step(batch)

    def step_loop(batch):
        for one in shared:
            torch.set_rng_state(one.rng)
            one.step(batch)
            one.rng = torch.get_rng_state()

    def each_own():  # one step: every student renders and takes its own batch
        while True:
            yield [next(it) for it in own]

    return {
        "sweep_separate": (step_separate, each_own()),
        "sweep_loop": (step_loop, _endless(batches(0))),
        "sweep_stacked": (stacked.step, _endless(batches(0))),
    }


def run_bench(cfg: BenchConfig, rt: Runtime, log=lambda msg: None) -> dict:
    """Measure every loop on the same data, models and batch size; return the JSON record."""
    cfg.validate()
    dev = rt.device
    if cfg.data_dir is not None:
        data = load_dataset("cifar10", cfg.data_dir)
        images, labels, source = data.train_x, data.train_y, f"CIFAR-10 from {cfg.data_dir}"
    else:
        images, labels = _synthetic()
        source = f"synthetic uint8 {tuple(images.shape)}"
    n, c = len(labels), 10
    mean, std = SEED_RESNET_MEAN, SEED_RESNET_STD
    torch.manual_seed(0)
    teacher_raw = build(cfg.teacher_arch, c).eval()

    def student_and_step(teacher=None, *, rt_: Runtime, alpha: float):
        return _student_step(cfg.student_arch, c, rt_, T=cfg.T, alpha=alpha, teacher=teacher)

    # -- seed_loop: the notebook's loop, fp32, NCHW, PIL + DataLoader workers.
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    loader = torch.utils.data.DataLoader(
        _PILImages(hwc, labels.numpy(), tf),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=2,
        pin_memory=dev.type == "cuda",
        drop_last=True,
        persistent_workers=True,
    )
    seed_rt = Runtime(dev, None, channels_last=False)
    seed_teacher = build(cfg.teacher_arch, c).to(dev).eval()
    seed_step = student_and_step(seed_teacher, rt_=seed_rt, alpha=cfg.alpha)

    def endless_loader():
        while True:
            for x, y in loader:
                yield Batch(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), None, None, None)

    # -- our loops: device-resident uint8 data, batched rendering.
    images_d, labels_d = images.to(dev), labels.to(dev)
    teacher = rt.prepare(teacher_raw)
    fresh = ViewBatches(
        images_d, labels_d, fresh_views_plan(CropFlip(), n, 0, True, dev), cfg.batch_size, 0, mean, std, rt.compile
    )
    fresh_mixed = ViewBatches(
        images_d,
        labels_d,
        fresh_views_plan(CropFlip(), n, 0, True, dev, mix=MIX, mix_prob=MIX_PROB),
        cfg.batch_size,
        0,
        mean,
        std,
        rt.compile,
    )
    plain_views = draw_views(CropFlip(), 0, range(n), range(NUM_VIEWS))
    mixed_views = draw_views(CropFlip(), 0, range(n), range(NUM_VIEWS), mix=MIX, prob=MIX_PROB, num_rows=n)
    logits = torch.randn(n, NUM_VIEWS, c, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    cached, cached_mixed = (
        ViewBatches(images_d, labels_d, cached_plan(v, logits, 0, dev), cfg.batch_size, 0, mean, std, rt.compile)
        for v in (plain_views, mixed_views)
    )
    # dump: teacher inference over rendered views, one batch of (image, view) rows per step, as dump-logits runs it
    flat_views = plain_views.flatten().to(dev)

    def dump_rows():
        rows = n * NUM_VIEWS
        while True:
            for start in range(0, rows - cfg.batch_size + 1, cfg.batch_size):
                idx = torch.arange(start, start + cfg.batch_size, device=dev)
                yield idx // NUM_VIEWS, flat_views.take(idx)

    def dump_step(rows_and_views):
        rows, views = rows_and_views
        predict(teacher, images_d, mean, std, rt, rows=rows, views=views, batch_size=cfg.batch_size)

    loops = {
        "seed_loop": (seed_step, endless_loader()),
        "online": (student_and_step(teacher, rt_=rt, alpha=cfg.alpha), _endless(fresh)),
        "cached": (student_and_step(rt_=rt, alpha=cfg.alpha), _endless(cached)),
        "cached_mixed": (student_and_step(rt_=rt, alpha=cfg.alpha), _endless(cached_mixed)),
        # the same mixed cached views with alpha 0: what the KD loss itself adds to a step
        "cached_mixed_alone": (student_and_step(rt_=rt, alpha=0.0), _endless(cached_mixed)),
        "plain": (student_and_step(rt_=rt, alpha=0.0), _endless(fresh)),
        "plain_mixed": (student_and_step(rt_=rt, alpha=0.0), _endless(fresh_mixed)),
        "dump": (dump_step, dump_rows()),
    }
    if cfg.sweep_students:
        loops |= _sweep_loops(cfg, rt, c, images_d, labels_d, plain_views, logits, mean, std)
    results, rounds, peaks = _measure(loops, cfg, dev, log)
    sweep_ratios = {}
    if cfg.sweep_students:  # the same M students: in one pass (each backend) against M separate runs
        sweep_ratios = {
            f"sweep_{b}_over_separate": results[f"sweep_{b}"] / results["sweep_separate"] for b in ("loop", "stacked")
        }

    return {
        **{f"{k}_img_s": v for k, v in results.items()},
        "ratios": {
            "cached_over_seed_loop": results["cached"] / results["seed_loop"],
            "cached_over_online": results["cached"] / results["online"],
            "cached_over_plain": results["cached"] / results["plain"],
            "cached_mixed_over_plain": results["cached_mixed"] / results["plain"],
            "cached_mixed_alone_over_plain_mixed": results["cached_mixed_alone"] / results["plain_mixed"],
            "kd_loss_overhead": results["cached_mixed_alone"] / results["cached_mixed"] - 1.0,
            **sweep_ratios,
        },
        "sweep_students": cfg.sweep_students,
        "rounds_img_s": rounds,
        "peak_working_mem_mb": peaks,
        "cache_bytes_per_view": _cache_bytes(),
        "device": _device_name(dev),
        "runtime": rt.describe(),
        **_about(cfg, source),
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _imagefolder_loader(folder: Path, image_size: int, batch_size: int, device: torch.device):
    """The loop people run today: torchvision `ImageFolder` + `DataLoader(num_workers=all cores, pin_memory)`
    + RandomResizedCrop + flip + ToTensor + Normalize, decoding every file in every epoch; endless batches."""
    import os

    from torchvision import datasets, transforms

    from kdcache.data import IMAGENET_MEAN, IMAGENET_STD

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder / "train"), transform=tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=os.cpu_count() or 1,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=True,
    )
    while True:
        for x, y in loader:
            yield Batch(x.to(device, non_blocking=True), y.to(device, non_blocking=True), None, None, None)


def run_folder_bench(cfg: BenchConfig, rt: Runtime, folder: Path | None, image_size: int, log=lambda msg: None) -> dict:
    """Image-folder loops side by side, same student and batch: the ImageFolder + DataLoader loop users run
    today (teacher online, and alone), and kdcache's student from the cache and alone with the raw store
    resident on the device and streamed from host memory, and from the jpeg store (decoded per batch);
    plus both stores' preparation speed and bytes. Random-resized crops at `image_size`; a synthetic
    folder (24 classes x 60 images, PIL-written JPEG/PNG) without one."""
    import os
    import tempfile

    from kdcache import folders
    from kdcache.data import IMAGENET_MEAN, IMAGENET_STD, load_folder

    cfg.validate()
    dev = rt.device
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        source = str(folder)
        if folder is None:  # photo-sized for the view size: sides from 1 to 2 x image_size (ImageNet's are ~400 px)
            sizes = (image_size, 2 * image_size)
            folder = folders.write_image_folder(
                Path(tmp) / "synthetic", classes=24, per_class=60, val_per_class=4, sizes=sizes
            )
            source = f"synthetic folder, 24 classes x 60 images of {sizes[0]}-{sizes[1]} px"
        saved = os.environ.get("KDCACHE_STORE_DIR")
        os.environ["KDCACHE_STORE_DIR"] = str(Path(tmp) / "stores")  # never touch the user's store
        try:
            store_size = folders.default_store_size(image_size)
            prep_s, stores = {}, {}
            for fmt in ("raw", "jpeg"):
                log(f"preparing the {fmt} store")
                t0 = time.perf_counter()
                train, val, _, where = folders.prepare(folder, store_size, store_format=fmt)
                prep_s[fmt] = time.perf_counter() - t0
                stores[fmt] = _folder_bytes(where)
            prepared = len(train.labels) + len(val.labels)
            data = load_folder(folder, image_size=image_size, store_size=store_size, store_format="raw")
            jpeg = load_folder(folder, image_size=image_size, store_size=store_size, store_format="jpeg").train_x
            n, c, g = len(data.train_y), data.num_classes, data.geometry
            labels = data.train_y.to(dev)
            resident = torch.from_numpy(np.array(data.train_x)).to(dev)
            streamed = data.train_x  # the memory-mapped store
            views = draw_views(g, 0, range(n), range(NUM_VIEWS))
            logits = torch.randn(n, NUM_VIEWS, c, generator=torch.Generator().manual_seed(1)).to(torch.float16)

            def source_of(images, cached: bool) -> ViewBatches:
                plan = cached_plan(views, logits, 0, dev) if cached else fresh_views_plan(g, n, 0, True, dev)
                return ViewBatches(images, labels, plan, cfg.batch_size, 0, IMAGENET_MEAN, IMAGENET_STD, rt.compile)

            def step(alpha: float, rt_: Runtime = rt, teacher=None):
                torch.manual_seed(0)
                model = rt_.prepare(build(cfg.student_arch, c, image_size=image_size)).train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                loss = lambda s, b: student_loss(s, b.y, b.t, T=cfg.T, alpha=alpha)  # noqa: E731
                return make_step(model, loss, opt, rt_, teacher=teacher)

            # the usual loop: NCHW, the runtime's precision, the teacher's forward in every step
            usual = Runtime(dev, rt.amp_dtype, channels_last=False)
            torch.manual_seed(0)
            teacher = usual.prepare(build(cfg.teacher_arch, c, image_size=image_size)).eval()
            loops = {
                "imagefolder_online": (
                    step(cfg.alpha, usual, teacher),
                    _imagefolder_loader(folder, image_size, cfg.batch_size, dev),
                ),
                "imagefolder_plain": (step(0.0, usual), _imagefolder_loader(folder, image_size, cfg.batch_size, dev)),
                "plain": (step(0.0), _endless(source_of(resident, False))),
                "cached": (step(cfg.alpha), _endless(source_of(resident, True))),
                "plain_streamed": (step(0.0), _endless(source_of(streamed, False))),
                "cached_streamed": (step(cfg.alpha), _endless(source_of(streamed, True))),
                "cached_jpeg": (step(cfg.alpha), _endless(source_of(jpeg, True))),
            }
            results, rounds, peaks = _measure(loops, cfg, dev, log)
        finally:
            if saved is None:
                os.environ.pop("KDCACHE_STORE_DIR", None)
            else:
                os.environ["KDCACHE_STORE_DIR"] = saved
        folder_bytes = _folder_bytes(folder)
    return {
        **{f"{k}_img_s": v for k, v in results.items()},
        "ratios": {
            "cached_jpeg_over_imagefolder_online": results["cached_jpeg"] / results["imagefolder_online"],
            "cached_over_imagefolder_online": results["cached"] / results["imagefolder_online"],
            "cached_over_plain": results["cached"] / results["plain"],
            "cached_streamed_over_plain_streamed": results["cached_streamed"] / results["plain_streamed"],
            "streamed_over_resident": results["cached_streamed"] / results["cached"],
            "jpeg_over_resident": results["cached_jpeg"] / results["cached"],
        },
        "prepare_img_s": prepared / prep_s["raw"],
        "prepare_jpeg_img_s": prepared / prep_s["jpeg"],
        "prepare_images": prepared,
        "store_bytes": {"folder": folder_bytes, **stores},
        "store": f"{n:,} x 3 x {store_size} x {store_size} uint8 ({resident.numel() / 1e6:,.0f} MB)",
        "rounds_img_s": rounds,
        "peak_working_mem_mb": peaks,
        "device": _device_name(dev),
        "runtime": rt.describe(),
        **_about(cfg, source),
        "image_size": image_size,
    }


# -- several processes: the cached student and the dump under torchrun, against one process.

PROCS_LOOPS = ("cached", "dump")


def _procs_worker(spec: dict, out: Path) -> None:
    """One process of a `--procs` round (started by torchrun): time `steps` steps of the cached
    student (DDP: each rank its share of every global batch) and of the dump (each rank its own
    contiguous rows, batches of `batch_size`, as a sharded dump runs). Rank 0 writes the global
    img/s of each, wall time taken between barriers, to `out`."""
    import json

    from kdcache.stages import cached_plan

    rt = Runtime.create(spec["device"], spec["precision"])  # joins the process group under torchrun
    dev, b, steps = rt.device, spec["batch_size"], spec["steps"]

    def barrier():
        if rt.world > 1:
            torch.distributed.barrier()
        _sync(dev)

    images, labels = _synthetic()
    n, c = len(labels), 10
    mean, std = SEED_RESNET_MEAN, SEED_RESNET_STD
    images_d, labels_d = images.to(dev), labels.to(dev)
    views = draw_views(CropFlip(), 0, range(n), range(NUM_VIEWS))
    logits = torch.randn(n, NUM_VIEWS, c, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    batches = ViewBatches(
        images_d, labels_d, cached_plan(views, logits, 0, dev), b, 0, mean, std, rank=rt.rank, world=rt.world
    )
    step = _student_step(spec["student_arch"], c, rt, T=spec["T"], alpha=spec["alpha"])
    teacher = rt.prepare(build(spec["teacher_arch"], c)).eval()
    rows = torch.arange(n * NUM_VIEWS, device=dev).tensor_split(rt.world)[
        rt.rank
    ]  # on the device once, as in run_bench
    flat = views.flatten().to(dev)

    def dump_steps(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            idx = rows[i * b : (i + 1) * b]
            predict(teacher, images_d, mean, std, rt, rows=idx // NUM_VIEWS, views=flat[idx], batch_size=b)

    it = _endless(batches)
    result = {"world": rt.world}
    for name, run in (("cached", lambda count, _: [step(next(it)) for _ in range(count)]), ("dump", dump_steps)):
        run(spec["warmup"], 0)
        barrier()
        t0 = time.perf_counter()
        run(steps, spec["warmup"])
        barrier()
        seen = b * steps * (rt.world if name == "dump" else 1)
        result[name] = seen / (time.perf_counter() - t0)
    if rt.main:
        out.write_text(json.dumps(result))


def run_procs_bench(cfg: BenchConfig, procs: int, rt: Runtime, log=lambda msg: None) -> dict:
    """The cached student and the dump in 1 process and in `procs` processes under torchrun,
    taking turns for `repeats` rounds (a fresh launch each time). On a CPU the cores are split
    evenly (1 process: all of them as threads; N: cores/N threads each); on CUDA each process
    takes one GPU. Global batch = --batch-size for the student, per process for the dump."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    cfg.validate()
    if procs < 2:
        raise KDCacheError(f"--procs must be >= 2 (got {procs}): it compares that many processes with one")
    cuda = rt.device.type == "cuda"
    if cuda and torch.cuda.device_count() < procs:
        raise KDCacheError(
            f"--procs {procs} on CUDA needs {procs} GPUs, this machine has {torch.cuda.device_count()}: use fewer"
        )
    if not cuda and cfg.batch_size < procs:
        raise KDCacheError(f"--batch-size {cfg.batch_size} cannot be split over {procs} processes: use a larger one")
    threads = torch.get_num_threads()
    spec = {
        "device": rt.device.type,
        "precision": "fp32" if rt.amp_dtype is None else "bf16",
        "teacher_arch": cfg.teacher_arch,
        "student_arch": cfg.student_arch,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "T": cfg.T,
        "alpha": cfg.alpha,
    }
    rounds: dict[int, list[dict]] = {1: [], procs: []}
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        out = Path(tmp) / "result.json"
        for r in range(cfg.repeats):
            for p in (1, procs):
                log(f"round {r + 1}/{cfg.repeats}: {p} process{'es' if p > 1 else ''}")
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // p))}
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    str(p),
                    "-m",
                    "kdcache.bench",
                    json.dumps(spec),
                    str(out),
                ]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
                    raise KDCacheError(
                        f"a {p}-process bench round failed ({lines[-1] if lines else f'exit {done.returncode}'})"
                    )
                rounds[p].append(json.loads(out.read_text()))
                out.unlink()
    median = {p: {loop: statistics.median(x[loop] for x in rs) for loop in PROCS_LOOPS} for p, rs in rounds.items()}
    return {
        "procs": procs,
        **{f"{loop}_img_s": {"1": median[1][loop], str(procs): median[procs][loop]} for loop in PROCS_LOOPS},
        "ratios": {f"{loop}_{procs}_over_1": median[procs][loop] / median[1][loop] for loop in PROCS_LOOPS},
        "rounds_img_s": {str(p): rs for p, rs in rounds.items()},
        "threads_per_process": {"1": threads, str(procs): max(1, threads // procs)} if not cuda else None,
        "device": _device_name(rt.device),
        **_about(cfg, "synthetic uint8 (50000, 3, 32, 32)"),
    }


if __name__ == "__main__":  # one process of run_procs_bench, under torchrun
    import json
    import sys

    _procs_worker(json.loads(sys.argv[1]), Path(sys.argv[2]))
