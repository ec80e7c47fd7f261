"""Whole training steps captured in a CUDA graph, for ``train(..., graphs=...)``.

On a GPU the training loop of :func:`~torchsam.experiments.train.train` is bound by the host:
Python launches the step's kernels one by one. A CUDA graph records the kernels of one whole
step (forward, backward and the optimizer's step; SAM's two passes) once and replays them with
one launch. This module decides whether a run can be captured (:func:`plan_graphs`) and runs
the captured step (:class:`CapturedStep`), following the recipe of docs/gpu.md that
``tests/test_cuda_graphs.py`` checks:

* the step must never synchronise with the host: plain SGD, and SAM with
  ``skip_nonfinite=False`` (its default guard reads one value per step); a method is
  capturable when it is registered with ``graph_options`` (the option values the capture
  needs, ``{}`` for SGD, ``{"skip_nonfinite": False}`` for SAM);
* every batch is copied into static input buffers (the batches themselves are built and
  augmented on the device, eagerly, before the copy);
* the base optimizer is ``torch.optim.SGD(fused=True)``, whose fused kernel reads the learning
  rate from a device tensor: the graph is captured with a tensor in each param group's ``lr``,
  which is filled from the group's float before every replay, so the cosine schedule (a Python
  float in the param groups, as in an eager run) reaches the replayed kernels without a
  synchronisation;
* the first :data:`WARMUP_STEPS` steps run eagerly on a side stream (the optimizer's state is
  made there), then the next step is captured and every step after it is a replay;
* under bf16 autocast the weight-cast cache is off (a cached cast would outlive the capture).

``graphs="auto"`` captures when all of this holds and otherwise runs eagerly, with the reason
in :attr:`~torchsam.experiments.train.Result.cuda_graphs`; ``"on"`` raises the reason as a
ValueError; ``"off"`` (``train``'s default for now) never captures. On the CPU every run is
eager.

The capture path has not yet been run on a GPU: its tests
(``tests/test_train_graphs.py``) are skipped without CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer

if TYPE_CHECKING:
    from torchsam.experiments.train import Batch

__all__ = ["GRAPH_MODES", "WARMUP_STEPS", "CapturedStep", "GraphPlan", "plan_graphs", "tensor_lrs"]

GRAPH_MODES = ("auto", "on", "off")
"""Names accepted by ``graphs=``."""

WARMUP_STEPS = 3
"""Eager steps on a side stream before the capture (PyTorch's recipe uses 3)."""

_MISSING = object()


@dataclass(frozen=True)
class GraphPlan:
    """Whether a run's steps are captured, and why not when they are not.

    Attributes:
        capture (bool): capture the step in a CUDA graph
        reason (str): why the run is eager ("" when it is captured)
        optimizer_options (Mapping): options added to the optimizer's (``fused=True``)
    """

    capture: bool
    reason: str = ""
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``"captured"`` or ``"eager: <reason>"``, as :class:`Result` records it."""
        return "captured" if self.capture else f"eager: {self.reason}"


def plan_graphs(
    mode: object,
    *,
    device: torch.device,
    method: str,
    graph_options: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    world: int,
    total_steps: int,
) -> GraphPlan:
    """Decide whether a run's steps are captured in a CUDA graph.

    Args:
        mode (str): ``"auto"``, ``"on"`` or ``"off"``
        device (torch.device): the training device
        method (str): the method's name (for the messages)
        graph_options (Mapping | None): the option values the method's step needs to be
            captured (``Method.graph_options``); None: the method cannot be captured
        options (Mapping): the method's options of this run (defaults and overrides)
        world (int): processes training together
        total_steps (int): optimisation steps left to run

    Returns:
        GraphPlan: ``capture`` with ``fused=True`` for the optimizer, or eager with a reason.

    Raises:
        ValueError: for an unknown ``mode``, or ``mode="on"`` when the run cannot be
            captured (the message says why).
    """
    if not isinstance(mode, str) or mode not in GRAPH_MODES:
        raise ValueError(f"Invalid graphs value: {mode!r}; use one of: {', '.join(GRAPH_MODES)}")
    if mode == "off":
        return GraphPlan(False, "graphs='off'")
    reason = _why_eager(device, method, graph_options, options, world, total_steps)
    if reason is None:
        return GraphPlan(True, "", {"fused": True})
    if mode == "on":
        raise ValueError(f"graphs='on' cannot capture this run in a CUDA graph: {reason}")
    return GraphPlan(False, reason)


def _why_eager(
    device: torch.device,
    method: str,
    graph_options: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    world: int,
    total_steps: int,
) -> str | None:
    if device.type != "cuda":
        return f"the device is {device.type}; CUDA graphs need a CUDA device"
    if graph_options is None:
        return (
            f"method {method!r} is not registered as capturable (its step may synchronise "
            "or change from step to step); sgd and sam are"
        )
    for key, value in graph_options.items():
        if options.get(key, _MISSING) != value:
            return (
                f"method {method!r} needs {key}={value!r} to be captured (its default "
                "synchronises every step)"
            )
    for key in ("fused", "foreach"):
        if key in options:
            return f"the capture builds the optimizer with fused=True; {key}= is set here"
    if world > 1:
        return "distributed training (DistributedDataParallel) is not captured"
    if total_steps <= WARMUP_STEPS:
        return f"{total_steps} steps to run, not more than the {WARMUP_STEPS} eager warm-up steps"
    return None


@contextmanager
def tensor_lrs(optimizer: Optimizer, lrs: list[Tensor]) -> Iterator[None]:
    """Put ``lrs`` (one device tensor per param group) in the param groups' ``lr`` inside
    the block, filled from the groups' floats, and the floats back after it."""
    groups = optimizer.param_groups
    if len(lrs) != len(groups):
        raise ValueError(f"{len(lrs)} learning-rate tensors for {len(groups)} param groups")
    saved = [group["lr"] for group in groups]
    try:
        for group, lr, value in zip(groups, lrs, saved, strict=True):
            lr.fill_(value)
            group["lr"] = lr
        yield
    finally:
        for group, value in zip(groups, saved, strict=True):
            group["lr"] = value


class CapturedStep:
    """A step function (``step(batch) -> loss``) that runs ``step_fn`` from a CUDA graph.

    The first :data:`WARMUP_STEPS` calls run ``step_fn`` eagerly on a side stream; the next
    one captures it on static copies of the batch, with the learning rates as device tensors
    (:func:`tensor_lrs`), and replays it; every later call copies its batch into the static
    buffers, fills the learning-rate tensors from the param groups and replays. The forward
    counter's calls and samples of the captured step are added at every replay (the hooks do
    not run in a replay).

    Args:
        step_fn (Callable): the method's step on a batch; must not synchronise
        optimizer (Optimizer): the run's optimizer, built with ``fused=True``
        counter: an object with ``calls`` and ``samples`` counts, updated by forward hooks
        device (torch.device): the CUDA device
    """

    def __init__(
        self,
        step_fn: Callable[[Batch], Tensor],
        optimizer: Optimizer,
        counter: Any,
        device: torch.device,
    ) -> None:
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.counter = counter
        self.device = device
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Tensor] = {}
        self.lrs: list[Tensor] = []
        self.per_replay = (0, 0)

    def __call__(self, batch: Batch) -> Tensor:
        if not self.static:
            self.static = {"x": batch.x.clone(), "y": batch.y.clone()}
        else:
            self.static["x"].copy_(batch.x)
            self.static["y"].copy_(batch.y)
        static = replace(batch, x=self.static["x"], y=self.static["y"])
        if self.graph is None and self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            return self._eager(static)
        if self.graph is None:
            self.graph = self._capture(static)
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            lr.fill_(group["lr"])
        self.graph.replay()
        self.counter.calls += self.per_replay[0]
        self.counter.samples += self.per_replay[1]
        return self.static["loss"].clone()

    def _eager(self, batch: Batch) -> Tensor:
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            loss = self.step_fn(batch)
        main.wait_stream(side)
        return loss

    def _capture(self, batch: Batch) -> torch.cuda.CUDAGraph:
        self.lrs = [
            torch.zeros((), dtype=torch.float32, device=self.device)
            for _ in self.optimizer.param_groups
        ]
        calls, samples = self.counter.calls, self.counter.samples
        graph = torch.cuda.CUDAGraph()
        with tensor_lrs(self.optimizer, self.lrs), torch.cuda.graph(graph):
            self.static["loss"] = self.step_fn(batch)
        # the capture ran nothing: the replay that follows is this step
        self.per_replay = (self.counter.calls - calls, self.counter.samples - samples)
        self.counter.calls, self.counter.samples = calls, samples
        return graph
