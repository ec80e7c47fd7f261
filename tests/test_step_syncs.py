"""Host synchronisations per optimizer step, counted with a dispatch mode (a behaviour test).

On a GPU each synchronisation stalls the launch queue; the counts are the same on the CPU,
where they are measured here. The default path of SAM and of every variant synchronises once
per step (the decision to skip a step with a non-finite gradient); ``skip_nonfinite=False``
never does, so that the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchsam
from torchsam.experiments._dispatch_count import DispatchCounter
from torchsam.experiments.bench import count_step, sync_contenders

CONTENDERS = {c.name: c for c in sync_contenders()}
VARIANTS = [name for name in CONTENDERS if not name.startswith("seed")]


@pytest.mark.parametrize("name", VARIANTS)
def test_one_host_synchronisation_per_step_by_default(name: str) -> None:
    counter, base = count_step(CONTENDERS[name], layers=3)
    assert counter.syncs == 1, counter.sync_ops
    assert base.syncs == 0  # the base SGD step adds none
    assert set(counter.sync_ops) == {"aten._local_scalar_dense.default"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", VARIANTS)
def test_one_host_synchronisation_per_step_on_cuda(name: str) -> None:
    """On a GPU the counter also sees copies to the host (MSAM once added each micro-batch's
    loss to a CPU total)."""
    counter, base = count_step(CONTENDERS[name], layers=3, device="cuda")
    assert counter.syncs == 1, counter.sync_ops
    assert base.syncs == 0
    unguarded, _ = count_step(CONTENDERS[name], layers=3, device="cuda", skip_nonfinite=False)
    assert unguarded.syncs == 0, unguarded.sync_ops


@pytest.mark.parametrize("name", VARIANTS)
def test_no_host_synchronisation_without_the_guard(name: str) -> None:
    counter, _ = count_step(CONTENDERS[name], layers=3, skip_nonfinite=False)
    assert counter.syncs == 0, counter.sync_ops


def test_the_seed_never_synchronises_and_the_counter_sees_item() -> None:
    counter, _ = count_step(CONTENDERS["seed (reference SAM)"], layers=3)
    assert counter.syncs == 0
    with DispatchCounter() as probe:  # the counter itself: what a float(norm) would cost
        t = torch.ones(3)
        float(t.norm())
        bool(t.sum() > 0)
        t.tolist()
    assert probe.syncs == 2  # tolist() on a CPU tensor dispatches nothing
    assert probe.ops >= 4


def test_sam_op_count_does_not_grow_with_the_number_of_tensors() -> None:
    """With foreach (the default) SAM's own work is a fixed number of multi-tensor calls."""
    sam = CONTENDERS["SAM"]
    small, small_base = count_step(sam, layers=3)
    large, large_base = count_step(sam, layers=30)
    assert small.ops - small_base.ops == large.ops - large_base.ops


def test_without_the_guard_a_nan_reaches_the_weights_as_with_the_base_optimizer() -> None:
    """``skip_nonfinite=False`` is documented as no check at all; the default skips."""
    for guard in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, skip_nonfinite=guard)
        x, y = torch.randn(4, 3), torch.randn(4, 1)
        nn.functional.mse_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        assert model.weight.grad is not None
        model.weight.grad[0, 0] = math.nan
        if guard:
            with pytest.warns(RuntimeWarning, match="not finite"):
                opt.second_step(zero_grad=True)
            assert torch.isfinite(model.weight).all()
        else:
            opt.second_step(zero_grad=True)
            assert torch.isnan(model.weight[0, 0])


def test_skip_nonfinite_is_validated_and_kept_in_every_group() -> None:
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False"):
        torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, skip_nonfinite=1)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "skip_nonfinite": False}]
    with pytest.raises(ValueError, match="cannot differ between param groups"):
        torchsam.SAM(groups, torch.optim.SGD, lr=0.1)
    opt = torchsam.GSAM(model.parameters(), torch.optim.SGD, lr=0.1, skip_nonfinite=False)
    assert opt.state_dict()["param_groups"][0]["skip_nonfinite"] is False


def test_msam_checks_the_perturbed_gradient_of_every_micro_batch() -> None:
    """A NaN in the second pass of the first micro-batch (summed into the step's gradient, not
    left in ``p.grad``) skips the step too."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt = torchsam.MSAM(model.parameters(), torch.optim.SGD, lr=0.1, m=4)
    backwards = 0

    def poison(grad: torch.Tensor) -> torch.Tensor:
        nonlocal backwards
        backwards += 1
        return torch.full_like(grad, math.nan) if backwards == 2 else grad

    handle = model.weight.register_hook(poison)  # backward 2: micro-batch 0 at w + e

    def closure(rows: torch.Tensor | None) -> torch.Tensor:
        xb, yb = (x, y) if rows is None else (x[rows], y[rows])
        return ((model(xb) - yb) ** 2).mean(dim=1)

    start = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step(closure, batch_size=8)
    handle.remove()
    assert backwards == 4
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.equal(p, p0)


@pytest.mark.parametrize("cls", [torchsam.FriendlySAM, torchsam.VaSSO])
def test_a_skipped_step_leaves_the_gradient_average_as_it_was(cls: type) -> None:
    """The average is computed in first_step() but committed only once second_step() knows
    that the step's gradients are finite."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1)

    def two_call(poison: bool) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        if poison:
            assert model.bias.grad is not None
            model.bias.grad[0] = math.inf
        opt.first_step(zero_grad=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)

    two_call(poison=False)
    two_call(poison=False)
    before = {p: s["grad_ema"].clone() for p, s in opt.own_state.items() if "grad_ema" in s}
    with pytest.warns(RuntimeWarning, match=r"first_step\(\) was not finite"):
        two_call(poison=True)
    for p, ema in before.items():
        assert torch.equal(opt.own_state[p]["grad_ema"], ema)
    two_call(poison=False)
    assert not torch.equal(opt.own_state[model.bias]["grad_ema"], before[model.bias])


@pytest.mark.parametrize(
    "shapes",
    [
        [(10,), (20,), (30,)],
        [(10,), (5000,), (20,), (9000,)],
        [(6000,), (7000,)],
        [(3, 4), (9,)],
        [(3, 4), (9,), (5, 2), (7,), (80, 90)],
    ],
)
def test_the_gradient_norm_of_small_and_large_tensors(shapes: list[tuple[int, ...]]) -> None:
    """On the CPU small tensors are normed through one flat buffer, large ones one by one: the
    perturbation equals rho * g / ||g|| over all of them (float64, to rounding)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in shapes]
    grads = [torch.randn(n, dtype=torch.float64) for n in shapes]
    start = [p.detach().clone() for p in params]
    opt = torchsam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(2):  # the second step reuses the cached buffer
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.first_step()
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        for p, p0, g in zip(params, start, grads, strict=True):
            torch.testing.assert_close(p - p0, 0.1 * g / norm, rtol=1e-12, atol=1e-15)
        with torch.no_grad():
            opt.abort()  # back to w


@pytest.mark.parametrize("poisoned", range(5))
def test_the_check_of_second_gradients_of_mixed_shapes(poisoned: int) -> None:
    """1-D small tensors are checked through the flat buffer, the others one by one: a NaN in
    any of them skips the step."""
    shapes = [(3, 4), (9,), (5, 2), (7,), (80, 90)]
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in shapes]
    start = [p.detach().clone() for p in params]
    opt = torchsam.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    grads = [torch.randn_like(p) for p in params]
    grads[poisoned].view(-1)[-1] = math.nan
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="second_step"):
        opt.second_step()
    for p, p0 in zip(params, start, strict=True):
        assert torch.equal(p, p0)


def test_weights_saved_through_the_flat_buffer_come_back_bit_exactly() -> None:
    """Small 1-D weights are saved with one torch.cat, the others copied: with lr=0 every
    weight is back at w after each step."""
    shapes = [(3, 4), (9,), (5, 2), (7,), (80, 90), (11,)]
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(n)) for n in shapes]
    start = [p.detach().clone() for p in params]
    opt = torchsam.SAM(params, torch.optim.SGD, rho=0.5, lr=0.0, momentum=0.9)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.first_step()
        assert all(not torch.equal(p, p0) for p, p0 in zip(params, start, strict=True))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.second_step()
        for p, p0 in zip(params, start, strict=True):
            assert torch.equal(p, p0)


@pytest.mark.parametrize("name", ["GSAM", "LookSAM k=5, sharpness step", "LookSAM k=5, other step"])
def test_inner_products_are_multi_tensor(name: str) -> None:
    """GSAM's and LookSAM's inner product is a fixed number of operators per step (not one
    per tensor): their own operators do not grow with the number of tensors and stay within
    three times SAM's (issue 20's target)."""
    counts = {}
    for layers in (3, 30):
        counter, base = count_step(CONTENDERS[name], layers=layers)
        sam, sam_base = count_step(CONTENDERS["SAM"], layers=layers)
        counts[layers] = counter.ops - base.ops
        assert counter.ops - base.ops <= 3 * (sam.ops - sam_base.ops)
    assert counts[3] == counts[30]


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_finite_perturbation_makes_no_cleaning_pass(channels_last: bool) -> None:
    """The guard's perturbation is one fused kernel for small and large tensors alike
    (channels-last ones too): no ``nan_to_num_`` over the direction, no per-tensor operator,
    and no synchronisation in ``first_step()``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Flatten(), nn.Linear(64 * 4, 100)
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 4, 4)
    opt = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    for _ in range(2):
        model(x).square().mean().backward()
        with DispatchCounter() as counter:
            opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step(zero_grad=True)
    ops = counter.by_op
    assert counter.syncs == 0
    assert ops["aten._fused_sgd_.tensor_lr"] == 1
    assert not any("nan_to_num_" in op or "addcmul" in op for op in ops), ops


def test_intermittent_plain_steps_add_nothing_to_the_base_step() -> None:
    """Without the guard a plain step of IntermittentSAM dispatches exactly the base SGD
    step's operators; with it, only the guard's check is added, whatever the number of
    tensors (one multi-tensor pass)."""
    plain = CONTENDERS["IntermittentSAM every=5, other step"]
    counter, base = count_step(plain, layers=30, skip_nonfinite=False)
    assert counter.by_op == base.by_op
    assert counter.syncs == 0
    added = []
    for layers in (3, 30):
        guarded, base = count_step(plain, layers=layers)
        added.append(guarded.ops - base.ops)
    assert added[0] == added[1]
