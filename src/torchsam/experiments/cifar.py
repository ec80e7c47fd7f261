"""CIFAR-10 and CIFAR-100 read from a local folder in their standard python format.

Nothing is downloaded: point ``data_dir`` at the folder that the archives
``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` unpack to (``cifar-10-batches-py`` or
``cifar-100-python``), or at its parent. The files are pickles of dictionaries holding a
``data`` array (``N x 3072`` uint8, channel-major 32x32 images) and the labels. They are read
with an unpickler that accepts nothing but numpy arrays, so a stray file cannot run code.
numpy (a dependency of scikit-learn, ``pip install "torchsam[cli]"``) is needed to read them.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchsam.experiments.data import Split, _check_fraction, _symmetric_noise

__all__ = ["CIFAR_SHAPE", "cifar"]

CIFAR_SHAPE = (3, 32, 32)
"""``(channels, height, width)`` of one CIFAR image."""

_LAYOUT = {
    # name: (folder, training files, test file, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels", 100),
}

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(module, name)


def _read(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    with path.open("rb") as f:
        try:
            raw = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path} is not a CIFAR batch in the python format: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a CIFAR batch in the python format (not a dict)")
    entries = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    if "data" not in entries or label_key not in entries:
        raise ValueError(f"{path} has no 'data' and {label_key!r} entries")
    data = torch.as_tensor(entries["data"], dtype=torch.uint8)
    labels = torch.as_tensor(list(entries[label_key]), dtype=torch.int64)
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.numel():
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, got "
            f"{tuple(data.shape)} and {labels.numel()}"
        )
    return data, labels


def _folder(data_dir: str | Path, name: str) -> Path:
    root = Path(data_dir)
    sub = _LAYOUT[name][0]
    for candidate in (root / sub, root):
        if (candidate / _LAYOUT[name][2]).is_file():
            return candidate
    raise FileNotFoundError(
        f"no {name} data in {root}: expected {root / sub / _LAYOUT[name][2]} (unpack "
        f"{name.replace('cifar', 'cifar-')}-python.tar.gz there; "
        "nothing is downloaded)"
    )


def cifar(
    name: str,
    data_dir: str | Path,
    *,
    noise: float = 0.0,
    train_size: int | None = None,
    seed: int = 0,
) -> Split:
    """CIFAR-10 or CIFAR-100 from ``data_dir``, with optional symmetric label noise.

    The official training and test sets are kept. Pixels are scaled to ``[0, 1]``, then
    normalised per channel with the training set's mean and standard deviation, and flattened
    to 3,072 float32 features per image (channel-major, as :data:`CIFAR_SHAPE`; the models
    reshape them). With ``train_size``, a random subset of that many training images is kept
    (for quick runs). Label noise is the same as :func:`~torchsam.experiments.noisy_digits`'s:
    exactly ``round(noise * n_train)`` labels replaced by a different class drawn uniformly.

    Args:
        name (str): ``"cifar10"`` or ``"cifar100"``
        data_dir (str | Path): the unpacked folder or its parent
        noise (float, optional): fraction of training labels to corrupt, in ``[0, 1)``
            (default: 0.0)
        train_size (int, optional): keep this many training images (default: all)
        seed (int, optional): seed of the subset and of the noise (default: 0)

    Returns:
        Split: the tensors and the indices of the subset and the noise.

    Raises:
        ValueError: for an unknown name, an argument out of range, or a malformed file.
        FileNotFoundError: if the folder or a file is missing.
    """
    if name not in _LAYOUT:
        raise ValueError(f"Unknown CIFAR dataset {name!r}; use one of {', '.join(_LAYOUT)}")
    noise = _check_fraction("noise", noise, closed_low=True)
    if train_size is not None and (
        isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1
    ):
        raise ValueError(f"Invalid train_size value: {train_size!r}; it must be an int >= 1")
    _, train_files, test_file, label_key, num_classes = _LAYOUT[name]
    folder = _folder(data_dir, name)
    parts = [_read(folder / f, label_key) for f in train_files]
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    x_test, y_test = _read(folder / test_file, label_key)
    for labels in (y_train, y_test):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}]")

    generator = torch.Generator().manual_seed(seed)
    train_index = torch.arange(y_train.numel())
    if train_size is not None and train_size < y_train.numel():
        train_index = torch.randperm(y_train.numel(), generator=generator)[:train_size]
        train_index = train_index.sort().values
    x_train, y_train = x_train[train_index], y_train[train_index]

    scaled_train = x_train.float().div_(255.0).reshape(-1, 3, 32 * 32)
    mean = scaled_train.mean(dim=(0, 2), keepdim=True)
    std = scaled_train.std(dim=(0, 2), keepdim=True).clamp_min(1e-6)

    def normalise(x: Tensor) -> Tensor:
        return ((x.float().div_(255.0).reshape(-1, 3, 32 * 32) - mean) / std).reshape(-1, 3072)

    noisy, noisy_index = _symmetric_noise(y_train, noise, num_classes, generator)
    return Split(
        x_train=normalise(x_train),
        y_train=noisy,
        y_train_clean=y_train,
        x_test=normalise(x_test),
        y_test=y_test,
        num_classes=num_classes,
        train_index=train_index,
        test_index=torch.arange(y_test.numel()),
        noisy_index=noisy_index,
    )
