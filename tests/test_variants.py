"""The SAM variants against their answer keys (tests/_reference_variants.py), and their promises.

Every variant runs six float64 steps next to a tensor-by-tensor transcription of the rule its
docstring states, on SGD with momentum and weight decay, Adam and AdamW, with ``foreach`` on
and off, three param groups with their own ``rho``, ``lr`` and the variant's per-group
hyper-parameters, a trainable parameter that never gets a gradient and a frozen one. Then the
special cases each paper names (GSAM's ``alpha = 0`` and radius schedule, WSAM's
``gamma = 1/2``, ESAM's ``beta = gamma = 1``, MSAM's ``m >= n``, ...), the number of
forward/backward passes, the two-call style, state_dict resume, and argument validation.

ESAM's stochastic weight perturbation is random; the reference does not re-randomise it but
replays torchsam's draw (``random.Random(f"torchsam.ESAM:{seed}:{step}")``, one ``random()``
per trainable tensor in param-group order, selected when below ``beta``), and
``test_esam_freezes_exactly_the_unselected_tensors`` checks that the class really froze the
tensors that draw leaves out.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import torchsam
from tests._reference import ReferenceSAM
from tests._reference_variants import (
    ReferenceESAM,
    ReferenceFriendlySAM,
    ReferenceGSAM,
    ReferenceIntermittentSAM,
    ReferenceLookSAM,
    ReferenceMSAM,
    ReferenceVaSSO,
    ReferenceWSAM,
)

BASES: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd_momentum_wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}
N = 50  # batch size: MSAM's m=16 gives chunks of 16, 16, 16 and 2 rows


# --------------------------------------------------------------------------- model and data
class Net(nn.Module):
    """Two layers, a frozen tensor and a trainable parameter that never receives a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 8, dtype=torch.float64)
        self.l2 = nn.Linear(8, 3, dtype=torch.float64)
        self.unused = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(3, dtype=torch.float64), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x))) + self.frozen


def make(seed: int = 0, steps: int = 6) -> tuple[Net, list[tuple[Tensor, Tensor]]]:
    torch.manual_seed(seed)
    model = Net()
    data = [
        (torch.randn(N, 5, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64))
        for _ in range(steps)
    ]
    return model, data


def make_groups(
    model: Net, lr: float, per_group: tuple[dict[str, Any], ...] = ({}, {}, {})
) -> list[dict[str, Any]]:
    """Three groups with their own rho and lr (plus ``per_group``); the last holds the
    parameter without gradient and the frozen one."""
    return [
        {"params": list(model.l1.parameters()), "rho": 0.05, **per_group[0]},
        {"params": [model.l2.weight], "rho": 0.1, "lr": lr / 2, **per_group[1]},
        {
            "params": [model.l2.bias, model.unused, model.frozen],
            "rho": 0.02,
            "lr": lr / 5,
            **per_group[2],
        },
    ]


def closure_for(model: nn.Module, opt: Any, x: Tensor, y: Tensor, calls: list[int] | None = None):
    def closure() -> Tensor:
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def per_sample_for(model: nn.Module, x: Tensor, y: Tensor, calls: list[Any] | None = None):
    """ESAM/MSAM's closure: per-sample losses of the rows ``indices`` (all for None)."""

    def closure(indices: Tensor | None) -> Tensor:
        if calls is not None:
            calls.append(None if indices is None else indices.clone())
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        return ((model(xb) - yb) ** 2).mean(dim=1)

    return closure


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_weights_close(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------- the table
@dataclass
class Variant:
    cls: type
    ref: type
    hyper: dict[str, Any]  # keyword arguments of both the class and the reference
    per_group: tuple[dict[str, Any], ...] = ({}, {}, {})
    cls_only: dict[str, Any] = field(default_factory=dict)
    ref_only: dict[str, Any] = field(default_factory=dict)
    kind: str = "closure"  # "closure", "esam" (per-sample closure) or "msam" (and batch size)
    scheduler: Callable[[Any], Any] | None = None


def _step_lr(opt: Any) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


VARIANTS: dict[str, Variant] = {
    "gsam": Variant(
        torchsam.GSAM,
        ReferenceGSAM,
        dict(alpha=0.3),
        ({}, {"alpha": 0.1}, {"alpha": 0.8}),
    ),
    "gsam_rho_schedule": Variant(
        torchsam.GSAM,
        ReferenceGSAM,
        dict(alpha=0.3, rho_min=0.01),
        ({}, {"rho_min": 0.05, "alpha": 0.1}, {"rho_min": 0.0, "lr_min": 1e-4}),
        scheduler=_step_lr,
    ),
    "gsam_asam": Variant(
        torchsam.GSAM,
        ReferenceGSAM,
        dict(alpha=0.3, adaptive=True, eta=0.01),
        ({"rho": 0.5}, {"rho": 1.0, "alpha": 0.1}, {"rho": 0.2, "alpha": 0.6}),
    ),
    "fsam": Variant(
        torchsam.FriendlySAM,
        ReferenceFriendlySAM,
        dict(sigma=1.0, lmbda=0.9),
        ({}, {"sigma": 0.5, "lmbda": 0.95}, {"sigma": 0.8, "lmbda": 0.0}),
    ),
    "fsam_asam": Variant(
        torchsam.FriendlySAM,
        ReferenceFriendlySAM,
        dict(sigma=1.0, lmbda=0.9, adaptive=True, eta=0.01),
        ({"rho": 0.5}, {"rho": 1.0, "sigma": 0.5, "lmbda": 0.6}, {"adaptive": False}),
    ),
    "vasso": Variant(
        torchsam.VaSSO,
        ReferenceVaSSO,
        dict(theta=0.4),
        ({}, {"theta": 0.9}, {"theta": 1.0}),
    ),
    "vasso_asam": Variant(
        torchsam.VaSSO,
        ReferenceVaSSO,
        dict(theta=0.5, adaptive=True, eta=0.01),
        ({"rho": 0.5}, {"rho": 1.0, "theta": 0.2}, {"adaptive": False}),
    ),
    "wsam_coupled": Variant(
        torchsam.WSAM,
        ReferenceWSAM,
        dict(gamma=0.8, decouple=False),
        ({}, {"gamma": 0.3}, {"gamma": 0.9, "decouple": True}),
    ),
    "wsam_decoupled": Variant(
        torchsam.WSAM,
        ReferenceWSAM,
        dict(gamma=0.9, decouple=True),
        ({}, {"gamma": 0.6}, {"gamma": 0.2}),
        scheduler=_step_lr,  # the decoupled step uses the group's lr of that step
    ),
    "looksam": Variant(
        torchsam.LookSAM,
        ReferenceLookSAM,
        dict(k=3, alpha=0.7),
        ({}, {"alpha": 0.3}, {"alpha": 1.2}),
    ),
    "looksam_asam": Variant(
        torchsam.LookSAM,
        ReferenceLookSAM,
        dict(k=2, alpha=0.5, adaptive=True),
        ({"rho": 0.5}, {"rho": 1.0}, {"alpha": 0.9}),
    ),
    "intermittent_every": Variant(
        torchsam.IntermittentSAM,
        ReferenceIntermittentSAM,
        dict(),
        cls_only=dict(every=2),
        ref_only=dict(sam_on=lambda t: t % 2 == 0),
    ),
    "esam": Variant(
        torchsam.ESAM,
        ReferenceESAM,
        dict(beta=0.6, gamma=0.5, seed=0),
        kind="esam",
    ),
    "esam_asam_gamma_1": Variant(
        torchsam.ESAM,
        ReferenceESAM,
        dict(beta=0.6, gamma=1.0, seed=0, adaptive=True),
        ({"rho": 0.5}, {"rho": 1.0}, {}),
        kind="esam",
    ),
    "msam": Variant(torchsam.MSAM, ReferenceMSAM, dict(m=16), kind="msam"),
    "msam_asam": Variant(
        torchsam.MSAM, ReferenceMSAM, dict(m=20, adaptive=True), ({"rho": 0.5}, {}, {}), kind="msam"
    ),
}


def build_pair(v: Variant, base: str, foreach: bool, seed: int = 0):
    """The class and the reference on two copies of the same model."""
    model, data = make(seed)
    ref_model = copy.deepcopy(model)
    base_cls, base_kw = BASES[base]
    lr = base_kw["lr"]
    opt = v.cls(
        make_groups(model, lr, copy.deepcopy(v.per_group)),
        base_cls,
        **v.hyper,
        **v.cls_only,
        **base_kw,
        foreach=foreach,
    )
    ref = v.ref(
        make_groups(ref_model, lr, copy.deepcopy(v.per_group)),
        base_cls,
        dict(base_kw),
        **v.hyper,
        **v.ref_only,
    )
    return model, ref_model, opt, ref, data


def step_both(v: Variant, model, ref_model, opt, ref, x, y) -> tuple[Tensor, Tensor]:
    if v.kind == "closure":
        loss = opt.step(closure_for(model, opt, x, y))
        ref_loss = ref.step(closure_for(ref_model, ref.base, x, y))
    elif v.kind == "esam":
        loss = opt.step(per_sample_for(model, x, y))
        ref_loss = ref.step(per_sample_for(ref_model, x, y))
    else:
        loss = opt.step(per_sample_for(model, x, y), batch_size=len(x))
        ref_loss = ref.step(per_sample_for(ref_model, x, y), len(x))
    return loss, ref_loss


# --------------------------------------------------------------------------- vs the answer keys
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("name", VARIANTS)
def test_matches_reference_float64(name: str, base: str, foreach: bool) -> None:
    v = VARIANTS[name]
    model, ref_model, opt, ref, data = build_pair(v, base, foreach)
    scheds = [v.scheduler(opt), v.scheduler(ref.base)] if v.scheduler else []
    for x, y in data:
        loss, ref_loss = step_both(v, model, ref_model, opt, ref, x, y)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        for s in scheds:
            s.step()
    assert_weights_close(model, ref_model)
    # the parameter without gradient is untouched and carries no state; the frozen one too
    assert torch.equal(model.unused, ref_model.unused)
    assert torch.equal(model.frozen, ref_model.frozen)
    assert not model.frozen.requires_grad
    assert model.unused.requires_grad
    for p in (model.unused, model.frozen):
        assert not opt.state.get(p)
        assert not opt.base_optimizer.state.get(p)


# --------------------------------------------------------------------------- reductions to SAM
def _sam_case(name: str, model: Net, lr: float, base_cls: type, base_kw: dict[str, Any]):
    """(optimizer, step function) of a variant configured to be exactly SAM."""
    g = make_groups(model, lr)
    if name == "gsam_alpha_0":
        return torchsam.GSAM(g, base_cls, alpha=0.0, rho_min=None, **base_kw), "closure"
    if name == "wsam_gamma_half_coupled":
        return torchsam.WSAM(g, base_cls, gamma=0.5, decouple=False, **base_kw), "closure"
    if name == "fsam_sigma_0":
        return torchsam.FriendlySAM(g, base_cls, sigma=0.0, lmbda=0.5, **base_kw), "closure"
    if name == "vasso_theta_1":
        return torchsam.VaSSO(g, base_cls, theta=1.0, **base_kw), "closure"
    if name == "looksam_k_1":
        return torchsam.LookSAM(g, base_cls, k=1, alpha=0.7, **base_kw), "closure"
    if name == "intermittent_every_1":
        return torchsam.IntermittentSAM(g, base_cls, every=1, **base_kw), "closure"
    if name == "intermittent_probability_1":
        return torchsam.IntermittentSAM(g, base_cls, probability=1.0, **base_kw), "closure"
    if name == "esam_beta_gamma_1":
        return torchsam.ESAM(g, base_cls, beta=1.0, gamma=1.0, **base_kw), "esam"
    if name.startswith("msam_m_"):
        m = int(name.rsplit("_", 1)[1])
        return torchsam.MSAM(g, base_cls, m=m, **base_kw), "msam"
    raise AssertionError(name)


SAM_CASES = [
    "gsam_alpha_0",
    "wsam_gamma_half_coupled",
    "fsam_sigma_0",
    "vasso_theta_1",
    "looksam_k_1",
    "intermittent_every_1",
    "intermittent_probability_1",
    "esam_beta_gamma_1",
    f"msam_m_{N}",
    "msam_m_64",
]


@pytest.mark.parametrize("base", ["sgd_momentum_wd", "adam"])
@pytest.mark.parametrize("name", SAM_CASES)
def test_special_case_equals_sam(name: str, base: str) -> None:
    """Each paper's degenerate setting is SAM, with SAM's two passes per step."""
    model, data = make()
    ref_model = copy.deepcopy(model)
    base_cls, base_kw = BASES[base]
    opt, kind = _sam_case(name, model, base_kw["lr"], base_cls, base_kw)
    ref = ReferenceSAM(make_groups(ref_model, base_kw["lr"]), base_cls, **base_kw)
    for x, y in data:
        calls: list[Any] = []
        if kind == "closure":
            loss = opt.step(closure_for(model, opt, x, y, calls))
        elif kind == "esam":
            loss = opt.step(per_sample_for(model, x, y, calls))
        else:
            loss = opt.step(per_sample_for(model, x, y, calls), batch_size=len(x))
        assert len(calls) == 2
        ref_loss = ref.step(closure_for(ref_model, ref.base, x, y))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_weights_close(model, ref_model)


@pytest.mark.parametrize("name", ["wsam_gamma_0", "intermittent_probability_0"])
def test_special_case_equals_base_optimizer(name: str) -> None:
    model, data = make()
    ref_model = copy.deepcopy(model)
    base_cls, base_kw = BASES["adam"]
    g = make_groups(model, base_kw["lr"])
    if name == "wsam_gamma_0":
        opt: Any = torchsam.WSAM(g, base_cls, gamma=0.0, decouple=True, **base_kw)
    else:
        opt = torchsam.IntermittentSAM(g, base_cls, probability=0.0, **base_kw)
    base = base_cls(make_groups(ref_model, base_kw["lr"]), **base_kw)
    calls: list[int] = []
    for x, y in data:
        opt.step(closure_for(model, opt, x, y, calls))
        closure_for(ref_model, base, x, y)()
        base.step()
    assert len(calls) == (2 if name == "wsam_gamma_0" else 1) * len(data)
    assert_weights_close(model, ref_model)


# --------------------------------------------------------------------------- GSAM's radius
@pytest.mark.parametrize("schedule", ["step", "cosine"])
@pytest.mark.parametrize("foreach", [True, False])
def test_gsam_radius_follows_lr_schedule(schedule: str, foreach: bool) -> None:
    """rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min), per group."""
    model, data = make(steps=8)
    ref_model = copy.deepcopy(model)
    base_cls, base_kw = BASES["sgd_momentum_wd"]
    per_group = (
        {"rho": 0.2},
        {"rho": 0.1, "rho_min": 0.02, "alpha": 0.1},
        {"rho": 0.05, "rho_min": 0.0, "lr_min": 0.001},
    )
    hyper = dict(rho_min=0.05, alpha=0.4)
    opt = torchsam.GSAM(
        make_groups(model, 0.1, copy.deepcopy(per_group)),
        base_cls,
        **hyper,
        **base_kw,
        foreach=foreach,
    )
    ref = ReferenceGSAM(
        make_groups(ref_model, 0.1, copy.deepcopy(per_group)), base_cls, dict(base_kw), **hyper
    )
    assert [g["lr_max"] for g in opt.param_groups] == [0.1, 0.05, 0.02]

    def sched(o: Any) -> Any:
        if schedule == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3)
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=len(data), eta_min=0.001)

    scheds = [sched(opt), sched(ref.base)]
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))
        ref.step(closure_for(ref_model, ref.base, x, y))
        for s in scheds:
            s.step()
    assert_weights_close(model, ref_model)
    # the radius really moved with the learning rate
    first, last = ref.radii[0], ref.radii[-1]
    assert first[0] == pytest.approx(0.2)
    assert last[0] < 0.15


@pytest.mark.parametrize("lr_max", [None, 0.4])
def test_gsam_perturbation_has_the_scheduled_radius(lr_max: float | None) -> None:
    """Measured directly: ||w + e - w|| equals rho_t as the lr halves each step."""
    model, data = make()
    opt = torchsam.GSAM(
        model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr_max=lr_max, lr=0.2
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    top = 0.2 if lr_max is None else lr_max
    for x, y in data[:4]:
        lr_t = opt.param_groups[0]["lr"]
        start = weights(model)
        F.mse_loss(model(x), y).backward()
        assert opt.first_step(zero_grad=True)
        moved = torch.sqrt(
            sum(((p - w) ** 2).sum() for p, w in zip(model.parameters(), start, strict=True))
        )
        assert moved.item() == pytest.approx(0.02 + 0.08 * lr_t / top, rel=1e-9)
        F.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()


def test_gsam_radius_never_exceeds_rho_when_the_lr_rises_above_lr_max() -> None:
    """OneCycleLR built after GSAM: lr_max (the lr at construction) is below the peak."""
    model, data = make(steps=8)
    opt = torchsam.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=len(data))
    radii = []
    for x, y in data:
        lr_t = opt.param_groups[0]["lr"]
        start = weights(model)
        F.mse_loss(model(x), y).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert opt.first_step(zero_grad=True)
        moved = torch.sqrt(
            sum(((p - w) ** 2).sum() for p, w in zip(model.parameters(), start, strict=True))
        )
        radii.append(moved.item())
        expected = 0.02 + 0.08 * min(lr_t / 0.01, 1.0)
        assert moved.item() == pytest.approx(expected, rel=1e-9)
        assert any("pass the schedule's peak as lr_max" in str(w.message) for w in caught) == (
            lr_t > 0.01
        )
        F.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert max(radii) == pytest.approx(0.1, rel=1e-9)  # the peak was above lr_max: capped


# --------------------------------------------------------------------------- LookSAM
def test_looksam_closure_evaluations() -> None:
    model, data = make(steps=10)
    opt = torchsam.LookSAM(model.parameters(), torch.optim.SGD, k=5, lr=0.1)
    calls: list[int] = []
    for x, y in data:
        opt.step(closure_for(model, opt, x, y, calls))
    assert len(calls) == 12  # steps 0 and 5 take two passes


def _looksam_two_call(k: int, zero_grad: bool) -> tuple[Net, list[bool]]:
    model, data = make(steps=7)
    opt = torchsam.LookSAM(make_groups(model, 0.1), torch.optim.SGD, k=k, lr=0.1, momentum=0.9)
    flags = []
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        perturbed = opt.first_step(zero_grad=zero_grad)
        flags.append(perturbed)
        if perturbed:
            if not zero_grad:
                opt.zero_grad()
            F.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model, flags


@pytest.mark.parametrize("zero_grad", [True, False])
def test_looksam_two_call_style_equals_closure(zero_grad: bool) -> None:
    model, flags = _looksam_two_call(k=3, zero_grad=zero_grad)
    assert flags == [True, False, False, True, False, False, True]
    ref_model, data = make(steps=7)
    opt = torchsam.LookSAM(make_groups(ref_model, 0.1), torch.optim.SGD, k=3, lr=0.1, momentum=0.9)
    for x, y in data:
        opt.step(closure_for(ref_model, opt, x, y))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("clear", [False, True])
def test_looksam_second_pass_on_a_one_pass_step_raises(clear: bool) -> None:
    model, data = make()
    opt = torchsam.LookSAM(model.parameters(), torch.optim.SGD, k=5, lr=0.1)
    opt.step(closure_for(model, opt, *data[0]))  # step 0: the sharpness step
    x, y = data[1]
    F.mse_loss(model(x), y).backward()
    assert opt.first_step(zero_grad=True) is False
    assert all(p.grad is not None for p in model.l1.parameters())  # kept despite zero_grad
    if clear:
        opt.zero_grad()
    F.mse_loss(model(x), y).backward()  # a second pass that should not have been run
    with pytest.raises(RuntimeError, match="takes no second pass"):
        opt.second_step()


# --------------------------------------------------------------------------- IntermittentSAM
def _tiny() -> tuple[Tensor, Callable[[Any, list[int]], Callable[[], Tensor]]]:
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)

    def closure_of(opt: Any, calls: list[int]) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            calls.append(1)
            opt.zero_grad()
            loss = (w**2).sum() + w.prod()
            loss.backward()
            return loss

        return closure

    return w, closure_of


def _decisions(steps: int, **kw: Any) -> list[bool]:
    """Which steps took the second pass, seen only through closure evaluations."""
    w, closure_of = _tiny()
    opt = torchsam.IntermittentSAM([w], torch.optim.SGD, lr=1e-3, **kw)
    out = []
    for _ in range(steps):
        calls: list[int] = []
        opt.step(closure_of(opt, calls))
        assert len(calls) in (1, 2)
        out.append(len(calls) == 2)
    return out


def test_intermittent_every_k_closure_evaluations() -> None:
    assert _decisions(9, every=3) == [True, False, False] * 3
    # Composer's SAM(interval=3) runs SAM on steps 2, 5, 8 (its (step + 1) % interval == 0)
    composer = [(step + 1) % 3 == 0 for step in range(9)]
    assert _decisions(9, every=3, offset=2) == composer == [False, False, True] * 3
    assert _decisions(4, every=1, offset=0) == [True] * 4


def test_intermittent_probability_is_seeded_and_has_the_right_frequency() -> None:
    a = _decisions(2000, probability=0.3, seed=7)
    assert a[:200] == _decisions(200, probability=0.3, seed=7)
    assert a[:200] != _decisions(200, probability=0.3, seed=8)
    assert sum(a) / len(a) == pytest.approx(0.3, abs=0.05)
    assert 0.5 - 0.05 <= sum(_decisions(2000, probability=0.5, seed=0)) / 2000 <= 0.5 + 0.05


@pytest.mark.parametrize("foreach", [True, False])
def test_intermittent_probability_matches_reference(foreach: bool) -> None:
    """The weights follow the rule, given the decisions the class made."""
    model, data = make(steps=8)
    ref_model = copy.deepcopy(model)
    base_cls, base_kw = BASES["sgd_momentum_wd"]
    opt = torchsam.IntermittentSAM(
        make_groups(model, 0.1), base_cls, probability=0.5, seed=3, **base_kw, foreach=foreach
    )
    decisions: list[bool] = []
    ref = ReferenceIntermittentSAM(
        make_groups(ref_model, 0.1), base_cls, dict(base_kw), sam_on=lambda t: decisions[t]
    )
    for x, y in data:
        calls: list[int] = []
        opt.step(closure_for(model, opt, x, y, calls))
        decisions.append(len(calls) == 2)
        ref.step(closure_for(ref_model, ref.base, x, y))
    assert 0 < sum(decisions) < len(decisions)  # both kinds of step were exercised
    assert_weights_close(model, ref_model)


# --------------------------------------------------------------------------- resume
RESUMABLE: dict[str, Callable[[list[dict[str, Any]]], Any]] = {
    "gsam_rho_schedule": lambda g: torchsam.GSAM(
        g, torch.optim.SGD, rho=0.1, rho_min=0.01, alpha=0.2, lr=0.1, momentum=0.9
    ),
    "fsam": lambda g: torchsam.FriendlySAM(g, torch.optim.Adam, lmbda=0.8, lr=1e-2),
    "vasso": lambda g: torchsam.VaSSO(g, torch.optim.SGD, theta=0.3, lr=0.1, momentum=0.9),
    "wsam": lambda g: torchsam.WSAM(g, torch.optim.SGD, gamma=0.8, lr=0.1, momentum=0.9),
    "looksam": lambda g: torchsam.LookSAM(g, torch.optim.Adam, k=4, lr=1e-2),
    "intermittent": lambda g: torchsam.IntermittentSAM(
        g, torch.optim.SGD, probability=0.4, seed=11, lr=0.1, momentum=0.9
    ),
}


def _resume_run(name: str, resume: bool) -> tuple[list[Tensor], list[int]]:
    model, data = make(steps=12)
    opt = RESUMABLE[name](make_groups(model, 0.1))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    passes = []
    for i, (x, y) in enumerate(data):
        if resume and i == 5:  # mid-run, in the middle of a LookSAM cycle
            buffer = io.BytesIO()
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
                buffer,
            )
            buffer.seek(0)
            ckpt = torch.load(buffer, weights_only=True)
            model, _ = make(seed=123)  # other weights until loaded
            opt = RESUMABLE[name](make_groups(model, 0.1))
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
        calls: list[int] = []
        opt.step(closure_for(model, opt, x, y, calls))
        passes.append(len(calls))
        sched.step()
    return weights(model), passes


@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_mid_run_is_bit_exact(name: str) -> None:
    straight, passes = _resume_run(name, resume=False)
    resumed, passes_resumed = _resume_run(name, resume=True)
    assert passes == passes_resumed  # the same decisions (LookSAM's cycle, random draws)
    if name == "intermittent":
        assert set(passes) == {1, 2}
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "key"), [("fsam", "sam.grad_ema"), ("looksam", "sam.gv")])
def test_own_state_is_saved(name: str, key: str) -> None:
    model, data = make()
    opt = RESUMABLE[name](make_groups(model, 0.1))
    opt.step(closure_for(model, opt, *data[0]))
    state = opt.state_dict()["state"]
    assert key in state[0]
    groups = opt.state_dict()["param_groups"]
    assert all(g["sam_step"] == 1 for g in groups)
    if name == "looksam":  # the norm of g_v, kept from the sharpness step for the next ones
        assert all(g["sam_gv_norm"] > 0 for g in groups)


# --------------------------------------------------------------------------- ESAM
def _esam_pair(seed: int = 0, **kw: Any):
    model, data = make()
    ref_model = copy.deepcopy(model)
    base_cls, base_kw = BASES["sgd_momentum_wd"]
    opt = torchsam.ESAM(make_groups(model, 0.1), base_cls, seed=seed, **kw, **base_kw)
    ref = ReferenceESAM(make_groups(ref_model, 0.1), base_cls, dict(base_kw), seed=seed, **kw)
    return model, ref_model, opt, ref, data


def test_esam_passes_and_chosen_rows() -> None:
    """gamma < 1: three closure calls per step, the second backward on exactly the kept rows."""
    model, ref_model, opt, ref, data = _esam_pair(beta=0.6, gamma=0.3)
    keep = math.ceil(0.3 * N)
    for i, (x, y) in enumerate(data):
        calls: list[Any] = []
        loss = opt.step(per_sample_for(model, x, y, calls))
        ref_loss = ref.step(per_sample_for(ref_model, x, y))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
        assert len(calls) == 3
        assert calls[0] is None  # losses at w, all rows
        assert calls[1] is None  # losses at w + e, all rows
        rows = calls[2]
        assert rows.numel() == keep
        assert torch.equal(rows.sort().values, ref.chosen[i])
    assert_weights_close(model, ref_model)


def test_esam_returns_the_mean_loss_at_w() -> None:
    model, _, opt, _, data = _esam_pair(beta=0.6, gamma=0.5)
    for x, y in data:
        with torch.no_grad():
            expected = F.mse_loss(model(x), y)
        loss = opt.step(per_sample_for(model, x, y))
        assert not loss.requires_grad
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_esam_first_pass_takes_exactly_the_selected_gradients() -> None:
    model, ref_model, opt, ref, data = _esam_pair(beta=0.6, gamma=0.5)
    ref_names = {id(p): n for n, p in ref_model.named_parameters()}
    trainable = {"l1.weight", "l1.bias", "l2.weight", "l2.bias", "unused"}
    events: list[str] = []  # "call" per closure call, a name per gradient accumulated
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda _, name=name: events.append(name))
    for i, (x, y) in enumerate(data):
        events.clear()
        closure = per_sample_for(model, x, y)

        def recording(indices: Tensor | None, closure: Any = closure) -> Tensor:
            # requires_grad is never switched (DistributedDataParallel relies on it)
            assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
            events.append("call")
            return closure(indices)

        opt.step(recording)
        ref.step(per_sample_for(ref_model, x, y))
        selected = {ref_names[id(p)] for p in ref.selected[i]}
        calls = [k for k, event in enumerate(events) if event == "call"]
        assert len(calls) == 3
        first = events[calls[0] + 1 : calls[1]]  # the backward pass after the first call
        assert set(first) == selected - {"unused"}  # no gradient work for the others
        assert len(first) == len(set(first))
        second = events[calls[2] + 1 :]
        assert set(second) == trainable - {"unused"}  # every tensor at w + e
    assert_weights_close(model, ref_model)
    # the draw did leave tensors out on every step (otherwise this test would check little)
    assert all(len(s) < len(trainable) for s in ref.selected)


@pytest.mark.parametrize("failing_call", [0, 1, 2])
def test_esam_closure_error_restores_requires_grad_and_weights(failing_call: int) -> None:
    model, data = make()
    opt = torchsam.ESAM(make_groups(model, 0.1), torch.optim.SGD, beta=0.6, gamma=0.5, lr=0.1)
    x, y = data[0]
    start = weights(model)
    calls: list[Any] = []
    closure = per_sample_for(model, x, y, calls)

    def failing(indices: Tensor | None) -> Tensor:
        if len(calls) == failing_call:
            calls.append("raised")
            raise ValueError("boom")
        return closure(indices)

    with pytest.raises(ValueError, match="boom"):
        opt.step(failing)
    assert not opt.perturbed
    for (name, p), w in zip(model.named_parameters(), start, strict=True):
        assert p.requires_grad == (name != "frozen"), name
        assert torch.equal(p, w), name
    opt.step(per_sample_for(model, x, y))  # still usable
    assert not torch.equal(model.l1.weight, start[0])


def test_esam_two_call_style_raises() -> None:
    model, data = make()
    opt = torchsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.mse_loss(model(data[0][0]), data[0][1]).backward()
    with pytest.raises(RuntimeError, match=r"use step\(closure\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"use step\(closure\)"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="per-sample losses"):
        opt.step()


def test_esam_closure_must_return_per_sample_losses() -> None:
    model, data = make()
    opt = torchsam.ESAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = data[0]
    with pytest.raises(RuntimeError, match="1-D tensor of per-sample losses"):
        opt.step(lambda idx: F.mse_loss(model(x), y))
    assert all(p.requires_grad for p in model.parameters() if p is not model.frozen)


def test_esam_selection_pass_runs_without_grad() -> None:
    model, data = make()
    opt = torchsam.ESAM(model.parameters(), torch.optim.SGD, beta=1.0, gamma=0.5, lr=0.1)
    x, y = data[0]
    enabled: list[bool] = []
    closure = per_sample_for(model, x, y)

    def recording(indices: Tensor | None) -> Tensor:
        enabled.append(torch.is_grad_enabled())
        return closure(indices)

    opt.step(recording)
    assert enabled == [True, False, True]


def test_esam_step_without_selected_tensors_does_not_crash() -> None:
    model, data = make()
    # seed=3 selects only `unused` (which takes no gradient) on step 1: see the reference draw
    opt = torchsam.ESAM(make_groups(model, 0.1), torch.optim.SGD, beta=0.6, seed=3, lr=0.1)
    for x, y in data[:2]:
        opt.step(per_sample_for(model, x, y))


def test_esam_bad_selection_output_leaves_weights_at_w() -> None:
    model, data = make()
    opt = torchsam.ESAM(model.parameters(), torch.optim.SGD, beta=1.0, gamma=0.5, lr=0.1)
    x, y = data[0]
    start = weights(model)
    calls: list[Any] = []
    closure = per_sample_for(model, x, y, calls)

    def bad(indices: Tensor | None) -> Tensor:
        out = closure(indices)
        return out[:, None] if len(calls) == 2 else out

    with pytest.raises(RuntimeError, match="1-D tensor"):
        opt.step(bad)
    assert not opt.perturbed
    for p, w in zip(model.parameters(), start, strict=True):
        assert torch.equal(p, w)


# --------------------------------------------------------------------------- MSAM
def test_msam_chunks_and_closure_calls() -> None:
    model, data = make()
    opt = torchsam.MSAM(make_groups(model, 0.1), torch.optim.SGD, m=16, lr=0.1)
    x, y = data[0]
    with torch.no_grad():
        expected = F.mse_loss(model(x), y)
    calls: list[Any] = []
    loss = opt.step(per_sample_for(model, x, y, calls), batch_size=N)
    chunks = [torch.arange(0, 16), torch.arange(16, 32), torch.arange(32, 48), torch.arange(48, 50)]
    assert len(calls) == 2 * len(chunks)
    for i, rows in enumerate(chunks):
        assert torch.equal(calls[2 * i], rows)
        assert torch.equal(calls[2 * i + 1], rows)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert [g["sam_step"] for g in opt.state_dict()["param_groups"]] == [1, 1, 1]


def test_msam_api_errors() -> None:
    model, data = make()
    opt = torchsam.MSAM(model.parameters(), torch.optim.SGD, m=8, lr=0.1)
    x, y = data[0]
    closure = per_sample_for(model, x, y)
    with pytest.raises(RuntimeError, match="batch_size"):
        opt.step(closure)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        opt.step(closure, batch_size=0)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="micro-batch"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="micro-batch"):
        opt.second_step()


# --------------------------------------------------------------------------- maximize
MAXIMIZABLE: dict[str, tuple[Callable[..., Any], str]] = {
    "gsam": (lambda g, **kw: torchsam.GSAM(g, torch.optim.SGD, alpha=0.3, **kw), "closure"),
    "fsam": (lambda g, **kw: torchsam.FriendlySAM(g, torch.optim.SGD, lmbda=0.5, **kw), "closure"),
    "vasso": (lambda g, **kw: torchsam.VaSSO(g, torch.optim.SGD, theta=0.5, **kw), "closure"),
    "wsam_coupled": (
        lambda g, **kw: torchsam.WSAM(g, torch.optim.SGD, gamma=0.8, decouple=False, **kw),
        "closure",
    ),
    "wsam_decoupled": (
        lambda g, **kw: torchsam.WSAM(g, torch.optim.SGD, gamma=0.8, decouple=True, **kw),
        "closure",
    ),
    "looksam": (lambda g, **kw: torchsam.LookSAM(g, torch.optim.SGD, k=2, **kw), "closure"),
    "esam_gamma_1": (
        lambda g, **kw: torchsam.ESAM(g, torch.optim.SGD, beta=0.6, gamma=1.0, **kw),
        "esam",
    ),
    "msam": (lambda g, **kw: torchsam.MSAM(g, torch.optim.SGD, m=16, **kw), "msam"),
}


@pytest.mark.parametrize(
    "name",
    [n for n in MAXIMIZABLE],
)
def test_maximize_equals_minimising_the_negated_loss(name: str) -> None:
    make_opt, kind = MAXIMIZABLE[name]
    model_a, data = make()
    model_b = copy.deepcopy(model_a)
    opt_a = make_opt(make_groups(model_a, 0.1), lr=0.1, momentum=0.9, maximize=True)
    opt_b = make_opt(make_groups(model_b, 0.1), lr=0.1, momentum=0.9)
    for x, y in data:
        if kind == "closure":

            def neg(model: nn.Module = model_b, x: Tensor = x, y: Tensor = y) -> Tensor:
                opt_b.zero_grad()
                loss = -F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt_a.step(closure_for(model_a, opt_a, x, y))
            opt_b.step(neg)
        else:
            pos = per_sample_for(model_a, x, y)
            inner = per_sample_for(model_b, x, y)
            kw = {"batch_size": len(x)} if kind == "msam" else {}
            opt_a.step(pos, **kw)
            opt_b.step(lambda idx, inner=inner: -inner(idx), **kw)
    assert_weights_close(model_a, model_b)


# --------------------------------------------------------------------------- validation
def _p() -> list[Tensor]:
    return [torch.zeros(2, requires_grad=True)]


BAD_ARGUMENTS = [
    (torchsam.GSAM, dict(rho=0.05, rho_min=0.1), ValueError, "rho_min"),
    (torchsam.GSAM, dict(alpha=-0.1), ValueError, "Invalid alpha"),
    (torchsam.GSAM, dict(lr_min=float("nan")), ValueError, "Invalid lr_min"),
    (torchsam.GSAM, dict(rho_min=0.01, lr_max=-1.0), ValueError, "Invalid lr_max"),
    (torchsam.FriendlySAM, dict(lmbda=1.0), ValueError, "Invalid lmbda"),
    (torchsam.FriendlySAM, dict(lmbda=-0.1), ValueError, "Invalid lmbda"),
    (torchsam.FriendlySAM, dict(sigma=-1.0), ValueError, "Invalid sigma"),
    (torchsam.VaSSO, dict(theta=0.0), ValueError, "Invalid theta"),
    (torchsam.VaSSO, dict(theta=1.5), ValueError, "Invalid theta"),
    (torchsam.WSAM, dict(gamma=1.0), ValueError, "Invalid gamma"),
    (torchsam.WSAM, dict(gamma=-0.5), ValueError, "Invalid gamma"),
    (torchsam.WSAM, dict(decouple="yes"), TypeError, "decouple must be True or False"),
    (torchsam.LookSAM, dict(k=0), ValueError, "Invalid k"),
    (torchsam.LookSAM, dict(k=2.5), TypeError, "Invalid k"),
    (torchsam.LookSAM, dict(k=True), TypeError, "Invalid k"),
    (torchsam.LookSAM, dict(alpha=-1.0), ValueError, "Invalid alpha"),
    (torchsam.IntermittentSAM, dict(), ValueError, "exactly one of every"),
    (torchsam.IntermittentSAM, dict(every=2, probability=0.5), ValueError, "exactly one"),
    (torchsam.IntermittentSAM, dict(every=0), ValueError, "Invalid every"),
    (torchsam.IntermittentSAM, dict(probability=1.5), ValueError, "Invalid probability"),
    (torchsam.IntermittentSAM, dict(every=2, seed="a"), TypeError, "seed must be an int"),
    (torchsam.IntermittentSAM, dict(every=2, offset=2), ValueError, "offset must be below"),
    (torchsam.IntermittentSAM, dict(every=2, offset=-1), ValueError, "Invalid offset"),
    (torchsam.IntermittentSAM, dict(every=2, offset=1.0), TypeError, "offset must be an int"),
    (torchsam.IntermittentSAM, dict(probability=0.5, offset=1), ValueError, "every=k only"),
    (torchsam.ESAM, dict(beta=0.0), ValueError, "Invalid beta"),
    (torchsam.ESAM, dict(beta=1.5), ValueError, "Invalid beta"),
    (torchsam.ESAM, dict(gamma=0.0), ValueError, "Invalid gamma"),
    (torchsam.ESAM, dict(seed=1.0), TypeError, "seed must be an int"),
    (torchsam.MSAM, dict(m=0), ValueError, "Invalid m"),
    (torchsam.MSAM, dict(m=True), TypeError, "Invalid m"),
    (torchsam.MSAM, dict(rho=-0.1), ValueError, "Invalid rho"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "match"),
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{'-'.join(k) or 'none'}" for c, k, _, _ in BAD_ARGUMENTS],
)
def test_bad_hyper_parameters(cls: type, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cls(_p(), torch.optim.SGD, lr=0.1, **kwargs)


BAD_GROUPS = [
    (torchsam.GSAM, {}, {"rho": 0.05, "rho_min": 0.2}, "rho_min"),
    (torchsam.GSAM, {}, {"alpha": -1.0}, "Invalid alpha"),
    (torchsam.FriendlySAM, {}, {"lmbda": 1.0}, "Invalid lmbda"),
    (torchsam.VaSSO, {}, {"theta": 0.0}, "Invalid theta"),
    (torchsam.WSAM, {}, {"gamma": 1.0}, "Invalid gamma"),
    (torchsam.LookSAM, {}, {"alpha": -0.5}, "Invalid alpha"),
    (torchsam.IntermittentSAM, {"every": 2}, {"rho": -1.0}, "Invalid rho"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "group", "match"),
    BAD_GROUPS,
    ids=[f"{c.__name__}-{'-'.join(g)}" for c, _, g, _ in BAD_GROUPS],
)
def test_bad_per_group_hyper_parameters(
    cls: type, kwargs: dict[str, Any], group: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cls([{"params": _p()}, {"params": _p(), **group}], torch.optim.SGD, lr=0.1, **kwargs)
    opt = cls(_p(), torch.optim.SGD, lr=0.1, **kwargs)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _p(), **group})
