"""SharpnessMonitor: exact eigenvalues while training, a training left unchanged, the outputs.

The answer key for the eigenvalue is the top eigenvalue of the whole Hessian of a tiny float64
model, built by ``torch.autograd.functional.hessian`` and diagonalised by ``eigvalsh``, at each
measurement of a training run. "Never changes training" is checked bit for bit: the same run
with and without the monitor gives equal weights, buffers, gradients (None included), global
RNG state and train/eval flags after every step. The Lightning and Hugging Face examples of
docs/monitor.md run here, as written.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import torchsam
from torchsam import sharpness
from torchsam.monitor import SharpnessMonitor, SharpnessRecord

DIM, HIDDEN, CLASSES = 3, 5, 2


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()


def tiny_batches(count: int = 2, size: int = 16, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, DIM, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (size,), generator=g),
        )
        for _ in range(count)
    ]


def exact_top(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> float:
    """The largest eigenvalue of the full Hessian of the sample-weighted mean loss."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    total = sum(int(y.shape[0]) for _, y in data)

    def loss(flat: Tensor) -> Tensor:
        pieces = [piece.view_as(p) for piece, p in zip(flat.split(sizes), params, strict=True)]
        weights = dict(zip(names, pieces, strict=True))
        return (
            sum(loss_fn(functional_call(model, weights, (x,)), y) * y.shape[0] for x, y in data)
            / total
        )

    flat = torch.cat([p.reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss, flat)
    return float(torch.linalg.eigvalsh(hessian)[-1])


# --------------------------------------------------------------------------- eigenvalues
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-8])
def test_warm_started_eigenvalue_is_the_exact_top_eigenvalue_at_each_measurement(
    tol: float,
) -> None:
    model = tiny_model()
    data = tiny_batches()
    monitor = SharpnessMonitor(model, loss_fn, data, every=2, tol=tol, max_iter=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    exact: list[float] = []
    cold: list[int] = []
    first: list[sharpness.Eigenvalues] = []
    for step in range(24):
        x, y = data[step % len(data)]
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if monitor.step() is not None:
            exact.append(exact_top(model, data))
            cold.append(
                sharpness.hessian_eigenvalues(model, loss_fn, data, tol=tol, max_iter=64).products
            )
            if not first:  # the first measurement starts from the gradient
                first.append(
                    sharpness.hessian_eigenvalues(
                        model, loss_fn, data, tol=tol, max_iter=64, start="gradient"
                    )
                )
    assert [r.step for r in monitor.records] == list(range(2, 25, 2))
    for record, value in zip(monitor.records, exact, strict=True):
        assert record.converged
        # a residual within tol * |theta| bounds the error by as much (Parlett, Thm. 11.5.1)
        assert abs(record.top_eigenvalue - value) <= tol * abs(value) * 1.01 + 1e-12
    warm = [r.products for r in monitor.records]
    # the first measurement starts from the gradient (and the monitor's generator, seeded
    # with 0 as the instrument's default one); the warm ones cost fewer products than cold ones
    assert monitor.records[0].top_eigenvalue == first[0][0]
    assert warm[0] == first[0].products
    assert sum(warm[1:]) < sum(cold[1:])


def test_start_vector_at_the_top_eigenvector_converges_at_once() -> None:
    model = tiny_model()
    data = tiny_batches()
    top = sharpness.hessian_eigenvalues(
        model, loss_fn, data, tol=1e-12, max_iter=64, return_eigenvectors=True
    )
    assert top.eigenvectors is not None
    for method in ("lanczos", "power"):
        warm = sharpness.hessian_eigenvalues(
            model, loss_fn, data, tol=1e-6, method=method, start=top.eigenvectors[0]
        )
        assert warm.converged
        assert warm.products <= 2
        assert warm[0] == pytest.approx(exact_top(model, data), rel=1e-6)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_gradient_start_finds_the_exact_top_eigenvalue(method: str) -> None:
    model = tiny_model()
    data = tiny_batches()
    kept, rebuilt = (
        sharpness.hessian_eigenvalues(
            model, loss_fn, data, tol=1e-8, max_iter=64, method=method, start="gradient",
            keep_graphs=keep,
        )
        for keep in (True, False)
    )  # fmt: skip
    exact = exact_top(model, data)
    for result in (kept, rebuilt):
        assert result.converged
        assert result[0] == pytest.approx(exact, rel=1e-6)
    # the gradient of the kept graphs and the one of the extra pass are the same start
    assert kept.products == rebuilt.products


def test_gradient_start_at_a_zero_gradient_is_the_random_start() -> None:
    # a squared output at zero weights: the gradient is exactly 0, the Hessian is not
    model = nn.Linear(DIM, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    data = tiny_batches()

    def squared(out: Tensor, y: Tensor) -> Tensor:
        return (out**2).mean()

    runs = [
        sharpness.hessian_eigenvalues(
            model, squared, data, tol=1e-10, generator=torch.Generator().manual_seed(3),
            start=start,
        )
        for start in ("gradient", None)
    ]  # fmt: skip
    assert runs[0].products == runs[1].products
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-12)
    with pytest.raises(ValueError, match='"gradient"'):
        sharpness.hessian_eigenvalues(model, squared, data, start="grad")


def test_start_vector_is_checked() -> None:
    model = tiny_model()
    data = tiny_batches()
    shapes = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match="shapes"):
        sharpness.hessian_eigenvalues(model, loss_fn, data, start=shapes[:-1])
    with pytest.raises(ValueError, match="finite and not zero"):
        sharpness.hessian_eigenvalues(model, loss_fn, data, start=[s * 0 for s in shapes])
    with pytest.raises(ValueError, match="finite and not zero"):
        sharpness.hessian_eigenvalues(model, loss_fn, data, start=[s * math.nan for s in shapes])
    with pytest.raises(TypeError, match="sequence of tensors"):
        sharpness.hessian_eigenvalues(model, loss_fn, data, start=torch.ones(3))  # type: ignore[arg-type]


def test_trace_and_sam_sharpness_are_the_instruments_values() -> None:
    model = tiny_model()
    data = tiny_batches()
    monitor = SharpnessMonitor(
        model,
        loss_fn,
        data,
        trace_samples=8,
        sam_rho=0.1,
        generator=torch.Generator().manual_seed(5),
    )
    record = monitor.measure()
    g = torch.Generator().manual_seed(5)
    top = sharpness.hessian_eigenvalues(
        model, loss_fn, data, tol=3e-2, max_iter=20, generator=g, start="gradient"
    )
    trace = sharpness.hessian_trace(model, loss_fn, data, samples=8, generator=g)
    assert record.top_eigenvalue == top[0]
    assert record.products == top.products
    assert record.trace == float(trace)
    assert record.trace_stderr == trace.stderr
    assert record.sam_sharpness == sharpness.sam_sharpness(model, loss_fn, data, rho=0.1)


def test_a_diverged_model_is_recorded_as_nan_and_the_next_measurement_starts_cold() -> None:
    model = tiny_model()
    data = tiny_batches()
    monitor = SharpnessMonitor(model, loss_fn, data, every=1, max_iter=64)
    first = monitor.step()
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    with pytest.warns(RuntimeWarning, match="not finite"):
        second = monitor.step()
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    third = monitor.step()
    assert first is not None
    assert second is not None
    assert third is not None
    assert math.isnan(second.top_eigenvalue)
    assert not second.converged
    assert third.top_eigenvalue == pytest.approx(exact_top(model, data), rel=1e-3)


# --------------------------------------------------------------------------- never changes training
class Net(nn.Module):
    """BatchNorm (running statistics), dropout (the global RNG) and a parameter left unused."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(DIM, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, CLASSES)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.drop(torch.tanh(self.norm(self.hidden(x)))))


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "modes": [m.training for m in model.modules()],
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def equal(x: Any, y: Any) -> bool:
        if isinstance(x, Tensor) and isinstance(y, Tensor):
            return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(equal(u, v) for u, v in zip(x, y, strict=True))
        return bool(x == y)

    return all(equal(a[key], b[key]) for key in a)


def sam_run(
    monitor_options: dict[str, Any] | None, set_to_none: bool, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Train ``Net`` with SAM for 8 steps; a monitor (when given options) after each step."""
    torch.manual_seed(0)
    model = Net().double().to(device)
    model.train()
    data = [(x.to(device), y.to(device)) for x, y in tiny_batches(count=4, size=12, seed=3)]
    optimizer = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.3, momentum=0.9)
    monitor = None
    if monitor_options is not None:
        monitor = SharpnessMonitor(model, loss_fn, data[:2], **monitor_options)
    torch.manual_seed(1)  # the same global RNG stream for the dropout of both runs
    states = []
    for step in range(8):
        x, y = data[step % len(data)]
        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=set_to_none)
        if monitor is not None:
            monitor.step()
        states.append(snapshot(model))
    if monitor is not None:
        assert len(monitor.records) == 8 // monitor.every
    return states


@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads-kept", "grads-none"])
@pytest.mark.parametrize(
    "options",
    [
        {"every": 2, "trace_samples": 4, "sam_rho": 0.05},
        {"every": 1, "trace_samples": 3, "sam_rho": 0.1, "batch_norm": "train"},
    ],
    ids=["eval-bn", "train-bn"],
)
def test_the_monitor_never_changes_training(options: dict[str, Any], set_to_none: bool) -> None:
    plain = sam_run(None, set_to_none)
    watched = sam_run(options, set_to_none)
    assert len(plain) == len(watched)
    for a, b in zip(plain, watched, strict=True):
        assert same(a, b)
    # the check can fail: the runs moved, and grads are kept or None as asked
    assert not torch.equal(plain[0]["params"][0], plain[-1]["params"][0])
    assert (plain[-1]["grads"][0] is None) == set_to_none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_monitor_never_changes_training_on_cuda() -> None:
    """On a GPU the dropout draws from CUDA's RNG, which the snapshots compare too."""
    options = {"every": 2, "trace_samples": 4, "sam_rho": 0.05}
    plain = sam_run(None, False, "cuda")
    watched = sam_run(options, False, "cuda")
    assert plain[-1]["cuda_rng"] is not None
    for a, b in zip(plain, watched, strict=True):
        assert same(a, b)


def test_the_clock_brackets_the_measurement_between_two_synchronisations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``seconds`` is timed from a synchronised device to a synchronised device: on a GPU the
    training's queued kernels are not counted and the measurement's all are. The CPU stands in
    for the GPU here: the order of the clock readings and the synchronisations is recorded."""
    import torchsam.monitor as monitor_module

    events: list[Any] = []
    monkeypatch.setattr(monitor_module, "_synchronize", lambda devices: events.append(devices))

    class _Clock:
        @staticmethod
        def perf_counter() -> float:
            events.append("clock")
            return float(len(events))

    monkeypatch.setattr(monitor_module, "time", _Clock)
    model = tiny_model()
    record = SharpnessMonitor(model, loss_fn, tiny_batches(), sam_rho=0.05).measure()
    assert events == [{torch.device("cpu")}, "clock", {torch.device("cpu")}, "clock"]
    assert record.seconds == 2.0  # the clock read after the second synchronisation


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_seconds_leave_out_the_kernels_queued_before_the_measurement() -> None:
    """A measurement taken while the GPU still has about a second of queued work records only
    its own time (without the synchronisation, ``seconds`` included the queued work)."""
    model = tiny_model().cuda()
    probe = [(x.cuda(), y.cuda()) for x, y in tiny_batches()]
    monitor = SharpnessMonitor(model, loss_fn, probe, max_iter=5)
    monitor.measure()  # warm-up: CUDA's libraries load
    own = monitor.measure().seconds
    cycles = 2 * 10**9  # about a second at a GPU's clock rate: timed below
    began = time.perf_counter()
    torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    queued = time.perf_counter() - began
    assert queued > 5 * own  # the test can tell them apart
    torch.cuda._sleep(cycles)
    record = monitor.measure()
    assert record.seconds < queued / 2


# --------------------------------------------------------------------------- schedule, outputs
def test_the_schedule_in_steps_and_epochs() -> None:
    model = tiny_model()
    data = tiny_batches()
    monitor = SharpnessMonitor(model, loss_fn, data, every=3)
    taken = [monitor.step() is not None for _ in range(10)]
    assert [i + 1 for i, t in enumerate(taken) if t] == [3, 6, 9]
    assert monitor.epoch_end() is None  # counted, not measured, in unit="step"
    # a global step reported again (a trainer's batches within one accumulation) measures once
    assert monitor.step(12) is not None
    assert monitor.step(12) is None
    assert monitor.step(13) is None
    assert [r.step for r in monitor.records] == [3, 6, 9, 12]
    assert all(r.epoch == (1 if r.step == 12 else 0) for r in monitor.records)

    by_epoch = SharpnessMonitor(model, loss_fn, data, every=2, unit="epoch")
    assert all(by_epoch.step() is None for _ in range(5))
    taken = [by_epoch.epoch_end() is not None for _ in range(4)]
    assert taken == [False, True, False, True]
    assert [(r.epoch, r.step) for r in by_epoch.records] == [(2, 5), (4, 5)]


class Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))


def test_records_go_to_csv_and_to_a_writer(tmp_path: Path) -> None:
    model = tiny_model()
    data = tiny_batches()
    writer = Writer()
    monitor = SharpnessMonitor(
        model, loss_fn, data, every=1, trace_samples=4, writer=writer, tag="probe"
    )
    monitor.step()
    monitor.step()
    path = monitor.to_csv(tmp_path / "sharpness.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "step",
        "epoch",
        "top_eigenvalue",
        "converged",
        "products",
        "trace",
        "trace_stderr",
        "sam_sharpness",
        "seconds",
    ]
    for row, record in zip(rows, monitor.records, strict=True):
        assert int(row["step"]) == record.step
        assert float(row["top_eigenvalue"]) == record.top_eigenvalue
        assert float(row["trace"]) == record.trace
        assert row["sam_sharpness"] == ""  # not asked for
    expected = [
        (f"probe/{name}", value, r.step)
        for r in monitor.records
        for name, value in (("top_eigenvalue", r.top_eigenvalue), ("trace", r.trace))
    ]
    assert writer.scalars == expected


def test_a_real_summary_writer(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    monitor = SharpnessMonitor(tiny_model(), loss_fn, tiny_batches(), every=1, writer=writer)
    monitor.step()
    writer.close()
    assert any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"every": 0}, ValueError, "every"),
        ({"unit": "batch"}, ValueError, "unit"),
        ({"tol": 0}, ValueError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"trace_samples": 1}, ValueError, "trace_samples"),
        ({"sam_rho": -1.0}, ValueError, "sam_rho"),
        ({"batch_norm": "frozen"}, ValueError, "batch_norm"),
        ({"writer": object()}, TypeError, "add_scalar"),
        ({"params": "nope"}, ValueError, "nope"),
        ({"generator": 0}, TypeError, "generator"),
        ({"tag": 1}, TypeError, "tag"),
    ],
)
def test_bad_arguments_say_what_to_do(options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SharpnessMonitor(tiny_model(), loss_fn, tiny_batches(), **options)


def test_bad_probe_and_counts() -> None:
    with pytest.raises(TypeError, match="iterator"):
        SharpnessMonitor(tiny_model(), loss_fn, iter(tiny_batches()))
    with pytest.raises(ValueError, match="no batch"):
        SharpnessMonitor(tiny_model(), loss_fn, [])
    monitor = SharpnessMonitor(tiny_model(), loss_fn, tiny_batches())
    with pytest.raises(ValueError, match="step"):
        monitor.step(-1)
    assert SharpnessRecord.__dataclass_params__.frozen  # type: ignore[attr-defined]


def test_state_dict_continues_the_measurements_exactly() -> None:
    import copy
    import io

    data = tiny_batches()

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
        x, y = data[i % len(data)]
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    monitor = SharpnessMonitor(model, loss_fn, data, every=2, trace_samples=3, max_iter=64)
    for i in range(6):
        step(model, optimizer, i)
        monitor.step()
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    for i in range(6, 12):
        step(model, optimizer, i)
        monitor.step()

    model2 = tiny_model()
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    model2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    resumed = SharpnessMonitor(model2, loss_fn, data, every=2, trace_samples=3, max_iter=64)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    for i in range(6, 12):
        step(model2, optimizer2, i)
        resumed.step()

    def key(r: SharpnessRecord) -> tuple[Any, ...]:
        return (r.step, r.epoch, r.top_eigenvalue, r.converged, r.products, r.trace)

    assert len(monitor.records) == 6
    assert [key(r) for r in resumed.records] == [key(r) for r in monitor.records]
    with pytest.raises(ValueError, match="not a SharpnessMonitor state_dict"):
        resumed.load_state_dict({"steps": 1})
    other = SharpnessMonitor(model2, loss_fn, data, params="0")
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict(monitor.state_dict())


# --------------------------------------------------------------------------- integrations
PAGE = Path(__file__).resolve().parent.parent / "docs" / "monitor.md"


def page_block(first_line: str) -> str:
    """The example of docs/monitor.md marked to run here whose code contains ``first_line``."""
    from tests.test_docs_examples import examples

    found = [
        code
        for code, kind, note in examples(PAGE)
        if kind == "runs-in" and note.startswith("tests/test_monitor.py") and first_line in code
    ]
    assert len(found) == 1, f"docs/monitor.md: no single block with {first_line!r}"
    return found[0]


def test_lightning_callback_measures_and_leaves_training_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Lightning example of docs/monitor.md, as written, against the same fit without
    the monitor."""
    pytest.importorskip("lightning")
    import lightning

    class Lit(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net().double()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return loss_fn(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torchsam.SAM(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.3)

    monkeypatch.chdir(tmp_path)  # the default Trainer writes its logs and checkpoints
    data = tiny_batches(count=6, size=8, seed=4)
    code = page_block("monitor.lightning_callback()")

    def fit(watched: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        namespace: dict[str, Any] = {
            "torchsam": torchsam,
            "lightning": lightning,
            "loss_fn": loss_fn,
            "module": Lit(),
            "probe": data[:2],
            "train_loader": torch.utils.data.DataLoader(data, batch_size=None),
        }
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*tensorboardX.*")
            warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
            torch.manual_seed(1)
            if watched:
                exec(code, namespace)
            else:
                lightning.Trainer(max_epochs=2).fit(namespace["module"], namespace["train_loader"])
        return namespace

    plain = fit(False)
    watched = fit(True)
    monitor = watched["monitor"]
    assert [(r.step, r.epoch) for r in monitor.records] == [(4, 0), (8, 1), (12, 1)]
    assert all(math.isfinite(r.top_eigenvalue) for r in monitor.records)
    assert (tmp_path / "sharpness.csv").is_file()
    assert monitor.lightning_callback().state_dict()["steps"] == 12  # kept in checkpoints
    a, b = plain["module"].state_dict(), watched["module"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key])


def test_huggingface_callback_measures_and_leaves_training_unchanged(tmp_path: Path) -> None:
    """The Hugging Face example of docs/monitor.md, as written, against the same training
    without the monitor."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import transformers

    class Classifier(nn.Module):
        """forward(input, labels) -> {"loss", "logits"}; the monitor calls forward(input)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, input: Tensor, labels: Tensor | None = None) -> Any:
            logits = self.net(input)
            if labels is None:
                return logits
            return {"loss": loss_fn(logits, labels), "logits": logits}

    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, DIM, generator=g)
    y = torch.randint(0, CLASSES, (16,), generator=g)
    code = page_block("monitor.trainer_callback()")

    def fit(watched: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        namespace: dict[str, Any] = {
            "torchsam": torchsam,
            "transformers": transformers,
            "loss_fn": loss_fn,
            "model": Classifier(),
            "probe": [(x[:8], y[:8])],
            "dataset": [{"input": x[i], "labels": y[i]} for i in range(16)],
            "args": transformers.TrainingArguments(
                output_dir=str(tmp_path),
                use_cpu=True,
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                disable_tqdm=True,
                per_device_train_batch_size=4,
                num_train_epochs=2,
                seed=0,
                dataloader_num_workers=0,
            ),
        }
        if watched:
            exec(code, namespace)
        else:
            transformers.Trainer(
                model=namespace["model"], args=namespace["args"], train_dataset=namespace["dataset"]
            ).train()
        return namespace

    plain = fit(False)
    watched = fit(True)
    monitor = watched["monitor"]
    assert [(r.step, r.epoch) for r in monitor.records] == [(3, 0), (6, 1)]
    assert monitor.epochs == 2
    a, b = plain["model"].state_dict(), watched["model"].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key])


# --------------------------------------------------------------------------- the benchmark
def test_benchmark_smoke_run() -> None:
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_monitor.py"
    args = ["--methods", "sgd,momentumsam", "--seeds", "2", "--epochs", "2", "--every", "10"]
    args += ["--probe", "32"]
    out = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert out.count("monitor: 3 measurements") == 4  # steps 10, 20, 30 of 2 x 19; 2 x 2 runs
    assert out.count("over 2 seed(s): the monitor took") == 2
    assert out.count("(target <= 5%: ") == 2
    assert out.count("same final weights and buffers, bit for bit: True") == 4


# --------------------------------------------------------------------------- torchsam compare
def test_train_with_a_monitor_trains_the_same() -> None:
    from torchsam.experiments import train
    from torchsam.experiments.compare import load_dataset, probe_data

    split = load_dataset("toy", noise=0.4, seed=0)
    probe = probe_data(split, 32)

    def make(model: nn.Module) -> SharpnessMonitor:
        return SharpnessMonitor(model, nn.CrossEntropyLoss(), probe, every=5)

    plain = train("sam", split, epochs=2, batch_size=64, seed=0)
    watched = train("sam", split, epochs=2, batch_size=64, seed=0, monitor=make)
    assert plain.model is not None
    assert watched.model is not None
    a, b = plain.model.state_dict(), watched.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    # the monitor's forward passes are not counted as training's
    assert watched.forward_passes == plain.forward_passes == 2 * plain.steps
    assert watched.forward_samples == plain.forward_samples
    assert [h.train_loss for h in watched.history] == [h.train_loss for h in plain.history]
    assert plain.sharpness == ()
    assert [r.step for r in watched.sharpness] == list(range(5, watched.steps + 1, 5))
    assert all(r.converged and math.isfinite(r.top_eigenvalue) for r in watched.sharpness)


def test_train_measures_momentum_sam_at_w_and_trains_the_same() -> None:
    """MomentumSAM's weights sit at a perturbed point between steps: the monitor of ``train``
    measures the model at ``w`` (the optimizer in evaluation mode), and training is unchanged."""
    from torchsam.experiments import train
    from torchsam.experiments.compare import load_dataset, probe_data

    split = load_dataset("toy", noise=0.4, seed=0)
    probe = probe_data(split, 32)
    at: list[list[Tensor]] = []

    class Recording(SharpnessMonitor):
        def measure(self) -> SharpnessRecord:
            at.append([p.detach().clone() for p in self.model.parameters()])
            return super().measure()

    def make(model: nn.Module) -> SharpnessMonitor:
        return Recording(model, nn.CrossEntropyLoss(), probe, every=5)

    kwargs: dict[str, Any] = {"epochs": 2, "batch_size": 64, "seed": 0}
    plain = train("momentumsam", split, **kwargs)
    watched = train("momentumsam", split, **kwargs, monitor=make)
    assert plain.model is not None
    assert watched.model is not None
    a, b = plain.model.state_dict(), watched.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert [h.train_loss for h in watched.history] == [h.train_loss for h in plain.history]
    # the first measurement saw w, not the perturbed point w~ = w - rho v/||v|| where the plain
    # run's weights are after the same step: they differ by rho (0.5, the default) in norm
    step = watched.sharpness[0].step
    perturbed: list[Tensor] = []

    def keep(epoch: int, steps: int, loss: Tensor) -> None:
        if steps == step:
            perturbed.extend(p.detach().clone() for p in model_params())

    model_params = None  # the model is built inside train; on_step reads it from the monitor

    def make_plain(model: nn.Module) -> SharpnessMonitor:
        nonlocal model_params
        model_params = model.parameters
        return SharpnessMonitor(model, nn.CrossEntropyLoss(), probe, every=10**9)

    train("momentumsam", split, **kwargs, monitor=make_plain, on_step=keep)
    assert perturbed
    distance = torch.linalg.vector_norm(
        torch.cat([(p - q).flatten() for p, q in zip(at[0], perturbed, strict=True)])
    )
    assert distance.item() == pytest.approx(0.5, rel=1e-4)


def test_compare_monitor_every_writes_records_and_the_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import json

    def compare(out: Path, *extra: str) -> dict[str, Any]:
        args = ["--dataset", "toy", "--epochs", "1", "--seeds", "1", "--optimizers", "sgd,sam"]
        args += ["--no-instruments", "--quiet", "--out", str(out), *extra]
        subprocess.run(
            [sys.executable, "-m", "torchsam", "compare", *args],
            check=True,
            capture_output=True,
            timeout=300,
        )
        return dict(json.loads((out / "results.json").read_text()))

    report = compare(tmp_path / "on", "--monitor-every", "4")
    assert report["config"]["monitor_every"] == 4
    assert "sharpness.png" in report["files"]
    assert (tmp_path / "on" / "sharpness.png").is_file()
    for run in report["runs"]:
        steps = [r["step"] for r in run["sharpness"]]
        assert steps == list(range(4, run["steps"] + 1, 4))
        assert all(r["top_eigenvalue"] > 0 for r in run["sharpness"])
        assert run["monitor_seconds"] == pytest.approx(sum(r["seconds"] for r in run["sharpness"]))
        assert run["forwards_per_step"] == (1.0 if run["label"] == "sgd" else 2.0)
    off = compare(tmp_path / "off", "--monitor-every", "0")
    assert off["config"]["monitor_every"] == 0
    assert "sharpness.png" not in off["files"]
    assert all("sharpness" not in run for run in off["runs"])
    refused = subprocess.run(
        [sys.executable, "-m", "torchsam", "compare", "--monitor-every", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "--monitor-every" in refused.stderr
