"""Elementwise kernels over lists of tensors, in a multi-tensor and a per-tensor version.

``foreach=True`` runs one ``torch._foreach_*`` call per list; ``foreach=False`` one in-place
operation per tensor. Both compute the same operations in the same order, so they give the same
numbers; a group's ``foreach`` key chooses (see :func:`torchsam._engine.group_foreach`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsam import _dtensor

__all__ = ["add_", "addcmul_", "combine_", "copy_", "lerp_"]

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
