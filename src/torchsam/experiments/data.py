"""Small datasets for the experiments, with symmetric label noise on the training set.

* :func:`noisy_digits`: scikit-learn's copy of the UCI handwritten digits (1,797 images of 8x8
  pixels, 10 classes), which ships inside the scikit-learn package: nothing is downloaded.
  scikit-learn is an optional dependency (``pip install "torchsam[data]"``) imported only when
  the dataset is built.
* :func:`noisy_signals`: a generated 1-D signal classification task (noisy sinusoids with a
  transient burst), drawn from a seeded ``torch.Generator``; it needs nothing but torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Images", "Split", "noisy_digits", "noisy_signals"]

_INSTALL_HINT = (
    "noisy_digits() needs scikit-learn, which ships the digits dataset; "
    'install it with: pip install "torchsam[data]"'
)
_PIXEL_MAX = 16.0  # the digits' pixel values are integers in [0, 16]


@dataclass(frozen=True)
class Images:
    """A split's images as uint8 pixels, with the per-channel statistics that normalise them.

    :func:`~torchsam.experiments.train.train` keeps these on the device (a quarter of the
    float32 features' memory: 150 MB for CIFAR's training set) and builds each batch there:
    index, augment (``augment=``), then :meth:`normalise`.

    Attributes:
        train (Tensor): training images ``(n_train, channels, height, width)``, uint8, in the
            order of ``Split.x_train``
        test (Tensor): test images ``(n_test, channels, height, width)``, uint8
        mean (Tensor): per-channel mean of the training pixels scaled to ``[0, 1]``,
            ``(channels,)`` float32
        std (Tensor): their per-channel standard deviation, ``(channels,)`` float32
    """

    train: Tensor
    test: Tensor
    mean: Tensor
    std: Tensor

    def normalise(self, pixels: Tensor) -> Tensor:
        """``(pixels / 255 - mean) / std`` per channel, float32, same shape as ``pixels``."""
        shape = (1, -1, 1, 1)
        scaled = pixels.float().div_(255.0)
        return (scaled - self.mean.to(scaled.device).view(shape)) / self.std.to(scaled.device).view(
            shape
        )


@dataclass(frozen=True)
class Split:
    """A train/test split of a classification dataset, with noisy training labels.

    Attributes:
        x_train (Tensor): training features, ``(n_train, num_features)``, float32
        y_train (Tensor): training labels as trained on (with noise), ``(n_train,)``, int64
        y_train_clean (Tensor): the true training labels, ``(n_train,)``, int64
        x_test (Tensor): test features, ``(n_test, num_features)``, float32
        y_test (Tensor): true test labels, ``(n_test,)``, int64
        num_classes (int): number of classes
        train_index (Tensor): row of each training example in the full dataset, int64
        test_index (Tensor): row of each test example in the full dataset, int64
        noisy_index (Tensor): positions in the training set whose label was replaced (sorted),
            int64; ``y_train[noisy_index] != y_train_clean[noisy_index]`` everywhere
        images (Images | None): the same images as uint8 pixels, for datasets of images
            (CIFAR); ``x_train``/``x_test`` are then their normalised, flattened copies.
            None for the digits and the signals (default: None)
    """

    x_train: Tensor
    y_train: Tensor
    y_train_clean: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    train_index: Tensor
    test_index: Tensor
    noisy_index: Tensor
    images: Images | None = None

    @property
    def num_features(self) -> int:
        """Number of input features."""
        return int(self.x_train.shape[1])

    @property
    def noise(self) -> float:
        """Fraction of training labels that are wrong."""
        return self.noisy_index.numel() / max(self.y_train.numel(), 1)


def _check_fraction(name: str, value: Any, *, closed_low: bool) -> float:
    """``value`` as a float, or a ValueError unless it lies in ``[0, 1)`` / ``(0, 1)``."""
    interval = "[0, 1)" if closed_low else "(0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be a number in {interval}")
    low_ok = value >= 0.0 if closed_low else value > 0.0
    if not (math.isfinite(value) and low_ok and value < 1.0):
        raise ValueError(f"Invalid {name} value: {value}; {name} must lie in {interval}")
    return float(value)


def _load_digits() -> tuple[Tensor, Tensor]:
    """The digits as ``(features in [0, 1] float32, labels int64)``, from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / _PIXEL_MAX
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return x, y


def _stratified_split(
    y: Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Sorted (train, test) row indices; each class sends ``round(test_fraction * n_c)`` rows
    to the test set, chosen uniformly at random."""
    train: list[Tensor] = []
    test: list[Tensor] = []
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        rows = rows[torch.randperm(rows.numel(), generator=generator)]
        n_test = round(test_fraction * rows.numel())
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _symmetric_noise(
    y: Tensor, noise: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Replace exactly ``round(noise * len(y))`` labels, chosen uniformly at random, by a class
    drawn uniformly from the *other* ``num_classes - 1`` classes; return (labels, positions)."""
    n_noisy = round(noise * y.numel())
    where = torch.randperm(y.numel(), generator=generator)[:n_noisy].sort().values
    # an offset in 1..C-1 added modulo C is a uniform draw over the classes other than y
    offset = torch.randint(1, num_classes, (n_noisy,), generator=generator)
    noisy = y.clone()
    noisy[where] = (y[where] + offset) % num_classes
    return noisy, where


def noisy_digits(noise: float = 0.2, *, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """The 8x8 handwritten digits with symmetric label noise on the training set.

    The 1,797 images are split per class (stratified): ``round(test_fraction * n_c)`` images of
    each class ``c`` go to the test set. Pixel values are scaled to ``[0, 1]`` (divided by 16)
    and flattened to 64 float32 features. Then exactly ``round(noise * n_train)`` training
    labels, chosen uniformly at random, are replaced by a class drawn uniformly among the nine
    *other* classes (symmetric noise). Test labels are always clean. Everything random is drawn
    from a ``torch.Generator`` seeded with ``seed``: the same arguments give the same split.

    Args:
        noise (float, optional): fraction of training labels to corrupt, in ``[0, 1)``
            (default: 0.2)
        test_fraction (float, optional): fraction of each class held out for testing, in
            ``(0, 1)`` (default: 0.3)
        seed (int, optional): seed of the split and of the noise (default: 0)

    Returns:
        Split: the tensors, the number of classes, and the indices of the split and the noise.

    Raises:
        ValueError: for an argument out of range, or a split that leaves a set empty.
        ImportError: if scikit-learn is not installed (``pip install "torchsam[data]"``).

    Example:
        >>> split = noisy_digits(0.2, seed=0)
        >>> split.x_train.shape, split.num_classes
        (torch.Size([1258, 64]), 10)
    """
    noise = _check_fraction("noise", noise, closed_low=True)
    test_fraction = _check_fraction("test_fraction", test_fraction, closed_low=False)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed value: {seed!r}; seed must be an int")

    x, y = _load_digits()
    num_classes = int(y.max().item()) + 1
    generator = torch.Generator().manual_seed(seed)
    return _noisy_split(x, y, num_classes, test_fraction, noise, generator)


# the generated signals: 3 frequencies x 2 burst halves = 6 classes
_SIGNAL_FREQUENCIES = (3.0, 4.0, 5.0)  # cycles per window, before jitter
_FREQUENCY_JITTER = 0.15  # relative, uniform in [-0.15, 0.15]
_BURST_WIDTH = 0.05  # standard deviation of the Gaussian burst, as a fraction of the window


def _check_int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be an int >= {low}")
    return value


def noisy_signals(
    noise: float = 0.3,
    *,
    samples_per_class: int = 300,
    length: int = 64,
    signal_noise: float = 0.5,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> Split:
    r"""A generated 1-D signal classification task with symmetric label noise.

    Each sample is a window of ``length`` time steps :math:`t_i = i / \text{length}`:

    .. math::
        x(t) = a \sin(2\pi f t + \varphi)
            + b \exp\!\Big(-\frac{(t - c)^2}{2 \cdot 0.05^2}\Big) + \sigma\, \epsilon(t),

    with white Gaussian noise :math:`\epsilon(t)` of standard deviation
    :math:`\sigma` = ``signal_noise``. The class sets two things: the frequency
    :math:`f` (3, 4 or 5 cycles per window, each jittered by up to ±15%, so neighbouring
    classes overlap a little) and the half of the window that holds the burst (its centre
    :math:`c` uniform in ``[0.1, 0.4]`` or ``[0.6, 0.9]``): 6 classes. The amplitude
    :math:`a` is uniform in ``[0.5, 1.5]``, the phase :math:`\varphi` uniform, the burst
    height :math:`b` uniform in ``[1, 2]``. Each class has ``samples_per_class`` samples,
    split per class as in :func:`noisy_digits` (``round(test_fraction * n_c)`` to the test
    set), and exactly ``round(noise * n_train)`` training labels are replaced by a class drawn
    uniformly among the five others. Test labels are always clean. Everything random comes
    from a ``torch.Generator`` seeded with ``seed``: the same arguments give the same split.

    It is a task of another kind than the digits (a time series, features that are not
    pixels, a classifier that must find a frequency under noise and a shift), built so that
    no download is needed.

    Args:
        noise (float, optional): fraction of training labels to corrupt, in ``[0, 1)``
            (default: 0.3)
        samples_per_class (int, optional): samples generated per class, >= 2 (default: 300)
        length (int, optional): time steps per signal, >= 8 (default: 64)
        signal_noise (float, optional): standard deviation of the additive noise, >= 0
            (default: 0.5)
        test_fraction (float, optional): fraction of each class held out for testing, in
            ``(0, 1)`` (default: 0.3)
        seed (int, optional): seed of the signals, the split and the noise (default: 0)

    Returns:
        Split: ``length`` float32 features per sample, 6 classes; the indices refer to the
        generated samples, which are ordered class by class.

    Raises:
        ValueError: for an argument out of range, or a split that leaves a set empty.

    Example:
        >>> split = noisy_signals(0.3, seed=0)
        >>> split.x_train.shape, split.num_classes
        (torch.Size([1260, 64]), 6)
    """
    noise = _check_fraction("noise", noise, closed_low=True)
    test_fraction = _check_fraction("test_fraction", test_fraction, closed_low=False)
    samples_per_class = _check_int_at_least("samples_per_class", samples_per_class, 2)
    length = _check_int_at_least("length", length, 8)
    if (
        isinstance(signal_noise, bool)
        or not isinstance(signal_noise, (int, float))
        or not (math.isfinite(signal_noise) and signal_noise >= 0)
    ):
        raise ValueError(
            f"Invalid signal_noise value: {signal_noise!r}; it must be a finite number >= 0"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed value: {seed!r}; seed must be an int")

    generator = torch.Generator().manual_seed(seed)
    num_classes = 2 * len(_SIGNAL_FREQUENCIES)
    y = torch.arange(num_classes).repeat_interleave(samples_per_class)
    n = y.numel()

    def uniform(low: float, high: float, size: tuple[int, ...] = (n,)) -> Tensor:
        return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)

    base = torch.tensor(_SIGNAL_FREQUENCIES, dtype=torch.float64)[y // 2]
    frequency = base * (1.0 + uniform(-_FREQUENCY_JITTER, _FREQUENCY_JITTER))
    amplitude = uniform(0.5, 1.5)
    phase = uniform(0.0, 2 * math.pi)
    centre = uniform(0.1, 0.4) + 0.5 * (y % 2).double()
    height = uniform(1.0, 2.0)
    t = torch.arange(length, dtype=torch.float64) / length
    wave = amplitude[:, None] * torch.sin(2 * math.pi * frequency[:, None] * t + phase[:, None])
    burst = height[:, None] * torch.exp(-0.5 * ((t - centre[:, None]) / _BURST_WIDTH) ** 2)
    white = float(signal_noise) * torch.randn((n, length), generator=generator, dtype=torch.float64)
    x = (wave + burst + white).float()

    return _noisy_split(x, y, num_classes, test_fraction, noise, generator)


def _noisy_split(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    test_fraction: float,
    noise: float,
    generator: torch.Generator,
) -> Split:
    """A stratified train/test split of ``(x, y)`` with symmetric noise on the training labels."""
    train_index, test_index = _stratified_split(y, test_fraction, generator)
    if train_index.numel() == 0 or test_index.numel() == 0:
        raise ValueError(
            f"Invalid test_fraction value: {test_fraction}; it leaves the "
            f"{'training' if train_index.numel() == 0 else 'test'} set empty"
        )
    y_train_clean = y[train_index]
    y_train, noisy_index = _symmetric_noise(y_train_clean, noise, num_classes, generator)
    return Split(
        x_train=x[train_index],
        y_train=y_train,
        y_train_clean=y_train_clean,
        x_test=x[test_index],
        y_test=y[test_index],
        num_classes=num_classes,
        train_index=train_index,
        test_index=test_index,
        noisy_index=noisy_index,
    )
