"""Keep normalisation layers' running statistics out of SAM's second forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["freeze_running_stats"]


@contextmanager
def freeze_running_stats(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Stop running-statistics updates of normalisation layers inside the ``with`` block.

    SAM's second forward pass runs at the perturbed weights ``w + e``; letting BatchNorm
    update its running mean and variance there would count every batch twice, once with
    statistics of weights the model never keeps. Inside the block every module that tracks
    running statistics (``BatchNorm*d``, ``SyncBatchNorm``, ``InstanceNorm*d`` with
    ``track_running_stats=True``) normalises with the batch statistics, as in training, but
    leaves ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched.
    Modules in eval mode are not affected (they do not update statistics anyway).

    Args:
        model (nn.Module): the model whose normalisation layers to freeze
        enabled (bool, optional): when False the block does nothing, which lets a closure
            write ``freeze_running_stats(model, enabled=optimizer.perturbed)`` (default: True)

    Example:
        >>> loss_fn(model(x), y).backward()
        >>> optimizer.first_step(zero_grad=True)
        >>> with freeze_running_stats(model):
        ...     loss_fn(model(x), y).backward()
        >>> optimizer.second_step(zero_grad=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze_running_stats expects an nn.Module, got {type(model)!r}")
    frozen: list[nn.Module] = []
    if enabled:
        for module in model.modules():
            if getattr(module, "track_running_stats", False) and module.training:
                setattr(module, "track_running_stats", False)  # noqa: B010 (typed as Tensor)
                frozen.append(module)
    try:
        yield model
    finally:
        for module in frozen:
            setattr(module, "track_running_stats", True)  # noqa: B010
