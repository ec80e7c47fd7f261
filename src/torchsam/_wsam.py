"""WSAM: weighted sharpness as a regulariser."""

from __future__ import annotations

from typing import Any, ClassVar

from torchsam import _kernels
from torchsam._engine import GroupView, group_foreach
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

    _needs_first_grads = True

    hyperparameters: ClassVar[dict[str, Any]] = {"gamma": 0.9, "decouple": True}

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_fraction("gamma", group["gamma"], zero_ok=True, one_ok=False)
        if not isinstance(group["decouple"], bool):
            raise TypeError(f"decouple must be True or False, got {group['decouple']!r}")

    def _prepare_base_grads(self, views: list[GroupView]) -> None:
        for v in views:
            beta, foreach = _beta(v.group), group_foreach(v.group)
            first = self._scratch(v, "first_grad")
            if v.group["decouple"]:
                # keep g_s - g for after the base step, which takes g alone
                sharp = self._scratch(v, "sharpness")
                _kernels.combine_(sharp, v.grads, 1.0, first, -1.0, foreach)
                self._base_grads(v, "first_grad")
            else:
                _kernels.combine_(self._base_grads(v), v.grads, beta, first, 1.0 - beta, foreach)

    def _after_base_step(self, views: list[GroupView]) -> None:
        for v in views:
            if v.group["decouple"]:
                step = -float(v.group["lr"]) * _beta(v.group)
                if v.group.get("maximize", False):
                    step = -step  # WSAM of -L: the sharpness term changes sign with the loss
                _kernels.add_(v.params, self._scratch(v, "sharpness"), step, group_foreach(v.group))


def _beta(group: dict[str, Any]) -> float:
    gamma = float(group["gamma"])
    return gamma / (1.0 - gamma)
