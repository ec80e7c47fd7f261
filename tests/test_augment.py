"""CIFAR augmentation on the device: crops and flips are exactly what they claim, cutout squares
are where they claim, draws come from the generator passed in and repeat with it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from torchsam.experiments.augment import PAD, check_augment, crop_and_flip, cutout_mask
from torchsam.experiments.batches import ImageSource, batch_source
from torchsam.experiments.data import Images, Split


def _pattern(n: int, channels: int = 3, size: int = 32) -> Tensor:
    """Images whose every pixel value is unique and non-zero: 1 + index in the whole batch."""
    return torch.arange(1, n * channels * size * size + 1, dtype=torch.int64).reshape(
        n, channels, size, size
    )


def _crop_reference(image: Tensor, dy: int, dx: int, flip: bool, pad: int = PAD) -> Tensor:
    """The crop written out with plain slicing: pad with zeros, cut, then mirror the columns."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, pad : pad + h, pad : pad + w] = image
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(-1) if flip else crop


def test_crop_and_flip_is_one_exact_crop_of_the_padded_image() -> None:
    images = _pattern(300)
    out = crop_and_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    seen = set()
    for image, result in zip(images, out, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * PAD + 1)
            for dx in range(2 * PAD + 1)
            for flip in (False, True)
            if torch.equal(result, _crop_reference(image, dy, dx, flip))
        ]
        assert len(matches) == 1  # the pattern makes every crop distinct
        seen.add(matches[0])
    # 300 draws over 162 equally likely crops: a missing offset or flip would show
    assert {dy for dy, _, _ in seen} == set(range(2 * PAD + 1))
    assert {dx for _, dx, _ in seen} == set(range(2 * PAD + 1))
    assert {flip for _, _, flip in seen} == {False, True}


def test_flip_alone_mirrors_the_columns() -> None:
    images = _pattern(64)
    out = crop_and_flip(images, torch.Generator().manual_seed(1), pad=0)
    for image, result in zip(images, out, strict=True):
        assert torch.equal(result, image) or torch.equal(result, image.flip(-1))
    flipped = sum(not torch.equal(r, i) for i, r in zip(images, out, strict=True))
    assert 0 < flipped < 64


def test_augmentation_is_seeded_and_leaves_the_global_generator_alone() -> None:
    images = _pattern(32).to(torch.uint8)
    state = torch.get_rng_state()
    first = crop_and_flip(images, torch.Generator().manual_seed(5))
    again = crop_and_flip(images, torch.Generator().manual_seed(5))
    other = crop_and_flip(images, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    mask = cutout_mask(32, 32, 32, torch.Generator().manual_seed(5))
    assert torch.equal(mask, cutout_mask(32, 32, 32, torch.Generator().manual_seed(5)))
    assert torch.equal(torch.get_rng_state(), state)


def test_cutout_masks_one_clipped_square_per_image() -> None:
    size = 16
    masks = cutout_mask(200, 32, 32, torch.Generator().manual_seed(2), size=size)
    assert masks.shape == (200, 1, 32, 32)
    assert masks.dtype == torch.bool
    clipped = 0
    for mask in masks[:, 0]:
        matches = []
        for cy in range(32):
            for cx in range(32):
                expected = torch.ones(32, 32, dtype=torch.bool)
                top, left = max(cy - size // 2, 0), max(cx - size // 2, 0)
                expected[top : cy - size // 2 + size, left : cx - size // 2 + size] = False
                if torch.equal(mask, expected):
                    matches.append((cy, cx))
        assert len(matches) == 1
        clipped += (~mask).sum().item() < size * size
    assert 0 < clipped < 200  # centres near the border clip the square


def _image_split(n: int = 12) -> Split:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    scaled = pixels.float() / 255
    images = Images(
        train=pixels,
        test=pixels[:4],
        mean=scaled.mean(dim=(0, 2, 3)),
        std=scaled.std(dim=(0, 2, 3)),
    )
    labels = torch.arange(n) % 10
    return Split(
        x_train=images.normalise(pixels).reshape(n, -1),
        y_train=labels,
        y_train_clean=labels,
        x_test=images.normalise(pixels[:4]).reshape(4, -1),
        y_test=labels[:4],
        num_classes=10,
        train_index=torch.arange(n),
        test_index=torch.arange(4),
        noisy_index=torch.zeros(0, dtype=torch.int64),
        images=images,
    )


def test_image_batches_without_augmentation_equal_the_feature_rows() -> None:
    split = _image_split()
    source = batch_source(split, torch.device("cpu"))
    index = torch.tensor([3, 0, 7])
    assert torch.equal(source.train_inputs(index).reshape(3, -1), split.x_train[index])
    assert torch.equal(source.inputs("test", 1, 3).reshape(2, -1), split.x_test[1:3])


@pytest.mark.parametrize("augment", ["basic", "cutout"])
def test_image_batches_are_augmented_then_normalised(augment: str) -> None:
    split = _image_split()
    assert split.images is not None
    source = batch_source(
        split, torch.device("cpu"), augment=augment, generator=torch.Generator().manual_seed(3)
    )
    assert isinstance(source, ImageSource)
    index = torch.tensor([5, 1, 2, 9])
    batch = source.train_inputs(index)
    reference = torch.Generator().manual_seed(3)
    expected = split.images.normalise(crop_and_flip(split.images.train[index], reference))
    if augment == "cutout":
        mask = cutout_mask(4, 32, 32, reference)
        expected = torch.where(mask, expected, torch.zeros(()))
        assert (batch == 0).sum() >= 4 * 3 * 8 * 8
    assert torch.equal(batch, expected)


def test_augmentation_names_and_feature_rows() -> None:
    assert check_augment("cutout") == "cutout"
    with pytest.raises(ValueError, match="Invalid augment value: 'flip'; use one of: none"):
        check_augment("flip")
    split = _image_split()
    from dataclasses import replace

    with pytest.raises(ValueError, match="needs a dataset of images"):
        batch_source(replace(split, images=None), torch.device("cpu"), augment="basic")
    with pytest.raises(ValueError, match=r"images must be \(n, channels, height, width\)"):
        crop_and_flip(torch.zeros(3, 32, 32), torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_on_the_gpu_is_seeded_and_exact() -> None:
    images = _pattern(64)
    device = torch.device("cuda")
    first = crop_and_flip(images.to(device), torch.Generator(device).manual_seed(0))
    again = crop_and_flip(images.to(device), torch.Generator(device).manual_seed(0))
    assert torch.equal(first, again)
    for image, result in zip(images, first.cpu(), strict=True):
        assert any(
            torch.equal(result, _crop_reference(image, dy, dx, flip))
            for dy in range(2 * PAD + 1)
            for dx in range(2 * PAD + 1)
            for flip in (False, True)
        )
