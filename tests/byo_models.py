"""Factories a user might pass as --arch module.path:factory (used by the tests)."""

from torch import nn


def make_net(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
    )


def not_a_module(num_classes: int) -> dict:
    return {"classes": num_classes}


def make_bn_net(num_classes: int) -> nn.Module:
    """Convolutions with BatchNorm and no dropout: a stacked sweep must match the loop one on it."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )
