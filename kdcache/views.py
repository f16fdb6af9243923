"""THE definition of a view, shared by teacher training, the dump and the student.

A view of image i is `(dx, dy, flip)`: zero-pad the uint8 image by PAD pixels,
crop rows dy:dy+H and columns dx:dx+W, mirror left-right if flip, then normalise.
That is exactly torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip
before ToTensor/Normalize. (PAD, PAD, 0) is the un-augmented image.

View parameters come from a counter-based hash of (seed, stream, sample index,
view index), never from a stateful RNG, so they do not depend on batch size,
device, worker count or resume point.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

PAD = 4
IDENTITY = (PAD, PAD, 0)

# Independent hash streams, so teacher augmentation, cached views, the student's
# view schedule and the shuffling order never share random numbers.
STREAM_TRAIN, STREAM_DUMP, STREAM_SCHEDULE, STREAM_SHUFFLE = 1, 2, 3, 4

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed map of uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_u64(seed: int, stream: int, *counters: np.ndarray | int) -> np.ndarray:
    """A uint64 hash of (seed, stream, counters...), broadcast over the counter arrays."""
    with np.errstate(over="ignore"):
        x = _mix(np.asarray([(seed * 0x9E3779B97F4A7C15 + stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        for c in counters:
            x = _mix(x ^ (np.asarray(c).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return x


def view_params(seed: int, indices, views, *, augment: bool = True, stream: int = STREAM_DUMP) -> torch.Tensor:
    """uint8 [len(indices), len(views), 3] = (dx, dy, flip) for every (sample index, view index)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1, 1)
    vs = np.asarray(views, dtype=np.int64).reshape(1, -1)
    if not augment:
        out = np.empty((idx.shape[0], vs.shape[1], 3), np.uint8)
        out[...] = IDENTITY
        return torch.from_numpy(out)
    h = hash_u64(seed, stream, idx, vs)
    span = np.uint64(2 * PAD + 1)
    dx = h % span
    dy = (h // span) % span
    flip = (h // (span * span)) % np.uint64(2)
    return torch.from_numpy(np.stack([dx, dy, flip], axis=-1).astype(np.uint8))


def view_schedule(seed: int, num_samples: int, num_views: int, epoch: int) -> torch.Tensor:
    """int64 [N]: which cached view each sample shows in `epoch`.

    Every K consecutive epochs (a cycle) show each sample every one of its K views
    once, in an order drawn per sample and per cycle.
    """
    cycle, slot = divmod(epoch, num_views)
    keys = hash_u64(seed, STREAM_SCHEDULE, np.arange(num_samples).reshape(-1, 1), cycle, np.arange(num_views))
    order = np.argsort(keys, axis=1, kind="stable")  # a random permutation of the views, per sample
    return torch.from_numpy(order[:, slot].astype(np.int64))


def shuffle_order(seed: int, num_samples: int, epoch: int) -> torch.Tensor:
    """The sample order of `epoch`: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(int(hash_u64(seed, STREAM_SHUFFLE, epoch)[0] >> np.uint64(1)))
    return torch.randperm(num_samples, generator=g)


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as device tensors, made once: a fresh torch.tensor per batch is a host sync on CUDA."""
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32, computed as ToTensor + Normalize do (in place on the one float copy)."""
    m, s = _stats(tuple(mean), tuple(std), pixels.device)
    return pixels.to(torch.float32, copy=True).div_(255.0).sub_(m).div_(s)


def render(images: torch.Tensor, params: torch.Tensor, mean, std) -> torch.Tensor:
    """Batched views on the images' device: uint8 [B,3,H,W] + (dx,dy,flip) [B,3] -> float32 [B,3,H,W].

    One `torch.gather` over each zero-padded image flattened to [3, (H+2P)*(W+2P)], no
    per-sample Python. Padding is zeros in pixel space (as torchvision's RandomCrop
    pads the PIL image), so padded pixels normalise to -mean/std. (A flat gather is
    about 2x faster on CPU than advanced indexing with three broadcast index tensors.)
    """
    b, c, h, w = images.shape
    pw = w + 2 * PAD
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD)).view(b, c, (h + 2 * PAD) * pw)
    p = params.to(device=images.device, dtype=torch.long)
    dx, dy, flip = p[:, 0:1], p[:, 1:2], p[:, 2:3]
    ar = torch.arange(w, device=images.device)
    cols = dx + torch.where(flip.bool(), w - 1 - ar, ar)  # [B, W]
    rows = dy + torch.arange(h, device=images.device)  # [B, H]
    flat = (rows[:, :, None] * pw + cols[:, None, :]).view(b, 1, h * w)  # [B, 1, H*W]
    crops = torch.gather(padded, 2, flat.expand(b, c, h * w)).view(b, c, h, w)
    return normalize(crops, mean, std)
