"""THE definition of a view, shared by teacher training, the dump and the student.

A view of image i is its own crop `(dx, dy, flip)`: zero-pad the uint8 image by PAD
pixels, crop rows dy:dy+H and columns dx:dx+W, mirror left-right if flip. That is
exactly torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip before
ToTensor/Normalize. (PAD, PAD, 0) is the un-augmented image.

A view may also be mixed with a partner (view record v2, `Mix`): the partner row j
is cropped with its own `(dx, dy, flip)`, then either pasted into a CutMix box of the
output, or blended (MixUp) as `lam * own + (1 - lam) * partner` in pixel space;
`lam` is the share of sample i, the weight of its label. Then normalise.

View parameters come from a counter-based hash of (seed, stream, sample index,
view index), never from a stateful RNG, so they do not depend on batch size,
device, worker count or resume point.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import numpy as np
import torch

PAD = 4
SIZE = (32, 32)  # output (H, W) of a pad-4 crop view: CIFAR images
IDENTITY = (PAD, PAD, 0)
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's defaults
EVAL_CROP = 0.875  # evaluation: resize the short side to size / 0.875, centre-crop size (timm's crop_pct)

# Independent hash streams, so teacher augmentation, cached views, the student's
# view schedule and the shuffling order never share random numbers.
STREAM_TRAIN, STREAM_DUMP, STREAM_SCHEDULE, STREAM_SHUFFLE, STREAM_ONLINE = 1, 2, 3, 4, 5
MIX_CROP_STREAM = 16  # added to a view stream: the partner's crop in that stream's views
MIXES = ("none", "cutmix", "mixup", "both")
# Sub-counters of one (seed, stream, sample, view): independent draws for the mix,
# and (from _RRC on, 4 per attempt) for a random-resized crop.
_APPLY, _KIND, _PARTNER, _LAM, _CY, _CX, _RRC = 1, 2, 3, 4, 5, 6, 32


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


def _uniform(h: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) from the top 53 bits of a uint64 hash."""
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Geometry(Protocol):
    """How a view's parameters become pixels: what every stage, the dump and verify rely on, declared
    once. `CropFlip` (CIFAR, equal-size images) and `ResizedCrop` (image folders) are the two."""

    recipe: str  # its name, recorded in a cache (view_recipe)
    fields: int  # numbers per view
    dtype: torch.dtype  # their type in the cache
    size: tuple[int, int]  # the view's (h, w) in pixels
    hw: torch.Tensor | None  # each stored image's (h, w) when they differ in size, else None

    def params(
        self, seed: int, indices, views, *, augment: bool = True, stream: int = ..., of_rows: np.ndarray | None = None
    ) -> torch.Tensor: ...

    def pixels(self, images: torch.Tensor, rows: torch.Tensor, params: torch.Tensor) -> torch.Tensor: ...

    def valid(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...

    def attrs(self) -> dict: ...


class CropFlip:
    """Pad-4 crop + flip views of equal-size images (CIFAR): params uint8 [..., 3] = (dx, dy, flip)."""

    recipe = "pad4-crop-flip"
    fields, dtype = 3, torch.uint8
    hw = None  # every image is the same size

    def __init__(self, size: tuple[int, int] = SIZE):
        self.size = tuple(int(v) for v in size)

    def params(
        self,
        seed: int,
        indices,
        views,
        *,
        augment: bool = True,
        stream: int = STREAM_DUMP,
        of_rows: np.ndarray | None = None,
    ) -> torch.Tensor:
        """[len(indices), len(views), 3] for every (sample, view); `of_rows` plays no part (equal sizes)."""
        return view_params(seed, indices, views, augment=augment, stream=stream)

    def pixels(self, images: torch.Tensor, rows: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W]: the views `params` [B,3] of `images[rows]`."""
        # index_select, not images[rows]: ~20x faster for whole uint8 rows on CPU (16 vs 308 us for 128 rows)
        return crop_pixels(images.index_select(0, rows), params)

    def valid(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """bool [...]: which views are inside the recipe's range."""
        return (params[..., :2] <= 2 * PAD).all(-1) & (params[..., 2] <= 1)

    def attrs(self) -> dict:
        return {}


class ResizedCrop:
    """Random-resized-crop + flip views of a store of images of different sizes (image folders).

    Images sit top-left in a square uint8 canvas [N,3,S,S] with their true (h, w) in `hw`
    (int16 [N,2]); the canvas beyond an image repeats its last row and column, so sampling
    at its edge equals clamping. A view is params int16 [..., 5] = (y0, x0, h, w, flip): a
    box in store pixels, drawn as torchvision's RandomResizedCrop.get_params draws it (10
    attempts of area scale x log-uniform aspect ratio, then its central fallback), resized
    to `size` x `size` by `roi_align` (bilinear, averaging ceil(box/size)^2 samples per
    output pixel when shrinking: an antialiasing box filter), rounded to uint8, mirrored if
    flip. Not augmented (and evaluation): the central square of 0.875 x the short side,
    which is Resize(size / 0.875) + CenterCrop(size).
    """

    recipe = "rrc-flip"
    fields, dtype = 5, torch.int16

    def __init__(self, hw: torch.Tensor, size: int, scale=RRC_SCALE, ratio=RRC_RATIO):
        self.hw = hw.to(torch.int64).cpu()
        self.size = (int(size), int(size))
        self.scale, self.ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)

    def params(
        self,
        seed: int,
        indices,
        views,
        *,
        augment: bool = True,
        stream: int = STREAM_DUMP,
        of_rows: np.ndarray | None = None,
    ) -> torch.Tensor:
        """[len(indices), len(views), 5] for every (sample, view), a pure function of (seed, stream, i, v).
        The boxes fit the images `of_rows` ([len(indices), len(views)], default the samples themselves):
        a mix partner's crop is drawn with the sample's counters but fits the partner."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1, 1)
        vs = np.asarray(views, dtype=np.int64).reshape(1, -1)
        shape = (idx.shape[0], vs.shape[1])
        rows = np.broadcast_to(idx, shape) if of_rows is None else np.asarray(of_rows, dtype=np.int64).reshape(shape)
        hw = self.hw.numpy()[rows]
        H, W = hw[..., 0].astype(np.int64), hw[..., 1].astype(np.int64)
        side = np.round(EVAL_CROP * np.minimum(H, W)).astype(np.int64).clip(min=1)  # the evaluation box
        h, w = side.copy(), side.copy()
        y0, x0 = np.round((H - h) / 2).astype(np.int64), np.round((W - w) / 2).astype(np.int64)  # as CenterCrop
        flip = np.zeros(shape, np.int64)
        if augment:
            draw = lambda sub: _uniform(hash_u64(seed, stream, idx, vs, sub).reshape(shape))  # noqa: E731
            found = np.zeros(shape, bool)
            lo, hi = np.log(self.ratio[0]), np.log(self.ratio[1])
            for attempt in range(10):
                u = [draw(_RRC + 4 * attempt + j) for j in range(4)]
                target = H * W * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
                aspect = np.exp(lo + u[1] * (hi - lo))
                cw, chh = (
                    np.round(np.sqrt(target * aspect)).astype(np.int64),
                    np.round(np.sqrt(target / aspect)).astype(np.int64),
                )
                ok = ~found & (cw > 0) & (cw <= W) & (chh > 0) & (chh <= H)
                i = np.floor(u[2] * (H - chh + 1)).astype(np.int64)
                j = np.floor(u[3] * (W - cw + 1)).astype(np.int64)
                for arr, val in ((h, chh), (w, cw), (y0, i), (x0, j)):
                    arr[ok] = val[ok]
                found |= ok
            # torchvision's fallback: the whole image, its aspect ratio clamped to the range
            in_ratio = W / H
            fw = np.where(
                in_ratio < self.ratio[0], W, np.where(in_ratio > self.ratio[1], np.round(H * self.ratio[1]), W)
            )
            fh = np.where(in_ratio < self.ratio[0], np.round(W / self.ratio[0]), H)
            fw, fh = fw.astype(np.int64), fh.astype(np.int64)
            for arr, val in ((h, fh), (w, fw), (y0, (H - fh) // 2), (x0, (W - fw) // 2)):
                arr[~found] = val[~found]
            flip = (hash_u64(seed, stream, idx, vs, _RRC - 1).reshape(shape) % np.uint64(2)).astype(np.int64)
        return torch.from_numpy(np.stack([y0, x0, h, w, flip], axis=-1).astype(np.int16))

    def pixels(self, images: torch.Tensor, rows: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,size,size]: the views `params` [B,5] of `images[rows]` (a canvas [N,3,S,S])."""
        from torchvision.ops import roi_align

        x = images.index_select(0, rows).to(torch.float32)
        b = x.shape[0]
        p = params.to(device=x.device, dtype=torch.float32)
        y0, x0, h, w, flip = p.unbind(-1)
        boxes = torch.stack([torch.arange(b, device=x.device, dtype=torch.float32), x0, y0, x0 + w, y0 + h], 1)
        out = roi_align(x, boxes, output_size=self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out = torch.where(flip.view(b, 1, 1, 1) > 0, out.flip(-1), out)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def valid(self, params: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        p, hw = params.to(torch.int64), self.hw[rows.clamp(min=0).to(torch.int64)]
        y0, x0, h, w, flip = p.unbind(-1)
        return (
            (y0 >= 0) & (x0 >= 0) & (h >= 1) & (w >= 1) & (y0 + h <= hw[..., 0]) & (x0 + w <= hw[..., 1]) & (flip <= 1)
        )

    def attrs(self) -> dict:
        return {"image_size": self.size[0], "rrc_scale": list(self.scale), "rrc_ratio": list(self.ratio)}


GEOMETRIES = (CropFlip.recipe, ResizedCrop.recipe)


@dataclasses.dataclass
class Mix:
    """The mix part of view record v2, for a batch of views (any leading shape S).

    partner int64 S: the partner's row, -1 for an unmixed view; crop uint8 S+[3]: the
    partner's (dx, dy, flip); box uint8 S+[4]: CutMix box (y0, x0, h, w) in output pixels,
    h*w == 0 for a MixUp blend; lam float32 S: share of sample i (1 when unmixed).
    """

    partner: torch.Tensor
    crop: torch.Tensor
    box: torch.Tensor
    lam: torch.Tensor

    def map(self, fn) -> Mix:
        return Mix(*(fn(t) for t in (self.partner, self.crop, self.box, self.lam)))

    def __getitem__(self, idx) -> Mix:
        return self.map(lambda t: t[idx])

    def take(self, rows: torch.Tensor) -> Mix:
        """Entries `rows` (int64 [B]) of a 1-D record, by index_select (fast on CPU)."""
        return self.map(lambda t: t.index_select(0, rows))

    def to(self, device) -> Mix:
        return self.map(lambda t: t.to(device, non_blocking=True))


def mix_params(
    seed: int,
    indices,
    views,
    *,
    num_rows: int,
    mix: str,
    prob: float,
    geometry: Geometry,
    augment: bool = True,
    stream: int = STREAM_DUMP,
) -> Mix:
    """Mix [len(indices), len(views)] for every (sample, view): a pure function of (seed, stream, i, v).

    With probability `prob` a view is mixed; `both` picks CutMix or MixUp with equal odds.
    Partner j != i is uniform over the other rows. lam0 ~ U(0, 1) (Beta(1, 1), the CutMix
    and CIFAR MixUp papers' alpha = 1). CutMix: a box of side H*sqrt(1-lam0) x W*sqrt(1-lam0)
    centred at a uniform pixel, clipped to the image as timm's rand_bbox does, and
    lam = 1 - box area / (H*W) (exact after clipping). MixUp: lam = lam0.
    """
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {MIXES}")
    h_out, w_out = size = geometry.size
    if max(size) > 255:
        raise ValueError("the mix record stores boxes as uint8: outputs up to 255 pixels a side")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1, 1)
    vs = np.asarray(views, dtype=np.int64).reshape(1, -1)
    shape = (idx.shape[0], vs.shape[1])
    draw = lambda sub: hash_u64(seed, stream, idx, vs, sub).reshape(shape)  # noqa: E731
    apply = (_uniform(draw(_APPLY)) < prob) & (mix != "none") & (num_rows > 1)
    cut = np.full(shape, mix == "cutmix") if mix != "both" else _uniform(draw(_KIND)) < 0.5
    partner = (idx + 1 + (draw(_PARTNER) % np.uint64(max(num_rows - 1, 1))).astype(np.int64)) % num_rows
    lam0 = _uniform(draw(_LAM))
    ratio = np.sqrt(1.0 - lam0)
    ch, cw = (h_out * ratio).astype(np.int64), (w_out * ratio).astype(np.int64)
    cy = (draw(_CY) % np.uint64(h_out)).astype(np.int64)
    cx = (draw(_CX) % np.uint64(w_out)).astype(np.int64)
    y0, y1 = np.clip(cy - ch // 2, 0, h_out), np.clip(cy + ch // 2, 0, h_out)
    x0, x1 = np.clip(cx - cw // 2, 0, w_out), np.clip(cx + cw // 2, 0, w_out)
    boxed = apply & cut
    box = np.where(boxed[..., None], np.stack([y0, x0, y1 - y0, x1 - x0], axis=-1), 0).astype(np.uint8)
    lam = np.where(boxed, 1.0 - (y1 - y0) * (x1 - x0) / (h_out * w_out), np.where(apply, lam0, 1.0))
    crop = geometry.params(
        seed, indices, views, augment=augment, stream=stream + MIX_CROP_STREAM, of_rows=np.where(apply, partner, idx)
    )  # the partner's crop fits the partner's image
    crop[~torch.from_numpy(apply)] = 0
    return Mix(
        torch.from_numpy(np.where(apply, partner, -1)),
        crop,
        torch.from_numpy(box),
        torch.from_numpy(lam.astype(np.float32)),
    )


@dataclasses.dataclass(frozen=True)
class Views:
    """View records and the geometry that turns them into pixels: each view's own crop `crop`
    [S..., F] in the geometry's terms and, for mixed views, its `Mix` [S...] (None: none mixed).
    What the cache stores per (sample, view), what a plan hands out per epoch, what
    `render_views` renders and `predict` runs a teacher on: one value, not three arguments."""

    geometry: Geometry
    crop: torch.Tensor
    mix: Mix | None = None

    def __len__(self) -> int:
        return len(self.crop)

    def map(self, fn) -> Views:
        """The same views with `fn` applied to every record tensor (crop, and the mix's)."""
        return Views(self.geometry, fn(self.crop), None if self.mix is None else self.mix.map(fn))

    def __getitem__(self, idx) -> Views:
        return self.map(lambda t: t[idx])

    def take(self, rows: torch.Tensor) -> Views:
        """Entries `rows` (int64 [B]) of a 1-D set of views, by index_select (fast on CPU)."""
        return self.map(lambda t: t.index_select(0, rows))

    def to(self, device) -> Views:
        return self.map(lambda t: t.to(device, non_blocking=True))

    def flatten(self) -> Views:
        """[N, K] views -> [N*K], row-major (sample i's K views together)."""
        return self.map(lambda t: t.flatten(0, 1))

    def with_partners(self, partner: torch.Tensor) -> Views:
        """The same views with the mix partners renumbered (rows of a gathered block, not of the store)."""
        return (
            self if self.mix is None else dataclasses.replace(self, mix=dataclasses.replace(self.mix, partner=partner))
        )


def draw_views(
    geometry: Geometry,
    seed: int,
    indices,
    views,
    *,
    augment: bool = True,
    mix: str = "none",
    prob: float = 1.0,
    num_rows: int = 0,
    stream: int = STREAM_DUMP,
) -> Views:
    """THE draw: the views [len(indices), len(views)] of (seed, stream) in `geometry`, each a pure
    function of (seed, stream, sample, view): the dump, verify, teacher training and online students
    all draw through it. `mix` other than "none" mixes a view with probability `prob` with a partner
    among `num_rows` rows (`mix_params`)."""
    crop = geometry.params(seed, indices, views, augment=augment, stream=stream)
    if mix == "none":
        return Views(geometry, crop)
    if num_rows < 1:
        raise ValueError(f"draw_views: mixing ({mix}) draws partners among num_rows rows (got {num_rows})")
    m = mix_params(
        seed, indices, views, num_rows=num_rows, mix=mix, prob=prob, geometry=geometry, augment=augment, stream=stream
    )
    return Views(geometry, crop, m)


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


def render_views(images: torch.Tensor, rows: torch.Tensor, views: Views, mean, std) -> torch.Tensor:
    """THE renderer: `views` [B] of `images[rows]` (uint8 [N,3,H,W] on the device, rows int64 [B])
    -> normalised float32 [B,3,h,w]; the views' geometry turns a crop into pixels.

    Both mixes are one `torch.lerp(partner, own, weight)` in float32 pixel values: weight is
    1 outside and 0 inside a CutMix box (exact: the pixels are whole numbers), lam for a MixUp
    blend, i.e. `partner + lam * (own - partner)` = `lam * own + (1 - lam) * partner` up to
    float rounding. An unmixed row in a mixed batch has lam 1 and no box, which leaves it
    exactly as it was. Then normalised as ToTensor + Normalize do.
    """
    geometry, crop, mix = views.geometry, views.crop, views.mix
    if mix is None:
        return normalize(geometry.pixels(images, rows, crop), mean, std)
    b = len(rows)
    both = geometry.pixels(images, torch.cat([rows, mix.partner.clamp(min=0)]), torch.cat([crop, mix.crop]))
    both = both.to(torch.float32)
    own, partner = both[:b], both[b:]
    h, w = own.shape[-2:]
    y0, x0, bh, bw = mix.box.to(torch.long).unbind(1)
    cut = bh * bw > 0  # [B]: a CutMix row (else a MixUp blend, or unmixed with lam 1)

    def inside(n: int, start: torch.Tensor, size: torch.Tensor) -> torch.Tensor:  # [B, n]: 1 inside the box's span
        at = torch.arange(n, device=own.device)
        return ((at >= start[:, None]) & (at < (start + size)[:, None]) & cut[:, None]).to(torch.float32)

    # The share of the own pixel at each position: 1 - [in box rows] * [in box columns] for CutMix
    # (0 inside, 1 outside: the box is separable, so one [B,H,W] op builds it), lam for a blend.
    base = torch.where(cut, 1.0, mix.lam.to(torch.float32)).view(b, 1, 1)
    weight = torch.addcmul(base, inside(h, y0, bh).view(b, h, 1), inside(w, x0, bw).view(b, 1, w), value=-1.0)
    m, s = _stats(tuple(mean), tuple(std), own.device)
    return torch.lerp(partner, own, weight.unsqueeze(1)).div_(255.0).sub_(m).div_(s)


def render(images: torch.Tensor, params: torch.Tensor, mean, std) -> torch.Tensor:
    """Crop views of a batch, normalised: `render_views` without a mix, row b of `images` for view b."""
    return normalize(crop_pixels(images, params), mean, std)


@functools.lru_cache(maxsize=16)
def _crop_index(h: int, w: int, device: torch.device) -> torch.Tensor:
    """int64 [(2P+1)^2 * 2, H*W]: for every crop (dx, dy, flip), coded (dy * (2P+1) + dx) * 2 + flip,
    where each output pixel reads in the zero-padded image flattened to (H+2P)*(W+2P). Made once:
    a batch then looks its crops up (one small gather) instead of computing [B,H,W] indices."""
    n = 2 * PAD + 1
    dy, dx, flip = (
        t.reshape(-1, 1) for t in torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(2), indexing="ij")
    )
    ar = torch.arange(w)
    cols = dx + torch.where(flip.bool(), w - 1 - ar, ar)  # [K, W]
    rows = dy + torch.arange(h)  # [K, H]
    return (rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]).reshape(n * n * 2, h * w).to(device)


def crop_pixels(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Batched crops on the images' device: uint8 [B,3,H,W] + (dx,dy,flip) [B,3] -> uint8 [B,3,H,W].

    One `torch.gather` over each zero-padded image flattened to [3, (H+2P)*(W+2P)], no
    per-sample Python; each crop's gather index comes from a table made once. Padding is
    zeros in pixel space (as torchvision's RandomCrop pads the PIL image), so padded pixels
    normalise to -mean/std. (A flat gather is about 2x faster on CPU than advanced indexing
    with three broadcast index tensors.)
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD)).view(b, c, (h + 2 * PAD) * (w + 2 * PAD))
    p = params.to(device=images.device, dtype=torch.long)
    code = (p[:, 1] * (2 * PAD + 1) + p[:, 0]) * 2 + p[:, 2]
    flat = _crop_index(h, w, images.device).index_select(0, code).view(b, 1, h * w)
    return torch.gather(padded, 2, flat.expand(b, c, h * w)).view(b, c, h, w)
