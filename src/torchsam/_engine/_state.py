"""``optimizer.state``: the whole optimizer's per-parameter state, as torch.optim presents it.

The base optimizer keeps its own state (``torch.optim.Adam`` initialises a parameter's entry
only while it is empty, so torchsam's keys must not live there), and torchsam keeps its own
in :attr:`SharpnessAwareOptimizer.own_state`. :class:`WholeState` shows both as one mapping
from parameter to entry, with torchsam's keys prefixed by :data:`STATE_PREFIX` (exactly as
``state_dict()`` packs them), plus any other key a user or tool stores (a state-dict hook that
adds ``optimizer.state["test"] = 1``). Tools that read or rebuild ``optimizer.state``
(``torch.distributed.checkpoint`` with ``flatten_optimizer_state_dict=True``) see the whole
optimizer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, MutableMapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

__all__ = ["STATE_PREFIX", "WIDE_PREFIX", "OwnState", "WholeState", "WideState"]

# Keys of torchsam's own per-parameter state carry this prefix in ``optimizer.state`` and
# ``state_dict()``, so that they never collide with the base optimizer's keys.
STATE_PREFIX = "sam."

# Optimizer-wide state (the step counter, LookSAM's ||g_v||, ...) is kept in every param group
# under keys with this prefix (``"sam_step"``), where torch.optim keeps what every checkpoint
# format must carry.
WIDE_PREFIX = "sam_"


class OwnState(defaultdict[Any, dict[str, Any]]):
    """torchsam's own per-parameter state (keys without prefix)."""

    def __init__(self) -> None:
        super().__init__(dict)

    def __reduce__(self) -> Any:
        return (OwnState, (), None, None, iter(self.items()))


class WholeEntry(MutableMapping[str, Any]):
    """The state of one parameter: the base optimizer's keys and torchsam's (prefixed)."""

    def __init__(self, base: Optimizer, own: OwnState, param: Tensor) -> None:
        self._base, self._own, self._param = base, own, param

    def _split(self, key: str) -> tuple[dict[Any, dict[str, Any]], str]:
        if key.startswith(STATE_PREFIX):
            return self._own, key[len(STATE_PREFIX) :]
        return self._base.state, key

    def __getitem__(self, key: str) -> Any:
        store, name = self._split(key)
        entry = store.get(self._param)
        if entry is None or name not in entry:
            raise KeyError(key)
        return entry[name]

    def __setitem__(self, key: str, value: Any) -> None:
        store, name = self._split(key)
        store[self._param][name] = value

    def __delitem__(self, key: str) -> None:
        store, name = self._split(key)
        entry = store.get(self._param)
        if entry is None or name not in entry:
            raise KeyError(key)
        del entry[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._base.state.get(self._param, {})
        for name in self._own.get(self._param, {}):
            yield STATE_PREFIX + name

    def __len__(self) -> int:
        base = self._base.state.get(self._param, {})
        return len(base) + len(self._own.get(self._param, {}))

    def __repr__(self) -> str:
        return repr(dict(self))


class WholeState(MutableMapping[Any, Any]):
    """``optimizer.state``: parameter -> :class:`WholeEntry` for every parameter with state in
    either optimizer, plus other keys stored as they are. Reading a parameter that has no
    state yet gives an empty entry (like torch.optim's ``defaultdict``) without creating one.
    """

    def __init__(self, base: Optimizer, own: OwnState) -> None:
        self.base, self.own = base, own
        self.extra: dict[Any, Any] = {}

    def _has(self, param: Tensor) -> bool:
        return bool(self.base.state.get(param)) or bool(self.own.get(param))

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, Tensor):
            return WholeEntry(self.base, self.own, key)
        return self.extra[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(key, Tensor):
            self.extra[key] = value
            return
        entry = WholeEntry(self.base, self.own, key)
        self.__delitem__(key)
        for name, item in dict(value).items():
            entry[name] = item

    def __delitem__(self, key: Any) -> None:
        if not isinstance(key, Tensor):
            del self.extra[key]
            return
        self.base.state.pop(key, None)
        self.own.pop(key, None)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, Tensor):
            return self._has(key)
        return key in self.extra

    def __iter__(self) -> Iterator[Any]:
        seen: set[int] = set()
        for store in (self.base.state, self.own):
            for param in list(store):
                if id(param) not in seen and store[param]:
                    seen.add(id(param))
                    yield param
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr({k: (dict(v) if isinstance(v, WholeEntry) else v) for k, v in self.items()})


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
