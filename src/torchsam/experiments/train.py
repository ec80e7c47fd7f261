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

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsam import SAM, freeze_running_stats
from torchsam.experiments.data import Split
from torchsam.experiments.models import mlp

__all__ = [
    "METHODS",
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
    """

    name: str
    make_optimizer: OptimizerFactory
    make_step: StepBuilder = closure_step
    defaults: Mapping[str, Any] = field(default_factory=dict)
    step_options: frozenset[str] = frozenset()
    description: str = ""

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


register_method("sgd", _sgd, description="torch.optim.SGD (the baseline)")
register_method(
    "sam",
    sharpness_aware(SAM),
    defaults={"rho": 0.05},
    description="torchsam.SAM around SGD (Foret et al. 2021)",
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
        model (nn.Module | None): the trained model, in evaluation mode (not compared, not
            shown in the repr)
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
    model: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def forwards_per_step(self) -> float:
        """Mean model forward passes per optimisation step."""
        return self.forward_passes / self.steps if self.steps else 0.0


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be an int >= {low}")
    return value


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of one epoch: a fresh permutation in full batches (the tail is dropped)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Fraction of rows of ``x`` whose arg-max logit is ``y``, in chunks of ``batch_size``.

    The model is evaluated as it is (call ``model.eval()`` first for inference statistics).
    """
    if x.shape[0] == 0:
        return float("nan")
    return _correct(model, x, y, batch_size) / x.shape[0]


@torch.no_grad()
def _correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> int:
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum().item())
    return correct


@torch.no_grad()
def _shared_accuracy(model: nn.Module, x: Tensor, y: Tensor, world: int) -> float:
    """:func:`accuracy` with the rows shared among the processes of the default group, each
    evaluating its part with rank 0's buffers (BatchNorm statistics); the same on every rank."""
    if world == 1 or x.shape[0] == 0:
        return accuracy(model, x, y)
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    part = -(-x.shape[0] // world)
    rows = slice(dist.get_rank() * part, (dist.get_rank() + 1) * part)
    count = torch.tensor([_correct(model, x[rows], y[rows])], device=x.device)
    dist.all_reduce(count)
    return int(count.item()) / x.shape[0]


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
    **method_kwargs: Any,
) -> Result:
    """Train a fresh model on ``split`` with one method and report its accuracy and cost.

    The model (``model_fn(split)``, by default :func:`~torchsam.experiments.models.mlp` sized
    to the split) is initialised after ``torch.manual_seed(seed)``; batches are drawn from a
    ``torch.Generator`` seeded with ``seed``, as full batches of a fresh permutation each epoch
    (a tail shorter than ``batch_size`` is dropped). The learning rate follows a cosine schedule
    from ``lr`` to 0 over all steps (``CosineAnnealingLR``, stepped after every batch). The loss
    is cross-entropy on the noisy labels ``split.y_train``. The global RNG state is forked, so
    the caller's random stream is untouched, and the same arguments give the same result (on
    the same machine and thread count).

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
            loss)`` with the step's loss tensor (default: None)
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
        **method_kwargs: the method's options (``rho=...``), over its registered defaults

    Returns:
        Result: accuracies, training wall time, forward passes, steps, the per-epoch history
        and the trained model.

    Raises:
        ValueError: for an unknown method or an invalid ``epochs``/``batch_size``/``seed``;
            with ``distributed=True``, without a process group or for a ``batch_size`` that
            is not a multiple of the number of processes.
    """
    spec = get_method(method)
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed value: {seed!r}; seed must be an int")
    n_train = split.x_train.shape[0]
    if batch_size > n_train:
        raise ValueError(
            f"Invalid batch_size value: {batch_size}; the training set has only {n_train} samples"
        )
    opt_kwargs, step_kwargs = spec.split_kwargs(method_kwargs)
    world, rank = _world(distributed, batch_size)
    local_batch = batch_size // world

    target = torch.device(device) if device is not None else torch.device("cpu")
    if split.x_train.device != target:
        split = replace(
            split,
            x_train=split.x_train.to(target),
            y_train=split.y_train.to(target),
            y_train_clean=split.y_train_clean.to(target),
            x_test=split.x_test.to(target),
            y_test=split.y_test.to(target),
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (
            model_fn(split) if model_fn is not None else mlp(split.num_features, split.num_classes)
        )
        model.to(target)
        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                model, device_ids=[target] if target.type == "cuda" else None
            )
        optimizer = spec.make_optimizer(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, **opt_kwargs
        )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"method {spec.name!r} built {type(optimizer)!r}, not a torch.optim.Optimizer"
            )
        steps_per_epoch = n_train // batch_size
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=epochs * steps_per_epoch
        )
        batch_generator = torch.Generator().manual_seed(seed)
        context = TrainContext(
            model=net,
            optimizer=optimizer,
            loss_fn=nn.CrossEntropyLoss(),
            per_sample_loss_fn=nn.CrossEntropyLoss(reduction="none"),
            split=split,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            # a stream of its own, so a method's draws never shift the batches
            generator=torch.Generator().manual_seed(seed + 1),
            world_size=world,
        )
        step_fn = spec.make_step(context, **step_kwargs)

        counts = [0, 0]  # forward calls, samples

        def count_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
            counts[0] += 1
            if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
                counts[1] += args[0].shape[0]

        handle = net.register_forward_pre_hook(count_forward)
        model.train()
        steps = 0
        wall_time = 0.0
        history: list[EpochStats] = []
        try:
            for epoch in range(epochs):
                _synchronize(target)
                start = time.perf_counter()
                loss_sum = torch.zeros((), device=target)
                for index in _batches(n_train, batch_size, batch_generator):
                    if world > 1:  # this process's share of the global batch
                        index = index[rank * local_batch : (rank + 1) * local_batch]
                    index = index.to(target)
                    batch = Batch(split.x_train[index], split.y_train[index], index, epoch, steps)
                    loss = step_fn(batch)
                    loss_sum += loss.detach()
                    scheduler.step()
                    steps += 1
                    if on_step is not None:
                        on_step(epoch, steps, loss)
                _synchronize(target)
                wall_time += time.perf_counter() - start
                if world > 1:  # the mean over the ranks' equal shares: the global batches'
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                epoch_accuracy = None
                if curves:
                    handle.remove()
                    model.eval()
                    epoch_accuracy = _shared_accuracy(model, split.x_test, split.y_test, world)
                    model.train()
                    handle = net.register_forward_pre_hook(count_forward)
                stats = EpochStats(
                    epoch, (loss_sum / steps_per_epoch).item(), wall_time, epoch_accuracy
                )
                history.append(stats)
                if on_epoch is not None:
                    on_epoch(stats)
        finally:
            handle.remove()

        model.eval()
        test_accuracy = _shared_accuracy(model, split.x_test, split.y_test, world)
        train_accuracy = _shared_accuracy(model, split.x_train, split.y_train_clean, world)
        if world > 1:  # samples through the forward passes of all processes
            samples = torch.tensor([counts[1]], device=target)
            torch.distributed.all_reduce(samples)
            counts[1] = int(samples.item())

    return Result(
        method=spec.name,
        seed=seed,
        test_accuracy=test_accuracy,
        train_accuracy=train_accuracy,
        wall_time=wall_time,
        forward_passes=counts[0],
        forward_samples=counts[1],
        steps=steps,
        train_loss=history[-1].train_loss,
        history=tuple(history),
        model=model,
    )


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
