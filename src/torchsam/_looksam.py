"""LookSAM: the sharpness gradient every k steps, its new direction reused in between."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from torchsam import _kernels
from torchsam._engine import GroupView, group_foreach
from torchsam._sam import SAM, check_int, check_real

__all__ = ["LookSAM"]

_EPS = 1e-12


class LookSAM(SAM):
    r"""LookSAM: SAM's second pass only every ``k`` steps.

    Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022,
    Algorithm 1. On every ``k``-th step (the first included) it is SAM, and it keeps the part of
    the perturbed gradient :math:`g_s` orthogonal to the gradient :math:`g`:

    .. math::
        g_v = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert^2}\, g .

    On the steps in between there is no second pass: the base optimizer steps with

    .. math::
        g + \alpha\, \frac{\lVert g \rVert}{\lVert g_v \rVert}\, g_v ,

    so a ``k``-step cycle costs ``k + 1`` forward/backward passes instead of SAM's ``2k``. The
    orthogonal part is kept per parameter in the optimizer state and saved with it.

    In the two-call style, :meth:`first_step` returns False on the steps without a second pass;
    run the second forward/backward only when it returns True, then call :meth:`second_step`.

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
        k (int, optional): period of the sharpness steps (default: 5)
        alpha (float, optional): weight of the reused direction (default: 0.1; the paper's
            0.7 comes from ImageNet-scale ViT training, see the note on tuning)

    Example:
        >>> optimizer = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5,
        ...                     alpha=0.1, lr=0.1, momentum=0.9)
        >>> loss = optimizer.step(closure)  # evaluates closure twice every 5th step, else once

    Note:
        ``alpha`` needs tuning: LookSAM's accuracy depends on it most. In the sweep of
        ``benchmarks/sweep_defaults.py`` (six small tasks: MLP and CNN with BatchNorm, SGD and
        AdamW, with and without label noise; tables in ``docs/benchmarks.md``) 0.1 was the
        largest value tested whose mean over 3 seeds stayed within 0.2 points of SGD's, or
        above it, on every task. Larger values gained the most on MLPs with noisy labels (0.7:
        +18.9 points on the 1-D signals with SGD), but on a CNN trained at the edge of
        stability (SGD lr 0.05, momentum 0.9, no warm-up) 0.2, 0.4 and 0.7 each left runs far
        below SGD, two of them at chance, and 0.7 lost 1.8 points on clean digits with AdamW.
        Start from 0.1 and try 0.2-0.7 on a validation set. ``k`` (2, 5, 10) mattered less.
    """

    _needs_first_grads = True

    hyperparameters: ClassVar[dict[str, Any]] = {"alpha": 0.1}
    options: ClassVar[dict[str, Any]] = {"k": 5}
    k: int

    def _check_options(self) -> None:
        check_int("k", self.k)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_real("alpha", group["alpha"])

    def _wants_second_pass(self) -> bool:
        return self._step_count() % self.k == 0

    def _prepare_base_grads(self, views: list[GroupView]) -> None:
        g = [self._scratch(v, "first_grad") for v in views]
        g_s = [v.grads for v in views]
        sq = self._global_norm(views, g).to(torch.float64).square()
        coef = self._global_dot(views, g, g_s) / (sq + _EPS)  # on the device
        gv: list[list[Tensor]] = []
        for v, first in zip(views, g, strict=True):
            bufs = []
            for p, gs in zip(v.params, v.grads, strict=True):
                buf = self.state[p].get("gv")
                if buf is None or buf.shape != gs.shape:
                    buf = torch.empty_like(gs)
                    self.state[p]["gv"] = buf
                bufs.append(buf)
            _kernels.combine_(bufs, v.grads, 1.0, first, -coef, group_foreach(v.group))
            gv.append(bufs)
            v.layout.buffers["gv"] = bufs  # the same tensors as the state, found faster
        # ||g_v|| is fixed until the next sharpness step: kept (and saved) with the state; it
        # stays on the device (state_dict() brings it to the host)
        self._global_state["gv_norm"] = self._global_norm(views, gv).to(torch.float64)

    def _flag_nonfinite_one_pass_grads(self, views: list[GroupView]) -> None:
        # ||g|| is needed for the update anyway; a finite norm means finite gradients (an
        # overflowing norm of finite gradients would make the update overflow too: skipped)
        self._one_pass_norm = self._global_norm(views, [v.grads for v in views])
        self._flag_nonfinite_norm(self._one_pass_norm)

    def _prepare_one_pass_grads(self, views: list[GroupView]) -> None:
        gv = [
            v.layout.buffers.get("gv") or [self.state[p].get("gv") for p in v.params] for v in views
        ]
        gv_norm = self._global_state.get("gv_norm")
        if gv_norm is None or any(buf is None for bufs in gv for buf in bufs):
            return  # no sharpness step has been seen for these parameters yet: plain step
        ratio = self._one_pass_norm.to(torch.float64) / (gv_norm + _EPS)  # on the device
        for v, bufs in zip(views, gv, strict=True):
            alpha = ratio * float(v.group["alpha"])
            _kernels.combine_(
                self._base_grads(v), v.grads, 1.0, bufs, alpha, group_foreach(v.group)
            )
