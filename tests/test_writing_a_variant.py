"""docs/writing-a-variant.md: its code blocks run, and its two variants follow their rules.

The page's Python blocks are executed in order (so the tutorial cannot rot); then each
variant is trained next to a direct float64 transcription of its rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchsam

PAGE = Path(__file__).parent.parent / "docs" / "writing-a-variant.md"


@pytest.fixture(scope="module")
def page() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "writing_a_variant"}
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def _model_and_data(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    data = [(torch.randn(8, 3).double(), torch.randn(8, 2).double()) for _ in range(4)]
    return model, data


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _train(cls: type, rule: Any, style: str, **hyper: Any) -> None:
    model, data = _model_and_data()
    reference, _ = _model_and_data()
    lr = 0.1
    opt = cls(model.parameters(), torch.optim.SGD, lr=lr, **hyper)
    for x, y in data:
        if style == "closure":

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            _grad(model, x, y)
            opt.first_step(zero_grad=True)
            F.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)
        with torch.no_grad():
            w = [p.detach().clone() for p in reference.parameters()]
        g = _grad(reference, x, y)
        with torch.no_grad():
            for p, e in zip(reference.parameters(), rule.perturbation(g, hyper), strict=True):
                p.add_(e)
        g_s = _grad(reference, x, y)
        with torch.no_grad():
            for p, w0, gi, gsi in zip(reference.parameters(), w, g, g_s, strict=True):
                p.copy_(w0 - lr * rule.base_gradient(gi, gsi, hyper))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class _MaxNorm:
    @staticmethod
    def perturbation(g: list[torch.Tensor], hyper: dict[str, Any]) -> list[torch.Tensor]:
        return [hyper.get("rho", 0.05) * torch.sign(gi) for gi in g]

    @staticmethod
    def base_gradient(g: torch.Tensor, g_s: torch.Tensor, hyper: dict[str, Any]) -> torch.Tensor:
        return g_s


class _Blended:
    @staticmethod
    def perturbation(g: list[torch.Tensor], hyper: dict[str, Any]) -> list[torch.Tensor]:
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        return [hyper.get("rho", 0.05) * gi / (norm + 1e-12) for gi in g]

    @staticmethod
    def base_gradient(g: torch.Tensor, g_s: torch.Tensor, hyper: dict[str, Any]) -> torch.Tensor:
        mix = hyper.get("mix", 0.5)
        return (1 - mix) * g + mix * g_s


@pytest.mark.parametrize("style", ["closure", "two_call"])
def test_max_norm_sam_follows_its_rule(page: dict[str, Any], style: str) -> None:
    _train(page["MaxNormSAM"], _MaxNorm, style, rho=0.03)


@pytest.mark.parametrize("style", ["closure", "two_call"])
def test_blended_sam_follows_its_rule(page: dict[str, Any], style: str) -> None:
    _train(page["BlendedSAM"], _Blended, style, rho=0.05, mix=0.3)


def test_blended_sam_declares_and_checks_its_hyperparameter(page: dict[str, Any]) -> None:
    cls = page["BlendedSAM"]
    model, _ = _model_and_data()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, mix=0.25)
    assert opt.param_groups[0]["mix"] == 0.25
    assert opt.state_dict()["param_groups"][0]["mix"] == 0.25
    with pytest.raises(ValueError, match="mix must be in"):
        cls(model.parameters(), torch.optim.SGD, lr=0.1, mix=2.0)


def test_page_example_trains(page: dict[str, Any]) -> None:
    """The page's last block ran three steps of BlendedSAM: the weights moved."""
    assert isinstance(page["optimizer"], torchsam.SAM)
    assert page["optimizer"].step_count == 3
