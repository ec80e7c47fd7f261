"""A parameter group spread over two GPUs (a model split by hand across devices): every
optimizer of the family takes its 0-dim coefficients to each device (a multi-tensor kernel
refuses one on another device). Runs only where two GPUs are visible."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchsam

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (cuda multi-GPU)"
)

CASES: dict[str, tuple[type, dict[str, Any]]] = {
    "SAM": (torchsam.SAM, {}),
    "ASAM": (torchsam.SAM, {"adaptive": True}),
    "GSAM": (torchsam.GSAM, {}),
    "LookSAM": (torchsam.LookSAM, {"k": 2}),
    "MomentumSAM": (torchsam.MomentumSAM, {}),
}


class Split(nn.Module):
    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 16).to(first)
        self.b = nn.Linear(16, 3).to(second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x.to(self.a.weight.device)))
        return self.b(h.to(self.b.weight.device))


def run(name: str, first: str, second: str) -> list[torch.Tensor]:
    cls, options = CASES[name]
    model = Split(first, second)
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)

        def loss(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            return nn.functional.mse_loss(model(x), y.to(second))

        if isinstance(opt, torchsam.MomentumSAM):
            opt.zero_grad()
            loss().backward()
            opt.step()
            continue
        loss().backward()
        if opt.first_step(zero_grad=True):
            loss().backward()
        opt.second_step(zero_grad=True)
    if isinstance(opt, torchsam.MomentumSAM):
        opt.eval()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("name", list(CASES))
def test_a_group_on_two_gpus_steps_as_on_the_cpu(name: str) -> None:
    for got, want in zip(run(name, "cuda:0", "cuda:1"), run(name, "cpu", "cpu"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
