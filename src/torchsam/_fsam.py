"""Friendly SAM: the perturbation without the full-gradient component."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from torchsam._engine import GroupView, StepContext
from torchsam._sam import SAM, check_fraction, check_real

__all__ = ["FriendlySAM"]


class FriendlySAM(SAM):
    r"""Friendly Sharpness-Aware Minimization (F-SAM).

    Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024, Sec. 4. The stochastic
    gradient :math:`g_t` is the full-batch gradient plus batch noise; only the noise part helps
    the perturbation. F-SAM estimates the full gradient by an exponential moving average of past
    gradients and removes it:

    .. math::
        d_t = g_t - \sigma\, m_{t-1}, \qquad m_t = \lambda\, m_{t-1} + (1 - \lambda)\, g_t,
        \qquad e = \rho\, d_t / \lVert d_t \rVert,

    with :math:`m_1 = g_1` and a plain SAM perturbation on the first step. This is the order
    of the authors' implementation; with :math:`\sigma = 1` the direction equals the paper's
    :math:`g_t - \sigma m_t` up to a positive factor (:math:`\lambda`). The EMA is kept per
    parameter in the optimizer state and saved with it.

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
        sigma (float, optional): how much of the estimated full gradient to remove
            (default: 1.0)
        lmbda (float, optional): decay of the gradient EMA, in [0, 1) (default: 0.9, the
            authors' class default; their CIFAR runs use 0.95 with ``rho`` 0.1-0.2)

    Example:
        >>> optimizer = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.1,
        ...                         sigma=1.0, lmbda=0.95, lr=0.05, momentum=0.9)
        >>> loss = optimizer.step(closure)
    """

    hyperparameters: ClassVar[dict[str, Any]] = {"sigma": 1.0, "lmbda": 0.9}

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_real("sigma", group["sigma"])
        check_fraction("lmbda", group["lmbda"], zero_ok=True, one_ok=False)

    def ascent_direction(self, view: GroupView) -> list[Tensor]:
        emas = self.gradient_ema(view, "grad_ema")
        if all(m is None for m in emas):  # first step: plain SAM
            return view.grads
        sigma = float(view.group["sigma"])
        if view.foreach and all(m is not None for m in emas):
            return list(torch._foreach_add(view.grads, emas, alpha=-sigma))  # type: ignore[arg-type]
        return [
            g if m is None else torch.add(g, m, alpha=-sigma)
            for g, m in zip(view.grads, emas, strict=True)
        ]

    def on_perturbed(self, ctx: StepContext) -> None:
        self.update_gradient_ema(ctx, "grad_ema", lambda group: 1.0 - float(group["lmbda"]))
