"""What a step knows about one param group: its parameters with gradients, cached layouts.

:class:`GroupView` is the unit every kernel and variant works on: a param group reduced to the
parameters that have a gradient on this step. :class:`Layout` caches, per group, what stays
fixed while that set of parameters does not change (the split by device and dtype, the flat
buffers that gather small CPU tensors, the persistent scratch buffers), so that a step does no
per-parameter Python work beyond collecting the gradients.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["FlatPlan", "FusedPlan", "GroupView", "Layout", "group_foreach", "real_view"]

#: tensors of at most this many elements are normed together in one flat buffer on the CPU
FLAT_NORM_MAX_NUMEL = 4096
_PLAIN = (Tensor, nn.Parameter)


@dataclass
class FlatPlan:
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
class FusedPlan:
    """Which weights of a split a fused kernel that walks memory in order may update."""

    #: per weight: its strides where it is dense (contiguous or channels-last), else None
    strides: list[tuple[int, ...] | None]
    #: whether the small weights of the split's flat plan (if any) all have the strides of
    #: their pieces of the flat buffer
    small_aligned: bool


def _dense(tensor: Tensor) -> bool:
    if tensor.is_contiguous():
        return True
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    layout = formats.get(tensor.dim())
    return layout is not None and tensor.is_contiguous(memory_format=layout)


def _plan_for(tensors: list[Tensor]) -> FlatPlan | None:
    """The flat buffer of a split's small CPU tensors; None where that does not pay."""
    first = tensors[0]
    small = [i for i, t in enumerate(tensors) if t.numel() <= FLAT_NORM_MAX_NUMEL]
    if len(small) <= 1 or first.device.type != "cpu" or any(type(t) not in _PLAIN for t in tensors):
        return None
    small.sort(key=lambda i: tensors[i].dim() != 1)  # stable: 1-D ones first
    vectors = sum(tensors[i].dim() == 1 for i in small)
    sizes = [tensors[i].numel() for i in small]
    flat = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
    # each piece with its tensor's memory layout where that is dense (channels-last weights)
    pieces = [
        piece.as_strided(tensors[i].shape, tensors[i].stride())
        if _dense(tensors[i])
        else piece.view(tensors[i].shape)
        for piece, i in zip(flat.split(sizes), small, strict=True)
    ]
    chosen = set(small)
    return FlatPlan(
        None if small == list(range(len(tensors))) else small,
        [i for i in range(len(tensors)) if i not in chosen],
        flat,
        pieces,
        vectors,
        flat[: sum(sizes[:vectors])],
    )


@dataclass
class Layout:
    """What is fixed while a group's set of parameters with gradients does not change.

    Cached between steps: the index lists per (device, dtype) (``None`` when there is only
    one) and persistent scratch buffers by name, aligned with ``params``.
    """

    params: list[Tensor]
    splits: list[list[int]] | None
    dtypes: list[torch.dtype] = field(default_factory=list)
    device: torch.device | None = None
    buffers: dict[str, list[Tensor]] = field(default_factory=dict)
    #: per split: the flat buffer that gathers small CPU tensors for one norm
    flat: dict[int | tuple[str, int], FlatPlan | None] = field(default_factory=dict)
    #: per split: a flat buffer and its views, for the elementwise products of a dot product
    products: dict[int, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)
    #: per split: the weights' memory layout, for the fused perturbation
    fused: dict[int, FusedPlan] = field(default_factory=dict)

    @classmethod
    def of(cls, params: list[Tensor]) -> Layout:
        return cls(
            params, split_by_device_and_dtype(params), [p.dtype for p in params], params[0].device
        )

    def flat_buffer(self, index: int | tuple[str, int], tensors: list[Tensor]) -> FlatPlan | None:
        """For split ``index`` on the CPU: the positions of its small tensors, a flat buffer
        and views of it shaped like them; None where that does not pay.

        On the CPU a multi-tensor norm is a loop of per-tensor reductions, each with a fixed
        cost of about a microsecond: for small tensors a copy into one buffer and one norm
        cost less (on a GPU ``torch._foreach_norm`` is one kernel, and large tensors would pay
        for the extra pass over memory).
        """
        if index not in self.flat:
            self.flat[index] = _plan_for(tensors)
        plan = self.flat[index]
        if plan is not None and plan.flat.dtype != tensors[0].dtype:
            return None
        return plan

    def fused_plan(self, index: int, params: list[Tensor], plan: FlatPlan | None) -> FusedPlan:
        """For split ``index`` (its weights ``params`` and its flat plan): the weights' strides
        where they are dense, found once while this layout holds."""
        cached = self.fused.get(index)
        if cached is None:
            strides = [p.stride() if _dense(p) else None for p in params]
            aligned = plan is None or all(
                p.stride() == piece.stride()
                for p, piece in zip(plan.small_of(params), plan.pieces, strict=True)
            )
            cached = self.fused[index] = FusedPlan(strides, aligned)
        return cached

    def product_buffer(
        self, index: int, tensors: list[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor]]:
        """For split ``index``: a flat buffer of ``dtype`` on the tensors' device and views of
        it shaped like ``tensors``, which are aligned with the split's parameters (or their
        real views): allocated once, then reused while this layout holds."""
        cached = self.products.get(index)
        if (
            cached is None
            or cached[0].dtype != dtype
            or cached[0].device != tensors[0].device
            or len(cached[1]) != len(tensors)
        ):
            shapes = [t.shape for t in tensors]
            sizes = [t.numel() for t in tensors]
            flat = torch.empty(sum(sizes), dtype=dtype, device=tensors[0].device)
            pieces = [
                piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes, strict=True)
            ]
            cached = self.products[index] = (flat, pieces)
        return cached

    def matches(self, params: list[Tensor]) -> bool:
        """Whether ``params`` are this layout's tensors, still of the same dtypes and device.

        ``model.double()`` or ``model.to(device)`` keep the parameter objects but change their
        dtype or device; the cached splits and scratch buffers must then be rebuilt. (The device
        of the first parameter stands for all: moving part of a model is not detected.)
        """
        return (
            same_objects(self.params, params)
            and [p.dtype for p in params] == self.dtypes
            and params[0].device == self.device
        )


@dataclass
class GroupView:
    """The parameters of one param group that have a gradient, with those gradients."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    layout: Layout
    #: what the base optimizer sees as the gradients on this step, when not ``grads`` (set by
    #: :meth:`torchsam.SharpnessAwareOptimizer.base_grads`)
    base_grads: list[Tensor] | None = None

    @property
    def foreach(self) -> bool:
        """Whether this group uses the multi-tensor (``torch._foreach_*``) kernels."""
        return group_foreach(self.group)

    def split(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        """``tensors`` (aligned with ``params``) in lists of one device and dtype each."""
        if self.layout.splits is None:
            return [tensors]
        return [[tensors[i] for i in idx] for idx in self.layout.splits]


def split_by_device_and_dtype(tensors: list[Tensor]) -> list[list[int]] | None:
    """Index lists of ``tensors`` per (device, dtype), or None when there is only one."""
    keys = [(t.device, t.dtype) for t in tensors]
    if keys.count(keys[0]) == len(keys):
        return None
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def same_objects(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def group_foreach(group: dict[str, Any]) -> bool:
    """Whether a group uses the multi-tensor (``torch._foreach_*``) kernels."""
    foreach = group.get("foreach")
    return True if foreach is None else bool(cast(bool, foreach))


def real_view(tensor: Tensor) -> Tensor:
    """``tensor`` itself, or its real view (``torch.view_as_real``) if it is complex."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def to_param(value: Any, param: Tensor) -> Any:
    """A state value moved to ``param``'s device (and dtype, for floating-point values)."""
    if not isinstance(value, Tensor):
        return value
    if value.is_floating_point() and param.is_floating_point():
        return value.to(dtype=param.dtype, device=param.device)
    return value.to(device=param.device)
