"""Issue 18: the instruments report true numbers, or say they cannot.

Each test compares with an exact reference: the eigenvalues of the full Hessian from
``torch.autograd.functional.hessian`` on a tiny model, the model's own loss, the global RNG's
next draw.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchsam import landscape, sharpness

F64 = torch.float64
mse = nn.functional.mse_loss
ce = nn.functional.cross_entropy


# --------------------------------------------------------------------------- references
def _exact_hessian(model: nn.Module, loss_fn: Callable[..., Tensor], data: Any, names: list[str]):
    """The Hessian of the sample-weighted loss over ``data`` w.r.t. the named parameters, in
    float64, from ``torch.autograd.functional.hessian`` of a functional call."""
    model64 = _copy_as(model, F64)
    named = dict(model64.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    batches = [(x.to(F64) if x.is_floating_point() else x, y) for x, y in data]
    total = sum(len(y) for _, y in batches)

    def loss(w: Tensor) -> Tensor:
        params = {n: p.detach() for n, p in named.items()}
        for n, piece, shape in zip(names, w.split(sizes), shapes, strict=True):
            params[n] = piece.view(shape)
        out = w.new_zeros(())
        for x, y in batches:
            y = y.to(F64) if y.is_floating_point() else y
            out = out + loss_fn(torch.func.functional_call(model64, params, (x,)), y) * len(y)
        return out / total

    return torch.autograd.functional.hessian(loss, flat)


def _copy_as(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype).eval()


def _regression(out: int, dtype: torch.dtype, seed: int = 0, n: int = 24):
    """``nn.Linear(4, out)`` with MSE: the Hessian is ``I_out`` (x) the Gram matrix of the
    inputs with a column of ones, so every eigenvalue is repeated ``out`` times."""
    torch.manual_seed(seed)
    model = nn.Linear(4, out).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randn(n, out, generator=g, dtype=dtype)
    return model, [(x[:10], y[:10]), (x[10:], y[10:])]


def _mlp_regressor(dtype: torch.dtype, hidden: int = 16, out: int = 3):
    """An MLP regressor: the Hessian of its last layer is ``I_out`` (x) a Gram matrix."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, out)).to(dtype)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 5, generator=g, dtype=dtype)
    y = torch.randn(40, out, generator=g, dtype=dtype)
    return model, [(x[:25], y[:25]), (x[25:], y[25:])]


def _flat(vector: list[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1).to(F64) for v in vector])


def _check_pairs(result: sharpness.Eigenvalues, h: Tensor, tol: float) -> None:
    """Each reported pair has residual ||H v - lambda v|| <= tol * max|lambda| (the meaning
    of ``converged``), against the exact Hessian."""
    assert result.eigenvectors is not None
    scale = max(abs(v) for v in result)
    for value, vector in zip(result, result.eigenvectors, strict=True):
        v = _flat(vector)
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
        assert float((h @ v - value * v).norm()) <= tol * scale


# --------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("out", [2, 3])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_repeated_eigenvalues_are_found_with_their_multiplicity(
    dtype: torch.dtype, out: int, method: str
) -> None:
    model, data = _regression(out, dtype)
    names = [n for n, _ in model.named_parameters()]
    h = _exact_hessian(model, mse, data, names)
    exact = torch.linalg.eigvalsh(h).flip(0)
    k = out + 1  # every copy of the top eigenvalue, then the next one
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    top = sharpness.hessian_eigenvalues(
        model, mse, data, k=k, tol=tol, max_iter=200, method=method, return_eigenvectors=True
    )
    assert top.converged
    torch.testing.assert_close(
        torch.tensor(list(top), dtype=F64), exact[:k], rtol=2 * tol, atol=0.0
    )
    _check_pairs(top, h, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_per_layer_multiplicity_of_an_mlp_regressor(dtype: torch.dtype, method: str) -> None:
    model, data = _mlp_regressor(dtype)
    h = _exact_hessian(model, mse, data, ["2.weight", "2.bias"])
    exact = torch.linalg.eigvalsh(h).flip(0)
    tol = 1e-6 if dtype == torch.float64 else 1e-3
    top = sharpness.hessian_eigenvalues(
        model, mse, data, k=4, params="2", tol=tol, max_iter=300, method=method,
        return_eigenvectors=True,
    )  # fmt: skip
    assert top.converged
    torch.testing.assert_close(
        torch.tensor(list(top), dtype=F64), exact[:4], rtol=2 * tol, atol=0.0
    )
    _check_pairs(top, h, tol)


def test_a_multiplicity_in_a_krylov_space_that_is_not_exhausted() -> None:
    """Linear(40, 3): 41 distinct eigenvalues, each three times; the top ones converge long
    before a single Krylov space of 41 vectors is exhausted."""
    torch.manual_seed(0)
    model = nn.Linear(40, 3).to(F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 40, generator=g, dtype=F64) * torch.linspace(0.2, 3.0, 40, dtype=F64)
    y = torch.randn(200, 3, generator=g, dtype=F64)
    data = [(x, y)]
    h = _exact_hessian(model, mse, data, ["weight", "bias"])
    exact = torch.linalg.eigvalsh(h).flip(0)
    top = sharpness.hessian_eigenvalues(
        model, mse, data, k=4, tol=1e-8, max_iter=123, return_eigenvectors=True
    )
    assert top.converged
    torch.testing.assert_close(torch.tensor(list(top), dtype=F64), exact[:4], rtol=1e-7, atol=0)
    _check_pairs(top, h, 1e-8)


def test_converged_is_false_when_the_budget_runs_out() -> None:
    model, data = _mlp_regressor(F64, hidden=30)
    h = _exact_hessian(model, mse, data, [n for n, _ in model.named_parameters()])
    top = sharpness.hessian_eigenvalues(
        model, mse, data, k=3, tol=1e-12, max_iter=4, return_eigenvectors=True
    )
    assert not top.converged
    assert top.products <= 4 + 3
    # and converged=True only when each reported pair really has that residual
    top = sharpness.hessian_eigenvalues(
        model, mse, data, k=3, tol=1e-4, max_iter=200, return_eigenvectors=True
    )
    assert top.converged
    _check_pairs(top, h, 1e-4)


# --------------------------------------------------------------------------- items 2 and 3
def _loader(shuffle: bool, drop_last: bool, **kwargs: Any) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (30,), generator=g)
    return DataLoader(
        TensorDataset(x, y), batch_size=7, shuffle=shuffle, drop_last=drop_last, **kwargs
    )


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(F64)


_INSTRUMENTS: dict[str, Callable[[nn.Module, Any], object]] = {
    "eigenvalues": lambda m, d: sharpness.hessian_eigenvalues(m, ce, d, k=2, max_iter=10),
    "power": lambda m, d: sharpness.hessian_eigenvalues(m, ce, d, method="power", max_iter=5),
    "trace": lambda m, d: sharpness.hessian_trace(m, ce, d, samples=2),
    "spectrum": lambda m, d: sharpness.hessian_spectrum(m, ce, d, steps=3, points=10),
    "sam_sharpness": lambda m, d: sharpness.sam_sharpness(m, ce, d, steps=2),
    "surface_2d": lambda m, d: landscape.surface_2d(m, ce, d, steps=2),
    "surface_1d": lambda m, d: landscape.surface_1d(m, ce, d, steps=2),
    "interpolate": lambda m, d: landscape.interpolate(m, m, ce, d, steps=2),
}


@pytest.mark.parametrize("name", sorted(_INSTRUMENTS))
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_dataloader_does_not_draw_from_the_global_rng(name: str, shuffle: bool) -> None:
    model, loader = _classifier(), _loader(shuffle=shuffle, drop_last=False)
    torch.manual_seed(123)
    expected = torch.rand(4)  # the global RNG's next draw, without the measurement
    torch.manual_seed(123)
    _INSTRUMENTS[name](model, loader)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("batch_norm", ["eval", "train"])
def test_sam_sharpness_at_rho_zero_is_exactly_zero(
    shuffle: bool, drop_last: bool, batch_norm: str
) -> None:
    model, loader = _classifier(), _loader(shuffle, drop_last)
    assert sharpness.sam_sharpness(model, ce, loader, rho=0.0, batch_norm=batch_norm) == 0.0
    assert sharpness.sam_sharpness(model, ce, loader, rho=0.0, steps=3) == 0.0


@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (True, True)])
def test_the_landscape_middle_point_is_the_centre(shuffle: bool, drop_last: bool) -> None:
    model, loader = _classifier(), _loader(shuffle, drop_last)
    surface = landscape.surface_2d(model, ce, loader, steps=3)
    assert float(surface.loss[1, 1]) == surface.center
    curve = landscape.surface_1d(model, ce, loader, steps=3)
    assert float(curve.loss[1]) == curve.center
    other = _classifier()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    line = landscape.interpolate(model, other, ce, loader, steps=3)
    assert float(line.loss[0]) == line.center


@pytest.mark.parametrize(("shuffle", "drop_last"), [(True, False), (True, True)])
def test_keeping_graphs_does_not_change_the_eigenvalues(shuffle: bool, drop_last: bool) -> None:
    model, loader = _classifier(), _loader(shuffle, drop_last)
    kept = sharpness.hessian_eigenvalues(model, ce, loader, k=3, tol=1e-10, max_iter=200)
    rebuilt = sharpness.hessian_eigenvalues(
        model, ce, loader, k=3, tol=1e-10, max_iter=200, keep_graphs=False
    )
    torch.testing.assert_close(
        torch.tensor(list(kept)), torch.tensor(list(rebuilt)), rtol=1e-9, atol=1e-12
    )
    a = sharpness.hessian_trace(model, ce, loader, samples=5)
    b = sharpness.hessian_trace(model, ce, loader, samples=5, keep_graphs=False)
    assert float(a) == pytest.approx(float(b), rel=1e-9)


def test_the_batches_measured_are_one_pass_of_the_loader() -> None:
    """With a shuffling loader, the measurement is of the batches of one pass: the one the
    loader would have given next (the loader's own generator advances as for one pass)."""
    model = _classifier()
    loader = _loader(shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    replay = _loader(shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    one_pass = list(replay)
    h = _exact_hessian(model, ce, one_pass, [n for n, _ in model.named_parameters()])
    top = sharpness.hessian_eigenvalues(model, ce, loader, k=1, tol=1e-10, max_iter=200)
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)


# --------------------------------------------------------------------------- item 6
def _diverged() -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    model, data = _regression(2, F64)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    return model, data


_NONFINITE: dict[str, Callable[[nn.Module, Any], Any]] = {
    "lanczos": lambda m, d: sharpness.hessian_eigenvalues(m, mse, d, k=2, return_eigenvectors=True),
    "power": lambda m, d: sharpness.hessian_eigenvalues(m, mse, d, k=2, method="power"),
    "lanczos, graphs rebuilt": lambda m, d: sharpness.hessian_eigenvalues(
        m, mse, d, k=2, keep_graphs=False
    ),
    "trace": lambda m, d: sharpness.hessian_trace(m, mse, d, samples=3),
    "spectrum": lambda m, d: sharpness.hessian_spectrum(m, mse, d, steps=4, points=5),
    "sam_sharpness": lambda m, d: sharpness.sam_sharpness(m, mse, d),
    "sam_sharpness steps=3": lambda m, d: sharpness.sam_sharpness(m, mse, d, steps=3),
    "sam_sharpness m=4": lambda m, d: sharpness.sam_sharpness(m, mse, d, m=4),
}


def _values(result: Any) -> list[float]:
    if isinstance(result, sharpness.HessianSpectrum):
        return [*result.nodes.flatten().tolist(), *result.density.tolist()]
    if isinstance(result, list):
        return [float(v) for v in result]
    return [float(result)]


@pytest.mark.parametrize("name", sorted(_NONFINITE))
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_diverged_model_gives_nan_with_a_warning(name: str, bad: str) -> None:
    model, data = _regression(2, F64)
    with torch.no_grad():
        model.weight[0, 0] = float(bad)
    with pytest.warns(RuntimeWarning, match="not finite"):
        result = _NONFINITE[name](model, data)
    values = _values(result)
    assert values
    assert all(math.isnan(v) for v in values)
    if isinstance(result, sharpness.Eigenvalues):
        assert not result.converged
        if result.eigenvectors is not None:
            assert all(torch.isnan(t).all() for v in result.eigenvectors for t in v)
    if isinstance(result, sharpness.TraceEstimate):
        assert math.isnan(result.stderr)


def test_a_diverged_model_gives_nan_landscape_points_with_a_warning() -> None:
    model, data = _diverged()
    with pytest.warns(RuntimeWarning, match="not finite"):
        surface = landscape.surface_2d(model, mse, data, steps=3)
    assert math.isnan(surface.center)
    assert torch.isnan(surface.loss).all()


def test_a_finite_model_gives_no_warning() -> None:
    model, data = _regression(2, F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in _NONFINITE.values():
            assert all(math.isfinite(v) for v in _values(fn(model, data)))


# --------------------------------------------------------------------------- smaller items
def test_spectrum_of_one_step_without_margin_integrates_to_one() -> None:
    model, data = _regression(2, F64)
    spectrum = sharpness.hessian_spectrum(model, mse, data, steps=1, margin=0.0, points=2001)
    assert torch.isfinite(spectrum.density).all()
    # the integral of the density: it is ~0 at both ends of the grid, so the trapezoid rule
    # and the grid's own normalisation (sum x spacing) agree
    assert float(torch.trapezoid(spectrum.density, spectrum.grid)) == pytest.approx(1.0, abs=1e-6)
    spacing = float(spectrum.grid[1] - spectrum.grid[0])
    assert float(spectrum.density.sum()) * spacing == pytest.approx(1.0, abs=1e-12)
    assert spectrum.grid[0] < float(spectrum.nodes[0, 0]) < spectrum.grid[-1]


def test_surface_2d_takes_a_span_per_axis_in_mixed_forms() -> None:
    model, data = _classifier(), _loader(False, False)
    surface = landscape.surface_2d(model, ce, data, steps=3, span=(1.0, (0.0, 2.0)))
    assert surface.x.tolist() == [-1.0, 0.0, 1.0]
    assert surface.y.tolist() == [0.0, 1.0, 2.0]
    surface = landscape.surface_2d(model, ce, data, steps=3, span=((0.0, 2.0), 0.5))
    assert surface.x.tolist() == [0.0, 1.0, 2.0]
    assert surface.y.tolist() == [-0.5, 0.0, 0.5]
    surface = landscape.surface_2d(model, ce, data, steps=3, span=(0.0, 2.0))
    assert surface.x.tolist() == surface.y.tolist() == [0.0, 1.0, 2.0]


def test_plot_contour_refuses_an_empty_colour_scale() -> None:
    pytest.importorskip("matplotlib")
    model, data = _classifier(), _loader(False, False)
    surface = landscape.surface_2d(model, ce, data, steps=3)
    with pytest.raises(ValueError, match=r"vmin=5\.0 must be less than vmax=1\.0"):
        landscape.plot_contour(surface, vmin=5, vmax=1)
    high = float(surface.loss.max())
    with pytest.raises(ValueError, match="vmin"):
        landscape.plot_contour(surface, vmin=high + 1)
    with pytest.raises(ValueError, match=r"vmin=5\.0 must be less than vmax=1\.0"):
        landscape.plot_side_by_side(surface, surface, vmin=5, vmax=1)


def test_plot_contour_of_a_single_column_says_what_to_do() -> None:
    pytest.importorskip("matplotlib")
    model, data = _classifier(), _loader(False, False)
    surface = landscape.surface_2d(model, ce, data, coordinates=([0.0], [-1.0, 0.0, 1.0]))
    for plot in (landscape.plot_contour, landscape.plot_surface_3d):
        with pytest.raises(ValueError, match="at least 2 points along each axis"):
            plot(surface)
    with pytest.raises(ValueError, match="at least 2 points along each axis"):
        landscape.plot_side_by_side(surface, surface)


# --------------------------------------------------------------------------- non-finite products
def _infinite_curvature() -> tuple[nn.Module, Any, list[tuple[Tensor, Tensor]]]:
    """A finite loss and gradient (0 and 0) whose Hessian is infinite: ``|w x|^1.5`` at w = 0."""
    model = nn.Linear(2, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.zero_()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    return (
        model,
        lambda out, y: (out - y).abs().pow(1.5).mean(),
        [(x, torch.zeros(4, 1, dtype=F64))],
    )


_PRODUCTS = {
    "trace": lambda m, f, d, kg: sharpness.hessian_trace(m, f, d, samples=3, keep_graphs=kg),
    "lanczos": lambda m, f, d, kg: sharpness.hessian_eigenvalues(m, f, d, keep_graphs=kg),
    "power": lambda m, f, d, kg: sharpness.hessian_eigenvalues(
        m, f, d, method="power", keep_graphs=kg
    ),
    "spectrum": lambda m, f, d, kg: sharpness.hessian_spectrum(
        m, f, d, steps=2, points=3, keep_graphs=kg
    ),
}


@pytest.mark.parametrize("keep_graphs", [True, False])
@pytest.mark.parametrize("name", sorted(_PRODUCTS))
def test_a_non_finite_product_of_a_finite_loss_gives_nan(name: str, keep_graphs: bool) -> None:
    """The products are checked through the values read from them (no check of their own)."""
    model, loss_fn, data = _infinite_curvature()
    with pytest.warns(RuntimeWarning, match="Hessian-vector product is not finite"):
        result = _PRODUCTS[name](model, loss_fn, data, keep_graphs)
    values = _values(result)
    assert values
    assert all(math.isnan(v) for v in values)
