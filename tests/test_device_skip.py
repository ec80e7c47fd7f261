"""The non-finite skip decided on the device (issue 20): with a fused base optimizer, which
takes a ``found_inf`` flag, SAM and ASAM hand it the guard's flag and do not synchronise; the
warning about a skipped step comes at a later step."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import torchsam
from torchsam.experiments._dispatch_count import DispatchCounter

BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01}),
}


class HostSAM(torchsam.SAM):
    """SAM without declaring ``device_skip`` (it is not inherited): the host decides."""


class HostIntermittentSAM(torchsam.IntermittentSAM):
    """The same for IntermittentSAM."""


#: the variants that declare ``device_skip``, their twin that does not, and their options
DECLARED = {
    "SAM": (torchsam.SAM, HostSAM, {}),
    "ASAM": (torchsam.SAM, HostSAM, {"adaptive": True}),
    "IntermittentSAM": (torchsam.IntermittentSAM, HostIntermittentSAM, {"every": 2}),
}


def make(
    cls: type[torchsam.SAM], base: str, device: str = "cpu", **options: Any
) -> tuple[nn.Module, torchsam.SAM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(device)
    x, y = torch.randn(16, 6, device=device), torch.randn(16, 3, device=device)
    factory, kwargs = BASES[base]
    opt = cls(model.parameters(), factory, fused=True, **kwargs, **options)
    return model, opt, x, y


def two_call(
    model: nn.Module, opt: torchsam.SAM, x: torch.Tensor, y: torch.Tensor, nan: bool = False
) -> None:
    nn.functional.mse_loss(model(x), y).backward()
    if opt.first_step(zero_grad=True):
        nn.functional.mse_loss(model(x), y).backward()
    if nan:
        model[0].weight.grad[0, 0] = math.nan
    opt.second_step(zero_grad=True)


def snapshot(model: nn.Module, opt: torchsam.SAM) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.base_optimizer.state[p].values() if torch.is_tensor(v)]
    return out


def test_the_capability_is_declared_per_class() -> None:
    assert torchsam.SAM.device_skip
    assert torchsam.IntermittentSAM.device_skip
    assert not HostSAM.device_skip  # a subclass must declare it itself
    assert not HostIntermittentSAM.device_skip
    for cls in (torchsam.GSAM, torchsam.LookSAM, torchsam.FriendlySAM, torchsam.WSAM):
        assert not cls.device_skip


@pytest.mark.parametrize("variant", list(DECLARED))
@pytest.mark.parametrize("base", list(BASES))
def test_no_host_synchronisation_after_the_first_step(base: str, variant: str) -> None:
    cls, host_cls, options = DECLARED[variant]
    model, opt, x, y = make(cls, base, **options)
    syncs = []
    for _ in range(4):
        counter = DispatchCounter()
        nn.functional.mse_loss(model(x), y).backward()
        with counter:
            second = opt.first_step(zero_grad=True)
        if second:
            nn.functional.mse_loss(model(x), y).backward()
        with counter:
            opt.second_step(zero_grad=True)
        syncs.append(counter.syncs)
    # the first step is decided on the host: no base-optimizer state exists yet
    assert syncs == [1, 0, 0, 0]
    host_model, host_opt, _, _ = make(host_cls, base, **options)
    counter = DispatchCounter()
    for _ in range(2):
        nn.functional.mse_loss(host_model(x), y).backward()
        if host_opt.first_step(zero_grad=True):
            nn.functional.mse_loss(host_model(x), y).backward()
        with counter:
            host_opt.second_step(zero_grad=True)
    assert counter.syncs == 2


@pytest.mark.parametrize("variant", list(DECLARED))
@pytest.mark.parametrize("base", list(BASES))
def test_a_non_finite_step_is_skipped_on_the_device_and_reported_later(
    base: str, variant: str
) -> None:
    cls, host_cls, options = DECLARED[variant]
    model, opt, x, y = make(cls, base, **options)
    host_model, host_opt, _, _ = make(host_cls, base, **options)
    for step in range(6):
        nan = step in (2, 3)  # a step with and (IntermittentSAM) one without second pass
        before = snapshot(model, opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            two_call(model, opt, x, y, nan=nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            two_call(host_model, host_opt, x, y, nan=nan)
        messages = [str(w.message) for w in caught]
        if nan:  # skipped: weights and base state exactly as before
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, opt), strict=True))
        # no warning at the skipped step itself: each skip is reported at the next step
        assert len(messages) == (1 if step in (3, 4) else 0)
        for message in messages:
            assert "not finite" in message
            assert "previous step" in message
        # the same steps as with the host's decision, bit for bit
        for a, b in zip(snapshot(model, opt), snapshot(host_model, host_opt), strict=True):
            assert torch.equal(a, b)


def test_sgd_without_momentum_and_a_grad_scaler_keep_the_host_decision() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for use_scaler in (False, False, True):
        s = scaler if use_scaler else None
        loss = nn.functional.mse_loss(model(x), y)
        (loss if s is None else s.scale(loss)).backward()
        opt.first_step(zero_grad=True, grad_scaler=s)
        loss = nn.functional.mse_loss(model(x), y)
        (loss if s is None else s.scale(loss)).backward()
        counter = DispatchCounter()
        with counter:
            opt.second_step(zero_grad=True, grad_scaler=s)
        assert counter.syncs >= 1  # no per-parameter state (or a scaler): decided on the host
        if s is not None:
            s.update()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base", list(BASES))
def test_cuda_device_skip(base: str) -> None:
    model, opt, x, y = make(torchsam.SAM, base, device="cuda")
    host_model, host_opt, _, _ = make(HostSAM, base, device="cuda")
    for step in range(4):
        nan = step == 2
        before = snapshot(model, opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            counter = DispatchCounter()
            nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            if nan:
                model[0].weight.grad[0, 0] = math.nan
            with counter:
                opt.second_step(zero_grad=True)
        if step > 0:
            assert "aten._local_scalar_dense.default" not in counter.sync_ops
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            two_call(host_model, host_opt, x, y, nan=nan)
        torch.cuda.synchronize()  # the flag's copy has arrived: the next step reports it
        if nan:
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot(model, opt), strict=True))
        if step == 3:
            assert any("previous step" in str(w.message) for w in caught)
        for a, b in zip(snapshot(model, opt), snapshot(host_model, host_opt), strict=True):
            assert torch.equal(a, b)


class _SlowEvent:
    """An event that completes ``lag`` steps after it was recorded (``clock`` counts the
    steps): a host running ahead of the device."""

    def __init__(self, clock: list[int], lag: int) -> None:
        self.clock, self.done_at = clock, clock[0] + lag
        self.waited = False

    def query(self) -> bool:
        return self.clock[0] >= self.done_at

    def synchronize(self) -> None:
        self.waited = True
        self.done_at = self.clock[0]


@pytest.mark.parametrize("lag", [1, 3])
def test_every_skip_is_reported_when_the_host_runs_ahead_of_the_device(
    lag: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy of a step's decision arrives steps later: each skip is still reported once,
    ``lag`` steps later (a later step's decision used to replace an unread one)."""
    from torchsam._engine import _guard

    clock = [0]
    monkeypatch.setattr(
        _guard.NonFiniteGuard,
        "_copy_to_host",
        staticmethod(lambda total: (total.clone(), _SlowEvent(clock, lag))),
    )
    model, opt, x, y = make(torchsam.SAM, "sgd-momentum")
    reported = []
    for step in range(12):
        clock[0] = step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            two_call(model, opt, x, y, nan=step in (2, 3, 7))
        reported += [step] * len(caught)
        assert all("not finite" in str(w.message) for w in caught)
    assert reported == [2 + lag, 3 + lag, 7 + lag]


def test_a_host_far_ahead_waits_for_the_oldest_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchsam._engine import _guard

    clock = [0]
    events: list[_SlowEvent] = []

    def copy(total: torch.Tensor) -> tuple[torch.Tensor, _SlowEvent]:
        events.append(_SlowEvent(clock, 10**6))  # never completes by itself
        return total.clone(), events[-1]

    monkeypatch.setattr(_guard.NonFiniteGuard, "_copy_to_host", staticmethod(copy))
    model, opt, x, y = make(torchsam.SAM, "sgd-momentum")
    for step in range(_guard.MOST_PENDING + 5):
        clock[0] = step
        two_call(model, opt, x, y)
    # unread decisions wait up to the bound (plus the step's own), the oldest beyond it waited
    assert len(opt._guard._late) == _guard.MOST_PENDING + 1
    assert sum(e.waited for e in events) == len(events) - _guard.MOST_PENDING - 1


@pytest.mark.parametrize("base", list(BASES))
def test_a_float64_default_dtype_keeps_the_flags_float32(base: str) -> None:
    """torch's fused optimizers read ``found_inf`` as float32: the guard's flags are float32
    whatever ``torch.set_default_dtype`` says (a float64 flag raised at the first step
    decided on the device)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, opt, x, y = make(torchsam.SAM, base)
        for step in range(4):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                two_call(model, opt, x, y, nan=step == 2)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        torch.set_default_dtype(before)
