r"""Sharpness watched while a model trains: :class:`SharpnessMonitor`.

:mod:`torchsam.sharpness` measures a model; a :class:`SharpnessMonitor` calls it every ``every``
optimizer steps (or epochs) during training, on a fixed probe of the training data, and keeps
what it measured:

* the top Hessian eigenvalue (:func:`torchsam.sharpness.hessian_eigenvalues`, Lanczos),
  warm-started from the eigenvector of the previous measurement: the weights move little
  between two measurements, so the previous eigenvector is nearly the new one and a
  measurement costs a few Hessian-vector products; the first starts from the probe's
  gradient (plus a random vector), which lies mostly in the top eigenspace;
* optionally Hutchinson's estimate of the Hessian trace (``trace_samples``) and SAM sharpness
  (``sam_rho``);
* each measurement as a :class:`SharpnessRecord` in :attr:`SharpnessMonitor.records`, written
  to a CSV file by :meth:`SharpnessMonitor.to_csv` and, when a TensorBoard ``SummaryWriter``
  (or anything with its ``add_scalar(tag, value, step)``) is given, to it as it is taken.

It never changes the training: the instruments give the model back exactly as it came
(weights and buffers bit-identical, BatchNorm running statistics included, ``.grad`` untouched,
every module's train/eval flag) and leave torch's global RNG state as it was; the monitor's
random vectors come from its own ``torch.Generator``.

The monitor is used from a plain loop (one :meth:`~SharpnessMonitor.step` call after each
optimizer step), as a PyTorch Lightning callback (:meth:`~SharpnessMonitor.lightning_callback`)
and as a Hugging Face ``TrainerCallback`` (:meth:`~SharpnessMonitor.trainer_callback`). Only
those two methods import Lightning or ``transformers``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchsam import sharpness
from torchsam._measure import (
    Data,
    LossFn,
    ParamSpec,
    check_batch_norm,
    fixed_batches,
    random_generator,
    select_params,
)

__all__ = ["SharpnessMonitor", "SharpnessRecord"]


@dataclass(frozen=True)
class SharpnessRecord:
    """One measurement of a :class:`SharpnessMonitor`.

    Attributes:
        step (int): optimizer steps taken when it was measured
        epoch (int): epochs completed when it was measured
        top_eigenvalue (float): the top Hessian eigenvalue of the loss on the probe (NaN when
            the loss or a Hessian-vector product was not finite)
        converged (bool): whether it met the tolerance within ``max_iter`` products (see
            :func:`torchsam.sharpness.hessian_eigenvalues`)
        products (int): the Hessian-vector products it took
        trace (float | None): Hutchinson's trace estimate, None when not asked for
        trace_stderr (float | None): its standard error, None when not asked for
        sam_sharpness (float | None): SAM sharpness at radius ``sam_rho``, None when not
            asked for
        seconds (float): the wall-clock time of the measurement (on a GPU the model's device
            is synchronised before the clock starts and before it stops, so that the
            training's queued kernels are not counted and the measurement's all are)
    """

    step: int
    epoch: int
    top_eigenvalue: float
    converged: bool
    products: int
    trace: float | None
    trace_stderr: float | None
    sam_sharpness: float | None
    seconds: float


_UNITS = ("step", "epoch")


def _check_count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _synchronize(devices: set[torch.device]) -> None:
    """Wait for the work queued on each CUDA device of ``devices`` (the CPU's work is done
    when a call returns), so that a host clock times only what it brackets."""
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _check_model(model: object, loss_fn: object) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "SharpnessMonitor got a DistributedDataParallel wrapper: build it on the module "
            "inside (model.module); the wrapper's forward takes part in DDP's collectives, "
            "which a measurement on one rank would leave the other ranks waiting for"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")


def _check_measures(
    tol: object, trace_samples: int | None, sam_rho: object, batch_norm: str
) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if trace_samples is not None:
        _check_count("trace_samples", trace_samples, 2)
    if sam_rho is not None and (
        isinstance(sam_rho, bool) or not isinstance(sam_rho, (int, float)) or not sam_rho >= 0
    ):
        raise ValueError(f"Invalid sam_rho value: {sam_rho}")
    check_batch_norm(batch_norm)


def _check_writer(writer: object, tag: object) -> None:
    if writer is not None and not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            "writer must be a torch.utils.tensorboard.SummaryWriter or have an "
            f"add_scalar(tag, value, global_step) method, got {type(writer).__name__}"
        )
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a string, got {type(tag).__name__}")


class SharpnessMonitor:
    r"""Measure the sharpness of ``model`` every ``every`` steps (or epochs) while it trains.

    A measurement computes the top eigenvalue of the Hessian of the loss on ``probe``,

    .. math:: L(w) = \frac{1}{N} \sum_b n_b\, \mathrm{loss\_fn}(f_w(x_b), y_b),

    with :func:`torchsam.sharpness.hessian_eigenvalues` (Lanczos, ``k=1``), starting from the
    eigenvector of the previous measurement (the first, and one that follows a measurement
    that was not finite, starts from the probe's unit gradient plus a unit random vector of
    ``generator``: ``start="gradient"``, which needs fewer products than a random start), and,
    when
    asked, :func:`~torchsam.sharpness.hessian_trace` and
    :func:`~torchsam.sharpness.sam_sharpness` on the same probe. The loss is that of the
    model in evaluation mode (dropout off; BatchNorm as ``batch_norm`` says), so successive
    measurements see one deterministic function of the weights.

    Args:
        model (nn.Module): the model being trained
        loss_fn (callable): ``loss_fn(model(inputs), targets)``, the mean loss of a batch
        probe (iterable): ``(inputs, targets)`` batches of training data, read once here into
            a fixed list that every measurement uses (keep it small: each Hessian-vector
            product is a double-backward pass over all of it)
        every (int, optional): measure when the count of ``unit`` is a multiple of it
            (default: 100)
        unit (str, optional): ``"step"`` (count optimizer steps, :meth:`step`) or
            ``"epoch"`` (count epochs, :meth:`epoch_end`) (default: ``"step"``)
        params (optional): the parameters whose Hessian is measured (as in
            :mod:`torchsam.sharpness`; default: all that require a gradient)
        tol (float, optional): the eigenvalue's relative residual tolerance: a converged
            value is within ``tol`` times its size of an eigenvalue of the Hessian, the top one
            unless the start vector missed its direction (default: 3e-2, looser than the
            instrument's 1e-3 to keep a measurement to a few products; where the top
            eigenvalue is well apart from the next, the error is far smaller, as it shrinks
            with the square of the residual)
        max_iter (int, optional): at most this many Hessian-vector products for the
            eigenvalue (default: 20)
        trace_samples (int, optional): also estimate the trace with this many Rademacher
            vectors, at least 2 (default: None, no trace)
        sam_rho (float, optional): also measure SAM sharpness with this radius (default:
            None, no SAM sharpness)
        batch_norm (str, optional): ``"eval"`` (running statistics) or ``"train"`` (batch
            statistics, running statistics untouched) (default: ``"eval"``)
        keep_graphs (bool, optional): keep the probe's gradient graphs between products of one
            measurement (default: True)
        generator (torch.Generator, optional): the source of every random vector (default:
            a new CPU generator seeded with 0; never the global RNG)
        writer (optional): a ``torch.utils.tensorboard.SummaryWriter``, or any object with
            ``add_scalar(tag, value, global_step)``; each measurement is written to it under
            ``tag`` (default: None)
        tag (str, optional): the prefix of the scalars' names: ``{tag}/top_eigenvalue``,
            ``{tag}/trace``, ``{tag}/sam_sharpness`` (default: ``"sharpness"``)

    Example:
        >>> monitor = torchsam.SharpnessMonitor(model, loss_fn, probe, every=50)
        >>> for inputs, targets in loader:
        >>>     loss_fn(model(inputs), targets).backward()
        >>>     optimizer.step()
        >>>     optimizer.zero_grad()
        >>>     monitor.step()
        >>> monitor.to_csv("sharpness.csv")

    Note:
        Call :meth:`step` after the optimizer's step, not between a forward pass and its
        backward pass: SAM sharpness moves the weights in place and back, which autograd
        would see in a graph still waiting for its backward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        probe: Data,
        *,
        every: int = 100,
        unit: str = "step",
        params: ParamSpec = None,
        tol: float = 3e-2,
        max_iter: int = 20,
        trace_samples: int | None = None,
        sam_rho: float | None = None,
        batch_norm: str = "eval",
        keep_graphs: bool = True,
        generator: torch.Generator | None = None,
        writer: Any = None,
        tag: str = "sharpness",
    ) -> None:
        _check_model(model, loss_fn)
        self.every = _check_count("every", every, 1)
        if unit not in _UNITS:
            raise ValueError(f'unit must be "step" or "epoch", got {unit!r}')
        self.max_iter = _check_count("max_iter", max_iter, 1)
        _check_measures(tol, trace_samples, sam_rho, batch_norm)
        _check_writer(writer, tag)
        select_params(model, params)  # refuse a bad selection now, not at the first measurement
        self.model = model
        self.loss_fn = loss_fn
        self.probe = fixed_batches(probe)
        if not self.probe:
            raise ValueError("probe yielded no batch: give at least one (inputs, targets) batch")
        self.unit = unit
        self.params = params
        self.tol = float(tol)
        self.trace_samples = trace_samples
        self.sam_rho = None if sam_rho is None else float(sam_rho)
        self.batch_norm = batch_norm
        self.keep_graphs = keep_graphs
        self.generator = random_generator(generator)
        self.writer = writer
        self.tag = tag
        self.steps = 0
        self.epochs = 0
        self.records: list[SharpnessRecord] = []
        self._vector: list[Tensor] | None = None
        self._measured_at: int | None = None  # the count of `unit` at the last measurement

    # ------------------------------------------------------------------ the schedule
    def step(self, step: int | None = None) -> SharpnessRecord | None:
        """Count an optimizer step; measure when ``unit="step"`` and the count is due.

        Call it once after each optimizer step. ``step`` sets the count instead (the optimizer
        steps taken so far, such as a trainer's global step): a count that is due is
        measured once, however often it is reported.

        Returns:
            SharpnessRecord | None: the measurement, when one was taken.
        """
        return self._advance("step", step)

    def epoch_end(self, epoch: int | None = None) -> SharpnessRecord | None:
        """Count an epoch; measure when ``unit="epoch"`` and the count is due.

        Call it once at the end of each epoch; ``epoch`` sets the count of epochs completed
        instead.

        Returns:
            SharpnessRecord | None: the measurement, when one was taken.
        """
        return self._advance("epoch", epoch)

    def due(self, count: int) -> bool:
        """Whether reporting ``count`` (steps, or epochs with ``unit="epoch"``) would measure:
        a positive multiple of ``every`` not measured yet. A loop that wants to time the
        measurements apart asks this first."""
        return count > 0 and count % self.every == 0 and count != self._measured_at

    def _advance(self, unit: str, count: int | None) -> SharpnessRecord | None:
        """Count one ``unit`` (or set its count); measure when ``unit`` is the schedule's and
        the count is a multiple of ``every`` not measured yet."""
        name = "steps" if unit == "step" else "epochs"
        now = getattr(self, name) + 1 if count is None else _check_count(unit, count, 0)
        setattr(self, name, now)
        return self.measure() if unit == self.unit and self.due(now) else None

    def _count(self) -> int:
        return self.steps if self.unit == "step" else self.epochs

    # ------------------------------------------------------------------ measuring
    def measure(self) -> SharpnessRecord:
        """Measure now, whatever the schedule, and record it.

        Returns:
            SharpnessRecord: the measurement (also appended to :attr:`records` and written to
            the writer).
        """
        devices = {p.device for p in self.model.parameters()}
        _synchronize(devices)  # the training's queued work is not the measurement's
        began = time.perf_counter()
        with torch.enable_grad():
            top = sharpness.hessian_eigenvalues(
                self.model,
                self.loss_fn,
                self.probe,
                k=1,
                params=self.params,
                tol=self.tol,
                max_iter=self.max_iter,
                batch_norm=self.batch_norm,
                keep_graphs=self.keep_graphs,
                return_eigenvectors=True,
                generator=self.generator,
                start="gradient" if self._vector is None else self._vector,
            )
            value = float(top[0])
            vectors = top.eigenvectors
            self._vector = vectors[0] if vectors is not None and math.isfinite(value) else None
            trace = stderr = None
            if self.trace_samples is not None:
                estimate = sharpness.hessian_trace(
                    self.model,
                    self.loss_fn,
                    self.probe,
                    samples=self.trace_samples,
                    params=self.params,
                    batch_norm=self.batch_norm,
                    keep_graphs=self.keep_graphs,
                    generator=self.generator,
                )
                trace, stderr = float(estimate), estimate.stderr
            sam = None
            if self.sam_rho is not None:
                sam = sharpness.sam_sharpness(
                    self.model,
                    self.loss_fn,
                    self.probe,
                    rho=self.sam_rho,
                    params=self.params,
                    batch_norm=self.batch_norm,
                )
        _synchronize(devices)
        seconds = time.perf_counter() - began
        record = SharpnessRecord(
            step=self.steps,
            epoch=self.epochs,
            top_eigenvalue=value,
            converged=top.converged,
            products=top.products,
            trace=trace,
            trace_stderr=stderr,
            sam_sharpness=sam,
            seconds=seconds,
        )
        self.records.append(record)
        self._measured_at = self._count()
        if self.writer is not None:
            self._write(record)
        return record

    def _write(self, record: SharpnessRecord) -> None:
        at = self._count()
        scalars = {
            "top_eigenvalue": record.top_eigenvalue,
            "trace": record.trace,
            "sam_sharpness": record.sam_sharpness,
        }
        for name, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(f"{self.tag}/{name}", value, at)

    # ------------------------------------------------------------------ output
    def to_csv(self, path: str | Path) -> Path:
        """Write :attr:`records` to a CSV file, one row per measurement, a header of the
        :class:`SharpnessRecord` field names; a measure not asked for is an empty cell.

        Returns:
            Path: the file written.
        """
        path = Path(path)
        names = [field.name for field in dataclasses.fields(SharpnessRecord)]
        with path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(names)
            for record in self.records:
                row = dataclasses.astuple(record)
                out.writerow(["" if value is None else value for value in row])
        return path

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The monitor's progress, to save beside the model's checkpoint: the step and epoch
        counts, the records, the eigenvector of the last measurement (the next warm start) and
        the generator's state. The model, probe and options are not in it: build the monitor
        as before, then :meth:`load_state_dict`."""
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "measured_at": self._measured_at,
            "records": [dataclasses.asdict(r) for r in self.records],
            "vector": None if self._vector is None else [t.clone() for t in self._vector],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next measurement is the one the saved
        monitor would have taken, warm start included."""
        keys = {"steps", "epochs", "measured_at", "records", "vector", "generator"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"not a SharpnessMonitor state_dict: expected the keys {sorted(keys)}")
        vector = state["vector"]
        if vector is not None:
            params = select_params(self.model, self.params)
            if [tuple(t.shape) for t in vector] != [tuple(p.shape) for p in params]:
                raise ValueError(
                    "the saved eigenvector does not fit the parameters measured: the state "
                    "is of a monitor of another model or another params selection"
                )
            vector = [t.to(p.device, p.dtype) for t, p in zip(vector, params, strict=True)]
        self.steps = int(state["steps"])
        self.epochs = int(state["epochs"])
        self._measured_at = state["measured_at"]
        self.records = [SharpnessRecord(**r) for r in state["records"]]
        self._vector = vector
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ integrations
    def lightning_callback(self) -> Any:
        """A PyTorch Lightning callback that drives this monitor (needs ``lightning``).

        It calls :meth:`step` with the trainer's global step after each training batch (so
        with gradient accumulation a step is an optimizer step) and :meth:`epoch_end` after
        each training epoch.

        Example:
            >>> trainer = lightning.Trainer(callbacks=[monitor.lightning_callback()])
        """
        from torchsam._monitor_lightning import MonitorCallback

        return MonitorCallback(self)

    def trainer_callback(self) -> Any:
        """A Hugging Face ``TrainerCallback`` that drives this monitor (needs
        ``transformers``).

        It calls :meth:`step` with ``state.global_step`` at the end of each optimizer step and
        :meth:`epoch_end` at the end of each epoch.

        Example:
            >>> trainer = transformers.Trainer(..., callbacks=[monitor.trainer_callback()])
        """
        from torchsam._monitor_huggingface import MonitorTrainerCallback

        return MonitorTrainerCallback(self)
