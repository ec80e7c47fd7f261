"""Checkpoint packing: one ordinary optimizer state dict for the SAM object and its base.

Per-parameter entries hold the base optimizer's keys unchanged and torchsam's own keys
prefixed with :data:`STATE_PREFIX`. The param groups carry both sets of hyper-parameters, the
variant's options and the optimizer-wide state (``"sam_step"``, ...).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from torch import Tensor
from torch.optim import Optimizer

from torchsam._engine._layout import to_param

if TYPE_CHECKING:
    from torchsam._engine._optimizer import SharpnessAwareOptimizer

__all__ = ["STATE_PREFIX", "STEP", "WIDE_PREFIX", "OwnState", "WideState", "pack", "unpack"]

# Optimizer-wide state (the step counter, LookSAM's ||g_v||, ...) is kept in every param group
# under keys with this prefix (``"sam_step"``), where torch.optim keeps what every checkpoint
# format must carry. Checkpoints written before kept it in ``state["sam"]``; they still load.
WIDE_PREFIX = "sam_"
STEP = WIDE_PREFIX + "step"
_LEGACY_GLOBAL = "sam"

# Keys of torchsam's own per-parameter state are stored under this prefix in ``state_dict()``
# so that they never collide with the base optimizer's keys ("momentum_buffer", "exp_avg", ...).
STATE_PREFIX = "sam."

#: every torchsam optimizer class, with the hyper-parameters and options it declares; filled
#: when a class is created (``SharpnessAwareOptimizer.__init_subclass__``), and a class that is
#: no longer referenced leaves it
REGISTRY: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def register(cls: type) -> None:
    """Record the arguments ``cls`` declares, to name it when its checkpoint is misloaded."""
    declared = set(getattr(cls, "hyperparameters", {})) | set(getattr(cls, "options", {}))
    REGISTRY[cls] = frozenset(declared)


class OwnState(defaultdict[Any, dict[str, Any]]):
    """torchsam's own per-parameter state; true when it or the base optimizer's state holds
    anything (``torch.distributed.checkpoint`` tests ``optimizer.state`` to decide whether the
    state still has to be created by a step)."""

    def __init__(self, base: Optimizer) -> None:
        super().__init__(dict)
        self.base = base

    def __bool__(self) -> bool:
        return len(self) > 0 or bool(self.base.state)

    def __reduce__(self) -> Any:
        return (OwnState, (self.base,), None, None, iter(self.items()))


class WideState:
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
    state: dict[Any, dict[str, Any]] = dict(packed["state"])
    for key, own in opt.state.items():
        if own and isinstance(key, Tensor):
            i = index[id(key)]
            state[i] = {**state.get(i, {}), **{STATE_PREFIX + k: v for k, v in own.items()}}
    packed["state"] = state
    return packed


def unpack(opt: SharpnessAwareOptimizer, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` (made by :func:`pack`) into ``opt`` and its base optimizer; the
    groups are validated first, so nothing changes when they are refused."""
    entries = dict(state_dict["state"])
    legacy = entries.pop(_LEGACY_GLOBAL, None) or {}  # older checkpoints' wide state
    _refuse_flattened(type(opt).__name__, entries)
    groups = _checked_groups(opt, state_dict["param_groups"], legacy)
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
    restored = OwnState(opt.base_optimizer)
    for key, entry in own_state.items():
        p = id_map[key]
        restored[p] = {k: to_param(v, p) for k, v in entry.items()}
    opt.state = restored


def _refuse_flattened(name: str, entries: dict[Any, dict[str, Any]]) -> None:
    if entries and not any(
        not isinstance(v, dict) for entry in entries.values() for v in entry.values()
    ):
        raise RuntimeError(
            f"{name}.load_state_dict(): the per-parameter entries hold no "
            "state values (only empty dicts), which is what torch.distributed.checkpoint's "
            "set_state_dict / set_optimizer_state_dict pass with "
            "StateDictOptions(flatten_optimizer_state_dict=True): it rebuilds the entries "
            "from optimizer.state, which holds torchsam's own state only, and would drop "
            "the base optimizer's. Save and load with flatten_optimizer_state_dict=False "
            "(the default)"
        )


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
