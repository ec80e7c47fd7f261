"""Answer keys for the SAM variants: each paper's update rule, written out tensor by tensor.

Nothing here imports torchsam. Every class is deliberately plain: one Python loop per tensor,
ordinary torch ops (no ``torch._foreach_*``), the weights saved with ``clone()`` and put back
with ``copy_()``, and a stock ``torch.optim`` optimizer for the actual step. Each transcribes
the rule exactly as the docstring of the corresponding torchsam class states it (the paper's
equation, its defaults and its ``1e-12`` guards), so that a test can compare the two.

Conventions shared by all of them:

* the hyper-parameters that torchsam keeps per param group (``rho``, ``adaptive``, ``eta``,
  GSAM's ``alpha``, F-SAM's ``sigma``/``lmbda``, ...) live in the group dicts, with the class
  defaults filled in; the global ones (LookSAM's ``k``, ESAM's ``beta``/``gamma``/``seed``,
  MSAM's ``m``) are attributes;
* norms and inner products run over every parameter with a gradient in every group;
* ``self.t`` counts the finished steps from 0.

The closure-style classes take ``closure()`` that clears the gradients of ``self.base``,
computes the loss and calls ``backward()``. ESAM and MSAM take ``closure(indices)`` returning
per-sample losses of the batch rows ``indices`` (all rows for None), as torchsam's ESAM/MSAM do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

EPS = 1e-12

Groups = list[dict[str, Any]]
Kwargs = dict[str, Any]


# --------------------------------------------------------------------------- helpers
def norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all ``tensors`` taken together."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        total = total + (t * t).sum()
    return torch.sqrt(total)


def dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """The inner product of all ``xs`` with all ``ys`` taken together."""
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(xs, ys, strict=True):
        total = total + (x * y).sum()
    return total


def perturb(
    items: list[tuple[dict[str, Any], Tensor, Tensor]], radius: Callable[[dict[str, Any]], float]
) -> list[tuple[Tensor, Tensor]]:
    """SAM's / ASAM's ascent step on the direction ``d`` of each ``(group, param, d)``.

    ``e = radius * T^2 d / (||T d|| + 1e-12)`` with ``T = |w| + eta`` for adaptive groups and
    ``T = 1`` otherwise (Foret et al. 2021, Eq. 2; Kwon et al. 2021, Eq. 12), the norm over
    all items. Returns the ``(param, saved copy)`` pairs for :func:`restore`.
    """
    ops = []
    for group, p, _ in items:
        if group["adaptive"]:
            ops.append(p.detach().abs() + group["eta"])
        else:
            ops.append(torch.ones_like(p))
    n = norm([t * d for t, (_, _, d) in zip(ops, items, strict=True)])
    saved = []
    with torch.no_grad():
        for t, (group, p, d) in zip(ops, items, strict=True):
            saved.append((p, p.detach().clone()))
            p.add_(radius(group) * t * t * d / (n + EPS))
    return saved


def restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for p, w in saved:
            p.copy_(w)


def rho_of(group: dict[str, Any]) -> float:
    return float(group["rho"])


class _Reference:
    """The base optimizer over ``groups`` (with the variant's defaults filled in)."""

    group_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, groups: Groups, base_cls: type, base_kwargs: Kwargs, **hyper: Any) -> None:
        defaults = {"rho": 0.05, "adaptive": False, "eta": 0.0, **self.group_defaults}
        for key in list(hyper):
            if key in defaults:
                defaults[key] = hyper.pop(key)
        if hyper:
            raise TypeError(f"unexpected hyper-parameters {sorted(hyper)}")
        for g in groups:
            for key, value in defaults.items():
                g.setdefault(key, value)
        self.base = base_cls(groups, **base_kwargs)
        self.t = 0

    def live(self) -> list[tuple[dict[str, Any], Tensor]]:
        """``(group, param)`` for every parameter that has a gradient now."""
        return [(g, p) for g in self.base.param_groups for p in g["params"] if p.grad is not None]


# --------------------------------------------------------------------------- GSAM
class ReferenceGSAM(_Reference):
    """GSAM (Zhuang et al. 2022, Algorithm 1).

    ``g = grad f(w)``, ``e = rho_t g / (||g|| + 1e-12)`` (or ASAM's), ``g_s = grad f(w + e)``,
    and the base optimizer steps with
    ``g_s - alpha (g - <g, g_s> / (||g_s||^2 + 1e-12) g_s)`` (inner product and norm over all
    groups, ``alpha`` per group). With ``rho_min`` set,
    ``rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`` where ``lr_t``
    is the group's current learning rate and ``lr_max`` defaults to its learning rate when this
    object is built; the fraction ``(lr_t - lr_min) / (lr_max - lr_min)`` is clamped to [0, 1].
    ``self.radii`` records ``rho_t`` per step and group.
    """

    group_defaults: ClassVar[dict[str, Any]] = {
        "alpha": 0.2,
        "rho_min": None,
        "lr_max": None,
        "lr_min": 0.0,
    }

    def __init__(self, groups: Groups, base_cls: type, base_kwargs: Kwargs, **hyper: Any) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        for g in self.base.param_groups:
            if g["rho_min"] is not None and g["lr_max"] is None:
                g["lr_max"] = g["lr"]
        self.radii: list[list[float]] = []

    @staticmethod
    def radius(group: dict[str, Any]) -> float:
        if group["rho_min"] is None:
            return float(group["rho"])
        rho, rho_min = group["rho"], group["rho_min"]
        lr_t, lr_max, lr_min = group["lr"], group["lr_max"], group["lr_min"]
        fraction = min(max((lr_t - lr_min) / (lr_max - lr_min), 0.0), 1.0)
        return rho_min + (rho - rho_min) * fraction

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        live = self.live()
        g = [p.grad.clone() for _, p in live]
        self.radii.append([self.radius(group) for group in self.base.param_groups])
        saved = perturb([(grp, p, gi) for (grp, p), gi in zip(live, g, strict=True)], self.radius)
        closure()
        restore(saved)
        g_s = [p.grad.clone() for _, p in live]
        coef = dot(g, g_s) / (norm(g_s) ** 2 + EPS)
        for (group, p), gi, gsi in zip(live, g, g_s, strict=True):
            g_perp = gi - coef * gsi
            p.grad = gsi - group["alpha"] * g_perp
        self.base.step()
        self.t += 1
        return loss


# --------------------------------------------------------------------------- Friendly SAM
class ReferenceFriendlySAM(_Reference):
    """F-SAM (Li et al. 2024, Sec. 4), in the order of the authors' code.

    First step of a parameter: ``d = g`` and ``m = g``. Later: ``d = g - sigma m`` (the
    previous ``m``), then ``m = lmbda m + (1 - lmbda) g`` on the raw gradient. The perturbation
    is SAM's on ``d`` (``rho d / (||d|| + 1e-12)``, or ASAM's ``rho T^2 d / (||T d|| + 1e-12)``)
    and the base optimizer steps with the gradient at ``w + e``.
    """

    group_defaults: ClassVar[dict[str, Any]] = {"sigma": 1.0, "lmbda": 0.9}

    def __init__(self, groups: Groups, base_cls: type, base_kwargs: Kwargs, **hyper: Any) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        self.ema: dict[Tensor, Tensor] = {}

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        live = self.live()
        items = []
        for group, p in live:
            g = p.grad.clone()
            d = g - group["sigma"] * self.ema[p] if p in self.ema else g
            items.append((group, p, d))
        saved = perturb(items, rho_of)
        for group, p in live:
            g = p.grad.clone()
            if p in self.ema:
                self.ema[p] = group["lmbda"] * self.ema[p] + (1.0 - group["lmbda"]) * g
            else:
                self.ema[p] = g
        closure()
        restore(saved)
        self.base.step()
        self.t += 1
        return loss


# --------------------------------------------------------------------------- VaSSO
class ReferenceVaSSO(_Reference):
    """VaSSO (Li & Giannakis 2023, Algorithm 1).

    ``d = (1 - theta) d_prev + theta g`` (``d = g`` on a parameter's first step), and the
    perturbation is SAM's on ``d`` (ASAM's for adaptive groups); the average is kept.
    """

    group_defaults: ClassVar[dict[str, Any]] = {"theta": 0.9}

    def __init__(self, groups: Groups, base_cls: type, base_kwargs: Kwargs, **hyper: Any) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        self.avg: dict[Tensor, Tensor] = {}

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        items = []
        for group, p in self.live():
            g = p.grad.clone()
            d = g if p not in self.avg else (1 - group["theta"]) * self.avg[p] + group["theta"] * g
            self.avg[p] = d.clone()
            items.append((group, p, d))
        saved = perturb(items, rho_of)
        closure()
        restore(saved)
        self.base.step()
        self.t += 1
        return loss


# --------------------------------------------------------------------------- WSAM
class ReferenceWSAM(_Reference):
    """WSAM (Yue et al. 2023, Eq. 3), ``beta = gamma / (1 - gamma)``.

    Coupled: the base optimizer steps with ``(1 - beta) g + beta g_s``. Decoupled: it steps
    with ``g``, then ``w <- w - lr beta (g_s - g)`` with the group's learning rate.
    """

    group_defaults: ClassVar[dict[str, Any]] = {"gamma": 0.9, "decouple": True}

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        live = self.live()
        g = [p.grad.clone() for _, p in live]
        saved = perturb([(grp, p, gi) for (grp, p), gi in zip(live, g, strict=True)], rho_of)
        closure()
        restore(saved)
        g_s = [p.grad.clone() for _, p in live]
        for (group, p), gi, gsi in zip(live, g, g_s, strict=True):
            beta = group["gamma"] / (1.0 - group["gamma"])
            if group["decouple"]:
                p.grad = gi
            else:
                p.grad = (1.0 - beta) * gi + beta * gsi
        self.base.step()
        with torch.no_grad():
            for (group, p), gi, gsi in zip(live, g, g_s, strict=True):
                if group["decouple"]:
                    beta = group["gamma"] / (1.0 - group["gamma"])
                    p.sub_(group["lr"] * beta * (gsi - gi))
        self.t += 1
        return loss


# --------------------------------------------------------------------------- LookSAM
class ReferenceLookSAM(_Reference):
    """LookSAM (Liu et al. 2022, Algorithm 1).

    On steps ``t % k == 0``: a SAM step with ``g_s``, and
    ``g_v = g_s - <g, g_s> / (||g||^2 + 1e-12) g`` is kept. Other steps take one pass and
    the base optimizer steps with ``g + alpha ||g|| / (||g_v|| + 1e-12) g_v`` (``alpha`` per
    group, norms over all groups).
    """

    group_defaults: ClassVar[dict[str, Any]] = {"alpha": 0.7}

    def __init__(
        self, groups: Groups, base_cls: type, base_kwargs: Kwargs, *, k: int = 5, **hyper: Any
    ) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        self.k = k
        self.g_v: dict[Tensor, Tensor] = {}

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        live = self.live()
        g = [p.grad.clone() for _, p in live]
        if self.t % self.k == 0:
            saved = perturb([(grp, p, gi) for (grp, p), gi in zip(live, g, strict=True)], rho_of)
            closure()
            restore(saved)
            g_s = [p.grad.clone() for _, p in live]
            coef = dot(g, g_s) / (norm(g) ** 2 + EPS)
            for (_, p), gi, gsi in zip(live, g, g_s, strict=True):
                self.g_v[p] = gsi - coef * gi
        elif all(p in self.g_v for _, p in live):
            g_v = [self.g_v[p] for _, p in live]
            ratio = norm(g) / (norm(g_v) + EPS)
            for (group, p), gi, gvi in zip(live, g, g_v, strict=True):
                p.grad = gi + group["alpha"] * ratio * gvi
        self.base.step()
        self.t += 1
        return loss


# --------------------------------------------------------------------------- intermittent
class ReferenceIntermittentSAM(_Reference):
    """SAM on the steps ``t`` where ``sam_on(t)`` holds; a plain base step with ``g`` else."""

    def __init__(
        self,
        groups: Groups,
        base_cls: type,
        base_kwargs: Kwargs,
        *,
        sam_on: Callable[[int], bool],
        **hyper: Any,
    ) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        self.sam_on = sam_on

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        if self.sam_on(self.t):
            live = self.live()
            items = [(grp, p, p.grad.clone()) for grp, p in live]
            saved = perturb(items, rho_of)
            closure()
            restore(saved)
        self.base.step()
        self.t += 1
        return loss


# --------------------------------------------------------------------------- ESAM
class ReferenceESAM(_Reference):
    """ESAM (Du et al. 2022, Algorithm 1): stochastic weight perturbation and data selection.

    The tensor selection is *shared* with torchsam rather than re-randomised: on step ``t``,
    ``rng = random.Random(f"torchsam.ESAM:{seed}:{t}")`` draws ``rng.random()`` once for each
    trainable parameter in param-group order and the tensor is selected when the draw is below
    ``beta`` (every tensor when ``beta == 1``, without drawing). Then:

    1. ``g`` = gradient of the mean loss at ``w`` for the selected tensors only;
    2. ``e = (rho / beta) g / (||g|| + 1e-12)`` on the selected tensors (ASAM's form for
       adaptive groups), the norm over the selected gradients;
    3. per-sample losses at ``w + e`` without gradients; the ``ceil(gamma n)`` samples with the
       largest rise ``L_i(w + e) - L_i(w)`` are kept (all samples when that is ``n``, and then
       this forward pass is not made);
    4. the gradient of their mean loss at ``w + e`` for all trainable tensors; back to ``w``;
       base step with it.

    ``self.selected`` and ``self.chosen`` record, per step, the selected tensors and the kept
    rows (sorted; None for all rows). ``step`` returns the mean loss at ``w``.
    """

    def __init__(
        self,
        groups: Groups,
        base_cls: type,
        base_kwargs: Kwargs,
        *,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int = 0,
        **hyper: Any,
    ) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        self.beta, self.gamma, self.seed = beta, gamma, seed
        self.selected: list[list[Tensor]] = []
        self.chosen: list[Tensor | None] = []

    def step(self, closure: Callable[[Tensor | None], Tensor]) -> Tensor:
        trainable = [(g, p) for g in self.base.param_groups for p in g["params"] if p.requires_grad]
        if self.beta < 1:
            rng = random.Random(f"torchsam.ESAM:{self.seed}:{self.t}")
            selected = []
            for g, p in trainable:
                if rng.random() < self.beta:
                    selected.append((g, p))
        else:
            selected = list(trainable)
        self.selected.append([p for _, p in selected])
        for g in self.base.param_groups:
            for p in g["params"]:
                p.grad = None

        with torch.enable_grad():
            losses = closure(None)
            grads = torch.autograd.grad(losses.mean(), [p for _, p in selected], allow_unused=True)
        before = losses.detach()
        items = [
            (group, p, gr) for (group, p), gr in zip(selected, grads, strict=True) if gr is not None
        ]
        saved = perturb(items, lambda group: group["rho"] / self.beta)

        n = before.numel()
        keep = math.ceil(self.gamma * n)
        if keep < n:
            with torch.no_grad():
                rise = closure(None) - before
            chosen: Tensor | None = torch.topk(rise, keep).indices.sort().values
        else:
            chosen = None
        self.chosen.append(chosen)

        with torch.enable_grad():
            loss_s = closure(chosen).mean()
            grads_s = torch.autograd.grad(loss_s, [p for _, p in trainable], allow_unused=True)
        restore(saved)
        for (_, p), gr in zip(trainable, grads_s, strict=True):
            p.grad = gr
        self.base.step()
        self.t += 1
        return before.mean()


# --------------------------------------------------------------------------- MSAM
class ReferenceMSAM(_Reference):
    """m-sharpness (Foret et al. 2021, Sec. 4.1; Andriushchenko & Flammarion 2022, Eq. 3).

    Rows ``0..n-1`` are cut into consecutive chunks ``S_j`` of ``m`` rows (the last may be
    shorter). For each: ``g_j`` = gradient of the chunk's mean loss at ``w``,
    ``e_j = rho g_j / (||g_j|| + 1e-12)`` (ASAM's form for adaptive groups), ``g_s_j`` =
    gradient of the chunk's mean loss at ``w + e_j``, back to ``w``. The base optimizer steps
    with ``sum_j |S_j| / n g_s_j``. ``self.chunks`` records the chunks of the last step;
    ``step`` returns the mean loss at ``w``.
    """

    def __init__(
        self, groups: Groups, base_cls: type, base_kwargs: Kwargs, *, m: int = 32, **hyper: Any
    ) -> None:
        super().__init__(groups, base_cls, base_kwargs, **hyper)
        self.m = m
        self.chunks: list[Tensor] = []

    def step(self, closure: Callable[[Tensor | None], Tensor], batch_size: int) -> Tensor:
        n = batch_size
        trainable = [(g, p) for g in self.base.param_groups for p in g["params"] if p.requires_grad]
        params = [p for _, p in trainable]
        self.chunks = [torch.arange(s, min(s + self.m, n)) for s in range(0, n, self.m)]
        total: list[Tensor | None] = [None] * len(params)
        losses_at_w = []
        for rows in self.chunks:
            with torch.enable_grad():
                losses = closure(rows)
                g_j = torch.autograd.grad(losses.mean(), params, allow_unused=True)
            losses_at_w.append(losses.detach())
            items = [
                (grp, p, gr) for (grp, p), gr in zip(trainable, g_j, strict=True) if gr is not None
            ]
            saved = perturb(items, rho_of)
            with torch.enable_grad():
                g_s_j = torch.autograd.grad(closure(rows).mean(), params, allow_unused=True)
            restore(saved)
            weight = len(rows) / n
            for i, gr in enumerate(g_s_j):
                if gr is not None:
                    total[i] = weight * gr if total[i] is None else total[i] + weight * gr
        for p, gr in zip(params, total, strict=True):
            p.grad = gr
        self.base.step()
        self.t += 1
        return torch.cat(losses_at_w).mean()
