"""The SAM family registered as methods of the experiments (see :mod:`torchsam.experiments.train`).

Importing this module (``torchsam.experiments`` does) adds every torchsam optimizer and loss
term to :data:`~torchsam.experiments.train.METHODS`, in the order the benchmark reports them.
Defaults are the classes' own (LookSAM's ``alpha``, ESAM's ``beta`` and ``gamma`` included),
except where noted for this small task.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import torchsam
from torchsam.experiments.train import (
    Batch,
    StepFn,
    TrainContext,
    _sgd,
    closure_step,
    register_method,
    sharpness_aware,
)

__all__: list[str] = []


def _per_sample_step(context: TrainContext) -> StepFn:
    """ESAM and MSAM: the closure takes batch rows and returns per-sample losses.

    MSAM hands the rows of each micro-batch as CPU indices; they are copied to the batch's
    device once per call without waiting (:func:`_rows_on`), where indexing a GPU batch with
    them would copy them once per tensor and wait each time. ESAM's rows (from ``topk`` of
    the losses) are on the batch's device already."""
    model, optimizer, per_sample = context.model, context.optimizer, context.per_sample_loss_fn

    def step(batch: Batch) -> Tensor:
        def closure(rows: Tensor | None) -> Tensor:
            perturbed = bool(getattr(optimizer, "perturbed", False))
            with torchsam.freeze_running_stats(model, enabled=perturbed):
                if rows is None:
                    return per_sample(model(batch.x), batch.y)
                rows = _rows_on(rows, batch.x.device)
                return per_sample(model(batch.x[rows]), batch.y[rows])

        if isinstance(optimizer, torchsam.MSAM):
            return optimizer.step(closure, batch_size=len(batch.x)).detach()
        if isinstance(optimizer, torchsam.ESAM):
            return optimizer.step(closure).detach()
        raise TypeError(f"per-sample closures need ESAM or MSAM, got {type(optimizer).__name__}")

    return step


def _rows_on(rows: Tensor, device: torch.device) -> Tensor:
    """``rows`` on ``device``, copied without a synchronisation: from pinned host memory
    without waiting when they are on the CPU and ``device`` is a GPU (the kernels that index
    with them run after the copy, in stream order)."""
    if rows.device == device:
        return rows
    if rows.device.type == "cpu" and device.type == "cuda":
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)


def _momentum_sam_step(context: TrainContext) -> StepFn:
    """MomentumSAM: the standard closure step in the optimizer's training mode, and
    ``optimizer.eval()`` after the last step of each epoch, so that the model is evaluated
    (after the epoch, after training) at the unperturbed weights ``w``; the next step returns to
    training mode first."""
    optimizer = context.optimizer
    if not isinstance(optimizer, torchsam.MomentumSAM):
        raise TypeError(f"momentumsam needs a MomentumSAM, got {type(optimizer).__name__}")
    inner = closure_step(context)

    def step(batch: Batch) -> Tensor:
        optimizer.train()
        loss = inner(batch)
        if (batch.step + 1) % context.steps_per_epoch == 0:
            optimizer.eval()
        return loss

    return step


def _saf_step(context: TrainContext, **options: Any) -> StepFn:
    """SGD with SAF's trajectory term added to the loss: one forward/backward per step."""
    if context.world_size > 1:
        raise ValueError(
            "saf keeps each sample's past outputs in the process that saw it, and under "
            "torchrun a sample goes to another process in a later epoch; run saf in one process"
        )
    split = context.split
    saf = torchsam.SAF(len(split.x_train), split.num_classes, **options)
    return _with_term(context, lambda logits, batch: saf(logits, batch.index, batch.epoch))


def _mesa_step(context: TrainContext, **options: Any) -> StepFn:
    """SGD with MESA's term (an EMA model's outputs as the reference); EMA update each step."""
    mesa = torchsam.MESA(context.model, **options)
    return _with_term(
        context,
        lambda logits, batch: mesa(logits, batch.x, batch.epoch),
        after_step=lambda: mesa.update(context.model),
    )


def _with_term(context: TrainContext, term: Any, after_step: Any = None) -> StepFn:
    model, optimizer, loss_fn = context.model, context.optimizer, context.loss_fn

    def step(batch: Batch) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch.x)
        loss = loss_fn(logits, batch.y)
        (loss + term(logits, batch)).backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        return loss.detach()

    return step


# name, class, defaults, description: the two-pass family and the cheap variants, in the order
# of the benchmark's rows (after sgd and sam).
_FAMILY: tuple[tuple[str, type, dict[str, Any], str], ...] = (
    ("asam", torchsam.SAM, {"adaptive": True}, "adaptive SAM (Kwon et al. 2021)"),
    ("gsam", torchsam.GSAM, {"alpha": 0.2}, "GSAM (Zhuang et al. 2022), constant rho"),
    ("friendlysam", torchsam.FriendlySAM, {"sigma": 1.0, "lmbda": 0.9}, "Friendly SAM (2024)"),
    ("vasso", torchsam.VaSSO, {"theta": 0.9}, "VaSSO (Li & Giannakis 2023)"),
    ("wsam", torchsam.WSAM, {"gamma": 0.9}, "WSAM (Yue et al. 2023), decoupled"),
    ("msam", torchsam.MSAM, {"m": 16}, "m-sharpness, micro-batches of 16"),
    ("looksam", torchsam.LookSAM, {"k": 5}, "LookSAM (Liu et al. 2022), k=5"),
    ("periodic", torchsam.IntermittentSAM, {"every": 5}, "SAM every 5th step, else SGD"),
    ("randomsam", torchsam.IntermittentSAM, {"probability": 0.5}, "SAM with probability 0.5"),
    ("esam", torchsam.ESAM, {}, "ESAM (Du et al. 2022)"),
)
for _name, _cls, _defaults, _description in _FAMILY:
    register_method(
        _name,
        sharpness_aware(_cls),
        make_step=_per_sample_step if _cls in (torchsam.ESAM, torchsam.MSAM) else closure_step,
        defaults={"rho": 0.05, **_defaults},
        description=_description,
    )
register_method(
    "momentumsam",
    sharpness_aware(torchsam.MomentumSAM),
    make_step=_momentum_sam_step,
    # no "rho" here: its radius is not SAM's (about 10x larger), so ``--rho`` of ``torchsam
    # compare`` does not apply to it; it runs at the class default or ``momentumsam:rho=...``
    description="Momentum-SAM (Becker et al. 2024): one pass along the momentum, rho 0.5",
)
register_method(
    "saf",
    _sgd,
    make_step=_saf_step,
    defaults={"lam": 0.3, "tau": 5.0, "delay": 3, "start_epoch": 5},
    step_options=("lam", "tau", "delay", "start_epoch"),
    description="SGD + SAF trajectory loss (Du et al. 2022)",
)
register_method(
    "mesa",
    _sgd,
    make_step=_mesa_step,
    # decay 0.98 instead of the authors' 0.9998 (set for ImageNet-length runs): the EMA must
    # follow a run of a few hundred steps
    defaults={"lam": 0.8, "tau": 5.0, "decay": 0.98, "start_epoch": 5},
    step_options=("lam", "tau", "decay", "start_epoch"),
    description="SGD + MESA trajectory loss (Du et al. 2022), EMA decay 0.98",
)
