"""GSAM: surrogate-gap guided SAM."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from torchsam._engine import StepContext
from torchsam._engine import _functional as F
from torchsam._sam import SAM, check_real

__all__ = ["GSAM"]

_EPS = 1e-12


class GSAM(SAM):
    r"""Surrogate Gap Guided Sharpness-Aware Minimization.

    Zhuang et al., "Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022,
    Algorithm 1. The perturbation is SAM's (with radius :math:`\rho_t`); the gradient
    :math:`g = \nabla f(w)` is split into its parts parallel and orthogonal to the perturbed
    gradient :math:`g_s = \nabla f(w + e)`,

    .. math::
        g_\perp = g - \frac{\langle g, g_s \rangle}{\lVert g_s \rVert^2 + 10^{-12}}\, g_s,

    and the base optimizer steps with :math:`g_s - \alpha\, g_\perp`: descending the perturbed
    loss while ascending the clean loss orthogonally to it, which shrinks the surrogate gap
    :math:`f(w + e) - f(w)` without changing :math:`f(w + e)` to first order.

    The radius may follow the learning rate, as in the paper:
    :math:`\rho_t = \rho_{min} + (\rho - \rho_{min})\,(lr_t - lr_{min}) / (lr_{max} - lr_{min})`,
    where :math:`lr_t` is the group's current learning rate (so it follows any LR scheduler).
    The fraction :math:`(lr_t - lr_{min}) / (lr_{max} - lr_{min})` is clamped to :math:`[0, 1]`,
    so the radius stays in :math:`[\rho_{min}, \rho]`, with a warning when the learning rate
    leaves :math:`[lr_{min}, lr_{max}]` (the authors' code extrapolates there). By default
    :math:`lr_{max}` is the learning rate when the optimizer is built: with a schedule that
    rises above it (warm-up, ``OneCycleLR``), pass its peak as ``lr_max``.

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
            (``rho`` is :math:`\rho_{max}` when ``rho_min`` is set)
        alpha (float, optional): weight of the orthogonal ascent, ``0`` gives SAM
            (default: 0.2, the authors' CIFAR example)
        rho_min (float, optional): radius at ``lr_min``; None keeps ``rho`` constant
            (default: None)
        lr_max (float, optional): learning rate at which the radius is ``rho``; None takes
            the group's learning rate when the optimizer is built (default: None)
        lr_min (float, optional): learning rate at which the radius is ``rho_min``
            (default: 0.0)

    Example:
        >>> optimizer = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02,
        ...                  alpha=0.2, lr=0.1, momentum=0.9)
        >>> scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
        >>> loss = optimizer.step(closure)  # rho_t follows the cosine schedule
    """

    needs_first_grads = True

    hyperparameters: ClassVar[dict[str, Any]] = {
        "alpha": 0.2,
        "rho_min": None,
        "lr_max": None,
        "lr_min": 0.0,
    }

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_real("alpha", group["alpha"])
        check_real("lr_min", group["lr_min"])
        for key in ("rho_min", "lr_max"):
            if group[key] is not None:
                check_real(key, group[key])
        if group["rho_min"] is not None and group["rho_min"] > group["rho"]:
            raise ValueError(
                f"Invalid rho_min value: {group['rho_min']}; "
                f"it must not exceed rho ({group['rho']})"
            )

    def complete_group(self, group: dict[str, Any]) -> None:
        if group["lr_max"] is None and group["rho_min"] is not None:
            group["lr_max"] = float(group["lr"])

    def radius(self, group: dict[str, Any]) -> float:
        rho, rho_min = float(group["rho"]), group["rho_min"]
        if rho_min is None:
            return rho
        lr_max, lr_min = float(group["lr_max"]), float(group["lr_min"])
        if lr_max == lr_min:
            return rho
        lr = float(group["lr"])
        fraction = (lr - lr_min) / (lr_max - lr_min)
        if not 0.0 <= fraction <= 1.0:
            warnings.warn(
                f"GSAM: the learning rate {lr} is outside [lr_min, lr_max] = [{lr_min}, "
                f"{lr_max}], so the radius is held at the end of [rho_min, rho]; lr_max defaults "
                "to the learning rate when the optimizer is built: with a warm-up or OneCycleLR, "
                "pass the schedule's peak as lr_max",
                RuntimeWarning,
                stacklevel=2,
            )
            fraction = min(max(fraction, 0.0), 1.0)
        return float(rho_min) + (rho - float(rho_min)) * fraction

    def uses_grad_norm(self, two_pass: bool) -> bool:
        return two_pass  # ||g_s||: the finiteness check is derived from it

    def base_gradient(self, ctx: StepContext) -> None:
        if not ctx.two_pass:
            return
        g = [ctx.first_grads(v) for v in ctx.views]
        g_s = [v.grads for v in ctx.views]
        sq = ctx.grad_norm().to(torch.float64).square()
        coef = ctx.dot(g, g_s) / (sq + _EPS)  # on the device
        # g_s - alpha * (g - coef * g_s) = (1 + alpha * coef) * g_s - alpha * g
        for v, first in zip(ctx.views, g, strict=True):
            alpha = float(v.group["alpha"])
            a = 1.0 + alpha * coef
            splits = zip(v.split(ctx.base_grads(v)), v.split(v.grads), v.split(first), strict=True)
            for out, g_part, first_part in splits:  # one device and dtype each
                F.combine_(out, g_part, F.cast_like(a, out[0]), first_part, -alpha, v.foreach)
