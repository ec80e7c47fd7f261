"""SAM and its variants in PyTorch Lightning (``pip install "torchsam[lightning]"``).

Nothing is needed to train with a torchsam optimizer in Lightning's automatic optimisation:
return it from ``configure_optimizers``. Lightning's default precision plugin calls
``optimizer.step(closure)`` with a closure that runs ``training_step``, ``backward`` and
gradient clipping, and the optimizer evaluates that closure at ``w`` and at ``w + e(w)``.

A few Lightning settings cannot give a sharpness-aware step. :class:`SharpnessAwareCheck`, a
callback, refuses them when ``fit`` starts, with an error that says what to do instead:

* ``accumulate_grad_batches > 1`` in automatic optimisation: Lightning runs the closure of the
  earlier micro-batches itself, outside ``step``, so the second pass (at ``w + e(w)``) would see
  only the last micro-batch;
* a precision plugin with a ``GradScaler`` (``precision="16-mixed"`` on a GPU): it runs the
  closure once and then calls ``optimizer.step()`` without it, so there is no second pass;
* DeepSpeed, which steps its own copy of the optimizer;
* ``FSDPStrategy`` (``FullyShardedDataParallel``), whose shards would each be perturbed with
  their own gradient norm.

Without the callback the first two still raise, from the optimizer's first step, with messages
that do not mention Lightning.

Under ``strategy="ddp"`` both passes of a step are all-reduced, and the weights equal one
process on the whole batch. :class:`LocalPerturbation`, another callback, perturbs each process
with its own gradient instead (as :func:`torchsam.distributed.sam_pass` with ``local=True``):
one gradient all-reduce per step instead of two, and, as there, a gradient that is not finite
on one process makes every process skip the step.

This module is the only part of torchsam that imports Lightning; ``import torchsam`` does not.
"""

from __future__ import annotations

from typing import Any

from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
except ImportError as error:
    raise ImportError(
        'torchsam.lightning needs PyTorch Lightning: pip install "torchsam[lightning]" '
        "(or pip install lightning)"
    ) from error

from torchsam._engine import SharpnessAwareOptimizer
from torchsam.distributed import _spread_non_finite

__all__ = ["LocalPerturbation", "SharpnessAwareCheck", "check_trainer"]


class SharpnessAwareCheck(pl.Callback):
    """Refuse, when ``fit`` starts, Lightning settings that cannot train a torchsam optimizer.

    Add it to the trainer's callbacks; it changes nothing in training and checks only when
    one of the optimizers returned by ``configure_optimizers`` is a torchsam optimizer. It
    checks again before each training batch, where ``GradientAccumulationScheduler`` may have
    changed ``accumulate_grad_batches``.

    Example:
        >>> trainer = lightning.Trainer(callbacks=[torchsam.lightning.SharpnessAwareCheck()])

    See :func:`check_trainer` for the checks.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainer(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # GradientAccumulationScheduler changes accumulate_grad_batches when an epoch starts
        check_trainer(trainer)


class LocalPerturbation(pl.Callback):
    """Under ``strategy="ddp"``, perturb each process with its own gradient (m-sharpness).

    On a step with a second pass, the first pass (forward and backward, at ``w``) runs without
    gradient all-reduce, as inside ``DistributedDataParallel.no_sync()``; the second pass (at
    ``w + e``) is all-reduced, so the base optimizer steps with the averaged gradient at the
    perturbed points and the processes stay identical. A step costs one all-reduce instead of
    two. A step without second pass (:class:`torchsam.IntermittentSAM`) is all-reduced, since
    its one gradient is the one the base optimizer uses. For automatic and manual optimisation
    with ``optimizer.step(closure)``; the same rules as
    :func:`torchsam.distributed.sam_pass` with ``local=True``.

    It switches DDP's ``require_backward_grad_sync`` off when a training batch starts and on
    again in ``on_before_optimizer_step``, which Lightning calls after each evaluation of the
    closure (before gradient clipping). There, after a local first pass, it tells every
    process of a gradient that is not finite on any of them, as ``sam_pass`` does (one
    all-reduce of a 4-byte flag): every process's gradients become NaN, so every process
    skips the step (with the optimizer's warning) and the weights stay identical.

    Example:
        >>> trainer = lightning.Trainer(strategy="ddp", callbacks=[LocalPerturbation()])

    Raises:
        ValueError: when ``fit`` starts, without ``strategy="ddp"``, without exactly one
            torchsam optimizer, or with a variant whose final gradient uses the gradient at
            ``w`` (GSAM, WSAM, LookSAM), which would then differ between processes.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ddp_and_optimizer(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        model, optimizer = self._ddp_and_optimizer(trainer)
        model.require_backward_grad_sync = not optimizer.second_pass_due()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        model, sharpness_aware = self._ddp_and_optimizer(trainer)
        if not model.require_backward_grad_sync:  # after the local first pass of a step
            model.require_backward_grad_sync = True
            _spread_non_finite(model, sharpness_aware)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._sync(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._sync(trainer)

    @staticmethod
    def _sync(trainer: pl.Trainer) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.require_backward_grad_sync = True

    @staticmethod
    def _ddp_and_optimizer(
        trainer: pl.Trainer,
    ) -> tuple[DistributedDataParallel, SharpnessAwareOptimizer]:
        found = [o for o in map(_unwrap, trainer.optimizers) if o is not None]
        if len(found) != 1:
            raise ValueError(
                "LocalPerturbation needs exactly one torchsam optimizer; configure_optimizers "
                f"returned {len(found)}"
            )
        optimizer = found[0]
        name = type(optimizer).__name__
        if optimizer.needs_first_grads:
            raise ValueError(
                f"LocalPerturbation cannot be used with {name}: its final gradient uses the "
                "gradient at w too, which would differ between processes; leave both passes "
                "all-reduced (remove the callback)"
            )
        if optimizer.no_two_call_style is not None:
            raise ValueError(
                f"LocalPerturbation does not support {name}: {optimizer.no_two_call_style}"
            )
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                "LocalPerturbation needs strategy='ddp' (the model wrapped in "
                f"DistributedDataParallel); the strategy is {type(trainer.strategy).__name__}"
            )
        return model, optimizer


def check_trainer(trainer: pl.Trainer) -> None:
    """Raise if ``trainer`` would drive one of its torchsam optimizers wrongly.

    Call it once the optimizers exist (from ``on_fit_start`` on; :class:`SharpnessAwareCheck`
    does that).

    Raises:
        ValueError: ``accumulate_grad_batches > 1`` with automatic optimisation; a precision
            plugin with a gradient scaler (``precision="16-mixed"``); the DeepSpeed strategy;
            ``FSDPStrategy``.
    """
    sharpness_aware = [o for o in trainer.optimizers if _unwrap(o) is not None]
    if not sharpness_aware:
        return
    name = type(_unwrap(sharpness_aware[0])).__name__
    module = trainer.lightning_module
    if module.automatic_optimization and trainer.accumulate_grad_batches > 1:
        raise ValueError(
            f"{name} cannot run with Trainer(accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}) in automatic optimisation: Lightning runs the "
            "earlier micro-batches outside optimizer.step(closure), so the second pass at the "
            "perturbed weights would see only the last micro-batch. Remove "
            "accumulate_grad_batches and accumulate inside the closure instead: load the whole "
            "batch and split it into micro-batches in training_step with manual optimisation "
            "(see docs/integrations/lightning.md, 'Gradient accumulation')."
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"{name} cannot run with the precision plugin "
            f"{type(trainer.precision_plugin).__name__} and its gradient scaler "
            "(precision='16-mixed'): the plugin runs the closure once and then calls "
            "optimizer.step() without it, so there is no second pass. Use precision="
            "'bf16-mixed' (or 32); float16 with a GradScaler needs the two-call recipe of the "
            "docs/guide/mixed-precision.md in a plain training loop."
        )
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise ValueError(
            f"{name} cannot run under the DeepSpeed strategy, which steps its own copy of the "
            "optimizer; use strategy='ddp' (or a single device)."
        )
    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            f"{name} cannot run under FSDPStrategy (FullyShardedDataParallel): each process "
            "holds a shard of the parameters, so the gradient norm of the perturbation would be "
            "the shard's, not the model's; use strategy='ddp'."
        )


def _unwrap(optimizer: Any) -> SharpnessAwareOptimizer | None:
    """The torchsam optimizer behind ``optimizer`` (a ``LightningOptimizer`` or not), or None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, Optimizer) and isinstance(inner, SharpnessAwareOptimizer):
        return inner
    return None
