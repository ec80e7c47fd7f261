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
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["GroupView", "SharpnessAwareOptimizer"]

# Phases of a step: at w; at w + e (second pass due); first gradient not finite (step skipped);
# no second pass on this step (the gradients at w are kept for second_step).
_IDLE, _PERTURBED, _SKIPPED, _ONE_PASS = "idle", "perturbed", "skipped", "one pass"

# Key of the optimizer-wide entry (step counter, ...) in ``self.state`` and ``state_dict()``.
_GLOBAL = "sam"

# Keys of torchsam's own per-parameter state are stored under this prefix in ``state_dict()``
# so that they never collide with the base optimizer's keys ("momentum_buffer", "exp_avg", ...).
STATE_PREFIX = "sam."

BaseOptimizerArg = type[Optimizer] | Callable[..., Optimizer] | Optimizer


@dataclass
class _Layout:
    """What is fixed while a group's set of parameters with gradients does not change.

    Cached between steps so that a step does no per-parameter Python work beyond collecting
    the gradients: the index lists per (device, dtype) (``None`` when there is only one) and
    persistent scratch buffers by name, aligned with ``params``.
    """

    params: list[Tensor]
    splits: list[list[int]] | None
    buffers: dict[str, list[Tensor]] = field(default_factory=dict)


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
        self._own_defaults = dict(own_defaults)
        self._phase = _IDLE
        self._kept_grads: list[tuple[Tensor, int]] = []
        self._kept_views: list[GroupView] = []
        self._first_layouts: list[_Layout] = []
        # Workspace, not state: scratch buffers per parameter (never saved, reallocated after a
        # load), the cached layouts per group, and the (params, backups) pairs of this step.
        self._workspace: dict[str, dict[Tensor, Tensor]] = {}
        self._layouts: dict[int, _Layout] = {}
        self._finite_flags: _Flags = {}
        self._saved: list[tuple[list[Tensor], list[Tensor]]] = []

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"{type(self).__name__} got keyword arguments {sorted(base_kwargs)} together "
                    "with an already built base optimizer; pass the optimizer class instead, or "
                    "set those options when you build the base optimizer"
                )
            super().__init__(params, self._own_defaults)
            _check_same_partition(self.param_groups, base_optimizer.param_groups)
            for own_group, base_group in zip(
                self.param_groups, base_optimizer.param_groups, strict=True
            ):
                for key in self._own_defaults:
                    base_group[key] = own_group[key]
            self.base_optimizer = base_optimizer
        elif callable(base_optimizer):
            # The seed's contract: the keyword arguments go to the base optimizer and are also
            # recorded in this optimizer's defaults.
            super().__init__(params, {**self._own_defaults, **base_kwargs})
            built = base_optimizer(self.param_groups, **base_kwargs)
            if not isinstance(built, Optimizer):
                raise TypeError(
                    "base_optimizer must be a torch.optim.Optimizer subclass, a callable that "
                    "returns an optimizer, or an optimizer instance; calling it gave "
                    f"{type(built)!r}"
                )
            self.base_optimizer = built
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), "
                "a callable that returns an optimizer, or an optimizer instance; "
                f"got {type(base_optimizer)!r}"
            )
        # One list of group dicts, shared: what a scheduler writes, the base optimizer reads.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        for group in self.param_groups:
            self._init_group(group)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to this optimizer and to its base optimizer (they share groups)."""
        for key, default in self._own_defaults.items():
            param_group.setdefault(key, default)
        self._check_group(param_group)
        base = getattr(self, "base_optimizer", None)
        if base is None:  # still inside __init__: build our own list first
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)
            self._init_group(param_group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an invalid hyper-parameter of this optimizer in ``group``."""

    def _init_group(self, group: dict[str, Any]) -> None:
        """Complete a group once the base optimizer's defaults are in it; nothing by default."""

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
    def _global_state(self) -> dict[str, Any]:
        """The optimizer-wide entry of the state (saved in ``state_dict()`` under ``"sam"``)."""
        return cast(dict[str, Any], self.state[cast(Tensor, _GLOBAL)])

    def _step_count(self) -> int:
        """Optimisation steps finished so far."""
        return int(self._global_state.get("step", 0))

    # ------------------------------------------------------------------ the two steps
    def _views(self) -> list[GroupView]:
        views = []
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
            if layout is None or not _same_objects(layout.params, params):
                # A parameter's gradient layout is fixed by its module (``sparse=True``), so
                # checking when the set of parameters changes is enough.
                if any(g.is_sparse for g in grads):
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use a dense "
                        "embedding or a different optimizer for sparse parameters"
                    )
                layout = _Layout(params, _split_by_device_and_dtype(params))
                self._layouts[id(group)] = layout
            views.append(GroupView(group, params, grads, layout))
        return views

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Move the weights to the (approximate) worst point ``w + e(w)`` of the neighbourhood.

        Call it after the first backward pass. Returns True when the weights were perturbed and
        the second forward/backward pass is due. It returns False, and :meth:`second_step` is
        still expected (without a second pass), in two cases:

        * the gradient norm is not finite: the weights stay at ``w``, a warning is issued and
          the step is skipped (:meth:`second_step` takes no base step), as a ``GradScaler``
          skips an overflowing iteration;
        * the variant takes no second pass on this step (LookSAM between its sharpness steps,
          intermittent SAM): the gradients are kept, whatever ``zero_grad`` says, and
          :meth:`second_step` steps with them.

        Args:
            zero_grad (bool, optional): clear the gradients afterwards when a second pass
                follows (default: False)
        """
        self._require_two_call_style()
        return self._first_step(zero_grad)

    def _first_step(self, zero_grad: bool) -> bool:
        self._require_idle("first_step()")
        views = self._views()
        if not self._wants_second_pass():
            self._phase = _ONE_PASS
            self._kept_views = views
            self._kept_grads = [(g, g._version) for v in views for g in v.grads]
            return False
        self._saved = []
        if views and not self._perturb(views):
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
            if self._needs_first_grads:
                for v in views:
                    torch._foreach_copy_(self._scratch(v, "first_grad"), v.grads)
        if zero_grad:
            self.zero_grad()
        return self._phase == _PERTURBED

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
        if phase == _ONE_PASS and own_closure:
            self._kept_grads = []
            self._finish(kept, grad_scaler, two_pass=False)
        elif phase != _SKIPPED:
            views = self._views()
            if phase == _ONE_PASS:
                self._check_kept_grads(views)
            elif self._needs_first_grads:
                self._check_same_layouts(views)
            self._finish(views, grad_scaler, two_pass=phase == _PERTURBED)
        self._global_state["step"] = self._step_count() + 1
        # Tell LR schedulers built on this optimizer that it has stepped (what their own
        # wrapper of ``step`` records), so two-call users get no ordering warning.
        self._opt_called = True

    def _finish(self, views: list[GroupView], grad_scaler: Any, *, two_pass: bool) -> None:
        """Check the gradients at ``w``'s step, let the policy shape them, take the base step."""
        if grad_scaler is not None:
            # Unscale for the base optimizer: true gradients for the policy, and the scaler
            # records any inf/NaN it finds here for its update().
            grad_scaler.unscale_(self.base_optimizer)
        finite = self._grads_finite(views) if two_pass else self._one_pass_grads_finite(views)
        if not finite:
            if grad_scaler is None:  # with a scaler, skipping on overflow is routine
                warnings.warn(
                    f"{type(self).__name__}.second_step(): a gradient is not finite (inf or "
                    "NaN); the base optimizer step was skipped and the weights are unchanged.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        if two_pass:
            self._prepare_base_grads(views)
        else:
            self._prepare_one_pass_grads(views)
        self._base_optimizer_step(views)
        self._after_base_step(views)

    def _check_kept_grads(self, views: list[GroupView]) -> None:
        now = [g for v in views for g in v.grads]
        kept = self._kept_grads
        self._kept_grads = []
        if len(now) != len(kept) or any(
            g is not k or g._version != version for g, (k, version) in zip(now, kept, strict=True)
        ):
            raise RuntimeError(
                f"{type(self).__name__} takes no second pass on this step (first_step() "
                "returned False), but the gradients changed before second_step(); run the "
                "second forward/backward pass only when first_step() returns True, or use "
                "step(closure)"
            )

    def _check_same_layouts(self, views: list[GroupView]) -> None:
        if not _same_objects([v.layout for v in views], self._first_layouts):
            raise RuntimeError(
                f"{type(self).__name__} needs gradients for the same parameters in both passes, "
                "but the second pass produced gradients for a different set of parameters"
            )

    @Optimizer.profile_hook_step
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Return to ``w`` and let the base optimizer step with the gradient at ``w + e``.

        Call it after the second backward pass (or, when :meth:`first_step` returned False,
        right after it). Registered step pre/post hooks run around it, as they do around
        :meth:`step`. Gradients that are not finite skip the base step (with a warning) and
        leave the weights exactly at ``w``.

        Args:
            zero_grad (bool, optional): clear the gradients afterwards (default: False)
            grad_scaler (torch.amp.GradScaler, optional): for mixed precision: the gradients
                are unscaled with ``grad_scaler.unscale_(self.base_optimizer)`` first, and an
                overflow skips the base step silently, as ``grad_scaler.step`` would; call
                ``grad_scaler.update()`` afterwards (default: None)
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one full sharpness-aware step with two evaluations of ``closure``.

        The closure must clear the gradients, compute the loss at the current weights, call
        ``backward()`` and return the loss. It is evaluated at ``w`` and at ``w + e(w)``
        (with gradients enabled), then the weights return to ``w`` and the base optimizer steps.
        Variants that skip the second pass on some steps evaluate it once on those steps.

        Args:
            closure (Callable): re-evaluates the model and returns the loss

        Returns:
            the loss returned by the closure at ``w``.
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that clears the gradients, "
                "computes the loss and calls backward(): step(closure). Without a closure, call "
                "first_step() after the first backward pass and second_step() after the second."
            )
        self._require_idle("step()")
        with torch.enable_grad():
            loss = closure()
        if self._first_step(zero_grad=True):
            self._closure_at_perturbed_point(closure)
        self._second_step(own_closure=True)
        return loss

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
        self._restore()
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

    def _one_pass_grads_finite(self, views: list[GroupView]) -> bool:
        """Whether the gradients of a step without second pass are all finite.

        A variant that needs their norm anyway may decide from it (and keep it for
        :meth:`_prepare_one_pass_grads`, called right after within the same step).
        """
        return self._grads_finite(views)

    def _grads_finite(self, views: list[GroupView]) -> bool:
        return _all_finite(views, self._finite_flags)

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
            self.base_optimizer.step()
            return
        try:
            for v in swapped:
                for p, g in zip(v.params, cast(list[Tensor], v.base_grads), strict=True):
                    p.grad = g
            self.base_optimizer.step()
        finally:
            for v in swapped:
                for p, g in zip(v.params, v.grads, strict=True):
                    p.grad = g

    def _save_weights(self, view: GroupView, foreach: bool) -> None:
        """Copy the weights of ``view`` aside so that :meth:`_restore` is bit-exact."""
        backups = self._scratch(view, "backup")
        if foreach:
            torch._foreach_copy_(backups, view.params)
        else:
            for buf, p in zip(backups, view.params, strict=True):
                buf.copy_(p)
        self._saved.append((view.params, backups))

    def _restore(self) -> None:
        for params, backups in self._saved:
            torch._foreach_copy_(params, backups)
        self._saved = []

    def _global_norm(self, views: list[GroupView], tensor_lists: list[list[Tensor]]) -> float:
        """The 2-norm of all tensors in ``tensor_lists`` (each aligned with a view) together.

        Per-tensor norms are taken in at least float32, gathered on the first tensor's device,
        and combined in one norm (as the seed does). The result comes to the host as a Python
        float: this one synchronisation per step is what lets a non-finite norm be caught
        before it reaches the weights. Distributed training overrides :meth:`_reduce_norm`.
        """
        stacks: list[Tensor] = []
        for view, tensors in zip(views, tensor_lists, strict=True):
            for part in view.split(tensors):
                acc = torch.promote_types(part[0].dtype, torch.float32)
                stacks.append(torch.stack(torch._foreach_norm(part, 2, dtype=acc)))
        if not stacks:
            return 0.0
        if len(stacks) == 1:
            norms = stacks[0]
        else:
            device, dtype = stacks[0].device, stacks[0].dtype
            for st in stacks[1:]:
                dtype = torch.promote_types(dtype, st.dtype)
            norms = torch.cat([st.to(device=device, dtype=dtype) for st in stacks])
        return float(self._reduce_norm(torch.linalg.vector_norm(norms)))

    def _global_dot(
        self, views: list[GroupView], xs: list[list[Tensor]], ys: list[list[Tensor]]
    ) -> float:
        """The inner product of all tensors in ``xs`` with those in ``ys`` (aligned with views).

        Accumulated in at least float32 (float64 across tensors). Distributed training
        overrides :meth:`_reduce_sum`.
        """
        parts: list[Tensor] = []
        for x_list, y_list in zip(xs, ys, strict=True):
            for x, y in zip(x_list, y_list, strict=True):
                acc = torch.promote_types(x.dtype, torch.float32)
                dot = torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc))
                parts.append(dot.to(parts[0].device) if parts else dot)
        if not parts:  # no parameter has a gradient on this step
            return 0.0
        return float(self._reduce_sum(torch.stack(parts).to(torch.float64).sum()))

    def _reduce_sum(self, local_sum: Tensor) -> Tensor:
        """Combine this process's partial sum with the other processes' (identity here)."""
        return local_sum

    def _reduce_norm(self, local_norm: Tensor) -> Tensor:
        """Combine this process's norm with the other processes' (identity on one process)."""
        return local_norm

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """One optimizer state dict holding the base optimizer's state and torchsam's own.

        Per-parameter entries hold the base optimizer's keys unchanged and torchsam's keys
        prefixed with ``"sam."``. The param groups carry both sets of hyper-parameters.
        """
        self._require_idle("state_dict()")
        packed = self.base_optimizer.state_dict()
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        state: dict[Any, dict[str, Any]] = dict(packed["state"])
        for key, own in self.state.items():
            if not own:
                continue
            if isinstance(key, Tensor):
                i = index[id(key)]
                state[i] = {**state.get(i, {}), **{STATE_PREFIX + k: v for k, v in own.items()}}
            else:  # the optimizer-wide entry (step counter, ...)
                state[key] = dict(own)
        packed["state"] = state
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict made by :meth:`state_dict` into this optimizer and its base optimizer."""
        self._require_idle("load_state_dict()")
        if not isinstance(state_dict, dict) or "state" not in state_dict:
            raise TypeError("load_state_dict() expects a dict made by state_dict()")
        base_state: dict[Any, dict[str, Any]] = {}
        own_state: dict[Any, dict[str, Any]] = {}
        restored: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for key, entry in state_dict["state"].items():
            if key == _GLOBAL:
                restored[_GLOBAL] = dict(entry)
                continue
            base_entry = {k: v for k, v in entry.items() if not k.startswith(STATE_PREFIX)}
            own_entry = {
                k[len(STATE_PREFIX) :]: v for k, v in entry.items() if k.startswith(STATE_PREFIX)
            }
            if base_entry:
                base_state[key] = base_entry
            if own_entry:
                own_state[key] = own_entry
        groups = state_dict["param_groups"]
        self.base_optimizer.load_state_dict({"state": base_state, "param_groups": groups})
        self.param_groups = self.base_optimizer.param_groups
        params = [p for group in self.param_groups for p in group["params"]]
        for key, entry in own_state.items():
            p = params[int(key)]
            restored[p] = {k: _to_param(v, p) for k, v in entry.items()}
        self.state = restored
        self._layouts = {}  # the group dicts are new


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


_Flags = dict[torch.device, tuple[Tensor, Tensor]]


def _all_finite(views: list[GroupView], flags: _Flags) -> bool:
    """Whether every gradient element of ``views`` is finite (one synchronisation per device).

    Uses the fused check that ``GradScaler`` runs (with a scale of 1, which leaves finite
    values bit-identical); where that kernel is missing, a 2-norm pass, confirmed by a max-abs
    pass if the 2-norm overflowed. ``flags`` caches the (found, one) scalars per device.
    """
    used: dict[torch.device, Tensor] = {}
    for view in views:
        for part in view.split(view.grads):
            device = part[0].device
            if device not in used:
                if device not in flags:
                    flags[device] = (torch.zeros(1, device=device), torch.ones(1, device=device))
                used[device] = flags[device][0].zero_()
            found, one = flags[device]
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(part, found, one)
            except (RuntimeError, NotImplementedError):
                acc = torch.promote_types(part[0].dtype, torch.float32)
                norms = torch.stack(torch._foreach_norm(part, 2, dtype=acc))
                if not bool(torch.isfinite(norms).all()):
                    peak = torch.stack(torch._foreach_norm(part, float("inf"))).max()
                    if not bool(torch.isfinite(peak)):
                        found.fill_(1.0)
    return not any(bool(found.item()) for found in used.values())


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
