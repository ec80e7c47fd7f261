"""The math of a sharpness-aware step: functions over lists of tensors, no bookkeeping.

As in ``torch.optim``, each operation has a per-tensor (``_single_tensor_*``) and a
multi-tensor (``_multi_tensor_*``, ``torch._foreach_*``) version; ``foreach`` chooses (a
group's ``foreach`` key, see :func:`torchsam._engine.group_foreach`). Both compute the same
operations in the same order, so they give the same numbers.

* the global 2-norm of tensor lists (:func:`norm`) and their inner product (:func:`dot`),
  both left on the device (no synchronisation);
* the perturbation ``w += d * scale`` (:func:`addcmul_`), the restore ``w = saved``
  (:func:`copy_`) and the other elementwise combinations the variants need;
* a direction with its non-finite entries zeroed (:func:`finite_direction_`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsam import _dtensor
from torchsam._engine._layout import GroupView, real_view

__all__ = [
    "add_",
    "addcmul_",
    "all_zero",
    "combine_",
    "copy_",
    "dot",
    "finite_direction_",
    "lerp_",
    "norm",
]

Coefficient = float | Tensor


def copy_(dst: list[Tensor], src: list[Tensor], foreach: bool) -> None:
    """``dst = src``."""
    if foreach and dst and _dtensor.is_dtensor(dst[0]):
        _dtensor.copy_(dst, src)  # torch._foreach_copy_ has no DTensor sharding rule
    elif foreach:
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def add_(dst: list[Tensor], src: list[Tensor], alpha: float, foreach: bool) -> None:
    """``dst += alpha * src``."""
    if foreach:
        torch._foreach_add_(dst, src, alpha=alpha)
    else:
        for d, s in zip(dst, src, strict=True):
            d.add_(s, alpha=alpha)


def addcmul_(dst: list[Tensor], src: list[Tensor], scale: Tensor, foreach: bool) -> None:
    """``dst += src * scale``, with ``scale`` a 0-dim tensor on the device of ``dst`` (never
    brought to the host), in the lists' own dtype as ``src * scale.to(src)`` would be."""
    if not dst:
        return
    if not foreach:
        for d, s in zip(dst, src, strict=True):
            d.addcmul_(s, scale)
    elif dst[0].device.type == "cpu":
        # one call, no temporaries (the 0-dim factor broadcasts in the per-tensor loop)
        torch._foreach_addcmul_(dst, src, [scale] * len(src))
    else:
        # two multi-tensor kernels (a 0-dim factor list would leave their fast path)
        torch._foreach_add_(dst, torch._foreach_mul(src, scale))


def combine_(
    out: list[Tensor],
    x: list[Tensor],
    a: Coefficient,
    y: list[Tensor],
    b: Coefficient,
    foreach: bool,
) -> None:
    """``out = a * x + b * y`` (``out`` may be ``x``), without allocating. A coefficient may
    be a 0-dim tensor on the lists' device (computed there, never brought to the host)."""
    if out is not x:
        copy_(out, x, foreach)
    if isinstance(a, Tensor) or a != 1.0:
        if foreach:
            torch._foreach_mul_(out, a)
        else:
            for o in out:
                o.mul_(a)
    if isinstance(b, Tensor):
        addcmul_(out, y, b, foreach)
    else:
        add_(out, y, b, foreach)


def lerp_(dst: list[Tensor], end: list[Tensor], weight: float, foreach: bool) -> None:
    """``dst += weight * (end - dst)``."""
    if foreach:
        torch._foreach_lerp_(dst, end, weight)
    else:
        for d, e in zip(dst, end, strict=True):
            d.lerp_(e, weight)


# --------------------------------------------------------------------- reductions
def norm(views: list[GroupView], tensor_lists: list[list[Tensor]]) -> Tensor:
    """The 2-norm of all tensors in ``tensor_lists`` (each aligned with a view) together.

    Per-tensor norms are taken in at least float32 (:func:`_multi_tensor_norms` or
    :func:`_single_tensor_norms`, as each group's ``foreach`` says), gathered on the first
    tensor's device, and combined in one norm (as the seed does). The result stays on the
    device (a 0-dim tensor): no synchronisation. Under FSDP2 the shards' norms are combined
    across the mesh (one all-reduce).
    """
    stacks: list[Tensor] = []
    for view, tensors in zip(views, tensor_lists, strict=True):
        for i, part in enumerate(view.split(tensors)):
            if view.foreach:
                stacks.extend(_multi_tensor_norms(view, i, part))
            else:
                stacks.append(_single_tensor_norms(part))
    if not stacks:
        return torch.zeros(())
    if len(stacks) == 1:
        norms = stacks[0]
    else:
        device, dtype = stacks[0].device, stacks[0].dtype
        for st in stacks[1:]:
            dtype = torch.promote_types(dtype, st.dtype)
        norms = torch.cat([st.to(device=device, dtype=dtype) for st in stacks])
    return _dtensor.full(torch.linalg.vector_norm(norms))


def _single_tensor_norms(part: list[Tensor]) -> Tensor:
    """The 2-norms of ``part`` (one device and dtype), one ``vector_norm`` per tensor."""
    part = [real_view(t) for t in part]
    acc = torch.promote_types(part[0].dtype, torch.float32)
    return torch.stack([torch.linalg.vector_norm(t, dtype=acc) for t in part])


def _multi_tensor_norms(view: GroupView, index: int, part: list[Tensor]) -> list[Tensor]:
    """The 2-norms of split ``index`` of ``view``: one ``torch._foreach_norm``, or on the CPU
    one norm of the small tensors gathered in the layout's flat buffer and one
    ``torch._foreach_norm`` of the others (the same norm up to rounding)."""
    acc = torch.promote_types(part[0].dtype, torch.float32)
    plan = view.layout.flat_buffer(index, part)
    if plan is None:
        return [torch.stack(torch._foreach_norm(part, 2, dtype=acc))]
    large = plan.fill(part)
    stacks = [torch.linalg.vector_norm(plan.flat, dtype=acc, dim=0, keepdim=True)]
    if large:
        stacks.append(torch.stack(torch._foreach_norm(large, 2, dtype=acc)))
    return stacks


def dot(xs: list[list[Tensor]], ys: list[list[Tensor]]) -> Tensor:
    """The inner product of all tensors in ``xs`` with those in ``ys`` (aligned lists).

    One ``torch.dot`` per tensor whatever ``foreach`` says (there is no multi-tensor inner
    product), accumulated in at least float32 (float64 across tensors). A complex tensor
    counts as its real view (``torch.view_as_real``): the real inner product
    ``Re <x, conj(y)>``. The result stays on the device (a 0-dim float64 tensor); under FSDP2
    the shards' partial sums are added across the mesh.
    """
    parts: list[Tensor] = []
    for x_list, y_list in zip(xs, ys, strict=True):
        for x, y in zip(x_list, y_list, strict=True):
            x, y = real_view(x), real_view(y)
            acc = torch.promote_types(x.dtype, torch.float32)
            if _dtensor.is_dtensor(x):  # FSDP2: a partial sum on each rank
                d = _dtensor.dot(x, y, acc)
            else:
                d = torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc))
            parts.append(d.to(parts[0].device) if parts else d)
    if not parts:  # no parameter has a gradient on this step
        return torch.zeros((), dtype=torch.float64)
    return _dtensor.full(torch.stack(parts).to(torch.float64).sum())


def all_zero(views: list[GroupView]) -> bool:
    """Whether every gradient of ``views`` is zero (one host synchronisation per split).

    The 1-norm, over all shards under FSDP2 (the max-norm has no value on an empty shard).
    """
    return not any(
        bool(_dtensor.full(torch.stack(torch._foreach_norm(part, 1))).any())
        for v in views
        for part in v.split(v.grads)
    )


# --------------------------------------------------------------------- finite direction
def finite_direction_(
    view: GroupView, index: int, part: list[Tensor], *, normed: bool
) -> list[Tensor]:
    """``part`` (split ``index`` of a perturbation direction) with its non-finite entries
    set to 0, for a perturbation that stays finite when the norm is not (its scale is then
    0, and ``0 * inf`` is NaN). Finite entries are left bit-identical; the step with a
    non-finite direction is skipped anyway. No synchronisation.

    In place, except for the small CPU tensors of a split, which are gathered into the
    flat buffer of the norm and cleaned there in one pass (the returned list then holds
    views of that buffer in their places); ``normed`` says that the buffer still holds
    ``part`` from :func:`norm`.
    """
    plan = view.layout.flat_buffer(index, part) if view.foreach else None
    if plan is None:
        for t in part:
            torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
        return part
    large = [part[j] for j in plan.large] if normed else plan.fill(part)
    torch.nan_to_num_(plan.flat, nan=0.0, posinf=0.0, neginf=0.0)
    for t in large:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
    return plan.with_pieces(part)
