"""The optimizer: the phases of a sharpness-aware step and its public methods, in the order
they run. No tensor math here (see :mod:`torchsam._engine._functional`)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchsam._engine import _checkpoint, _construct, _finish, _guard, _protocol
from torchsam._engine import _functional as F
from torchsam._engine._checkpoint import STEP
from torchsam._engine._construct import BaseOptimizerArg
from torchsam._engine._contract import StepContext, VariantContract
from torchsam._engine._guard import NonFiniteGuard
from torchsam._engine._layout import GroupView
from torchsam._engine._protocol import ClosureWatch, PassChecks
from torchsam._engine._state import OwnState, WholeState, WideState
from torchsam._engine._workspace import Workspace

__all__ = ["SharpnessAwareOptimizer"]

#: attributes a copy does not take: the workspace (rebuilt on the first step), the hooks (as
#: for torch.optim) and a scheduler's wrapper of ``step`` (bound to the original)
_NOT_COPIED = frozenset(
    {"step", "_opt_called", "_phase", "_ctx", "_passes", "_closure", "_workspace", "_guard"}
    | {f"_optimizer_{kind}_hooks" for kind in _checkpoint.HOOK_KINDS}
)


class _Phase(enum.Enum):
    IDLE = "at w"
    PERTURBED = "at w + e, second pass due"
    ONE_PASS = "no second pass on this step; the gradients at w are kept for second_step"


class SharpnessAwareOptimizer(VariantContract, Optimizer):
    """Base class of the two-pass sharpness-aware optimizers (not used directly).

    It wraps a base optimizer and shares its ``param_groups`` (so LR schedulers, ``zero_grad``
    and per-group hyper-parameters act on both) while keeping torchsam's own per-parameter
    state apart from the base optimizer's (``torch.optim.Adam`` initialises a parameter's state
    only when that state is empty, so the two must not be mixed in memory). ``state_dict()``
    merges both into one ordinary optimizer state dict.

    One step, in the order it runs: :meth:`step` (or :meth:`first_step` and
    :meth:`second_step`) → the variant's :meth:`perturb` → the second pass → restore ``w`` →
    the finiteness check → the variant's :meth:`base_gradient` → the base optimizer's step →
    :meth:`after_base_step`. Variants override the members of
    :class:`~torchsam._engine.VariantContract`; see :class:`torchsam.SAM`.
    """

    #: the whole optimizer's per-parameter state (the base optimizer's and torchsam's own)
    state: WholeState  # type: ignore[assignment]

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerArg,
        own_defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        name = type(self).__name__
        _construct.check_base_argument(name, base_optimizer, own_defaults, base_kwargs, params)
        self._own_defaults = dict(own_defaults)
        self._reset_workspace()
        if isinstance(base_optimizer, Optimizer):
            super().__init__(params, self._own_defaults)
            keys = (*self._own_defaults, STEP)
            self.base_optimizer = _construct.adopt(base_optimizer, self.param_groups, keys)
        else:
            # The seed's contract: the keyword arguments go to the base optimizer and are also
            # recorded in this optimizer's defaults.
            super().__init__(params, {**self._own_defaults, **base_kwargs})
            factory = cast(Callable[..., Optimizer], base_optimizer)
            self.base_optimizer = _construct.build(name, factory, self.param_groups, base_kwargs)
        # One list of group dicts, shared: what a scheduler writes, the base optimizer reads.
        self.param_groups = self.base_optimizer.param_groups
        #: torchsam's own per-parameter state (keys without prefix); ``optimizer.state``
        #: shows it under ``"sam.<key>"`` next to the base optimizer's
        self.own_state = OwnState()
        self.state = WholeState(self.base_optimizer, self.own_state)
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        for group in self.param_groups:
            self.complete_group(group)
        self._check_groups(self.param_groups)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _checkpoint.register(cls)
        cls.device_skip = bool(cls.__dict__.get("device_skip", False))  # not inherited

    def _reset_workspace(self) -> None:
        """Forget everything that is not state: phase, step context, caches, scratch buffers."""
        self._phase = _Phase.IDLE
        self._ctx: StepContext | None = None
        self._passes = PassChecks()
        self._closure = ClosureWatch()
        self._workspace = Workspace()
        self._guard = NonFiniteGuard()

    # ------------------------------------------------------------------ copies and pickling
    def __getstate__(self) -> dict[str, Any]:
        """Everything a copy needs to step exactly like this optimizer (``copy.deepcopy``,
        pickling, ``torch.save`` of the whole object), unlike ``Optimizer.__getstate__``, which
        keeps only ``defaults``, ``state`` and ``param_groups``."""
        self.require_idle("copying or pickling the optimizer")
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            # the shared groups of an older pickle may lack flags newer torch versions added
            # ("foreach", "maximize", ...): the base optimizer's own __setstate__ fills them
            base.__setstate__(base.__getstate__())
        self._reset_workspace()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to this optimizer and to its base optimizer (they share groups)."""
        groups = self.__dict__.get("param_groups") or []
        _construct.fill_group(param_group, self._own_defaults, groups)
        self.check_group(param_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:  # still inside __init__: build our own list first
            super().add_param_group(param_group)
        else:
            self._check_groups([*groups, param_group])
            base.add_param_group(param_group)
            self.complete_group(param_group)

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Raise for what only the groups together can get wrong; nothing by default."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter, as ``torch.optim.Optimizer.zero_grad``."""
        super().zero_grad(set_to_none)
        self._closure.note_cleared()  # inside step(closure): the closure cleared them

    # ------------------------------------------------------------------ phase and progress
    @property
    def perturbed(self) -> bool:
        """True while the weights are at ``w + e``: after :meth:`first_step` returned True and
        before :meth:`second_step`."""
        return self._phase is _Phase.PERTURBED

    @property
    def step_count(self) -> int:
        """Optimisation steps finished so far (saved in the param groups as ``"sam_step"``)."""
        return int(self.param_groups[0].get(STEP, 0))

    @property
    def skip_nonfinite(self) -> bool:
        """The ``skip_nonfinite`` option (True: check, and skip a step with a non-finite
        gradient, at the cost of one host synchronisation per step)."""
        return bool(self.param_groups[0].get("skip_nonfinite", True))

    @property
    def wide_state(self) -> WideState:
        """The optimizer-wide state: kept in every param group under ``"sam_<key>"``."""
        return WideState(self.param_groups)

    @property
    def step_context(self) -> StepContext | None:
        """The context of the step in progress (None between steps)."""
        return self._ctx

    def require_idle(self, call: str) -> None:
        """Raise ``RuntimeError`` naming ``call`` if a step is in progress."""
        if self._phase is not _Phase.IDLE:
            raise RuntimeError(_protocol.not_idle_message(call))

    def _require_two_call_style(self) -> None:
        if self.no_two_call_style is not None:
            raise RuntimeError(
                f"{type(self).__name__} has no first_step()/second_step(): {self.no_two_call_style}"
            )

    # ------------------------------------------------------------------ step(closure)
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one full sharpness-aware step with two evaluations of ``closure``.

        The closure must clear the gradients, compute the loss at the current weights, call
        ``backward()`` and return the loss. It is evaluated at ``w`` and at ``w + e(w)``
        (with gradients enabled), then the weights return to ``w`` and the base optimizer steps.
        Variants that skip the second pass on some steps evaluate it once on those steps.

        Without a closure it takes a step only when every gradient present is zero (the
        perturbation is then zero and the second pass would give the same gradients), which is
        how ``torch.distributed.checkpoint`` initialises an optimizer's state; otherwise it
        raises.

        Args:
            closure (Callable): re-evaluates the model and returns the loss

        Returns:
            the loss returned by the closure at ``w``.
        """
        if closure is None:
            return self.step_without_closure(
                f"{type(self).__name__}.step() needs a closure that clears the gradients, "
                "computes the loss and calls backward(): step(closure). Without a closure, call "
                "first_step() after the first backward pass and second_step() after the second."
            )
        self.require_idle("step()")
        loss = self._closure.evaluate(closure, self.param_groups, type(self).__name__)
        if self.begin_step(zero_grad=True, user_backward=True):
            self.at_perturbed_point(closure)
        self.finish_step(own_closure=True)
        return loss

    def step_without_closure(self, message: str) -> Any:
        """``step()`` without closure: the all-zero-gradient step (how DCP creates the state),
        or a ``RuntimeError`` with ``message``; under ``GradScaler.step(optimizer)`` (which
        sets ``found_inf`` on the optimizer first) one that says what to call instead."""
        self.require_idle("step()")
        if self.__dict__.pop("found_inf", None) is not None:
            self.__dict__.pop("grad_scale", None)
            raise RuntimeError(_guard.grad_scaler_step_message(type(self).__name__))
        views = self._views()
        if views and F.all_zero(views):
            self.begin_step(zero_grad=False)
            self.finish_step(own_closure=True)
            return None
        raise RuntimeError(message)

    #: ``GradScaler.step(optimizer)`` hands an optimizer with this flag the scaler's state
    #: (``found_inf``, ``grad_scale``) before calling ``step()``: that is how the step knows
    #: that a scaler, not the user, called it
    _step_supports_amp_scaling = True

    # ------------------------------------------------------------------ first_step
    @torch._disable_dynamo
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> bool:
        """Move the weights to the (approximate) worst point ``w + e(w)`` of the neighbourhood.

        Call it after the first backward pass. Returns True when the weights were perturbed and
        the second forward/backward pass is due. It returns False, and :meth:`second_step` is
        still expected (without a second pass), when the variant takes no second pass on this
        step (LookSAM between its sharpness steps, intermittent SAM): the gradients are kept,
        whatever ``zero_grad`` says, and :meth:`second_step` steps with them (after any in-place
        change such as clipping).

        It does not synchronise with the device: the gradient norm and the perturbation's scale
        stay on the device, so whether the norm is finite is not known here. A non-finite norm
        is recorded on the device and :meth:`second_step` skips the whole step (see
        ``skip_nonfinite``); the perturbation is then zero, so the second pass runs at ``w``.

        Under ``torch.compile`` it runs eagerly (a graph break), like the other steps.

        Args:
            zero_grad (bool, optional): clear the gradients afterwards when a second pass
                follows (default: False)
            grad_scaler (torch.amp.GradScaler, optional): for float16 mixed precision: the
                first gradients are unscaled with ``grad_scaler.unscale_(self)`` first (do not
                call it yourself as well); pass the same scaler to :meth:`second_step`
                (default: None)
        """
        self._require_two_call_style()
        return self.begin_step(zero_grad, two_call=True, grad_scaler=grad_scaler)

    def begin_step(
        self,
        zero_grad: bool = False,
        *,
        two_call: bool = False,
        user_backward: bool = False,
        grad_scaler: Any = None,
    ) -> bool:
        """The first half of a step, for variants that run their own passes in ``step``
        (``first_step`` without the two-call check): perturb, or keep the gradients on a step
        without second pass. ``two_call``: called by :meth:`first_step`; ``user_backward``: the
        user's code ran the backward (so no gradient at all is worth a warning);
        ``grad_scaler``: unscale the gradients with it first."""
        self.require_idle("first_step()")
        if grad_scaler is not None:
            grad_scaler.unscale_(self)
        views = self._views()
        if not views and (two_call or user_backward):
            _protocol.warn_no_gradient(type(self).__name__)
        ctx = self._ctx = StepContext(self, views, self._workspace, self._guard)
        ctx.grad_scaler = grad_scaler
        if not self.second_pass_due():
            self._phase = _Phase.ONE_PASS
            ctx.two_pass = False
            self._passes.after_first_half(views, one_pass=True, watch=two_call)
            return False
        try:
            if views:
                self.perturb(ctx)
                self.on_perturbed(ctx)
                if self.needs_first_grads:
                    for v in views:
                        F.copy_(ctx.first_grads(v), v.grads, v.foreach)
        except BaseException:
            self.abort()
            raise
        self._phase = _Phase.PERTURBED
        self._passes.after_first_half(views, one_pass=False, watch=False)
        if zero_grad:
            self.zero_grad()
        return True

    # ------------------------------------------------------------------ the second pass
    def at_perturbed_point(self, closure: Callable[[], Any], *, grad: bool = True) -> Any:
        """Evaluate ``closure`` at ``w + e`` (with gradients enabled unless ``grad`` is False);
        on an exception, :meth:`abort` the step and re-raise."""
        try:
            with torch.set_grad_enabled(grad):
                return closure()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Put the weights back at ``w`` and forget the unfinished step (its flags and
        deferred state updates); nothing when no step is in progress."""
        self.return_to_w()
        self._ctx = None
        self._guard.clear()

    def return_to_w(self) -> None:
        """Put the weights back at ``w`` and end the phase; what the step recorded on the
        device (its finiteness flags) is kept (MSAM, between micro-batches)."""
        self._workspace.restore()
        self._passes.stop()
        self._phase = _Phase.IDLE

    # ------------------------------------------------------------------ second_step
    @torch._disable_dynamo
    @Optimizer.profile_hook_step
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Return to ``w`` and let the base optimizer step with the gradient at ``w + e``.

        Call it after the second backward pass (or, when :meth:`first_step` returned False,
        right after it). Registered step pre/post hooks run around it, as they do around
        :meth:`step`. Gradients that are not finite skip the base step (with a warning) and
        leave the weights exactly at ``w``. Without a second backward since
        :meth:`first_step` (when it returned True) it raises, with the weights back at ``w``.

        Args:
            zero_grad (bool, optional): clear the gradients afterwards (default: False)
            grad_scaler (torch.amp.GradScaler, optional): for float16 mixed precision: the
                scaler given to :meth:`first_step` (required when it got one; a
                ``ValueError`` otherwise, with the weights back at ``w``). After a second
                pass the gradients are unscaled with
                ``grad_scaler.unscale_(self.base_optimizer)``; on a step without one
                ``first_step`` unscaled them already. An overflow skips the base step
                silently, as ``grad_scaler.step`` would; call ``grad_scaler.update()``
                afterwards. (Calling ``grad_scaler.unscale_(optimizer)`` before a
                ``first_step()`` without scaler still works on steps with a second pass.)
                (default: None)
        """
        self._require_two_call_style()
        self.finish_step(grad_scaler)
        if zero_grad:
            self.zero_grad()

    def finish_step(self, grad_scaler: Any = None, *, own_closure: bool = False) -> None:
        """The second half of a step (``second_step`` without the two-call check and hooks):
        restore ``w``, check the gradients, let the variant form the base gradient, take the
        base step. ``own_closure``: called by a ``step`` that knows nothing touched the
        gradients kept on a step without second pass."""
        phase, ctx = self._phase, self._ctx
        if phase is _Phase.IDLE or ctx is None:
            raise RuntimeError(_protocol.NO_FIRST_STEP)
        try:
            _finish.check_scaler(type(self).__name__, ctx, grad_scaler)
        except ValueError:
            self.abort()
            raise
        self._workspace.restore()
        self._phase = _Phase.IDLE
        self._ctx = None
        try:
            one_pass = phase is _Phase.ONE_PASS
            if one_pass and own_closure:
                self._passes.stop()
            else:
                ctx.views = self._views()
                same_set = self.needs_first_grads
                self._passes.check(
                    type(self).__name__, ctx.views, one_pass=one_pass, same_set=same_set
                )
            _finish.finish(self, ctx, self._guard, grad_scaler)
        finally:
            self._guard.clear()
        for group in self.param_groups:
            group[STEP] = group.get(STEP, 0) + 1
        # Tell LR schedulers built on this optimizer that it has stepped (what their own
        # wrapper of ``step`` records), so two-call users get no ordering warning.
        self._opt_called = True

    # ------------------------------------------------------------------ views
    def _views(self) -> list[GroupView]:
        """The param groups reduced to the parameters that have a gradient now."""
        return self._workspace.views(type(self).__name__, self.param_groups, self.own_state)

    # ------------------------------------------------------------------ state dict
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """One optimizer state dict holding the base optimizer's state and torchsam's own.

        Per-parameter entries hold the base optimizer's keys unchanged and torchsam's keys
        prefixed with ``"sam."``. The param groups carry both sets of hyper-parameters, the
        variant's options and the optimizer-wide state (``"sam_step"``, ...). State-dict hooks
        registered on this optimizer run as for any ``torch.optim`` optimizer.
        """
        self.require_idle("state_dict()")
        return _checkpoint.pack_with_hooks(self)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict` into this optimizer and its base optimizer.

        The param groups are validated as the constructor validates its arguments (nothing is
        changed when that fails); hyper-parameters and options missing from a checkpoint of an
        older torchsam are taken from this optimizer's current groups; a state dict saved by a
        different variant (one with hyper-parameters this one does not have) is refused.
        State-dict hooks registered on this optimizer run as for any ``torch.optim`` optimizer.
        """
        self.require_idle("load_state_dict()")
        _checkpoint.unpack_with_hooks(self, state_dict)
        self._workspace.layouts = {}  # the group dicts are new
