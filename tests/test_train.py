"""The one training loop's batch source: every sample once per epoch, fixed by (seed, epoch)."""

import torch

from kdcache.stages import fresh_views_plan
from kdcache.train import Runtime, ViewBatches, predict
from kdcache.views import view_params


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


class _Compiled(torch.nn.Module):
    """Stands in for torch.compile's wrapper (it keeps the module as `_orig_mod`); records input shapes."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self._orig_mod, self.shapes = module, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return self._orig_mod(x)


def test_predict_pads_a_compiled_models_short_last_batch_to_the_one_shape():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    images = torch.randint(0, 256, (23, 3, 32, 32), dtype=torch.uint8)
    params = view_params(0, range(23), [0])[:, 0]
    rt = Runtime.create("cpu")
    wrapped = _Compiled(net)
    got = predict(wrapped, images, (0.5,) * 3, (0.25,) * 3, rt, params=params, batch_size=10)
    assert set(wrapped.shapes) == {(10, 3, 32, 32)} and len(wrapped.shapes) == 3
    eager = predict(net, images, (0.5,) * 3, (0.25,) * 3, rt, params=params, batch_size=10)
    assert got.shape == (23, 4) and torch.allclose(got, eager, atol=1e-6)
