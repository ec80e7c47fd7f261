"""Where a training run's batches come from: the data held on the device, indexed there.

:func:`batch_source` moves a :class:`~torchsam.experiments.data.Split` to the run's device
once and returns a :class:`BatchSource`:

* :class:`FeatureSource` for feature rows (the digits, the signals, or images with
  ``images=None``): a batch is ``x_train[index]``;
* :class:`ImageSource` for a split with :attr:`~torchsam.experiments.data.Split.images`
  (CIFAR): the uint8 pixels stay on the device (150 MB for CIFAR's training set, against
  614 MB as float32) and a batch is indexed, augmented (:mod:`~torchsam.experiments.augment`,
  from a generator on the device) and normalised there, in ``channels_last`` layout when
  asked. Without augmentation its batches equal the feature rows bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsam.experiments.augment import check_augment, crop_and_flip, cutout_mask
from torchsam.experiments.data import Images, Split

__all__ = ["BatchSource", "FeatureSource", "ImageSource", "batch_source"]


class BatchSource:
    """The labels of a split on the device, and the inputs that subclasses build.

    Attributes:
        y_train (Tensor): training labels as trained on (noisy)
        y_train_clean (Tensor): the true training labels
        y_test (Tensor): test labels
        n_train (int): number of training samples
    """

    def __init__(self, split: Split, device: torch.device) -> None:
        self.y_train = split.y_train.to(device)
        self.y_train_clean = split.y_train_clean.to(device)
        self.y_test = split.y_test.to(device)
        self.n_train = int(split.y_train.shape[0])

    def train_inputs(self, index: Tensor) -> Tensor:
        """The model's inputs for the training samples at ``index`` (a device tensor)."""
        raise NotImplementedError

    def inputs(self, which: str, start: int, stop: int) -> Tensor:
        """Inputs of rows ``start:stop`` of the ``"train"`` or ``"test"`` set, unaugmented."""
        raise NotImplementedError

    def size(self, which: str) -> int:
        """Number of rows of the ``"train"`` or ``"test"`` set."""
        return int((self.y_train if which == "train" else self.y_test).shape[0])


class FeatureSource(BatchSource):
    """Feature rows on the device; a batch is ``x_train[index]``."""

    def __init__(self, split: Split, device: torch.device) -> None:
        super().__init__(split, device)
        self.x = {"train": split.x_train.to(device), "test": split.x_test.to(device)}

    def train_inputs(self, index: Tensor) -> Tensor:
        return self.x["train"][index]

    def inputs(self, which: str, start: int, stop: int) -> Tensor:
        return self.x[which][start:stop]


class ImageSource(BatchSource):
    """uint8 images on the device; a batch is indexed, augmented and normalised there.

    Args:
        split (Split): a split with ``images``
        device (torch.device): where the pixels live and batches are built
        augment (str): ``"none"``, ``"basic"`` or ``"cutout"`` (see
            :mod:`~torchsam.experiments.augment`)
        generator (torch.Generator | None): on ``device``, for the augmentation's draws;
            needed unless ``augment="none"``
        channels_last (bool, optional): return batches in ``torch.channels_last`` layout
            (default: False)
    """

    def __init__(
        self,
        split: Split,
        device: torch.device,
        augment: str,
        generator: torch.Generator | None,
        *,
        channels_last: bool = False,
    ) -> None:
        super().__init__(split, device)
        if split.images is None:
            raise ValueError("ImageSource needs a split with images (split.images is None)")
        images = split.images
        self.images = Images(
            train=images.train.to(device),
            test=images.test.to(device),
            mean=images.mean.to(device),
            std=images.std.to(device),
        )
        self.augment = check_augment(augment)
        if self.augment != "none" and generator is None:
            raise ValueError(f"augment={augment!r} needs a generator on {device}")
        self.generator = generator
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def train_inputs(self, index: Tensor) -> Tensor:
        pixels = self.images.train[index]
        if self.augment == "none" or self.generator is None:
            return self._normalise(pixels)
        pixels = crop_and_flip(pixels, self.generator)
        x = self.images.normalise(pixels)
        if self.augment == "cutout":
            n, _, height, width = x.shape
            mask = cutout_mask(n, height, width, self.generator, device=x.device)
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x.contiguous(memory_format=self.layout)

    def inputs(self, which: str, start: int, stop: int) -> Tensor:
        pixels = self.images.train if which == "train" else self.images.test
        return self._normalise(pixels[start:stop])

    def _normalise(self, pixels: Tensor) -> Tensor:
        return self.images.normalise(pixels).contiguous(memory_format=self.layout)


def batch_source(
    split: Split,
    device: torch.device,
    *,
    augment: str = "none",
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> BatchSource:
    """The :class:`BatchSource` of a split on ``device``: images when the split has them.

    Raises:
        ValueError: for an unknown ``augment``, or an augmentation of a split without images
            (the digits and the signals are trained as they are).
    """
    check_augment(augment)
    if split.images is None:
        if augment != "none":
            raise ValueError(
                f"augment={augment!r} needs a dataset of images (CIFAR); this split has "
                "feature rows only: use augment='none'"
            )
        return FeatureSource(split, device)
    return ImageSource(split, device, augment, generator, channels_last=channels_last)
