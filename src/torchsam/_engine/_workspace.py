"""Workspace, not state: scratch buffers, cached layouts and the weight backup of a step.

Nothing here is saved: after a load or a copy it is allocated again on the first step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchsam import _dtensor
from torchsam._engine import _functional as F
from torchsam._engine._layout import GroupView, Layout, to_param

__all__ = ["Workspace"]


class Workspace:
    """Per-parameter scratch buffers by name, the cached :class:`Layout` of each group, and
    the weights saved for the exact restore of the step in progress."""

    def __init__(self) -> None:
        self._buffers: dict[str, dict[Tensor, Tensor]] = {}
        self.layouts: dict[int, Layout] = {}
        self._saved: list[tuple[list[Tensor], list[Tensor], bool]] = []

    def views(
        self, name: str, groups: list[dict[str, Any]], state: dict[Any, dict[str, Any]]
    ) -> list[GroupView]:
        """The param groups reduced to the parameters that have a gradient now.

        When a group's set of parameters, their dtypes or the device changed, its layout is
        rebuilt, sparse gradients are refused (a parameter's gradient layout is fixed by its
        module, so checking then is enough) and the own ``state`` follows its parameters.
        """
        views = []
        rebuilt = False
        for group in groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    params.append(p)
                    grads.append(g)
            if not params:
                continue
            layout = self.layouts.get(id(group))
            if layout is None or not layout.matches(params):
                if any(g.is_sparse for g in grads):
                    raise RuntimeError(
                        f"{name} does not support sparse gradients; use a dense "
                        "embedding or a different optimizer for sparse parameters"
                    )
                layout = self.layouts[id(group)] = Layout.of(params)
                _follow(params, state)
                rebuilt = True
            views.append(GroupView(group, params, grads, layout))
        if rebuilt:
            _dtensor.check_not_mixed(name, [p for v in views for p in v.params])
        return views

    def scratch(self, view: GroupView, name: str) -> list[Tensor]:
        """Persistent per-parameter buffers called ``name``, aligned with ``view.params``.

        Allocated on first use (and when a parameter's shape or dtype changes), then reused:
        after the first step no parameter-sized memory is allocated.
        """
        buffers = view.layout.buffers.get(name)
        if buffers is None:
            store = self._buffers.setdefault(name, {})
            buffers = []
            for p in view.params:
                buf = store.get(p)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
                    store[p] = buf
                buffers.append(buf)
            view.layout.buffers[name] = buffers
        return buffers

    # ------------------------------------------------------------------ the weight backup
    def save_weights(self, view: GroupView) -> None:
        """Copy the weights of ``view`` aside so that :meth:`restore` is bit-exact.

        On the CPU the small 1-D weights (biases, normalisation weights) of a split are saved
        with one ``torch.cat`` into a flat buffer, instead of one copy each.
        """
        foreach = view.foreach
        backups = self._backups(view)
        if not foreach:
            F.copy_(backups, view.params, foreach)
        else:
            splits = zip(view.split(view.params), view.split(backups), strict=True)
            for i, (part, saved) in enumerate(splits):
                plan = view.layout.flat_buffer(("backup", i), part)
                if plan is None or plan.vectors < 2:
                    F.copy_(saved, part, foreach)
                    continue
                large = plan.fill(part)
                if large:
                    F.copy_([saved[j] for j in plan.large], large, foreach)
        self._saved.append((view.params, backups, foreach))

    def _backups(self, view: GroupView) -> list[Tensor]:
        """The buffers that hold ``w`` during a step, aligned with ``view.params``: views of a
        split's flat buffer for its small weights where :meth:`save_weights` gathers them."""
        layout = view.layout
        aligned = layout.buffers.get("backup aligned")
        if aligned is None:
            aligned = list(self.scratch(view, "backup"))
            positions = layout.splits or [list(range(len(view.params)))]
            splits = zip(view.split(view.params), view.split(aligned), positions, strict=True)
            for i, (part, saved, where) in enumerate(splits):
                plan = layout.flat_buffer(("backup", i), part)
                if plan is not None and plan.vectors >= 2:
                    for j, buffer in zip(where, plan.with_pieces(saved), strict=True):
                        aligned[j] = buffer
            layout.buffers["backup aligned"] = aligned
        return aligned

    def restore(self) -> None:
        """Copy the saved weights back (nothing when none were saved in this step)."""
        for params, backups, foreach in self._saved:
            F.copy_(params, backups, foreach)
        self._saved = []


def _follow(params: list[Tensor], state: dict[Any, dict[str, Any]]) -> None:
    """Move own state to its parameter's dtype and device (after ``model.double()``, ...)."""
    for p in params:
        own = state.get(p)
        if own:
            for key, value in own.items():
                own[key] = to_param(value, p)
