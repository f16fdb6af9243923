"""The one training loop's batch source: every sample once per epoch, fixed by (seed, epoch)."""

import torch

from kdcache.stages import fresh_views_plan
from kdcache.train import ViewBatches


def batches(n: int, bs: int, drop_last: bool = False) -> ViewBatches:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(n)  # label = row, so a batch tells which samples it holds
    return ViewBatches(images, labels, fresh_views_plan(n, 0, True, "cpu"), bs, 0, (0.5,) * 3, (0.25,) * 3, drop_last)


def test_every_sample_once_per_epoch_in_an_order_fixed_by_seed_and_epoch():
    vb = batches(103, 10)
    seen = torch.cat([y for _, y, _ in vb.epoch(0)])
    assert len(vb) == 11 and torch.equal(seen.sort().values, torch.arange(103))
    assert torch.equal(seen, torch.cat([y for _, y, _ in vb.epoch(0)]))
    assert not torch.equal(seen, torch.cat([y for _, y, _ in vb.epoch(1)]))


def test_drop_last_keeps_one_batch_shape_for_compiled_models():
    vb = batches(103, 10, drop_last=True)
    shapes = {x.shape for x, _, _ in vb.epoch(0)}
    assert len(vb) == 10 and shapes == {torch.Size([10, 3, 32, 32])}
    left_out = [set(range(103)) - set(torch.cat([y for _, y, _ in vb.epoch(e)]).tolist()) for e in range(3)]
    assert all(len(s) == 3 for s in left_out) and len(set.union(*left_out)) > 3  # not always the same ones
