"""Data augmentation for image batches, on the device that holds them, from a seeded generator.

The standard CIFAR augmentations as whole-batch tensor operations (no per-image Python work):

* ``"basic"``: a random crop of the image padded by 4 zero pixels on each side, then a
  horizontal flip with probability 1/2 (He et al., 2016; the "basic" setting of Foret et al.,
  2021);
* ``"cutout"``: ``"basic"``, then one square of 16x16 pixels, its centre drawn uniformly over
  the image and the square clipped at the border, set to zero after normalisation, i.e. to the
  training set's mean (DeVries & Taylor, 2017);
* ``"none"``: the images as they are.

Every random draw comes from the ``torch.Generator`` passed in, which must live on the
images' device; the global generator is never used, so the same generator state gives the
same batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "AUGMENTATIONS",
    "CUTOUT_SIZE",
    "PAD",
    "check_augment",
    "crop_and_flip",
    "cutout_mask",
]

AUGMENTATIONS = ("none", "basic", "cutout")
"""Names accepted by ``augment=`` (and ``--augment``)."""

PAD = 4
"""Zero pixels added on each side before the random crop."""

CUTOUT_SIZE = 16
"""Side of the cutout square, in pixels (DeVries & Taylor's choice for CIFAR-10)."""


def check_augment(augment: object) -> str:
    """``augment`` if it names an augmentation, else a ValueError listing them."""
    if not isinstance(augment, str) or augment not in AUGMENTATIONS:
        raise ValueError(
            f"Invalid augment value: {augment!r}; use one of: {', '.join(AUGMENTATIONS)}"
        )
    return augment


def crop_and_flip(images: Tensor, generator: torch.Generator, pad: int = PAD) -> Tensor:
    """Random crops of the images padded by ``pad`` zeros, each flipped left-right with
    probability 1/2.

    For image ``i`` with offsets ``(dy, dx)`` drawn uniformly from ``[0, 2 * pad]`` and flip
    ``f``, the output is ``padded[i, :, dy + r, dx + c]`` at row ``r`` and column ``c``, or at
    column ``width - 1 - c`` when flipped: two gathers over the batch (rows, then columns).

    Args:
        images (Tensor): ``(n, channels, height, width)``, any dtype (uint8 pixels here)
        generator (torch.Generator): on the images' device; draws ``2n`` offsets, then ``n``
            flips
        pad (int, optional): padding on each side, >= 0 (default: 4)

    Returns:
        Tensor: a new tensor of the same shape, dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (n, channels, height, width), got {tuple(images.shape)}")
    n, _, height, width = images.shape
    device = images.device
    offsets = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator, device=device)
    flip = torch.randint(0, 2, (n, 1), generator=generator, device=device).bool()
    rows = offsets[0] + torch.arange(height, device=device)  # (n, height)
    columns = torch.arange(width, device=device).expand(n, width)
    columns = offsets[1] + torch.where(flip, width - 1 - columns, columns)  # (n, width)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    channels = images.shape[1]
    picked_rows = padded.gather(
        2, rows[:, None, :, None].expand(n, channels, height, padded.shape[3])
    )
    return picked_rows.gather(3, columns[:, None, None, :].expand(n, channels, height, width))


def cutout_mask(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    size: int = CUTOUT_SIZE,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(n, 1, height, width)`` boolean masks, False inside one ``size`` x ``size`` square
    per image whose centre ``(cy, cx)`` is drawn uniformly over the pixels.

    The square covers rows ``[cy - size // 2, cy - size // 2 + size)`` and the same for
    columns, clipped at the border (DeVries & Taylor, 2017).
    """
    centre = torch.stack(
        [
            torch.randint(0, height, (n,), generator=generator, device=device),
            torch.randint(0, width, (n,), generator=generator, device=device),
        ]
    )
    low = centre - size // 2
    rows = torch.arange(height, device=device)
    columns = torch.arange(width, device=device)
    in_rows = (rows >= low[0][:, None]) & (rows < low[0][:, None] + size)  # (n, height)
    in_columns = (columns >= low[1][:, None]) & (columns < low[1][:, None] + size)
    return ~(in_rows[:, :, None] & in_columns[:, None, :])[:, None]
