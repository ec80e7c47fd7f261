"""The checks of the call protocols: what the user's code must have done between the calls.

``step(closure)`` must clear the gradients and run one backward per evaluation; the two-call
style must run the second backward only when ``first_step()`` returned True. Each check
raises (or warns) with what to change.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from torchsam._engine._layout import GroupView, Layout, same_objects

__all__ = ["BackwardWatch", "check_closure_backward", "check_kept_grads", "check_second_pass"]


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


def first_grad(groups: list[dict[str, Any]]) -> tuple[Tensor, Tensor, int] | None:
    """(gradient, parameter, version) of the first parameter that has a gradient."""
    for group in groups:
        for p in group["params"]:
            g = p.grad
            if g is not None:
                return g, p, g._version
    return None


def check_closure_backward(name: str, versions: int) -> None:
    """The closure left the first gradient object in place and changed it ``versions``
    times: 0 means no backward reached it, 1 that backward added to it without clearing."""
    if versions == 0:
        warnings.warn(
            f"{name}.step(closure): the closure did not change the gradients "
            "(did it call loss.backward()?); the step uses the gradients that were there.",
            RuntimeWarning,
            stacklevel=4,
        )
    elif versions == 1:
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
