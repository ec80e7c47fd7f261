"""SAM and ASAM against their answer keys, and the promises of the engine.

One table of configurations drives the shared checks: equality with the reference and the
seed, foreach equal to for-loop, bit-exact restore, state_dict resume, schedulers, hooks.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchsam
from tests._reference import ReferenceSAM, SeedSAM

BASES: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}
SAM_CONFIGS: dict[str, dict[str, Any]] = {
    "sam": dict(adaptive=False),
    "asam": dict(adaptive=True, rho=0.5),
    "asam_eta": dict(adaptive=True, rho=0.5, eta=0.01),
}


class Net(nn.Module):
    """Two layers, a frozen tensor and a parameter that never receives a gradient."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 8, dtype=dtype)
        self.l2 = nn.Linear(8, 3, dtype=dtype)
        self.unused = nn.Parameter(torch.randn(4, dtype=dtype))
        self.frozen = nn.Parameter(torch.randn(3, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x))) + self.frozen


def make(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Net, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Net(dtype)
    data = [(torch.randn(16, 5, dtype=dtype), torch.randn(16, 3, dtype=dtype)) for _ in range(6)]
    return model, data


def groups(model: Net, **extra: Any) -> list[dict[str, Any]]:
    """Two param groups with their own rho and lr; the unused parameter sits in the second."""
    return [
        {"params": list(model.l1.parameters()), "rho": 0.05, **extra},
        {"params": [*model.l2.parameters(), model.unused, model.frozen], "rho": 0.1, "lr": 0.05},
    ]


def closure_for(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def two_call_step(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor, **kw: Any):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    nn.functional.mse_loss(model(x), y).backward()
    opt.second_step(zero_grad=True, **kw)
    return loss


def sam_kwargs(config: str) -> dict[str, Any]:
    kw = dict(SAM_CONFIGS[config])
    return kw


def build(model: Net, base: str, config: str, **extra: Any) -> torchsam.SAM:
    cls, base_kw = BASES[base]
    kw = sam_kwargs(config)
    rho = kw.pop("rho", 0.05)
    g = groups(model)
    g[0]["rho"], g[1]["rho"] = rho, 2 * rho
    return torchsam.SAM(g, cls, rho=rho, **kw, **base_kw, **extra)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("config", SAM_CONFIGS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_float64(base: str, config: str, foreach: bool) -> None:
    model, data = make()
    ref_model = copy.deepcopy(model)
    opt = build(model, base, config, foreach=foreach)
    cls, base_kw = BASES[base]
    kw = sam_kwargs(config)
    rho = kw.pop("rho", 0.05)
    ref_groups = groups(ref_model)
    ref_groups[0]["rho"], ref_groups[1]["rho"] = rho, 2 * rho
    for g in ref_groups:
        g.update(kw)
    ref = ReferenceSAM(ref_groups, cls, **base_kw)
    for x, y in data:
        loss = opt.step(closure_for(model, opt, x, y))
        ref_loss = ref.step(closure_for(ref_model, ref.base, x, y))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    # parameters without a gradient are untouched and carry no state
    assert torch.equal(model.frozen, ref_model.frozen)
    assert model.unused not in opt.state
    assert model.unused not in opt.base_optimizer.state


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adam", "adamw"])
def test_same_weights_as_seed_float32(base: str) -> None:
    model, data = make(torch.float32)
    seed_model = copy.deepcopy(model)
    cls, base_kw = BASES[base]
    opt = torchsam.SAM(groups(model), cls, rho=0.05, **base_kw)
    seed = SeedSAM(groups(seed_model), cls, rho=0.05, **base_kw)
    for x, y in data:
        two_call_step(model, opt, x, y)
        two_call_step(seed_model, seed, x, y)
    for p, q in zip(model.parameters(), seed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", SAM_CONFIGS)
def test_foreach_equals_for_loop(config: str) -> None:
    results = []
    for foreach in (True, False):
        model, data = make()
        opt = build(model, "sgd_momentum_wd", config, foreach=foreach)
        for x, y in data:
            two_call_step(model, opt, x, y)
        results.append(params_of(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_two_call_and_closure_styles_agree() -> None:
    model_a, data = make()
    model_b = copy.deepcopy(model_a)
    opt_a = build(model_a, "adam", "sam")
    opt_b = build(model_b, "adam", "sam")
    for x, y in data:
        two_call_step(model_a, opt_a, x, y)
        opt_b.step(closure_for(model_b, opt_b, x, y))
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_base_optimizer_instance_equals_class() -> None:
    model_a, data = make()
    model_b = copy.deepcopy(model_a)
    opt_a = torchsam.SAM(model_a.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    opt_b = torchsam.SAM(model_b.parameters(), base, rho=0.07)
    assert opt_b.base_optimizer is base
    assert base.param_groups[0]["rho"] == 0.07
    for x, y in data:
        two_call_step(model_a, opt_a, x, y)
        two_call_step(model_b, opt_b, x, y)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_maximize_perturbs_downhill() -> None:
    model, (batch, *_) = make()
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, maximize=True)
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    with torch.no_grad():
        assert nn.functional.mse_loss(model(x), y) < loss


def test_rho_zero_is_the_base_optimizer() -> None:
    model_a, data = make()
    model_b = copy.deepcopy(model_a)
    opt = torchsam.SAM(model_a.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    base = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        two_call_step(model_a, opt, x, y)
        closure_for(model_b, base, x, y)()
        base.step()
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_add_param_group_reaches_base_optimizer() -> None:
    model, data = make()
    opt = torchsam.SAM(model.l1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.add_param_group({"params": model.l2.parameters(), "lr": 0.2})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.05
    assert opt.param_groups[1]["momentum"] == 0
    before = model.l2.weight.detach().clone()
    two_call_step(model, opt, *data[0])
    assert not torch.equal(before, model.l2.weight)
    with pytest.raises(ValueError, match="Invalid rho"):
        opt.add_param_group({"params": [model.unused], "rho": -1.0})


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("config", SAM_CONFIGS)
@pytest.mark.parametrize("base", BASES)
def test_lr_zero_never_changes_weights(base: str, config: str) -> None:
    model, data = make(torch.float32)
    opt = build(model, base, config)
    for g in opt.param_groups:
        g["lr"] = 0.0
    start = params_of(model)
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        assert opt.perturbed
        assert not torch.equal(model.l1.weight, start[0])  # really perturbed
        nn.functional.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), start, strict=True):
        assert torch.equal(p, q)


class _ParamSizedAllocations(TorchDispatchMode):
    """Counts op outputs of at least ``numel`` elements that do not reuse an input's storage."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                inputs.add(a.untyped_storage().data_ptr())
        for o in torch.utils._pytree.tree_leaves(out):
            if (
                isinstance(o, torch.Tensor)
                and o.numel() >= self.numel
                and o.untyped_storage().data_ptr() not in inputs
            ):
                self.ops.append(str(func))
        return out


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_no_parameter_sized_allocation_after_first_step(foreach: bool, adaptive: bool) -> None:
    torch.manual_seed(0)
    params = [torch.randn(64, 32, requires_grad=True) for _ in range(5)]
    opt = torchsam.SAM(
        params, torch.optim.SGD, lr=0.1, momentum=0.9, foreach=foreach, adaptive=adaptive
    )
    for p in params:
        p.grad = torch.randn_like(p)
    counts = []
    for _ in range(3):
        with _ParamSizedAllocations(64 * 32) as mode:
            opt.first_step()
            opt.second_step()
        counts.append(mode.ops)
    assert counts[0], "the first step allocates the restore buffers (the counter must see them)"
    # ASAM's operator |w| + eta and its scaled direction T g are two temporaries per parameter
    temporaries = 2 * len(params) if adaptive else 0
    assert len(counts[1]) == len(counts[2]) == temporaries


@pytest.mark.parametrize("foreach", [True, False])
def test_float16_weights_with_a_zero_or_tiny_gradient_are_perturbed_finitely(foreach: bool) -> None:
    # rho / (||g|| + 1e-12) overflows float16 for a small norm; the factor is limited to
    # float16's largest value, so a zero gradient leaves the weights at w (no NaN second
    # pass, no spurious skip) and a tiny one perturbs them finitely
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torchsam.SAM([p], torch.optim.SGD, lr=0.1, momentum=0.9, foreach=foreach)
    for grad, moved in ((0.0, False), (1e-7, True)):
        p.grad = torch.full((4,), grad, dtype=torch.float16)
        opt.first_step()
        assert bool(torch.isfinite(p.detach()).all())
        assert bool((p.detach() > 1).all()) is moved
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "non-finite gradient" skip
            opt.second_step()


# --------------------------------------------------------------------------- state dict
def _resume_run(base: str, config: str, resume: bool) -> list[torch.Tensor]:
    model, data = make(torch.float32)
    opt = build(model, base, config)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in data[:3]:
        two_call_step(model, opt, x, y)
        sched.step()
    if resume:
        buffer = io.BytesIO()
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
            buffer,
        )
        buffer.seek(0)
        ckpt = torch.load(buffer, weights_only=True)
        model, _ = make(torch.float32, seed=123)  # different weights until loaded
        opt = build(model, base, config)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
    for x, y in data[3:]:
        two_call_step(model, opt, x, y)
        sched.step()
    return params_of(model)


@pytest.mark.parametrize("config", ["sam", "asam"])
@pytest.mark.parametrize("base", BASES)
def test_resume_is_bit_exact(base: str, config: str) -> None:
    straight = _resume_run(base, config, resume=False)
    resumed = _resume_run(base, config, resume=True)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_state_dict_holds_base_state_and_is_deterministic() -> None:
    model, data = make()
    opt = build(model, "adam", "sam")
    two_call_step(model, opt, *data[0])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # Adam's moments
    assert sd["param_groups"][1]["rho"] == 0.1
    assert "backup" not in str(sd)  # scratch buffers are not saved
    assert set(sd["state"]) == {0, 1, 2, 3}  # per-parameter entries only
    assert [g["sam_step"] for g in sd["param_groups"]] == [1, 1]  # steps taken, in every group
    again = opt.state_dict()
    assert again["param_groups"] == sd["param_groups"]
    assert again["state"].keys() == sd["state"].keys()
    for i, entry in sd["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(again["state"][i][k]))
    # loading keeps the groups shared with the base optimizer
    opt.load_state_dict(sd)
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_state_dict_round_trips_own_state() -> None:
    """torchsam's own per-parameter state (used by variants) is saved under "sam." keys."""
    model, data = make()
    opt = build(model, "sgd_momentum_wd", "sam")
    two_call_step(model, opt, *data[0])
    opt.own_state[model.l1.weight]["ema"] = torch.full_like(model.l1.weight, 3.0)
    sd = opt.state_dict()
    assert torch.equal(sd["state"][0]["sam.ema"], torch.full_like(model.l1.weight, 3.0))
    assert "momentum_buffer" in sd["state"][0]
    fresh = build(model, "sgd_momentum_wd", "sam")
    fresh.load_state_dict(sd)
    assert torch.equal(
        fresh.own_state[model.l1.weight]["ema"], torch.full_like(model.l1.weight, 3.0)
    )
    assert fresh.state[model.l1.weight]["sam.ema"] is fresh.own_state[model.l1.weight]["ema"]
    assert "sam.ema" not in fresh.base_optimizer.state[model.l1.weight]


# --------------------------------------------------------------------------- schedulers, hooks
def test_scheduler_drives_base_lr_without_warnings() -> None:
    model, data = make()
    opt = build(model, "sgd_momentum_wd", "sam")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data[:2]:
            two_call_step(model, opt, x, y)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    assert opt.base_optimizer.param_groups[1]["lr"] == pytest.approx(0.05 * 0.25)


def test_scheduler_with_closure_style_without_warnings() -> None:
    model, data = make()
    opt = build(model, "adam", "sam")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in data[:2]:
            opt.step(closure_for(model, opt, x, y))
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] < 1e-2


@pytest.mark.parametrize("style", ["two_call", "closure"])
def test_step_hooks_run_once_per_step(style: str) -> None:
    model, data = make()
    opt = build(model, "sgd", "sam")
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    for x, y in data[:2]:
        if style == "two_call":
            two_call_step(model, opt, x, y)
        else:
            opt.step(closure_for(model, opt, x, y))
    assert calls == ["pre", "post", "pre", "post"]


# --------------------------------------------------------------------------- closure protocol
def test_closure_runs_twice_and_returns_first_loss() -> None:
    model, data = make()
    opt = build(model, "sgd", "sam")
    x, y = data[0]
    losses: list[float] = []
    inner = closure_for(model, opt, x, y)

    def closure() -> torch.Tensor:
        assert torch.is_grad_enabled()
        loss = inner()
        losses.append(loss.item())
        return loss

    for _ in range(3):
        out = opt.step(closure)
        assert out.item() == losses[-2]
    assert len(losses) == 6
    assert losses[1] > losses[0]  # the second pass sees the perturbed (worse) weights


def test_closure_failure_restores_weights() -> None:
    model, data = make()
    opt = build(model, "sgd", "sam")
    x, y = data[0]
    start = params_of(model)
    calls = 0
    inner = closure_for(model, opt, x, y)

    def flaky() -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return inner()

    with pytest.raises(KeyboardInterrupt):
        opt.step(flaky)
    assert not opt.perturbed
    for p, q in zip(model.parameters(), start, strict=True):
        assert torch.equal(p, q)
    opt.step(inner)  # usable again


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rho", [-0.1, math.inf, math.nan, True, "0.05"])
def test_invalid_rho(rho: Any) -> None:
    model, _ = make()
    with pytest.raises(ValueError, match="Invalid rho"):
        torchsam.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)


def test_invalid_group_rho_and_eta() -> None:
    model, _ = make()
    with pytest.raises(ValueError, match="Invalid rho"):
        torchsam.SAM([{"params": model.parameters(), "rho": -1}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="Invalid eta"):
        torchsam.SAM(model.parameters(), torch.optim.SGD, adaptive=True, eta=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="adaptive must be True or False"):
        torchsam.SAM(model.parameters(), torch.optim.SGD, adaptive="yes", lr=0.1)


@pytest.mark.parametrize("bad", [None, 3, "SGD"])
def test_invalid_base_optimizer(bad: Any) -> None:
    model, _ = make()
    with pytest.raises(TypeError, match="base_optimizer must be"):
        torchsam.SAM(model.parameters(), bad, lr=0.1)


def test_base_factory_returning_non_optimizer() -> None:
    model, _ = make()
    with pytest.raises(TypeError, match="calling it gave"):
        torchsam.SAM(model.parameters(), lambda params, **kw: object())


def test_instance_with_kwargs_or_other_params() -> None:
    model, _ = make()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="already built base optimizer"):
        torchsam.SAM(model.parameters(), base, lr=0.1)
    with pytest.raises(ValueError, match="same parameters"):
        torchsam.SAM(model.l1.parameters(), base)


def test_phase_errors() -> None:
    model, data = make()
    opt = build(model, "sgd", "sam")
    x, y = data[0]
    with pytest.raises(RuntimeError, match="without a preceding first_step"):
        opt.second_step()
    nn.functional.mse_loss(model(x), y).backward()
    opt.first_step()
    for call, name in [
        (opt.first_step, "first_step"),
        (opt.state_dict, "state_dict"),
        (lambda: opt.step(lambda: None), "step"),
    ]:
        with pytest.raises(RuntimeError, match=rf"{name}\(\) was called after first_step"):
            call()
    opt.second_step()
    assert not opt.perturbed


def test_step_without_closure() -> None:
    model, _ = make()
    opt = build(model, "sgd", "sam")
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_sparse_gradients_rejected() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = torchsam.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()


# --------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=6),
    assignment=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    rhos=st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3),
    adaptive=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    shapes: list[list[int]],
    assignment: list[int],
    rhos: list[float],
    adaptive: bool,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    coeffs = [(torch.rand(s, generator=gen, dtype=torch.float64) + 0.1) for s in shapes]

    def make_groups(ps: list[torch.Tensor]) -> list[dict[str, Any]]:
        out = []
        for g in range(3):
            members = [p for i, p in enumerate(ps) if assignment[i] == g]
            if members:
                out.append({"params": members, "rho": rhos[g], "adaptive": adaptive})
        return out

    def closure_over(ps: list[torch.Tensor], zero: Any):
        def closure() -> torch.Tensor:
            zero()
            loss = sum(
                (c * torch.cos(p) + 0.5 * c * p**2).sum() for c, p in zip(coeffs, ps, strict=True)
            )
            loss.backward()
            return loss

        return closure

    ps_a = [t.clone().requires_grad_() for t in tensors]
    ps_b = [t.clone().requires_grad_() for t in tensors]
    opt = torchsam.SAM(make_groups(ps_a), torch.optim.SGD, lr=0.1, momentum=0.5)
    ref = ReferenceSAM(make_groups(ps_b), torch.optim.SGD, lr=0.1, momentum=0.5)
    for _ in range(3):
        opt.step(closure_over(ps_a, opt.zero_grad))
        ref.step(closure_over(ps_b, ref.base.zero_grad))
    for a, b in zip(ps_a, ps_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_finite_check_fallback_without_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch lacks the fused check on a device, the 2-norm/max-abs fallback decides."""

    def missing(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    model, data = make()
    opt = build(model, "sgd", "sam")
    x, y = data[0]
    two_call_step(model, opt, x, y)  # finite: a normal step
    start = model.l2.bias.detach().clone()
    nn.functional.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.mse_loss(model(x), y).backward()
    model.l2.bias.grad[0] = math.inf
    with pytest.warns(RuntimeWarning, match="second_step"):
        opt.second_step(zero_grad=True)
    assert torch.equal(model.l2.bias, start)
    # huge but finite gradients: the 2-norm overflows, the max-abs pass clears them
    nn.functional.mse_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.mse_loss(model(x), y).backward()
    model.l2.bias.grad.fill_(1e300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.second_step(zero_grad=True)
    assert (model.l2.bias - start).abs().min() > 1e298  # the step was taken (lr 0.05 x 1e300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("adaptive", [False, True])
def test_float64_weights_on_cuda_equal_the_cpu(adaptive: bool) -> None:
    """On a GPU float64 weights take the perturbation without torch's fused kernel (which
    reads a tensor learning rate as float32): the steps equal the CPU's to float64 rounding."""

    def run(device: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().to(device)
        opt = torchsam.SAM(
            model.parameters(), torch.optim.SGD, adaptive=adaptive, lr=0.1, momentum=0.9
        )
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 6, generator=gen, dtype=torch.float64).to(device)
            y = torch.randn(16, 3, generator=gen, dtype=torch.float64).to(device)
            nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)
        return [p.detach().cpu() for p in model.parameters()]

    for got, want in zip(run("cuda"), run("cpu"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
