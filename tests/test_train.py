"""The one training loop's batch source: every sample once per epoch, fixed by (seed, epoch)."""

import pytest
import torch

from kdcache.batches import ViewBatches
from kdcache.inference import predict
from kdcache.runtime import Runtime
from kdcache.stages import fresh_views_plan
from kdcache.train import build_optimizer
from kdcache.views import CropFlip, Views, view_params


def batches(n: int, bs: int, drop_last: bool = False) -> ViewBatches:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(n)  # label = row, so a batch tells which samples it holds
    plan = fresh_views_plan(CropFlip(), n, 0, True, "cpu")
    return ViewBatches(images, labels, plan, bs, 0, (0.5,) * 3, (0.25,) * 3, drop_last)


def test_every_sample_once_per_epoch_in_an_order_fixed_by_seed_and_epoch():
    vb = batches(103, 10)
    seen = torch.cat([b.y for b in vb.epoch(0)])
    assert len(vb) == 11 and torch.equal(seen.sort().values, torch.arange(103))
    assert torch.equal(seen, torch.cat([b.y for b in vb.epoch(0)]))
    assert not torch.equal(seen, torch.cat([b.y for b in vb.epoch(1)]))


def test_drop_last_keeps_one_batch_shape_for_compiled_models():
    vb = batches(103, 10, drop_last=True)
    shapes = {b.x.shape for b in vb.epoch(0)}
    assert len(vb) == 10 and shapes == {torch.Size([10, 3, 32, 32])}
    left_out = [set(range(103)) - set(torch.cat([b.y for b in vb.epoch(e)]).tolist()) for e in range(3)]
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
    got = predict(
        wrapped,
        images,
        (0.5,) * 3,
        (0.25,) * 3,
        rt,
        rows=torch.arange(23),
        views=Views(CropFlip(), params),
        batch_size=10,
    )
    assert set(wrapped.shapes) == {(10, 3, 32, 32)} and len(wrapped.shapes) == 3
    eager = predict(
        net, images, (0.5,) * 3, (0.25,) * 3, rt, rows=torch.arange(23), views=Views(CropFlip(), params), batch_size=10
    )
    assert got.shape == (23, 4) and torch.allclose(got, eager, atol=1e-6)


def _lrs(epochs: int, stop: int | None = None, state=None, **kw):
    """The lr of every epoch from build_optimizer; optionally stop early and return the state, or start from one."""
    net = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(
        net, optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=0.0, epochs=epochs, steps_per_epoch=1, **kw
    )
    if state is not None:
        opt.load_state_dict(state[0])
        sched.load_state_dict(state[1])
    lrs = []
    for _ in range(sched.last_epoch, stop or epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, (opt.state_dict(), sched.state_dict()), opt


def test_warmup_rises_linearly_to_lr_then_the_schedule_runs_over_the_remaining_epochs():
    lrs, _, opt = _lrs(10, schedule="cosine", warmup_epochs=2, nesterov=True)
    assert lrs[:3] == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])
    assert all(a > b > 0 for a, b in zip(lrs[2:], lrs[3:], strict=False))  # cosine over epochs 2..9, never reaching 0
    assert lrs[2 + 8 // 2] == pytest.approx(0.1)  # half-way through the cosine part: lr / 2
    assert opt.param_groups[0]["nesterov"] is True
    constant, _, _ = _lrs(5, schedule="constant", warmup_epochs=1)
    assert constant == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2])
    assert _lrs(4, schedule="cosine")[0] == pytest.approx([0.2, 0.2 * (1 + 2**-0.5) / 2, 0.1, 0.2 * (1 - 2**-0.5) / 2])


def test_a_warmup_schedule_resumes_where_it_stopped():
    whole, _, _ = _lrs(10, schedule="cosine", warmup_epochs=3)
    first, state, _ = _lrs(10, stop=2, schedule="cosine", warmup_epochs=3)  # stopped inside the warm-up
    rest, _, _ = _lrs(10, state=state, schedule="cosine", warmup_epochs=3)
    assert first + rest == pytest.approx(whole) and len(whole) == 10
