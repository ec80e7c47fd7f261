"""The end of a step: the finiteness decision, the variant's base gradient, the base step.

:func:`finish` runs after the weights are back at ``w`` and the call protocol was checked. It
flags non-finite gradients on the device (from the gradient norm where the variant computes it
anyway), reads the flags once (the step's one host synchronisation), and on finite gradients
commits the variant's deferred state, lets it form the base gradient, steps the base optimizer
and calls ``after_base_step``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torchsam._engine import _construct, _guard
from torchsam._engine._contract import StepContext
from torchsam._engine._guard import NonFiniteGuard, Status

if TYPE_CHECKING:
    from torchsam._engine._optimizer import SharpnessAwareOptimizer

__all__ = ["check_scaler", "device_skip", "finish"]


def check_scaler(name: str, ctx: StepContext, grad_scaler: Any) -> None:
    """Raise ``ValueError`` if ``second_step``'s scaler cannot finish the step ``first_step``
    began: a different one than ``first_step`` got, or one ``first_step`` did not get on a
    step without second pass (whose gradients only ``first_step`` unscales)."""
    if grad_scaler is not ctx.grad_scaler and (ctx.grad_scaler is not None or not ctx.two_pass):
        raise ValueError(_guard.scaler_mismatch_message(name, ctx.two_pass))


def finish(
    optimizer: SharpnessAwareOptimizer, ctx: StepContext, guard: NonFiniteGuard, grad_scaler: Any
) -> None:
    """Check the gradients of the step, let the variant shape them, take the base step."""
    name = type(optimizer).__name__
    for late in guard.late_statuses():
        if late is not Status.FINITE:
            warnings.warn(late.message(name) + _LATE, RuntimeWarning, stacklevel=4)
    if grad_scaler is not None and ctx.two_pass:
        grad_scaler.unscale_(optimizer.base_optimizer)  # true gradients; overflow recorded
    # the check runs with a GradScaler even when skip_nonfinite is False: skipping an
    # overflowing step is what the scaler relies on
    checking = grad_scaler is not None or optimizer.skip_nonfinite
    if optimizer.uses_grad_norm(ctx.two_pass):
        if checking:  # a finite norm means finite gradients: one pass gives both
            guard.flag_norm(ctx.grad_norm())
        else:
            ctx.grad_norm()
    elif checking:
        guard.flag_grads(ctx.views)
    found_inf = None
    if guard.armed and grad_scaler is None and device_skip(optimizer, ctx, guard):
        found_inf = guard.decide_on_device()  # no synchronisation: the base step skips
    elif guard.armed:
        status = guard.read()  # the step's one host synchronisation
        if status is not Status.FINITE:
            if grad_scaler is None:  # with a scaler, skipping on overflow is routine
                warnings.warn(status.message(name), RuntimeWarning, stacklevel=4)
            return
    ctx.commit()
    optimizer.base_gradient(ctx)
    _construct.step_with(optimizer.base_optimizer, ctx.views, found_inf)
    optimizer.after_base_step(ctx)


_LATE = (
    " (This was a previous step: with a fused base optimizer the skip is decided on the "
    "device and reported once the flag has reached the host.)"
)


def device_skip(
    optimizer: SharpnessAwareOptimizer, ctx: StepContext, guard: NonFiniteGuard
) -> bool:
    """Whether this step's skip can stay on the device: the variant declares
    ``device_skip`` (the base step is all its step changes), the base optimizer takes
    ``found_inf`` (torch's fused optimizers), the flags are on one device, and every parameter
    already has base-optimizer state. The last is decided on the host: torch's fused SGD
    with momentum leaves its momentum buffers uninitialised when it skips its very first
    step, so the first step of any parameter (and a base without per-parameter state, such
    as SGD without momentum) keeps the host decision."""
    base = optimizer.base_optimizer
    if not (type(optimizer).device_skip and guard.on_one_device):
        return False
    if not _construct.takes_found_inf(base):
        return False
    state = base.state
    return all(state.get(p) for v in ctx.views for p in v.params)
