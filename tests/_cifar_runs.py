"""What the tests of the CIFAR training loop share: a tiny CIFAR-10 split written in the
standard format, and the small ResNet they train."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
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


def one_thread_fixture() -> Callable[[], Iterator[None]]:
    """A module-scoped autouse fixture that runs the module's tests with one torch thread and
    restores the thread count afterwards; assign it to a module-level name."""

    @pytest.fixture(autouse=True, scope="module")
    def _one_thread() -> Iterator[None]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)

    return _one_thread


def split_fixture() -> Callable[[pytest.TempPathFactory], Split]:
    """A module-scoped fixture giving :func:`tiny_cifar`; assign it to ``split``."""

    @pytest.fixture(scope="module")
    def split(tmp_path_factory: pytest.TempPathFactory) -> Split:
        return tiny_cifar(tmp_path_factory)

    return split
