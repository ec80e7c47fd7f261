"""m-sharpness: one perturbation per micro-batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from torchsam._engine import StepContext
from torchsam._engine import _functional as F
from torchsam._esam import PerSampleClosure, _per_sample
from torchsam._sam import SAM, check_int

__all__ = ["MSAM"]


class MSAM(SAM):
    r"""SAM with m-sharpness: a perturbation per micro-batch of ``m`` samples (mSAM).

    Foret et al., ICLR 2021, Sec. 4.1 ("m-sharpness"); Andriushchenko & Flammarion,
    "Towards Understanding Sharpness-Aware Minimization", ICML 2022, Eq. 3. The batch is split
    into micro-batches :math:`S_1, \dots, S_J` of ``m`` samples; each gets its own perturbation
    from its own gradient, and the base optimizer steps with the average of the perturbed
    gradients, weighted by micro-batch size:

    .. math::
        e_j = \rho\, \frac{\nabla L_{S_j}(w)}{\lVert \nabla L_{S_j}(w) \rVert}, \qquad
        g = \sum_j \frac{|S_j|}{n}\, \nabla L_{S_j}(w + e_j).

    The total work equals SAM's on the whole batch (two passes over every sample), in ``J``
    smaller pieces. Smaller ``m`` is known to generalise better.

    MSAM uses the per-sample closure protocol of :class:`torchsam.ESAM`: ``closure(indices)``
    returns the per-sample losses of the rows ``indices`` of the current batch, without
    clearing gradients or calling ``backward()``; :meth:`step` takes the batch size. After a
    step, ``p.grad`` holds the last micro-batch's perturbed gradient (weighted by
    :math:`|S_J|/n`), as its backward pass made it; the base optimizer steps with the sum.

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
        m (int, optional): micro-batch size (default: 32)

    Example:
        >>> optimizer = MSAM(model.parameters(), torch.optim.SGD, rho=0.05, m=16, lr=0.1)
        >>> def closure(indices):
        ...     return F.cross_entropy(model(x[indices]), y[indices], reduction="none")
        >>> loss = optimizer.step(closure, batch_size=len(x))
    """

    options: ClassVar[dict[str, Any]] = {"m": 32}
    m: int
    no_two_call_style = (
        "it perturbs each micro-batch separately; use step(closure, batch_size=n) with a "
        "closure that returns per-sample losses"
    )

    def check_options(self) -> None:
        check_int("m", self.m)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: PerSampleClosure | None = None, *, batch_size: int | None = None
    ) -> Tensor:
        """One m-sharpness step over a batch of ``batch_size`` rows.

        Returns:
            the mean loss of the batch at ``w`` (detached).
        """
        message = (
            "MSAM.step() needs closure(indices) returning per-sample losses and the batch "
            "size: step(closure, batch_size=n)"
        )
        if closure is None:
            return self.step_without_closure(message)
        if batch_size is None:
            raise RuntimeError(message)
        check_int("batch_size", batch_size)
        self.require_idle("step()")
        chunks = torch.arange(batch_size).split(self.m)
        total: Tensor | None = None  # on the losses' device: no copy to the host
        for j, rows in enumerate(chunks):
            self.zero_grad()
            with torch.enable_grad():
                losses = _per_sample(closure(rows), "closure(indices)")
                (losses.sum() / batch_size).backward()  # weights |S_j| / n
            if total is None:
                total = torch.zeros((), device=losses.device)
            total = total + losses.detach().sum()
            ctx = self._begin_micro_batch()
            self.at_perturbed_point(_backward_of(closure, rows, batch_size))
            ctx.variables["micro_batches"] = len(chunks)
            if j < len(chunks) - 1:
                self._accumulate(ctx, first=j == 0)
        self.finish_step()
        return cast(Tensor, total) / batch_size  # batch_size >= 1: one chunk at least

    def _begin_micro_batch(self) -> StepContext:
        """Perturb along this micro-batch's gradient; the step's context."""
        self.begin_step(zero_grad=True)
        return cast(StepContext, self.step_context)

    def _accumulate(self, ctx: StepContext, *, first: bool) -> None:
        """Add this micro-batch's gradient at ``w + e_j`` to the sum, and go back to ``w``."""
        views = ctx.gradients_now()
        for v in views:
            buf = ctx.scratch(v, "accumulated")
            if first:
                F.copy_(buf, v.grads, v.foreach)
            else:
                F.add_(buf, v.grads, 1.0, v.foreach)
        ctx.flag_grads(views)  # this gradient at w + e_j is part of the step's
        self.return_to_w()  # for the next micro-batch (what it recorded is kept)

    def base_gradient(self, ctx: StepContext) -> None:
        # the last micro-batch's perturbed gradient (in p.grad) plus the others' (accumulated)
        if ctx.variables.get("micro_batches", 1) > 1:
            for v in ctx.views:
                accumulated = ctx.scratch(v, "accumulated")
                F.combine_(ctx.base_grads(v), v.grads, 1.0, accumulated, 1.0, v.foreach)


def _backward_of(closure: PerSampleClosure, rows: Tensor, batch_size: int) -> Callable[[], None]:
    def run() -> None:
        (closure(rows).sum() / batch_size).backward()

    return run
