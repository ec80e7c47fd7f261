"""Small models for the experiments: fast on a CPU, with optional BatchNorm."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be an int >= 1")
    return value


def mlp(
    in_features: int = 64,
    num_classes: int = 10,
    hidden: int = 128,
    depth: int = 2,
    batch_norm: bool = True,
) -> nn.Sequential:
    """A multi-layer perceptron: ``depth`` hidden blocks, then a linear classifier.

    Each hidden block is ``Linear(., hidden)``, then ``BatchNorm1d(hidden)`` if ``batch_norm``,
    then ``ReLU``. The output is ``num_classes`` logits. With the defaults (64 inputs, two
    blocks of 128) it has about 26k parameters: a training step takes well under a millisecond
    of compute on one CPU core, so experiments are dominated by the optimizer's own work.

    Args:
        in_features (int, optional): input features (default: 64, the 8x8 digits)
        num_classes (int, optional): output logits (default: 10)
        hidden (int, optional): width of every hidden layer (default: 128)
        depth (int, optional): number of hidden blocks, >= 1 (default: 2)
        batch_norm (bool, optional): add ``BatchNorm1d`` after each hidden ``Linear``
            (default: True)

    Returns:
        nn.Sequential: the model, with PyTorch's default initialisation (seed ``torch``'s
        global generator first for a reproducible one).

    Example:
        >>> model = mlp()
        >>> model(torch.zeros(8, 64)).shape
        torch.Size([8, 10])
    """
    in_features = _check_positive_int("in_features", in_features)
    num_classes = _check_positive_int("num_classes", num_classes)
    hidden = _check_positive_int("hidden", hidden)
    depth = _check_positive_int("depth", depth)
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
