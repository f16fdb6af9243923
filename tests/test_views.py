"""A view is (dx, dy, flip) on the zero-padded image; every renderer must agree with torchvision."""

import numpy as np
import pytest
import torch
from torchvision import transforms

from kdcache.views import IDENTITY, PAD, normalize, render, shuffle_order, view_params, view_schedule

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def render_reference(image: torch.Tensor, dx: int, dy: int, flip: int, mean, std) -> torch.Tensor:
    """One view the torchvision way (pad, crop, flip on the uint8 image), then `normalize`.

    The renderer's yardstick: the batched gather must pick exactly these pixels.
    """
    import torchvision.transforms.v2.functional as TF

    h, w = image.shape[-2:]
    x = TF.crop(TF.pad(image, [PAD, PAD, PAD, PAD], fill=0), dy, dx, h, w)
    if flip:
        x = TF.horizontal_flip(x)
    return normalize(x.unsqueeze(0), mean, std)[0]


@pytest.fixture
def images():
    return torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_batched_renderer_equals_reference_renderer_exactly(images):
    params = view_params(3, range(len(images)), [0])[:, 0]
    corners = torch.tensor([[0, 0, 0], [8, 8, 1], [0, 8, 1], [8, 0, 0], [4, 4, 0], [4, 4, 1]], dtype=torch.uint8)
    params[: len(corners)] = corners
    batched = render(images, params, MEAN, STD)
    for i in range(len(images)):
        ref = render_reference(images[i], *params[i].tolist(), MEAN, STD)
        assert torch.equal(batched[i], ref), f"view {params[i].tolist()} of image {i} differs"


def test_view_matches_torchvision_random_crop_and_flip_pipeline(images):
    """RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, offsets forced."""
    from PIL import Image

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    for i, (dx, dy, flip) in enumerate([(0, 0, 0), (8, 8, 1), (3, 6, 1), (5, 1, 0)]):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        crop = transforms.functional.crop(transforms.functional.pad(pil, PAD), dy, dx, 32, 32)
        if flip:
            crop = transforms.functional.hflip(crop)
        expected = to_tensor(crop)
        got = render(images[i : i + 1], torch.tensor([[dx, dy, flip]]), MEAN, STD)[0]
        assert torch.allclose(got, expected, atol=1e-6)


def test_identity_view_is_the_plain_normalised_image(images):
    params = torch.tensor([IDENTITY] * len(images), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.equal(render(images, params, MEAN, STD), expected)


def test_view_params_are_a_pure_function_of_seed_index_and_view():
    whole = view_params(7, range(1000), range(8))
    pieces = torch.cat([view_params(7, range(s, s + 100), range(8)) for s in range(0, 1000, 100)])
    assert torch.equal(whole, pieces)
    assert torch.equal(view_params(7, [5, 900], [3])[:, 0], whole[[5, 900], 3])
    assert not torch.equal(whole, view_params(8, range(1000), range(8)))


def test_view_params_cover_every_offset_and_flip_evenly():
    p = view_params(0, range(20000), range(4)).reshape(-1, 3).long()
    for col, span in ((0, 9), (1, 9), (2, 2)):
        counts = torch.bincount(p[:, col], minlength=span).float()
        assert len(counts) == span
        assert (counts / counts.mean() - 1).abs().max() < 0.05


def test_no_augment_gives_the_identity_view():
    assert (view_params(0, range(10), range(3), augment=False) == torch.tensor(IDENTITY, dtype=torch.uint8)).all()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_schedule_shows_every_view_once_per_cycle(k):
    n = 500
    for cycle in range(2):
        shown = torch.stack([view_schedule(0, n, k, cycle * k + e) for e in range(k)], dim=1)
        assert torch.equal(shown.sort(dim=1).values, torch.arange(k).expand(n, k))
    if k > 1:
        assert not torch.equal(view_schedule(0, n, k, 0), view_schedule(0, n, k, k))  # cycles reshuffle


def test_shuffle_order_is_a_permutation_fixed_by_seed_and_epoch():
    a = shuffle_order(0, 100, 3)
    assert torch.equal(a.sort().values, torch.arange(100))
    assert torch.equal(a, shuffle_order(0, 100, 3))
    assert not torch.equal(a, shuffle_order(0, 100, 4))


def test_render_runs_in_bf16_autocast_and_channels_last(images):
    """The CUDA code path's settings, exercised on CPU: the view itself stays fp32 and equal."""
    params = view_params(0, range(len(images)), [0])[:, 0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = render(images, params, MEAN, STD)
    assert x.dtype == torch.float32
    assert torch.equal(x.contiguous(memory_format=torch.channels_last), render(images, params, MEAN, STD))
    assert np.isfinite(x.numpy()).all()
