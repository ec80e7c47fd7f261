"""The base optimizer: built from the ``base_optimizer`` argument, checked, and stepped."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from torchsam._engine._checkpoint import STEP
from torchsam._engine._layout import GroupView
from torchsam._engine._state import WIDE_PREFIX

__all__ = [
    "BaseOptimizerArg",
    "adopt",
    "build",
    "check_base_argument",
    "fill_group",
    "step_with",
    "takes_found_inf",
]

BaseOptimizerArg = type[Optimizer] | Callable[..., Optimizer] | Optimizer

_NOT_AN_OPTIMIZER = (
    "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD), a callable "
    "that returns an optimizer, or an optimizer instance; "
)


def check_base_argument(
    name: str,
    base_optimizer: Any,
    own: Iterable[str],
    base_kwargs: dict[str, Any],
    params: Any = None,
) -> None:
    """Refuse a ``base_optimizer`` argument (with ``base_kwargs``) that cannot give a base
    optimizer, and a module passed as ``params``, before any param group is built."""
    if isinstance(params, torch.nn.Module):
        raise TypeError(
            f"{name} got the module {type(params).__name__} as params; pass "
            "its parameters instead: model.parameters() (or a list of param group dicts)"
        )
    if isinstance(base_optimizer, Optimizer):
        if base_kwargs:
            raise TypeError(
                f"{name} got keyword arguments {sorted(base_kwargs)} together "
                "with an already built base optimizer; pass the optimizer class instead, or "
                "set those options when you build the base optimizer"
            )
        check_base_optimizer(name, base_optimizer)
    elif isinstance(base_optimizer, type) and not issubclass(base_optimizer, Optimizer):
        raise TypeError(
            _NOT_AN_OPTIMIZER + "got the class "
            f"{base_optimizer.__module__}.{base_optimizer.__qualname__}, which is not an "
            "optimizer"
        )
    elif not callable(base_optimizer):
        raise TypeError(_NOT_AN_OPTIMIZER + f"got {type(base_optimizer)!r}")
    else:
        _refuse_unknown_kwargs(name, base_optimizer, own, base_kwargs)


def _refuse_unknown_kwargs(
    name: str, factory: Callable[..., Any], own: Iterable[str], base_kwargs: dict[str, Any]
) -> None:
    """Name the first keyword argument that neither this optimizer nor the base optimizer's
    constructor takes (read from its signature; a constructor with ``**kwargs``, or one
    without a signature, is left to decide for itself)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    named = {
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = [key for key in base_kwargs if key not in named]
    if unknown:
        accepted = ", ".join(k for k in own if not k.startswith("_"))
        base_name = getattr(factory, "__name__", repr(factory))
        raise TypeError(
            f"{name} got an unexpected keyword argument '{unknown[0]}': it is "
            f"neither an argument of {name} ({accepted}) nor of the base optimizer "
            f"{base_name}, which received the other keyword arguments"
        )


def build(
    name: str,
    factory: Callable[..., Any],
    groups: list[dict[str, Any]],
    base_kwargs: dict[str, Any],
) -> Optimizer:
    """``factory(groups, **base_kwargs)``, checked to be an optimizer torchsam can wrap."""
    built = factory(groups, **base_kwargs)
    if not isinstance(built, Optimizer):
        raise TypeError(_NOT_AN_OPTIMIZER + f"calling it gave {type(built)!r}")
    check_base_optimizer(name, built)
    return built


def adopt(base: Optimizer, groups: list[dict[str, Any]], keys: Iterable[str]) -> Optimizer:
    """An already built ``base`` over the same ``groups``, with ``keys`` of each group copied
    into its own groups."""
    same = len(groups) == len(base.param_groups) and all(
        len(a["params"]) == len(b["params"])
        and all(p is q for p, q in zip(a["params"], b["params"], strict=True))
        for a, b in zip(groups, base.param_groups, strict=True)
    )
    if not same:
        raise ValueError(
            "params must list the same parameters, in the same groups and order, as the "
            "already built base optimizer; pass base_optimizer.param_groups' parameters, or pass "
            "the optimizer class instead of an instance"
        )
    keys = list(keys)
    for own_group, base_group in zip(groups, base.param_groups, strict=True):
        for key in keys:
            base_group[key] = own_group[key]
    return base


def fill_group(
    group: dict[str, Any], own_defaults: dict[str, Any], groups: list[dict[str, Any]]
) -> None:
    """Give a new param ``group`` the variant's defaults, the optimizer-wide state as the
    other ``groups`` hold it, and the step counter."""
    for key, default in own_defaults.items():
        group.setdefault(key, default)
    if groups:
        for key, value in groups[0].items():
            if key.startswith(WIDE_PREFIX):
                group.setdefault(key, value)
    group.setdefault(STEP, 0)


def check_base_optimizer(name: str, base: Optimizer) -> None:
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


def step_with(base: Optimizer, views: list[GroupView], found_inf: Tensor | None = None) -> None:
    """Run ``base.step()`` with each view's ``base_grads`` in place of ``p.grad``.

    A plain call: the hooks registered on the base optimizer, the global step hooks and the
    profiler see the base step as the step of an optimizer nested in the sharpness-aware one.
    When none of them is there to see it, the step is called without the wrapper through
    which ``torch.optim`` runs them (see :func:`_bare_step`).
    ``p.grad`` points at the scratch buffers only for the duration of the base step and is put
    back to the user's gradient tensors afterwards, also when the step raises. ``found_inf``
    (for a base that declares ``_step_supports_amp_scaling``, torch's fused optimizers): the
    device-side flag that skips the step, handed over as ``GradScaler.step`` hands its own.
    """
    swapped = [v for v in views if v.base_grads is not None]
    try:
        for v in swapped:
            for p, g in zip(v.params, cast(list[Tensor], v.base_grads), strict=True):
                p.grad = g
        if found_inf is not None:
            base.found_inf = found_inf  # type: ignore[attr-defined]
            base.grad_scale = None  # type: ignore[attr-defined]
        bare = _bare_step(base)
        if bare is None:
            base.step()
        else:
            bare(base)
    finally:
        base.__dict__.pop("found_inf", None)
        base.__dict__.pop("grad_scale", None)
        for v in swapped:
            for p, g in zip(v.params, v.grads, strict=True):
                p.grad = g


def takes_found_inf(base: Optimizer) -> bool:
    """Whether ``base.step()`` takes a device-side ``found_inf`` flag (torch's fused
    optimizers declare it for ``GradScaler`` with ``_step_supports_amp_scaling``)."""
    return bool(getattr(base, "_step_supports_amp_scaling", False))


#: the code of the wrapper ``torch.optim`` puts around every optimizer class's ``step``
#: (``Optimizer.profile_hook_step``): a ``step`` with other code (a subclass's override
#: decorated with ``functools.wraps``, a class-level patch, ``torch.compile``) is not skipped
_TORCH_STEP_WRAPPER = getattr(Optimizer.profile_hook_step(lambda *a, **k: None), "__code__", None)


def _bare_step(base: Optimizer) -> Callable[[Optimizer], Any] | None:
    """``base``'s own ``step`` without the wrapper ``torch.optim`` puts around every
    optimizer's ``step`` (``Optimizer.profile_hook_step``), when that wrapper would do nothing
    anyone sees: ``type(base).step`` is that wrapper itself (not a function that wraps it), no
    step hook is registered on ``base`` or globally, no profiler runs in this thread,
    ``_optimizer_step_code`` (where a profiler's Python tracer hooks in) is torch's own, and
    ``step`` is not replaced on the instance (an LR scheduler built on ``base`` does that).
    Else None: call ``base.step()``. The wrapper costs a profiler range even when no profiler
    runs (10-24 us a step on the CPU VM, as much as a small optimizer step's kernels).

    What torch does not let us see: an ``ExecutionTraceObserver`` used without a profiler, a
    trace started by a daemon outside this thread, or a ``TorchDispatchMode`` watching the
    profiler's operators miss the nested base step's range; registering any global step hook
    (``torch.optim.optimizer.register_optimizer_step_pre_hook``) brings the plain call back."""
    step = type(base).step
    bare = getattr(step, "__wrapped__", None)
    code = getattr(step, "__code__", None)
    if bare is None or code is None or code is not _TORCH_STEP_WRAPPER:
        return None
    if "step" in vars(base) or "_optimizer_step_code" in vars(base):
        return None
    if type(base)._optimizer_step_code is not Optimizer._optimizer_step_code:
        return None
    if getattr(base, "_optimizer_step_pre_hooks", True) or getattr(
        base, "_optimizer_step_post_hooks", True
    ):
        return None
    if (
        _torch_optimizer._global_optimizer_pre_hooks
        or _torch_optimizer._global_optimizer_post_hooks
    ):
        return None
    if torch._C._autograd._profiler_enabled():
        return None
    return cast(Callable[[Optimizer], Any], bare)
