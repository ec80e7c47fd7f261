"""What the core promises holds for every optimizer of the SAM family: one shared table.

Resume bit-exactness, exact restore with lr=0, schedulers without warnings, step hooks, the
foreach and for-loop paths, failing closures, phase errors, non-finite gradients and invalid
radii, run over every variant. Each variant's own update rule is tested against its paper in
test_variants.py.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchsam


@dataclass(frozen=True)
class Variant:
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    per_sample: bool = False  # ESAM/MSAM: closure(indices) -> per-sample losses
    two_call: bool = True  # has first_step/second_step


VARIANTS: dict[str, Variant] = {
    "sam": Variant(torchsam.SAM),
    "asam": Variant(torchsam.SAM, dict(adaptive=True, rho=0.5)),
    "gsam": Variant(torchsam.GSAM, dict(alpha=0.3, rho_min=0.01)),
    "friendly": Variant(torchsam.FriendlySAM, dict(sigma=1.0, lmbda=0.8)),
    "vasso": Variant(torchsam.VaSSO, dict(theta=0.4)),
    "wsam": Variant(torchsam.WSAM, dict(gamma=0.8)),
    "wsam_coupled": Variant(torchsam.WSAM, dict(gamma=0.8, decouple=False)),
    "looksam": Variant(torchsam.LookSAM, dict(k=3, alpha=0.7)),
    "intermittent": Variant(torchsam.IntermittentSAM, dict(probability=0.5, seed=3)),
    "esam": Variant(torchsam.ESAM, dict(beta=0.6, gamma=0.5), per_sample=True, two_call=False),
    "msam": Variant(torchsam.MSAM, dict(m=6), per_sample=True, two_call=False),
}
BASES: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8, dtype=torch.float64)
        self.l2 = nn.Linear(8, 3, dtype=torch.float64)
        self.unused = nn.Parameter(torch.randn(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def setup(seed: int = 0) -> tuple[Net, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = Net()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(20, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,)))
        for _ in range(8)
    ]
    return model, data


def build(name: str, model: Net, base: str = "sgd", **extra: Any) -> Any:
    variant = VARIANTS[name]
    cls, base_kw = BASES[base]
    groups = [
        {"params": model.l1.parameters()},
        {"params": [*model.l2.parameters(), model.unused], "lr": base_kw["lr"] / 2, "rho": 0.1},
    ]
    return variant.cls(groups, cls, **{**variant.kwargs, **base_kw, **extra})


def step(name: str, opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    """One optimisation step with the variant's closure protocol."""
    if VARIANTS[name].per_sample:

        def per_sample(rows: torch.Tensor | None) -> torch.Tensor:
            xb, yb = (x, y) if rows is None else (x[rows], y[rows])
            return F.cross_entropy(model(xb), yb, reduction="none")

        if name == "msam":
            return opt.step(per_sample, batch_size=len(x))
        return opt.step(per_sample)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- resume
def _run(name: str, base: str, resume: bool) -> list[torch.Tensor]:
    model, data = setup()
    opt = build(name, model, base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(data))
    for x, y in data[:4]:
        step(name, opt, model, x, y)
        sched.step()
    if resume:
        buffer = io.BytesIO()
        torch.save(
            {"m": model.state_dict(), "o": opt.state_dict(), "s": sched.state_dict()}, buffer
        )
        buffer.seek(0)
        ckpt = torch.load(buffer, weights_only=True)
        model, _ = setup(seed=99)
        opt = build(name, model, base)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(data))
        model.load_state_dict(ckpt["m"])
        opt.load_state_dict(ckpt["o"])
        sched.load_state_dict(ckpt["s"])
    for x, y in data[4:]:
        step(name, opt, model, x, y)
        sched.step()
    return weights(model)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", VARIANTS)
def test_resume_is_bit_exact(name: str, base: str) -> None:
    straight = _run(name, base, resume=False)
    resumed = _run(name, base, resume=True)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_is_one_plain_dict(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    for x, y in data[:3]:
        step(name, opt, model, x, y)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"]) == {0, 1, 2, 3}  # per-parameter entries only (DCP maps them)
    assert [g["sam_step"] for g in sd["param_groups"]] == [3, 3]  # the optimizer-wide counter
    assert "momentum_buffer" in sd["state"][0]
    assert len(sd["param_groups"]) == 2


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", VARIANTS)
def test_lr_zero_never_changes_weights(name: str, base: str) -> None:
    model, data = setup()
    opt = build(name, model, base)
    for g in opt.param_groups:
        g["lr"] = 0.0
    start = weights(model)
    for x, y in data[:4]:
        step(name, opt, model, x, y)
    for a, b in zip(weights(model), start, strict=True):
        assert torch.equal(a, b)


_FOREACH_KERNELS = [name for name in dir(torch) if name.startswith("_foreach_")]


def _watch_foreach_kernels(mp: pytest.MonkeyPatch, allowed: bool, calls: list[str]) -> None:
    """Count torchsam's calls of ``torch._foreach_*`` kernels, or forbid every call of them."""

    def wrap(name: str) -> Any:
        kernel = getattr(torch, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            if not allowed:
                raise AssertionError(f"torch.{name} was called with foreach=False")
            if sys._getframe(1).f_globals.get("__name__", "").startswith("torchsam"):
                calls.append(name)
            return kernel(*args, **kwargs)

        return watched

    for name in _FOREACH_KERNELS:
        mp.setattr(torch, name, wrap(name))


@pytest.mark.parametrize("name", VARIANTS)
def test_foreach_equals_for_loop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each arm really runs its kernels: no torch._foreach_* call at all with foreach=False
    # (torchsam's and the base optimizer's), and torchsam's own multi-tensor kernels with True.
    results = []
    for foreach in (True, False):
        model, data = setup()
        opt = build(name, model, foreach=foreach)
        calls: list[str] = []
        with monkeypatch.context() as mp:
            _watch_foreach_kernels(mp, foreach, calls)
            for x, y in data[:4]:
                step(name, opt, model, x, y)
        assert bool(calls) == foreach
        results.append(weights(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_at_w_is_returned(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
    loss = step(name, opt, model, x, y)
    torch.testing.assert_close(loss.detach(), expected)


# --------------------------------------------------------------------------- schedulers, hooks
@pytest.mark.parametrize("name", VARIANTS)
def test_scheduler_and_hooks(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data[:3]:
            step(name, opt, model, x, y)
            sched.step()
    assert calls == ["pre", "post"] * 3
    # the scheduler's learning rates reach the base step: the same as setting them by hand
    by_hand_model, _ = setup()
    by_hand = build(name, by_hand_model)
    initial = [g["lr"] for g in by_hand.param_groups]
    for i, (x, y) in enumerate(data[:3]):
        for g, lr in zip(by_hand.base_optimizer.param_groups, initial, strict=True):
            g["lr"] = lr * 0.5**i
        step(name, by_hand, by_hand_model, x, y)
    for a, b in zip(weights(model), weights(by_hand_model), strict=True):
        assert torch.equal(a, b)
    unscheduled_model, _ = setup()
    unscheduled = build(name, unscheduled_model)
    for x, y in data[:3]:
        step(name, unscheduled, unscheduled_model, x, y)
    assert not torch.equal(model.l1.weight, unscheduled_model.l1.weight)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.two_call])
def test_two_call_style_matches_closure_style(name: str) -> None:
    model_a, data = setup()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = build(name, model_a), build(name, model_b)
    for x, y in data[:5]:
        step(name, opt_a, model_a, x, y)
        F.cross_entropy(model_b(x), y).backward()
        if opt_b.first_step(zero_grad=True):
            F.cross_entropy(model_b(x), y).backward()
        opt_b.second_step(zero_grad=True)
    for a, b in zip(weights(model_a), weights(model_b), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("name", VARIANTS)
def test_failing_closure_restores_weights(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]
    step(name, opt, model, x, y)  # a first step, so that stateful variants have state
    start = weights(model)
    forwards = 0

    def broken_forward(module: nn.Module, args: Any) -> None:
        nonlocal forwards
        forwards += 1
        if forwards == 2:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(broken_forward)
    for _ in range(3):  # the second pass of some variants comes on a later step
        forwards = 0
        try:
            step(name, opt, model, x, y)
        except KeyboardInterrupt:
            break
        start = weights(model)
    else:
        pytest.fail("no step evaluated the model twice")
    handle.remove()
    assert not opt.perturbed
    for a, b in zip(weights(model), start, strict=True):
        assert torch.equal(a, b)
    step(name, opt, model, x, y)  # usable again


@pytest.mark.parametrize("name", VARIANTS)
def test_nan_gradient_never_reaches_the_weights(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]
    step(name, opt, model, x, y)
    start = weights(model)
    handle = model.l2.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    with pytest.warns(RuntimeWarning, match="not finite"):
        step(name, opt, model, x, y)
    handle.remove()
    for a, b in zip(weights(model), start, strict=True):
        assert torch.equal(a, b)
    for state in opt.base_optimizer.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
    before = model.l1.weight.detach().clone()
    step(name, opt, model, x, y)
    assert not torch.equal(model.l1.weight, before)  # training goes on


@pytest.mark.parametrize("name", VARIANTS)
def test_step_without_closure_and_bad_rho(name: str) -> None:
    model, _ = setup()
    opt = build(name, model)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="Invalid rho"):
        build(name, model, rho=-1.0)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.two_call])
def test_phase_errors(name: str) -> None:
    model, data = setup()
    opt = build(name, model)
    x, y = data[0]
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="before second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="before second_step"):
        opt.first_step()
    opt.second_step()


@pytest.mark.parametrize("name", VARIANTS)
def test_signature_shows_the_variant_arguments(name: str) -> None:
    cls = VARIANTS[name].cls
    params = inspect.signature(cls).parameters
    assert list(params)[:4] == ["params", "base_optimizer", "rho", "adaptive"]
    for arg in {**cls.hyperparameters, **cls.options}:
        assert params[arg].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(params)[-1] == "kwargs"
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'"):
        build(name, setup()[0], not_an_option=1)
