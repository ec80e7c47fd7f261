"""A small, deterministic training loop for comparing SAM variants, with a registry of methods.

A *method* is what differs between the contenders of an experiment: how the optimizer is built
and how one training step runs. It is a :class:`Method`, registered by name in :data:`METHODS`:

* ``make_optimizer(params, lr, momentum, weight_decay, **kwargs) -> Optimizer`` builds the
  optimizer; :func:`sharpness_aware` turns any torchsam class with SAM's constructor shape
  ``Cls(params, torch.optim.SGD, rho=..., **kw, lr=..., momentum=..., weight_decay=...)``
  into such a factory.
* ``make_step(context, **options) -> step`` is called once per run and returns
  ``step(batch) -> loss``, which takes one optimisation step on a :class:`Batch`. The default,
  :func:`closure_step`, calls ``optimizer.step(closure)``: it serves plain ``torch.optim``
  optimizers and every two-pass variant whose ``step`` takes the usual closure (SAM, and
  GSAM, WSAM, FriendlySAM, LookSAM... as they are added). A method that needs more (a closure
  over sample indices, an extra loss term, per-run state) supplies its own builder; see
  "Extension points" below.

Registering a variant is one call::

    register_method("gsam", sharpness_aware(torchsam.GSAM), defaults={"rho": 0.05, "alpha": 0.1})

and ``train("gsam", split, epochs=20)`` (and ``benchmarks/bench_variants.py``) then run it.

Extension points (methods whose step is not the standard closure):

* **ESAM** (its closure takes sample indices and returns per-sample losses): register it with
  a ``make_step`` that builds such a closure from ``context.per_sample_loss_fn`` and
  ``batch.x``/``batch.y``, and calls the optimizer's own ``step``; draw any randomness from
  ``context.generator``.
* **SAF / MESA** (an extra loss term, e.g. a distillation term against past outputs of the
  same samples, or against an EMA model): a ``make_step`` builder can keep per-run state in
  its closure (``context.split`` gives the training-set size and the number of classes,
  ``batch.index`` the samples' positions, ``batch.epoch``/``batch.step`` the time), add the
  term inside the closure, and update its state after the optimizer step. Hyper-parameters of
  the loss term go to the builder when their names are listed in ``Method.step_options``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsam import SAM, MomentumSAM, freeze_running_stats
from torchsam.experiments.augment import check_augment
from torchsam.experiments.batches import BatchSource, batch_source
from torchsam.experiments.checkpoint import (
    finished_state,
    load_checkpoint,
    restore_state,
    run_state,
    save_checkpoint,
)
from torchsam.experiments.data import Split
from torchsam.experiments.graphs import WARMUP_STEPS, CapturedStep, GraphPlan, plan_graphs
from torchsam.experiments.models import mlp
from torchsam.monitor import SharpnessMonitor, SharpnessRecord

__all__ = [
    "METHODS",
    "PRECISIONS",
    "Batch",
    "EpochStats",
    "Method",
    "OptimizerFactory",
    "Result",
    "StepBuilder",
    "StepFn",
    "TrainContext",
    "accuracy",
    "closure_step",
    "get_method",
    "register_method",
    "sharpness_aware",
    "train",
]

OptimizerFactory = Callable[..., Optimizer]
"""``(params, lr, momentum, weight_decay, **kwargs) -> Optimizer``."""


@dataclass(frozen=True)
class Batch:
    """One mini-batch, as a step function receives it.

    Attributes:
        x (Tensor): inputs
        y (Tensor): (noisy) training labels
        index (Tensor): positions of the samples in the training set (``split.x_train``)
        epoch (int): current epoch, from 0
        step (int): number of steps taken before this one, from 0
    """

    x: Tensor
    y: Tensor
    index: Tensor
    epoch: int
    step: int


@dataclass(frozen=True)
class TrainContext:
    """What a step builder may use; built once per run by :func:`train`.

    Attributes:
        model (nn.Module): the model, in training mode
        optimizer (Optimizer): the optimizer the method's factory built
        loss_fn (Callable): mean cross-entropy, ``loss_fn(logits, y) -> scalar``
        per_sample_loss_fn (Callable): cross-entropy per sample, ``-> (batch,)``
        split (Split): the data
        epochs (int): number of epochs of the run
        steps_per_epoch (int): optimisation steps per epoch
        generator (torch.Generator): seeded from the run's seed, for a method's own
            randomness (never the global generator)
        world_size (int): processes training together (``train(..., distributed=True)``);
            each step's batch is then this process's share of the global batch, and a step
            builder that keeps per-sample state must refuse more than one (default: 1)
    """

    model: nn.Module
    optimizer: Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    per_sample_loss_fn: Callable[[Tensor, Tensor], Tensor]
    split: Split
    epochs: int
    steps_per_epoch: int
    generator: torch.Generator
    world_size: int = 1

    @property
    def total_steps(self) -> int:
        """Optimisation steps of the whole run."""
        return self.epochs * self.steps_per_epoch


StepFn = Callable[[Batch], Tensor]
"""Takes one optimisation step on a batch and returns the loss at the current weights."""
StepBuilder = Callable[..., StepFn]
"""``(context: TrainContext, **options) -> StepFn``, called once per run."""


def closure_step(context: TrainContext) -> StepFn:
    """The standard step: ``optimizer.step(closure)`` with the usual ``torch.optim`` closure.

    The closure clears the gradients, computes the mean loss, calls ``backward()`` and returns
    the loss. A plain optimizer evaluates it once; a two-pass torchsam optimizer evaluates it at
    ``w`` and at ``w + e``. While the optimizer is perturbed (``optimizer.perturbed``; absent
    means never) BatchNorm's running statistics are frozen with :func:`freeze_running_stats`,
    so each batch updates them once, at ``w``.

    Args:
        context (TrainContext): the run's model, optimizer and loss

    Returns:
        the step function.
    """
    model, optimizer, loss_fn = context.model, context.optimizer, context.loss_fn

    def step(batch: Batch) -> Tensor:
        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            perturbed = bool(getattr(optimizer, "perturbed", False))
            with freeze_running_stats(model, enabled=perturbed):
                loss = loss_fn(model(batch.x), batch.y)
            loss.backward()
            return loss

        # torch.optim types the closure as returning a float; a loss tensor is what it gets
        loss = optimizer.step(cast(Callable[[], float], closure))
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"{type(optimizer).__name__}.step(closure) returned {type(loss)!r}, not the "
                "closure's loss; register the method with a make_step of its own"
            )
        return loss.detach()

    return step


@dataclass(frozen=True)
class Method:
    """A contender of the experiments: how to build its optimizer and how to take a step.

    Attributes:
        name (str): the registry name
        make_optimizer (OptimizerFactory): ``(params, lr, momentum, weight_decay, **kwargs)
            -> Optimizer``
        make_step (StepBuilder, optional): ``(context, **options) -> step``, called once per
            run (default: :func:`closure_step`)
        defaults (Mapping, optional): default keyword arguments of the method (e.g.
            ``{"rho": 0.05}``); those passed to :func:`train` override them
        step_options (frozenset[str], optional): names of keyword arguments that go to
            ``make_step`` instead of ``make_optimizer`` (default: none)
        description (str, optional): one line for reports
        resumable (bool, optional): whether a run can resume from a checkpoint, i.e. the step
            function keeps no state of its own between steps (default: True, which
            :func:`register_method` sets only for :func:`closure_step`)
        graph_options (Mapping | None, optional): the option values with which a step can be
            captured whole in a CUDA graph (``train(..., graphs=...)``, see
            :mod:`~torchsam.experiments.graphs`): the step never synchronises with the host,
            runs the same kernels every time, reads only ``batch.x`` and ``batch.y`` (the
            rest of the batch is frozen at the capture), and the optimizer takes
            ``fused=True``; None: never captured (default: None)
    """

    name: str
    make_optimizer: OptimizerFactory
    make_step: StepBuilder = closure_step
    defaults: Mapping[str, Any] = field(default_factory=dict)
    step_options: frozenset[str] = frozenset()
    description: str = ""
    resumable: bool = True
    graph_options: Mapping[str, Any] | None = None

    def split_kwargs(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``defaults`` updated with ``kwargs``, as (optimizer kwargs, step kwargs)."""
        merged = {**self.defaults, **kwargs}
        opt = {k: v for k, v in merged.items() if k not in self.step_options}
        step = {k: v for k, v in merged.items() if k in self.step_options}
        return opt, step


METHODS: dict[str, Method] = {}
"""The registered methods by name, in registration order (the benchmark's row order)."""


def register_method(
    name: str,
    make_optimizer: OptimizerFactory,
    *,
    make_step: StepBuilder = closure_step,
    defaults: Mapping[str, Any] | None = None,
    step_options: Iterable[str] = (),
    description: str = "",
    replace: bool = False,
    resumable: bool | None = None,
    graph_options: Mapping[str, Any] | None = None,
) -> Method:
    """Add a method to :data:`METHODS` and return it.

    Args:
        name (str): the name that :func:`train` and the benchmark accept
        make_optimizer (OptimizerFactory): ``(params, lr, momentum, weight_decay, **kwargs)
            -> Optimizer``; :func:`sharpness_aware` builds one for a torchsam class
        make_step (StepBuilder, optional): ``(context, **options) -> step`` (default:
            :func:`closure_step`, which fits any optimizer with ``step(closure)``)
        defaults (Mapping, optional): default keyword arguments (default: none)
        step_options (Iterable[str], optional): keyword arguments routed to ``make_step``
            (default: none)
        description (str, optional): one line for reports (default: "")
        replace (bool, optional): allow replacing a registered method (default: False)
        resumable (bool, optional): whether runs of the method can resume from a checkpoint:
            true when the step function keeps no state between steps beyond the optimizer,
            the model and ``context.generator`` (default: True for :func:`closure_step`,
            else False)
        graph_options (Mapping, optional): the option values with which the step can be
            captured in a CUDA graph (see :attr:`Method.graph_options`) (default: None, never)

    Raises:
        ValueError: if ``name`` is empty, contains a comma or whitespace, or is taken and
            ``replace`` is False.

    Example:
        >>> register_method("gsam", sharpness_aware(GSAM), defaults={"rho": 0.05, "alpha": 0.1})
    """
    if not isinstance(name, str) or not name or "," in name or name != "".join(name.split()):
        raise ValueError(f"Invalid method name: {name!r}; use a non-empty word without commas")
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to replace it")
    method = Method(
        name=name,
        make_optimizer=make_optimizer,
        make_step=make_step,
        defaults=dict(defaults or {}),
        step_options=frozenset(step_options),
        description=description,
        resumable=make_step is closure_step if resumable is None else resumable,
        graph_options=None if graph_options is None else dict(graph_options),
    )
    METHODS[name] = method
    return method


def get_method(method: str | Method | OptimizerFactory) -> Method:
    """The :class:`Method` for a registered name, a ``Method``, or a bare optimizer factory.

    A bare factory (``(params, lr, momentum, weight_decay, **kwargs) -> Optimizer``) runs with
    :func:`closure_step`.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones).
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        found = METHODS.get(method)
        if found is None:
            raise ValueError(f"Unknown method {method!r}; registered: {', '.join(METHODS)}")
        return found
    if callable(method):
        return Method(name=getattr(method, "__name__", "custom"), make_optimizer=method)
    raise TypeError(f"method must be a name, a Method or an optimizer factory, got {method!r}")


def sharpness_aware(cls: Callable[..., Optimizer]) -> OptimizerFactory:
    """An optimizer factory for a torchsam class with SAM's constructor shape, around SGD.

    The factory builds ``cls(params, torch.optim.SGD, **kwargs, lr=lr, momentum=momentum,
    weight_decay=weight_decay)``, so ``rho`` and the variant's own options pass through
    ``kwargs``.
    """

    def make(
        params: Iterable[Tensor], lr: float, momentum: float, weight_decay: float, **kwargs: Any
    ) -> Optimizer:
        return cls(
            params, torch.optim.SGD, **kwargs, lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    make.__name__ = make.__qualname__ = cls.__name__.lower()
    make.__doc__ = f"Build {cls.__name__}(params, torch.optim.SGD, ...)."
    return make


def _sgd(
    params: Iterable[Tensor], lr: float, momentum: float, weight_decay: float, **kwargs: Any
) -> Optimizer:
    """Plain ``torch.optim.SGD``."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


register_method("sgd", _sgd, description="torch.optim.SGD (the baseline)", graph_options={})
register_method(
    "sam",
    sharpness_aware(SAM),
    defaults={"rho": 0.05},
    description="torchsam.SAM around SGD (Foret et al. 2021)",
    graph_options={"skip_nonfinite": False},
)


@dataclass(frozen=True)
class EpochStats:
    """What :func:`train` records at the end of each epoch.

    Attributes:
        epoch (int): the epoch, from 0
        train_loss (float): mean loss of the epoch's batches on the (noisy) training labels, as
            the steps returned it (at the weights before each step)
        wall_time (float): training seconds from the start of the run to the end of this epoch
            (evaluations excluded)
        test_accuracy (float | None): accuracy on the test set after this epoch, when
            ``curves=True``; else None
    """

    epoch: int
    train_loss: float
    wall_time: float
    test_accuracy: float | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of one training run.

    Attributes:
        method (str): the method's name
        seed (int): the run's seed
        test_accuracy (float): final accuracy on the (clean) test set
        train_accuracy (float): final accuracy on the training set, against the *clean* labels
        wall_time (float): seconds spent in the training loop (not building the model nor
            evaluating it), from ``time.perf_counter``
        forward_passes (int): calls of the model's ``forward`` during training
        forward_samples (int): samples that went through those calls
        steps (int): optimisation steps taken
        train_loss (float): mean batch loss of the last epoch (see :class:`EpochStats`)
        history (tuple[EpochStats, ...]): one record per epoch
        sharpness (tuple[SharpnessRecord, ...]): the measurements of the ``monitor`` given to
            :func:`train`, if any (not compared, not shown in the repr)
        model (nn.Module | None): the trained model, in evaluation mode (not compared, not
            shown in the repr)
        cuda_graphs (str): ``"captured"`` when the steps ran from a CUDA graph, else
            ``"eager: <reason>"`` (see :mod:`~torchsam.experiments.graphs`; not compared)
    """

    method: str
    seed: int
    test_accuracy: float
    train_accuracy: float
    wall_time: float
    forward_passes: int
    forward_samples: int
    steps: int
    train_loss: float = float("nan")
    history: tuple[EpochStats, ...] = ()
    sharpness: tuple[SharpnessRecord, ...] = field(default=(), compare=False, repr=False)
    model: nn.Module | None = field(default=None, compare=False, repr=False)
    cuda_graphs: str = field(default="eager: graphs='off'", compare=False)

    @property
    def forwards_per_step(self) -> float:
        """Mean model forward passes per optimisation step."""
        return self.forward_passes / self.steps if self.steps else 0.0


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be an int >= {low}")
    return value


PRECISIONS = ("auto", "fp32", "bf16")
"""Names accepted by ``precision=`` (and ``--precision``)."""


def _resolve_precision(precision: object, device: torch.device) -> bool:
    """Whether a run of ``precision`` on ``device`` uses bf16 autocast (``"auto"``: on CUDA)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"Invalid precision value: {precision!r}; use one of: {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        return device.type == "cuda"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16': {device} does not support bfloat16; use 'fp32'")
    return precision == "bf16"


class _Autocast(nn.Module):
    """Runs the wrapped module under bf16 autocast and returns float32 logits."""

    def __init__(self, module: nn.Module, device_type: str, cache: bool = True) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.cache = cache  # off under CUDA-graph capture: a cached cast outlives it

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, cache_enabled=self.cache):
            return self.module(x).float()


class _ForwardCounter:
    """A forward pre-hook counting calls and samples while ``enabled`` (not in evaluations)."""

    def __init__(self) -> None:
        self.calls = 0
        self.samples = 0
        self.enabled = True

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.enabled:
            self.calls += 1
            if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
                self.samples += args[0].shape[0]


@dataclass(frozen=True)
class _Settings:
    """The checked arguments of a run that are not objects."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    augment: str
    bf16: bool
    device: torch.device
    world: int
    rank: int


@dataclass
class _Run:
    """A run's objects and its progress: what an epoch advances and a checkpoint saves."""

    settings: _Settings
    model: nn.Module  # the bare model
    net: nn.Module  # what the steps call: the model under DDP and autocast as configured
    evaluator: nn.Module  # what evaluations call: the model under autocast as configured
    optimizer: Optimizer
    scheduler: Any
    step_fn: StepFn
    source: BatchSource
    generators: dict[str, torch.Generator]
    counter: _ForwardCounter
    graphs: GraphPlan
    next_epoch: int = 0
    steps: int = 0
    wall_time: float = 0.0
    history: list[EpochStats] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return self.source.n_train // self.settings.batch_size


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of rows of ``x`` whose arg-max logit is ``y``, in chunks of ``batch_size``.

    The model is evaluated as it is (call ``model.eval()`` first for inference statistics).
    """
    if x.shape[0] == 0:
        return float("nan")
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum().item())
    return correct / x.shape[0]


@torch.no_grad()
def _evaluate(run: _Run, which: str, labels: Tensor, chunk: int = 1024) -> float:
    """Accuracy of the model in evaluation mode on the ``"train"`` or ``"test"`` rows of the
    run's source against ``labels``; the counter is off. With several processes each
    evaluates its share of the rows with rank 0's buffers and the count is summed."""
    n, world = run.source.size(which), run.settings.world
    if n == 0:
        return float("nan")
    low, high = 0, n
    if world > 1:
        import torch.distributed as dist

        for buffer in run.model.buffers():
            dist.broadcast(buffer, src=0)
        part = -(-n // world)
        low, high = min(n, run.settings.rank * part), min(n, (run.settings.rank + 1) * part)
    run.counter.enabled = False
    run.model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    for start in range(low, high, chunk):
        stop = min(start + chunk, high)
        logits = run.evaluator(run.source.inputs(which, start, stop))
        correct += (logits.argmax(dim=1) == labels[start:stop]).sum()
    if world > 1:
        torch.distributed.all_reduce(correct)
    run.model.train()
    run.counter.enabled = True
    return int(correct.item()) / n


def _run_epoch(
    run: _Run,
    epoch: int,
    on_step: Callable[[int, int, Tensor], None] | None,
    monitor: SharpnessMonitor | None = None,
) -> EpochStats:
    """One pass over a fresh permutation of the training set, in full batches (the tail is
    dropped); a step and a scheduler step per batch."""
    settings, source = run.settings, run.source
    local = settings.batch_size // settings.world
    _synchronize(settings.device)
    start = time.perf_counter()
    order = torch.randperm(source.n_train, generator=run.generators["batches"])
    order = order.to(settings.device)  # one copy per epoch, none per step
    loss_sum = torch.zeros((), device=settings.device)
    for first in range(0, run.steps_per_epoch * settings.batch_size, settings.batch_size):
        index = order[first : first + settings.batch_size]
        if settings.world > 1:  # this process's share of the global batch
            index = index[settings.rank * local : (settings.rank + 1) * local]
        x = source.train_inputs(index)
        loss = run.step_fn(Batch(x, source.y_train[index], index, epoch, run.steps))
        loss_sum += loss.detach()
        run.scheduler.step()
        run.steps += 1
        if on_step is not None:
            on_step(epoch, run.steps, loss)
        if monitor is not None and monitor.due(run.steps):
            start += _measure(run, monitor)  # not training time
    _synchronize(settings.device)
    run.wall_time += time.perf_counter() - start
    if settings.world > 1:  # the mean over the ranks' equal shares: the global batches'
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= settings.world
    return EpochStats(epoch, (loss_sum / run.steps_per_epoch).item(), run.wall_time)


def _measure(run: _Run, monitor: SharpnessMonitor) -> float:
    """Let ``monitor`` measure at the run's step count, outside the forward count; return the
    seconds it took (the device synchronised before and after).

    An optimizer with training and evaluation modes (:class:`torchsam.MomentumSAM`, whose
    weights sit at a perturbed point between steps) is put in evaluation mode for the
    measurement, so that the model is measured at its weights ``w``, and back in training mode
    after it (which recomputes the same perturbed point: training is unchanged)."""
    _synchronize(run.settings.device)
    began = time.perf_counter()
    run.counter.enabled = False
    optimizer = run.optimizer
    modes = optimizer if isinstance(optimizer, MomentumSAM) and optimizer.training else None
    try:
        if modes is not None:
            modes.eval()
        monitor.step(run.steps)
    finally:
        if modes is not None:
            modes.train()
        run.counter.enabled = True
    _synchronize(run.settings.device)
    return time.perf_counter() - began


def _data(
    split: Split, settings: _Settings
) -> tuple[Split, dict[str, torch.Generator], BatchSource]:
    """The split with its labels on the device, the run's generators (seeded from
    ``settings.seed``) and the source of its batches."""
    target = settings.device
    generators = {
        "batches": torch.Generator().manual_seed(settings.seed),
        # a stream of its own, so a method's draws never shift the batches
        "method": torch.Generator().manual_seed(settings.seed + 1),
    }
    if settings.augment != "none":
        generators["augment"] = torch.Generator(target).manual_seed(settings.seed + 2)
    split = _labels_on(split, target)
    source = batch_source(
        split,
        target,
        augment=settings.augment,
        generator=generators.get("augment"),
        channels_last=settings.bf16,
    )
    return split, generators, source


def _build_run(
    spec: Method,
    split: Split,
    settings: _Settings,
    model_fn: Callable[[Split], nn.Module] | None,
    method_kwargs: Mapping[str, Any],
    graphs: GraphPlan,
) -> _Run:
    """The model and its wrappers, the optimizer, the cosine schedule, the batch source and
    the step function (captured in a CUDA graph when ``graphs`` says so)."""
    target = settings.device
    model, net, evaluator = _models(split, settings, model_fn, cache=not graphs.capture)
    opt_kwargs, step_kwargs = spec.split_kwargs(method_kwargs)
    optimizer = spec.make_optimizer(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        **opt_kwargs,
        **graphs.optimizer_options,
    )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"method {spec.name!r} built {type(optimizer)!r}, not a torch.optim.Optimizer"
        )
    split, generators, source = _data(split, settings)
    steps_per_epoch = source.n_train // settings.batch_size
    context = TrainContext(
        model=net,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        per_sample_loss_fn=nn.CrossEntropyLoss(reduction="none"),
        split=split,
        epochs=settings.epochs,
        steps_per_epoch=steps_per_epoch,
        generator=generators["method"],
        world_size=settings.world,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=settings.epochs * steps_per_epoch
    )
    step_fn = spec.make_step(context, **step_kwargs)
    counter = _ForwardCounter()
    net.register_forward_pre_hook(counter)
    if graphs.capture:
        step_fn = CapturedStep(step_fn, optimizer, counter, target)
    return _Run(
        settings,
        model,
        net,
        evaluator,
        optimizer,
        scheduler,
        step_fn,
        source,
        generators,
        counter,
        graphs,
    )


def _models(
    split: Split,
    settings: _Settings,
    model_fn: Callable[[Split], nn.Module] | None,
    cache: bool = True,
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(model, net, evaluator)``: the model built (from the global generator, seeded by the
    caller) and moved to the device; what the steps call (under DDP and autocast as
    configured, autocast's cast cache off when ``cache`` is False); what evaluations call
    (under autocast as configured)."""
    target = settings.device
    model = model_fn(split) if model_fn is not None else mlp(split.num_features, split.num_classes)
    model.to(target)
    if settings.bf16:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    net: nn.Module = model
    if settings.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[target] if target.type == "cuda" else None)
    if not settings.bf16:
        return model, net, model
    return model, _Autocast(net, target.type, cache), _Autocast(model, target.type)


def _labels_on(split: Split, device: torch.device) -> Split:
    """The split with its tensors on ``device``; a split of images keeps its feature rows
    where they are (the batches come from the pixels)."""
    if split.y_train.device == device and split.x_train.device == device:
        return split
    on_device = split.images is None
    return replace(
        split,
        x_train=split.x_train.to(device) if on_device else split.x_train,
        x_test=split.x_test.to(device) if on_device else split.x_test,
        y_train=split.y_train.to(device),
        y_train_clean=split.y_train_clean.to(device),
        y_test=split.y_test.to(device),
    )


def _checkpoint_state(run: _Run, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    progress = {
        "next_epoch": run.next_epoch,
        "steps": run.steps,
        "wall_time": run.wall_time,
        "forward_calls": run.counter.calls,
        "forward_samples": run.counter.samples,
        "history": [asdict(stats) for stats in run.history],
    }
    return run_state(
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        generators=run.generators,
        progress=progress,
        fingerprint=fingerprint,
        device=run.settings.device,
    )


_KERNEL_KEYS = ("foreach", "fused")
"""Param-group keys that choose the optimizer's kernels: a resumed run keeps its own (a run
captured in a CUDA graph needs ``fused=True``, whatever the run that wrote the checkpoint
used)."""


def _resume(run: _Run, spec: Method, path: str | Path, fingerprint: Mapping[str, Any]) -> None:
    """Continue ``run`` from the checkpoint at ``path``."""
    if not spec.resumable:
        raise ValueError(
            f"method {spec.name!r} keeps per-run state in its step function, which a checkpoint "
            "does not hold: it cannot resume; rerun it from the start"
        )
    groups = run.optimizer.param_groups
    kernels = [{key: group[key] for key in _KERNEL_KEYS if key in group} for group in groups]
    progress = restore_state(
        load_checkpoint(path, fingerprint),
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        generators=run.generators,
        device=run.settings.device,
    )
    for group, own in zip(run.optimizer.param_groups, kernels, strict=True):
        group.update(own)
    run.next_epoch, run.steps = int(progress["next_epoch"]), int(progress["steps"])
    run.wall_time = float(progress["wall_time"])
    run.counter.calls = int(progress["forward_calls"])
    run.counter.samples = int(progress["forward_samples"])
    run.history = [EpochStats(**stats) for stats in progress["history"]]


def _fingerprint(
    spec: Method, settings: _Settings, n_train: int, method_kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """What a checkpoint must match to resume a run: the configuration and the type of the
    device (the generators' states are the device's own), not which device of the type."""
    values = asdict(settings)
    del values["device"], values["rank"]
    options = {**spec.defaults, **method_kwargs}
    return {
        **values,
        "device_type": settings.device.type,
        "method": spec.name,
        "options": repr(sorted(options.items())),
        "n_train": n_train,
    }


def train(
    method: str | Method | OptimizerFactory,
    split: Split,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    model_fn: Callable[[Split], nn.Module] | None = None,
    device: str | torch.device | None = None,
    curves: bool = False,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    distributed: bool = False,
    augment: str = "none",
    precision: str = "auto",
    checkpoint: str | Path | None = None,
    resume: bool = False,
    monitor: Callable[[nn.Module], SharpnessMonitor] | None = None,
    graphs: str = "off",
    **method_kwargs: Any,
) -> Result:
    """Train a fresh model on ``split`` with one method and report its accuracy and cost.

    The model (``model_fn(split)``, by default :func:`~torchsam.experiments.models.mlp` sized
    to the split) is initialised after ``torch.manual_seed(seed)``; batches are drawn from a
    ``torch.Generator`` seeded with ``seed``, as full batches of a fresh permutation each epoch
    (a tail shorter than ``batch_size`` is dropped). The learning rate follows a cosine schedule
    from ``lr`` to 0 over all steps (``CosineAnnealingLR``, stepped after every batch). The loss
    is cross-entropy on the noisy labels ``split.y_train``. The global RNG states are forked
    (the CPU's, and every CUDA device's where CUDA is in use), so the caller's random streams
    are untouched, and the same arguments give the same result (on the same machine and
    thread count).

    The run is built from small pieces: the data held on the device
    (:func:`~torchsam.experiments.batches.batch_source`), one epoch (``_run_epoch``), an
    evaluation (``_evaluate``), a checkpoint after each epoch
    (:mod:`~torchsam.experiments.checkpoint`), and the loop over the epochs here.

    Args:
        method (str | Method | OptimizerFactory): a registered name (see :data:`METHODS`), a
            :class:`Method`, or an optimizer factory ``(params, lr, momentum, weight_decay,
            **kwargs) -> Optimizer`` (run with :func:`closure_step`)
        split (Split): the data, e.g. :func:`~torchsam.experiments.data.noisy_digits`
        epochs (int): passes over the training set, >= 1
        batch_size (int, optional): samples per step (default: 64)
        lr (float, optional): peak learning rate (default: 0.05)
        momentum (float, optional): SGD momentum (default: 0.9)
        weight_decay (float, optional): SGD weight decay (default: 5e-4)
        seed (int, optional): seed of the initialisation, the batches and the method's own
            generator (default: 0)
        model_fn (Callable, optional): builds the model from the split (default: ``mlp``)
        device (str | torch.device, optional): where the model and the data live (default:
            the CPU); the model is built on the CPU, so initialisation does not depend on it
        curves (bool, optional): evaluate the test accuracy after every epoch (outside the
            timed loop) into :attr:`Result.history` (default: False)
        on_step (Callable, optional): called after every step as ``on_step(epoch, step,
            loss)`` with the step's loss tensor, on the device: the loop itself never
            synchronises with the device (the epoch's mean loss is read once per epoch), and
            a callback that reads the loss (``loss.item()``) adds a synchronisation each time
            it does (default: None)
        on_epoch (Callable, optional): called with each epoch's :class:`EpochStats` as soon
            as it is recorded (default: None)
        distributed (bool, optional): train data-parallel with the processes of the
            initialised default process group (as ``torchrun`` starts them, one call per
            process): the model is wrapped in ``DistributedDataParallel``, ``batch_size`` is
            the global batch, which every process draws alike and of which each takes its
            contiguous share of ``batch_size / world_size`` samples, so the gradients averaged
            by DDP are those of one process on the whole batch; the training loss and the
            accuracies (evaluated in shares with rank 0's buffers) are the same on every rank;
            ``wall_time`` is this process's (default: False)
        augment (str, optional): ``"none"``, ``"basic"`` (random crop of the image padded by
            4 pixels and horizontal flip) or ``"cutout"`` (basic, then a 16x16 square set to
            the mean), applied on the device to each batch from a generator on the device
            seeded with ``seed + 2``; only for a split with images (CIFAR)
            (default: ``"none"``); see :mod:`~torchsam.experiments.augment`
        precision (str, optional): ``"fp32"``; ``"bf16"``: the forward passes run under
            bfloat16 autocast (weights, gradients and optimizer state stay float32; the
            logits are returned as float32) and the model and image batches take the
            ``channels_last`` layout; ``"auto"``: bf16 on CUDA, fp32 elsewhere
            (default: ``"auto"``)
        checkpoint (str | Path, optional): write the run's state there after every epoch
            (model, optimizer, scheduler, generators, history; see
            :mod:`~torchsam.experiments.checkpoint`); once the run has finished the file keeps
            only the model, the counters and the history (default: None)
        resume (bool, optional): continue from ``checkpoint``, which an interrupted run of
            the same configuration wrote on the same kind of device (the CPU, or CUDA): the
            run's state is restored exactly (its generators and torch's global ones, the CUDA
            device's included), so on the CPU the run ends bit for bit as if never
            interrupted, and on a GPU too where its kernels are deterministic (see
            ``torch.use_deterministic_algorithms``) (the restored epochs are passed to
            ``on_epoch`` first; their ``wall_time`` is the earlier run's); a finished run's
            checkpoint trains nothing and gives the same result (default: False)
        monitor (Callable, optional): builds a :class:`~torchsam.SharpnessMonitor` from the
            bare model (once, when the model is built); after every step whose count is due
            (:meth:`~torchsam.SharpnessMonitor.due`) it measures, outside the timed loop and
            the forward count, so that ``wall_time`` and ``forward_passes`` are those of the
            training alone; its records are :attr:`Result.sharpness` (those of this call only:
            a resumed run's earlier measurements are not restored) (default: None)
        graphs (str, optional): capture each whole step (forward, backward, optimizer step)
            in a CUDA graph and replay it (:mod:`~torchsam.experiments.graphs`): ``"auto"``
            captures when the run allows it (CUDA, a method registered as capturable with
            the options it needs, e.g. SAM with ``skip_nonfinite=False``, one process) and
            otherwise trains eagerly; ``"on"`` raises a ValueError saying why a run cannot
            be captured; ``"off"`` never captures. :attr:`Result.cuda_graphs` records
            ``"captured"`` or ``"eager: <reason>"``. Captured runs build the optimizer with
            ``fused=True``, so they match eager runs closely, not bit for bit. The capture
            has not yet been run on a GPU, hence the default (default: ``"off"``)
        **method_kwargs: the method's options (``rho=...``), over its registered defaults

    Returns:
        Result: accuracies, training wall time, forward passes, steps, the per-epoch history,
        the monitor's records and the trained model.

    Raises:
        ValueError: for an unknown method or an invalid ``epochs``/``batch_size``/``seed``/
            ``augment``/``precision``; an augmentation of a split without images; a
            checkpoint of another configuration or written on another kind of device, or a
            method that cannot resume;
            with ``distributed=True``, without a process group or for a ``batch_size`` that
            is not a multiple of the number of processes; ``graphs="on"`` for a run that
            cannot be captured, or an unknown ``graphs``.
        FileNotFoundError: with ``resume=True``, if ``checkpoint`` does not exist.
    """
    spec = get_method(method)
    settings = _check_settings(
        split,
        epochs,
        batch_size,
        lr,
        momentum,
        weight_decay,
        seed,
        device,
        distributed,
        augment,
        precision,
    )
    fingerprint = _fingerprint(spec, settings, split.x_train.shape[0], method_kwargs)
    plan = plan_graphs(
        graphs,
        device=settings.device,
        method=spec.name,
        graph_options=spec.graph_options,
        options={**spec.defaults, **method_kwargs},
        world=settings.world,
        total_steps=settings.epochs * (split.x_train.shape[0] // settings.batch_size),
    )
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    with _seeded(seed, settings.device):
        run = _build_run(spec, split, settings, model_fn, method_kwargs, plan)
        if resume and checkpoint is not None:
            _resume(run, spec, checkpoint, fingerprint)
            for stats in run.history:
                if on_epoch is not None:
                    on_epoch(stats)
        watcher = monitor(run.model) if monitor is not None else None
        _train_epochs(run, watcher, curves, on_step, on_epoch, checkpoint, fingerprint)
        result = _result(run, spec)
        return result if watcher is None else replace(result, sharpness=tuple(watcher.records))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's global generators seeded with ``seed`` in the block, and as they were after it:
    the CPU's, and every CUDA device's where CUDA is in use (initialised, or the run's device),
    since ``torch.manual_seed`` reseeds them all. Where CUDA is not in use only the CPU's is
    seeded (with another device, every one as before): seeding CUDA's would queue the seed for
    its later initialisation, which no fork can undo."""
    cuda = device.type == "cuda" or torch.cuda.is_initialized()
    devices = range(torch.cuda.device_count()) if cuda else ()
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        if cuda or device.type != "cpu":
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


def _train_epochs(
    run: _Run,
    watcher: SharpnessMonitor | None,
    curves: bool,
    on_step: Callable[[int, int, Tensor], None] | None,
    on_epoch: Callable[[EpochStats], None] | None,
    checkpoint: str | Path | None,
    fingerprint: Mapping[str, Any],
) -> None:
    """The epochs left to train, each recorded in ``run.history``, checkpointed (by rank 0)
    and reported; a finished run's checkpoint then keeps the model only."""
    settings = run.settings
    run.model.train()
    for epoch in range(run.next_epoch, settings.epochs):
        stats = _run_epoch(run, epoch, on_step, watcher)
        if curves:
            stats = replace(stats, test_accuracy=_evaluate(run, "test", run.source.y_test))
        run.history.append(stats)
        run.next_epoch = epoch + 1
        if checkpoint is not None and settings.rank == 0:
            save_checkpoint(checkpoint, _checkpoint_state(run, fingerprint))
        if on_epoch is not None:
            on_epoch(stats)
    if checkpoint is not None and settings.rank == 0:  # finished: keep the model only
        save_checkpoint(checkpoint, finished_state(_checkpoint_state(run, fingerprint)))


def _check_settings(
    split: Split,
    epochs: Any,
    batch_size: Any,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: Any,
    device: str | torch.device | None,
    distributed: bool,
    augment: str,
    precision: str,
) -> _Settings:
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed value: {seed!r}; seed must be an int")
    n_train = split.x_train.shape[0]
    if batch_size > n_train:
        raise ValueError(
            f"Invalid batch_size value: {batch_size}; the training set has only {n_train} samples"
        )
    check_augment(augment)
    if augment != "none" and split.images is None:
        raise ValueError(
            f"augment={augment!r} needs a dataset of images (CIFAR); this split has feature "
            "rows only: use augment='none'"
        )
    target = torch.device(device) if device is not None else torch.device("cpu")
    bf16 = _resolve_precision(precision, target)
    world, rank = _world(distributed, batch_size)
    return _Settings(
        epochs, batch_size, lr, momentum, weight_decay, seed, augment, bf16, target, world, rank
    )


def _result(run: _Run, spec: Method) -> Result:
    """Final accuracies (evaluation mode, clean training labels) and the run's record."""
    test_accuracy = _evaluate(run, "test", run.source.y_test)
    train_accuracy = _evaluate(run, "train", run.source.y_train_clean)
    run.model.eval()
    samples = run.counter.samples
    if run.settings.world > 1:  # samples through the forward passes of all processes
        total = torch.tensor([samples], device=run.settings.device)
        torch.distributed.all_reduce(total)
        samples = int(total.item())
    return Result(
        method=spec.name,
        seed=run.settings.seed,
        test_accuracy=test_accuracy,
        train_accuracy=train_accuracy,
        wall_time=run.wall_time,
        forward_passes=run.counter.calls,
        forward_samples=samples,
        steps=run.steps,
        train_loss=run.history[-1].train_loss,
        history=tuple(run.history),
        model=run.model,
        cuda_graphs=_graph_status(run),
    )


def _graph_status(run: _Run) -> str:
    """``"captured"``, or ``"eager: <reason>"`` (also for a run whose planned capture never
    came: it ended within the warm-up steps, e.g. resumed near its end)."""
    step = run.step_fn
    if isinstance(step, CapturedStep) and step.graph is None:
        return f"eager: the run ended within the {WARMUP_STEPS} eager warm-up steps"
    return run.graphs.status


def _world(distributed: bool, batch_size: int) -> tuple[int, int]:
    """(world size, rank) of a run; (1, 0) unless ``distributed``."""
    if not distributed:
        return 1, 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group: start the "
            "processes with torchrun (or call torch.distributed.init_process_group first)"
        )
    world = dist.get_world_size()
    if batch_size % world:
        raise ValueError(
            f"Invalid batch_size value: {batch_size}; with {world} processes the batch size "
            f"(the global batch) must be a multiple of {world}"
        )
    return world, dist.get_rank()


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
