"""Mixed views (view record v2): `mix_params` draws the mix, `render_views` renders it.

The yardstick is the documented meaning of a view, re-implemented here in plain numpy
(pad, crop, flip; CutMix paste or MixUp blend; ToTensor + Normalize), never by calling
kdcache's own crop or render functions.
"""

import numpy as np
import pytest
import torch

from kdcache.views import STREAM_DUMP, STREAM_TRAIN, CropFlip, Mix, Views, render, render_views, view_params
from kdcache.views import mix_params as _mix_params

CIFAR = CropFlip()


def mix_params(*args, **kw) -> Mix:
    """The mix record of CIFAR's pad-4 crop views."""
    return _mix_params(*args, geometry=CIFAR, **kw)


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
N, H, W = 50, 32, 32
PAD = 4  # the documented padding, spelled out here rather than imported


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (N, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------
# The numpy reference, written from the documented meaning of a view.


def crop_reference(image: np.ndarray, dx: int, dy: int, flip: int) -> np.ndarray:
    """uint8 [3,H,W]: zero-pad by PAD, take rows dy:dy+H and columns dx:dx+W, mirror if flip."""
    _, h, w = image.shape
    padded = np.zeros((3, h + 2 * PAD, w + 2 * PAD), np.uint8)
    padded[:, PAD : PAD + h, PAD : PAD + w] = image
    out = padded[:, dy : dy + h, dx : dx + w]
    return out[:, :, ::-1].copy() if flip else out.copy()


def view_reference(images: np.ndarray, row: int, crop, partner: int, partner_crop, box, lam) -> np.ndarray:
    """float32 [3,H,W] pixel values (0..255) of one view, before normalisation."""
    own = crop_reference(images[row], *(int(c) for c in crop))
    if partner < 0:
        return own.astype(np.float32)
    other = crop_reference(images[partner], *(int(c) for c in partner_crop))
    y0, x0, bh, bw = (int(b) for b in box)
    if bh * bw > 0:  # CutMix: exact in uint8
        out = own.copy()
        out[:, y0 : y0 + bh, x0 : x0 + bw] = other[:, y0 : y0 + bh, x0 : x0 + bw]
        return out.astype(np.float32)
    lam = np.float32(lam)  # MixUp, in float32 pixel values
    return lam * own.astype(np.float32) + (np.float32(1) - lam) * other.astype(np.float32)


def normalize_reference(pixels: np.ndarray) -> np.ndarray:
    """float32 x / 255, minus float32 mean, divided by float32 std, per channel."""
    mean = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(STD, np.float32).reshape(3, 1, 1)
    return ((pixels.astype(np.float32) / np.float32(255)) - mean) / std


def kinds(mix: Mix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks (cutmix, mixup, unmixed) of a Mix, by the documented rule."""
    area = mix.box[..., 2].long() * mix.box[..., 3].long()
    mixed = mix.partner >= 0
    return mixed & (area > 0), mixed & (area == 0), ~mixed


def flat_batch(seed: int, num_views: int, **kw):
    """Rows, own crops and mixes of every (sample, view) of the dataset, flattened to [N*V]."""
    own = view_params(seed, range(N), range(num_views)).reshape(-1, 3)
    mix = mix_params(seed, range(N), range(num_views), num_rows=N, **kw).map(lambda t: t.reshape(-1, *t.shape[2:]))
    rows = torch.arange(N).repeat_interleave(num_views)
    return rows, own, mix


# ---------------------------------------------------------------------------------------
# 1. render_views agrees with the reference.


def test_render_views_matches_the_numpy_reference(images):
    """CutMix and unmixed views equal the reference to 1e-6 (same float32 normalisation), MixUp to 1e-5."""
    rows, own, mix = flat_batch(11, 2, mix="both", prob=0.7)  # 100 views
    cut, blend, plain = kinds(mix)
    assert cut.sum() > 0 and blend.sum() > 0 and plain.sum() > 0, "each kind of view must occur"

    got = render_views(images, rows, Views(CIFAR, own, mix), MEAN, STD).numpy()
    imgs = images.numpy()
    for b in range(len(rows)):
        ref = normalize_reference(
            view_reference(imgs, int(rows[b]), own[b], int(mix.partner[b]), mix.crop[b], mix.box[b], mix.lam[b])
        )
        tol = 1e-5 if blend[b] else 1e-6
        err = np.abs(got[b] - ref).max()
        assert err <= tol, (
            f"view {b} (row {int(rows[b])}, partner {int(mix.partner[b])}, "
            f"box {mix.box[b].tolist()}, lam {float(mix.lam[b])}): max abs error {err}"
        )


# ---------------------------------------------------------------------------------------
# 2. mix_params properties.


def test_cutmix_partners_boxes_and_lam():
    """CutMix with prob 1: partner is another row, boxes lie inside the image, lam = 1 - area/(H*W) exactly."""
    m = mix_params(0, range(N), range(40), num_rows=N, mix="cutmix", prob=1.0)
    i = torch.arange(N).view(N, 1).expand(N, 40)
    assert ((m.partner >= 0) & (m.partner < N)).all()
    assert (m.partner != i).all()
    y0, x0, bh, bw = (m.box[..., k].long() for k in range(4))
    assert (y0 + bh <= H).all() and (x0 + bw <= W).all()
    assert (bh * bw > 0).float().mean() > 0.9, "nearly every CutMix view has a non-empty box"
    assert m.lam.dtype == torch.float32
    expected = (1 - (bh * bw).double() / (H * W)).float()
    assert torch.equal(m.lam, expected)


def test_partner_crops_cover_every_offset_and_flip():
    """Mixed views' partner crops are random (dx, dy in 0..2*PAD, both flips); augment=False gives the identity."""
    crop = mix_params(0, range(N), range(40), num_rows=N, mix="both", prob=1.0).crop.reshape(-1, 3).long()
    for col, span in ((0, 2 * PAD + 1), (1, 2 * PAD + 1), (2, 2)):
        assert torch.equal(crop[:, col].unique(), torch.arange(span)), f"column {col}"
    plain = mix_params(0, range(N), range(4), num_rows=N, mix="both", prob=1.0, augment=False).crop
    assert (plain == torch.tensor([PAD, PAD, 0], dtype=torch.uint8)).all()


def test_mixup_has_no_box_and_lam_in_unit_interval():
    """MixUp with prob 1: every view mixed with another row, no box, 0 <= lam <= 1, lam not constant."""
    m = mix_params(0, range(N), range(40), num_rows=N, mix="mixup", prob=1.0)
    assert (m.partner >= 0).all() and (m.partner != torch.arange(N).view(N, 1)).all()
    assert (m.box == 0).all()
    assert ((m.lam >= 0) & (m.lam <= 1)).all()
    assert m.lam.std() > 0.2  # ~U(0, 1): std 0.29


@pytest.mark.parametrize("mix, prob", [("none", 1.0), ("cutmix", 0.0), ("mixup", 0.0), ("both", 0.0)])
def test_unmixed_views_have_no_partner(mix, prob):
    """mix='none' or prob=0: partner -1, lam 1, box zeros for every view."""
    m = mix_params(3, range(N), range(20), num_rows=N, mix=mix, prob=prob)
    assert (m.partner == -1).all()
    assert (m.lam == 1).all()
    assert (m.box == 0).all()


def test_both_splits_cutmix_and_mixup_evenly_and_prob_sets_the_mixed_share():
    """'both': half CutMix at prob 1; prob 0.3 mixes ~30% of 20,000 views."""
    m = mix_params(5, range(5000), range(4), num_rows=5000, mix="both", prob=1.0)
    cut, blend, plain = kinds(m)
    assert plain.sum() == 0
    assert 0.47 <= cut.float().mean() <= 0.53
    m = mix_params(5, range(5000), range(4), num_rows=5000, mix="both", prob=0.3)
    assert 0.27 <= (m.partner >= 0).float().mean() <= 0.33


def test_unknown_mix_is_rejected():
    with pytest.raises(ValueError):
        mix_params(0, range(4), range(2), num_rows=4, mix="cutout", prob=1.0)


# ---------------------------------------------------------------------------------------
# 3. Determinism.


def assert_mix_equal(a: Mix, b: Mix):
    for name in ("partner", "crop", "box", "lam"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_mix_params_are_a_pure_function_of_seed_stream_row_and_view():
    """Independent of batch size and resume point; a single (row, view) equals its entry of the whole."""
    kw = dict(num_rows=1000, mix="both", prob=0.7)
    whole = mix_params(7, range(1000), range(4), **kw)
    chunks = [mix_params(7, range(s, s + 100), range(4), **kw) for s in range(0, 1000, 100)]
    pieces = Mix(*(torch.cat([getattr(c, n) for c in chunks]) for n in ("partner", "crop", "box", "lam")))
    assert_mix_equal(whole, pieces)
    for row, view in [(0, 0), (5, 3), (321, 1), (999, 2)]:
        alone = mix_params(7, [row], [view], **kw)
        assert_mix_equal(alone[0, 0], whole[row, view])
    sub = mix_params(7, [900, 5, 42], [3, 1], **kw)
    assert_mix_equal(sub, whole[[900, 5, 42]][:, [3, 1]])


def test_seed_and_stream_change_the_mix():
    """A different seed draws different partners; the train and dump streams draw different records."""
    kw = dict(num_rows=1000, mix="both", prob=0.7)
    base = mix_params(7, range(1000), range(4), **kw)
    assert not torch.equal(base.partner, mix_params(8, range(1000), range(4), **kw).partner)
    train = mix_params(7, range(1000), range(4), stream=STREAM_TRAIN, **kw)
    dump = mix_params(7, range(1000), range(4), stream=STREAM_DUMP, **kw)
    for name in ("partner", "crop", "box", "lam"):
        assert not torch.equal(getattr(train, name), getattr(dump, name)), name
    both = (train.partner >= 0) & (dump.partner >= 0)  # partner crops drawn per stream, too
    assert (train.crop[both] != dump.crop[both]).any(-1).float().mean() > 0.5


# ---------------------------------------------------------------------------------------
# 4-6. Rendering consistency and edge cases.


def test_render_views_is_batch_independent(images):
    """Rendering all views at once equals rendering them in chunks of 7, bit for bit."""
    rows, own, mix = flat_batch(2, 2, mix="both", prob=0.7)
    whole = render_views(images, rows, Views(CIFAR, own, mix), MEAN, STD)
    chunks = [slice(s, s + 7) for s in range(0, len(rows), 7)]
    pieces = torch.cat([render_views(images, rows[c], Views(CIFAR, own[c], mix[c]), MEAN, STD) for c in chunks])
    assert torch.equal(whole, pieces)


def test_unmixed_row_in_a_mixed_batch_renders_as_the_plain_crop(images):
    """lam 1 and no box leave an unmixed view exactly as `render` draws it."""
    rows, own, mix = flat_batch(4, 2, mix="both", prob=0.7)
    cut, blend, plain = kinds(mix)
    assert plain.any() and (cut | blend).any()
    got = render_views(images, rows, Views(CIFAR, own, mix), MEAN, STD)
    expected = render(images[rows], own, MEAN, STD)
    assert torch.equal(got[plain], expected[plain])
    assert not torch.equal(got[~plain], expected[~plain])


def test_a_single_row_is_never_mixed():
    """num_rows=1 has no partner to draw: nothing is mixed, whatever mix and prob say."""
    for mix in ("cutmix", "mixup", "both"):
        m = mix_params(0, [0], range(50), num_rows=1, mix=mix, prob=1.0)
        assert (m.partner == -1).all() and (m.lam == 1).all() and (m.box == 0).all()
