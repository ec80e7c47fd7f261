"""Plots of loss landscapes and Hessian spectra; the only torchsam module that imports matplotlib.

It is imported by the ``plot_*`` functions of :mod:`torchsam.landscape` and
:mod:`torchsam.sharpness` when a plot is asked for. Figures are built as
``matplotlib.figure.Figure`` objects, without pyplot: no global figure state, no GUI backend,
the same PNG bytes from the same data; ``path`` saves a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:
    from matplotlib import cm
    from matplotlib.figure import Figure
except ImportError as error:  # pragma: no cover - exercised without matplotlib only
    raise ImportError('torchsam\'s plots need matplotlib: pip install "torchsam[plot]"') from error

if TYPE_CHECKING:
    from torchsam.landscape import LossCurve, LossSurface
    from torchsam.sharpness import HessianSpectrum

_DPI = 120


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=_DPI, format="png")
    return fig


def _check_surface(surface: object, name: str) -> None:
    from torchsam.landscape import LossSurface

    if not isinstance(surface, LossSurface):
        raise TypeError(
            f"{name} must be a LossSurface from surface_2d, got {type(surface).__name__}"
            " (use plot_1d for curves)"
        )
    if surface.loss.shape[0] < 2 or surface.loss.shape[1] < 2:
        raise ValueError(
            f"{name} has {len(surface.x)} x {len(surface.y)} points: a contour or surface plot "
            "needs at least 2 points along each axis; plot a single row or column with "
            "plot_1d (a LossCurve from surface_1d)"
        )


def _levels(
    surfaces: Sequence[LossSurface], levels: int, vmin: float | None, vmax: float | None
) -> torch.Tensor:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer of at least 2, got {levels!r}")
    for name, value in (("vmin", vmin), ("vmax", vmax)):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if vmin is not None and vmax is not None and not float(vmin) < float(vmax):
        raise ValueError(f"vmin={float(vmin)!r} must be less than vmax={float(vmax)!r}")
    finite = [s.loss[torch.isfinite(s.loss)] for s in surfaces]
    if any(f.numel() == 0 for f in finite):
        raise ValueError("a surface has no finite loss value to plot")
    low = min(float(f.min()) for f in finite) if vmin is None else float(vmin)
    high = max(float(f.max()) for f in finite) if vmax is None else float(vmax)
    if not high > low:
        if vmin is not None or vmax is not None:
            raise ValueError(
                f"the colour scale [{low!r}, {high!r}] is empty: vmin={vmin!r} and vmax={vmax!r} "
                "leave no room above or below the surface's losses; give both, with vmin < vmax"
            )
        high = low + max(abs(low), 1.0) * 1e-6  # a flat surface: one colour
    return torch.linspace(low, high, levels, dtype=torch.float64)


def _clip(loss: torch.Tensor, levels: torch.Tensor) -> Any:
    return loss.clamp(float(levels[0]), float(levels[-1])).numpy()


def _contour_on(ax: Any, surface: LossSurface, levels: torch.Tensor, cmap: str) -> Any:
    x, y = surface.x.numpy(), surface.y.numpy()
    filled = ax.contourf(x, y, _clip(surface.loss, levels), levels=levels.numpy(), cmap=cmap)
    ax.contour(x, y, _clip(surface.loss, levels), levels=levels.numpy(), colors="k", linewidths=0.3)
    ax.plot([0.0], [0.0], marker="+", color="w", markersize=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_aspect("equal", adjustable="box")
    return filled


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
        surface (LossSurface): from :func:`torchsam.landscape.surface_2d`
        path (str or Path, optional): save the figure there as a PNG
        title (str, optional): the title
        levels (int, optional): number of contour levels (default: 30)
        vmin, vmax (float, optional): the colour scale (default: the surface's range); values
            outside are clipped to it. A ValueError if ``vmin >= vmax``, or if the one given
            leaves an empty scale with the surface's range
        cmap (str, optional): a matplotlib colour map name (default: "viridis")
    """
    _check_surface(surface, "surface")
    lv = _levels([surface], levels, vmin, vmax)
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    filled = _contour_on(ax, surface, lv, cmap)
    fig.colorbar(filled, ax=ax, label="loss")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _surface_on(ax: Any, surface: LossSurface, levels: torch.Tensor, cmap: str) -> Any:
    x, y = torch.meshgrid(surface.x, surface.y, indexing="xy")
    lo, hi = float(levels[0]), float(levels[-1])
    art = ax.plot_surface(
        x.numpy(),
        y.numpy(),
        _clip(surface.loss, levels),
        cmap=cmap,
        vmin=lo,
        vmax=hi,
        linewidth=0,
        antialiased=True,
    )
    ax.set_zlim(lo, hi)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_zlabel("loss")
    return art


def plot_surface_3d(
    surface: LossSurface,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Figure:
    """A 3-D surface plot of a surface; ``vmin``/``vmax`` clip the loss axis and colours."""
    _check_surface(surface, "surface")
    lv = _levels([surface], 2, vmin, vmax)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    _surface_on(ax, surface, lv, cmap)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_1d(
    curves: LossCurve | Sequence[LossCurve],
    *,
    labels: Sequence[str] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    xlabel: str = "distance along the direction",
    log: bool = False,
) -> Figure:
    """One or more loss curves on the same axes (e.g. SGD and SAM along their directions).

    Args:
        curves: a :class:`~torchsam.landscape.LossCurve` or a sequence of them
        labels (sequence of str, optional): one legend label per curve
        path, title: as for :func:`plot_contour`
        xlabel (str, optional): the x-axis label (for :func:`~torchsam.landscape.interpolate`,
            say "t")
        log (bool, optional): logarithmic loss axis (default: False)
    """
    from torchsam.landscape import LossCurve

    items = [curves] if isinstance(curves, LossCurve) else list(curves)
    if not items or not all(isinstance(c, LossCurve) for c in items):
        raise TypeError("curves must be a LossCurve or a non-empty sequence of LossCurve")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} curves")
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    for i, curve in enumerate(items):
        label = labels[i] if labels is not None else None
        ax.plot(curve.x.numpy(), curve.loss.numpy(), marker=".", label=label)
    if labels is not None:
        ax.legend()
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    return _save(fig, path)


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
    """Two surfaces side by side on the same axes and the same colour scale.

    The picture of the SAM paper: the landscape around an SGD-trained model next to the one
    around a SAM-trained model. Both panels share their x and y limits, the contour levels (or
    the loss axis for ``kind="surface"``) and one colour bar, so equal colours mean equal
    losses. Each surface should come from filter-normalised directions of its own model (the
    default of :func:`~torchsam.landscape.surface_2d`), which makes the two comparable.

    Args:
        surface_a, surface_b (LossSurface): the left and right surfaces
        titles (pair of str, optional): panel titles (default: ("SGD", "SAM"))
        path (str or Path, optional): save the figure there as a PNG
        kind (str, optional): ``"contour"`` or ``"surface"`` (3-D) (default: "contour")
        levels, vmin, vmax, cmap: as for :func:`plot_contour`; the default scale spans both
            surfaces
    """
    _check_surface(surface_a, "surface_a")
    _check_surface(surface_b, "surface_b")
    if kind not in ("contour", "surface"):
        raise ValueError(f'kind must be "contour" or "surface", got {kind!r}')
    if len(titles) != 2:
        raise ValueError("titles must be a pair of strings")
    lv = _levels([surface_a, surface_b], levels, vmin, vmax)
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    xlim = (
        min(float(surface_a.x.min()), float(surface_b.x.min())),
        max(float(surface_a.x.max()), float(surface_b.x.max())),
    )
    ylim = (
        min(float(surface_a.y.min()), float(surface_b.y.min())),
        max(float(surface_a.y.max()), float(surface_b.y.max())),
    )
    axes = []
    art: Any = None
    for i, (surface, title) in enumerate(zip((surface_a, surface_b), titles, strict=True)):
        if kind == "contour":
            ax = fig.add_subplot(1, 2, i + 1)
            art = _contour_on(ax, surface, lv, cmap)
        else:
            ax = fig.add_subplot(1, 2, i + 1, projection="3d")
            art = _surface_on(ax, surface, lv, cmap)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(title)
        axes.append(ax)
    if kind == "contour":
        fig.colorbar(art, ax=axes, label="loss")
    else:
        mappable = cm.ScalarMappable(cmap=cmap)
        mappable.set_clim(float(lv[0]), float(lv[-1]))
        fig.colorbar(mappable, ax=axes, label="loss", shrink=0.7)
    return _save(fig, path)


def plot_spectrum(
    spectrum: HessianSpectrum,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    log: bool = True,
) -> Figure:
    """The Hessian's spectral density from :func:`torchsam.sharpness.hessian_spectrum`.

    ``log=True`` (the default, as in Ghorbani et al.) plots the density on a logarithmic axis,
    with 1e-7 added so that empty regions stay on the plot.
    """
    from torchsam.sharpness import HessianSpectrum

    if not isinstance(spectrum, HessianSpectrum):
        raise TypeError(f"spectrum must be a HessianSpectrum, got {type(spectrum).__name__}")
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    density = spectrum.density + 1e-7 if log else spectrum.density
    ax.plot(spectrum.grid.numpy(), density.numpy())
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    return _save(fig, path)
