"""What the tests of the CIFAR training loop share: a tiny CIFAR-10 split written in the
standard format, and the small ResNet they train."""

from __future__ import annotations

import pytest
from torch import nn

from tests.test_cifar import write_cifar
from torchsam.experiments.cifar import cifar
from torchsam.experiments.data import Split
from torchsam.experiments.models import resnet_cifar


def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Split:
    """12 images per batch file (60 training, 12 test), 25% label noise, seed 0."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, per_file=12)
    return cifar("cifar10", root, noise=0.25, seed=0)


def tiny_resnet(split: Split) -> nn.Module:
    """A CIFAR ResNet of depth 8 and width 4."""
    return resnet_cifar(num_classes=split.num_classes, depth=8, width=4)
