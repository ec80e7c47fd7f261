"""torchsam.sharpness against exact answers from the full Hessian of tiny models."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchsam import sharpness
from torchsam._measure import batches

F64 = torch.float64
ce = nn.functional.cross_entropy


def _mlp(seed: int = 0, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 3)).to(F64)


def _data(
    seed: int = 1, n: int = 20, sizes: tuple[int, ...] = (8, 12)
) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def _full_loss(
    model: nn.Module, names: list[str], data: list[tuple[Tensor, Tensor]], train_bn: bool = False
) -> Callable[[Tensor], Tensor]:
    """The sample-weighted loss over data as a function of the flat chosen parameters."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    work = copy.deepcopy(model).eval()
    if train_bn:
        for m in work.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train()

    def loss(flat: Tensor) -> Tensor:
        params, i = dict(fixed), 0
        for n in names:
            k = math.prod(shapes[n])
            params[n] = flat[i : i + k].view(shapes[n])
            i += k
        total = sum(len(y) for _, y in data)
        out = flat.new_zeros(())
        for x, y in data:
            state = {**params, **{k: v.clone() for k, v in buffers.items()}}
            out = out + ce(torch.func.functional_call(work, state, (x,)), y) * len(y)
        return out / total

    return loss


def _hessian(
    model: nn.Module, data: Any, names: list[str] | None = None, train_bn: bool = False
) -> Tensor:
    names = names or [n for n, _ in model.named_parameters()]
    flat = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    loss = _full_loss(model, names, data, train_bn)
    if train_bn:
        # through BatchNorm in training mode, torch.func's transforms (hessian, and jacrev of
        # jacrev) give a wrong Hessian in torch 2.13: on _trained_net, ||Hv - finite
        # differences|| is 0.27 for them and 3e-8 for plain double backward, used here
        return torch.autograd.functional.hessian(loss, flat)
    return torch.func.hessian(loss)(flat)


# --------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize(
    ("method", "keep_graphs"), [("lanczos", True), ("lanczos", False), ("power", True)]
)
def test_top_eigenvalues_equal_the_full_hessian(method: str, keep_graphs: bool) -> None:
    model, data = _mlp(), _data()
    true = torch.linalg.eigvalsh(_hessian(model, data))
    k = 3 if method == "lanczos" else 2
    top = sharpness.hessian_eigenvalues(
        model, ce, data, k=k, method=method, tol=1e-10, max_iter=500, keep_graphs=keep_graphs
    )
    assert isinstance(top, list)
    assert top.converged
    expected = (
        true.flip(0)[:k] if method == "lanczos" else true[true.abs().argsort(descending=True)][:k]
    )
    torch.testing.assert_close(torch.tensor(top, dtype=F64), expected, rtol=1e-7, atol=1e-9)
    assert top == sorted(top, reverse=True)


def test_lanczos_stops_at_the_tolerance_with_an_error_bound() -> None:
    model, data = _mlp(width=10), _data(n=40, sizes=(40,))
    true = float(torch.linalg.eigvalsh(_hessian(model, data))[-1])
    n = sum(p.numel() for p in model.parameters())
    top = sharpness.hessian_eigenvalues(model, ce, data, tol=1e-3, max_iter=n)
    assert top.converged
    assert top.products < n
    assert abs(top[0] - true) <= 1e-3 * abs(true)


def test_eigenvectors_are_unit_eigenvectors() -> None:
    model, data = _mlp(), _data()
    h = _hessian(model, data)
    top = sharpness.hessian_eigenvalues(model, ce, data, k=2, tol=1e-10, return_eigenvectors=True)
    assert top.eigenvectors is not None
    for value, vector in zip(top, top.eigenvectors, strict=True):
        assert [v.shape for v in vector] == [p.shape for p in model.parameters()]
        flat = torch.cat([v.reshape(-1) for v in vector])
        torch.testing.assert_close(flat.norm(), torch.tensor(1.0, dtype=F64))
        torch.testing.assert_close(h @ flat, value * flat, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("params", ["2", ["2.weight", "2.bias"], "module", "tensors"])
def test_per_layer_hessian_is_the_diagonal_block(params: Any) -> None:
    model, data = _mlp(), _data()
    if params == "module":
        params = model[2]
    elif params == "tensors":
        params = [model[2].bias, model[2].weight]  # any order: model order is used
    block = _hessian(model, data, names=["2.weight", "2.bias"])
    true = torch.linalg.eigvalsh(block).flip(0)[:2]
    top = sharpness.hessian_eigenvalues(model, ce, data, k=2, params=params, tol=1e-10)
    torch.testing.assert_close(torch.tensor(top, dtype=F64), true, rtol=1e-7, atol=1e-9)
    trace = sharpness.hessian_trace(model, ce, data, samples=2, params=params)
    assert math.isfinite(trace)


def test_frozen_parameters_are_left_out() -> None:
    model, data = _mlp(), _data()
    model[0].requires_grad_(False)
    block = _hessian(model, data, names=["2.weight", "2.bias"])
    top = sharpness.hessian_eigenvalues(model, ce, data, tol=1e-10)
    torch.testing.assert_close(top[0], float(torch.linalg.eigvalsh(block)[-1]), rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="not requiring a gradient"):
        sharpness.hessian_eigenvalues(model, ce, data, params="0")


# --------------------------------------------------------------------------- trace
def test_trace_is_exact_with_zero_error_for_a_diagonal_hessian() -> None:
    # for a diagonal Hessian v^T H v is the trace for every Rademacher v
    model, data, diagonal = _least_squares()
    trace = sharpness.hessian_trace(model, nn.functional.mse_loss, data, samples=5)
    assert float(trace) == pytest.approx(float(diagonal.sum()), rel=1e-12)
    assert trace.stderr == pytest.approx(0.0, abs=1e-12)
    assert trace.samples == 5


def test_trace_is_unbiased_within_its_standard_error() -> None:
    model, data = _mlp(), _data()
    h = _hessian(model, data)
    trace = sharpness.hessian_trace(model, ce, data, samples=60)
    # Rademacher Hutchinson variance: 2 * sum of squared off-diagonal entries
    sd = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / 60)
    assert abs(float(trace) - float(h.trace())) < 4 * sd
    assert trace.stderr == pytest.approx(sd, rel=0.4)
    assert trace.value == float(trace)
    assert "stderr" in repr(trace)


# --------------------------------------------------------------------------- spectrum
def _least_squares() -> tuple[nn.Module, list[tuple[Tensor, Tensor]], Tensor]:
    """Least squares with orthogonal input columns: the Hessian 2/N X^T X is diagonal."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 5, dtype=F64, generator=g))
    x = q * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    y = torch.randn(30, 1, dtype=F64, generator=g)
    model = nn.Linear(5, 1, bias=False).to(F64)
    return model, [(x[:10], y[:10]), (x[10:], y[10:])], 2 / 30 * (x**2).sum(dim=0)


def test_spectrum_nodes_are_the_eigenvalues() -> None:
    model, data = _mlp(), _data()
    h = _hessian(model, data)
    n = h.shape[0]
    true = torch.linalg.eigvalsh(h)
    spec = sharpness.hessian_spectrum(model, ce, data, steps=n, points=500)
    # the Krylov space is exhausted in fewer steps than n: the softmax's shift invariance
    # gives H a multiple zero eigenvalue, which Lanczos sees once
    assert spec.nodes.shape == spec.weights.shape
    assert spec.nodes.shape[0] == 1
    assert spec.nodes.shape[1] < n
    # every node is an eigenvalue, every eigenvalue a node
    nodes = spec.nodes[0]
    assert torch.cdist(nodes[:, None], true[:, None]).min(dim=1).values.max() < 1e-8
    assert torch.cdist(true[:, None], nodes[:, None]).min(dim=1).values.max() < 1e-8
    torch.testing.assert_close(spec.weights.sum(dim=1), torch.ones(1, dtype=F64))
    dx = float(spec.grid[1] - spec.grid[0])
    assert float(spec.density.sum()) * dx == pytest.approx(1.0)
    assert spec.grid.shape == spec.density.shape == (500,)
    assert float(spec.grid[0]) < float(true[0])
    assert float(spec.grid[-1]) > float(true[-1])


def test_spectrum_weights_are_the_spectral_measure() -> None:
    # diagonal Hessian, Rademacher start v: (v . e_i)^2 / n = 1/n for each eigenvalue, so the
    # quadrature gives every eigenvalue the weight 1/n exactly, in every run
    model, data, diagonal = _least_squares()
    spec = sharpness.hessian_spectrum(model, nn.functional.mse_loss, data, steps=10, runs=3)
    assert spec.nodes.shape == (3, 5)
    for r in range(3):
        order = spec.nodes[r].argsort()
        torch.testing.assert_close(spec.nodes[r][order], diagonal.sort().values)
        torch.testing.assert_close(spec.weights[r], torch.full((5,), 0.2, dtype=F64))


def test_spectrum_density_is_the_kernel_sum() -> None:
    model, data = _mlp(), _data()
    spec = sharpness.hessian_spectrum(model, ce, data, steps=6, points=50, sigma_squared=0.01)
    width = float(spec.grid[-1] - spec.grid[0])
    var = 0.01 * max(1.0, width)
    kernel = torch.exp(-((spec.grid[:, None] - spec.nodes[0][None, :]) ** 2) / (2 * var))
    expected = kernel @ spec.weights[0]
    expected = expected / (expected.sum() * (spec.grid[1] - spec.grid[0]))
    torch.testing.assert_close(spec.density, expected)


# --------------------------------------------------------------------------- SAM sharpness
def _loss(model: nn.Module, data: Any) -> float:
    with torch.no_grad():
        return sum(float(ce(model(x), y)) * len(y) for x, y in data) / sum(len(y) for _, y in data)


def _sam_closed_form(
    model: nn.Module, data: Any, rho: float, adaptive: bool, eta: float = 0.0
) -> float:
    work = copy.deepcopy(model).eval()
    params = list(work.parameters())
    n = sum(len(y) for _, y in data)
    loss = sum(ce(work(x), y) * len(y) for x, y in data) / n
    grads = torch.autograd.grad(loss, params)
    t = [p.detach().abs() + eta if adaptive else torch.ones_like(p) for p in params]
    norm = torch.cat([(ti * g).reshape(-1) for ti, g in zip(t, grads, strict=True)]).norm()
    with torch.no_grad():
        for p, g, ti in zip(params, grads, t, strict=True):
            p.add_(rho * ti * ti * g / (norm + 1e-12))
    return _loss(work, data) - float(loss.detach())


@pytest.mark.parametrize(("adaptive", "rho", "eta"), [(False, 0.05, 0.0), (True, 0.5, 0.01)])
def test_sam_sharpness_one_step_is_the_closed_form(adaptive: bool, rho: float, eta: float) -> None:
    model, data = _mlp(), _data()
    value = sharpness.sam_sharpness(model, ce, data, rho=rho, adaptive=adaptive, eta=eta)
    assert value == pytest.approx(_sam_closed_form(model, data, rho, adaptive, eta), rel=1e-10)
    assert value > 0


def test_sam_sharpness_m_is_the_mean_over_chunks() -> None:
    model, data = _mlp(), _data()  # batches of 8 and 12: chunks of 8 | 5, 5, 2
    value = sharpness.sam_sharpness(model, ce, data, m=5)
    chunks = [(x[i : i + 5], y[i : i + 5]) for x, y in data for i in range(0, len(y), 5)]
    expected = sum(_sam_closed_form(model, [c], 0.05, False) * len(c[1]) for c in chunks) / 20
    assert value == pytest.approx(expected, rel=1e-10)


def test_more_ascent_steps_never_find_less() -> None:
    model, data = _mlp(), _data()
    values = [sharpness.sam_sharpness(model, ce, data, rho=0.5, steps=s) for s in (1, 2, 5)]
    assert values[0] <= values[1] <= values[2]
    assert values[2] > values[0]
    assert sharpness.sam_sharpness(model, ce, data, rho=0.0) == 0.0


# --------------------------------------------------------------------------- the model as it came
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def _trained_net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    net = _Net().to(F64)
    with torch.no_grad():  # move the running statistics away from their defaults
        for x, _ in _data():
            net(x)
    return net


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        and all(
            (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
            for x, y in zip(a["grads"], b["grads"], strict=True)
        )
        and a["modes"] == b["modes"]
        and torch.equal(a["rng"], b["rng"])
    )


CALLS: dict[str, Callable[..., object]] = {
    "eigenvalues": lambda m, d, bn: sharpness.hessian_eigenvalues(
        m, ce, d, k=2, max_iter=6, batch_norm=bn
    ),
    "power": lambda m, d, bn: sharpness.hessian_eigenvalues(
        m, ce, d, method="power", max_iter=5, batch_norm=bn
    ),
    "trace": lambda m, d, bn: sharpness.hessian_trace(m, ce, d, samples=3, batch_norm=bn),
    "spectrum": lambda m, d, bn: sharpness.hessian_spectrum(m, ce, d, steps=5, batch_norm=bn),
    "sam": lambda m, d, bn: sharpness.sam_sharpness(m, ce, d, steps=2, batch_norm=bn),
    "m-sam": lambda m, d, bn: sharpness.sam_sharpness(m, ce, d, m=4, adaptive=True, batch_norm=bn),
}


@pytest.mark.parametrize("batch_norm", ["eval", "train"])
@pytest.mark.parametrize("name", list(CALLS))
def test_model_comes_back_bit_identical(name: str, batch_norm: str) -> None:
    net, data = _trained_net(), _data()
    net.train()
    net.fc2.eval()  # mixed modes survive too
    ce(net(data[0][0]), data[0][1]).backward()  # the user's gradients
    net.fc1.bias.grad = None
    before = _snapshot(net)
    CALLS[name](net, data, batch_norm)
    assert _same(before, _snapshot(net))


def test_model_comes_back_when_the_loss_raises() -> None:
    net, data = _trained_net(), _data()
    before = _snapshot(net)
    calls = 0

    def failing(out: Tensor, y: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return ce(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        sharpness.sam_sharpness(net, failing, data)
    assert _same(before, _snapshot(net))


@pytest.mark.parametrize("batch_norm", ["eval", "train"])
def test_batch_norm_modes_measure_the_documented_loss(batch_norm: str) -> None:
    net, data = _trained_net(), _data()
    net.train()
    h = _hessian(net, data, train_bn=batch_norm == "train")
    top = sharpness.hessian_eigenvalues(net, ce, data, k=2, tol=1e-10, batch_norm=batch_norm)
    torch.testing.assert_close(
        torch.tensor(top, dtype=F64), torch.linalg.eigvalsh(h).flip(0)[:2], rtol=1e-7, atol=1e-9
    )


def test_batch_statistics_and_running_statistics_differ() -> None:
    net, data = _trained_net(), _data()
    a = sharpness.hessian_eigenvalues(net, ce, data, batch_norm="eval")
    b = sharpness.hessian_eigenvalues(net, ce, data, batch_norm="train")
    assert abs(a[0] - b[0]) > 1e-6 * abs(a[0])


def test_dropout_is_off() -> None:
    net, data = _trained_net(), _data()
    plain = copy.deepcopy(net)
    plain.drop = nn.Identity()  # type: ignore[assignment]
    net.train()
    for fn in (
        lambda m: sharpness.hessian_trace(m, ce, data, samples=2),
        lambda m: sharpness.sam_sharpness(m, ce, data),
    ):
        assert float(fn(net)) == float(fn(plain))


def test_generator_gives_reproducible_results_without_touching_the_global_rng() -> None:
    model, data = _mlp(), _data()
    a = sharpness.hessian_trace(
        model, ce, data, samples=3, generator=torch.Generator().manual_seed(5)
    )
    b = sharpness.hessian_trace(
        model, ce, data, samples=3, generator=torch.Generator().manual_seed(5)
    )
    c = sharpness.hessian_trace(
        model, ce, data, samples=3, generator=torch.Generator().manual_seed(6)
    )
    assert float(a) == float(b) != float(c)
    assert float(sharpness.hessian_trace(model, ce, data, samples=3)) == float(
        sharpness.hessian_trace(
            model, ce, data, samples=3, generator=torch.Generator().manual_seed(0)
        )
    )


def test_a_dataloader_works() -> None:
    model, data = _mlp(), _data(sizes=(20,))
    x, y = data[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    a = sharpness.hessian_eigenvalues(model, ce, loader, max_iter=6)
    b = sharpness.hessian_eigenvalues(model, ce, data, max_iter=6)
    assert a[0] == pytest.approx(b[0], rel=1e-9)


class _StandInCopies(TorchDispatchMode):
    """Record every copy between devices as ``(from, to, non_blocking)``; a copy out of the
    ``meta`` device (which holds no values) returns the CPU tensor that ``meta`` stands for."""

    def __init__(self, stand_ins: dict[int, Tensor]) -> None:
        super().__init__()
        self.stand_ins = stand_ins
        self.copies: list[tuple[str, str, bool]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "device" in kwargs:
            source, target = args[0], torch.device(kwargs["device"])
            if source.device != target:
                non_blocking = bool(kwargs.get("non_blocking", False))
                self.copies.append((source.device.type, target.type, non_blocking))
                if source.device.type == "meta":
                    return self.stand_ins[id(source)]
        return func(*args, **kwargs)


def test_copies_to_the_host_wait_and_copies_from_it_do_not() -> None:
    """Data on another device than the model's (``meta`` stands for a GPU) is copied to the
    model's device batch by batch. A copy to the device may go without waiting (the device
    reads it in stream order), but a copy to the host must wait: without it the model on the
    CPU could read the inputs before they arrived."""
    model, data = _mlp(), _data()
    on_meta = [(x.to("meta"), y.to("meta")) for x, y in data]
    stand_ins = {
        id(m): t
        for pair, meta in zip(data, on_meta, strict=True)
        for t, m in zip(pair, meta, strict=True)
    }
    with _StandInCopies(stand_ins) as mode:
        value = sharpness.hessian_eigenvalues(model, ce, on_meta, max_iter=6)
    assert mode.copies
    assert set(mode.copies) == {("meta", "cpu", False)}
    assert value[0] == sharpness.hessian_eigenvalues(model, ce, data, max_iter=6)[0]
    with _StandInCopies({}) as mode:
        moved = list(batches(data, torch.device("meta")))  # every instrument's reader
    assert [x.device.type for x, _, _ in moved] == ["meta", "meta"]
    assert mode.copies == [("cpu", "meta", True)] * 4  # to the device: no wait


# --------------------------------------------------------------------------- errors
def test_bad_input_is_rejected_with_a_message() -> None:
    model, data = _mlp(), _data()
    with pytest.raises(TypeError, match="iterator"):
        sharpness.hessian_trace(model, ce, iter(data))
    with pytest.raises(ValueError, match="batch_norm"):
        sharpness.hessian_eigenvalues(model, ce, data, batch_norm="batch")
    with pytest.raises(ValueError, match="k=100 exceeds"):
        sharpness.hessian_eigenvalues(model, ce, data, k=100)
    with pytest.raises(ValueError, match="neither a parameter name nor a submodule"):
        sharpness.hessian_eigenvalues(model, ce, data, params="fc9")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        sharpness.hessian_eigenvalues(model, ce, data, params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="reduction='mean'"):
        sharpness.sam_sharpness(model, nn.CrossEntropyLoss(reduction="none"), data)
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pairs"):
        sharpness.sam_sharpness(model, ce, [data[0][0]])
    with pytest.raises(ValueError, match="no non-empty batch"):
        sharpness.sam_sharpness(model, ce, [])
    with pytest.raises(ValueError, match="Invalid rho"):
        sharpness.sam_sharpness(model, ce, data, rho=-1.0)
    with pytest.raises(ValueError, match="samples must be at least 2"):
        sharpness.hessian_trace(model, ce, data, samples=1)
    with pytest.raises(ValueError, match="max_iter=2 is less than k=3"):
        sharpness.hessian_eigenvalues(model, ce, data, k=3, max_iter=2)
    with pytest.raises(ValueError, match="method"):
        sharpness.hessian_eigenvalues(model, ce, data, method="arnoldi")
    with pytest.raises(ValueError, match="tol"):
        sharpness.hessian_eigenvalues(model, ce, data, tol=0)
    with pytest.raises(TypeError, match="generator"):
        sharpness.hessian_trace(model, ce, data, generator=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- host synchronisations
def _syncs(fn: Callable[[], Any]) -> int:
    from torchsam.experiments._dispatch_count import DispatchCounter

    with DispatchCounter() as counter:
        fn()
    return counter.syncs


def test_trace_reads_its_draws_back_once_whatever_their_number() -> None:
    """``v^T H v`` stays on the device: the scalar reads do not grow with ``samples``."""
    model, data = _mlp(), _data()
    few = _syncs(lambda: sharpness.hessian_trace(model, ce, data, samples=3))
    many = _syncs(lambda: sharpness.hessian_trace(model, ce, data, samples=12))
    assert many == few


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_eigenvalue_steps_read_no_scalar_of_their_own(method: str) -> None:
    """Each step's values come back in one ``tolist()`` (one synchronisation on a GPU, no
    scalar read on the CPU): the reads do not grow with the number of products."""
    model, data = _mlp(width=6), _data()

    def run(max_iter: int) -> Any:
        return sharpness.hessian_eigenvalues(
            model, ce, data, method=method, tol=1e-12, max_iter=max_iter
        )

    short, long = _syncs(lambda: run(3)), _syncs(lambda: run(9))
    assert run(9).products - run(3).products == 6
    assert long == short


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_trace_synchronises_a_constant_number_of_times_and_lanczos_once_per_step() -> None:
    model, data = _mlp().cuda(), [(x.cuda(), y.cuda()) for x, y in _data()]
    few = _syncs(lambda: sharpness.hessian_trace(model, ce, data, samples=3))
    many = _syncs(lambda: sharpness.hessian_trace(model, ce, data, samples=12))
    assert many == few

    def run(max_iter: int) -> Any:
        return sharpness.hessian_eigenvalues(model, ce, data, tol=1e-12, max_iter=max_iter)

    assert _syncs(lambda: run(9)) - _syncs(lambda: run(3)) == 6


class _Mixed(nn.Module):
    """A layer whose weight and bias differ in dtype (float64 and ``bias_dtype``)."""

    def __init__(self, bias_dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = nn.Parameter(torch.randn(3, 3, generator=g, dtype=F64))
        self.bias = nn.Parameter(torch.randn(3, generator=g, dtype=F64).to(bias_dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight + self.bias.to(F64))


def test_trace_of_parameters_of_mixed_dtypes_draws_the_same_vectors() -> None:
    """Parameters of one dtype take vectors in that dtype; mixed ones the float64 path: the
    same Rademacher vectors, so the same estimate up to the float32 bias's rounding."""
    data = _data()

    def trace(model: nn.Module) -> float:
        gen = torch.Generator().manual_seed(5)
        return float(sharpness.hessian_trace(model, ce, data, samples=20, generator=gen))

    same, mixed = trace(_Mixed(F64)), trace(_Mixed(torch.float32))
    assert mixed == pytest.approx(same, rel=1e-5)
    assert trace(_Mixed(F64)) == same
