"""Count the operators an optimizer step dispatches, and its host synchronisations.

:class:`DispatchCounter` is a ``TorchDispatchMode``: inside ``with counter:`` every ATen
operator call is counted once (a ``torch._foreach_*`` call counts as one: on a GPU it is one
multi-tensor kernel launch, so the count is a proxy for kernel launches), and the calls that
bring a tensor's value to the host are counted as synchronisations. On a GPU each of those
stalls the launch queue until the device has caught up; on the CPU they are free, but they are
dispatched all the same, so counting them on the CPU tells how a step would behave on a GPU.

Synchronising operators: ``aten._local_scalar_dense`` (what ``Tensor.item()``, ``float(t)``,
``int(t)`` and ``bool(t)`` dispatch to), ``aten.is_nonzero``, ``aten.item``, ``aten.equal``
(they return a Python scalar from a tensor), operators whose output size depends on the data
(``aten.nonzero``, ``aten.masked_select``, ``aten.unique*``), and copies from a non-CPU device
to the CPU (``Tensor.cpu()``, ``Tensor.tolist()`` on a GPU tensor).

Only the benchmarks and the tests use this module; the optimizers never import it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SYNC_OPS", "DispatchCounter"]

_aten = torch.ops.aten

#: operators that return a Python scalar from a tensor, or whose output size depends on data
SYNC_OPS = frozenset(
    {
        _aten._local_scalar_dense.default,
        _aten.item.default,
        _aten.is_nonzero.default,
        _aten.equal.default,
        _aten.nonzero.default,
        _aten.masked_select.default,
        _aten._unique2.default,
        _aten.unique_dim.default,
        _aten.unique_consecutive.default,
    }
)

# Profiler markers (``record_function`` around ``Optimizer.step``) and view operators (new
# metadata over the same memory) are dispatched but launch no kernel: they are left out of the
# operator count (views are counted apart, in ``views``).
_NOT_KERNELS = ("profiler.",)


class DispatchCounter(TorchDispatchMode):
    """Count dispatched operators (``ops``, views apart) and host synchronisations (``syncs``).

    ``by_op`` holds the count per operator name, ``sync_ops`` the synchronising calls by name.
    Counting can be suspended with :meth:`paused` (for the user's forward and backward passes
    inside a closure, so that only the optimizer's own work is counted).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.views = 0
        self.by_op: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()
        self._paused = 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        name = str(func)
        if name.startswith(_NOT_KERNELS) or func.is_view:
            self.views += name.startswith("aten.")
            return out
        self.ops += 1
        self.by_op[name] += 1
        if func in SYNC_OPS or _copies_to_host(func, args, kwargs, out):
            self.syncs += 1
            self.sync_ops[name] += 1
        return out

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count what runs inside the block."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def pausing(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so that its own operators are not counted (for closures)."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.paused():
                return fn(*args, **kwargs)

        return wrapped


def _copies_to_host(func: Any, args: Any, kwargs: Any, out: Any) -> bool:
    """Whether an operator copied data from a non-CPU device to the CPU."""
    if func not in (_aten._to_copy.default, _aten.copy_.default):
        return False
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if func is _aten.copy_.default:  # copy_(dst, src): the source is the second argument
        inputs, outputs = inputs[1:2], inputs[:1]
    return any(t.device.type != "cpu" for t in inputs) and any(
        t.device.type == "cpu" for t in outputs
    )
