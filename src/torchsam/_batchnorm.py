"""Keep normalisation layers' running statistics out of SAM's second forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["freeze_running_stats"]

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def freeze_running_stats(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Keep normalisation layers' running statistics unchanged inside the ``with`` block.

    SAM's second forward pass runs at the perturbed weights ``w + e``; letting BatchNorm
    update its running mean and variance there would count every batch twice, once with
    statistics of weights the model never keeps. Inside the block every training-mode module
    that tracks running statistics still normalises as in training (with batch statistics),
    but ``running_mean``, ``running_var`` and ``num_batches_tracked`` end the block bit-exactly
    as they entered it, also when the block raises:

    * BatchNorm layers (``BatchNorm*d``, ``SyncBatchNorm``) get ``track_running_stats=False``
      for the duration of the block, so they neither read nor write the buffers (a backward
      pass after the block is fine);
    * other modules with running statistics (``InstanceNorm*d(track_running_stats=True)``)
      have their buffers copied on entry and copied back on exit.

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
    switched: list[nn.Module] = []
    saved: list[tuple[Tensor, Tensor]] = []
    if enabled:
        for module in model.modules():
            if not (module.training and getattr(module, "track_running_stats", False)):
                continue
            if isinstance(module, _BatchNorm):
                setattr(module, "track_running_stats", False)  # noqa: B010 (typed as Tensor)
                switched.append(module)
            else:
                for name in _STAT_BUFFERS:
                    buf = getattr(module, name, None)
                    if isinstance(buf, Tensor):
                        saved.append((buf, buf.detach().clone()))
    try:
        yield model
    finally:
        for module in switched:
            setattr(module, "track_running_stats", True)  # noqa: B010
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
