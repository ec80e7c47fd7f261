"""Elementwise kernels over lists of tensors, in a multi-tensor and a per-tensor version.

``foreach=True`` runs one ``torch._foreach_*`` call per list; ``foreach=False`` one in-place
operation per tensor. Both compute the same operations in the same order, so they give the same
numbers; a group's ``foreach`` key chooses (see :func:`torchsam._engine.group_foreach`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsam import _dtensor

__all__ = ["add_", "combine_", "copy_", "lerp_"]


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


def combine_(
    out: list[Tensor], x: list[Tensor], a: float, y: list[Tensor], b: float, foreach: bool
) -> None:
    """``out = a * x + b * y`` (``out`` may be ``x``), without allocating."""
    if out is not x:
        copy_(out, x, foreach)
    if a != 1.0:
        if foreach:
            torch._foreach_mul_(out, a)
        else:
            for o in out:
                o.mul_(a)
    add_(out, y, b, foreach)


def lerp_(dst: list[Tensor], end: list[Tensor], weight: float, foreach: bool) -> None:
    """``dst += weight * (end - dst)``."""
    if foreach:
        torch._foreach_lerp_(dst, end, weight)
    else:
        for d, e in zip(dst, end, strict=True):
            d.lerp_(e, weight)
