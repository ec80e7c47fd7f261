"""SAM under ``torch.nn.parallel.DistributedDataParallel``: where the gradients are averaged.

A sharpness-aware step has two forward/backward passes. Under DDP each backward all-reduces
the gradients, so by default both passes are synchronised and every sharpness-aware optimizer
gives the same weights as one process on the whole batch (with the loss averaged over the
batch and equal batches per rank). Nothing extra is needed for that mode.

The original SAM paper perturbs each worker with its *own* gradient (m-sharpness, with ``m``
the per-worker batch): the first pass then needs no gradient all-reduce (only a 4-byte flag
that tells every rank of an overflow), and only the gradient at the perturbed point is
averaged. :func:`sam_pass` runs a pass in the right mode for both call styles::

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
optimizers (ESAM and MSAM included) take the sharded (``DTensor``) parameters as they are, and
their gradient norms and inner products are summed over all shards (see ``docs/design.md``).
A plain ``torch.amp.GradScaler`` works too: DTensor takes the maximum of the ranks' overflow
flags in ``scaler.unscale_``, so an overflow on one rank's shard skips the step on every rank.
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

    Mixed precision (``torch.amp.GradScaler``, two-call style): call ``first_step(...,
    grad_scaler=scaler)`` after leaving the context. A synchronised pass spreads an overflow
    (inf or NaN) to every rank through its all-reduce; after a local first pass this context
    does it, with one all-reduce of a flag: when any rank's gradients are not finite, every
    rank's become NaN, so every rank skips the step and the scalers back off together.

    Under DDP, FriendlySAM and VaSSO keep the moving averages of the gradient at ``w`` that
    they perturb with: in local mode each rank keeps its own (from its own gradients), so their
    optimizer states differ between ranks while the weights stay identical.

    Args:
        model (DistributedDataParallel): the wrapped model (anything with ``no_sync()``)
        optimizer (SharpnessAwareOptimizer): the torchsam optimizer of this model
        local (bool, optional): perturb each rank with its own gradient (default: True)

    Raises:
        TypeError: ``model`` has no ``no_sync()`` or ``optimizer`` is not a torchsam optimizer.
        ValueError: ``local=True`` with a variant whose final gradient uses the gradient at
            ``w`` (GSAM, WSAM, LookSAM), which would then differ between ranks and let the
            weights diverge; use ``local=False`` for those. Also for ESAM and MSAM, which run
            their backward passes inside ``step(closure)``: under DDP call their ``step`` as
            usual (both passes synchronised).
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
    _check_local(optimizer)
    if optimizer.perturbed or not optimizer.second_pass_due():
        yield
        return
    with no_sync():
        yield
    _spread_non_finite(model, optimizer)


def _check_local(optimizer: SharpnessAwareOptimizer) -> None:
    """Refuse a local first pass where the optimizer's public capabilities rule it out."""
    name = type(optimizer).__name__
    if optimizer.needs_first_grads:
        raise ValueError(
            f"{name} forms its final gradient from the gradient at w too, so a local (per-rank) "
            "first pass would give each rank a different update; use local=False"
        )
    if optimizer.no_two_call_style is not None:
        raise ValueError(
            f"sam_pass(local=True) does not support {name}: it runs its own backward passes "
            "inside step(closure), where no context can make its first pass local. Under DDP "
            "call optimizer.step(closure) without sam_pass: both passes are then synchronised"
        )


def _spread_non_finite(model: nn.Module, optimizer: SharpnessAwareOptimizer) -> None:
    """After a local first pass: if a gradient of any rank is not finite, make every rank's
    gradients NaN, so that every rank skips the step.

    A synchronised pass spreads an inf or NaN to every rank through the all-reduce; a local
    pass does not, and the ranks would then disagree on whether to skip the step (one
    skipping it, the others stepping with the averaged second gradient), and the weights
    would differ between ranks from then on. One all-reduce of a flag decides for all, before
    ``GradScaler.unscale_`` and ``first_step`` look at the gradients, so both see the overflow
    on every rank. The ranks that found it are filled with NaN too: clipping, which may still
    follow (Lightning clips after ``on_before_optimizer_step``), keeps a NaN, whereas clipping
    by value turns an inf into a finite number and that rank alone would step.

    Also called by :class:`torchsam.lightning.LocalPerturbation`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    present = [g for g in grads if g is not None]
    if present:
        peaks = torch._foreach_norm(present, float("inf"))
        device = present[0].device
        # finiteness in each gradient's own dtype (a float64 peak above float32's range is
        # finite), gathered on one device
        finite = torch.stack([torch.isfinite(n).to(device) for n in peaks])
        flag = (~finite).any().to(torch.float32)
    else:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        flag = torch.zeros((), dtype=torch.float32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=getattr(model, "process_group", None))
    if bool(flag.item()):  # some rank's gradients are not finite
        for g in present:
            g.fill_(float("nan"))


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
