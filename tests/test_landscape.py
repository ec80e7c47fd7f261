"""torchsam.landscape: surfaces, directions, interpolation and plots."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torchsam
from torchsam import landscape

F64 = torch.float64
ce = nn.functional.cross_entropy


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    net = _Net().to(F64)
    with torch.no_grad():  # running statistics away from their defaults
        for x, _ in _data():
            net(x)
    return net


def _data() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(14, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (14,), generator=g)
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def _loss(model: nn.Module, data: Any) -> float:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return sum(float(ce(model(x), y)) * len(y) for x, y in data) / sum(len(y) for _, y in data)


def _moved(model: nn.Module, directions: list[list[Tensor]], coeffs: list[float]) -> nn.Module:
    work = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(work.parameters()):
            p.copy_(p + sum(c * d[i] for c, d in zip(coeffs, directions, strict=True)))
    return work


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    for x, y in zip(a["grads"], b["grads"], strict=True):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


# --------------------------------------------------------------------------- directions
def test_filter_normalisation_gives_each_filter_the_model_filter_norm() -> None:
    net = _net()
    d = landscape.random_direction(net, generator=torch.Generator().manual_seed(3))
    for p, di in zip(net.parameters(), d, strict=True):
        assert di.shape == p.shape
        if p.dim() <= 1:
            assert torch.equal(di, torch.zeros_like(p))  # biases and BatchNorm: zero
        else:
            torch.testing.assert_close(
                di.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-8, atol=0
            )
    kept = landscape.random_direction(net, ignore_1d=False)
    assert torch.equal(kept[1], net.conv.bias.detach())
    layer = landscape.random_direction(net, normalization="layer")
    torch.testing.assert_close(layer[0].norm(), net.conv.weight.detach().norm())


def test_filter_normalize_leaves_its_inputs_alone() -> None:
    w = [torch.randn(4, 3), torch.randn(4)]
    d = [torch.randn(4, 3), torch.randn(4)]
    d0 = [t.clone() for t in d]
    out = landscape.filter_normalize(d, w)
    assert all(torch.equal(a, b) for a, b in zip(d, d0, strict=True))
    torch.testing.assert_close(out[0].norm(dim=1), w[0].norm(dim=1))


@pytest.mark.parametrize("normalization", ["filter", "layer", None])
def test_filter_normalize_moves_the_direction_to_the_weights_device(
    normalization: str | None,
) -> None:
    """A direction drawn on the CPU for weights on another device (``meta`` stands for a GPU:
    torch refuses to mix it with CPU tensors, as it refuses CUDA ones) comes back on the
    weights' device, for every normalisation."""
    weights = [torch.empty(4, 3, device="meta"), torch.empty(4, device="meta")]
    direction = [torch.randn(4, 3), torch.randn(4)]
    out = landscape.filter_normalize(direction, weights, normalization=normalization)
    assert [t.device.type for t in out] == ["meta", "meta"]
    assert [t.shape for t in out] == [w.shape for w in weights]


# --------------------------------------------------------------------------- surfaces
def test_surface_2d_values_and_centre() -> None:
    net, data = _net(), _data()
    surface = landscape.surface_2d(net, ce, data, steps=5, span=0.5)
    assert surface.loss.shape == (5, 5)
    assert surface.x.tolist() == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert surface.center == pytest.approx(_loss(net, data), rel=1e-12)
    assert surface.loss[2, 2].item() == surface.center
    dx, dy = surface.directions
    for i, j in [(0, 0), (1, 4), (4, 2)]:
        moved = _moved(net, [dx, dy], [surface.x[j].item(), surface.y[i].item()])
        assert surface.loss[i, j].item() == pytest.approx(_loss(moved, data), rel=1e-12)


def test_surface_2d_along_given_directions_and_coordinates() -> None:
    net, data = _net(), _data()
    names = [n for n, _ in net.named_parameters()]
    dx = {"fc.weight": torch.randn(3, 48, dtype=F64)}
    dy = [torch.randn_like(p) for p in net.parameters()]
    surface = landscape.surface_2d(
        net, ce, data, directions=(dx, dy), coordinates=([0.0, 0.1, 0.3], [-0.2, 0.0])
    )
    assert surface.loss.shape == (2, 3)
    full_dx = [dx.get(n, torch.zeros_like(p)) for n, p in zip(names, net.parameters(), strict=True)]
    moved = _moved(net, [full_dx, dy], [0.3, -0.2])
    assert surface.loss[0, 2].item() == pytest.approx(_loss(moved, data), rel=1e-12)
    assert surface.loss[1, 0].item() == surface.center
    with pytest.raises(ValueError, match=r"model.parameters\(\) order"):
        landscape.surface_2d(net, ce, data, directions=(dy[:2], dy))
    with pytest.raises(ValueError, match="shape"):
        landscape.surface_2d(net, ce, data, directions=({"fc.bias": torch.zeros(4)}, dy))
    with pytest.raises(ValueError, match="no parameter named"):
        landscape.surface_2d(net, ce, data, directions=({"fc.nope": torch.zeros(4)}, dy))


def test_symmetric_odd_grids_pass_through_the_model_exactly() -> None:
    net, data = _net(), _data()
    for span in (0.3, 0.7, 1.1):
        curve = landscape.surface_1d(net, ce, data, steps=7, span=span)
        assert curve.x[3].item() == 0.0
        assert curve.x[0].item() == -span
        assert curve.x[-1].item() == span
        assert curve.loss[3].item() == curve.center


def test_surface_1d_and_seeded_directions() -> None:
    net, data = _net(), _data()
    a = landscape.surface_1d(net, ce, data, steps=3, generator=torch.Generator().manual_seed(7))
    b = landscape.surface_1d(net, ce, data, steps=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.loss, b.loss)
    assert a.loss[1].item() == a.center
    assert a.direction is not None
    moved = _moved(net, [a.direction], [1.0])
    assert a.loss[2].item() == pytest.approx(_loss(moved, data), rel=1e-12)


def test_interpolation_ends_are_the_two_models() -> None:
    data = _data()
    net_a, net_b = _net(0), _net(1)
    curve = landscape.interpolate(net_a, net_b, ce, data, steps=5)
    assert curve.x.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.loss[0].item() == pytest.approx(_loss(net_a, data), rel=1e-12)
    assert curve.loss[-1].item() == pytest.approx(_loss(net_b, data), rel=1e-12)
    assert curve.center == curve.loss[0].item()
    middle = copy.deepcopy(net_a)
    with torch.no_grad():
        for v, w in zip(middle.state_dict().values(), net_b.state_dict().values(), strict=True):
            if v.is_floating_point():  # parameters and running statistics, halfway
                v.copy_(torch.lerp(v, w, 0.5))
    assert curve.loss[2].item() == pytest.approx(_loss(middle, data), rel=1e-12)
    with pytest.raises(ValueError, match="same shapes"):
        landscape.interpolate(net_a, nn.Linear(2, 2), ce, data)


def test_batch_statistics_mode() -> None:
    net, data = _net(), _data()
    surface = landscape.surface_1d(net, ce, data, steps=3, batch_norm="train")
    work = copy.deepcopy(net).eval()
    work.bn.train()
    with torch.no_grad():
        expected = sum(float(ce(work(x), y)) * len(y) for x, y in data) / 14
    assert surface.center == pytest.approx(expected, rel=1e-12)
    assert abs(surface.center - _loss(net, data)) > 1e-6


@pytest.mark.parametrize("batch_norm", ["eval", "train"])
def test_model_comes_back_bit_identical(batch_norm: str) -> None:
    net, data, other = _net(), _data(), _net(1)
    net.train()  # dropout and BatchNorm in training mode on entry
    ce(net(data[0][0]), data[0][1]).backward()
    before = _snapshot(net)
    other_before = _snapshot(other)
    landscape.surface_2d(net, ce, data, steps=3, batch_norm=batch_norm)
    landscape.surface_1d(net, ce, data, steps=3, batch_norm=batch_norm)
    landscape.interpolate(net, other, ce, data, steps=3, batch_norm=batch_norm)
    _assert_same(before, _snapshot(net))
    _assert_same(other_before, _snapshot(other))


def test_model_comes_back_when_the_loss_raises() -> None:
    net, data = _net(), _data()
    before = _snapshot(net)
    calls = 0

    def failing(out: Tensor, y: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("boom")
        return ce(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        landscape.surface_2d(net, failing, data, steps=3)
    _assert_same(before, _snapshot(net))


def test_progress_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    net, data = _net(), _data()
    landscape.surface_1d(net, ce, data, steps=4, progress=True)
    err = capsys.readouterr().err
    assert "surface_1d" in err
    assert "4/4" in err


def test_bad_input_is_rejected_with_a_message() -> None:
    net, data = _net(), _data()
    with pytest.raises(ValueError, match="steps"):
        landscape.surface_2d(net, ce, data, steps=1)
    with pytest.raises(ValueError, match="span"):
        landscape.surface_2d(net, ce, data, span=0.0)
    with pytest.raises(TypeError, match="iterator"):
        landscape.surface_1d(net, ce, (b for b in data))
    with pytest.raises(ValueError, match="batch_norm"):
        landscape.surface_1d(net, ce, data, batch_norm="running")
    with pytest.raises(ValueError, match="normalization"):
        landscape.random_direction(net, normalization="model")


# --------------------------------------------------------------------------- plots
def _is_png(path: Path) -> bool:
    from matplotlib.image import imread

    image = imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100


def test_plots_write_valid_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    net, data = _net(), _data()
    a = landscape.surface_2d(net, ce, data, steps=5)
    b = landscape.surface_2d(_net(1), ce, data, steps=5)
    figures = {
        "contour.png": landscape.plot_contour(a, path=tmp_path / "contour.png", levels=10),
        "surface.png": landscape.plot_surface_3d(a, path=tmp_path / "surface.png"),
        "curves.png": landscape.plot_1d(
            [
                landscape.surface_1d(net, ce, data, steps=3),
                landscape.interpolate(net, _net(1), ce, data, steps=3),
            ],
            labels=["random direction", "interpolation"],
            path=tmp_path / "curves.png",
        ),
        "side.png": landscape.plot_side_by_side(a, b, path=str(tmp_path / "side.png"), levels=10),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        assert _is_png(tmp_path / name), name
    fig = landscape.plot_side_by_side(a, b, kind="surface")  # not rendered: 3-D is slow
    assert [ax.name for ax in fig.axes[:2]] == ["3d", "3d"]


def test_side_by_side_shares_axes_and_colour_scale() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.contour import ContourSet

    net, data = _net(), _data()
    a = landscape.surface_2d(net, ce, data, steps=3, span=0.5)
    b = landscape.surface_2d(_net(1), ce, data, steps=3, span=1.0)
    fig = landscape.plot_side_by_side(a, b, titles=("SGD", "SAM"))
    left, right = (ax for ax in fig.axes if ax.get_title() in ("SGD", "SAM"))
    assert left.get_xlim() == right.get_xlim() == (-1.0, 1.0)
    assert left.get_ylim() == right.get_ylim()
    levels = [
        [c.levels.tolist() for c in ax.get_children() if isinstance(c, ContourSet)]
        for ax in (left, right)
    ]
    assert levels[0] == levels[1]
    low = min(float(a.loss.min()), float(b.loss.min()))
    high = max(float(a.loss.max()), float(b.loss.max()))
    assert levels[0][0][0] == pytest.approx(low)
    assert levels[0][0][-1] == pytest.approx(high)
    with pytest.raises(TypeError, match="plot_1d"):
        landscape.plot_side_by_side(a, landscape.surface_1d(net, ce, data, steps=3))


def test_importing_torchsam_does_not_import_matplotlib() -> None:
    code = (
        "import sys, torchsam; torchsam.landscape; torchsam.sharpness; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    net, data = _net(), _data()
    surface = landscape.surface_2d(net, ce, data, steps=3)
    monkeypatch.delitem(sys.modules, "torchsam._landscape_plot", raising=False)
    monkeypatch.delattr(torchsam, "_landscape_plot", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "torchsam\[plot\]"'):
        landscape.plot_contour(surface)
