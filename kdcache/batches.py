"""The batch source every stage trains from: each epoch's views of the training images, rendered in
batches on the device (or gathered from a host store ahead of the step), with the teacher's targets
for exactly those views when a plan carries them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kdcache.views import Views, render_views, shuffle_order


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


class RowsOf:
    """A host store (memory-mapped or jpeg) seen through some of its rows, ascending: what a sweep trains on
    when it holds images out. Read lazily like the store itself, and in the store's order."""

    def __init__(self, store, rows):
        import numpy as np

        self.store, self.rows = store, np.asarray(rows, dtype=np.int64)
        self.dtype = store.dtype

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.store.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.store.nbytes // max(1, len(self.store)) * len(self.rows)

    def __getitem__(self, key):
        return self.store[self.rows[key]]

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        out = np.asarray(self.store[self.rows])
        return out if dtype is None else out.astype(dtype)


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
