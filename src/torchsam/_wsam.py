"""WSAM: weighted sharpness as a regulariser."""

from __future__ import annotations

from typing import Any, ClassVar

from torchsam._engine import StepContext
from torchsam._engine import _functional as F
from torchsam._sam import SAM, check_fraction

__all__ = ["WSAM"]


class WSAM(SAM):
    r"""Weighted Sharpness-Aware Minimization.

    Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term", KDD 2023, Eq. 3. The objective adds the sharpness
    :math:`\tilde L(w) = \max_{\lVert e \rVert \le \rho} L(w + e) - L(w)` with weight
    :math:`\gamma / (1 - \gamma)`:

    .. math::
        L_{WSAM}(w) = L(w) + \frac{\gamma}{1 - \gamma} \tilde L(w), \qquad
        \nabla L_{WSAM} \approx g + \beta (g_s - g), \quad \beta = \frac{\gamma}{1 - \gamma},

    with :math:`g = \nabla L(w)` and :math:`g_s = \nabla L(w + e)` (SAM's perturbation).
    :math:`\gamma = 0` is the base optimizer, :math:`\gamma = 1/2` is SAM.

    With ``decouple=True`` (the authors' default) the base optimizer steps with :math:`g`
    alone (its momentum, adaptive scaling and weight decay see only the loss gradient), and the
    sharpness term is applied afterwards as a plain step
    :math:`w \leftarrow w - lr\, \beta\, (g_s - g)`. With ``decouple=False`` the base optimizer
    steps with :math:`(1 - \beta) g + \beta g_s`.

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
        gamma (float, optional): weight of the sharpness, in [0, 1) (default: 0.9, the
            authors' example)
        decouple (bool, optional): apply the sharpness term outside the base optimizer
            (default: True)

    Example:
        >>> optimizer = WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9,
        ...                  lr=0.1, momentum=0.9)
        >>> loss = optimizer.step(closure)
    """

    needs_first_grads = True

    hyperparameters: ClassVar[dict[str, Any]] = {"gamma": 0.9, "decouple": True}

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_fraction("gamma", group["gamma"], zero_ok=True, one_ok=False)
        if not isinstance(group["decouple"], bool):
            raise TypeError(f"decouple must be True or False, got {group['decouple']!r}")

    def base_gradient(self, ctx: StepContext) -> None:
        if not ctx.two_pass:
            return
        for v in ctx.views:
            beta, foreach = _beta(v.group), v.foreach
            first = ctx.first_grads(v)
            if v.group["decouple"]:
                # keep g_s - g for after the base step, which takes g alone
                F.combine_(ctx.scratch(v, "sharpness"), v.grads, 1.0, first, -1.0, foreach)
                ctx.base_grads(v, "first_grad")
            else:
                F.combine_(ctx.base_grads(v), v.grads, beta, first, 1.0 - beta, foreach)

    def after_base_step(self, ctx: StepContext) -> None:
        for v in ctx.views:
            if v.group["decouple"]:
                step = -float(v.group["lr"]) * _beta(v.group)
                if v.group.get("maximize", False):
                    step = -step  # WSAM of -L: the sharpness term changes sign with the loss
                F.add_(v.params, ctx.scratch(v, "sharpness"), step, v.foreach)


def _beta(group: dict[str, Any]) -> float:
    gamma = float(group["gamma"])
    return gamma / (1.0 - gamma)
