"""The checks of the call protocols: what the user's code must have done between the calls.

``step(closure)`` must clear the gradients and run one backward per evaluation; the two-call
style must run the second backward only when ``first_step()`` returned True. Autograd hooks
record what the user's code did (no inference from gradient version counters); each check
raises (or warns) with what to change.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from torchsam._engine._layout import GroupView, Layout, same_objects

__all__ = ["BackwardWatch", "ClosureWatch", "check_kept_grads", "check_second_pass"]


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
                stacklevel=4,
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
