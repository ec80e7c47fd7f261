"""Answer keys: deliberately simple implementations the fast code is tested against.

Nothing here is imported by the library. ``SeedSAM`` is the algorithm of the project's seed
(SEED.md), typed in again; ``ReferenceSAM`` is SAM/ASAM written out one tensor at a time from
the papers' equations, with an exact restore.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class SeedSAM(torch.optim.Optimizer):
    """The seed's SAM, kept as close to SEED.md as possible (the behaviour users know)."""

    def __init__(self, params: Any, base_optimizer: type, rho: float = 0.05, **kwargs: Any):
        defaults = dict(rho=rho, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self) -> Tensor:
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    p.grad.norm(p=2).to(shared_device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


class ReferenceSAM:
    """SAM (Foret et al. 2021, Eq. 2) and ASAM (Kwon et al. 2021, Eq. 12), tensor by tensor.

    ``e = rho * T^2 g / (||T g|| + 1e-12)`` with ``T = |w| + eta`` for adaptive groups and
    ``T = 1`` otherwise; the norm runs over every parameter with a gradient in every group.
    """

    def __init__(self, groups: list[dict[str, Any]], base_cls: type, **base_kwargs: Any):
        for g in groups:
            g.setdefault("rho", 0.05)
            g.setdefault("adaptive", False)
            g.setdefault("eta", 0.0)
        self.base = base_cls(groups, **base_kwargs)

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        with torch.no_grad():
            live = [
                (g, p) for g in self.base.param_groups for p in g["params"] if p.grad is not None
            ]
            ops = [(p.abs() + g["eta"]) if g["adaptive"] else torch.ones_like(p) for g, p in live]
            norm = torch.sqrt(
                sum(((t * p.grad) ** 2).sum() for t, (_, p) in zip(ops, live, strict=True))
            )
            saved = [p.clone() for _, p in live]
            for t, (g, p) in zip(ops, live, strict=True):
                p.add_(g["rho"] * t * t * p.grad / (norm + 1e-12))
        closure()
        with torch.no_grad():
            for s, (_, p) in zip(saved, live, strict=True):
                p.copy_(s)
        self.base.step()
        return loss
