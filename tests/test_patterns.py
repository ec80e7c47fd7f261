"""Documented usage patterns of :class:`torchsam.SAM`, each checked against an independent answer.

BatchNorm with ``freeze_running_stats``, gradient clipping, gradient accumulation, mixed precision
(``GradScaler`` and bfloat16 autocast), ``torch.compile``, bfloat16 parameters, the non-finite
guards, and the closure style. The expected values come from hand-written reference steps
(``torch.autograd.grad`` on ``torch.func.functional_call``), from copies of the model that take
a single ordinary forward pass, or from the same training run without the feature under test.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchsam import SAM, freeze_running_stats

STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- helpers
def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def _data(n: int = 32, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 5, dtype=dtype)
    y = torch.randn(n, 1, dtype=dtype)
    return x, y


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bit_equal(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        assert torch.equal(a, e)


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def _stats(model: nn.Module) -> dict[str, Tensor]:
    """Every running-statistics buffer of ``model``, cloned."""
    return {
        name: buf.clone()
        for name, buf in model.named_buffers()
        if name.rsplit(".", 1)[-1] in STAT_KEYS
    }


def _assert_stats_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert actual  # the model must have statistics for the check to mean anything
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


def _sam_sgd_reference(
    model: nn.Module,
    loss_at: Callable[[dict[str, Tensor]], Tensor],
    *,
    rho: float,
    lr: float,
    max_norm: float | None = None,
) -> list[Tensor]:
    """One SAM step with plain SGD, written out directly (Foret et al. 2021, Algorithm 1).

    ``loss_at`` maps a ``{name: tensor}`` dict of parameters to the loss. The gradient at the
    perturbed point is clipped to ``max_norm`` the way ``clip_grad_norm_`` documents it.
    """
    names = [name for name, _ in model.named_parameters()]
    w = _weights(model)

    def grad_at(point: list[Tensor]) -> list[Tensor]:
        leaves = [t.detach().clone().requires_grad_(True) for t in point]
        loss = loss_at(dict(zip(names, leaves, strict=True)))
        return list(torch.autograd.grad(loss, leaves))

    g = grad_at(w)
    g_norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
    e = [rho * gi / (g_norm + 1e-12) for gi in g]
    g_adv = grad_at([wi + ei for wi, ei in zip(w, e, strict=True)])
    if max_norm is not None:
        total = torch.sqrt(sum((gi * gi).sum() for gi in g_adv))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        g_adv = [gi * coef for gi in g_adv]
    return [wi - lr * gi for wi, gi in zip(w, g_adv, strict=True)]


def _mse_at(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    def loss_at(params: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return loss_at


class _Net(nn.Module):
    """Normalisation layers at several depths of nested containers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 6),
            nn.BatchNorm1d(6, momentum=None),  # cumulative average: uses num_batches_tracked
            nn.Tanh(),
            nn.Linear(6, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _net_data(n: int = 8) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 2, 4, 4), torch.randn(n, 1)


# --------------------------------------------------------------------------- 1. BatchNorm
def test_freeze_running_stats_second_pass_uses_batch_stats_and_keeps_running_stats():
    torch.manual_seed(0)
    model = _Net()
    x, y = _net_data()
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.5)

    F.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    after_first = _stats(model)
    assert all(int(v) == 1 for k, v in after_first.items() if k.endswith("num_batches_tracked"))

    train_twin = copy.deepcopy(model)  # perturbed weights, train mode, one fresh forward
    eval_twin = copy.deepcopy(model).eval()
    with freeze_running_stats(model) as frozen:
        assert frozen is model
        out = model(x)
        F.mse_loss(out, y).backward()
    _assert_stats_equal(_stats(model), after_first)

    twin_out = train_twin(x)
    F.mse_loss(twin_out, y).backward()
    assert torch.equal(out, twin_out)  # normalised with the batch statistics
    for p, q in zip(model.parameters(), train_twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # ... also in the backward pass
    # the ordinary forward of the twin did move its statistics, and eval mode differs
    assert not torch.equal(
        _stats(train_twin)["features.1.0.running_mean"], after_first["features.1.0.running_mean"]
    )
    assert not torch.allclose(out, eval_twin(x), atol=1e-3)

    optimizer.second_step(zero_grad=True)
    _assert_stats_equal(_stats(model), after_first)
    assert all(m.track_running_stats for m in _norm_layers(model))


def test_freeze_running_stats_disabled_does_nothing():
    torch.manual_seed(1)
    model = _Net()
    x, _ = _net_data()
    twin = copy.deepcopy(model)
    with freeze_running_stats(model, enabled=False):
        assert all(m.track_running_stats for m in _norm_layers(model))
        out = model(x)
    twin_out = twin(x)
    assert torch.equal(out, twin_out)
    _assert_stats_equal(_stats(model), _stats(twin))
    assert all(int(v) == 1 for k, v in _stats(model).items() if k.endswith("num_batches_tracked"))


def test_freeze_running_stats_leaves_eval_and_untracked_modules_alone():
    torch.manual_seed(2)
    in_train = nn.BatchNorm1d(3)
    in_eval = nn.BatchNorm1d(3)
    untracked = nn.BatchNorm1d(3, track_running_stats=False)
    model = nn.Sequential(nn.Sequential(in_train), in_eval, untracked)
    with torch.no_grad():  # running statistics far from the batch statistics
        in_eval.running_mean.fill_(2.0)
        in_eval.running_var.fill_(4.0)
    in_eval.eval()
    eval_copy = copy.deepcopy(in_eval)
    x = torch.randn(10, 3)
    before = _stats(model)

    with freeze_running_stats(model):
        assert not in_train.track_running_stats
        assert in_eval.track_running_stats
        assert not untracked.track_running_stats
        out = in_eval(x)
    assert torch.equal(out, eval_copy(x))  # still normalised with the running statistics
    assert not torch.allclose(out, F.batch_norm(x, None, None, training=True), atol=1e-2)
    assert in_train.track_running_stats
    assert in_eval.track_running_stats
    assert not untracked.track_running_stats  # not switched on by the restore
    assert untracked.running_mean is None
    _assert_stats_equal(_stats(model), before)


def test_freeze_running_stats_restores_flags_after_an_exception():
    torch.manual_seed(3)
    model = _Net()
    x, _ = _net_data()
    layers = _norm_layers(model)
    flags_inside: list[bool] = []

    def fail_inside_the_block() -> None:
        with freeze_running_stats(model):
            flags_inside.extend(m.track_running_stats for m in layers)
            model(x)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fail_inside_the_block()
    assert flags_inside == [False] * len(layers)
    assert all(m.track_running_stats for m in layers)
    before = _stats(model)
    model(x)  # statistics are tracked again after the block
    after = _stats(model)
    for name in before:
        assert not torch.equal(before[name], after[name]), name


@pytest.mark.parametrize(
    "not_a_module",
    [None, "model", [nn.BatchNorm1d(2)], nn.BatchNorm1d(2).parameters()],
    ids=["none", "str", "list", "parameters"],
)
def test_freeze_running_stats_rejects_a_non_module(not_a_module):
    with pytest.raises(TypeError, match=r"nn\.Module"), freeze_running_stats(not_a_module):
        pass


def test_freeze_running_stats_instance_norm_with_tracked_stats():
    torch.manual_seed(4)
    model = nn.Sequential(nn.InstanceNorm1d(3, affine=True, track_running_stats=True))
    x = torch.randn(4, 3, 7)
    before = _stats(model)
    with freeze_running_stats(model):
        model(x).sum().backward()
    _assert_stats_equal(_stats(model), before)
    model(x)  # control: outside the block the statistics do move
    assert not torch.equal(model[0].running_mean, before["0.running_mean"])


def test_freeze_running_stats_allows_backward_after_the_block():
    """The closure pattern: forward inside the block, backward outside it."""
    torch.manual_seed(5)
    model = _Net()
    x, _ = _net_data()
    before = _stats(model)
    with freeze_running_stats(model):
        out = model(x)
    out.square().mean().backward()
    _assert_stats_equal(_stats(model), before)
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- 2. clipping
def test_clipping_the_second_gradient_matches_a_reference_step():
    torch.manual_seed(5)
    model = _mlp(torch.float64)
    x, y = _data(dtype=torch.float64)
    rho, lr, max_norm = 0.3, 0.5, 0.05
    expected = _sam_sgd_reference(model, _mse_at(model, x, y), rho=rho, lr=lr, max_norm=max_norm)
    unclipped = _sam_sgd_reference(model, _mse_at(model, x, y), rho=rho, lr=lr)

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    F.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    F.mse_loss(model(x), y).backward()
    total = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    assert total > 4 * max_norm  # the clipping is active
    optimizer.second_step(zero_grad=True)

    actual = _weights(model)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert _max_diff(actual, unclipped) > 1e-3


# --------------------------------------------------------------------------- 3. accumulation
@pytest.mark.parametrize("foreach", [False, True])
def test_gradient_accumulation_equals_one_full_batch_step(foreach):
    torch.manual_seed(6)
    model = _mlp(torch.float64)
    x, y = _data(32, torch.float64)
    rho, lr, chunks = 0.2, 0.3, 4
    expected = _sam_sgd_reference(model, _mse_at(model, x, y), rho=rho, lr=lr)

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, foreach=foreach)
    for xb, yb in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
        (F.mse_loss(model(xb), yb) / chunks).backward()
    optimizer.first_step(zero_grad=True)
    for xb, yb in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
        (F.mse_loss(model(xb), yb) / chunks).backward()
    optimizer.second_step(zero_grad=True)

    for a, e in zip(_weights(model), expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_gradient_accumulation_with_adam_equals_full_batch_training():
    torch.manual_seed(7)
    full = _mlp(torch.float64)
    accumulated = copy.deepcopy(full)
    x, y = _data(32, torch.float64)
    opt_full = SAM(full.parameters(), torch.optim.Adam, rho=0.1, lr=0.01)
    opt_acc = SAM(accumulated.parameters(), torch.optim.Adam, rho=0.1, lr=0.01)
    for _ in range(3):
        F.mse_loss(full(x), y).backward()
        opt_full.first_step(zero_grad=True)
        F.mse_loss(full(x), y).backward()
        opt_full.second_step(zero_grad=True)

        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
            (F.mse_loss(accumulated(xb), yb) / 4).backward()
        opt_acc.first_step(zero_grad=True)
        for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
            (F.mse_loss(accumulated(xb), yb) / 4).backward()
        opt_acc.second_step(zero_grad=True)
    for a, e in zip(_weights(accumulated), _weights(full), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- 4. mixed precision
def _train_two_call(
    model: nn.Module,
    optimizer: SAM,
    batches: list[tuple[Tensor, Tensor]],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    for x, y in batches:
        if scaler is None:
            F.mse_loss(model(x), y).backward()
            optimizer.first_step(zero_grad=True)
            F.mse_loss(model(x), y).backward()
            optimizer.second_step(zero_grad=True)
        else:
            scaler.scale(F.mse_loss(model(x), y)).backward()
            scaler.unscale_(optimizer)
            optimizer.first_step(zero_grad=True)
            scaler.scale(F.mse_loss(model(x), y)).backward()
            optimizer.second_step(zero_grad=True, grad_scaler=scaler)
            scaler.update()


def test_grad_scaler_matches_unscaled_training():
    torch.manual_seed(8)
    model = _mlp()
    plain = copy.deepcopy(model)
    batches = [_data() for _ in range(3)]
    init = _weights(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    _train_two_call(model, optimizer, batches, scaler)
    reference = SAM(plain.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    _train_two_call(plain, reference, batches)

    for a, e in zip(_weights(model), _weights(plain), strict=True):
        torch.testing.assert_close(a, e)
    assert _max_diff(_weights(plain), init) > 1e-2
    assert scaler.get_scale() == 2.0**13  # no overflow seen: grew once per step


def test_grad_scaler_overflow_in_the_first_pass_skips_the_whole_step():
    torch.manual_seed(9)
    model = _mlp()
    x, y = _data()
    y = 1e4 * y  # scaled by 2**127 the loss and its gradients overflow float32
    init = _weights(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    scaler.scale(F.mse_loss(model(x), y)).backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.unscale_(optimizer)
    # first_step() does not synchronise: it cannot know, and the second pass is run at w
    assert optimizer.first_step(zero_grad=True)
    _assert_bit_equal(_weights(model), init)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    optimizer.second_step(zero_grad=True, grad_scaler=scaler)  # skipped silently: a scaler
    scaler.update()

    _assert_bit_equal(_weights(model), init)
    assert not optimizer.perturbed
    assert not optimizer.base_optimizer.state  # the base step (and its momentum) was skipped
    assert scaler.get_scale() < 2.0**127

    # the scaler backs off; with a reasonable scale training proceeds as without it
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plain = copy.deepcopy(model)
    _train_two_call(model, optimizer, [(x, y)], scaler)
    reference = SAM(plain.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    _train_two_call(plain, reference, [(x, y)])
    for a, e in zip(_weights(model), _weights(plain), strict=True):
        torch.testing.assert_close(a, e)


def test_grad_scaler_overflow_in_the_second_pass_skips_the_base_step():
    torch.manual_seed(10)
    model = _mlp()
    x, y = _data()
    init = _weights(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.unscale_(optimizer)
    optimizer.first_step(zero_grad=True)
    assert _max_diff(_weights(model), init) > 1e-3  # perturbed
    scaler.scale(F.mse_loss(model(x), y)).backward()
    with torch.no_grad():
        model[0].weight.grad[1, 2] = float("inf")
    optimizer.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()

    _assert_bit_equal(_weights(model), init)
    assert not optimizer.perturbed
    assert not optimizer.base_optimizer.state
    assert scaler.get_scale() == 2.0**9


def test_bfloat16_autocast_trains_close_to_float32():
    torch.manual_seed(11)
    model = _mlp()
    full = copy.deepcopy(model)
    init = _weights(model)
    batches = [_data() for _ in range(3)]

    def train(net: nn.Module, autocast: bool) -> None:
        optimizer = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        for x, y in batches:
            for second in (False, True):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = net(x)
                assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
                F.mse_loss(out.float(), y).backward()
                if second:
                    optimizer.second_step(zero_grad=True)
                else:
                    optimizer.first_step(zero_grad=True)

    train(model, autocast=True)
    train(full, autocast=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    diff = _max_diff(_weights(model), _weights(full))
    assert diff < 5e-3
    assert _max_diff(_weights(full), init) > 20 * 5e-3


# --------------------------------------------------------------------------- 5. torch.compile
class _BNNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _train_bn(model: nn.Module, forward: Callable[[Tensor], Tensor], steps: int) -> None:
    torch.manual_seed(100)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(16, 6), torch.randn(16, 1)
        F.mse_loss(forward(x), y).backward()
        optimizer.first_step(zero_grad=True)
        with freeze_running_stats(model):
            F.mse_loss(forward(x), y).backward()
        optimizer.second_step(zero_grad=True)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_matches_eager(backend):
    torch.manual_seed(12)
    eager = _BNNet()
    model = copy.deepcopy(eager)
    init = _weights(eager)
    compiled = torch.compile(model, backend=backend)
    _train_bn(eager, eager, steps=3)
    _train_bn(compiled, compiled, steps=3)

    for a, e in zip(_weights(model), _weights(eager), strict=True):
        torch.testing.assert_close(a, e)
    assert _max_diff(_weights(eager), init) > 1e-2
    assert int(model[1].num_batches_tracked) == 3
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)


# --------------------------------------------------------------------------- 6. bfloat16 params
@pytest.mark.parametrize(
    ("base", "lr"), [(torch.optim.SGD, 0.1), (torch.optim.Adam, 0.01)], ids=["sgd", "adam"]
)
def test_bfloat16_parameters_match_a_float32_reference(base, lr):
    torch.manual_seed(13)
    model = _mlp(torch.bfloat16)
    x, y = _data()
    init32 = copy.deepcopy(model).float()

    def reference(rho: float) -> list[Tensor]:
        net = copy.deepcopy(init32)
        optimizer = SAM(net.parameters(), base, rho=rho, lr=lr)
        _train_two_call(net, optimizer, [(x, y)])
        return [w.bfloat16().float() for w in _weights(net)]

    optimizer = SAM(model.parameters(), base, rho=0.5, lr=lr)
    _train_two_call(model, optimizer, [(x.bfloat16(), y.bfloat16())])
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    actual = [w.float() for w in _weights(model)]

    expected = reference(0.5)
    tol = 2e-3  # a few bfloat16 ulps at these magnitudes
    assert _max_diff(actual, expected) < tol
    assert _max_diff(expected, reference(0.0)) > 5 * tol  # SAM is distinguishable from base


def test_bfloat16_sgd_step_matches_the_hand_written_reference():
    torch.manual_seed(14)
    model = _mlp(torch.bfloat16)
    x, y = _data()
    init32 = copy.deepcopy(model).float()
    expected = _sam_sgd_reference(init32, _mse_at(init32, x, y), rho=0.5, lr=0.1)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    _train_two_call(model, optimizer, [(x.bfloat16(), y.bfloat16())])
    assert _max_diff([w.float() for w in _weights(model)], expected) < 2e-3


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("foreach", [False, True])
def test_bfloat16_parameters_come_back_bit_exactly_with_zero_lr(base, foreach):
    torch.manual_seed(15)
    model = _mlp(torch.bfloat16)
    x, y = _data(dtype=torch.bfloat16)
    init = _weights(model)
    optimizer = SAM(model.parameters(), base, rho=0.5, lr=0.0, foreach=foreach)
    for _ in range(2):
        F.mse_loss(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        assert _max_diff(_weights(model), init) > 1e-2  # really perturbed
        F.mse_loss(model(x), y).backward()
        optimizer.second_step(zero_grad=True)
        _assert_bit_equal(_weights(model), init)


# --------------------------------------------------------------------------- 7. non-finite guard
def test_nan_gradient_before_first_step_skips_the_whole_step():
    torch.manual_seed(16)
    model = _mlp()
    x, y = _data()
    init = _weights(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    F.mse_loss(model(x), y).backward()
    with torch.no_grad():
        model[2].bias.grad[0] = float("nan")
    # first_step() does not synchronise, so it cannot tell: the second pass is due, at w
    assert optimizer.first_step(zero_grad=True) is True
    _assert_bit_equal(_weights(model), init)
    with pytest.raises(RuntimeError, match="second_step"):
        optimizer.first_step()  # second_step() is expected

    F.mse_loss(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"norm in first_step\(\) was not finite"):
        optimizer.second_step(zero_grad=True)  # the step is skipped there
    assert not optimizer.perturbed
    _assert_bit_equal(_weights(model), init)
    assert not optimizer.base_optimizer.state  # no base step was taken


def test_grad_scaler_inf_in_the_first_pass_only_skips_the_step():
    """An overflow seen by ``unscale_`` before ``first_step`` skips the step even when the second
    pass happens to be finite, as GradScaler skips an overflowing iteration."""
    torch.manual_seed(19)
    model = _mlp()
    x, y = _data()
    init = _weights(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(F.mse_loss(model(x), y)).backward()
    with torch.no_grad():
        model[0].weight.grad[0, 0] = float("inf")
    scaler.unscale_(optimizer)
    optimizer.first_step(zero_grad=True)  # no synchronisation: the decision comes later
    scaler.scale(F.mse_loss(model(x), y)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipping on overflow is routine with a scaler
        optimizer.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    _assert_bit_equal(_weights(model), init)
    assert scaler.get_scale() == 512.0


def test_nan_gradient_before_second_step_skips_the_base_step_and_training_goes_on():
    torch.manual_seed(17)
    model = _mlp()
    x, y = _data()
    init = _weights(model)
    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    F.mse_loss(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    assert _max_diff(_weights(model), init) > 1e-3
    F.mse_loss(model(x), y).backward()
    with torch.no_grad():
        model[0].weight.grad[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="second_step"):
        optimizer.second_step(zero_grad=True)
    _assert_bit_equal(_weights(model), init)
    assert not optimizer.perturbed
    assert not optimizer.base_optimizer.state  # no momentum buffer was created

    # the next step is an ordinary first SAM step from w (momentum SGD starts as plain SGD)
    expected = _sam_sgd_reference(model, _mse_at(model, x, y), rho=0.1, lr=0.1)
    _train_two_call(model, optimizer, [(x, y)])
    for a, e in zip(_weights(model), expected, strict=True):
        torch.testing.assert_close(a, e)
    assert _max_diff(_weights(model), init) > 1e-3


# --------------------------------------------------------------------------- 8. closure + BN
def test_closure_with_freeze_running_stats_matches_the_two_call_style():
    torch.manual_seed(18)
    closure_model = _Net()
    two_call_model = copy.deepcopy(closure_model)
    batches = [_net_data() for _ in range(3)]
    closure_opt = SAM(closure_model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    two_call_opt = SAM(two_call_model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)

    for x, y in batches:
        # independent expectation: one ordinary forward pass at the weights before the step
        single_pass = copy.deepcopy(closure_model)
        single_pass(x)
        expected_stats = _stats(single_pass)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            closure_opt.zero_grad()
            with freeze_running_stats(closure_model, enabled=closure_opt.perturbed):
                loss = F.mse_loss(closure_model(x), y)
            loss.backward()
            return loss

        loss = closure_opt.step(closure)
        _assert_stats_equal(_stats(closure_model), expected_stats)

        first_loss = F.mse_loss(two_call_model(x), y)
        first_loss.backward()
        two_call_opt.first_step(zero_grad=True)
        with freeze_running_stats(two_call_model):
            F.mse_loss(two_call_model(x), y).backward()
        two_call_opt.second_step(zero_grad=True)
        assert torch.equal(loss, first_loss)

    for (name, a), b in zip(
        closure_model.state_dict().items(), two_call_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    tracked = [v for k, v in _stats(closure_model).items() if k.endswith("num_batches_tracked")]
    assert [int(t) for t in tracked] == [len(batches)] * 2
