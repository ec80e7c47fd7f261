"""Hardening of the SAM family (issue 10): what every variant must get right around its rule.

The gradients stay as backward made them, steps without any gradient, complex parameters,
``foreach=False`` really selecting per-tensor kernels, subclass signatures, and ESAM's weight
selection without ``requires_grad`` switches.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import torchsam
from torchsam._engine import GroupView

from .test_family import VARIANTS, build, setup, step, weights


# --------------------------------------------------------------------------- gradient swap
class _DoubledSAM(torchsam.SAM):
    """SAM whose base optimizer sees twice the perturbed gradient, through ``_base_grads``."""

    def _prepare_base_grads(self, views: list[GroupView]) -> None:
        for v in views:
            for buf, g in zip(self._base_grads(v), v.grads, strict=True):
                buf.copy_(g).mul_(2.0)


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the gradients it steps with, and can be told to fail."""

    fail = False

    def step(self, closure: Any = None) -> Any:
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        if self.fail:
            raise RuntimeError("base step failed")
        return super().step(closure)


def test_base_optimizer_sees_the_scratch_gradient_and_p_grad_is_left_alone() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = _DoubledSAM([p], _RecordingSGD, lr=0.1, rho=0.05)
    for _ in range(2):  # the second step reuses the buffers
        (p**3).sum().backward()
        opt.first_step(zero_grad=True)
        (p**3).sum().backward()
        grad_object, made = p.grad, p.grad.clone()
        opt.second_step()
        assert p.grad is grad_object
        torch.testing.assert_close(p.grad, made, rtol=0, atol=0)
        torch.testing.assert_close(opt.base_optimizer.seen[0], 2 * made, rtol=0, atol=0)
        opt.zero_grad()


def test_gradient_is_put_back_when_the_base_step_raises() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = _DoubledSAM([p], _RecordingSGD, lr=0.1, rho=0.05)
    opt.base_optimizer.fail = True
    (p**3).sum().backward()
    opt.first_step(zero_grad=True)
    (p**3).sum().backward()
    grad_object, made = p.grad, p.grad.clone()
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.second_step()
    assert p.grad is grad_object
    torch.testing.assert_close(p.grad, made, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_p_grad_after_a_step_is_what_backward_made(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    last: dict[nn.Parameter, Tensor] = {}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: last.__setitem__(q, q.grad.clone()))
    for x, y in data[:5]:  # LookSAM (k=3) takes one-pass steps with its reused direction
        last.clear()
        step(name, opt, model, x, y)
        for p in model.parameters():
            if p in last:
                torch.testing.assert_close(p.grad, last[p], rtol=0, atol=0)
            else:
                assert p.grad is None


# --------------------------------------------------------------------------- no gradient at all
@pytest.mark.parametrize("name", VARIANTS)
def test_step_where_no_parameter_has_a_gradient(name: str) -> None:
    # A frozen phase: the loss reaches only a tensor outside the optimizer.
    model, data = setup()
    outside = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = build(name, model)
    before = weights(model)

    class Frozen(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x[:, :3] * outside

    frozen = Frozen()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning about the missing gradients is welcome
        for x, y in data[:4]:  # LookSAM (k=3) and IntermittentSAM take both kinds of step
            step(name, opt, frozen, x, y)
    for a, b in zip(weights(model), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- subclass signatures
def test_a_users_subclass_keeps_its_own_signature() -> None:
    class Scaled(torchsam.GSAM):
        def __init__(self, params: Any, base_optimizer: Any, scale: float = 2.0, **kw: Any):
            self.scale = scale
            super().__init__(params, base_optimizer, **kw)

    class ScaledChild(Scaled):
        hyperparameters: ClassVar[dict[str, Any]] = {**torchsam.GSAM.hyperparameters, "extra": 1.0}

    class Declared(torchsam.LookSAM):  # no constructor: SAM's, plus what it declares
        hyperparameters: ClassVar[dict[str, Any]] = {
            **torchsam.LookSAM.hyperparameters,
            "b": 0.5,
        }

    for cls in (Scaled, ScaledChild):
        assert list(inspect.signature(cls).parameters) == [
            "params",
            "base_optimizer",
            "scale",
            "kw",
        ]
    declared = inspect.signature(Declared).parameters
    assert declared["b"].default == 0.5
    assert declared["k"].default == torchsam.LookSAM.options["k"]
    assert list(declared)[-1] == "kwargs"
    opt = Scaled([nn.Parameter(torch.ones(2))], torch.optim.SGD, scale=3.0, lr=0.1, alpha=0.1)
    assert opt.scale == 3.0
    assert opt.param_groups[0]["alpha"] == 0.1
