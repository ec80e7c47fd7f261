"""What the instruments share: the data protocol, the measured loss, the model left as it came.

``torchsam.sharpness`` and ``torchsam.landscape`` are pure functions of
``(model, loss_fn, data, ...)``. This module holds the pieces both need:

* ``data`` is an iterable of ``(inputs, targets)`` batches (a list, a tuple or a ``DataLoader``;
  not a generator or another iterator). :func:`fixed_batches` reads it once, at the start of a
  measurement, into a list: every pass of the measurement sees the same batches in the same
  order (a shuffling or ``drop_last`` loader included), and torch's global RNG state is given
  back around that read (a ``DataLoader`` draws its base seed, and a shuffling sampler its
  order, from it);
* the loss over ``data`` is the sample-weighted mean of ``loss_fn(model(inputs), targets)``
  over its batches (``loss_fn`` returns a batch mean);
* :func:`not_finite` warns once that a measurement is NaN because the loss or a
  Hessian-vector product was not finite (a diverged model);
* :func:`measuring` puts the model in the documented mode (dropout off; BatchNorm with running
  statistics, or with batch statistics and the running statistics untouched) and gives back
  the train/eval flags and the RNG state afterwards;
* :func:`select_params` turns the ``params`` argument (None, a module, names, tensors) into
  the model's parameters in model order.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from torchsam._batchnorm import freeze_running_stats

LossFn = Callable[[Any, Any], Tensor]
Data = Iterable[Any]
ParamSpec = nn.Module | str | Tensor | Iterable[str | Tensor] | None

BATCH_NORM_MODES = ("eval", "train")


def random_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a new CPU generator seeded with 0 when it is None (reproducible
    results by default); a TypeError for anything else."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)!r}")
    return generator


def check_data(data: object) -> None:
    """Reject what is not an iterable of batches, and iterators (generators included).

    An iterator is recognised by its type, without calling ``iter()``: creating a
    ``DataLoader``'s iterator draws from the global RNG and starts its workers.
    """
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        raise TypeError(
            "data is an iterator, which a measurement would consume (a training loop sharing "
            "it would lose those batches): pass a list of (inputs, targets) batches or a "
            "DataLoader"
        )


@contextmanager
def kept_rng() -> Iterator[None]:
    """Give back torch's global CPU RNG state, and CUDA's when initialised, on exit."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def fixed_batches(data: Data) -> list[Any]:
    """``data`` read once into a list of batches, the global RNG state given back afterwards.

    Every pass of a measurement then sees the same batches in the same order: a shuffling
    ``DataLoader`` (or one with ``drop_last=True``) would otherwise give a different function
    on every pass. The batches are those of one pass of ``data`` (a loader with its own
    ``generator`` advances it as one pass does); they are held in memory for the measurement.
    """
    check_data(data)
    with kept_rng():
        return list(data)


def not_finite(what: str) -> None:
    """Warn that a measurement is NaN because ``what`` was not finite."""
    warnings.warn(
        f"{what} is not finite (NaN or infinite): the model has diverged, or the loss "
        "overflows; the measurement is NaN",
        RuntimeWarning,
        stacklevel=3,
    )


def batch_size(targets: object) -> int:
    if isinstance(targets, Tensor):
        if targets.dim() == 0:
            raise ValueError("targets of a batch must have a batch dimension, got a 0-d tensor")
        return int(targets.shape[0])
    try:
        return len(targets)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"cannot tell the size of a batch from targets of type {type(targets).__name__}: "
            "give tensors (or sequences) whose first dimension is the batch"
        ) from None


def batches(data: Data, device: torch.device | None) -> Iterator[tuple[Any, Any, int]]:
    """Yield ``(inputs, targets, size)`` for each batch, tensors moved to ``device``."""
    count = 0
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"data must yield (inputs, targets) pairs; batch {i} is a "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs, targets = batch
        size = batch_size(targets)
        if size == 0:
            continue
        if device is not None:
            inputs, targets = _moved(inputs, device), _moved(targets, device)
        count += 1
        yield inputs, targets, size
    if count == 0:
        raise ValueError("data yielded no non-empty batch")


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` when it is a tensor. A copy from the host does not wait
    (``non_blocking``: the device reads it in stream order); any other copy does, since a
    copy to the host that did not wait could be read before it has arrived."""
    if not isinstance(value, Tensor):
        return value
    return value.to(device, non_blocking=value.device.type == "cpu")


def batch_loss(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any) -> Tensor:
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "loss_fn(outputs, targets) must return the mean loss of the batch as a one-element "
            f"tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
            + " (use reduction='mean')"
        )
    return loss.reshape(())


def model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


@torch.no_grad()
def mean_loss(model: nn.Module, loss_fn: LossFn, data: Data) -> float:
    """The sample-weighted mean of the batch losses over ``data`` (no autograd graph)."""
    # no_grad rather than inference_mode: inference_mode was a little slower per grid point on
    # the landscape benchmark's MLP, and the outputs stay ordinary tensors
    total: Tensor | None = None
    count = 0
    for inputs, targets, size in batches(data, model_device(model)):
        loss = batch_loss(model, loss_fn, inputs, targets).double() * size
        total = loss if total is None else total + loss
        count += size
    if total is None:  # pragma: no cover - batches() raises first
        raise ValueError("data yielded no non-empty batch")
    return float(total) / count


def check_batch_norm(batch_norm: str) -> None:
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(
            f'batch_norm must be "eval" (running statistics) or "train" (batch statistics, '
            f"running statistics left untouched), got {batch_norm!r}"
        )


@contextmanager
def measuring(model: nn.Module, batch_norm: str) -> Iterator[None]:
    """Put ``model`` in measuring mode; give back its modes and the RNG state afterwards.

    Every module goes to evaluation mode (dropout off). With ``batch_norm="train"`` the
    BatchNorm layers normalise with the statistics of each batch instead, and their running
    statistics are left bit-exactly as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_batch_norm(batch_norm)
    modes = [(module, module.training) for module in model.modules()]
    with kept_rng():
        try:
            model.eval()
            if batch_norm == "train":
                for module in model.modules():
                    if isinstance(module, _BatchNorm):
                        module.training = True
                with freeze_running_stats(model):
                    yield
            else:
                yield
        finally:
            for module, training in modes:
                module.training = training


def select_params(model: nn.Module, params: ParamSpec, *, need_grad: bool = True) -> list[Tensor]:
    """The parameters named by ``params``, in model order, without duplicates.

    ``params`` is None (every parameter that requires a gradient), a submodule of ``model``, or
    a parameter name, a submodule name, a parameter tensor, or an iterable of those.
    """
    named: list[tuple[str, Tensor]] = list(model.named_parameters())
    if params is None:
        chosen: list[Tensor] = [p for _, p in named if p.requires_grad or not need_grad]
        if not chosen:
            raise ValueError("the model has no parameter that requires a gradient")
        return chosen
    by_name = dict(named)
    wanted: set[int] = set()
    items: Iterable[object] = [params] if isinstance(params, (nn.Module, str, Tensor)) else params
    for item in items:
        if isinstance(item, nn.Module):
            found = list(item.parameters())
            owned = {id(p) for _, p in named}
            if not found or any(id(p) not in owned for p in found):
                raise ValueError(
                    "params: the module given has no parameters, or parameters that are not "
                    "the model's; pass a submodule of the model"
                )
            wanted.update(id(p) for p in found)
        elif isinstance(item, str):
            if item in by_name:
                wanted.add(id(by_name[item]))
                continue
            try:
                sub = model.get_submodule(item)
            except AttributeError:
                listed = ", ".join(list(by_name)[:8]) + (", ..." if len(by_name) > 8 else "")
                raise ValueError(
                    f"params: {item!r} is neither a parameter name nor a submodule name of the "
                    f"model (parameters: {listed})"
                ) from None
            found = list(sub.parameters())
            if not found:
                raise ValueError(f"params: submodule {item!r} has no parameters")
            wanted.update(id(p) for p in found)
        elif isinstance(item, Tensor):
            if not any(item is p for _, p in named):
                raise ValueError("params: a tensor given is not a parameter of the model")
            wanted.add(id(item))
        else:
            raise TypeError(
                "params must be None, a submodule, a parameter or submodule name, a parameter, "
                f"or an iterable of those; got an element of type {type(item).__name__}"
            )
    chosen = [t for _, t in named if id(t) in wanted]
    if not chosen:
        raise ValueError("params selects no parameter")
    if need_grad:
        frozen = [n for n, p in named if id(p) in wanted and not p.requires_grad]
        if frozen:
            raise ValueError(
                f"params: {', '.join(frozen)} not requiring a gradient; the Hessian is taken "
                "with respect to trainable parameters only"
            )
    return chosen


class Progress:
    """A progress bar over ``total`` points: tqdm when installed, plain lines otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.done = 0
        self._bar: Any = None
        self._next_line = 0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._bar = None
            else:
                self._bar = tqdm(total=total, desc=desc)

    def update(self) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.done >= self._next_line or self.done == self.total:
            print(f"{self.desc}: {self.done}/{self.total} points", file=sys.stderr, flush=True)
            self._next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
