"""SAM under ``torch.nn.parallel.DistributedDataParallel``: where the gradients are averaged.

A sharpness-aware step has two forward/backward passes. Under DDP each backward all-reduces
the gradients, so by default both passes are synchronised and every sharpness-aware optimizer
gives the same weights as one process on the whole batch (with the loss averaged over the
batch and equal batches per rank). Nothing extra is needed for that mode.

The original SAM paper perturbs each worker with its *own* gradient (m-sharpness, with ``m``
the per-worker batch): the first pass then needs no all-reduce at all, and only the gradient
at the perturbed point is averaged. :func:`sam_pass` runs a pass in the right mode for both
call styles::

    # two-call style
    with torchsam.distributed.sam_pass(ddp_model, optimizer, local=True):
        loss_fn(ddp_model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    with torchsam.distributed.sam_pass(ddp_model, optimizer, local=True):
        loss_fn(ddp_model(x), y).backward()
    optimizer.second_step(zero_grad=True)

    # closure style
    def closure():
        optimizer.zero_grad()
        with torchsam.distributed.sam_pass(ddp_model, optimizer, local=True):
            loss = loss_fn(ddp_model(x), y)
            loss.backward()
        return loss

    optimizer.step(closure)

The forward must be inside the context too: ``DistributedDataParallel.no_sync`` decides at
forward time whether the following backward all-reduces.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) nothing extra is needed either: the
optimizers take the sharded (``DTensor``) parameters as they are, and their gradient norms and
inner products are summed over all shards (see ``docs/design.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchsam._engine import SharpnessAwareOptimizer

__all__ = ["AllReduceCounter", "count_all_reduces", "sam_pass"]


@contextlib.contextmanager
def sam_pass(
    model: nn.Module, optimizer: SharpnessAwareOptimizer, *, local: bool = True
) -> Iterator[None]:
    """Run one forward/backward pass of a sharpness-aware step under DDP.

    With ``local=True`` the first pass (while ``optimizer.perturbed`` is False) runs inside
    ``model.no_sync()``: each rank perturbs its weights with its own gradient, and only the
    second pass all-reduces, so a step costs one gradient all-reduce instead of two. The
    weights stay identical on every rank, because the base optimizer steps with the averaged
    gradient at the perturbed point. On a step where the optimizer takes no second pass
    (:class:`torchsam.IntermittentSAM`), the first pass is synchronised, since its gradient
    is the one the base optimizer uses. With ``local=False`` the pass is synchronised as
    plain DDP would do it (the result equals one process on the whole batch).

    With gradient accumulation, wrap all but the last micro-batch of each pass in
    ``model.no_sync()`` and the last one in this context.

    Args:
        model (DistributedDataParallel): the wrapped model (anything with ``no_sync()``)
        optimizer (SharpnessAwareOptimizer): the torchsam optimizer of this model
        local (bool, optional): perturb each rank with its own gradient (default: True)

    Raises:
        TypeError: ``model`` has no ``no_sync()`` or ``optimizer`` is not a torchsam optimizer.
        ValueError: ``local=True`` with a variant whose final gradient uses the gradient at
            ``w`` (GSAM, WSAM, LookSAM), which would then differ between ranks and let the
            weights diverge; use ``local=False`` for those.
    """
    no_sync = getattr(model, "no_sync", None)
    if not callable(no_sync):
        raise TypeError(
            f"sam_pass needs the DistributedDataParallel-wrapped model (with no_sync()); got "
            f"{type(model).__name__}"
        )
    if not isinstance(optimizer, SharpnessAwareOptimizer):
        raise TypeError(
            "sam_pass needs a torchsam optimizer (SAM or a variant); got "
            f"{type(optimizer).__name__}"
        )
    if not local:
        yield
        return
    name = type(optimizer).__name__
    if optimizer._needs_first_grads:
        raise ValueError(
            f"{name} forms its final gradient from the gradient at w too, so a local (per-rank) "
            "first pass would give each rank a different update; use local=False"
        )
    if optimizer._no_two_call_style is not None:
        raise ValueError(f"sam_pass does not support {name}: {optimizer._no_two_call_style}")
    context: contextlib.AbstractContextManager[Any]
    if optimizer.perturbed or not optimizer._wants_second_pass():
        context = contextlib.nullcontext()
    else:
        context = no_sync()
    with context:
        yield


class AllReduceCounter:
    """The state of :func:`count_all_reduces`: gradient all-reduces and their bytes so far.

    Example:
        >>> counter = torchsam.distributed.AllReduceCounter()
        >>> ddp_model.register_comm_hook(counter, torchsam.distributed.count_all_reduces)
        >>> ...  # train some steps
        >>> counter.calls, counter.bytes  # all-reduces and bytes sent into them
    """

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0


def count_all_reduces(counter: AllReduceCounter, bucket: Any) -> Any:
    """A DDP comm hook that counts each gradient bucket's all-reduce into ``counter``, then
    averages the bucket over the default process group as DDP's default hook does."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    counter.calls += 1
    counter.bytes += buffer.numel() * buffer.element_size()
    buffer.div_(dist.get_world_size())
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])


# DDP checks a hook's annotations as objects (this module's are strings).
if torch.distributed.is_available():
    count_all_reduces.__annotations__.update(
        {"bucket": torch.distributed.GradBucket, "return": torch.futures.Future[torch.Tensor]}
    )
