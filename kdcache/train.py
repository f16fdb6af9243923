"""ONE training loop for teacher and student: only the batch plan and the loss differ.

The data (uint8) and any cached soft targets live on the device; each epoch's views
are rendered in batches (`batches.ViewBatches`). On CUDA the step runs under bf16 autocast
in channels_last, and loss/accuracy accumulate on the device and are read once per
epoch, so there is no host synchronisation per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kdcache.artifacts import refuse_different
from kdcache.batches import Batch, ViewBatches
from kdcache.checkpoints import atomic_torch_save
from kdcache.errors import KDCacheError
from kdcache.inference import accuracy, fidelity, predict
from kdcache.models import finite_weights, unwrap
from kdcache.runtime import NoProgress, Progress, Runtime


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


class Member:
    """One model in training: its step (optimiser, schedule, weight average), its own random stream
    when it shares a pass with other members (dropout then draws what it would draw alone), and the
    reason it stopped, if it did. A member may hold several students (`stacked.Stacked`); this one
    holds one."""

    size = 1

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer,
        scheduler,
        rt: Runtime,
        *,
        ema: WeightAverage | None = None,
        teacher: nn.Module | None = None,
    ):
        self.raw = unwrap(model)
        self.model = rt.distribute(model)  # torchrun: DDP
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self._step = make_step(self.model, loss_fn, optimizer, rt, teacher=teacher)
        self.rng: torch.Tensor | None = None  # the CPU generator's state between this member's steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self.model.train()

    def step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss [1], correct [1]) as device tensors: no host sync."""
        loss, right = self._step(batch)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.reshape(1), right.reshape(1)

    def finite(self) -> list[bool]:
        return [finite_weights(self.model)]

    def state_dict(self) -> dict:
        """Everything to continue bit for bit on a CPU: weights (and their average), optimiser, schedule, stream."""
        return {
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "rng": self.rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.rng = state["rng"]

    def evaluated(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """Per student: (the model evaluation reads, the raw weights when that is an average, else None)."""
        return [(self.raw, None) if self.ema is None else (self.ema.module, self.raw)]


def fit(
    members: list,
    batches: ViewBatches,
    rt: Runtime,
    *,
    epochs: int,
    test: tuple[torch.Tensor, torch.Tensor],
    on_epoch: Callable[[int, list[dict | None]], None],
    start_epoch: int = 0,
    progress: Progress | None = None,
    teacher_test_logits: torch.Tensor | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_diverged: Callable[[int, Diverged], None] | None = None,
    stopped: set[int] | None = None,
) -> None:
    """Train every member on the same batches for epochs [start_epoch, epochs): each batch is made once
    and every member takes its step on it, one after another. After each epoch every student is
    evaluated and `on_epoch(epoch, metrics)` gets one dict per student (None for a stopped one), in
    the members' order.

    `teacher_test_logits` [N_test, C]: also log each student's fidelity to the teacher on the test set
    (top-1 agreement, KL). With several students, `step_time_s` is the time in a student's own steps
    (host time: on CUDA, launches). `val` (images, labels): a held-out part of the training images, evaluated
    as `val_acc`. A student whose loss or weights go NaN/inf: `on_diverged(student, Diverged)` and the
    others go on; without `on_diverged`, `Diverged` is raised. `stopped`: students already stopped
    (a resumed run)."""
    progress = progress or NoProgress()
    sizes = [m.size for m in members]
    first = [sum(sizes[:i]) for i in range(len(members))]
    stopped = set(stopped or ())
    shared = sum(sizes) > 1
    if shared:  # each member draws from its own stream, as it would alone
        for m in members:
            m.rng = torch.get_rng_state() if m.rng is None else m.rng
    test_x, test_y = test[0].to(rt.device), test[1]  # resident too: evaluation copies nothing per epoch
    for epoch in range(start_epoch, epochs):
        live = [i for i, m in enumerate(members) if not all(first[i] + j in stopped for j in range(m.size))]
        if not live:
            return
        lrs = {i: members[i].lr for i in live}
        loss_sum = {i: torch.zeros(sizes[i], device=rt.device) for i in live}
        correct = {i: torch.zeros(sizes[i], device=rt.device, dtype=torch.long) for i in live}
        for i in live:
            members[i].train()
        seen = 0
        progress.begin(f"epoch {epoch + 1}/{epochs}", len(batches))
        t0 = time.perf_counter()
        spent = dict.fromkeys(live, 0.0)
        for batch in batches.epoch(epoch):
            for i in live:
                m = members[i]
                t_step = time.perf_counter()
                if shared:
                    torch.set_rng_state(m.rng)
                loss, right = m.step(batch)
                if shared:
                    m.rng = torch.get_rng_state()
                spent[i] += time.perf_counter() - t_step
                loss_sum[i] += loss * len(batch.y)
                correct[i] += right
            seen += len(batch.y)
            progress.advance()
        train_time = time.perf_counter() - t0
        total = torch.tensor(seen, device=rt.device, dtype=torch.long)
        rt.all_sum(*loss_sum.values(), *correct.values(), total)  # every process's share (one process: nothing)
        seen = int(total.item())
        progress.end()
        results: list[dict | None] = [None] * sum(sizes)
        for i in live:
            m = members[i]
            losses, rights = (loss_sum[i] / seen).tolist(), (correct[i] / seen).tolist()  # the one sync per epoch
            for j, (finite, (evaluated, raw)) in enumerate(zip(m.finite(), m.evaluated(), strict=True)):
                student = first[i] + j
                if student in stopped:
                    continue
                if not (math.isfinite(losses[j]) and finite):
                    diverged = Diverged(epoch + 1, losses[j], lrs[i])
                    if on_diverged is None:
                        raise diverged
                    stopped.add(student)
                    on_diverged(student, diverged)
                    continue
                test_acc, extra = _evaluate(evaluated, raw, batches, rt, test_x, test_y, teacher_test_logits, val)
                results[student] = {
                    "epoch": epoch + 1,
                    "lr": lrs[i],
                    "train_loss": losses[j],
                    "train_acc": rights[j],
                    "test_acc": test_acc,
                    "train_time_s": train_time,
                    "train_img_s": seen / train_time,
                    **({"step_time_s": spent[i] / m.size} if shared else {}),
                    **extra,
                }
        on_epoch(epoch, results)


def _evaluate(
    model, raw, batches: ViewBatches, rt: Runtime, test_x, test_y, teacher_test_logits, val
) -> tuple[float, dict]:
    """One student's test accuracy and further metrics after an epoch, eager (eval mode and no_grad would
    each be one more compiled graph), in training-sized batches: what fits a training step fits an
    evaluation (1,024 224-pixel images at once did not: tens of GB of activations)."""

    def logits(m, x):
        return predict(m, x, batches.mean, batches.std, rt, batch_size=batches.batch_size)

    test_logits = logits(model, test_x)
    metrics = {}
    if raw is not None:  # evaluation read the weights' average: the raw weights' accuracy beside it
        metrics["test_acc_raw"] = accuracy(logits(raw, test_x), test_y)
    if val is not None:
        metrics["val_acc"] = accuracy(logits(model, val[0]), val[1])
    if teacher_test_logits is not None:
        metrics.update(fidelity(test_logits, teacher_test_logits))
    return accuracy(test_logits, test_y), metrics


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
