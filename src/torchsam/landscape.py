r"""Loss landscapes: the loss along directions around a model, and between two models.

Li, Xu, Taylor, Studer and Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018: around weights :math:`w`, the loss surface

.. math:: f(\alpha, \beta) = L(w + \alpha\, \delta + \beta\, \eta)

along random Gaussian directions :math:`\delta, \eta` that are *filter-normalised*: each filter
(each slice along the first dimension of a weight tensor) of a direction is rescaled to the norm
of the same filter of :math:`w`, so that the picture does not depend on the scale invariance of
ReLU networks, and two models' pictures can be compared. One-dimensional parameters (biases,
BatchNorm scales and shifts) get a zero direction by default, as in the paper's code.

The data protocol, the measured loss and what happens to the model are those of
:mod:`torchsam.sharpness`: ``data`` is an iterable of ``(inputs, targets)`` batches, read once
at the start of each call into a fixed list that every point is measured on (so a shuffling
``DataLoader`` measures one function, and the middle point of a symmetric odd grid is exactly
``center``), with torch's global RNG state given back around that read; the loss is the
sample-weighted mean of ``loss_fn`` over the batches; every module is in evaluation mode
(dropout off; BatchNorm on running statistics, or ``batch_norm="train"`` for batch statistics
with the running statistics untouched); and the model comes back bit-identical (weights,
buffers, gradients, modes, RNG state). A loss that is not finite (NaN or infinite) at a point,
or at the centre, is reported as NaN there, with a ``RuntimeWarning``. The grid is evaluated
without autograd graphs (``torch.no_grad``) on the model's own parameters, each point set from a
saved copy as ``w + alpha * delta + beta * eta`` (no drift from accumulated steps), and the
weights are copied back at the end, also on error.

The plots (:func:`plot_contour`, :func:`plot_surface_3d`, :func:`plot_1d`,
:func:`plot_side_by_side`) need matplotlib (``pip install "torchsam[plot]"``), which is imported
only when a plot is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from torchsam._measure import (
    Data,
    LossFn,
    Progress,
    check_batch_norm,
    fixed_batches,
    mean_loss,
    measuring,
    not_finite,
    random_generator,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "LossCurve",
    "LossSurface",
    "filter_normalize",
    "interpolate",
    "plot_1d",
    "plot_contour",
    "plot_side_by_side",
    "plot_surface_3d",
    "random_direction",
    "surface_1d",
    "surface_2d",
]

Direction = Sequence[Tensor] | Mapping[str, Tensor]
Span = float | tuple[float, float]

_NORMALIZATIONS = ("filter", "layer", None)


@dataclass(frozen=True)
class LossSurface:
    """A 2-D loss surface.

    Attributes:
        x (Tensor): ``(nx,)`` coordinates along the first direction
        y (Tensor): ``(ny,)`` coordinates along the second direction
        loss (Tensor): ``(ny, nx)`` losses, ``loss[i, j]`` at ``w + x[j] d_x + y[i] d_y``
            (the layout ``matplotlib``'s ``contour(x, y, loss)`` expects)
        center (float): the loss of the model itself
        directions (tuple): the two directions, tensors shaped like the model's parameters

    ``x``, ``y`` and ``loss`` are float64 tensors on the CPU.
    """

    x: Tensor
    y: Tensor
    loss: Tensor
    center: float
    directions: tuple[list[Tensor], list[Tensor]]


@dataclass(frozen=True)
class LossCurve:
    """A 1-D loss curve.

    Attributes:
        x (Tensor): ``(n,)`` coordinates (for :func:`interpolate`, the interpolation weight ``t``)
        loss (Tensor): ``(n,)`` the losses there
        center (float): the loss at ``x = 0`` (the model; for :func:`interpolate`, ``model_a``)
        direction (list[Tensor] | None): the direction, or None for :func:`interpolate`
    """

    x: Tensor
    loss: Tensor
    center: float
    direction: list[Tensor] | None


# --------------------------------------------------------------------------- directions
def filter_normalize(
    direction: Sequence[Tensor],
    weights: Sequence[Tensor],
    *,
    normalization: str | None = "filter",
    ignore_1d: bool = True,
) -> list[Tensor]:
    r"""Scale ``direction`` to the weights, filter by filter (Li et al. 2018, Sec. 4).

    For a tensor of two or more dimensions, each filter :math:`d_i` (slice along the first
    dimension) becomes :math:`d_i\, \lVert w_i \rVert / (\lVert d_i \rVert + 10^{-10})`; with
    ``normalization="layer"`` the whole tensor is scaled that way instead, and with None it is
    left as it is. One-dimensional tensors get zero when ``ignore_1d`` (the paper's default),
    else a copy of the weights.

    Returns:
        list[Tensor]: new tensors on the weights' devices and of their dtypes; the inputs are
        not modified.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f'normalization must be "filter", "layer" or None, got {normalization!r}')
    direction = list(direction)
    weights = list(weights)
    if len(direction) != len(weights):
        raise ValueError(f"direction has {len(direction)} tensors, the weights {len(weights)}")
    out = []
    for d, w in zip(direction, weights, strict=True):
        if d.shape != w.shape:
            raise ValueError(
                f"direction tensor of shape {tuple(d.shape)} for weights {tuple(w.shape)}"
            )
        d = d.detach().to(w.device, w.dtype)
        w = w.detach()
        if w.dim() <= 1:
            out.append(torch.zeros_like(w) if ignore_1d else w.clone())
        elif normalization == "filter":
            dn = torch.linalg.vector_norm(d.flatten(1), dim=1)
            wn = torch.linalg.vector_norm(w.flatten(1), dim=1)
            factor = (wn / (dn + 1e-10)).view(-1, *([1] * (d.dim() - 1)))
            out.append(d * factor)
        elif normalization == "layer":
            out.append(d * (w.norm() / (d.norm() + 1e-10)))
        else:
            out.append(d.clone())
    return out


def random_direction(
    model: nn.Module,
    *,
    normalization: str | None = "filter",
    ignore_1d: bool = True,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """A random Gaussian direction in the model's parameter space, filter-normalised.

    One tensor per parameter of ``model`` (in ``model.parameters()`` order), drawn from
    ``generator`` (default: a generator seeded with 0) and passed through
    :func:`filter_normalize`.
    """
    gen = random_generator(generator)
    weights = [p.detach() for p in model.parameters()]
    if not weights:
        raise ValueError("the model has no parameters")
    raw = [
        torch.randn(w.shape, generator=gen, device=gen.device, dtype=torch.float32).to(w)
        for w in weights
    ]
    return filter_normalize(raw, weights, normalization=normalization, ignore_1d=ignore_1d)


def _as_direction(model: nn.Module, direction: Direction, name: str) -> list[Tensor]:
    named = list(model.named_parameters())
    if isinstance(direction, Mapping):
        unknown = set(direction) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"{name}: no parameter named {sorted(unknown)[0]!r} in the model")
        tensors = [
            direction[n].detach() if n in direction else torch.zeros_like(p) for n, p in named
        ]
    else:
        tensors = [d.detach() if isinstance(d, Tensor) else d for d in direction]
        if len(tensors) != len(named):
            raise ValueError(
                f"{name} has {len(tensors)} tensors but the model has {len(named)} parameters; "
                "give one tensor per parameter in model.parameters() order, or a dict by name"
            )
    out = []
    for t, (n, p) in zip(tensors, named, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: the entry for {n} is not a tensor")
        if t.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} for {n} of shape {tuple(p.shape)}")
        out.append(t.to(device=p.device, dtype=p.dtype))
    return out


def _axis(steps: int, span: Span, name: str) -> list[float]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer of at least 2, got {steps!r}")
    if isinstance(span, (int, float)) and not isinstance(span, bool):
        if not span > 0:
            raise ValueError(f"{name} must be positive, got {span!r}")
        low, high = -float(span), float(span)
    elif isinstance(span, (tuple, list)) and len(span) == 2:
        low, high = float(span[0]), float(span[1])
        if not low < high:
            raise ValueError(f"{name} must be (low, high) with low < high, got {span!r}")
    else:
        raise TypeError(f"{name} must be a number or a (low, high) pair, got {span!r}")
    values = [low + (high - low) * i / (steps - 1) for i in range(steps)]
    values[-1] = high  # exact end points, and exactly 0 at the centre of a symmetric odd grid
    if low == -high and steps % 2 == 1:
        values[steps // 2] = 0.0
    return values


def _coords(values: Sequence[float] | Tensor, name: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


# --------------------------------------------------------------------------- evaluation
class _Grid:
    """Evaluates the loss at ``base + sum_k c_k d_k`` on the model's own parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Data, batch_norm: str) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
        check_batch_norm(batch_norm)
        self.model = model
        self.loss_fn = loss_fn
        self.data = fixed_batches(data)
        self.batch_norm = batch_norm

    def loss(self) -> float:
        return mean_loss(self.model, self.loss_fn, self.data)


def _finite(center: float, losses: list[float]) -> tuple[float, list[float]]:
    """Non-finite losses as NaN, with one warning."""
    bad = [v for v in [center, *losses] if not math.isfinite(v)]
    if not bad:
        return center, losses
    not_finite(f"the loss at {len(bad)} of {len(losses) + 1} points (the centre included)")
    return (
        center if math.isfinite(center) else math.nan,
        [v if math.isfinite(v) else math.nan for v in losses],
    )


def _walk(
    grid: _Grid,
    directions: Sequence[list[Tensor]],
    points: Sequence[Sequence[float]],
    progress: bool,
    desc: str,
) -> tuple[float, list[float]]:
    params: list[Tensor] = list(grid.model.parameters())
    bar = Progress(len(points), desc, progress)
    with measuring(grid.model, grid.batch_norm), torch.no_grad():
        base = [p.detach().clone() for p in params]
        try:
            center = grid.loss()
            losses = []
            for coeffs in points:
                torch._foreach_copy_(params, base)
                for c, d in zip(coeffs, directions, strict=True):
                    if c != 0.0:
                        torch._foreach_add_(params, d, alpha=c)
                losses.append(grid.loss())
                bar.update()
        finally:
            for p, b in zip(params, base, strict=True):
                p.copy_(b)
            bar.close()
    return _finite(center, losses)


def surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    directions: tuple[Direction, Direction] | None = None,
    steps: int = 21,
    span: Span | tuple[Span, Span] = 1.0,
    coordinates: tuple[Sequence[float] | Tensor, Sequence[float] | Tensor] | None = None,
    normalization: str | None = "filter",
    ignore_1d: bool = True,
    batch_norm: str = "eval",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LossSurface:
    """The loss on a ``steps x steps`` grid in the plane of two directions around the model.

    Args:
        model (nn.Module): the centre of the plane
        loss_fn (callable): ``loss_fn(outputs, targets)``, the mean loss of a batch
        data (iterable): ``(inputs, targets)`` batches, read once into a fixed list, measured
            at every grid point
        directions (pair, optional): two directions, each one tensor per parameter (in
            ``model.parameters()`` order) or a dict from parameter name to tensor (missing
            names: zero); used as given. Default: two :func:`random_direction` draws
        steps (int, optional): grid points per axis (default: 21)
        span (float or pair, optional): the grid covers ``[-span, span]`` on each axis, or
            ``(low, high)``, or one of those per axis, such as ``(1.0, (0.0, 2.0))`` (a pair of
            two numbers is ``(low, high)`` for both axes) (default: 1.0)
        coordinates (pair, optional): the x and y coordinates, overriding steps and span
        normalization, ignore_1d: for the random directions, see :func:`filter_normalize`
        batch_norm (str, optional): ``"eval"`` or ``"train"`` (default: ``"eval"``)
        generator (torch.Generator, optional): for the random directions (default: seeded 0)
        progress (bool, optional): show progress (tqdm if installed) (default: False)

    Returns:
        LossSurface: ``x``, ``y``, ``loss`` of shape ``(len(y), len(x))``, ``center``,
        ``directions``. With an odd ``steps`` and a symmetric span the middle point is the
        model itself and equals ``center``.

    Example:
        >>> surface = torchsam.landscape.surface_2d(model, loss_fn, loader, steps=21)
        >>> torchsam.landscape.plot_contour(surface, path="landscape.png")
    """
    grid = _Grid(model, loss_fn, data, batch_norm)
    if directions is None:
        gen = random_generator(generator)
        dx = random_direction(
            model, normalization=normalization, ignore_1d=ignore_1d, generator=gen
        )
        dy = random_direction(
            model, normalization=normalization, ignore_1d=ignore_1d, generator=gen
        )
    else:
        if not isinstance(directions, (tuple, list)) or len(directions) != 2:
            raise TypeError("directions must be a pair (direction_x, direction_y)")
        dx = _as_direction(model, directions[0], "directions[0]")
        dy = _as_direction(model, directions[1], "directions[1]")
    if coordinates is not None:
        if not isinstance(coordinates, (tuple, list)) or len(coordinates) != 2:
            raise TypeError("coordinates must be a pair (x, y)")
        xs, ys = (
            _coords(coordinates[0], "coordinates[0]"),
            _coords(coordinates[1], "coordinates[1]"),
        )
    else:
        if (
            isinstance(span, (tuple, list))
            and len(span) == 2
            and any(isinstance(s, (tuple, list)) for s in span)
        ):
            # one span per axis, each a number or a (low, high) pair; a pair of two numbers
            # is (low, high) for both axes
            span_x, span_y = span[0], span[1]
        else:
            span_x = span_y = span  # type: ignore[assignment]
        xs, ys = _axis(steps, span_x, "span"), _axis(steps, span_y, "span")
    points = [(x, y) for y in ys for x in xs]
    center, losses = _walk(grid, [dx, dy], points, progress, "surface_2d")
    loss = torch.tensor(losses, dtype=torch.float64).view(len(ys), len(xs))
    return LossSurface(
        x=torch.tensor(xs, dtype=torch.float64),
        y=torch.tensor(ys, dtype=torch.float64),
        loss=loss,
        center=center,
        directions=(dx, dy),
    )


def surface_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    direction: Direction | None = None,
    steps: int = 51,
    span: Span = 1.0,
    coordinates: Sequence[float] | Tensor | None = None,
    normalization: str | None = "filter",
    ignore_1d: bool = True,
    batch_norm: str = "eval",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> LossCurve:
    """The loss along one direction through the model, ``L(w + x d)``.

    The arguments are those of :func:`surface_2d` for one direction (default: a
    :func:`random_direction` draw).

    Returns:
        LossCurve: ``x``, ``loss``, ``center`` and ``direction``.
    """
    grid = _Grid(model, loss_fn, data, batch_norm)
    if direction is None:
        d = random_direction(
            model,
            normalization=normalization,
            ignore_1d=ignore_1d,
            generator=random_generator(generator),
        )
    else:
        d = _as_direction(model, direction, "direction")
    xs = (
        _coords(coordinates, "coordinates")
        if coordinates is not None
        else _axis(steps, span, "span")
    )
    center, losses = _walk(grid, [d], [(x,) for x in xs], progress, "surface_1d")
    return LossCurve(
        x=torch.tensor(xs, dtype=torch.float64),
        loss=torch.tensor(losses, dtype=torch.float64),
        center=center,
        direction=d,
    )


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    steps: int = 21,
    span: tuple[float, float] = (0.0, 1.0),
    coordinates: Sequence[float] | Tensor | None = None,
    batch_norm: str = "eval",
    progress: bool = False,
) -> LossCurve:
    r"""The loss along the line between two models, :math:`L((1 - t)\, w_a + t\, w_b)`.

    Goodfellow, Vinyals and Saxe, "Qualitatively characterizing neural network optimization
    problems", ICLR 2015. Parameters and floating-point buffers (BatchNorm running statistics)
    are interpolated with ``torch.lerp``, which is exact at ``t = 0`` and ``t = 1``: the ends are
    the two models. The interpolated weights live in ``model_a``'s parameters while measuring;
    both models come back bit-identical.

    Args:
        model_a, model_b (nn.Module): two models of the same architecture
        loss_fn, data: as for :func:`surface_2d`
        steps (int, optional): number of points (default: 21)
        span (pair, optional): the range of ``t`` (default: ``(0.0, 1.0)``)
        coordinates (optional): the values of ``t``, overriding steps and span
        batch_norm, progress: as for :func:`surface_2d`

    Returns:
        LossCurve: ``x`` (the values of ``t``), ``loss``, ``center`` (the loss of ``model_a``).
    """
    grid = _Grid(model_a, loss_fn, data, batch_norm)
    if not isinstance(model_b, nn.Module):
        raise TypeError(f"model_b must be an nn.Module, got {type(model_b).__name__}")
    pa, pb = list(model_a.parameters()), list(model_b.parameters())
    ba = [b for b in model_a.buffers() if b.is_floating_point()]
    bb = [b for b in model_b.buffers() if b.is_floating_point()]
    if len(pa) != len(pb) or any(a.shape != b.shape for a, b in zip(pa, pb, strict=True)):
        raise ValueError("model_a and model_b must have parameters of the same shapes")
    if len(ba) != len(bb) or any(a.shape != b.shape for a, b in zip(ba, bb, strict=True)):
        raise ValueError("model_a and model_b must have floating-point buffers of the same shapes")
    ts = (
        _coords(coordinates, "coordinates")
        if coordinates is not None
        else _axis(steps, span, "span")
    )
    targets = pa + ba
    ends = [b.detach().to(a.device, a.dtype) for a, b in zip(targets, pb + bb, strict=True)]
    bar = Progress(len(ts), "interpolate", progress)
    losses = []
    with measuring(model_a, batch_norm), torch.no_grad():
        base = [t.detach().clone() for t in targets]
        try:
            center = grid.loss()
            for t in ts:
                for x, a, b in zip(targets, base, ends, strict=True):
                    torch.lerp(a, b, t, out=x)
                losses.append(grid.loss())
                bar.update()
        finally:
            for x, a in zip(targets, base, strict=True):
                x.copy_(a)
            bar.close()
    center, losses = _finite(center, losses)
    return LossCurve(
        x=torch.tensor(ts, dtype=torch.float64),
        loss=torch.tensor(losses, dtype=torch.float64),
        center=center,
        direction=None,
    )


# --------------------------------------------------------------------------- plots
# The plots live in torchsam._landscape_plot, the one module that imports matplotlib; it is
# imported here only when a plot is asked for.


def plot_contour(
    surface: LossSurface,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    levels: int = 30,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Filled contours of a surface with a colour bar; the model sits at the ``+``.

    Args:
        surface (LossSurface): from :func:`surface_2d`
        path (str or Path, optional): save the figure there as a PNG
        title (str, optional): the title
        levels (int, optional): number of contour levels (default: 30)
        vmin, vmax (float, optional): the colour scale (default: the surface's range); values
            outside are clipped to it. A ValueError if ``vmin >= vmax``, or if the one given
            leaves an empty scale with the surface's range
        cmap (str, optional): a matplotlib colour map name (default: "viridis")

    A surface needs at least 2 points along each axis (else a ValueError: use
    :func:`plot_1d`).

    Returns:
        matplotlib.figure.Figure
    """
    from torchsam import _landscape_plot

    return _landscape_plot.plot_contour(
        surface, path=path, title=title, levels=levels, vmin=vmin, vmax=vmax, cmap=cmap
    )


def plot_surface_3d(
    surface: LossSurface,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Figure:
    """A 3-D plot of a surface; ``vmin``/``vmax`` clip the loss axis and the colours.

    Returns:
        matplotlib.figure.Figure
    """
    from torchsam import _landscape_plot

    return _landscape_plot.plot_surface_3d(
        surface, path=path, title=title, vmin=vmin, vmax=vmax, cmap=cmap
    )


def plot_1d(
    curves: LossCurve | Sequence[LossCurve],
    *,
    labels: Sequence[str] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    xlabel: str = "distance along the direction",
    log: bool = False,
) -> Figure:
    """One or more loss curves on the same axes (e.g. SGD's and SAM's, or an interpolation).

    Args:
        curves: a :class:`LossCurve` or a sequence of them
        labels (sequence of str, optional): one legend label per curve
        path, title: as for :func:`plot_contour`
        xlabel (str, optional): the x-axis label (for :func:`interpolate`, say "t")
        log (bool, optional): logarithmic loss axis (default: False)

    Returns:
        matplotlib.figure.Figure
    """
    from torchsam import _landscape_plot

    return _landscape_plot.plot_1d(
        curves, labels=labels, path=path, title=title, xlabel=xlabel, log=log
    )


def plot_side_by_side(
    surface_a: LossSurface,
    surface_b: LossSurface,
    *,
    titles: tuple[str, str] = ("SGD", "SAM"),
    path: str | Path | None = None,
    kind: str = "contour",
    levels: int = 30,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Two surfaces side by side on the same axes and the same colour scale: SGD against SAM.

    Both panels share their x and y limits, the contour levels (or the loss axis with
    ``kind="surface"``) and one colour bar, so equal colours mean equal losses. Give each model
    its own filter-normalised directions (the default of :func:`surface_2d`), which is what makes
    the two pictures comparable (Li et al. 2018, Sec. 4).

    Args:
        surface_a, surface_b (LossSurface): the left and right surfaces
        titles (pair of str, optional): panel titles (default: ("SGD", "SAM"))
        path (str or Path, optional): save the figure there as a PNG
        kind (str, optional): ``"contour"`` or ``"surface"`` (3-D) (default: "contour")
        levels, vmin, vmax, cmap: as for :func:`plot_contour`; by default the scale spans both
            surfaces

    Returns:
        matplotlib.figure.Figure

    Example:
        >>> sgd = torchsam.landscape.surface_2d(sgd_model, loss_fn, loader)
        >>> sam = torchsam.landscape.surface_2d(sam_model, loss_fn, loader)
        >>> torchsam.landscape.plot_side_by_side(sgd, sam, path="sgd_vs_sam.png")
    """
    from torchsam import _landscape_plot

    return _landscape_plot.plot_side_by_side(
        surface_a,
        surface_b,
        titles=titles,
        path=path,
        kind=kind,
        levels=levels,
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
    )
