"""Checkpoint packing: one ordinary optimizer state dict for the SAM object and its base.

Per-parameter entries hold the base optimizer's keys unchanged and torchsam's own keys
prefixed with :data:`STATE_PREFIX`. The param groups carry both sets of hyper-parameters, the
variant's options and the optimizer-wide state (``"sam_step"``, ...).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from torch import Tensor

from torchsam._engine._layout import to_param
from torchsam._engine._state import STATE_PREFIX, WIDE_PREFIX, OwnState, WholeState

if TYPE_CHECKING:
    from torchsam._engine._optimizer import SharpnessAwareOptimizer

__all__ = ["STEP", "pack", "pack_with_hooks", "register", "unpack", "unpack_with_hooks"]

STEP = WIDE_PREFIX + "step"
# Checkpoints written before the wide state moved to the param groups kept it in
# ``state["sam"]``; they still load.
_LEGACY_GLOBAL = "sam"

#: every torchsam optimizer class, with the hyper-parameters and options it declares; filled
#: when a class is created (``SharpnessAwareOptimizer.__init_subclass__``), and a class that is
#: no longer referenced leaves it
REGISTRY: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def register(cls: type) -> None:
    """Record the arguments ``cls`` declares, to name it when its checkpoint is misloaded."""
    declared = set(getattr(cls, "hyperparameters", {})) | set(getattr(cls, "options", {}))
    REGISTRY[cls] = frozenset(declared)


#: the kinds of hooks ``torch.optim.Optimizer`` keeps (``_optimizer_<kind>_hooks``)
HOOK_KINDS = (
    "step_pre",
    "step_post",
    "state_dict_pre",
    "state_dict_post",
    "load_state_dict_pre",
    "load_state_dict_post",
)


def pack_with_hooks(opt: SharpnessAwareOptimizer) -> dict[str, Any]:
    """:func:`pack` between the state-dict hooks registered on ``opt``, as torch.optim runs
    them."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    packed = pack(opt)
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, packed)
        if result is not None:
            packed = result
    return packed


def unpack_with_hooks(opt: SharpnessAwareOptimizer, state_dict: Any) -> None:
    """:func:`unpack` between the load-state-dict hooks registered on ``opt``."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise TypeError(
            "load_state_dict() expects a dict made by state_dict(), with 'state' and "
            f"'param_groups'; got {type(state_dict).__name__}"
        )
    state_dict = dict(state_dict)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    unpack(opt, state_dict)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def pack(opt: SharpnessAwareOptimizer) -> dict[str, Any]:
    """The base optimizer's state dict with torchsam's own state merged into its entries."""
    packed = opt.base_optimizer.state_dict()
    for packed_group in packed["param_groups"]:  # wide state kept on the device: to floats
        for key, value in packed_group.items():
            if key.startswith(WIDE_PREFIX) and isinstance(value, Tensor):
                packed_group[key] = value.item()
    index: dict[int, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            index.setdefault(id(p), len(index))
    state: dict[Any, Any] = dict(packed["state"])
    for key, own in opt.own_state.items():
        if own:
            i = index[id(key)]
            state[i] = {**state.get(i, {}), **{STATE_PREFIX + k: v for k, v in own.items()}}
    state.update(opt.state.extra)  # keys that are not parameters, kept as they are
    packed["state"] = state
    return packed


def unpack(opt: SharpnessAwareOptimizer, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` (made by :func:`pack`) into ``opt`` and its base optimizer; the
    groups are validated first, so nothing changes when they are refused."""
    entries = dict(state_dict["state"])
    legacy = entries.pop(_LEGACY_GLOBAL, None) or {}  # older checkpoints' wide state
    groups = _checked_groups(opt, state_dict["param_groups"], legacy)
    ids = {i for group in groups for i in group["params"]}
    extra = {key: entries.pop(key) for key in list(entries) if key not in ids}
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
    opt.base_optimizer.load_state_dict({"state": base_state, "param_groups": groups})
    opt.param_groups = opt.base_optimizer.param_groups
    # The saved groups name their parameters by index (or, through DCP, by their fully
    # qualified names); positions match the current groups, as torch.optim assumes.
    id_map = dict(
        zip(
            (i for group in groups for i in group["params"]),
            (p for group in opt.param_groups for p in group["params"]),
            strict=True,
        )
    )
    restored = OwnState()
    for key, entry in own_state.items():
        p = id_map[key]
        restored[p] = {k: to_param(v, p) for k, v in entry.items()}
    opt.own_state = restored
    whole = WholeState(opt.base_optimizer, restored)
    whole.extra.update(extra)
    opt.state = whole


def _checked_groups(
    opt: SharpnessAwareOptimizer, saved: list[dict[str, Any]], legacy: dict[str, Any]
) -> list[dict[str, Any]]:
    """The saved groups, completed from ``opt``'s current ones and validated."""
    groups = [dict(g) for g in saved]
    if len(groups) != len(opt.param_groups):
        raise ValueError(
            f"the state dict has {len(groups)} param groups, this optimizer has "
            f"{len(opt.param_groups)}; build the optimizer with the same groups as the one "
            "that was saved"
        )
    own_defaults = opt._own_defaults
    for group, current in zip(groups, opt.param_groups, strict=True):
        _refuse_foreign(type(opt).__name__, group, current, own_defaults)
        for key, value in legacy.items():
            group.setdefault(WIDE_PREFIX + key, value)
        group.setdefault(STEP, 0)
        for key in own_defaults:
            if key not in group:
                group[key] = current[key]
        opt.check_group(group)
    opt._check_groups(groups)
    return groups


def _refuse_foreign(
    name: str, saved: dict[str, Any], current: dict[str, Any], own: dict[str, Any]
) -> None:
    """Refuse a group saved by another torchsam optimizer (it has that one's arguments)."""
    known = set().union(*REGISTRY.values())
    foreign = (known & saved.keys()) - own.keys() - current.keys()
    if foreign:
        owners = sorted({cls.__name__ for cls, declared in REGISTRY.items() if foreign & declared})
        raise ValueError(
            f"this state dict was saved by a different optimizer: its param groups have "
            f"{', '.join(sorted(foreign))}, which {name} does not take (they "
            f"belong to {', '.join(owners)}); load it into the optimizer class that saved it"
        )
