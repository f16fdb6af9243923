"""Architecture registry and self-describing checkpoints.

Architectures are named data: `build(name, num_classes)`. ResNets get the CIFAR
stem (3x3 stride-1 conv1, no max-pool) inside the builder, before any weights are
loaded, so a checkpoint can never be paired with an untrained stem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from kdcache.errors import KDCacheError


def _cifar_resnet(factory: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        model = factory(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
        return model

    return build


@runtime_checkable
class InitFromData(Protocol):
    """An architecture whose initialisation reads the training data (airbench's whitening layer):
    the stage calls `init_from_data` with normalised plain training images before training."""

    def init_from_data(self, images: torch.Tensor) -> None: ...


def _to_8x8(features: torch.Tensor) -> torch.Tensor:
    """The seed CNNs' classifiers read 8x8 maps (32-pixel images): average-pool larger images' maps
    down to 8x8 (no parameters; at 32 pixels nothing changes)."""
    return features if features.shape[-2:] == (8, 8) else nn.functional.adaptive_avg_pool2d(features, 8)


class SeedCNNTeacher(nn.Module):
    """Notebook 2's teacher: 4 convs + 2 linears, 1,186,986 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 8 * 8, 512), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(_to_8x8(self.features(x)), 1))


class SeedCNNStudent(nn.Module):
    """Notebook 2's student: 2 convs + 2 linears, 267,738 parameters for 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 8 * 8, 256), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(_to_8x8(self.features(x)), 1))


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Residual(nn.Sequential):
    def __init__(self, c: int):
        super().__init__(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class ResNet9S(nn.Sequential):
    """The ResNet-9 of the DAWNBench CIFAR-10 record (Page, 2018) at a quarter of its widths
    (16-32-64-128): 412,954 parameters for 10 classes, about 4x the seed teacher's training speed
    on a CPU, and BatchNorm lets Adam train it fast. The demo's teacher. Any image size
    (global max-pool before the classifier)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int, int] = (16, 32, 64, 128)):
        a, b, c, d = widths
        super().__init__(
            _conv_bn(3, a),
            _conv_bn(a, b),
            nn.MaxPool2d(2),
            _Residual(b),
            _conv_bn(b, c),
            nn.MaxPool2d(2),
            _conv_bn(c, d),
            nn.MaxPool2d(2),
            _Residual(d),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(d, num_classes),
        )


class _AirBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a fixed scale of 1 (only the bias learns), fast running statistics
    (momentum 0.4) and a tiny eps, as airbench has it."""

    def __init__(self, c: int):
        super().__init__(c, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _AirConv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised with an identity (Dirac) kernel on its first
    in_channels filters: the block starts out passing its input through."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[: self.in_channels])


class _AirGroup(nn.Sequential):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            _AirConv(c_in, c_out),
            nn.MaxPool2d(2),
            _AirBatchNorm(c_out),
            nn.GELU(),
            _AirConv(c_out, c_out),
            _AirBatchNorm(c_out),
            nn.GELU(),
        )


class AirNet(nn.Sequential):
    """The airbench94 network (Jordan 2024, arXiv 2404.00498: 94% on CIFAR-10 in 3.8 A100-seconds),
    written here from the paper so it runs in fp32 on a CPU as well as in bf16 on CUDA.

    A frozen 2x2 patch-whitening conv (24 filters: the eigenvectors of the training patches'
    covariance and their negatives, set by `init_from_data`) with a learnable bias, then three
    conv groups (widths 64-256-256 for airbench94), a 3x3 max-pool, a bias-free linear head
    scaled by 1/9. 1.97M parameters. The recipe that makes it fast lives in the `cifar10-fast`
    preset (label smoothing 0.2, BatchNorm biases at 64x the learning rate, per-step
    warm-up/decay, EMA, flip + translate test-time augmentation)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 256, 256)):
        whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        whiten.weight.requires_grad_(False)
        a, b, c = widths
        super().__init__(
            whiten,
            nn.GELU(),
            _AirGroup(24, a),
            _AirGroup(a, b),
            _AirGroup(b, c),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(c, num_classes, bias=False),
        )
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images [N,3,H,W] (airbench uses
        5,000): every 2x2 patch's covariance, eigenvectors scaled by 1/sqrt(eigenvalue + eps)."""
        conv = self[0]
        h, w = conv.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, 3 * h * w)
        cov = patches.T @ patches / len(patches)
        values, vectors = torch.linalg.eigh(cov)
        vectors = vectors.T.reshape(-1, 3, h, w).flip(0) / torch.sqrt(values.flip(0) + eps).view(-1, 1, 1, 1)
        conv.weight.copy_(torch.cat([vectors, -vectors]))


SMALL_IMAGES = 64  # images up to this many pixels a side get the CIFAR stem (see `build`)


def _torchvision_resnet(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, small: bool = True) -> nn.Module:
        from torchvision import models as tv  # only here: importing it costs 1-2 s per command

        factory = getattr(tv, name)
        return _cifar_resnet(factory)(num_classes) if small else factory(num_classes=num_classes)

    return build


def _registry() -> dict[str, Callable[..., nn.Module]]:
    return {
        "resnet18": _torchvision_resnet("resnet18"),
        "resnet34": _torchvision_resnet("resnet34"),
        "resnet50": _torchvision_resnet("resnet50"),
        "seed-cnn-teacher": lambda num_classes, small=True: SeedCNNTeacher(num_classes),
        "seed-cnn-student": lambda num_classes, small=True: SeedCNNStudent(num_classes),
        "resnet9s": lambda num_classes, small=True: ResNet9S(num_classes),
        "airbench94": lambda num_classes, small=True: AirNet(num_classes),
        "airbench95": lambda num_classes, small=True: AirNet(num_classes, widths=(128, 384, 384)),
    }


ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "seed-cnn-teacher",
    "seed-cnn-student",
    "resnet9s",
    "airbench94",
    "airbench95",
)
SPEC_HELP = (
    "a name (" + ", ".join(ARCHS) + "), torchvision:NAME (e.g. torchvision:convnext_tiny), "
    "timm:NAME (pip install 'kdcache[timm]'), or module.path:factory (called with num_classes)"
)


def _small_stem(model: nn.Module) -> nn.Module:
    """The CIFAR stem on a ResNet-style model (a `conv1` and a `maxpool`): 3x3 stride 1, no max-pool."""
    conv = getattr(model, "conv1", None)
    if isinstance(conv, nn.Conv2d) and isinstance(getattr(model, "maxpool", None), nn.Module):
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def _from_spec(spec: str, num_classes: int) -> nn.Module:
    source, _, name = spec.partition(":")
    if source == "torchvision":
        from torchvision import models as tv

        if name not in tv.list_models(module=tv):
            raise KDCacheError(
                f"torchvision has no classification model {name!r}: see torchvision.models.list_models()"
            )
        return tv.get_model(name, weights=None, num_classes=num_classes)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise KDCacheError(
                f"--arch {spec} needs timm, which is not installed: pip install 'kdcache[timm]'"
            ) from None
        if not timm.is_model(name):
            raise KDCacheError(f"timm has no model {name!r}: see timm.list_models()")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    import importlib

    try:
        factory = getattr(importlib.import_module(source), name)
    except ImportError as e:
        raise KDCacheError(f"--arch {spec}: cannot import {source} ({e}): put it on PYTHONPATH or install it") from None
    except AttributeError:
        raise KDCacheError(f"--arch {spec}: {source} has no {name!r}") from None
    try:
        model = factory(num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - a user's code may raise anything
        raise KDCacheError(f"--arch {spec}: {name}(num_classes={num_classes}) raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise KDCacheError(
            f"--arch {spec}: {name}(num_classes=...) returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model


def check_spec(spec: str) -> str:
    """Refuse an --arch that is neither a known name nor SOURCE:NAME, before any work starts."""
    if spec not in ARCHS and ":" not in spec:
        raise KDCacheError(f"unknown architecture {spec!r}: use {SPEC_HELP}")
    return spec


def is_code(spec: str) -> bool:
    """A module.path:factory spec: building it imports that module, which runs its code. kdcache's own
    names and torchvision:/timm: specs build models from installed libraries that kdcache names itself."""
    source, sep, _ = spec.partition(":")
    return bool(sep) and source not in ("torchvision", "timm")


def refuse_code(spec: str, where: str, fix: str) -> None:
    """A spec that a file names (not the user) must not import code: refuse it with `fix` as the way out."""
    if is_code(spec):
        raise KDCacheError(
            f"{where} names the architecture {spec}: building it imports and runs that module's code; {fix}"
        )


def build(name: str, num_classes: int, image_size: int = 32, small_stem: bool | None = None) -> nn.Module:
    """A freshly initialised model: a registered name or a spec (torchvision:, timm:, module:factory).

    The CIFAR stem (3x3 stride-1 conv1, no max-pool) replaces the ImageNet stem (7x7 stride 2 +
    max-pool, a 4x reduction) of ResNet-style models when images are at most 64 pixels a side:
    there the ImageNet stem would leave a 32-pixel image 8x8 before the first block. Other models
    are built as their library defines them. `small_stem` overrides the rule (imported weights).
    """
    small = image_size <= SMALL_IMAGES if small_stem is None else small_stem
    registry = _registry()
    if name in registry:
        return registry[name](num_classes, small)
    check_spec(name)
    model = _from_spec(name, num_classes)
    return _small_stem(model) if small else model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DistributedDataParallel and torch.compile wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def finite_weights(model: nn.Module) -> bool:
    """All floating parameters and buffers finite: one reduction, one host sync."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, or None."""
    if finite_weights(model):
        return None
    return next(n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all())
