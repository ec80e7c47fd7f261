"""Small models for the experiments: fast on a CPU, with optional BatchNorm."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["mlp", "small_cnn"]


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


class _Unflatten(nn.Module):
    """Reshape flat feature rows ``(n, c*h*w)`` into images ``(n, c, h, w)``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.shape)


def small_cnn(
    image_shape: tuple[int, int, int] = (1, 8, 8),
    num_classes: int = 10,
    channels: int = 32,
    batch_norm: bool = True,
) -> nn.Sequential:
    """A small convolutional network: two 3x3 conv blocks, a pooled linear classifier.

    It takes flat feature rows (as :func:`~torchsam.experiments.noisy_digits` gives them) or
    images, reshapes them to ``image_shape``, then runs ``Conv(channels) -> [BatchNorm2d] ->
    ReLU -> Conv(2*channels) -> [BatchNorm2d] -> ReLU -> MaxPool(2) -> Linear``. With the
    defaults (8x8 digits, 32 channels) it has about 29k parameters.

    Args:
        image_shape (tuple, optional): ``(channels, height, width)`` of one input
            (default: ``(1, 8, 8)``, the digits)
        num_classes (int, optional): output logits (default: 10)
        channels (int, optional): channels of the first conv layer, doubled in the second
            (default: 32)
        batch_norm (bool, optional): add ``BatchNorm2d`` after each conv (default: True)

    Example:
        >>> model = small_cnn()
        >>> model(torch.zeros(8, 64)).shape
        torch.Size([8, 10])
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
    in_channels, height, width = (
        _check_positive_int(n, v)
        for n, v in zip(("channels", "height", "width"), image_shape, strict=True)
    )
    num_classes = _check_positive_int("num_classes", num_classes)
    channels = _check_positive_int("channels", channels)
    layers: list[nn.Module] = [_Unflatten((in_channels, height, width))]
    width_in = in_channels
    for width_out in (channels, 2 * channels):
        layers.append(nn.Conv2d(width_in, width_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width_out))
        layers.append(nn.ReLU())
        width_in = width_out
    layers += [nn.MaxPool2d(2), nn.Flatten()]
    layers.append(nn.Linear(width_in * (height // 2) * (width // 2), num_classes))
    return nn.Sequential(*layers)
