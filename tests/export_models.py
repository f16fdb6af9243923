"""Architectures an exporter cannot handle (module.path:factory specs for tests/test_export.py)."""

import torch
from torch import nn


class _Bessel(nn.Module):
    """torch.special.bessel_j0 has no ONNX translation."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.special.bessel_j0(x).mean((2, 3)))


class _Branch(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x.mean((2, 3)))
        if y.sum() > 0:
            return y
        return -y


def bessel_net(num_classes: int) -> nn.Module:
    return _Bessel(num_classes)


def branch_net(num_classes: int) -> nn.Module:
    return _Branch(num_classes)
