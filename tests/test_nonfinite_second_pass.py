"""A non-finite first gradient must not reach the second pass: its weights stay finite (at w).

``first_step()`` does not synchronise, so it cannot tell that the norm was not finite and the
second pass runs; the weights it sees must then be ``w`` everywhere, or a NaN would reach what
the forward pass updates (BatchNorm's running statistics) and the loss it returns.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsam

TWO_CALL = {
    "SAM": lambda ps: torchsam.SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "ASAM": lambda ps: torchsam.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1),
    "GSAM": lambda ps: torchsam.GSAM(ps, torch.optim.SGD, lr=0.1),
    "FriendlySAM": lambda ps: torchsam.FriendlySAM(ps, torch.optim.SGD, lr=0.1),
    "VaSSO": lambda ps: torchsam.VaSSO(ps, torch.optim.SGD, lr=0.1),
    "WSAM": lambda ps: torchsam.WSAM(ps, torch.optim.SGD, lr=0.1),
    "LookSAM": lambda ps: torchsam.LookSAM(ps, torch.optim.SGD, k=5, lr=0.1),
    "IntermittentSAM": lambda ps: torchsam.IntermittentSAM(ps, torch.optim.SGD, every=1, lr=0.1),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", list(TWO_CALL))
def test_second_pass_runs_at_w_after_a_non_finite_first_gradient(name: str, bad: float) -> None:
    model, (x, y) = _model(), _data()
    optimizer = TWO_CALL[name](model.parameters())
    init = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        model[0].weight.grad[0, 0] = bad
    optimizer.first_step(zero_grad=True)
    for p, p0 in zip(model.parameters(), init, strict=True):
        assert torch.equal(p, p0)  # a zero perturbation, not 0 * inf = NaN
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.second_step(zero_grad=True)
    assert torch.isfinite(model[1].running_mean).all()
    assert torch.isfinite(model[1].running_var).all()
    for p, p0 in zip(model.parameters(), init, strict=True):
        assert torch.equal(p, p0)  # the step was skipped


@pytest.mark.parametrize("foreach", [True, False])
def test_closure_second_pass_sees_finite_weights(foreach: bool) -> None:
    model, (x, y) = _model(), _data()
    optimizer = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, foreach=foreach)
    losses = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if not optimizer.perturbed:
            with torch.no_grad():
                model[3].weight.grad[0, 0] = float("nan")
        losses.append(loss.detach())
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer.step(closure)
    assert all(torch.isfinite(loss) for loss in losses)
    assert torch.isfinite(model[1].running_mean).all()
