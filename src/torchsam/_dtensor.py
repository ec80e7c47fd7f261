"""The engine's operations on ``DTensor`` parameters (FSDP2's ``fully_shard``).

Under ``torch.distributed.fsdp.fully_shard`` each parameter, its gradient and every state
tensor built from them are DTensors that hold one shard per rank. Most of the engine's
operations work on them as they are: elementwise ``torch._foreach_*`` ops act on each shard,
and the gradient norm (``torch._foreach_norm``, then ``torch.linalg.vector_norm`` of the
stacked norms) sums the squares across the shards in one all-reduce. Three do not (torch
2.13):

* ``torch._foreach_copy_`` has no sharding rule; :func:`copy_` copies the local shards in one
  multi-tensor call where source and destination are laid out alike, tensor by tensor
  (``Tensor.copy_`` has a rule) elsewhere;
* an inner product of two sharded tensors is a partial sum on each rank, and ``float()`` of a
  DTensor holding partial sums returns this rank's part without a word; and flattening an
  unevenly sharded tensor (``reshape(-1)``) has no sharding rule. :func:`dot` takes the inner
  product of the local shards and marks it as a partial sum over the mesh dimensions the
  tensors are sharded on; :func:`full` sums the partial values across the mesh before the
  engine reads a number.

Nothing here imports ``torch.distributed.tensor`` (half a second): a DTensor can only exist
once its module is loaded, so :func:`is_dtensor` looks it up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_not_mixed", "copy_", "dot", "full", "is_dtensor"]


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def check_not_mixed(name: str, params: list[Tensor]) -> None:
    """Raise if some of ``params`` are DTensors and others plain tensors."""
    sharded = sum(map(is_dtensor, params))
    if 0 < sharded < len(params):
        raise RuntimeError(
            f"{name} got {sharded} DTensor parameters (sharded by fully_shard) and "
            f"{len(params) - sharded} plain ones: the gradient norm is taken over all of them "
            "together, which needs them all sharded. Apply fully_shard to the root module too "
            "(after its submodules), so that no parameter is left a plain tensor (a plain one "
            "would not have its gradient averaged across ranks either)"
        )


def _same_layout(a: Any, b: Any) -> bool:
    """Whether DTensors ``a`` and ``b`` have the same shape, mesh and placements, so that
    their local shards correspond element by element."""
    return (
        is_dtensor(b)
        and a.shape == b.shape
        and a.placements == b.placements
        and a.device_mesh == b.device_mesh
    )


def copy_(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst = src`` where ``dst`` holds DTensors: one ``torch._foreach_copy_`` over the local
    shards when every pair is laid out alike, else one ``Tensor.copy_`` per tensor (which
    redistributes as needed)."""
    if all(_same_layout(d, s) for d, s in zip(dst, src, strict=True)):
        torch._foreach_copy_(
            [d.to_local() for d in dst],  # type: ignore[attr-defined]
            [s.to_local() for s in src],  # type: ignore[attr-defined]
        )
    else:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def dot(x: Any, y: Any, dtype: torch.dtype) -> Tensor:
    """The inner product of the DTensors ``x`` and ``y``, accumulated in ``dtype``, as a
    0-dim DTensor: a partial sum over each mesh dimension that ``x`` is sharded on, the same
    value on the others (read it through :func:`full`)."""
    from torch.distributed.tensor import DTensor, Partial, Placement, Replicate

    if not is_dtensor(y):
        raise TypeError(
            "an inner product of a DTensor with a plain tensor: every parameter of a "
            "sharpness-aware optimizer must be sharded the same way (apply fully_shard to the "
            "root module too, so that no parameter is left a plain tensor)"
        )
    if not _same_layout(x, y):
        y = y.redistribute(x.device_mesh, x.placements)
    placements: list[Placement] = []
    for placement in x.placements:
        if placement.is_shard():
            placements.append(Partial("sum"))
        elif placement.is_replicate():
            placements.append(Replicate())
        else:
            raise RuntimeError(
                f"torchsam cannot take an inner product of DTensors placed as {x.placements}: "
                "the local shards of a partial (not yet reduced) tensor do not give a partial "
                "inner product; reduce the gradients (Shard or Replicate placements) first"
            )
    local = torch.dot(x.to_local().reshape(-1).to(dtype), y.to_local().reshape(-1).to(dtype))
    return DTensor.from_local(local, x.device_mesh, placements, run_check=False)


def full(value: Tensor) -> Tensor:
    """``value`` as a plain tensor that holds the whole value on every rank: partial sums
    (and norms) of a DTensor reduced across its mesh, a plain tensor as it is."""
    return value.full_tensor() if is_dtensor(value) else value  # type: ignore[attr-defined]
