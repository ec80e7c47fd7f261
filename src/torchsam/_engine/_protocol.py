"""The checks of the call protocols: what the user's code must have done between the calls.

``step(closure)`` must clear the gradients and run one backward per evaluation; the two-call
style must run the second backward only when ``first_step()`` returned True. Autograd hooks
record what the user's code did (no inference from gradient version counters); each check
raises (or warns) with what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchsam._engine._layout import GroupView, Layout, same_objects

__all__ = [
    "NO_FIRST_STEP",
    "BackwardWatch",
    "ClosureWatch",
    "PassChecks",
    "check_kept_grads",
    "check_second_pass",
    "not_idle_message",
    "warn_no_gradient",
]

NO_FIRST_STEP = (
    "second_step() was called without a preceding first_step(): call first_step() after the "
    "first backward pass, then second_step() after the second one"
)


class BackwardWatch:
    """Notices a backward pass that accumulates into one parameter's gradient.

    On a step without second pass the kept gradients may be changed in place (clipping,
    unscaling), but not added to by another backward; one hook on one parameter tells the
    two apart (any backward through the model reaches it; a hook per parameter would cost
    about 20 us each).
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._seen = False

    def watch(self, param: Tensor) -> None:
        self._seen = False

        def seen(_: Tensor) -> None:
            self._seen = True

        self._handle = param.register_post_accumulate_grad_hook(seen)

    def stop(self) -> bool:
        """Remove the hook; whether a backward was seen since :meth:`watch`."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        seen, self._seen = self._seen, False
        return seen


class ClosureWatch:
    """What the closure of ``step(closure)`` did to the gradients at ``w``, seen by a hook.

    :meth:`start` registers a tensor hook on the first parameter that has a gradient. Autograd
    calls it when a backward pass reaches that parameter, before it accumulates into
    ``.grad``: it records that a backward ran and, on its first call, whether that backward is
    about to add to the gradient that was there before the closure. Adding to a gradient that
    was cleared (set to None, or zeroed by this optimizer's ``zero_grad``) is what the protocol
    asks; adding to one zeroed by other code is harmless, which a flag computed on the device
    tells (read only in that case). :meth:`finish` removes the hook and warns or raises.
    """

    def __init__(self) -> None:
        self._handle: Any = None
        self._param: Tensor | None = None
        self._stale: Tensor | None = None
        self._ran = self._cleared = False
        self._onto_stale: Tensor | None = None

    def start(self, groups: list[dict[str, Any]]) -> None:
        """Watch the first parameter of ``groups`` that has a gradient (nothing if none has)."""
        self.stop()
        param = next((p for g in groups for p in g["params"] if p.grad is not None), None)
        if param is None:
            return
        self._param, self._stale = param, param.grad

        def reached(_: Tensor) -> None:
            if self._ran:
                return
            self._ran = True
            grad = param.grad
            if grad is self._stale and grad is not None and not self._cleared:
                self._onto_stale = grad.ne(0).any()  # on the device; read only if needed

        self._handle = param.register_hook(reached)

    def note_cleared(self) -> None:
        """This optimizer's ``zero_grad`` ran (it may have zeroed the gradients in place)."""
        if self._handle is not None:
            self._cleared = True

    def stop(self) -> None:
        """Remove the hook and forget what it saw (also after an error in the closure)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._param = self._stale = self._onto_stale = None
        self._ran = self._cleared = False

    def evaluate(self, closure: Callable[[], Any], groups: list[dict[str, Any]], name: str) -> Any:
        """``closure()`` with gradients enabled, watched (see :meth:`finish`); its result."""
        self.start(groups)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.stop()
            raise
        self.finish(name)
        return loss

    def finish(self, name: str) -> None:
        """Remove the hook; warn if no backward reached the watched gradient and it is still
        there, raise if the closure's backward added to a gradient it had not cleared."""
        param, stale, ran, onto = self._param, self._stale, self._ran, self._onto_stale
        self.stop()
        if param is None:
            return
        if not ran and param.grad is stale:
            warnings.warn(
                f"{name}.step(closure): the closure did not change the gradients "
                "(did it call loss.backward()?); the step uses the gradients that were there.",
                RuntimeWarning,
                stacklevel=5,
            )
        elif onto is not None and bool(onto):
            raise RuntimeError(
                f"{name}.step(closure): the closure added its gradients to "
                "gradients that were already there. step() evaluates the closure at w and at "
                "w + e(w), so the closure must clear the gradients first (optimizer.zero_grad() "
                "before loss.backward()). If you ported the reference implementation's loop "
                "(loss.backward() before optimizer.step(closure)), remove that backward and add "
                "optimizer.zero_grad() to the closure, or keep it and call first_step() and "
                "second_step() instead of step(closure)."
            )


def check_second_pass(
    name: str, views: list[GroupView], first_layouts: list[Layout], same_set: bool
) -> None:
    """Raise if the second pass left no gradient at all (no backward at ``w + e``), or
    (``same_set``) gradients for another set of parameters than the first pass."""
    if not views and first_layouts:
        raise RuntimeError(
            f"{name}.second_step(): no parameter has a gradient at the "
            "perturbed weights; run the second forward/backward pass (loss.backward() at "
            "w + e(w)) between first_step() and second_step() (with step(closure), the "
            "closure must call loss.backward()). The weights are back at w and no step was "
            "taken."
        )
    if same_set and not same_objects([v.layout for v in views], first_layouts):
        raise RuntimeError(
            f"{name} needs gradients for the same parameters in both passes, "
            "but the second pass produced gradients for a different set of parameters"
        )


def check_kept_grads(
    name: str, views: list[GroupView], kept: list[Tensor], backward_seen: bool
) -> None:
    """Raise if a backward ran on a step without second pass (the kept gradients grew)."""
    if backward_seen or not same_objects([g for v in views for g in v.grads], kept):
        raise RuntimeError(
            f"{name} takes no second pass on this step (first_step() "
            "returned False), but a backward pass ran before second_step(); run the "
            "second forward/backward pass only when first_step() returns True, or use "
            "step(closure). (Changing the gradients in place, e.g. clipping, is fine.)"
        )


def not_idle_message(call: str) -> str:
    """The error for ``call`` made while a step is in progress."""
    return (
        f"{call} was called after first_step() and before second_step(): the step is not "
        "finished (the weights may be perturbed); call second_step() first"
    )


def warn_no_gradient(name: str) -> None:
    """The warning for a first half of a step that finds no gradient at all."""
    warnings.warn(
        f"{name}: no parameter has a gradient at w, so this step does nothing. Call "
        "loss.backward() before first_step(); with step(closure), the closure must call "
        "loss.backward().",
        RuntimeWarning,
        stacklevel=4,
    )


class PassChecks:
    """The checks of one step between its two halves: what the first half saw (the kept
    gradients of a step without second pass, or the first pass's layouts) and, at the second
    half, whether the user's code in between kept the protocol."""

    def __init__(self) -> None:
        self._watch = BackwardWatch()
        self._kept: list[Tensor] = []
        self._first_layouts: list[Layout] = []

    def after_first_half(self, views: list[GroupView], *, one_pass: bool, watch: bool) -> None:
        """Record the first half: on a step without second pass keep the gradient objects
        (and, ``watch``, notice any backward until the second half); else the layouts."""
        if one_pass:
            self._kept = [g for v in views for g in v.grads]
            if watch and views:
                self._watch.watch(views[0].params[0])
        else:
            self._first_layouts = [v.layout for v in views]

    def stop(self) -> None:
        """Stop watching and forget the kept gradients (the step ended or was aborted)."""
        self._watch.stop()
        self._kept = []

    def check(self, name: str, views: list[GroupView], *, one_pass: bool, same_set: bool) -> None:
        """Raise if the gradients of the second half break the protocol (see
        :func:`check_kept_grads` and :func:`check_second_pass`)."""
        kept, backward_seen = self._kept, self._watch.stop()
        self._kept = []
        if one_pass:
            check_kept_grads(name, views, kept, backward_seen)
        else:
            check_second_pass(name, views, self._first_layouts, same_set)
