"""VaSSO: variance-suppressed sharpness-aware optimization."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from torchsam._engine import GroupView, StepContext
from torchsam._sam import SAM, check_fraction

__all__ = ["VaSSO"]


class VaSSO(SAM):
    r"""Variance-Suppressed Sharpness-Aware Optimization.

    Li & Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance Suppression",
    NeurIPS 2023, Algorithm 1. The perturbation follows an exponential moving average of the
    stochastic gradients instead of the current one, which suppresses the variance of the
    adversary:

    .. math::
        d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \qquad
        e = \rho\, \frac{d_t}{\lVert d_t \rVert + 10^{-12}},

    with :math:`d_1 = g_1`; :math:`\theta = 1` is SAM. The average is kept per parameter in the
    optimizer state and saved with it. (The authors' code adds ``1e-7`` to the norm; torchsam
    uses SAM's ``1e-12``.)

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
        theta (float, optional): weight of the new gradient in the average, in (0, 1]
            (default: 0.9, the authors' setting)

    Example:
        >>> optimizer = VaSSO(model.parameters(), torch.optim.SGD, rho=0.1, theta=0.4,
        ...                   lr=0.1, momentum=0.9)
        >>> loss = optimizer.step(closure)
    """

    hyperparameters: ClassVar[dict[str, Any]] = {"theta": 0.9}

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_fraction("theta", group["theta"], zero_ok=False, one_ok=True)

    def ascent_direction(self, view: GroupView) -> list[Tensor]:
        # d_t as a temporary; the state is updated by second_step (finite steps only)
        theta = float(view.group["theta"])
        emas = self.gradient_ema(view, "grad_ema")
        if view.foreach and all(d is not None for d in emas):
            return list(torch._foreach_lerp(emas, view.grads, theta))  # type: ignore[arg-type]
        return [
            g if d is None else torch.lerp(d, g, theta)
            for g, d in zip(view.grads, emas, strict=True)
        ]

    def on_perturbed(self, ctx: StepContext) -> None:
        self.update_gradient_ema(ctx, "grad_ema", lambda group: float(group["theta"]))
