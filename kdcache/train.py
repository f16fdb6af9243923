"""ONE training loop for teacher and student: only the batch plan and the loss differ.

The data (uint8) and any cached soft targets live on the device; each epoch's views
are rendered in batches by `views.render`. On CUDA the step runs under bf16 autocast
in channels_last, and loss/accuracy accumulate on the device and are read once per
epoch, so there is no host synchronisation per step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from kdcache.artifacts import refuse_different
from kdcache.config import TTA_LEVELS
from kdcache.errors import KDCacheError
from kdcache.models import atomic_torch_save, finite_weights, unwrap
from kdcache.views import Views, normalize, render_views, shuffle_order


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the default process group is set up once,
    NCCL on CUDA and gloo on CPU; without torchrun (0, 1) and nothing changes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        import atexit

        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: device, autocast dtype, memory format, compilation."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    resident_bytes: int | None = None  # training images up to this size live on the device (None: see `place`)
    rank: int = 0  # under torchrun: this process's rank among `world` (one process: 0 of 1)
    world: int = 1

    @property
    def main(self) -> bool:
        """The one process that writes files and prints (rank 0)."""
        return self.rank == 0

    @classmethod
    def create(
        cls, device: str = "auto", precision: str = "auto", compile: bool = False, resident_mb: float | None = None
    ) -> Runtime:
        """auto: CUDA when present; bf16 autocast there, fp32 on CPU (bf16 runs on CPU too, slowly).

        channels_last everywhere: cuDNN and oneDNN convolutions both run faster in it
        (1.4-2x for the seed CNNs on a 2-core CPU).
        """
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise KDCacheError(f"--device must be auto, cpu or cuda (got {device!r})")
        if device == "cuda" and not torch.cuda.is_available():
            raise KDCacheError("--device cuda asked for, but PyTorch sees no CUDA GPU here: use --device cpu")
        if precision not in ("auto", "fp32", "bf16"):
            raise KDCacheError(f"--precision must be auto, fp32 or bf16 (got {precision!r})")
        bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
            # TF32 only where precision was traded already: --precision fp32 stays fp32.
            torch.backends.cuda.matmul.allow_tf32 = bf16
            torch.backends.cudnn.allow_tf32 = bf16
        if resident_mb is not None and not (math.isfinite(resident_mb) and resident_mb >= 0):
            raise KDCacheError(f"--resident-mb must be a number >= 0 (got {resident_mb})")
        budget = None if resident_mb is None else int(resident_mb * 1e6)
        rank, world = _distributed(device)
        where = torch.device(device)
        if device == "cuda" and world > 1:  # one GPU per process
            where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return cls(
            where,
            torch.bfloat16 if bf16 else None,
            channels_last=True,
            compile=compile,
            resident_bytes=budget,
            rank=rank,
            world=world,
        )

    def budget(self) -> int:
        """Bytes of training images that may stay resident: --resident-mb, else half of the device's
        free memory (CUDA) or half of the machine's physical memory (CPU)."""
        if self.device.type == "cuda" and self.resident_bytes is None:
            return torch.cuda.mem_get_info(self.device)[0] // 2
        return self.host_budget()

    def host_budget(self) -> int:
        """Bytes of cached teacher targets a student may hold in host memory: --resident-mb, else half the RAM."""
        if self.resident_bytes is not None:
            return self.resident_bytes
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def place(self, images):
        """Training images where the loop reads them: a uint8 tensor on the device when they fit the
        budget (CIFAR always does), else left as a host array (a memory-mapped store), streamed per batch."""
        if isinstance(images, torch.Tensor):
            return images.to(self.device)
        if images.nbytes <= self.budget():
            import numpy as np

            return torch.from_numpy(np.array(images)).to(self.device)
        return images

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device (channels_last if set); compile if asked. Keep `unwrap()` for saving."""
        model = model.to(
            self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format
        )
        return torch.compile(model) if self.compile else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        prec = "bf16 autocast" if self.amp_dtype is not None else "fp32"
        return (
            f"{self.device.type} · {prec}"
            + (" · channels_last" if self.channels_last else "")
            + (" · compiled" if self.compile else "")
            + (f" · {self.world} processes (torchrun, DDP)" if self.world > 1 else "")
        )

    def distribute(self, model: nn.Module) -> nn.Module:
        """Under torchrun, wrap for DistributedDataParallel (gradients averaged over the processes in
        backward); in one process, the model itself."""
        if self.world <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_sum(self, *tensors: torch.Tensor) -> None:
        """Sum tensors over the processes, in place (nothing without torchrun)."""
        if self.world > 1:
            import torch.distributed as dist

            for t in tensors:
                dist.all_reduce(t)


class EpochViews(NamedTuple):
    """What a plan gives for one epoch, one entry per sample, on the device."""

    views: Views  # [N]: each sample's view (its crop in the geometry's terms, its mix if mixed)
    targets: torch.Tensor | None  # the teacher's logits for that exact view [N, C], or a `TopK` [N] (students)


class Batch(NamedTuple):
    x: torch.Tensor  # normalised views [B, 3, H, W]
    y: torch.Tensor  # labels of the samples [B]
    t: torch.Tensor | None  # teacher logits for these views [B, C]
    y2: torch.Tensor | None  # partner labels [B] (mixed views)
    lam: torch.Tensor | None  # share of the sample's own label [B] (mixed views)
    scale: float = 1.0  # under torchrun: this rank's share of the global batch x world size (see ViewBatches)
    index: torch.Tensor | None = None  # the samples' rows in the training set [B] (ViewBatches)


Plan = Callable[[int], EpochViews]


@dataclass
class ViewBatches:
    """Per-epoch batches of rendered views from device-resident uint8 images.

    `plan(epoch)` gives every sample's view for the epoch and, for a student, the
    matching teacher logits; the sample order depends only on (seed, epoch), so an
    epoch is the same whatever happened before it.
    """

    images: torch.Tensor  # uint8 [N, 3, H, W], on the device
    labels: torch.Tensor  # int64 [N], on the device
    plan: Plan
    batch_size: int
    seed: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Compiled models recompile for every new batch shape: skip the epoch's last
    # partial batch then (the order changes each epoch, so no sample is always left out).
    drop_last: bool = False
    # Under torchrun every rank takes its contiguous share of each global batch (the same global
    # order, views and schedule for any number of processes); a final global batch smaller than
    # `world` is skipped. A rank's mean loss is scaled by world * its share / the global batch, so
    # DDP's gradient average is the global batch's mean gradient.
    rank: int = 0
    world: int = 1

    def __len__(self) -> int:
        n = len(self.labels)
        full = n // self.batch_size if self.drop_last and n >= self.batch_size else -(-n // self.batch_size)
        last = n - (full - 1) * self.batch_size if full else 0
        return full - 1 if self.world > 1 and 0 < last < self.world else full

    def _local(self) -> list[tuple[int, int, float]]:
        """This rank's positions [lo, hi) in the epoch's order for every global batch, and its loss scale."""
        parts = []
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            size = min(self.batch_size, len(self.labels) - start)
            share, extra = divmod(size, self.world)  # as tensor_split: the first `extra` ranks take one more
            lo = start + self.rank * share + min(self.rank, extra)
            hi = lo + share + (self.rank < extra)
            parts.append((lo, hi, self.world * (hi - lo) / size))
        return parts

    def epoch(self, epoch: int) -> Iterator[Batch]:
        views, targets = self.plan(epoch)
        device = self.labels.device
        order = shuffle_order(self.seed, len(self.labels), epoch)
        parts = self._local()
        streamed = None
        if not isinstance(self.images, torch.Tensor):  # a host store: gather each batch's rows ahead, in a thread
            partner = None if views.mix is None else views.mix.partner.cpu()
            streamed = prefetch(self.images, [order[lo:hi] for lo, hi, _ in parts], partner, device)
        # Everything per sample is put in the epoch's order once, so a batch is a slice of each
        # (one gather per tensor per epoch, not per batch: fewer small ops in the hot loop).
        order = order.to(device)
        take = lambda t: None if t is None else t.index_select(0, order)  # noqa: E731 - faster than t[idx] on CPU
        views, targets, labels = views.take(order), take(targets), take(self.labels)
        y2 = None if views.mix is None else self.labels.index_select(0, views.mix.partner.clamp(min=0))
        for lo, hi, scale in parts:
            idx, v = order[lo:hi], views[lo:hi]
            images, rows = self.images, idx
            if streamed is not None:  # the batch's own and partner rows, renumbered into the gathered block
                images, rows, local_partner = next(streamed)
                v = v.with_partners(local_partner)
            x = render_views(images, rows, v, self.mean, self.std)
            yield Batch(
                x,
                labels[lo:hi],
                None if targets is None else targets[lo:hi],
                None if y2 is None else y2[lo:hi],
                None if v.mix is None else v.mix.lam,
                scale,
                idx,
            )


def gather_rows(store, rows: torch.Tensor, partner: torch.Tensor | None = None, device=None):
    """Rows of a host store (a numpy/memory-mapped uint8 array [N,3,H,W]) as one block on `device`:
    (block, local rows, local partners or None). Each needed row is read once, in ascending order
    (sequential reads); pinned first when the device is CUDA, so the copy runs asynchronously."""
    import numpy as np

    own = rows.cpu().numpy()
    if partner is not None:  # an unmixed view (partner -1) reads no other row
        p = partner.cpu().numpy()
        need = np.concatenate([own, np.where(p < 0, own, p)])
    else:
        need = own
    uniq, inverse = np.unique(need, return_inverse=True)
    block = torch.from_numpy(np.ascontiguousarray(store[uniq]))
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        block = block.pin_memory()
    inverse = torch.from_numpy(inverse.astype(np.int64))
    local_partner = None
    if partner is not None:  # unmixed views keep partner -1
        local_partner = torch.where(partner.cpu() < 0, -1, inverse[len(own) :])
        local_partner = local_partner.to(device, non_blocking=True)
    return block.to(device, non_blocking=True), inverse[: len(own)].to(device, non_blocking=True), local_partner


PREFETCH_WORKERS = (
    3  # batches gathered at once from a host store (threads: numpy's copy and the JPEG decoder release the GIL)
)


def prefetch(store, batches: list[torch.Tensor], partner: torch.Tensor | None, device, workers: int = PREFETCH_WORKERS):
    """Yield `gather_rows` for each batch of rows, in order, gathered by `workers` background threads up to
    2 x workers batches ahead (a memory-mapped store's copies and page faults, or a jpeg store's decoding,
    overlap the training step and each other)."""
    from concurrent.futures import ThreadPoolExecutor

    def job(rows):
        return gather_rows(store, rows, None if partner is None else partner.index_select(0, rows), device)

    depth = 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdcache-gather") as pool:
        pending = [pool.submit(job, b) for b in batches[:depth]]
        for i in range(len(batches)):
            if i + depth < len(batches):
                pending.append(pool.submit(job, batches[i + depth]))
            yield pending[i].result()
            pending[i] = None


class Diverged(KDCacheError):
    """The loss (or a weight) went NaN/inf during `epoch` (1-based): the epoch is thrown away."""

    def __init__(self, epoch: int, loss: float, lr: float):
        self.epoch, self.loss, self.lr = epoch, loss, lr
        super().__init__(f"training diverged in epoch {epoch} (loss {loss:g}, lr {lr:g})")


LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def make_step(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, rt: Runtime, teacher=None):
    """One optimisation step; returns (loss, correct) as device tensors (no sync).

    With `teacher`, its logits are computed on the same views in every step (online
    distillation: the honest comparison for a cache, and the seed notebook's loop).
    """

    def step(batch: Batch):
        x = rt.input(batch.x)
        with rt.autocast():
            if teacher is not None:
                with torch.no_grad():
                    batch = batch._replace(t=teacher(x))
            out = model(x)
        loss = loss_fn(out, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss * batch.scale if batch.scale != 1.0 else loss).backward()
        optimizer.step()
        return loss.detach(), (out.argmax(1) == batch.y).sum()

    return step


class Progress(Protocol):
    """How long work reports itself: bars, plus one-line notes once the inputs are checked."""

    def note(self, message: str) -> None: ...
    def begin(self, description: str, total: int) -> None: ...
    def advance(self) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    def note(self, message: str) -> None:
        pass

    def begin(self, description: str, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def end(self) -> None:
        pass


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    rt: Runtime,
    *,
    rows: torch.Tensor | None = None,
    views: Views | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """float32 logits for uint8 images: [N, C] for the plain images, or, with `rows` [M] and
    their `views` [M], [M, C] for those views of images[rows].

    A compiled model sees one batch shape only: a short last batch is padded with zero
    images (and their logits dropped), since a second shape means a recompilation.
    """
    model.eval()
    one_shape = unwrap(model) is not model
    outs = []
    total = len(images) if rows is None else len(rows)
    for start in range(0, total, batch_size):
        if rows is None:
            x = normalize(images[start : start + batch_size].to(rt.device, non_blocking=True), mean, std)
        else:
            part = slice(start, start + batch_size)
            v = views[part]
            if isinstance(images, torch.Tensor):
                block, local = images, rows[part].to(images.device)
                v = v.to(images.device)
            else:  # a host store: gather this batch's rows (and partners) first
                block, local, partner = gather_rows(
                    images, rows[part], None if v.mix is None else v.mix.partner, rt.device
                )
                v = v.to(rt.device).with_partners(partner)
            x = render_views(block, local, v, mean, std)
        n = len(x)
        if one_shape and n < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
        with rt.autocast():
            outs.append(model(rt.input(x))[:n].float())
    return torch.cat(outs)


class TTAModel(nn.Module):
    """A model's logits averaged over mirrored (and shifted) copies of its input, as airbench
    evaluates: `flip` = mean of the view's and its mirror's logits (a two-member ensemble);
    `flip-translate` = half that, half the same over the input shifted by one pixel up-left and
    down-right (reflect padding)."""

    LEVELS = TTA_LEVELS

    def __init__(self, model: nn.Module, level: str):
        super().__init__()
        self.model, self.level = model, level

    def _mirrored(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(x.flip(-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == "none":
            return self.model(x)
        logits = self._mirrored(x)
        if self.level == "flip":
            return logits
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        shifted = [padded[..., :h, :w], padded[..., 2 : h + 2, 2 : w + 2]]
        return 0.5 * logits + 0.25 * sum(self._mirrored(v.contiguous(memory_format=fmt)) for v in shifted)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1).cpu() == labels.cpu()).float().mean().item()


def lr_factor(schedule: str, epoch: float, epochs: int, warmup_epochs: int = 0) -> float:
    """The learning rate's multiple of the peak at `epoch` (fractional: steps / steps per epoch):
    linear warm-up (1 + e) / (w + 1) for e < w (lr/(w+1) at the first step, as an epoch-wise
    warm-up has it), then cosine to 0, linear to 0, or constant over the remaining epochs."""
    if epoch < warmup_epochs:
        return (1 + epoch) / (warmup_epochs + 1)
    done = min((epoch - warmup_epochs) / max(epochs - warmup_epochs, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done))
    if schedule == "linear":
        return 1.0 - done
    return 1.0


def build_optimizer(
    model: nn.Module,
    *,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    epochs: int,
    schedule: str,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    nesterov: bool = False,
    bn_bias_lr: float = 1.0,
):
    """The optimiser and its schedule, stepped after every batch (`lr_factor`; at the start of each
    epoch it equals the epoch-wise schedule). Frozen parameters are left out. `bn_bias_lr`:
    BatchNorm biases learn at that multiple of lr with weight decay divided by it, so their decay
    per step stays lr x weight decay (airbench's bias scaling)."""
    model = unwrap(model)
    bn_bias = {
        id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    }
    trained = [p for p in model.parameters() if p.requires_grad]
    scaled = {id(p) for p in trained if id(p) in bn_bias} if bn_bias_lr != 1.0 else set()
    groups = [
        {"params": [p for p in trained if id(p) not in scaled]},
        {
            "params": [p for p in trained if id(p) in scaled],
            "lr": lr * bn_bias_lr,
            "weight_decay": weight_decay / bn_bias_lr,
        },
    ]
    groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    else:
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    steps = max(steps_per_epoch, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(schedule, step / steps, epochs, warmup_epochs)
    )
    return opt, scheduler


class WeightAverage:
    """An exponential moving average of the weights and buffers (BatchNorm statistics too),
    updated after every step: decay min(ema, (1 + n) / (10 + n)) at step n, so early steps are
    not dominated by the random initialisation. Built on torch's `AveragedModel`."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel

        self.decay, self.steps = decay, 0

        def ema(averaged: list, current: list, _n) -> None:  # counted here: reading _n would sync with the GPU
            d = min(decay, (1 + self.steps) / (10 + self.steps))
            floats = [(a, c) for a, c in zip(averaged, current, strict=False) if a.is_floating_point()]
            if floats:  # torch calls this once per (device, dtype) group
                torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
            for a, c in zip(averaged, current, strict=False):
                if not a.is_floating_point():  # BatchNorm's batch counter
                    a.copy_(c)

        self.averaged = AveragedModel(unwrap(model), multi_avg_fn=ema, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(unwrap(model))
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.averaged.load_state_dict(state["averaged"])


def fit(
    model: nn.Module,
    batches: ViewBatches,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rt: Runtime,
    *,
    epochs: int,
    test: tuple[torch.Tensor, torch.Tensor],
    on_epoch: Callable[[int, dict], None],
    start_epoch: int = 0,
    progress: Progress | None = None,
    teacher: nn.Module | None = None,
    teacher_test_logits: torch.Tensor | None = None,
    ema: WeightAverage | None = None,
) -> None:
    """Train epochs [start_epoch, epochs); after each, evaluate and hand metrics to `on_epoch`.

    `teacher`: run it on every batch (online distillation). `teacher_test_logits` [N_test, C]:
    also log the student's fidelity to the teacher on the test set (top-1 agreement, KL).
    `ema`: updated after every step; evaluation reads the average (the raw weights' accuracy is
    logged beside it as test_acc_raw).
    """
    progress = progress or NoProgress()
    model = rt.distribute(model)  # torchrun: DDP
    step = make_step(model, loss_fn, optimizer, rt, teacher=teacher)
    test_x, test_y = test[0].to(rt.device), test[1]  # resident too: evaluation copies nothing per epoch
    for epoch in range(start_epoch, epochs):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=rt.device)
        correct = torch.zeros((), device=rt.device, dtype=torch.long)
        seen = 0
        progress.begin(f"epoch {epoch + 1}/{epochs}", len(batches))
        t0 = time.perf_counter()
        for batch in batches.epoch(epoch):
            loss, right = step(batch)
            scheduler.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss * len(batch.y)
            correct += right
            seen += len(batch.y)
            progress.advance()
        total = torch.tensor(seen, device=rt.device, dtype=torch.long)
        rt.all_sum(loss_sum, correct, total)  # every process's share (nothing to do in one process)
        seen = int(total.item())
        train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen  # the one sync per epoch
        train_time = time.perf_counter() - t0
        progress.end()
        if not (math.isfinite(train_loss) and finite_weights(model)):
            raise Diverged(epoch + 1, train_loss, lr)
        # Eager evaluation: eval mode and no_grad would each be one more compiled graph.
        evaluated = unwrap(model) if ema is None else ema.module
        # evaluated in training-sized batches: what fits a training step fits an evaluation (1,024 224-pixel
        # images at once did not: tens of GB of activations)
        test_logits = predict(evaluated, test_x, batches.mean, batches.std, rt, batch_size=batches.batch_size)
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_acc": accuracy(test_logits, test_y),
            "train_time_s": train_time,
            "train_img_s": seen / train_time,
        }
        if ema is not None:
            metrics["test_acc_raw"] = accuracy(
                predict(unwrap(model), test_x, batches.mean, batches.std, rt, batch_size=batches.batch_size), test_y
            )
        if teacher_test_logits is not None:
            metrics.update(fidelity(test_logits, teacher_test_logits))
        on_epoch(epoch, metrics)


def fidelity(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict:
    """How closely the student matches the teacher on the same images: top-1 agreement and
    KL(teacher || student) at T = 1 (mean over images, nats)."""
    s, t = student_logits.float().cpu(), teacher_logits.float().cpu()
    kl = torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), reduction="batchmean", log_target=True)
    return {"teacher_agreement": (s.argmax(1) == t.argmax(1)).float().mean().item(), "teacher_kl": kl.item()}


# ---- resumable training state -------------------------------------------------------------


def resume_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".resume")


def save_resume(
    path: Path,
    *,
    model,
    optimizer,
    scheduler,
    epochs_done: int,
    history: list[dict],
    identity: dict,
    ema: WeightAverage | None = None,
) -> None:
    """Everything needed to continue bit-for-bit on CPU: weights (and their average), optimiser, schedule, RNG."""
    atomic_torch_save(
        {
            "ema": None if ema is None else ema.state_dict(),
            "identity": identity,
            "epochs_done": epochs_done,
            "history": history,
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        path,
    )


def load_resume(
    path: Path, *, model, optimizer, scheduler, identity: dict, ema: WeightAverage | None = None
) -> tuple[int, list[dict]]:
    """Restore a state saved by `save_resume`; returns (epochs done, metric history)."""
    if not path.exists():
        raise KDCacheError(f"no resume state at {path}: start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDCacheError(f"{path} is unreadable ({type(e).__name__}): pass --force to start over") from None
    refuse_different(path, state["identity"], identity)
    unwrap(model).load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["epochs_done"], state["history"]
