"""Sharpness-aware training with the Hugging Face ``transformers`` :class:`~transformers.Trainer`.

:class:`SAMTrainer` is a drop-in ``Trainer`` whose every optimisation step is a sharpness-aware
step of a torchsam optimizer::

    first pass at w (all micro-batches)  ->  first_step()  ->  second pass at w + e
    (all micro-batches)  ->  [Trainer: clip max_grad_norm]  ->  [Trainer: optimizer.step()]
    ->  second_step(): back to w, base optimizer step  ->  [Trainer: LR scheduler step]

Only this module imports ``transformers`` (install the ``hf`` extra:
``pip install "torchsam[hf]"``); nothing else in torchsam imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

try:
    import transformers
    from accelerate.utils import DistributedType
except ImportError as error:
    raise ImportError(
        "torchsam.huggingface needs transformers and accelerate: pip install 'torchsam[hf]'"
    ) from error
import torch
from packaging.version import Version
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsam._batchnorm import freeze_running_stats
from torchsam._engine import SharpnessAwareOptimizer
from torchsam._sam import SAM

__all__ = ["SAMTrainer"]

#: the oldest transformers release SAMTrainer is tested with (as the ``hf`` extra requires)
MIN_TRANSFORMERS = "4.48"


class SAMTrainer(transformers.Trainer):
    """A :class:`transformers.Trainer` that trains with a torchsam optimizer.

    Each optimisation step runs the first forward/backward pass over every micro-batch of the
    step (``gradient_accumulation_steps`` of them) at ``w``, calls ``first_step()``, runs the
    second pass over the same micro-batches at ``w + e``, and lets the Trainer do the rest as
    usual: clip the gradient to ``max_grad_norm`` (so only the second, final gradient is
    clipped), call ``optimizer.step()`` (which here runs ``second_step()``: back to ``w``, base
    optimizer step), step the LR scheduler and clear the gradients. With gradient accumulation
    the perturbation uses the gradient of the whole accumulated batch; the inputs of the step's
    micro-batches are kept until its second pass (the Trainer already holds them all).

    On the steps where a variant takes no second pass (LookSAM between its sharpness steps,
    IntermittentSAM), the first gradients are clipped and used. The loss the Trainer logs is the
    loss at ``w``. The second pass runs with BatchNorm running statistics frozen
    (:func:`torchsam.freeze_running_stats`), so every batch is counted once.

    The optimizer, three ways:

    * nothing: a ``sam_optimizer`` (default :class:`torchsam.SAM`) wrapped around the base
      optimizer that the ``TrainingArguments`` select (``optim``, ``learning_rate``,
      ``weight_decay`` with the Trainer's no-decay groups for biases and norms, Adam's betas
      and epsilon), with the extra arguments ``sam_kwargs`` (e.g. ``{"rho": 0.1}``);
    * ``optimizer_cls_and_kwargs=(torchsam.SAM, {"base_optimizer": torch.optim.SGD,
      "rho": 0.05, "lr": 0.1})``: built by the Trainer on its param groups;
    * ``optimizers=(optimizer, scheduler)``: an optimizer you built (its scheduler may be
      ``None``, then the Trainer builds one from the arguments).

    Whichever way, it must be a torchsam sharpness-aware optimizer with two calls per step
    (not ESAM or MSAM, which have ``step(closure)`` only): anything else raises a
    ``TypeError``.

    Not supported (a ``ValueError`` when the trainer is built): float16 mixed precision with a
    gradient scaler (``fp16=True``; ``bf16=True`` works) and DeepSpeed, which steps the
    optimizer itself.

    Args:
        *args: passed to :class:`transformers.Trainer`
        sam_optimizer (callable, optional): how to build the optimizer when neither
            ``optimizers`` nor ``optimizer_cls_and_kwargs`` gives one: called as
            ``sam_optimizer(param_groups, base_optimizer_class, **base_kwargs, **sam_kwargs)``
            (default: :class:`torchsam.SAM`)
        sam_kwargs (dict, optional): the torchsam optimizer's own arguments in that case, e.g.
            ``{"rho": 0.1}`` or ``{"k": 5}`` for LookSAM (default: none)
        **kwargs: passed to :class:`transformers.Trainer`

    Example::

        trainer = SAMTrainer(
            model=model,
            args=TrainingArguments("out", learning_rate=1e-3, max_grad_norm=1.0),
            train_dataset=train_dataset,
            sam_kwargs={"rho": 0.05},
        )
        trainer.train()
    """

    def __init__(
        self,
        *args: Any,
        sam_optimizer: Callable[..., Optimizer] = SAM,
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
            raise RuntimeError(
                f"SAMTrainer needs transformers>={MIN_TRANSFORMERS} (its accumulation loop and "
                f"optimizer hooks); found {transformers.__version__}: pip install 'torchsam[hf]'"
            )
        super().__init__(*args, **kwargs)
        given = self.optimizer is not None or self.optimizer_cls_and_kwargs is not None
        if given and (sam_kwargs or sam_optimizer is not SAM):
            raise ValueError(
                "SAMTrainer got sam_optimizer/sam_kwargs together with optimizers= or "
                "optimizer_cls_and_kwargs=; they only say how to build the optimizer when none "
                "is given: set rho and the other options on the optimizer you pass instead"
            )
        self.sam_optimizer = sam_optimizer
        self.sam_kwargs = dict(sam_kwargs or {})
        _check_supported(self.accelerator)
        self._sam: SharpnessAwareOptimizer | None = None
        # the current step's micro-batches, kept for its second pass: (inputs, num_items_in_batch)
        self._sam_window: list[tuple[dict[str, Any], Any]] = []
        if self.optimizer is not None:
            self.optimizer = self._wrap(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """Build the torchsam optimizer (see the class docstring) and adapt it to the Trainer."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            opt_model: Any = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {
                    "params": [p for n, p in named if n in decay],
                    "weight_decay": self.args.weight_decay,
                },
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = self.sam_optimizer(
                groups, base_cls, **{**base_kwargs, **self.sam_kwargs}
            )
        elif model is None:  # transformers < 5 takes no model here
            super().create_optimizer()
        else:
            super().create_optimizer(model)
        self.optimizer = self._wrap(self.optimizer)
        return self.optimizer

    def _wrap(self, optimizer: Any) -> Optimizer:
        if isinstance(optimizer, _SecondStepOnStep):
            return optimizer
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            raise TypeError(
                "SAMTrainer needs a torchsam sharpness-aware optimizer (torchsam.SAM, "
                f"torchsam.LookSAM, ...), got {type(optimizer).__name__}; pass one through "
                "optimizers=(optimizer, scheduler) or optimizer_cls_and_kwargs, or use "
                "transformers.Trainer for a plain optimizer"
            )
        if optimizer.no_two_call_style is not None:
            raise TypeError(
                f"SAMTrainer cannot drive {type(optimizer).__name__}: {optimizer.no_two_call_style}"
            )
        self._sam = optimizer
        return _SecondStepOnStep(optimizer)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """The first pass on this micro-batch; on the last micro-batch of an optimisation step,
        also ``first_step()`` and the second pass on all of the step's micro-batches.

        Returns the loss at ``w`` (what the Trainer logs)."""
        sam = self._sam
        if sam is None:
            raise RuntimeError(
                "SAMTrainer.training_step() ran before the optimizer was created; call train()"
            )
        # compute_loss may pop from the inputs (labels, with a label smoother): keep a copy
        self._sam_window.append((dict(inputs), num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients:
            return loss
        window, self._sam_window = self._sam_window, []
        expected = getattr(self, "current_gradient_accumulation_steps", len(window))
        if len(window) != expected:
            raise RuntimeError(
                f"SAMTrainer saw {len(window)} micro-batches in an optimisation step of "
                f"{expected}: the Trainer's accumulation loop is not the one SAMTrainer was "
                "written for"
            )
        if sam.first_step(zero_grad=True):
            try:
                with freeze_running_stats(model):
                    for i, (micro_inputs, items) in enumerate(window):
                        last = i == len(window) - 1
                        # all-reduce once per pass under DDP, as the Trainer does for the first
                        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                        with sync:
                            super().training_step(model, micro_inputs, items)
            except BaseException:
                with torch.no_grad():
                    sam.abort()  # weights back at w, as step(closure) does, then re-raise
                raise
        return loss


def _check_supported(accelerator: Any) -> None:
    """Refuse what the Trainer's ``optimizer.step()`` cannot do with two passes."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "SAMTrainer does not support DeepSpeed, which runs the optimizer step itself and "
            "leaves no place for the second pass; train without a DeepSpeed config"
        )
    if getattr(accelerator, "scaler", None) is not None:
        raise ValueError(
            "SAMTrainer does not support float16 mixed precision with a gradient scaler "
            "(fp16=True on a GPU): the two passes need the scaler around first_step() and "
            "second_step(), which the Trainer's optimizer step does not offer. Use bf16=True, "
            "or the two-call recipe of docs/guide/mixed-precision.md in your own loop"
        )


class _SecondStepOnStep(Optimizer):
    """What the Trainer sees as its optimizer: ``step()`` finishes the torchsam step.

    The Trainer calls ``optimizer.step()`` without a closure after clipping; a torchsam optimizer
    wants ``second_step()`` there. Everything else (param groups, state, ``state_dict``,
    ``zero_grad``) is the torchsam optimizer's own, so LR schedulers built on either act on the
    same groups and checkpoints hold the torchsam state dict unchanged.
    """

    def __init__(self, sam: SharpnessAwareOptimizer) -> None:
        # torch.optim.Optimizer.__init__ is not called: nothing here is this object's own.
        self.sam = sam

    # Properties, not copies: load_state_dict() may rebind the torchsam optimizer's attributes.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.sam.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.sam.param_groups = value

    @property
    def state(self) -> Any:
        return self.sam.state

    @state.setter
    def state(self, value: Any) -> None:
        self.sam.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.sam.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.sam.defaults = value

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is not None:
            return self.sam.step(closure)
        self.sam.second_step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sam.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.sam.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sam.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.sam.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sam!r})"
