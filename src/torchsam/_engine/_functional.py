"""The math of a sharpness-aware step: functions over lists of tensors, no bookkeeping.

As in ``torch.optim``, each operation has a per-tensor (``_single_tensor_*``) and a
multi-tensor (``_multi_tensor_*``, ``torch._foreach_*``) version; ``foreach`` chooses (a
group's ``foreach`` key, see :func:`torchsam._engine.group_foreach`). Both compute the same
operations in the same order, so they give the same numbers.

* the global 2-norm of tensor lists (:func:`norm`) and their inner product (:func:`dot`),
  both left on the device (no synchronisation);
* the perturbation ``w += d * scale`` (:func:`addcmul_`), the restore ``w = saved``
  (:func:`copy_`) and the other elementwise combinations the variants need;
* the perturbation of a step that may have to be skipped (:func:`perturb_`): nothing at all
  when the norm is not finite, decided on the device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from torchsam import _dtensor
from torchsam._engine._layout import GroupView, real_view

__all__ = [
    "add_",
    "addcmul_",
    "all_zero",
    "cast_like",
    "combine_",
    "copy_",
    "dot",
    "finite_direction_",
    "lerp_",
    "nonfinite_flag",
    "norm",
    "perturb_",
]

Coefficient = float | Tensor


#: the real dtype of each complex one (a real coefficient stays real)
_REAL = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def cast_like(coefficient: Tensor, tensor: Tensor) -> Tensor:
    """A 0-dim coefficient for the elementwise kernels over tensors like ``tensor``: on its
    device (on a GPU a coefficient on another device is an error) and, off the CPU, in its
    (real) dtype: a GPU's multi-tensor kernels take their one-kernel path only for a
    coefficient of the lists' dtype, and their per-tensor path reads a 0-dim operand in the
    lists' dtype anyway, so the numbers are the same. On the CPU the multi-tensor kernels are
    a loop of per-tensor kernels either way, so no cast is spent there. No copy where nothing
    changes."""
    device = tensor.device
    if coefficient.device == device and device.type == "cpu":
        return coefficient
    dtype = _REAL.get(tensor.dtype, tensor.dtype)
    if coefficient.device == device and coefficient.dtype == dtype:
        return coefficient
    return coefficient.to(device=device, dtype=dtype)


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
    brought to the host), in the lists' own dtype as ``src * scale.to(src)`` would be. For
    float16 lists a factor beyond float16's range is first limited to its largest value: it
    would become infinite, and an infinite factor times a zero entry is NaN (SAM's
    ``rho / (||g|| + 1e-12)`` overflows float16 for a gradient norm below about ``rho / 65504``)."""
    if not dst:
        return
    if dst[0].dtype == torch.float16:
        limit = torch.finfo(torch.float16).max
        scale = scale.clamp(-limit, limit)
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


def dot(views: list[GroupView], xs: list[list[Tensor]], ys: list[list[Tensor]]) -> Tensor:
    """The inner product of all tensors in ``xs`` with those in ``ys`` (one list per view,
    aligned with its parameters).

    A fixed number of operators per split of a view, whatever its number of tensors: the
    elementwise products are written into a flat buffer of the layout (one
    ``torch._foreach_copy_`` and one ``torch._foreach_mul_``, or their per-tensor loop as
    ``foreach`` says: the same numbers) and summed in float64 in one reduction. Products are
    taken in at least float32. A complex tensor counts as its real view
    (``torch.view_as_real``): the real inner product ``Re <x, conj(y)>``. The result stays on
    the device (a 0-dim float64 tensor). Under FSDP2 each shard takes one ``torch.dot`` per
    tensor and the partial sums are added across the mesh.
    """
    parts: list[Tensor] = []
    for view, x_list, y_list in zip(views, xs, ys, strict=True):
        if not x_list:
            continue
        if _dtensor.is_dtensor(x_list[0]):
            parts.extend(_dtensor_dots(x_list, y_list))
            continue
        splits = zip(view.split(x_list), view.split(y_list), strict=True)
        for i, (x_part, y_part) in enumerate(splits):
            parts.append(_flat_dot(view, i, x_part, y_part))
    if not parts:  # no parameter has a gradient on this step
        return torch.zeros((), dtype=torch.float64)
    if len(parts) == 1:
        return _dtensor.full(parts[0])
    device = parts[0].device
    return _dtensor.full(torch.stack([d.to(device) for d in parts]).sum())


def _flat_dot(view: GroupView, index: int, xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``sum(x * y)`` over split ``index`` of ``view`` (one device and dtype), in float64."""
    xs = [real_view(x) for x in xs]
    ys = [real_view(y) for y in ys]
    acc = torch.promote_types(xs[0].dtype, torch.float32)
    flat, pieces = view.layout.product_buffer(index, xs, acc)
    if view.foreach:
        torch._foreach_copy_(pieces, xs)
        torch._foreach_mul_(pieces, ys)
    else:
        for piece, x, y in zip(pieces, xs, ys, strict=True):
            piece.copy_(x).mul_(y)
    return flat.sum(dtype=torch.float64)


def _dtensor_dots(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """FSDP2 shards: one partial ``torch.dot`` per tensor, in float64."""
    out = []
    for x, y in zip(xs, ys, strict=True):
        x, y = real_view(x), real_view(y)
        acc = torch.promote_types(x.dtype, torch.float32)
        out.append(_dtensor.dot(x, y, acc).to(torch.float64))
    return out


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


# --------------------------------------------------------------------- the guarded perturbation
#: the dtypes for which torch's fused SGD kernel gives the bits of ``torch._foreach_addcmul_``
_FUSED_DTYPES = (torch.float32, torch.float64)


def _fused_dtype(tensor: Tensor) -> bool:
    """Whether the fused perturbation takes weights like ``tensor``: float32 anywhere, float64
    on the CPU only (torch's CUDA kernel reads a tensor learning rate as float32: a float64
    ``scale`` there is an error, and a float32 one would round the factor)."""
    if tensor.dtype is torch.float64:
        return tensor.device.type == "cpu"
    return tensor.dtype in _FUSED_DTYPES


def nonfinite_flag(norm: Tensor) -> Tensor:
    """1.0 where ``norm`` is not finite, else 0.0: a 0-dim float32 tensor on its device (the
    ``found_inf`` of torch's fused optimizer kernels). No synchronisation; two operators
    for a float32 norm (``torch.isfinite`` alone takes four)."""
    # a norm is >= 0 or NaN: 0 * norm is 0, or NaN where norm is inf or NaN
    return torch.nan_to_num(norm * 0.0, nan=1.0).to(torch.float32)


def _fused_add_(
    params: list[Tensor], direction: list[Tensor], scale: Tensor, nonfinite: Tensor
) -> None:
    """``params += direction * scale`` through torch's fused SGD kernel, skipped on the device
    when ``nonfinite`` is 1 (its ``found_inf``)."""
    torch._fused_sgd_(
        params,
        direction,
        [],
        weight_decay=0.0,
        momentum=0.0,
        lr=scale,
        dampening=0.0,
        nesterov=False,
        maximize=True,  # w - lr * (-d): the bits of w + d * scale
        is_first_step=False,
        grad_scale=None,
        found_inf=nonfinite,
    )


def perturb_(
    view: GroupView,
    index: int,
    params: list[Tensor],
    direction: list[Tensor],
    scale: Tensor,
    nonfinite: Tensor,
    *,
    normed: bool,
) -> None:
    """``params += direction * scale`` (split ``index`` of ``view``) when the norm that
    ``scale`` divides by is finite; when it is not, the weights stay as they are, so that the
    second pass runs at ``w`` (the step is then skipped). No synchronisation.

    ``nonfinite`` is :func:`nonfinite_flag` of that norm, on the lists' device, and ``scale``
    is then 0. A finite norm means a finite direction, so the finite path makes no pass to
    clean the direction: the update is torch's fused SGD kernel (``torch._fused_sgd_``,
    learning rate ``scale``, ``maximize=True``, no momentum or weight decay), which reads
    ``nonfinite`` as its ``found_inf`` and leaves the weights alone when it is 1. In float32
    and float64 it gives the bits of :func:`addcmul_` (float64 takes it on the CPU only, see
    :func:`_fused_dtype`). The kernel walks memory in order, so a
    tensor takes it only where its weight is dense (contiguous or channels-last) and the
    direction has the weight's strides; the small CPU tensors of a split take it through their
    pieces of the norm's flat buffer, laid out like the weights (``normed`` says that the
    buffer still holds ``direction``). The other tensors, other dtypes, the per-tensor path
    and DTensors have their non-finite entries zeroed first (:func:`finite_direction_`, in
    place) and take :func:`addcmul_` (0 times a non-finite entry would be NaN).
    """
    first = params[0]
    plan = view.layout.flat_buffer(index, direction) if view.foreach else None
    fused = (
        view.layout.fused_plan(index, params, plan)
        if view.foreach
        and _fused_dtype(first)
        and not _dtensor.is_dtensor(first)
        and not torch.compiler.is_compiling()  # the fused kernel has no fake tensor rule
        else None
    )
    if fused is None or not fused.small_aligned:
        part = finite_direction_(view, index, direction, normed=normed)
        addcmul_(params, part, scale, view.foreach)
        return
    fused_params: list[Tensor] = []
    fused_dirs: list[Tensor] = []
    candidates: Iterable[tuple[int, Tensor]]
    if plan is None:
        candidates = enumerate(direction)
    else:
        large = [direction[j] for j in plan.large] if normed else plan.fill(direction)
        fused_params += plan.small_of(params)
        fused_dirs += plan.pieces
        candidates = zip(plan.large, large, strict=True)
    other_params: list[Tensor] = []
    other_dirs: list[Tensor] = []
    for j, d in candidates:
        if fused.strides[j] is not None and d.stride() == fused.strides[j]:
            fused_params.append(params[j])
            fused_dirs.append(d)
        else:
            other_params.append(params[j])
            other_dirs.append(d)
    if fused_params:
        # in the weights' dtype, as addcmul_ takes it (a float64 scale from a norm over mixed
        # dtypes is an error for torch's CUDA kernel, which reads it as float32)
        lr = scale if scale.dtype == first.dtype else scale.to(first.dtype)
        _fused_add_(fused_params, fused_dirs, lr, nonfinite)
    if other_params:
        for t in other_dirs:
            torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
        addcmul_(other_params, other_dirs, scale, True)
