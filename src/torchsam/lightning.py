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

This module is the only part of torchsam that imports Lightning; ``import torchsam`` does not.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'torchsam.lightning needs PyTorch Lightning: pip install "torchsam[lightning]" '
        "(or pip install lightning)"
    ) from error

from torchsam._engine import SharpnessAwareOptimizer

__all__ = ["SharpnessAwareCheck", "check_trainer"]


class SharpnessAwareCheck(pl.Callback):
    """Refuse, when ``fit`` starts, Lightning settings that cannot train a torchsam optimizer.

    Add it to the trainer's callbacks; it changes nothing in training and checks only when
    one of the optimizers returned by ``configure_optimizers`` is a torchsam optimizer.

    Example:
        >>> trainer = lightning.Trainer(callbacks=[torchsam.lightning.SharpnessAwareCheck()])

    See :func:`check_trainer` for the checks.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainer(trainer)


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
            "(see the README, 'PyTorch Lightning')."
        )
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"{name} cannot run with the precision plugin "
            f"{type(trainer.precision_plugin).__name__} and its gradient scaler "
            "(precision='16-mixed'): the plugin runs the closure once and then calls "
            "optimizer.step() without it, so there is no second pass. Use precision="
            "'bf16-mixed' (or 32); float16 with a GradScaler needs the two-call recipe of the "
            "README's 'Mixed precision' section in a plain training loop."
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
