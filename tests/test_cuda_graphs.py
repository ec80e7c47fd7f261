"""A whole SAM step in a CUDA graph, and under ``torch.compile(mode="reduce-overhead")``.

The recipes of docs/gpu.md, run as written there: with ``skip_nonfinite=False`` a SAM step
(forward, backward, ``first_step``, forward, backward, ``second_step``) never waits for the
device, so it can be captured whole in a ``torch.cuda.CUDAGraph`` and replayed. Each test
replays ``STEPS`` steps and compares the weights, BatchNorm's statistics and the losses with an
eager run from the same start on the same batches. cuDNN is put in deterministic mode, so that
eager and replay run the same kernels; the tolerance covers what remains (a library may pick
another algorithm under capture) and is far below what one step changes (checked too).

Needs CUDA: every test is skipped without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsam
from torchsam.experiments.models import small_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

STEPS = 20
WARMUP = 3
BATCH = 32

OptimizerFactory = Callable[[nn.Module], torchsam.SAM]
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "SGD": lambda model: torchsam.SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.05,
        skip_nonfinite=False,
        lr=0.001,
        momentum=0.9,
        weight_decay=5e-4,
    ),
    "Adam capturable": lambda model: torchsam.SAM(
        model.parameters(),
        torch.optim.Adam,
        rho=0.05,
        skip_nonfinite=False,
        lr=1e-3,
        capturable=True,
    ),
}


# How far a replayed (or compiled) run may drift from eager in 20 steps. Small learning rates
# keep the training well-conditioned: a relative change of 1e-6 in the initial weights moves
# the final ones by about 1e-6 with SGD, by about 4e-4 with Adam (whose normalised steps
# amplify rounding); eager and replay should agree far better than that.
TOLERANCE = {"SGD": 1e-4, "Adam capturable": 1e-3}


@pytest.fixture(autouse=True)
def deterministic_cudnn() -> Iterator[None]:
    flags = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
    )
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32,
        ) = flags


def batches(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 3, 16, 16, generator=gen).cuda(),
            torch.randint(10, (BATCH,), generator=gen).cuda(),
        )
        for _ in range(n)
    ]


def new_model() -> nn.Module:
    """A small CNN with BatchNorm (its statistics are frozen in the second pass)."""
    torch.manual_seed(0)
    return small_cnn(image_shape=(3, 16, 16), channels=16).cuda()


# --------------------------------------------------------------------------- docs/gpu.md
def sam_step(model: nn.Module, optimizer: torchsam.SAM, x: Tensor, y: Tensor) -> Tensor:
    """One SAM step, two-call style; returns the loss at ``w`` (docs/gpu.md)."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    with torchsam.freeze_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    return loss.detach()


def captured_sam_step(
    model: nn.Module, optimizer: torchsam.SAM, static_x: Tensor, static_y: Tensor
) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Warm up on a side stream, then capture one whole SAM step (docs/gpu.md)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the state (momentum, Adam's moments) is made here
        for _ in range(WARMUP):
            sam_step(model, optimizer, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = sam_step(model, optimizer, static_x, static_y)
    return graph, static_loss


# --------------------------------------------------------------------------- the checks
def eager_run(
    make: OptimizerFactory, data: list[tuple[Tensor, Tensor]]
) -> tuple[nn.Module, Tensor]:
    """The warm-up steps on the first batch, then one step per batch, eagerly."""
    model = new_model()
    optimizer = make(model)
    for _ in range(WARMUP):
        sam_step(model, optimizer, *data[0])
    losses = [sam_step(model, optimizer, x, y) for x, y in data]
    return model, torch.stack(losses)


def assert_same_training(
    model: nn.Module, losses: Tensor, eager: nn.Module, eager_losses: Tensor, tolerance: float
) -> None:
    start = new_model().state_dict()
    state, expected = model.state_dict(), eager.state_dict()
    for name, value in expected.items():
        try:
            torch.testing.assert_close(state[name], value, rtol=tolerance, atol=tolerance)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
    torch.testing.assert_close(losses, eager_losses, rtol=tolerance, atol=tolerance)
    # the comparison can fail: training moved the weights much further than the tolerance
    moved = max(
        (expected[name] - start[name]).abs().max().item()
        for name in expected
        if expected[name].is_floating_point() and "running" not in name
    )
    assert moved > 10 * tolerance


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_captured_sam_step_replays_as_eager(name: str) -> None:
    data = batches(STEPS)
    eager, eager_losses = eager_run(OPTIMIZERS[name], data)

    model = new_model()
    optimizer = OPTIMIZERS[name](model)
    static_x, static_y = (t.clone() for t in data[0])
    graph, static_loss = captured_sam_step(model, optimizer, static_x, static_y)
    losses = []
    for x, y in data:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        losses.append(static_loss.clone())
    torch.cuda.synchronize()
    assert_same_training(model, torch.stack(losses), eager, eager_losses, TOLERANCE[name])


def test_the_capture_records_the_step_without_running_it() -> None:
    """Capturing runs no kernel: the weights after the capture are those after the warm-up,
    and one replay then equals one more eager step (the replay is the step, once)."""
    data = batches(1)
    model = new_model()
    optimizer = OPTIMIZERS["SGD"](model)
    static_x, static_y = (t.clone() for t in data[0])
    graph, _ = captured_sam_step(model, optimizer, static_x, static_y)
    torch.cuda.synchronize()

    eager = new_model()
    eager_optimizer = OPTIMIZERS["SGD"](eager)
    for _ in range(WARMUP):
        sam_step(eager, eager_optimizer, *data[0])
    after_warmup = copy.deepcopy(eager.state_dict())
    for key, value in after_warmup.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    graph.replay()
    sam_step(eager, eager_optimizer, *data[0])
    torch.cuda.synchronize()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        if value.is_floating_point() and "running" not in key:
            assert not torch.equal(value, after_warmup[key]), key


def test_the_step_never_synchronises() -> None:
    """What makes the capture possible: no host synchronisation in the whole step."""
    data = batches(2)
    model = new_model()
    optimizer = OPTIMIZERS["SGD"](model)
    sam_step(model, optimizer, *data[0])
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sam_step(model, optimizer, *data[1])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_a_model_compiled_with_reduce_overhead_trains_as_eager() -> None:
    """docs/gpu.md's second recipe: the model compiled with ``mode="reduce-overhead"`` (CUDA
    graphs of its forward and backward passes, the optimizer eager)."""
    torch._dynamo.reset()
    data = batches(STEPS)
    eager, eager_losses = eager_run(OPTIMIZERS["SGD"], data)

    model = new_model()
    optimizer = OPTIMIZERS["SGD"](model)
    compiled = cast(nn.Module, torch.compile(model, mode="reduce-overhead"))
    for _ in range(WARMUP):
        torch.compiler.cudagraph_mark_step_begin()
        sam_step(compiled, optimizer, *data[0])
    losses = []
    for x, y in data:
        torch.compiler.cudagraph_mark_step_begin()
        losses.append(sam_step(compiled, optimizer, x, y).clone())
    torch.cuda.synchronize()
    assert_same_training(model, torch.stack(losses), eager, eager_losses, TOLERANCE["SGD"])
    torch._dynamo.reset()
