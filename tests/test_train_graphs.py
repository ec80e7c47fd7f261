"""``train(..., graphs=...)``: when a run's steps are captured in a CUDA graph, and why not.

The decision (:func:`~torchsam.experiments.graphs.plan_graphs`) and the learning rate held in
a device tensor are checked on the CPU; the captured training itself needs CUDA: those tests
compare a captured run with an eager one and are skipped without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from tests._cifar_runs import split_fixture, tiny_resnet
from torchsam.experiments import train
from torchsam.experiments.data import Split
from torchsam.experiments.graphs import WARMUP_STEPS, plan_graphs, tensor_lrs
from torchsam.experiments.train import get_method

CUDA = torch.device("cuda")  # a device object only: planning never touches the GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


split = split_fixture()


_model = tiny_resnet


def _plan(method: str, mode: str = "auto", **kwargs: Any) -> Any:
    spec = get_method(method)
    options: dict[str, Any] = {
        "device": CUDA,
        "method": spec.name,
        "graph_options": spec.graph_options,
        "options": dict(spec.defaults),
        "world": 1,
        "total_steps": 100,
    }
    return plan_graphs(mode, **{**options, **kwargs})


# --------------------------------------------------------------------------- the decision
def test_sgd_and_sam_without_the_guard_are_captured_with_a_fused_optimizer() -> None:
    for plan in (_plan("sgd"), _plan("sam", options={"rho": 0.05, "skip_nonfinite": False})):
        assert plan.capture
        assert plan.status == "captured"
        assert dict(plan.optimizer_options) == {"fused": True}
    assert _plan("sgd", "on").capture


@pytest.mark.parametrize(
    ("method", "changes", "reason"),
    [
        ("sgd", {"device": torch.device("cpu")}, "the device is cpu; CUDA graphs need a CUDA"),
        ("sam", {}, "method 'sam' needs skip_nonfinite=False to be captured"),
        ("looksam", {}, "method 'looksam' is not registered as capturable"),
        ("sgd", {"options": {"foreach": True}}, "fused=True; foreach= is set here"),
        ("sgd", {"world": 2}, "distributed training"),
        ("sgd", {"total_steps": WARMUP_STEPS}, f"{WARMUP_STEPS} steps to run, not more than"),
    ],
)
def test_auto_runs_eagerly_with_the_reason_and_on_raises_it(
    method: str, changes: dict[str, Any], reason: str
) -> None:
    plan = _plan(method, **changes)
    assert not plan.capture
    assert plan.status.startswith("eager: ")
    assert reason in plan.status
    assert dict(plan.optimizer_options) == {}
    with pytest.raises(ValueError, match="graphs='on' cannot capture this run in a CUDA graph: "):
        _plan(method, "on", **changes)
    assert _plan(method, "off", **changes).status == "eager: graphs='off'"


def test_off_never_captures_and_modes_are_checked() -> None:
    assert not _plan("sgd", "off").capture
    with pytest.raises(ValueError, match="Invalid graphs value: 'yes'; use one of: auto, on"):
        _plan("sgd", "yes")


def test_train_on_the_cpu_is_eager_and_says_why(split: Split) -> None:
    options: dict[str, Any] = {"epochs": 1, "batch_size": 16, "model_fn": _model}
    result = train("sgd", split, graphs="auto", **options)
    assert result.cuda_graphs == "eager: the device is cpu; CUDA graphs need a CUDA device"
    off = train("sgd", split, **options)  # the default: off; the same training
    assert off.cuda_graphs == "eager: graphs='off'"
    assert (off.train_loss, off.test_accuracy) == (result.train_loss, result.test_accuracy)
    with pytest.raises(ValueError, match=r"graphs='on' cannot capture .*the device is cpu"):
        train("sgd", split, graphs="on", **options)
    with pytest.raises(ValueError, match="Invalid graphs value"):
        train("sgd", split, graphs=True, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_a_fused_sgd_reads_its_learning_rate_from_the_tensor(method: str) -> None:
    """What the capture relies on: the fused kernel takes the tensor in ``lr`` (filled from
    the group's float by ``tensor_lrs``), also as SAM's base optimizer (whose param groups
    are SAM's), and the float is back afterwards. On the CPU, built as ``train`` builds the
    optimizer of a captured run."""
    spec = get_method(method)
    results = []
    for as_tensor in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        optimizer = spec.make_optimizer(
            model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True,
            **{**spec.defaults, **(spec.graph_options or {})},
        )  # fmt: skip
        lr = torch.zeros(())

        def closure(model: nn.Module = model, optimizer: Any = optimizer) -> Any:
            optimizer.zero_grad(set_to_none=True)
            loss = model(torch.linspace(-1, 1, 8).reshape(2, 4)).square().sum()
            loss.backward()
            return loss

        for step in range(3):
            scheduled = 0.1 / (step + 1)  # a schedule
            if as_tensor:
                # a float no kernel may read: the step must take the tensor's value (a
                # base optimizer with param groups of its own would take 99)
                optimizer.param_groups[0]["lr"] = 99.0
                with tensor_lrs(optimizer, [lr]):
                    assert optimizer.param_groups[0]["lr"] is lr
                    assert lr.item() == 99.0  # filled from the float
                    lr.fill_(scheduled)  # as CapturedStep fills it before a replay
                    optimizer.step(closure)
                assert optimizer.param_groups[0]["lr"] == 99.0  # the float is back
            else:
                optimizer.param_groups[0]["lr"] = scheduled
                optimizer.step(closure)
        assert isinstance(optimizer.param_groups[0]["lr"], float)
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1])
    with (
        pytest.raises(ValueError, match="2 learning-rate tensors for 1 param groups"),
        tensor_lrs(optimizer, [lr, lr]),
    ):
        pass


def test_a_resumed_run_keeps_its_own_kernel_choice(split: Split, tmp_path: Any) -> None:
    """A captured run needs ``fused=True`` in the param groups, an eager one may have written
    the checkpoint (and the other way round): resuming keeps the new optimizer's ``fused``
    and ``foreach`` instead of loading the checkpoint's."""
    built: list[torch.optim.Optimizer] = []

    def sgd(params: Any, lr: float, momentum: float, weight_decay: float) -> Any:
        built.append(torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay))
        return built[-1]

    path = tmp_path / "run.pt"
    options: dict[str, Any] = {"epochs": 2, "batch_size": 16, "model_fn": _model}

    class Stop(Exception):
        pass

    def stop(stats: Any) -> None:
        raise Stop

    with pytest.raises(Stop):
        train(sgd, split, checkpoint=path, on_epoch=stop, **options)
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"][0]["fused"] = True  # as a captured run writes it
    torch.save(state, path)
    train(sgd, split, checkpoint=path, resume=True, **options)
    assert built[-1].param_groups[0]["fused"] in (None, False)
    assert built[-1].param_groups[0]["momentum"] == 0.9  # the rest is the checkpoint's


# --------------------------------------------------------------------------- on a GPU
COMPARED: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 0.1,
    "model_fn": _model,
    "augment": "cutout",
    "curves": True,
}
"""The runs that the captured run is compared with: 14 steps at lr 0.1 move the weights by
about 0.23 at most (0.03 at lr 0.01, too little against bf16's tolerance)."""
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
MARGIN = 5
"""The eager run's weights move more than ``MARGIN`` times the tolerance from where they
started, so that the comparison can fail (a run that did not train would fail it)."""
METHODS = [("sgd", {}), ("sam", {"rho": 0.05, "skip_nonfinite": False})]


def _initial_state(split: Split) -> dict[str, torch.Tensor]:
    """The weights a run starts from, built as :func:`train` builds them (its default seed 0,
    then ``model_fn``), leaving the global generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _model(split).state_dict()


def _moved(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    """The largest change of a trained weight from ``start`` (running statistics aside)."""
    return max(
        (value.cpu() - start[name]).abs().max().item()
        for name, value in model.state_dict().items()
        if value.is_floating_point() and "running" not in name
    )


@pytest.mark.parametrize(("method", "options"), METHODS)
def test_the_eager_run_moves_far_enough_for_the_comparison_to_fail(
    split: Split, method: str, options: dict[str, Any]
) -> None:
    """On the CPU, the guard of the captured-against-eager test below: the start it measures
    from is the run's own (a run at lr 0 ends there exactly), and the eager run moves more
    than ``MARGIN`` times bf16's tolerance from it (about 0.23, against 0.1)."""
    start = _initial_state(split)
    common = {**COMPARED, **options, "device": "cpu", "graphs": "off", "precision": "bf16"}
    still = train(method, split, **{**common, "lr": 0.0})
    assert still.model is not None
    assert _moved(still.model, start) == 0.0
    eager = train(method, split, **common)
    assert eager.model is not None
    assert _moved(eager.model, start) > MARGIN * TOLERANCE["bf16"]


@pytest.fixture
def deterministic_cudnn() -> Iterator[None]:
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@needs_cuda
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize(("method", "options"), METHODS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_on_cuda_a_captured_run_trains_as_the_eager_run(
    split: Split, method: str, options: dict[str, Any], precision: str
) -> None:
    common: dict[str, Any] = {**COMPARED, "device": "cuda", "precision": precision, **options}
    eager = train(method, split, graphs="off", **common)
    captured = train(method, split, graphs="on", **common)
    assert captured.cuda_graphs == "captured"
    assert (captured.steps, captured.forward_passes, captured.forward_samples) == (
        eager.steps,
        eager.forward_passes,
        eager.forward_samples,
    )
    assert eager.model is not None
    assert captured.model is not None
    tolerance = TOLERANCE[precision]
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(
            captured.model.state_dict()[name], value, rtol=tolerance, atol=tolerance
        )
    assert _moved(eager.model, _initial_state(split)) > MARGIN * tolerance  # it can fail
    for a, b in zip(captured.history, eager.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=tolerance, abs=tolerance)


@needs_cuda
def test_on_cuda_a_captured_run_resumes(split: Split, tmp_path: Any) -> None:
    """A captured run resumed from its first epoch (warm-up and capture again) ends where the
    straight captured run ends. (That the cosine schedule reaches the replays is checked by
    the comparison with the eager run: a rate frozen at the capture would end elsewhere.)"""
    common: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 8,
        "model_fn": _model,
        "device": "cuda",
        "precision": "fp32",
        "graphs": "on",
    }
    straight = train("sgd", split, **common)
    path = tmp_path / "run.pt"

    class Stop(Exception):
        pass

    def stop(stats: Any) -> None:
        raise Stop

    with pytest.raises(Stop):
        train("sgd", split, checkpoint=path, on_epoch=stop, **common)
    resumed = train("sgd", split, checkpoint=path, resume=True, **common)
    assert resumed.cuda_graphs == "captured"
    # an eager run's checkpoint (foreach SGD) resumed captured (fused SGD)
    eager_path = tmp_path / "eager.pt"
    with pytest.raises(Stop):
        train("sgd", split, checkpoint=eager_path, on_epoch=stop, **{**common, "graphs": "off"})
    mixed = train("sgd", split, checkpoint=eager_path, resume=True, **common)
    assert mixed.cuda_graphs == "captured"
    assert straight.model is not None
    for result in (resumed, mixed):
        assert result.model is not None
        for name, value in straight.model.state_dict().items():
            torch.testing.assert_close(result.model.state_dict()[name], value, rtol=1e-4, atol=1e-4)
