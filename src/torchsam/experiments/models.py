"""Models for the experiments: small ones that are fast on a CPU (with optional BatchNorm), and
the CIFAR networks: ResNet-18 (3x3 stem, no initial max-pool), the CIFAR ResNet-32 of He et
al. and WideResNet-``d``-``k`` (WRN-16-8, and WRN-28-10 of the SAM paper's CIFAR tables).

Every model takes flat feature rows (as the :class:`~torchsam.experiments.data.Split` tensors
hold them) or images.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["mlp", "resnet18", "resnet_cifar", "small_cnn", "wide_resnet"]


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
    """Reshape flat feature rows ``(n, c*h*w)`` into images ``(n, c, h, w)``; images of that
    shape pass as they are (keeping their memory layout, e.g. ``channels_last``)."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and tuple(x.shape[1:]) == self.shape:
            return x
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


def _image_shape(image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
    c, h, w = (
        _check_positive_int(n, v)
        for n, v in zip(("channels", "height", "width"), image_shape, strict=True)
    )
    return c, h, w


def _per_stage(depth: object, extra: int) -> int:
    """Blocks per stage of a ``6n + extra``-layer network: ``n``, or a ValueError."""
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 6 + extra
        or (depth - extra) % 6
    ):
        raise ValueError(f"Invalid depth value: {depth!r}; depth must be 6n + {extra} with n >= 1")
    return (depth - extra) // 6


def _stem(shape: tuple[int, int, int], width: int) -> list[nn.Module]:
    """``Conv3x3(width) -> BN -> ReLU`` on the (unflattened) images."""
    conv = nn.Conv2d(shape[0], width, 3, padding=1, bias=False)
    return [_Unflatten(shape), conv, nn.BatchNorm2d(width), nn.ReLU()]


def _stages(
    block: type[nn.Module], width_in: int, widths: list[int], blocks: int
) -> list[nn.Module]:
    """``blocks`` blocks per width; every stage after the first starts with stride 2."""
    layers: list[nn.Module] = []
    for stage, width_out in enumerate(widths):
        for index in range(blocks):
            layers.append(block(width_in, width_out, 2 if stage and not index else 1))
            width_in = width_out
    return layers


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN layers and a (projected) shortcut, then ReLU."""

    def __init__(self, width_in: int, width_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(width_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


def resnet18(
    image_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10, width: int = 64
) -> nn.Sequential:
    """ResNet-18 (He et al., 2016) in its CIFAR form: a 3x3 stem without max-pooling.

    Stem ``Conv3x3(width) -> BN -> ReLU``, then four stages of two basic blocks with
    ``width, 2*width, 4*width, 8*width`` channels (the last three start with stride 2), global
    average pooling and a linear classifier. With the defaults it has 11.2M parameters.

    Args:
        image_shape (tuple, optional): ``(channels, height, width)`` of one input
            (default: ``(3, 32, 32)``, CIFAR)
        num_classes (int, optional): output logits (default: 10)
        width (int, optional): channels of the stem and the first stage (default: 64)

    Example:
        >>> resnet18(width=8)(torch.zeros(2, 3 * 32 * 32)).shape
        torch.Size([2, 10])
    """
    shape = _image_shape(image_shape)
    num_classes = _check_positive_int("num_classes", num_classes)
    width = _check_positive_int("width", width)
    widths = [width * 2**stage for stage in range(4)]
    return nn.Sequential(
        *_stem(shape, width),
        *_stages(_BasicBlock, width, widths, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1], num_classes),
    )


def resnet_cifar(
    image_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    depth: int = 32,
    width: int = 16,
) -> nn.Sequential:
    """The CIFAR ResNet of He et al. (2016, section 4.2), ResNet-32 by default.

    Stem ``Conv3x3(width) -> BN -> ReLU``, three stages of ``(depth - 2) / 6`` basic blocks
    with ``width, 2*width, 4*width`` channels (the last two start with stride 2), global
    average pooling and a linear classifier. A shortcut that changes the shape is a 1x1
    convolution with BatchNorm (the paper's option B; its CIFAR runs used zero-padding, A).
    ResNet-32 has 0.47M parameters; it is the model of the SAM paper's label-noise table.

    Args:
        image_shape (tuple, optional): ``(channels, height, width)`` (default: CIFAR's)
        num_classes (int, optional): output logits (default: 10)
        depth (int, optional): ``6n + 2`` layers (default: 32)
        width (int, optional): channels of the first stage (default: 16)

    Example:
        >>> resnet_cifar(depth=8, width=4)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    shape = _image_shape(image_shape)
    num_classes = _check_positive_int("num_classes", num_classes)
    width = _check_positive_int("width", width)
    blocks = _per_stage(depth, 2)
    widths = [width * 2**stage for stage in range(3)]
    return nn.Sequential(
        *_stem(shape, width),
        *_stages(_BasicBlock, width, widths, blocks),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[-1], num_classes),
    )


class _WideBlock(nn.Module):
    """WideResNet's pre-activation block: BN-ReLU-Conv3x3 twice, plus a (projected) shortcut."""

    def __init__(self, width_in: int, width_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(width_in)
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or width_in != width_out:
            self.shortcut = nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x).relu()
        out = self.conv2(self.bn2(self.conv1(pre)).relu())
        # the projection reads the pre-activated input, as in the WideResNet paper's code
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(
    image_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    depth: int = 16,
    widen: int = 8,
) -> nn.Sequential:
    """WideResNet-``depth``-``widen`` (Zagoruyko & Komodakis, 2016) for CIFAR; default 16-8.

    Stem ``Conv3x3(16)``, three groups of ``(depth - 4) / 6`` pre-activation blocks with
    ``16*widen, 32*widen, 64*widen`` channels (the last two start with stride 2), then
    ``BN -> ReLU``, global average pooling and a linear classifier; no dropout. WRN-16-8 has
    11.0M parameters; WRN-28-10 (``depth=28, widen=10``, the SAM paper's CIFAR model) 36.5M.

    Args:
        image_shape (tuple, optional): ``(channels, height, width)`` of one input
            (default: ``(3, 32, 32)``)
        num_classes (int, optional): output logits (default: 10)
        depth (int, optional): ``6n + 4`` layers (default: 16)
        widen (int, optional): width multiplier (default: 8)

    Example:
        >>> wide_resnet(depth=10, widen=1)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    shape = _image_shape(image_shape)
    num_classes = _check_positive_int("num_classes", num_classes)
    widen = _check_positive_int("widen", widen)
    blocks = _per_stage(depth, 4)
    widths = [16 * widen * 2**group for group in range(3)]
    width_in = widths[-1]
    layers: list[nn.Module] = [
        _Unflatten(shape),
        nn.Conv2d(shape[0], 16, 3, padding=1, bias=False),
        *_stages(_WideBlock, 16, widths, blocks),
        nn.BatchNorm2d(width_in),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width_in, num_classes),
    ]
    return nn.Sequential(*layers)
