"""The two-pass engine that every sharpness-aware optimizer in torchsam runs on.

A sharpness-aware step has one fixed sequence::

    gradient at w  ->  perturb to w + e  ->  gradient at w + e  ->  restore w  ->  base step

:class:`SharpnessAwareOptimizer` owns that sequence once: the phase bookkeeping, the bit-exact
weight restore, the shared parameter groups and state with the base optimizer, the closure
protocol of ``torch.optim``, the guards against non-finite gradients, and ``state_dict``.
A variant supplies only what differs, by overriding small policies (see ``docs/design.md``):
whether the second pass runs on this step (:meth:`SharpnessAwareOptimizer._wants_second_pass`),
the perturbation (:meth:`SharpnessAwareOptimizer._perturb`), and the gradient the base optimizer
sees (:meth:`SharpnessAwareOptimizer._prepare_base_grads` after a second pass,
:meth:`SharpnessAwareOptimizer._prepare_one_pass_grads` without one).
"""

from __future__ import annotations

import operator
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsam import _dtensor, _kernels

__all__ = ["GroupView", "SharpnessAwareOptimizer"]

# Phases of a step: at w; at w + e (second pass due); a _perturb that declined (step skipped);
# no second pass on this step (the gradients at w are kept for second_step).
_IDLE, _PERTURBED, _SKIPPED, _ONE_PASS = "idle", "perturbed", "skipped", "one pass"

# Optimizer-wide state (the step counter, LookSAM's ||g_v||, ...) is kept in every param group
# under keys with this prefix (``"sam_step"``), where torch.optim keeps what every checkpoint
# format must carry. Checkpoints written before kept it in ``state["sam"]``; they still load.
WIDE_PREFIX = "sam_"
_STEP = WIDE_PREFIX + "step"
_LEGACY_GLOBAL = "sam"

# Keys of torchsam's own per-parameter state are stored under this prefix in ``state_dict()``
# so that they never collide with the base optimizer's keys ("momentum_buffer", "exp_avg", ...).
STATE_PREFIX = "sam."

BaseOptimizerArg = type[Optimizer] | Callable[..., Optimizer] | Optimizer


#: tensors of at most this many elements are normed together in one flat buffer on the CPU
_FLAT_NORM_MAX_NUMEL = 4096
_PLAIN = (Tensor, nn.Parameter)


@dataclass
class _FlatPlan:
    """Small tensors of a split gathered in one flat buffer, for one norm on the CPU."""

    small: list[int] | None  # their positions in the split, 1-D ones first (None: 0, 1, ...)
    large: list[int]  # the positions of the others
    flat: Tensor
    pieces: list[Tensor]  # views of ``flat`` shaped like the small tensors
    vectors: int  # how many of the small tensors are 1-D (one torch.cat gathers those)
    head: Tensor  # the part of ``flat`` that holds them

    def small_of(self, tensors: list[Tensor]) -> list[Tensor]:
        """The small ones of ``tensors`` (a split), in the order of :attr:`pieces`."""
        return tensors if self.small is None else [tensors[j] for j in self.small]

    def with_pieces(self, tensors: list[Tensor]) -> list[Tensor]:
        """``tensors`` (a split) with each small one replaced by its piece of ``flat``."""
        out = list(tensors)
        order = range(len(tensors)) if self.small is None else self.small
        for piece, j in zip(self.pieces, order, strict=True):
            out[j] = piece
        return out

    def fill(self, tensors: list[Tensor]) -> list[Tensor]:
        """Copy the small ones of ``tensors`` (a split) into ``flat``; return the others."""
        small = self.small_of(tensors)
        k = self.vectors
        if k:  # biases, normalisation weights: one kernel
            torch.cat(small[:k], out=self.head)
        if k < len(small):
            torch._foreach_copy_(self.pieces[k:], small[k:])
        return [tensors[j] for j in self.large]


@dataclass
class _Layout:
    """What is fixed while a group's set of parameters with gradients does not change.

    Cached between steps so that a step does no per-parameter Python work beyond collecting
    the gradients: the index lists per (device, dtype) (``None`` when there is only one) and
    persistent scratch buffers by name, aligned with ``params``.
    """

    params: list[Tensor]
    splits: list[list[int]] | None
    dtypes: list[torch.dtype] = field(default_factory=list)
    device: torch.device | None = None
    buffers: dict[str, list[Tensor]] = field(default_factory=dict)
    #: per split: the flat buffer that gathers small CPU tensors for one norm
    flat: dict[int | tuple[str, int], _FlatPlan | None] = field(default_factory=dict)

    def flat_buffer(self, index: int | tuple[str, int], tensors: list[Tensor]) -> _FlatPlan | None:
        """For split ``index`` on the CPU: the positions of its small tensors, a flat buffer
        and views of it shaped like them; None where that does not pay (see ``_global_norm``).

        On the CPU a multi-tensor norm is a loop of per-tensor reductions, each with a fixed
        cost of about a microsecond: for small tensors a copy into one buffer and one norm
        cost less (on a GPU ``torch._foreach_norm`` is one kernel, and large tensors would pay
        for the extra pass over memory).
        """
        if index not in self.flat:
            plan: _FlatPlan | None = None
            first = tensors[0]
            small = [i for i, t in enumerate(tensors) if t.numel() <= _FLAT_NORM_MAX_NUMEL]
            if (
                len(small) > 1
                and first.device.type == "cpu"
                and all(type(t) in _PLAIN for t in tensors)
            ):
                small.sort(key=lambda i: tensors[i].dim() != 1)  # stable: 1-D ones first
                vectors = sum(tensors[i].dim() == 1 for i in small)
                sizes = [tensors[i].numel() for i in small]
                flat = torch.empty(sum(sizes), dtype=first.dtype)
                pieces = [
                    piece.view(tensors[i].shape)
                    for piece, i in zip(flat.split(sizes), small, strict=True)
                ]
                chosen = set(small)
                large = [i for i in range(len(tensors)) if i not in chosen]
                plan = _FlatPlan(
                    None if small == list(range(len(tensors))) else small,
                    large,
                    flat,
                    pieces,
                    vectors,
                    flat[: sum(sizes[:vectors])],
                )
            self.flat[index] = plan
        plan = self.flat[index]
        if plan is not None and plan.flat.dtype != tensors[0].dtype:
            return None
        return plan

    def matches(self, params: list[Tensor]) -> bool:
        """Whether ``params`` are this layout's tensors, still of the same dtypes and device.

        ``model.double()`` or ``model.to(device)`` keep the parameter objects but change their
        dtype or device; the cached splits and scratch buffers must then be rebuilt. (The device
        of the first parameter stands for all: moving part of a model is not detected.)
        """
        return (
            _same_objects(self.params, params)
            and [p.dtype for p in params] == self.dtypes
            and params[0].device == self.device
        )


@dataclass
class GroupView:
    """The parameters of one param group that have a gradient, with those gradients."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    layout: _Layout
    #: what the base optimizer sees as the gradients on this step, when not ``grads`` (set by
    #: :meth:`SharpnessAwareOptimizer._base_grads`)
    base_grads: list[Tensor] | None = None

    def split(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        """``tensors`` (aligned with ``params``) in lists of one device and dtype each."""
        if self.layout.splits is None:
            return [tensors]
        return [[tensors[i] for i in idx] for idx in self.layout.splits]


class SharpnessAwareOptimizer(Optimizer):
    """Base class of the two-pass sharpness-aware optimizers (not used directly).

    It wraps a base optimizer and shares its ``param_groups`` (so LR schedulers, ``zero_grad``
    and per-group hyper-parameters act on both) while keeping torchsam's own per-parameter
    state apart from the base optimizer's (``torch.optim.Adam`` initialises a parameter's state
    only when that state is empty, so the two must not be mixed in memory). ``state_dict()``
    merges both into one ordinary optimizer state dict.

    Subclasses pass their hyper-parameters as ``own_defaults`` (validated per group in
    :meth:`_check_group`) and implement :meth:`_perturb`; see :class:`torchsam.SAM`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerArg,
        own_defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        if isinstance(params, nn.Module):
            raise TypeError(
                f"{type(self).__name__} got the module {type(params).__name__} as params; pass "
                "its parameters instead: model.parameters() (or a list of param group dicts)"
            )
        self._own_defaults = dict(own_defaults)
        self._reset_workspace()

        name = type(self).__name__
        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"{name} got keyword arguments {sorted(base_kwargs)} together "
                    "with an already built base optimizer; pass the optimizer class instead, or "
                    "set those options when you build the base optimizer"
                )
            _check_base_optimizer(name, base_optimizer)
            super().__init__(params, self._own_defaults)
            _check_same_partition(self.param_groups, base_optimizer.param_groups)
            for own_group, base_group in zip(
                self.param_groups, base_optimizer.param_groups, strict=True
            ):
                for key in (*self._own_defaults, _STEP):
                    base_group[key] = own_group[key]
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and not issubclass(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), "
                "a callable that returns an optimizer, or an optimizer instance; got the class "
                f"{base_optimizer.__module__}.{base_optimizer.__qualname__}, which is not an "
                "optimizer"
            )
        elif callable(base_optimizer):
            # The seed's contract: the keyword arguments go to the base optimizer and are also
            # recorded in this optimizer's defaults.
            super().__init__(params, {**self._own_defaults, **base_kwargs})
            try:
                built = base_optimizer(self.param_groups, **base_kwargs)
            except TypeError as error:
                unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
                if unknown is None:
                    raise
                own = ", ".join(k for k in self._own_defaults if not k.startswith("_"))
                base_name = getattr(base_optimizer, "__name__", repr(base_optimizer))
                raise TypeError(
                    f"{name} got an unexpected keyword argument '{unknown.group(1)}': it is "
                    f"neither an argument of {name} ({own}) nor of the base optimizer "
                    f"{base_name}, which received the other keyword arguments"
                ) from None
            if not isinstance(built, Optimizer):
                raise TypeError(
                    "base_optimizer must be a torch.optim.Optimizer subclass, a callable that "
                    "returns an optimizer, or an optimizer instance; calling it gave "
                    f"{type(built)!r}"
                )
            _check_base_optimizer(name, built)
            self.base_optimizer = built
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), "
                "a callable that returns an optimizer, or an optimizer instance; "
                f"got {type(base_optimizer)!r}"
            )
        # One list of group dicts, shared: what a scheduler writes, the base optimizer reads.
        self.param_groups = self.base_optimizer.param_groups
        self.state = _OwnState(self.base_optimizer)
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        for group in self.param_groups:
            self._init_group(group)
        self._check_groups(self.param_groups)

    def _reset_workspace(self) -> None:
        """Forget everything that is not state: phase, caches and scratch buffers."""
        self._phase = _IDLE
        self._kept_grads: list[tuple[Tensor, int]] = []
        self._kept_views: list[GroupView] = []
        self._first_layouts: list[_Layout] = []
        self._backward_watch: Any = None
        self._backward_seen = False
        # Workspace, not state: scratch buffers per parameter (never saved, reallocated after a
        # load), the cached layouts per group, and the (params, backups) pairs of this step.
        self._workspace: dict[str, dict[Tensor, Tensor]] = {}
        self._layouts: dict[int, _Layout] = {}
        self._finite_flags: _Flags = {}
        self._flags_used = self._first_flag_used = False
        self._saved: list[tuple[list[Tensor], list[Tensor], bool]] = []
        # state updates of the step in progress, run once its gradients are known to be finite
        self._pending: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ copies and pickling
    #: attributes a copy does not take: the workspace (rebuilt on the first step), the hooks
    #: (as for torch.optim) and a scheduler's wrapper of ``step`` (bound to the original)
    _NOT_COPIED = frozenset(
        {
            "step",
            "_opt_called",
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
            "_phase",
            "_kept_grads",
            "_kept_views",
            "_first_layouts",
            "_backward_watch",
            "_backward_seen",
            "_workspace",
            "_layouts",
            "_finite_flags",
            "_flags_used",
            "_first_flag_used",
            "_saved",
            "_pending",
        }
    )

    def __getstate__(self) -> dict[str, Any]:
        """Everything a copy needs to step exactly like this optimizer (``copy.deepcopy``,
        pickling, ``torch.save`` of the whole object), unlike ``Optimizer.__getstate__``, which
        keeps only ``defaults``, ``state`` and ``param_groups``."""
        self._require_idle("copying or pickling the optimizer")
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_COPIED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_workspace()

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to this optimizer and to its base optimizer (they share groups)."""
        for key, default in self._own_defaults.items():
            param_group.setdefault(key, default)
        groups = self.__dict__.get("param_groups") or []
        if groups:  # the optimizer-wide state, as the other groups hold it
            for key, value in groups[0].items():
                if key.startswith(WIDE_PREFIX):
                    param_group.setdefault(key, value)
        param_group.setdefault(_STEP, 0)
        self._check_group(param_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:  # still inside __init__: build our own list first
            super().add_param_group(param_group)
        else:
            self._check_groups([*groups, param_group])
            base.add_param_group(param_group)
            self._init_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an invalid hyper-parameter of this optimizer in ``group``."""

    def _init_group(self, group: dict[str, Any]) -> None:
        """Complete a group once the base optimizer's defaults are in it; nothing by default."""

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        """Raise for what only the groups together can get wrong; nothing by default."""

    # ------------------------------------------------------------------ phase
    @property
    def perturbed(self) -> bool:
        """True while the weights are at ``w + e``: after :meth:`first_step` returned True and
        before :meth:`second_step`."""
        return self._phase == _PERTURBED

    def _require_idle(self, call: str) -> None:
        if self._phase != _IDLE:
            raise RuntimeError(
                f"{call} was called after first_step() and before second_step(): the step is "
                "not finished (the weights may be perturbed); call second_step() first"
            )

    @property
    def _global_state(self) -> _WideState:
        """The optimizer-wide state: kept in every param group under ``"sam_<key>"``."""
        return _WideState(self.param_groups)

    def _step_count(self) -> int:
        """Optimisation steps finished so far."""
        return int(self.param_groups[0].get(_STEP, 0))

    # ------------------------------------------------------------------ the two steps
    def _views(self) -> list[GroupView]:
        views = []
        rebuilt = False
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    params.append(p)
                    grads.append(g)
            if not params:
                continue
            layout = self._layouts.get(id(group))
            if layout is None or not layout.matches(params):
                # A parameter's gradient layout is fixed by its module (``sparse=True``), so
                # checking when the set of parameters changes is enough.
                if any(g.is_sparse for g in grads):
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use a dense "
                        "embedding or a different optimizer for sparse parameters"
                    )
                layout = _Layout(
                    params,
                    _split_by_device_and_dtype(params),
                    [p.dtype for p in params],
                    params[0].device,
                )
                self._layouts[id(group)] = layout
                rebuilt = True
                for p in params:  # own state follows a dtype or device change of its parameter
                    own = self.state.get(p)
                    if own:
                        for key, value in own.items():
                            own[key] = _to_param(value, p)
            views.append(GroupView(group, params, grads, layout))
        if rebuilt:
            _dtensor.check_not_mixed(type(self).__name__, [p for v in views for p in v.params])
        return views

    @torch._disable_dynamo
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
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
        """
        self._require_two_call_style()
        return self._first_step(zero_grad, two_call=True)

    def _first_step(
        self, zero_grad: bool, *, two_call: bool = False, user_backward: bool = False
    ) -> bool:
        """``two_call``: called by :meth:`first_step`; ``user_backward``: the user's code ran
        the backward (so no gradient at all is worth a warning)."""
        self._require_idle("first_step()")
        views = self._views()
        if not views and (two_call or user_backward):
            warnings.warn(
                f"{type(self).__name__}: no parameter has a gradient at w, so this step does "
                "nothing. Call loss.backward() before first_step(); with step(closure), the "
                "closure must call loss.backward().",
                RuntimeWarning,
                stacklevel=3,
            )
        if not self._wants_second_pass():
            self._phase = _ONE_PASS
            self._kept_views = views
            self._kept_grads = [(g, g._version) for v in views for g in v.grads]
            if two_call and views:
                self._watch_backward(views[0].params[0])
            return False
        self._saved = []
        try:
            perturbed = not views or self._perturb(views)
            if perturbed and self._needs_first_grads:
                for v in views:
                    _kernels.copy_(self._scratch(v, "first_grad"), v.grads, group_foreach(v.group))
        except BaseException:
            self._abort()
            raise
        if not perturbed:
            self._restore()
            self._phase = _SKIPPED
            warnings.warn(
                f"{type(self).__name__}.first_step(): the gradient norm is not finite (inf or "
                "NaN); the weights were not perturbed and this step is skipped (second_step() "
                "takes no base step). With float16 autocast this is expected while a GradScaler "
                "calibrates its scale.",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            self._phase = _PERTURBED
            self._first_layouts = [v.layout for v in views]
        if zero_grad:
            self.zero_grad()
        return self._phase == _PERTURBED

    def _watch_backward(self, param: Tensor) -> None:
        """Notice a backward pass that accumulates into ``param.grad`` before second_step().

        On a step without second pass the kept gradients may be changed in place (clipping,
        unscaling), but not added to by another backward; one hook on one parameter tells the
        two apart (any backward through the model reaches it).
        """
        self._backward_seen = False

        def seen(_: Tensor) -> None:
            self._backward_seen = True

        self._backward_watch = param.register_post_accumulate_grad_hook(seen)

    def _unwatch_backward(self) -> bool:
        """Remove the hook of :meth:`_watch_backward`; whether a backward was seen."""
        if self._backward_watch is not None:
            self._backward_watch.remove()
            self._backward_watch = None
        seen, self._backward_seen = self._backward_seen, False
        return seen

    def _second_step(self, grad_scaler: Any = None, *, own_closure: bool = False) -> None:
        """Finish the step. ``own_closure``: called by :meth:`step`, which knows that nothing
        touched the gradients kept on a one-pass step, so they need not be collected again."""
        phase = self._phase
        if phase == _IDLE:
            raise RuntimeError(
                "second_step() was called without a preceding first_step(): call first_step() "
                "after the first backward pass, then second_step() after the second one"
            )
        self._restore()
        self._phase = _IDLE
        kept, self._kept_views = self._kept_views, []
        backward_seen = self._unwatch_backward()
        try:
            if phase == _ONE_PASS and own_closure:
                self._kept_grads = []
                self._finish(kept, grad_scaler, two_pass=False)
            elif phase != _SKIPPED:
                views = self._views()
                if phase == _ONE_PASS:
                    self._check_kept_grads(views, backward_seen)
                else:
                    self._check_second_pass(views)
                    if self._needs_first_grads:
                        self._check_same_layouts(views)
                self._finish(views, grad_scaler, two_pass=phase == _PERTURBED)
        finally:
            self._pending = []
            self._clear_nonfinite_flags()
        for group in self.param_groups:
            group[_STEP] = group.get(_STEP, 0) + 1
        # Tell LR schedulers built on this optimizer that it has stepped (what their own
        # wrapper of ``step`` records), so two-call users get no ordering warning.
        self._opt_called = True

    def _check_second_pass(self, views: list[GroupView]) -> None:
        """Raise if the second pass left no gradient at all (no backward at ``w + e``)."""
        if not views and self._first_layouts:
            raise RuntimeError(
                f"{type(self).__name__}.second_step(): no parameter has a gradient at the "
                "perturbed weights; run the second forward/backward pass (loss.backward() at "
                "w + e(w)) between first_step() and second_step() (with step(closure), the "
                "closure must call loss.backward()). The weights are back at w and no step was "
                "taken."
            )

    def _finish(self, views: list[GroupView], grad_scaler: Any, *, two_pass: bool) -> None:
        """Check the gradients at ``w``'s step, let the policy shape them, take the base step."""
        if grad_scaler is not None:
            # Unscale for the base optimizer: true gradients for the policy, and the scaler
            # records any inf/NaN it finds here for its update(). On a step without second pass
            # the gradients are the first pass's, which the recipe has already unscaled.
            if two_pass:
                grad_scaler.unscale_(self.base_optimizer)
            else:
                _unscale_once(grad_scaler, self)
        # the check runs with a GradScaler even when skip_nonfinite is False: skipping an
        # overflowing step is what the scaler relies on
        self._checking = grad_scaler is not None or self._skip_nonfinite
        try:
            if two_pass:
                self._flag_nonfinite_grads(views)
            else:
                self._flag_nonfinite_one_pass_grads(views)
        finally:
            self._checking = False
        if self._flags_used or self._first_flag_used:
            status = self._read_nonfinite_flags()  # the step's one host synchronisation
            if status != 0.0:
                if grad_scaler is None:  # with a scaler, skipping on overflow is routine
                    message = _nonfinite_message(type(self).__name__, status)
                    warnings.warn(message, RuntimeWarning, stacklevel=4)
                return
        pending, self._pending = self._pending, []
        for commit in pending:
            commit()
        if two_pass:
            self._prepare_base_grads(views)
        else:
            self._prepare_one_pass_grads(views)
        self._base_optimizer_step(views)
        self._after_base_step(views)

    def _base_step(self) -> None:
        """The base optimizer's step, as part of this optimizer's step.

        It runs the hooks registered on the base optimizer itself, but not the global step
        hooks nor a second profiler ``Optimizer.step#`` event: those belong to this optimizer's
        step, which wraps it (one step, one pair of hook calls, one event).
        """
        base = self.base_optimizer
        hooked = type(base).step
        inner = getattr(hooked, "__wrapped__", None)
        if inner is None or not getattr(hooked, "hooked", False) or "step" in base.__dict__:
            base.step()  # not the wrapper torch.optim installs (or patched on the instance)
            return
        for pre_hook in base._optimizer_step_pre_hooks.values():
            pre_hook(base, (), {})
        inner(base)
        for post_hook in base._optimizer_step_post_hooks.values():
            post_hook(base, (), {})

    def _check_kept_grads(self, views: list[GroupView], backward_seen: bool) -> None:
        now = [g for v in views for g in v.grads]
        kept = self._kept_grads
        self._kept_grads = []
        if (
            backward_seen
            or len(now) != len(kept)
            or any(g is not k for g, (k, _) in zip(now, kept, strict=True))
        ):
            raise RuntimeError(
                f"{type(self).__name__} takes no second pass on this step (first_step() "
                "returned False), but a backward pass ran before second_step(); run the "
                "second forward/backward pass only when first_step() returns True, or use "
                "step(closure). (Changing the gradients in place, e.g. clipping, is fine.)"
            )

    def _check_same_layouts(self, views: list[GroupView]) -> None:
        if not _same_objects([v.layout for v in views], self._first_layouts):
            raise RuntimeError(
                f"{type(self).__name__} needs gradients for the same parameters in both passes, "
                "but the second pass produced gradients for a different set of parameters"
            )

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
            grad_scaler (torch.amp.GradScaler, optional): for mixed precision: the gradients
                are unscaled with ``grad_scaler.unscale_(self.base_optimizer)`` first (on a
                step without second pass, ``grad_scaler.unscale_(self)`` unless that was
                already called), and an overflow skips the base step silently, as
                ``grad_scaler.step`` would; call ``grad_scaler.update()`` afterwards
                (default: None)
        """
        self._require_two_call_style()
        self._second_step(grad_scaler)
        if zero_grad:
            self.zero_grad()

    #: why this optimizer has no two-call style (None: it has one)
    _no_two_call_style: str | None = None

    def _require_two_call_style(self) -> None:
        if self._no_two_call_style is not None:
            raise RuntimeError(
                f"{type(self).__name__} has no first_step()/second_step(): "
                f"{self._no_two_call_style}"
            )

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
            return self._step_without_closure(
                f"{type(self).__name__}.step() needs a closure that clears the gradients, "
                "computes the loss and calls backward(): step(closure). Without a closure, call "
                "first_step() after the first backward pass and second_step() after the second."
            )
        self._require_idle("step()")
        probe = _first_grad(self.param_groups)
        with torch.enable_grad():
            loss = closure()
        if probe is not None and probe[0] is probe[1].grad:
            self._check_closure_backward(probe[0]._version - probe[2])
        if self._first_step(zero_grad=True, user_backward=True):
            self._closure_at_perturbed_point(closure)
        self._second_step(own_closure=True)
        return loss

    def _check_closure_backward(self, versions: int) -> None:
        """The closure left the first gradient object in place and changed it ``versions``
        times: 0 means no backward reached it, 1 that backward added to it without clearing."""
        if versions == 0:
            warnings.warn(
                f"{type(self).__name__}.step(closure): the closure did not change the gradients "
                "(did it call loss.backward()?); the step uses the gradients that were there.",
                RuntimeWarning,
                stacklevel=4,
            )
        elif versions == 1:
            raise RuntimeError(
                f"{type(self).__name__}.step(closure): the closure added its gradients to "
                "gradients that were already there. step() evaluates the closure at w and at "
                "w + e(w), so the closure must clear the gradients first (optimizer.zero_grad() "
                "before loss.backward()). If you ported the reference implementation's loop "
                "(loss.backward() before optimizer.step(closure)), remove that backward and add "
                "optimizer.zero_grad() to the closure, or keep it and call first_step() and "
                "second_step() instead of step(closure)."
            )

    def _step_without_closure(self, message: str) -> Any:
        """``step()`` without closure: the all-zero-gradient step, or an error."""
        self._require_idle("step()")
        views = self._views()
        # the 1-norm (the max-norm has no value on an empty FSDP2 shard), over all shards
        if views and not any(
            bool(_dtensor.full(torch.stack(torch._foreach_norm(part, 1))).any())
            for v in views
            for part in v.split(v.grads)
        ):
            self._first_step(zero_grad=False)
            self._second_step(own_closure=True)
            return None
        if any("grad_scaler" in frame.f_code.co_filename for frame in _frames()):
            message = (
                f"GradScaler.step() cannot drive {type(self).__name__}: it would step with the "
                "second gradients still scaled and without the sharpness-aware update. Call "
                "scaler.unscale_(optimizer) before first_step() and "
                "optimizer.second_step(grad_scaler=scaler) instead of scaler.step(optimizer), "
                "then scaler.update()."
            )
        raise RuntimeError(message)

    def _closure_at_perturbed_point(self, closure: Callable[[], Any], *, grad: bool = True) -> Any:
        """Evaluate ``closure`` at ``w + e`` (with gradients enabled unless ``grad`` is False);
        on an exception, restore ``w`` and re-raise."""
        try:
            with torch.set_grad_enabled(grad):
                return closure()
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Put the weights back at ``w`` and forget the unfinished step."""
        self._return_to_w()
        self._pending = []
        self._clear_nonfinite_flags()

    def _return_to_w(self) -> None:
        """Put the weights back at ``w``; what the step recorded on the device is kept."""
        self._restore()
        self._unwatch_backward()
        self._phase = _IDLE

    # ------------------------------------------------------------------ policies
    #: copy the first gradients into the "first_grad" scratch buffers when perturbing
    _needs_first_grads: bool = False

    def _wants_second_pass(self) -> bool:
        """Whether this step takes the second pass (True for every step by default)."""
        return True

    def _perturb(self, views: list[GroupView]) -> bool:
        """Add the perturbation to the weights of ``views``; return False if it was skipped.

        An implementation computes the perturbation, and before it writes to any weight it
        calls :meth:`_save_weights` on the tensors it is going to change.
        """
        raise NotImplementedError

    def _prepare_base_grads(self, views: list[GroupView]) -> None:
        """Rewrite the gradients (at ``w + e``) that the base optimizer uses; none by default."""

    def _flag_nonfinite_one_pass_grads(self, views: list[GroupView]) -> None:
        """Record on the device whether the gradients of a step without second pass are finite.

        A variant that needs their norm anyway may decide from it (:meth:`_flag_nonfinite_norm`)
        and keep it for :meth:`_prepare_one_pass_grads`, called right after within the same
        step (also when the check is off).
        """
        self._flag_nonfinite_grads(views)

    def _flag_nonfinite_grads(self, views: list[GroupView]) -> None:
        """Record on the device whether the gradients of ``views`` (at ``w + e`` after a second
        pass) are all finite; nothing when the check is off."""
        if self._checking:
            _flag_nonfinite(views, self._nonfinite_entry)

    # ------------------------------------------------------------------ the non-finite guard
    #: whether second_step() is checking the gradients now (skip_nonfinite, or a GradScaler)
    _checking: bool = False

    @property
    def _skip_nonfinite(self) -> bool:
        """The ``skip_nonfinite`` option (True: check, and skip a step with a non-finite
        gradient, at the cost of one host synchronisation per step)."""
        return bool(self.param_groups[0].get("skip_nonfinite", True))

    def _nonfinite_entry(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """This step's flag on ``device`` (0 while every gradient checked was finite), and a
        1 on that device (the unscale factor of the fused check)."""
        found, one, _ = self._nonfinite_flags_on(device)
        self._flags_used = True
        return found, one

    def _nonfinite_flags_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(found, one, first) on ``device``: ``first`` is the flag of ``first_step``'s norm."""
        entry = self._finite_flags.get(device)
        if entry is None:
            entry = (
                torch.zeros((), device=device),
                torch.ones((), device=device),
                torch.zeros((), device=device),
            )
            self._finite_flags[device] = entry
        return entry

    def _flag_nonfinite_norm(self, norm: Tensor, *, first_pass: bool = False) -> None:
        """Record on the device whether ``norm`` is finite (a finite norm means finite
        gradients: one pass over them gives both). No synchronisation.

        ``first_pass`` (``first_step``'s norm) marks the flag with NaN (``0 * norm``), any
        other norm with 1, so that the warning can say which pass failed.
        """
        if not (first_pass and self._skip_nonfinite) and not self._checking:
            return
        if first_pass:
            self._nonfinite_flags_on(norm.device)[2].add_(norm, alpha=0.0)
            self._first_flag_used = True
        else:
            _flag_nonfinite_values([norm.reshape(1)], *self._nonfinite_entry(norm.device))

    def _read_nonfinite_flags(self) -> float:
        """0.0 when every gradient checked in this step was finite, NaN when ``first_step``'s
        norm was not, 1.0 when a later check failed; the flags are cleared. One host
        synchronisation (the flags of other devices are first added on the first's device)."""
        flags = self._used_flags()
        total = flags[0]
        for other in flags[1:]:
            total = total + other.to(total.device)  # NaN (first_step's norm) wins over 1
        status = total.item()
        if status != 0.0:
            for flag in flags:
                flag.zero_()
        self._flags_used = self._first_flag_used = False
        return status

    def _used_flags(self) -> list[Tensor]:
        flags = []
        for found, _, first in self._finite_flags.values():
            if self._first_flag_used:
                flags.append(first)
            if self._flags_used:
                flags.append(found)
        return flags

    def _clear_nonfinite_flags(self) -> None:
        """Forget what the unfinished step recorded (after an error or an abort)."""
        for flag in self._used_flags():
            flag.zero_()
        self._flags_used = self._first_flag_used = False

    def _prepare_one_pass_grads(self, views: list[GroupView]) -> None:
        """Rewrite the gradients (at ``w``) of a step without second pass; none by default."""

    def _after_base_step(self, views: list[GroupView]) -> None:
        """Act on the weights after the base step (decoupled updates); nothing by default."""

    # ------------------------------------------------------------------ shared machinery
    def _scratch(self, view: GroupView, name: str) -> list[Tensor]:
        """Persistent per-parameter buffers called ``name``, aligned with ``view.params``.

        Allocated on first use (and when a parameter's shape or dtype changes), then reused:
        after the first step no parameter-sized memory is allocated.
        """
        buffers = view.layout.buffers.get(name)
        if buffers is None:
            store = self._workspace.setdefault(name, {})
            buffers = []
            for p in view.params:
                buf = store.get(p)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
                    store[p] = buf
                buffers.append(buf)
            view.layout.buffers[name] = buffers
        return buffers

    def _base_grads(self, view: GroupView, name: str = "base_grad") -> list[Tensor]:
        """The gradients the base optimizer will see for ``view`` on this step.

        Persistent scratch buffers called ``name`` (aligned with ``view.params``): a policy
        writes the gradient it wants the base optimizer to step with into them, and ``p.grad``
        stays exactly as backward left it (torch.optim never writes ``p.grad``).
        """
        buffers = self._scratch(view, name)
        view.base_grads = buffers
        return buffers

    def _base_optimizer_step(self, views: list[GroupView]) -> None:
        """Run the base optimizer's step with each view's ``base_grads`` in place of ``p.grad``.

        ``p.grad`` points at the scratch buffers only for the duration of the base step and is
        put back to the user's gradient tensors afterwards, also when the step raises.
        """
        swapped = [v for v in views if v.base_grads is not None]
        if not swapped:
            self._base_step()
            return
        try:
            for v in swapped:
                for p, g in zip(v.params, cast(list[Tensor], v.base_grads), strict=True):
                    p.grad = g
            self._base_step()
        finally:
            for v in swapped:
                for p, g in zip(v.params, v.grads, strict=True):
                    p.grad = g

    def _finite_direction(
        self, view: GroupView, index: int, part: list[Tensor], foreach: bool, *, normed: bool
    ) -> list[Tensor]:
        """``part`` (split ``index`` of a perturbation direction) with its non-finite entries
        set to 0, for a perturbation that stays finite when the norm is not (its scale is then
        0, and ``0 * inf`` is NaN). Finite entries are left bit-identical; the step with a
        non-finite direction is skipped anyway.

        In place, except for the small CPU tensors of a split, which are gathered into the
        flat buffer of the norm and cleaned there in one pass (the returned list then holds
        views of that buffer in their places); ``normed`` says that the buffer still holds
        ``part`` from :meth:`_global_norm`. No synchronisation.
        """
        plan = view.layout.flat_buffer(index, part) if foreach else None
        if plan is None:
            for t in part:
                torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
            return part
        large = [part[j] for j in plan.large] if normed else plan.fill(part)
        torch.nan_to_num_(plan.flat, nan=0.0, posinf=0.0, neginf=0.0)
        for t in large:
            torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
        return plan.with_pieces(part)

    def _save_weights(self, view: GroupView, foreach: bool) -> None:
        """Copy the weights of ``view`` aside so that :meth:`_restore` is bit-exact.

        On the CPU the small 1-D weights (biases, normalisation weights) of a split are saved
        with one ``torch.cat`` into a flat buffer, instead of one copy each.
        """
        backups = self._backups(view)
        if not foreach:
            _kernels.copy_(backups, view.params, foreach)
        else:
            splits = zip(view.split(view.params), view.split(backups), strict=True)
            for i, (part, saved) in enumerate(splits):
                plan = view.layout.flat_buffer(("backup", i), part)
                if plan is None or plan.vectors < 2:
                    _kernels.copy_(saved, part, foreach)
                    continue
                large = plan.fill(part)
                if large:
                    _kernels.copy_([saved[j] for j in plan.large], large, foreach)
        self._saved.append((view.params, backups, foreach))

    def _backups(self, view: GroupView) -> list[Tensor]:
        """The buffers that hold ``w`` during a step, aligned with ``view.params``: views of a
        split's flat buffer for its small weights where :meth:`_save_weights` gathers them."""
        layout = view.layout
        aligned = layout.buffers.get("backup aligned")
        if aligned is None:
            aligned = list(self._scratch(view, "backup"))
            positions = layout.splits or [list(range(len(view.params)))]
            splits = zip(view.split(view.params), view.split(aligned), positions, strict=True)
            for i, (part, saved, where) in enumerate(splits):
                plan = layout.flat_buffer(("backup", i), part)
                if plan is not None and plan.vectors >= 2:
                    for j, buffer in zip(where, plan.with_pieces(saved), strict=True):
                        aligned[j] = buffer
            layout.buffers["backup aligned"] = aligned
        return aligned

    def _restore(self) -> None:
        for params, backups, foreach in self._saved:
            _kernels.copy_(params, backups, foreach)
        self._saved = []

    def _global_norm(self, views: list[GroupView], tensor_lists: list[list[Tensor]]) -> Tensor:
        """The 2-norm of all tensors in ``tensor_lists`` (each aligned with a view) together.

        Per-tensor norms are taken in at least float32 (with ``torch._foreach_norm``, or one
        ``torch.linalg.vector_norm`` per tensor where the group's ``foreach`` is False),
        gathered on the first tensor's device, and combined in one norm (as the seed does).
        The result stays on the device (a 0-dim tensor): no synchronisation. Distributed
        training overrides :meth:`_reduce_norm`.
        """
        stacks: list[Tensor] = []
        for view, tensors in zip(views, tensor_lists, strict=True):
            foreach = group_foreach(view.group)
            for i, part in enumerate(view.split(tensors)):
                if foreach:
                    acc = torch.promote_types(part[0].dtype, torch.float32)
                    plan = view.layout.flat_buffer(i, part)
                    if plan is None:
                        stacks.append(torch.stack(torch._foreach_norm(part, 2, dtype=acc)))
                        continue
                    # small CPU tensors: one copy into a flat buffer, one norm
                    large = plan.fill(part)
                    flat_norm = torch.linalg.vector_norm(plan.flat, dtype=acc, dim=0, keepdim=True)
                    stacks.append(flat_norm)
                    if large:
                        stacks.append(torch.stack(torch._foreach_norm(large, 2, dtype=acc)))
                else:
                    part = [real_view(t) for t in part]
                    acc = torch.promote_types(part[0].dtype, torch.float32)
                    stacks.append(
                        torch.stack([torch.linalg.vector_norm(t, dtype=acc) for t in part])
                    )
        if not stacks:
            return torch.zeros(())
        if len(stacks) == 1:
            norms = stacks[0]
        else:
            device, dtype = stacks[0].device, stacks[0].dtype
            for st in stacks[1:]:
                dtype = torch.promote_types(dtype, st.dtype)
            norms = torch.cat([st.to(device=device, dtype=dtype) for st in stacks])
        return self._reduce_norm(_dtensor.full(torch.linalg.vector_norm(norms)))

    def _global_dot(
        self, views: list[GroupView], xs: list[list[Tensor]], ys: list[list[Tensor]]
    ) -> Tensor:
        """The inner product of all tensors in ``xs`` with those in ``ys`` (aligned with views).

        One ``torch.dot`` per tensor whatever ``foreach`` says (there is no multi-tensor inner
        product), accumulated in at least float32 (float64 across tensors). A complex tensor
        counts as its real view (``torch.view_as_real``): the real inner product
        ``Re <x, conj(y)>``. The result stays on the device (a 0-dim float64 tensor).
        Distributed training overrides :meth:`_reduce_sum`.
        """
        parts: list[Tensor] = []
        for x_list, y_list in zip(xs, ys, strict=True):
            for x, y in zip(x_list, y_list, strict=True):
                x, y = real_view(x), real_view(y)
                acc = torch.promote_types(x.dtype, torch.float32)
                if _dtensor.is_dtensor(x):  # FSDP2: a partial sum on each rank
                    dot = _dtensor.dot(x, y, acc)
                else:
                    dot = torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc))
                parts.append(dot.to(parts[0].device) if parts else dot)
        if not parts:  # no parameter has a gradient on this step
            return torch.zeros((), dtype=torch.float64)
        return self._reduce_sum(_dtensor.full(torch.stack(parts).to(torch.float64).sum()))

    def _reduce_sum(self, local_sum: Tensor) -> Tensor:
        """Combine this process's partial sum with the other processes' (identity here)."""
        return local_sum

    def _reduce_norm(self, local_norm: Tensor) -> Tensor:
        """Combine this process's norm with the other processes' (identity on one process)."""
        return local_norm

    # ------------------------------------------------------------------ state dict
    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """One optimizer state dict holding the base optimizer's state and torchsam's own.

        Per-parameter entries hold the base optimizer's keys unchanged and torchsam's keys
        prefixed with ``"sam."``. The param groups carry both sets of hyper-parameters, the
        variant's options and the optimizer-wide state (``"sam_step"``, ...). State-dict hooks
        registered on this optimizer run as for any ``torch.optim`` optimizer.
        """
        self._require_idle("state_dict()")
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        packed = self.base_optimizer.state_dict()
        for packed_group in packed["param_groups"]:  # wide state kept on the device: to floats
            for key, value in packed_group.items():
                if key.startswith(WIDE_PREFIX) and isinstance(value, Tensor):
                    packed_group[key] = value.item()
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        state: dict[Any, dict[str, Any]] = dict(packed["state"])
        for key, own in self.state.items():
            if own and isinstance(key, Tensor):
                i = index[id(key)]
                state[i] = {**state.get(i, {}), **{STATE_PREFIX + k: v for k, v in own.items()}}
        packed["state"] = state
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, packed)
            if result is not None:
                packed = result
        return packed

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict` into this optimizer and its base optimizer.

        The param groups are validated as the constructor validates its arguments (nothing is
        changed when that fails); hyper-parameters and options missing from a checkpoint of an
        older torchsam are taken from this optimizer's current groups; a state dict saved by a
        different variant (one with hyper-parameters this one does not have) is refused.
        State-dict hooks registered on this optimizer run as for any ``torch.optim`` optimizer.
        """
        self._require_idle("load_state_dict()")
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise TypeError(
                "load_state_dict() expects a dict made by state_dict(), with 'state' and "
                f"'param_groups'; got {type(state_dict).__name__}"
            )
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        entries = dict(state_dict["state"])
        legacy = entries.pop(_LEGACY_GLOBAL, None) or {}  # older checkpoints' wide state
        if entries and not any(
            not isinstance(v, dict) for entry in entries.values() for v in entry.values()
        ):
            raise RuntimeError(
                f"{type(self).__name__}.load_state_dict(): the per-parameter entries hold no "
                "state values (only empty dicts), which is what torch.distributed.checkpoint's "
                "set_state_dict / set_optimizer_state_dict pass with "
                "StateDictOptions(flatten_optimizer_state_dict=True): it rebuilds the entries "
                "from optimizer.state, which holds torchsam's own state only, and would drop "
                "the base optimizer's. Save and load with flatten_optimizer_state_dict=False "
                "(the default)"
            )
        groups = [dict(g) for g in state_dict["param_groups"]]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}; build the optimizer with the same groups as the one "
                "that was saved"
            )
        for group, current in zip(groups, self.param_groups, strict=True):
            self._check_foreign_keys(group, current)
            for key, value in legacy.items():
                group.setdefault(WIDE_PREFIX + key, value)
            group.setdefault(_STEP, 0)
            for key in self._own_defaults:
                if key not in group:
                    group[key] = current[key]
            self._check_group(group)
        self._check_groups(groups)

        base_state: dict[Any, dict[str, Any]] = {}
        own_state: dict[Any, dict[str, Any]] = {}
        for key, entry in entries.items():
            base_entry = {k: v for k, v in entry.items() if not k.startswith(STATE_PREFIX)}
            own_entry = {
                k[len(STATE_PREFIX) :]: v for k, v in entry.items() if k.startswith(STATE_PREFIX)
            }
            if base_entry:
                base_state[key] = base_entry
            if own_entry:
                own_state[key] = own_entry
        self.base_optimizer.load_state_dict({"state": base_state, "param_groups": groups})
        self.param_groups = self.base_optimizer.param_groups
        # The saved groups name their parameters by index (or, through DCP, by their fully
        # qualified names); positions match the current groups, as torch.optim assumes.
        id_map = dict(
            zip(
                (i for group in groups for i in group["params"]),
                (p for group in self.param_groups for p in group["params"]),
                strict=True,
            )
        )
        restored = _OwnState(self.base_optimizer)
        for key, entry in own_state.items():
            p = id_map[key]
            restored[p] = {k: _to_param(v, p) for k, v in entry.items()}
        self.state = restored
        self._layouts = {}  # the group dicts are new
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_foreign_keys(self, saved: dict[str, Any], current: dict[str, Any]) -> None:
        """Refuse a group saved by another torchsam optimizer (it has that one's arguments)."""
        classes = _all_subclasses(SharpnessAwareOptimizer)
        known = set().union(*(_declared(c) for c in classes))
        foreign = (known & saved.keys()) - self._own_defaults.keys() - current.keys()
        if foreign:
            owners = sorted({c.__name__ for c in classes if foreign & _declared(c)})
            raise ValueError(
                f"this state dict was saved by a different optimizer: its param groups have "
                f"{', '.join(sorted(foreign))}, which {type(self).__name__} does not take (they "
                f"belong to {', '.join(owners)}); load it into the optimizer class that saved it"
            )


class _OwnState(defaultdict[Any, dict[str, Any]]):
    """torchsam's own per-parameter state; true when it or the base optimizer's state holds
    anything (``torch.distributed.checkpoint`` tests ``optimizer.state`` to decide whether the
    state still has to be created by a step)."""

    def __init__(self, base: Optimizer) -> None:
        super().__init__(dict)
        self.base = base

    def __bool__(self) -> bool:
        return len(self) > 0 or bool(self.base.state)

    def __reduce__(self) -> Any:
        return (_OwnState, (self.base,), None, None, iter(self.items()))


class _WideState:
    """The optimizer-wide state, kept under ``"sam_<key>"`` in every param group (read from the
    first; each group holds the same value, so any one group carries it)."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups

    def get(self, key: str, default: Any = None) -> Any:
        return self._groups[0].get(WIDE_PREFIX + key, default)

    def __getitem__(self, key: str) -> Any:
        return self._groups[0][WIDE_PREFIX + key]

    def __setitem__(self, key: str, value: Any) -> None:
        for group in self._groups:
            group[WIDE_PREFIX + key] = value


def _declared(cls: type) -> set[str]:
    """The hyper-parameters and options a torchsam optimizer class declares."""
    return set(getattr(cls, "hyperparameters", {})) | set(getattr(cls, "options", {}))


def _all_subclasses(cls: type) -> list[type]:
    found: list[type] = []
    for sub in cast(list[type], cls.__subclasses__()):
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def _check_base_optimizer(name: str, base: Optimizer) -> None:
    """Refuse base optimizers that cannot take a sharpness-aware step."""
    if isinstance(base, torch.optim.LBFGS):
        raise TypeError(
            f"{name} cannot wrap torch.optim.LBFGS: LBFGS re-evaluates its own closure many "
            "times per step, while the base step here must use the one gradient at w + e(w); "
            "use a first-order optimizer (SGD, Adam, AdamW, ...)"
        )
    if base.defaults.get("differentiable") or any(
        g.get("differentiable") for g in base.param_groups
    ):
        raise ValueError(
            f"{name} does not support differentiable=True: its steps run under no_grad and "
            "restore the weights in place, so no graph through the step exists; build the "
            "base optimizer without differentiable=True"
        )


def _unscale_once(grad_scaler: Any, optimizer: Optimizer) -> None:
    """``grad_scaler.unscale_(optimizer)`` unless it was already called in this iteration."""
    try:
        grad_scaler.unscale_(optimizer)
    except RuntimeError as error:
        if "already been called" not in str(error):
            raise


def _first_grad(groups: list[dict[str, Any]]) -> tuple[Tensor, Tensor, int] | None:
    """(gradient, parameter, version) of the first parameter that has a gradient."""
    for group in groups:
        for p in group["params"]:
            g = p.grad
            if g is not None:
                return g, p, g._version
    return None


def _frames() -> Iterable[Any]:
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back  # type: ignore[assignment]


def real_view(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or its real view (``torch.view_as_real``) if it is complex."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _to_param(value: Any, param: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point() and param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)


def _same_objects(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _split_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]] | None:
    """Index lists of ``tensors`` per (device, dtype), or None when there is only one."""
    keys = [(t.device, t.dtype) for t in tensors]
    if keys.count(keys[0]) == len(keys):
        return None
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


_Flags = dict[torch.device, tuple[Tensor, Tensor, Tensor]]


def _flag_nonfinite(
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
            _flag_nonfinite_values(part, *flag_on(part[0].device))


def _flag_nonfinite_values(tensors: list[Tensor], found: Tensor, one: Tensor) -> None:
    """``found = 1`` if an element of ``tensors`` (on ``found``'s device) is not finite.

    Where the fused kernel is missing for a device, the largest absolute value (which cannot
    overflow) decides instead; still no synchronisation.
    """
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    except (RuntimeError, NotImplementedError):
        peak = torch.stack(torch._foreach_norm(tensors, float("inf"))).max()
        found.copy_(torch.where(torch.isfinite(peak), found, torch.ones_like(found)))


def _nonfinite_message(name: str, status: float) -> str:
    if status != status:  # NaN: the norm in first_step()
        return (
            f"{name}: the gradient norm in first_step() was not finite (inf or NaN), so "
            "second_step() skipped the step: the weights are back at w and the base optimizer "
            "took no step. With float16 autocast this is expected while a GradScaler calibrates "
            "its scale."
        )
    return (
        f"{name}.second_step(): a gradient is not finite (inf or NaN); the base optimizer step "
        "was skipped and the weights are unchanged."
    )


def _check_same_partition(own: list[dict[str, Any]], base: list[dict[str, Any]]) -> None:
    same = len(own) == len(base) and all(
        len(a["params"]) == len(b["params"])
        and all(p is q for p, q in zip(a["params"], b["params"], strict=True))
        for a, b in zip(own, base, strict=True)
    )
    if not same:
        raise ValueError(
            "params must list the same parameters, in the same groups and order, as the "
            "already built base optimizer; pass base_optimizer.param_groups' parameters, or pass "
            "the optimizer class instead of an instance"
        )


def group_foreach(group: dict[str, Any]) -> bool:
    """Whether a group uses the multi-tensor (``torch._foreach_*``) kernels."""
    foreach = group.get("foreach")
    return True if foreach is None else bool(cast(bool, foreach))
