"""The non-finite guard: flags on the device during a step, one host read at its end.

Each check of a step writes a per-device flag without synchronising: the norm of
``first_step`` marks its flag with NaN (``0 * norm``) exactly when it is not finite, and the
later checks (the gradients at ``w + e``, or a norm derived from them) set another flag to 1.
``second_step`` reads them once (:meth:`NonFiniteGuard.read`) and gets a :class:`Status`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from torchsam._engine._layout import GroupView

__all__ = [
    "NonFiniteGuard",
    "Status",
    "flag_nonfinite",
    "flag_nonfinite_values",
    "grad_scaler_step_message",
    "scaler_mismatch_message",
]


class Status(enum.Enum):
    """What the guard found in the step it checked."""

    FINITE = "every gradient checked was finite"
    FIRST_NORM = "the gradient norm in first_step() was not finite"
    LATER = "a gradient checked in second_step() was not finite"

    def message(self, name: str) -> str:
        """The warning for a step skipped with this status."""
        if self is Status.FIRST_NORM:
            return (
                f"{name}: the gradient norm in first_step() was not finite (inf or NaN), so "
                "second_step() skipped the step: the weights are back at w and the base "
                "optimizer took no step. With float16 autocast this is expected while a "
                "GradScaler calibrates its scale."
            )
        return (
            f"{name}.second_step(): a gradient is not finite (inf or NaN); the base optimizer "
            "step was skipped and the weights are unchanged."
        )


#: at most this many steps decided on the device wait unread for their copy to the host
MOST_PENDING = 32


class NonFiniteGuard:
    """The flags of one optimizer, per device: ``(found, one, first)`` where ``found`` is set
    to 1 by a later check, ``one`` is the unscale factor of the fused check and ``first`` holds
    ``0 * norm`` of ``first_step``'s norm."""

    def __init__(self) -> None:
        self._flags: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._found_used = self._first_used = False
        #: the steps decided on the device whose flags were not read yet, oldest first: the
        #: flags copied to the host (and, on an accelerator, the event after which the copy is
        #: complete), read by later steps
        self._late: deque[tuple[Tensor, Any]] = deque()

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        entry = self._flags.get(device)
        if entry is None:
            # float32 whatever the default dtype: torch's fused optimizers read found_inf
            # (and the check its unscale factor) as float32
            entry = (
                torch.zeros((), dtype=torch.float32, device=device),
                torch.ones((), dtype=torch.float32, device=device),
                torch.zeros((), dtype=torch.float32, device=device),
            )
            self._flags[device] = entry
        return entry

    def entry(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The ``found`` flag on ``device`` and a 1 there (for the fused check)."""
        found, one, _ = self._on(device)
        self._found_used = True
        return found, one

    def flag_grads(self, views: list[GroupView]) -> None:
        """Record whether every gradient of ``views`` is finite (see :func:`flag_nonfinite`)."""
        flag_nonfinite(views, self.entry)

    def flag_first_norm(self, norm: Tensor) -> None:
        """Record whether ``first_step``'s norm is finite: ``first += 0 * norm``."""
        self._on(norm.device)[2].add_(norm, alpha=0.0)
        self._first_used = True

    def flag_norm(self, norm: Tensor) -> None:
        """Record whether a later norm is finite (a finite norm means finite gradients)."""
        flag_nonfinite_values([norm.reshape(1)], *self.entry(norm.device))

    @property
    def armed(self) -> bool:
        """Whether a check of this step wrote a flag (then :meth:`read` is due)."""
        return self._found_used or self._first_used

    def read(self) -> Status:
        """What the step's checks found; the flags are cleared. One host synchronisation (the
        flags of other devices are first added on the first's device)."""
        flags = self._used()
        total = flags[0]
        for other in flags[1:]:
            total = total + other.to(total.device)  # NaN (first_step's norm) wins over 1
        value = total.item()
        if value != 0.0:
            for flag in flags:
                flag.zero_()
        self._found_used = self._first_used = False
        if value == 0.0:
            return Status.FINITE
        return Status.FIRST_NORM if value != value else Status.LATER

    @property
    def on_one_device(self) -> bool:
        """Whether the flags live on one device (a device-side decision needs that)."""
        return len(self._flags) == 1

    def decide_on_device(self) -> Tensor:
        """The step's decision without reading it: a float32 1 where a check of this step
        found a non-finite value, else 0 (what a fused ``torch.optim`` step takes as
        ``found_inf``). The flags are cleared; their sum is copied to the host without waiting
        and :meth:`late_statuses` reads it at a later step."""
        flags = self._used()
        total = flags[0].clone()
        for other in flags[1:]:
            total.add_(other)  # NaN (first_step's norm) wins over 1
        skip = total.ne(0).to(total.dtype)
        self._late.append(self._copy_to_host(total))
        for flag in flags:
            flag.zero_()
        self._found_used = self._first_used = False
        return skip

    @staticmethod
    def _copy_to_host(total: Tensor) -> tuple[Tensor, Any]:
        """``total`` on the host, copied without waiting, and the event after which the copy
        is complete (None on the CPU: nothing to wait for)."""
        if total.device.type in ("cpu", "meta"):
            return total, None
        host = torch.empty((), dtype=total.dtype, pin_memory=True)
        host.copy_(total, non_blocking=True)
        # on the stream of the flag's own device (not the current device's, which may be
        # another GPU), after the copy; torch.accelerator is torch >= 2.6, torch.cuda (and
        # the other device modules) have current_stream(device) in 2.5 already
        accelerator = getattr(torch, "accelerator", None)
        module = accelerator if accelerator is not None else getattr(torch, total.device.type)
        return host, module.current_stream(total.device).record_event()

    def late_statuses(self) -> Iterator[Status]:
        """What earlier steps decided on the device found, oldest first, for each whose copy
        has arrived on the host; no synchronisation. Each is removed as it is yielded (a
        caller that stops early, or raises on one, leaves the rest for a later call). Those
        whose copy has not arrived stay for a later call (the host may run several steps
        ahead of the device), except that beyond :data:`MOST_PENDING` of them the oldest is
        waited for."""
        while self._late:
            host, event = self._late[0]
            if event is not None and not event.query():
                if len(self._late) <= MOST_PENDING:
                    return
                event.synchronize()
            self._late.popleft()
            value = host.tolist()  # a host tensor: no dispatch, no wait
            if value == 0.0:
                yield Status.FINITE
            else:
                yield Status.FIRST_NORM if value != value else Status.LATER

    def clear(self) -> None:
        """Forget what the unfinished step recorded (after an error or an abort)."""
        for flag in self._used():
            flag.zero_()
        self._found_used = self._first_used = False

    def _used(self) -> list[Tensor]:
        flags = []
        for found, _, first in self._flags.values():
            if self._first_used:
                flags.append(first)
            if self._found_used:
                flags.append(found)
        return flags


def flag_nonfinite(
    views: list[GroupView], flag_on: Callable[[torch.device], tuple[Tensor, Tensor]]
) -> None:
    """Set the flag of a device to 1 if a gradient element of ``views`` there is not finite.

    Uses the fused check that ``GradScaler`` runs (with a scale of 1, which leaves finite
    values bit-identical), one pass over the gradients and no synchronisation. Small 1-D CPU
    tensors are gathered first into the flat buffer of the norm (one ``torch.cat``), so that
    the check is one call on one tensor instead of a loop over them.
    """
    for view in views:
        for i, part in enumerate(view.split(view.grads)):
            plan = view.layout.flat_buffer(i, part)
            if plan is not None and plan.vectors > 1:
                k = plan.vectors
                small = plan.small_of(part)
                torch.cat(small[:k], out=plan.head)
                part = [plan.head, *small[k:], *(part[j] for j in plan.large)]
            flag_nonfinite_values(part, *flag_on(part[0].device))


def flag_nonfinite_values(tensors: list[Tensor], found: Tensor, one: Tensor) -> None:
    """``found = 1`` if an element of ``tensors`` (on ``found``'s device) is not finite.

    Where the fused kernel is missing for a device, the largest absolute value (which cannot
    overflow) decides instead; still no synchronisation.
    """
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    except (RuntimeError, NotImplementedError):
        peak = torch.stack(torch._foreach_norm(tensors, float("inf"))).max()
        found.copy_(torch.where(torch.isfinite(peak), found, torch.ones_like(found)))


# --------------------------------------------------------------------- GradScaler
def scaler_mismatch_message(name: str, two_pass: bool) -> str:
    """The error for a ``second_step(grad_scaler=...)`` that does not match ``first_step``'s."""
    if not two_pass:
        why = (
            "this step takes no second pass (first_step() returned False), so the gradients "
            "second_step() steps with are the first pass's, which only first_step() unscales"
        )
    else:
        why = "first_step() unscaled the first gradients with its scaler"
    return (
        f"{name}: second_step() got a different grad_scaler than first_step(): {why}. Pass "
        "the same scaler to both: first_step(grad_scaler=scaler) and "
        "second_step(grad_scaler=scaler), then scaler.update(). The weights are back at w "
        "and no step was taken."
    )


def grad_scaler_step_message(name: str) -> str:
    """The error for ``GradScaler.step(optimizer)`` on a sharpness-aware optimizer."""
    return (
        f"GradScaler.step() cannot drive {name}: it would step with the "
        "second gradients still scaled and without the sharpness-aware update. Call "
        "optimizer.first_step(grad_scaler=scaler) and "
        "optimizer.second_step(grad_scaler=scaler) instead of scaler.step(optimizer), "
        "then scaler.update()."
    )
