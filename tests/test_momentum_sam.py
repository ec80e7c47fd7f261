"""MomentumSAM against independent float64 transcriptions of the authors' algorithm, and its
promises: one pass per step, the evaluation/training modes, resume, the non-finite guard, param
groups, schedulers, clipping, accumulation, GradScaler and argument validation.

The transcriptions follow Becker, Altrock and Risse, "Momentum-SAM: Sharpness Aware Minimization
without Computational Overhead" (arXiv 2401.12033), Algorithm 1, in the two forms the authors
publish: SGD with (heavy-ball, undampened) momentum, whose coupled weight decay is added to the
gradient at the perturbed weights, and AdamW, whose decoupled decay shrinks ``w`` after the Adam
update. Between steps the weights are ``w~ = w - rho * v / (||v|| + 1e-12)`` (``v = 0`` at
first: no perturbation).
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import torchsam

Params = list[Tensor]


# --------------------------------------------------------------------------- model and data
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(
        16, 2, generator=g, dtype=torch.float64
    )


def _loss(model: nn.Module, step: int) -> Tensor:
    x, y = _data(step)
    return nn.functional.mse_loss(model(x), y)


def _grad_fn(model: nn.Module) -> Callable[[Params, int], Params]:
    """The gradient of step ``step``'s loss at the weights ``params`` (a pure function)."""
    names = [n for n, _ in model.named_parameters()]

    def grad(params: Params, step: int) -> Params:
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        x, y = _data(step)
        out = functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
        return list(torch.autograd.grad(nn.functional.mse_loss(out, y), leaves))

    return grad


def _norm(tensors: Params) -> Tensor:
    return torch.sqrt(sum((t * t).sum() for t in tensors))  # type: ignore[return-value]


PerTensor = float | list[float]


def _per(value: PerTensor, n: int) -> list[float]:
    """A hyper-parameter per tensor (a float is every tensor's)."""
    return list(value) if isinstance(value, list) else [value] * n


# --------------------------------------------------------------------------- the answer keys
def authors_sgd(
    w0: Params,
    grad: Callable[[Params, int], Params],
    steps: int,
    *,
    lr: PerTensor,
    momentum: float,
    weight_decay: PerTensor,
    rho: PerTensor,
    decay_at: str = "perturbed",
) -> tuple[Params, Params]:
    """SGD Momentum-SAM, one tensor at a time; returns (w~, w). ``decay_at="perturbed"`` is the
    authors' (the decay term is lambda * w~), ``"w"`` adds lambda * w instead (torch's SGD at
    w). ``lr``, ``weight_decay`` and ``rho`` may be given per tensor (param groups); the norm
    is over all tensors' momentum."""
    n = len(w0)
    lrs, decays, rhos = _per(lr, n), _per(weight_decay, n), _per(rho, n)
    tilde = [p.clone() for p in w0]
    v = [torch.zeros_like(p) for p in w0]
    inv = 0.0  # 1 / (||v|| + 1e-12); 0 before the first step (v = 0)
    for t in range(steps):
        g = grad(tilde, t)
        w = [p + r * inv * vi for p, vi, r in zip(tilde, v, rhos, strict=True)]  # back to w
        at = tilde if decay_at == "perturbed" else w
        d = [gi + wd * a for gi, a, wd in zip(g, at, decays, strict=True)]
        v = [momentum * vi + di for vi, di in zip(v, d, strict=True)]
        w = [wi - lr_ * vi for wi, vi, lr_ in zip(w, v, lrs, strict=True)]
        inv = 1 / (float(_norm(v)) + 1e-12)
        tilde = [wi - r * inv * vi for wi, vi, r in zip(w, v, rhos, strict=True)]
    w = [p + r * inv * vi for p, vi, r in zip(tilde, v, rhos, strict=True)]
    return tilde, w


def authors_adamw(
    w0: Params,
    grad: Callable[[Params, int], Params],
    steps: int,
    *,
    lr: PerTensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: PerTensor,
    rho: PerTensor,
    decay: str = "after",
) -> tuple[Params, Params]:
    """AdamW Momentum-SAM; returns (w~, w). ``decay="after"`` is the authors' (w shrinks after
    the Adam update), ``"before"`` is torch.optim.AdamW's order. Per-tensor hyper-parameters
    as in :func:`authors_sgd`."""
    n = len(w0)
    lrs, decays, rhos = _per(lr, n), _per(weight_decay, n), _per(rho, n)
    b1, b2 = betas
    tilde = [p.clone() for p in w0]
    m = [torch.zeros_like(p) for p in w0]
    s = [torch.zeros_like(p) for p in w0]
    inv = 0.0
    for t in range(1, steps + 1):
        g = grad(tilde, t - 1)
        w = [p + r * inv * mi for p, mi, r in zip(tilde, m, rhos, strict=True)]
        shrink = [1 - lr_ * wd for lr_, wd in zip(lrs, decays, strict=True)]
        if decay == "before":
            w = [wi * k for wi, k in zip(w, shrink, strict=True)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        s = [b2 * si + (1 - b2) * gi * gi for si, gi in zip(s, g, strict=True)]
        w = [
            wi - lr_ / (1 - b1**t) * mi / (si.sqrt() / math.sqrt(1 - b2**t) + eps)
            for wi, mi, si, lr_ in zip(w, m, s, lrs, strict=True)
        ]
        if decay == "after":
            w = [wi * k for wi, k in zip(w, shrink, strict=True)]
        inv = 1 / (float(_norm(m)) + 1e-12)
        tilde = [wi - r * inv * mi for wi, mi, r in zip(w, m, rhos, strict=True)]
    w = [p + r * inv * mi for p, mi, r in zip(tilde, m, rhos, strict=True)]
    return tilde, w


def _run(optimizer: torchsam.MomentumSAM, model: nn.Module, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        optimizer.zero_grad()
        _loss(model, t).backward()
        optimizer.step()


def _close(a: Params, b: Params) -> bool:
    return all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(a, b, strict=True))


def _weights(model: nn.Module) -> Params:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


STEPS = 12


# --------------------------------------------------------------------------- the update rule
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_version_equals_the_authors_rule(weight_decay: float, foreach: bool) -> None:
    model = _model()
    w0 = _weights(model)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=weight_decay, rho=0.5)
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, **hyper, foreach=foreach)
    _run(opt, model, STEPS)
    tilde, w = authors_sgd(w0, _grad_fn(model), STEPS, **hyper)  # the decay at w~
    assert _close(_weights(model), tilde)
    opt.eval()
    assert _close(_weights(model), w)
    torch_tilde, _ = authors_sgd(w0, _grad_fn(model), STEPS, **hyper, decay_at="w")
    # the two placements differ with a decay (so the test above tells them apart)
    assert _close(tilde, torch_tilde) is (weight_decay == 0)


def test_a_rho_changed_between_steps_decays_at_the_point_actually_perturbed() -> None:
    # the decay term is lambda * w~ with w~ the point the weights are at: the perturbation the
    # last step applied (with the rho of then), not one recomputed with the rho of now
    model = _model()
    w0 = _weights(model)
    lr, momentum, decay = 0.1, 0.9, 0.05
    opt = torchsam.MomentumSAM(
        model.parameters(), torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=decay
    )
    rhos = [0.5, 0.2, 0.8, 0.8, 0.1, 0.3]  # the radius of the perturbation that ends step t
    for t, rho in enumerate(rhos):
        opt.param_groups[0]["rho"] = rho
        _run(opt, model, 1, start=t)
    grad = _grad_fn(model)
    tilde = [p.clone() for p in w0]
    v = [torch.zeros_like(p) for p in w0]
    applied = 0.0  # w~ = w + applied * v
    for t, rho in enumerate(rhos):
        g = grad(tilde, t)
        w = [p - applied * vi for p, vi in zip(tilde, v, strict=True)]
        v = [momentum * vi + gi + decay * a for vi, gi, a in zip(v, g, tilde, strict=True)]
        w = [wi - lr * vi for wi, vi in zip(w, v, strict=True)]
        applied = -rho / (float(_norm(v)) + 1e-12)
        tilde = [wi + applied * vi for wi, vi in zip(w, v, strict=True)]
    assert _close(_weights(model), tilde)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_version_equals_the_authors_rule(weight_decay: float, foreach: bool) -> None:
    model = _model(1)
    w0 = _weights(model)
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = torchsam.MomentumSAM(
        model.parameters(), torch.optim.AdamW, rho=2.0, **hyper, foreach=foreach
    )
    _run(opt, model, STEPS)
    tilde, w = authors_adamw(w0, _grad_fn(model), STEPS, **hyper, rho=2.0)  # decay after
    assert _close(_weights(model), tilde)
    opt.eval()
    assert _close(_weights(model), w)
    torch_tilde, _ = authors_adamw(w0, _grad_fn(model), STEPS, **hyper, rho=2.0, decay="before")
    assert _close(tilde, torch_tilde) is (weight_decay == 0)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_authors_weight_decay_false_decays_where_the_base_optimizer_does(base: str) -> None:
    model = _model(2)
    w0 = _weights(model)
    if base == "sgd":
        hyper: dict = dict(lr=0.1, momentum=0.9, weight_decay=0.05, rho=0.5)
        cls: type = torch.optim.SGD
        want = authors_sgd(w0, _grad_fn(model), STEPS, **hyper, decay_at="w")
    else:
        hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rho=2.0)
        cls = torch.optim.AdamW
        want = authors_adamw(w0, _grad_fn(model), STEPS, **hyper, decay="before")
    opt = torchsam.MomentumSAM(model.parameters(), cls, **hyper, authors_weight_decay=False)
    _run(opt, model, STEPS)
    assert _close(_weights(model), want[0])
    opt.eval()
    assert _close(_weights(model), want[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_without_weight_decay_both_placements_step_bit_for_bit_alike(seed: int) -> None:
    runs = []
    for authors in (True, False):
        model = _model(seed)
        cls = torch.optim.SGD if seed == 0 else torch.optim.AdamW
        kwargs: dict = {"momentum": 0.9} if seed == 0 else {}
        opt = torchsam.MomentumSAM(
            model.parameters(), cls, lr=0.05, weight_decay=0, authors_weight_decay=authors, **kwargs
        )
        _run(opt, model, STEPS)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_an_unknown_base_optimizer_keeps_its_own_decay_placement() -> None:
    runs = []
    for authors in (True, False):
        model = _model(5)
        opt = torchsam.MomentumSAM(
            model.parameters(),
            torch.optim.Adagrad,
            momentum_key="sum",
            lr=0.1,
            weight_decay=0.1,
            authors_weight_decay=authors,
        )
        _run(opt, model, STEPS)
        runs.append(_weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    with pytest.raises(TypeError, match="authors_weight_decay must be True or False"):
        torchsam.MomentumSAM(
            _model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, authors_weight_decay=1
        )


def _grouped(model: nn.Module, base: str) -> tuple[torchsam.MomentumSAM, nn.Parameter, dict]:
    """Three param groups with their own lr, weight decay and rho, and a parameter that never
    gets a gradient; the per-tensor hyper-parameters of the transcription."""
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    first, second = list(model[0].parameters()), list(model[2].parameters())
    groups = [
        {"params": first[:1], "rho": 0.2},
        {"params": [first[1], extra], "weight_decay": 0.0, "lr": 0.05},
        {"params": second, "rho": 1.5, "weight_decay": 0.2},
    ]
    if base == "sgd":
        opt = torchsam.MomentumSAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.05)
        default_lr, default_decay, default_rho = 0.1, 0.05, 0.5
    else:
        opt = torchsam.MomentumSAM(groups, torch.optim.AdamW, lr=0.01, weight_decay=0.1, rho=1.0)
        default_lr, default_decay, default_rho = 0.01, 0.1, 1.0
    per = {
        "lr": [default_lr, 0.05, default_lr, default_lr],
        "weight_decay": [default_decay, 0.0, 0.2, 0.2],
        "rho": [0.2, default_rho, 1.5, 1.5],
    }
    return opt, extra, per


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_param_groups_and_a_gradless_param_follow_the_authors_rule(base: str) -> None:
    """The authors' code takes one param group; with several, each group has its own lr,
    weight decay and rho, and the norm is over the momentum of all groups together."""
    model = _model(3)
    w0 = _weights(model)
    opt, extra, per = _grouped(model, base)
    _run(opt, model, STEPS)
    if base == "sgd":
        tilde, w = authors_sgd(w0, _grad_fn(model), STEPS, momentum=0.9, **per)
    else:
        tilde, w = authors_adamw(w0, _grad_fn(model), STEPS, betas=(0.9, 0.999), eps=1e-8, **per)
    assert _close(_weights(model), tilde)
    assert torch.equal(extra, torch.ones(3, dtype=torch.float64))
    opt.eval()
    assert _close(_weights(model), w)
    assert torch.equal(extra, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_with_weight_decay_and_groups_is_bit_exact(base: str, mode: str) -> None:
    model = _model(3)
    opt, _, _ = _grouped(model, base)
    _run(opt, model, 4)
    if mode == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    def go_on(m: nn.Module, o: torchsam.MomentumSAM) -> Params:
        o.train()
        _run(o, m, 4, start=4)
        o.eval()
        return _weights(m)

    expected = go_on(model, opt)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _model(9)
    opt2, _, _ = _grouped(model2, base)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.training is (mode == "train")
    assert all(g["authors_weight_decay"] is True for g in opt2.param_groups)
    got = go_on(model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_coupled_decay_of_other_bases_and_maximize_is_taken_at_the_perturbed_point() -> None:
    """Adam's (coupled, L2) decay is taken at w~ as SGD's is; a maximizing SGD negates the
    gradient and then adds its decay, so w~'s decay term keeps its sign."""
    for cls, kwargs in ((torch.optim.Adam, {}), (torch.optim.SGD, {"momentum": 0.9})):
        for maximize in (False, True):
            model, twin = _model(4), _model(4)
            hyper = dict(lr=0.01, weight_decay=0.3, maximize=maximize, **kwargs)
            opt = torchsam.MomentumSAM(model.parameters(), cls, rho=0.5, **hyper)
            _run(opt, model, 5)
            # the reference: the base optimizer itself, stepping at w~ with its decay at w~,
            # then moved back by w - w~ (what the authors' rule means for these bases)
            ref = cls(twin.parameters(), **hyper)
            w = _weights(twin)
            tilde = [p.clone() for p in w]
            for t in range(5):
                with torch.no_grad():
                    for p, x in zip(twin.parameters(), tilde, strict=True):
                        p.copy_(x)
                ref.zero_grad()
                _loss(twin, t).backward()
                ref.step()  # decays the weights it sees: w~
                with torch.no_grad():
                    w = [p + (wi - x) for p, wi, x in zip(twin.parameters(), w, tilde, strict=True)]
                key = "momentum_buffer" if cls is torch.optim.SGD else "exp_avg"
                v = [ref.state[p][key] for p in twin.parameters()]
                inv = 1 / (float(_norm(v)) + 1e-12)
                tilde = [wi - 0.5 * inv * vi for wi, vi in zip(w, v, strict=True)]
            assert _close(_weights(model), tilde), (cls, maximize)


@pytest.mark.parametrize(("rho", "steps"), [(0.5, 1), (0.0, 5)])
def test_no_perturbation_before_the_momentum_exists_and_rho_zero_is_the_base(
    rho: float, steps: int
) -> None:
    model, twin = _model(), _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, momentum=0.9)
    assert opt.state_dict()["state"] == {}
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    _run(opt, model, steps)
    for t in range(steps):
        sgd.zero_grad()
        _loss(twin, t).backward()
        sgd.step()
    # the first gradient is taken at w (no momentum yet): one SGD step; rho = 0: SGD throughout
    opt.eval()
    assert _same(model, twin)


def test_param_groups_with_their_own_rho_share_one_norm_and_a_gradless_param() -> None:
    model = _model()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never gets a gradient
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torchsam.MomentumSAM(
        [{"params": first, "rho": 0.2}, {"params": [*second, extra], "rho": 1.0, "lr": 0.05}],
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
    )
    w, v = _weights(model), [torch.zeros_like(p) for p in model.parameters()]
    lrs, rhos = [0.1, 0.1, 0.05, 0.05], [0.2, 0.2, 1.0, 1.0]
    grad = _grad_fn(model)
    for t in range(6):
        n = float(_norm(v))
        scales = [r / (n + 1e-12) if t else 0.0 for r in rhos]  # v = 0 before the first step
        tilde = [wi - c * vi for wi, vi, c in zip(w, v, scales, strict=True)]
        g = grad(tilde, t)
        v = [0.9 * vi + gi for vi, gi in zip(v, g, strict=True)]
        w = [wi - lr * vi for wi, vi, lr in zip(w, v, lrs, strict=True)]
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()
    n = float(_norm(v))
    tilde = [wi - r / (n + 1e-12) * vi for wi, vi, r in zip(w, v, rhos, strict=True)]
    assert _close(_weights(model), tilde)
    assert torch.equal(extra, torch.ones(3, dtype=torch.float64))
    opt.eval()
    assert _close(_weights(model), w)


# --------------------------------------------------------------------------- one pass per step
def test_one_backward_and_one_closure_evaluation_per_step() -> None:
    model = _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, len(calls))
        loss.backward()
        return loss

    for _ in range(4):
        loss = opt.step(closure)
        assert isinstance(loss, Tensor)
    assert len(calls) == 4
    with pytest.raises(RuntimeError, match=r"one forward/backward pass per step"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"one forward/backward pass per step"):
        opt.second_step()


# --------------------------------------------------------------------------- the modes
def test_eval_and_train_move_the_weights_exactly_and_step_in_eval_raises() -> None:
    model = _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _run(opt, model, 3)
    tilde = _weights(model)
    assert opt.training
    opt.eval()
    opt.eval()  # safe twice
    w = _weights(model)
    assert not opt.training
    assert not _close(w, tilde)
    for p, wi in zip(model.parameters(), w, strict=True):
        assert torch.equal(opt.state[p]["sam.w"], wi)
    with pytest.raises(RuntimeError, match=r"evaluation mode.*optimizer\.train\(\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), w, strict=True))
    opt.train()
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), tilde, strict=True))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resume_is_bit_exact_in_both_modes(mode: str) -> None:
    model = _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.AdamW, rho=1.0, lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(5):
        _run(opt, model, 1, start=t)
        sched.step()
    if mode == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
        buffer,
    )

    def go_on(m: nn.Module, o: torchsam.MomentumSAM, s: object) -> Params:
        o.train()
        for t in range(5, 9):
            _run(o, m, 1, start=t)
            s.step()  # type: ignore[attr-defined]
        o.eval()
        return _weights(m)

    expected = go_on(model, opt, sched)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = _model(7)
    opt2 = torchsam.MomentumSAM(model2.parameters(), torch.optim.AdamW, rho=1.0, lr=0.01)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.training is (mode == "train")
    got = go_on(model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_resume_with_a_scheduled_rho_and_coupled_decay_is_bit_exact(base: str) -> None:
    # the decay of the step after a resume is taken at the point the weights are at: the
    # rho of that perturbation travels with the checkpoint
    cls: type[torch.optim.Optimizer] = torch.optim.SGD if base == "sgd" else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": 0.05, "weight_decay": 0.05}
    if base == "sgd":
        kwargs["momentum"] = 0.9
    rhos = [0.5, 0.2, 0.8, 0.8, 0.1, 0.3, 0.6, 0.4]

    def steps(o: torchsam.MomentumSAM, m: nn.Module, span: range) -> None:
        for t in span:
            o.param_groups[0]["rho"] = rhos[t]
            _run(o, m, 1, start=t)

    model = _model()
    opt = torchsam.MomentumSAM(model.parameters(), cls, **kwargs)
    steps(opt, model, range(4))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    steps(opt, model, range(4, 8))
    model2 = _model(7)
    opt2 = torchsam.MomentumSAM(model2.parameters(), cls, **kwargs)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    steps(opt2, model2, range(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model2), _weights(model), strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_with_a_tiny_or_zero_momentum_stay_finite(
    dtype: torch.dtype,
) -> None:
    # -rho / (||v|| + 1e-12) overflows float16 for a small norm: the factor is limited to
    # float16's largest value (inf * 0 would be NaN)
    p = nn.Parameter(torch.ones(4, dtype=dtype))
    opt = torchsam.MomentumSAM([p], torch.optim.SGD, lr=0.1, momentum=0.9)
    p.grad = torch.zeros(4, dtype=dtype)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4, dtype=dtype))  # v = 0: no perturbation
    p.grad = torch.full((4,), 1e-7, dtype=dtype)
    opt.step()
    assert bool(torch.isfinite(p.detach()).all())
    assert bool((p.detach() < 1).all())  # perturbed along -v, by at most rho = 0.5 in all
    assert float((p.detach().float() - 1).norm()) <= 0.5 + 1e-3


def test_deepcopy_steps_like_the_original() -> None:
    model = _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _run(opt, model, 3)
    model2, opt2 = copy.deepcopy((model, opt))  # one memo: the copy steps the copied weights
    _run(opt, model, 3, start=3)
    _run(opt2, model2, 3, start=3)
    assert _same(model, model2)


# --------------------------------------------------------------------------- guards and tools
def test_a_nonfinite_gradient_skips_the_step_and_poisons_nothing() -> None:
    model, twin = _model(), _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref = torchsam.MomentumSAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _run(opt, model, 3)
    _run(ref, twin, 3)
    opt.zero_grad()
    _loss(model, 99).backward()
    next(model.parameters()).grad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _same(model, twin)
    _run(opt, model, 2, start=3)
    _run(ref, twin, 2, start=3)
    assert _same(model, twin)
    opt.eval()
    ref.eval()
    assert _same(model, twin)


def test_clipping_and_accumulation_act_on_the_gradient_it_steps_with() -> None:
    # two half-batch backwards, then clipping: the step uses the accumulated, clipped gradient
    model, twin = _model(), _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref = torchsam.MomentumSAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for t in range(4):
        x, y = _data(t)
        opt.zero_grad()
        for rows in (slice(0, 8), slice(8, 16)):
            (nn.functional.mse_loss(model(x[rows]), y[rows]) / 2).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        ref.zero_grad()
        _loss(twin, t).backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
        opt.step()
        ref.step()
    assert _close(_weights(model), _weights(twin))


def test_grad_scaler_unscales_and_skips_an_overflow() -> None:
    model, twin = _model(), _model()
    model.float()
    twin.float()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref = torchsam.MomentumSAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for t in range(3):
        x, y = _data(t)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x.float()), y.float())).backward()
        scaler.step(opt)
        scaler.update()
        ref.zero_grad()
        nn.functional.mse_loss(twin(x.float()), y.float()).backward()
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    before = _weights(model)
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x.float()), y.float())).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler skips silently
        scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))


def test_schedulers_and_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scheduler ordering warning
        losses = []
        for _ in range(10):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert losses[-1] < losses[0]
    opt.eval()
    model.eval()
    assert torch.isfinite(model(x)).all()


def test_experiments_method_evaluates_at_w() -> None:
    from torchsam.experiments import get_method, noisy_digits, train

    method = get_method("momentumsam")
    assert "rho" not in method.defaults  # SAM's --rho does not apply: the class default does
    split = noisy_digits(0.2, seed=0)
    result = train("momentumsam", split, epochs=1, seed=0)
    assert result.forward_passes == result.steps  # one forward per step
    assert 0.0 <= result.test_accuracy <= 1.0


#: base optimizer -> (its arguments, the most operators MomentumSAM may add to its step)
COUNTED: dict[str, tuple[type, dict, int]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, 14),
    # the decay at the perturbed point: the base gradient (copy, the factor, addcmul), with
    # the perturbation's factor kept from the last step, not computed again
    "sgd+decay": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}, 17),
    # the decay after the update: one rescale (mul, add)
    "adamw+decay": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, 16),
}


@pytest.mark.parametrize("base", list(COUNTED))
def test_the_step_adds_a_constant_number_of_operators_and_one_synchronisation(base: str) -> None:
    """Over the base optimizer's own step, MomentumSAM's work is multi-tensor: the operators it
    adds do not grow with the number of parameter tensors (weight decay moved included), and
    the non-finite check is the step's one host synchronisation (counted on the CPU, as a GPU
    would launch them: the path that keeps the perturbation's factor on the device; on the CPU,
    where reading a value is free, the factor is computed from the norm's value, one read
    more and fewer operators)."""
    from torchsam import _momentum_sam
    from torchsam.experiments._dispatch_count import DispatchCounter

    cls, kwargs, most = COUNTED[base]

    def counts(layers: int, momentum_sam: bool) -> tuple[int, int]:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(layers)))
        params = model.parameters()
        opt: torch.optim.Optimizer = (
            torchsam.MomentumSAM(params, cls, **kwargs) if momentum_sam else cls(params, **kwargs)
        )
        x = torch.randn(4, 6)
        for _ in range(3):  # the third step is counted (the state and the scratch exist)
            opt.zero_grad()
            model(x).square().mean().backward()
            counter = DispatchCounter()
            with counter:
                opt.step()
        return counter.ops, counter.syncs

    on_cpu = counts(6, True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_momentum_sam, "_reads_free", lambda device: False)  # as on a GPU
        extra = {n: counts(n, True)[0] - counts(n, False)[0] for n in (2, 6)}
        assert extra[2] == extra[6] <= most
        # one more than the base optimizer's own (AdamW reads its step counts on the CPU)
        assert counts(6, True)[1] == counts(6, False)[1] + 1
    # on the CPU: the norm's value read as well, and fewer operators
    assert on_cpu[1] == counts(6, False)[1] + 2
    assert on_cpu[0] < counts(6, False)[0] + extra[6]
    if cls is torch.optim.SGD:
        assert counts(6, False)[1] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_cuda_equals_cpu_with_one_synchronisation_per_step(base: str) -> None:
    """Both decay placements of the authors' rule (AdamW's after the update, SGD's at the
    perturbed point) on the device, with one synchronisation of their own per step (the
    non-finite check) beside the base optimizer's (AdamW not fused reads its step counts,
    kept on the CPU, with ``.item()``: the counter counts those reads too)."""
    from torchsam.experiments._dispatch_count import DispatchCounter

    def run(device: str, momentum_sam: bool = True) -> tuple[Params, list[int]]:
        model = _model().to(device)
        kwargs: dict[str, Any] = (
            dict(lr=0.01) if base == "adamw" else dict(lr=0.1, momentum=0.9, weight_decay=0.05)
        )
        if base == "adamw" and momentum_sam:
            kwargs["rho"] = 1.0
        cls = torch.optim.AdamW if base == "adamw" else torch.optim.SGD
        opt: Any = (
            torchsam.MomentumSAM(model.parameters(), cls, **kwargs)
            if momentum_sam
            else cls(model.parameters(), **kwargs)
        )
        syncs = []
        for t in range(STEPS):
            x, y = _data(t)
            opt.zero_grad()
            nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
            counter = DispatchCounter()
            with counter:
                opt.step()
            syncs.append(counter.syncs)
        if momentum_sam:
            opt.eval()
        return [p.cpu() for p in _weights(model)], syncs

    cpu, _ = run("cpu")
    cuda, syncs = run("cuda")
    assert _close(cuda, cpu)
    _, base_syncs = run("cuda", momentum_sam=False)
    if base == "sgd":
        assert base_syncs == [0] * STEPS
    assert syncs == [n + 1 for n in base_syncs]  # the non-finite check, nothing else


# --------------------------------------------------------------------------- DDP
DDP_STEPS = 4


def _ddp_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tests.test_distributed import _exit_cleanly

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model = DistributedDataParallel(_model())
        opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        for t in range(DDP_STEPS):
            x, y = _data(t)
            rows = slice(8 * rank, 8 * rank + 8)  # this rank's half of the batch
            opt.zero_grad()
            nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            opt.step()
        opt.eval()
        torch.save(_weights(model.module), f"{out}/rank{rank}.pt")
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    _exit_cleanly()  # gloo's threads can abort a finished process in the interpreter's teardown


def test_ddp_ranks_stay_identical_and_equal_one_process(tmp_path: object) -> None:
    """Two gloo processes, each with half of every batch: the gradients are all-reduced in the
    one backward, so both ranks hold the same momentum, perturbation and weights, equal to one
    process on the whole batch."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_ddp_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path}/rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))
    model = _model()
    opt = torchsam.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _run(opt, model, DDP_STEPS)
    opt.eval()
    assert _close(ranks[0], _weights(model))


# --------------------------------------------------------------------------- arguments
def test_invalid_arguments_say_what_to_do() -> None:
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="Invalid rho value"):
        torchsam.MomentumSAM(params, torch.optim.SGD, rho=-1.0, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid rho value"):
        torchsam.MomentumSAM(params, torch.optim.SGD, rho=math.nan, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum > 0"):
        torchsam.MomentumSAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="momentum_key"):
        torchsam.MomentumSAM(params, torch.optim.Adagrad, lr=0.1)
    with pytest.raises(TypeError, match=r"model\.parameters\(\)"):
        torchsam.MomentumSAM(_model(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt = torchsam.MomentumSAM(params, torch.optim.Adagrad, momentum_key="sum", lr=0.1)
    assert opt.momentum_key == "sum"


def test_add_param_group_checks_the_momentum_and_takes_the_mode() -> None:
    model = _model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torchsam.MomentumSAM(first, torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.eval()
    with pytest.raises(ValueError, match=r"momentum > 0"):
        opt.add_param_group({"params": second, "momentum": 0.0})
    opt.add_param_group({"params": second, "rho": 2.0})
    assert opt.param_groups[1]["rho"] == 2.0
    assert not opt.training
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()
    opt.train()
    _run(opt, model, 2)
    assert all(p in opt.base_optimizer.state for p in model.parameters())


# --------------------------------------------------------------------- the CPU factor
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_cpu_factor_is_the_tensor_expression_bit_for_bit(dtype: torch.dtype) -> None:
    """On the CPU the perturbation's factor is computed from the norm's value in Python; it
    must equal the device path's ``(-rho / (total + eps)).to(dtype)`` exactly, also where the
    factor leaves float32's range (a float32 conversion that refuses it must not raise)."""
    from torchsam._momentum_sam import _cpu_factor

    gen = torch.Generator().manual_seed(0)
    totals = (torch.rand(3000, generator=gen, dtype=torch.float64) * 2) ** 2 * torch.pow(
        10.0, torch.randint(-40, 40, (3000,), generator=gen).to(torch.float64)
    )
    edge = [0.0, 1e-300, 1e-12, 1e-40, 3e-27, math.inf, math.nan, 1e300]
    for total in [*totals.tolist(), *edge]:
        for rho in (0.5, 0.05, 3.0, 1e30, 0.0):
            expected = (-float(rho) / (torch.tensor(total, dtype=torch.float64) + 1e-12)).to(dtype)
            got = _cpu_factor(total, rho, dtype, torch.device("cpu"))
            assert got.dtype == expected.dtype
            assert got.shape == expected.shape
            assert torch.equal(got, expected) or (got.isnan() and expected.isnan()), (total, rho)


def test_the_cpu_path_trains_as_the_device_path() -> None:
    """The factor from the norm's value (the CPU path) and the factor kept on the device (a
    GPU's path, forced here) give the same weights bit for bit, weight decay included."""
    from torchsam import _momentum_sam

    def train() -> Params:
        torch.manual_seed(0)
        model = _model().float()
        opt = torchsam.MomentumSAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01
        )
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            opt.step()
        opt.eval()
        return [p.detach().clone() for p in model.parameters()]

    cpu = train()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_momentum_sam, "_reads_free", lambda device: False)
        device = train()
    assert all(torch.equal(a, b) for a, b in zip(cpu, device, strict=True))


@pytest.mark.parametrize("reads_free", [True, False], ids=["cpu-path", "device-path"])
def test_a_group_mixing_dtypes_perturbs_each_with_its_own_rounding(reads_free: bool) -> None:
    """float16 weights beside float32 ones in one group (a half model that keeps its
    normalisation in float32): the factor ``rho / ||v||`` of the float32 ones is rounded to
    float32, not to the first parameter's float16; with a small momentum it exceeds float16's
    range, which made the float32 weights infinite. float64 beside float32 gets float64's."""
    from torchsam import _momentum_sam

    def run(dtypes: tuple[torch.dtype, torch.dtype], scale: float) -> tuple[Params, Params]:
        torch.manual_seed(0)
        a = nn.Parameter(torch.randn(5).to(dtypes[0]))
        b = nn.Parameter(torch.randn(4).to(dtypes[1]))
        opt = torchsam.MomentumSAM([a, b], torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            ((a.double() ** 2).sum() + (b.double() ** 2).sum()).mul(scale).backward()
            opt.step()
        perturbed = [a.detach().clone(), b.detach().clone()]
        momenta = [opt.base_optimizer.state[p]["momentum_buffer"] for p in (a, b)]
        opt.eval()
        return perturbed, [a.detach().clone(), b.detach().clone()], momenta

    with pytest.MonkeyPatch.context() as patch:
        if not reads_free:
            patch.setattr(_momentum_sam, "_reads_free", lambda device: False)
        for dtypes, scale in [
            ((torch.float16, torch.float32), 1e-7),
            ((torch.float32, torch.float64), 1.0),
        ]:
            perturbed, w, momenta = run(dtypes, scale)
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(v) for v in momenta]).to(torch.float64)
            )
            factor = -0.5 / (total + 1e-12)
            assert all(torch.isfinite(t).all() for t in perturbed)
            # the second parameter: its own dtype's rounding of the float64 factor, exactly
            expected = w[1] + momenta[1] * factor.to(dtypes[1])
            assert torch.equal(perturbed[1], expected)
            length = torch.linalg.vector_norm(perturbed[1].double() - w[1].double())
            share = torch.linalg.vector_norm(momenta[1].double()) / total
            assert length.item() == pytest.approx(0.5 * share.item(), rel=1e-3)


def test_a_default_device_set_by_the_user_does_not_move_the_factor() -> None:
    """The CPU factor is made on the parameters' device, not on torch's default device (a
    step inside ``with torch.device("meta")`` used to raise), and the step's cache of the
    perturbed groups is dropped after each step."""

    def train(default: str | None) -> Params:
        torch.manual_seed(0)
        model = _model().float()
        opt = torchsam.MomentumSAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01
        )
        data = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(4)]
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if default is None:
                opt.step()
            else:
                with torch.device(default):
                    opt.step()
            assert opt._step_groups is None
        opt.eval()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(None), train("meta"), strict=True))
