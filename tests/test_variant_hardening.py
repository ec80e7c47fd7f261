"""Hardening of the SAM family (issue 10): what every variant must get right around its rule.

The gradients stay as backward made them, steps without any gradient, complex parameters,
``foreach=False`` really selecting per-tensor kernels, subclass signatures, and ESAM's weight
selection without ``requires_grad`` switches.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import torchsam
from torchsam._engine import StepContext

from .test_family import BASES, VARIANTS, build, setup, step, weights
from .test_sam import _ParamSizedAllocations


def build_on(name: str, groups: list[dict[str, Any]], base: str = "sgd", **extra: Any) -> Any:
    """The family table's optimizer ``name`` on the given param groups."""
    variant = VARIANTS[name]
    cls, base_kw = BASES[base]
    return variant.cls(groups, cls, **{**variant.kwargs, **base_kw, **extra})


# --------------------------------------------------------------------------- gradient swap
class _DoubledSAM(torchsam.SAM):
    """SAM whose base optimizer sees twice the perturbed gradient, through ``ctx.base_grads``."""

    def base_gradient(self, ctx: StepContext) -> None:
        for v in ctx.views:
            for buf, g in zip(ctx.base_grads(v), v.grads, strict=True):
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


# --------------------------------------------------------------------------- complex parameters
class _ComplexNet(nn.Module):
    """A complex weight, held either as complex or as its ``view_as_real`` (a real twin)."""

    def __init__(self, as_real: bool) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        w = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
        self.as_real = as_real
        self.w = nn.Parameter(torch.view_as_real(w).clone() if as_real else w)
        self.b = nn.Parameter(torch.randn(3, dtype=torch.float64, generator=gen))

    def forward(self, x: Tensor) -> Tensor:
        w = torch.view_as_complex(self.w) if self.as_real else self.w
        h = x.to(w.dtype) @ w
        return h.abs() + torch.tanh(h.real) * h.imag + self.b


@pytest.mark.parametrize("name", VARIANTS)
def test_complex_parameters_step_as_their_real_view(name: str) -> None:
    # GSAM's and LookSAM's inner product is Re <x, conj y>; ASAM's |w| acts per real number.
    _, data = setup()
    results = []
    for as_real in (False, True):
        model = _ComplexNet(as_real)
        opt = build_on(name, [{"params": [model.w]}, {"params": [model.b], "rho": 0.1}])
        for x, y in data[:4]:
            step(name, opt, model, x, y)
        results.append(model.w.detach() if as_real else torch.view_as_real(model.w.detach()))
    torch.testing.assert_close(results[0], results[1])


# --------------------------------------------------------------------------- ESAM under DDP
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
def test_esam_trains_a_distributed_data_parallel_model() -> None:
    # DDP's reducer needs every parameter's gradient in each backward pass: ESAM's weight
    # selection must not switch requires_grad (one process; the same steps as without DDP).
    dist = torch.distributed
    _, data = setup()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    plain = copy.deepcopy(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = build_on("esam", [{"params": ddp.parameters()}])
        for x, y in data[:4]:
            step("esam", opt, ddp, x, y)
    finally:
        dist.destroy_process_group()
    plain_opt = build_on("esam", [{"params": plain.parameters()}])
    for x, y in data[:4]:
        step("esam", plain_opt, plain, x, y)
    for a, b in zip(weights(model), weights(plain), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", ["gsam", "wsam", "wsam_coupled", "looksam", "msam"])
def test_gradient_for_the_base_step_allocates_nothing_after_a_first_cycle(
    name: str, foreach: bool
) -> None:
    torch.manual_seed(0)
    params = [torch.randn(64, 32, requires_grad=True) for _ in range(3)]
    opt = build_on(
        name, [{"params": params}], foreach=foreach, weight_decay=0.0
    )  # SGD allocates with weight decay
    x = torch.randn(12, 64)

    def two_passes() -> None:
        for p in params:
            p.grad = torch.randn_like(p)  # outside the counter: the "backward pass"

    def per_sample(rows: Tensor | None) -> Tensor:
        xb = x if rows is None else x[rows]
        return sum((xb @ p).square().mean(1) for p in params)  # type: ignore[return-value]

    counts = []
    for _ in range(2 * 3):  # two LookSAM cycles (k=3): a sharpness step and two reuse steps
        if name == "msam":
            with _ParamSizedAllocations(64 * 32) as mode:
                opt.step(per_sample, batch_size=len(x))
        else:
            two_passes()
            with _ParamSizedAllocations(64 * 32) as mode:
                opt.first_step()
                opt.second_step()
        # MSAM's closure runs its backward passes here: their weight gradients (mm) are not ours
        counts.append([op for op in mode.ops if not (name == "msam" and "aten.mm" in op)])
    assert any(counts[:3]), "the first cycle allocates the scratch buffers (the counter sees them)"
    assert counts[3:] == [[], [], []]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
@pytest.mark.parametrize(("value", "spread"), [(1e300, False), (math.inf, True), (math.nan, True)])
def test_a_local_pass_checks_finiteness_in_the_gradients_own_dtype(
    value: float, spread: bool
) -> None:
    """A finite float64 gradient beyond float32's range is not taken for an overflow (it
    became inf when the check cast it to float32, and every rank skipped the step)."""
    from torchsam.distributed import _spread_non_finite

    dist = torch.distributed
    model = nn.Linear(3, 2).double()
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.weight.grad[0, 0] = value
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _spread_non_finite(model, opt)
    finally:
        dist.destroy_process_group()
    assert torch.isnan(model.bias.grad).all() == spread
