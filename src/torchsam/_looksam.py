"""LookSAM: the sharpness gradient every k steps, its new direction reused in between."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from torchsam._engine import StepContext
from torchsam._engine import _functional as F
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

    needs_first_grads = True

    hyperparameters: ClassVar[dict[str, Any]] = {"alpha": 0.1}
    options: ClassVar[dict[str, Any]] = {"k": 5}
    k: int

    def check_options(self) -> None:
        check_int("k", self.k)

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        check_real("alpha", group["alpha"])

    def second_pass_due(self) -> bool:
        return self.step_count % self.k == 0

    def uses_grad_norm(self, two_pass: bool) -> bool:
        # ||g|| of a step without second pass: a finite norm means finite gradients (an
        # overflowing norm of finite gradients would make the update overflow too: skipped)
        return not two_pass

    def base_gradient(self, ctx: StepContext) -> None:
        if ctx.two_pass:
            self._keep_orthogonal_part(ctx)
        else:
            self._reuse_orthogonal_part(ctx)

    def _keep_orthogonal_part(self, ctx: StepContext) -> None:
        """``g_v = g_s - <g, g_s> / ||g||^2 g`` into the state, and ``||g_v||``."""
        g = [ctx.first_grads(v) for v in ctx.views]
        g_s = [v.grads for v in ctx.views]
        sq = ctx.norm(g).to(torch.float64).square()
        coef = ctx.dot(g, g_s) / (sq + _EPS)  # on the device
        gv: list[list[Tensor]] = []
        for v, first in zip(ctx.views, g, strict=True):
            bufs = []
            for p, gs in zip(v.params, v.grads, strict=True):
                buf = self.own_state[p].get("gv")
                if buf is None or buf.shape != gs.shape:
                    buf = torch.empty_like(gs)
                    self.own_state[p]["gv"] = buf
                bufs.append(buf)
            minus = -coef
            splits = zip(v.split(bufs), v.split(v.grads), v.split(first), strict=True)
            for out, g_part, first_part in splits:  # one device and dtype each
                F.combine_(out, g_part, 1.0, first_part, F.cast_like(minus, out[0]), v.foreach)
            gv.append(bufs)
            v.layout.buffers["gv"] = bufs  # the same tensors as the state, found faster
        # ||g_v|| is fixed until the next sharpness step: kept (and saved) with the state; it
        # stays on the device (state_dict() brings it to the host)
        self.wide_state["gv_norm"] = ctx.norm(gv).to(torch.float64)

    def _reuse_orthogonal_part(self, ctx: StepContext) -> None:
        """``g + alpha ||g|| / ||g_v|| g_v`` (``g`` alone before the first sharpness step)."""
        gv: list[list[Any]] = [
            v.layout.buffers.get("gv") or [self.own_state[p].get("gv") for p in v.params]
            for v in ctx.views
        ]
        gv_norm = self.wide_state.get("gv_norm")
        if gv_norm is None or any(buf is None for bufs in gv for buf in bufs):
            return  # no sharpness step has been seen for these parameters yet: plain step
        ratio = ctx.grad_norm().to(torch.float64) / (gv_norm + _EPS)  # on the device
        for v, bufs in zip(ctx.views, gv, strict=True):
            alpha = ratio * float(v.group["alpha"])
            splits = zip(v.split(ctx.base_grads(v)), v.split(v.grads), v.split(bufs), strict=True)
            for out, g_part, gv_part in splits:  # one device and dtype each
                F.combine_(out, g_part, 1.0, gv_part, F.cast_like(alpha, out[0]), v.foreach)
