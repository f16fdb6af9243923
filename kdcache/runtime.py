"""Where and how work runs: the device, autocast, memory format, compilation and torchrun (`Runtime`),
and how long work reports itself (`Progress`, `NoProgress`)."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kdcache.errors import KDCacheError


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
