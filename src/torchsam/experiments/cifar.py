"""CIFAR-10 and CIFAR-100 read from a local folder in their standard python format.

Nothing is downloaded: point ``data_dir`` at the folder that the archives
``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` unpack to (``cifar-10-batches-py`` or
``cifar-100-python``), or at its parent. The files are pickles of dictionaries holding a
``data`` array (``N x 3072`` uint8, channel-major 32x32 images) and the labels. They are read
with an unpickler that accepts nothing but numpy arrays, so a stray file cannot run code.
numpy (a dependency of scikit-learn, ``pip install "torchsam[cli]"``) is needed to read them.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchsam.experiments.data import Images, Split, _check_fraction, _symmetric_noise

__all__ = ["CIFAR_SHAPE", "cifar"]

CIFAR_SHAPE = (3, 32, 32)
"""``(channels, height, width)`` of one CIFAR image."""
_PIXELS = 3 * 32 * 32

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
    # protocol 5: an array rebuilt from its data buffer
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    # how Python 3 writes bytes under protocol 2 (str -> latin-1): a codec, not code
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(module, name)


# protocol 5's out-of-band buffers: no file can hold them
_REFUSED_OPCODES = {"NEXT_BUFFER", "READONLY_BUFFER"}


def _unpickle(path: Path) -> dict[str, Any]:
    """The file's dictionary with ``str`` keys; a ValueError naming the file for anything else.

    The opcodes are read first (:mod:`pickletools`): out-of-band buffers are refused, and
    protocol 5's in-band ``bytearray`` (how numpy pickles an array's data there) is read as
    ``bytes``, the same data: an unpickler that fails halfway then leaves no buffer of a
    bytearray exported. Any exception of the scan or the unpickler becomes that ValueError:
    a corrupt pickle can make them raise almost any type (EOFError, TypeError, KeyError,
    OverflowError, MemoryError...), and the restricted :class:`_ArrayUnpickler` keeps them
    from building anything but arrays and containers, so no code of the file runs.
    """
    content = bytearray(path.read_bytes())
    try:
        for opcode, _, position in pickletools.genops(bytes(content)):
            if opcode.name in _REFUSED_OPCODES:
                raise pickle.UnpicklingError(f"opcode {opcode.name} has no place in a CIFAR file")
            if opcode.name == "BYTEARRAY8" and position is not None:
                content[position] = pickle.BINBYTES8[0]
        raw = _ArrayUnpickler(io.BytesIO(content), encoding="bytes").load()
    except Exception as exc:  # see the docstring: every failure is a malformed file
        raise ValueError(
            f"{path} is not a CIFAR batch in the python format ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path} is not a CIFAR batch in the python format: it holds a "
            f"{type(raw).__name__}, not a dict"
        )
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _pixels(path: Path, data: Any) -> Tensor:
    """The ``data`` entry as a ``(N, 3072)`` uint8 tensor, or a ValueError: no cast."""
    import numpy as np

    if not isinstance(data, np.ndarray):
        raise ValueError(
            f"{path}: 'data' must be a numpy uint8 array of shape (N, 3072), got a "
            f"{type(data).__name__}"
        )
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' must hold uint8 pixels, got dtype {data.dtype}")
    if data.ndim != 2 or data.shape[1] != _PIXELS or data.shape[0] < 1:
        raise ValueError(f"{path}: 'data' must have shape (N, 3072), N >= 1, got {data.shape}")
    return torch.from_numpy(np.require(data, requirements=["C", "W"]))  # a copy if read-only


def _labels(path: Path, labels: Any, key: str, n: int, num_classes: int) -> Tensor:
    """The label entry as ``n`` int64 values in ``[0, num_classes)``, or a ValueError."""
    import numpy as np

    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"{path}: {key!r} must be a list of ints, got an array of dtype "
                f"{labels.dtype} and shape {labels.shape}"
            )
        values = labels.astype(np.int64).tolist()
    elif isinstance(labels, list):
        values = labels
    else:
        raise ValueError(f"{path}: {key!r} must be a list of ints, got a {type(labels).__name__}")
    bad = next((v for v in values if type(v) is not int), None)
    if bad is not None:
        raise ValueError(f"{path}: {key!r} must hold ints, found {bad!r}")
    if len(values) != n:
        raise ValueError(f"{path}: 'data' has {n} images but {key!r} has {len(values)} labels")
    outside = next((v for v in values if not 0 <= v < num_classes), None)
    if outside is not None:
        raise ValueError(f"{path}: labels must lie in [0, {num_classes - 1}], found {outside}")
    return torch.tensor(values, dtype=torch.int64)


def _read(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """``(pixels (N, 3072) uint8, labels (N,) int64)`` of one file; a ValueError naming the
    file and the fault for anything malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    entries = _unpickle(path)
    missing = [k for k in ("data", label_key) if k not in entries]
    if missing:
        raise ValueError(f"{path} has no {' and '.join(map(repr, missing))} entry")
    data = _pixels(path, entries["data"])
    return data, _labels(path, entries[label_key], label_key, data.shape[0], num_classes)


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
    The uint8 pixels and the statistics come along as :attr:`Split.images
    <torchsam.experiments.data.Split>`, from which training builds its batches on the device.

    Every file is checked: a file that is not a pickled dict holding a ``data`` numpy uint8
    array of shape ``(N, 3072)`` and a list of ``N`` int labels in range (a corrupt or
    truncated file, float pixels, labels as an int, a string, a list of pixels...) raises one
    ValueError naming the file and the fault; nothing is cast. The unpickler builds numpy
    arrays and plain containers only, so a hostile file cannot run code.

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
    parts = [_read(folder / f, label_key, num_classes) for f in train_files]
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    x_test, y_test = _read(folder / test_file, label_key, num_classes)

    generator = torch.Generator().manual_seed(seed)
    train_index = torch.arange(y_train.numel())
    if train_size is not None and train_size < y_train.numel():
        train_index = torch.randperm(y_train.numel(), generator=generator)[:train_size]
        train_index = train_index.sort().values
    x_train, y_train = x_train[train_index], y_train[train_index]

    pixels_train = x_train.reshape(-1, *CIFAR_SHAPE)
    scaled_train = x_train.float().div_(255.0).reshape(-1, 3, 32 * 32)
    images = Images(
        train=pixels_train,
        test=x_test.reshape(-1, *CIFAR_SHAPE),
        mean=scaled_train.mean(dim=(0, 2)),
        std=scaled_train.std(dim=(0, 2)).clamp_min(1e-6),
    )
    del scaled_train

    noisy, noisy_index = _symmetric_noise(y_train, noise, num_classes, generator)
    return Split(
        x_train=images.normalise(images.train).reshape(-1, _PIXELS),
        y_train=noisy,
        y_train_clean=y_train,
        x_test=images.normalise(images.test).reshape(-1, _PIXELS),
        y_test=y_test,
        num_classes=num_classes,
        train_index=train_index,
        test_index=torch.arange(y_test.numel()),
        noisy_index=noisy_index,
        images=images,
    )
