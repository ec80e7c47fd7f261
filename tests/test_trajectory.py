"""SAF and MESA (Du et al., NeurIPS 2022) against transcriptions of their equations.

The trajectory term ``lam · tau² · mean_i Σ_c p_ref log(p_ref / p)`` is written out by hand in
float64; SAF's reference must be the logits recorded exactly ``delay`` epochs earlier, MESA's the
eval-mode output of ``ema = decay · ema + (1 - decay) · w``. Both must resume bit-exactly from a
state dict and cost no second forward pass of the model.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsam import MESA, SAF, trajectory_kl


# --------------------------------------------------------------------------- answer key
def softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def term_by_hand(
    z: torch.Tensor,
    z_ref: torch.Tensor,
    tau: float,
    lam: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """lam · tau² · (1/B) Σ_i valid_i Σ_c p_ref,ic (log p_ref,ic − log p_ic), in float64."""
    p = softmax_by_hand(z.detach().double() / tau)
    p_ref = softmax_by_hand(z_ref.detach().double() / tau)
    kl = (p_ref * (torch.log(p_ref) - torch.log(p))).sum(dim=1)
    if valid is not None:
        kl = kl * valid.double()
    return lam * tau**2 * kl.sum() / z.shape[0]


def grad_by_hand(
    z: torch.Tensor,
    z_ref: torch.Tensor,
    tau: float,
    lam: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """d/dz of ``term_by_hand``: lam · tau · (p − p_ref) / B per valid row."""
    p = softmax_by_hand(z.detach().double() / tau)
    p_ref = softmax_by_hand(z_ref.detach().double() / tau)
    g = lam * tau * (p - p_ref) / z.shape[0]
    if valid is not None:
        g = g * valid.double().unsqueeze(1)
    return g


def ema_by_hand(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """Average the entries of ``model.state_dict()`` that ``ema`` holds."""
    for name, w in model.state_dict().items():
        if name in ema:
            ema[name] = decay * ema[name] + (1 - decay) * w.detach()


class Net(nn.Module):
    """An MLP with BatchNorm and dropout, so train and eval outputs differ."""

    def __init__(self, features: int = 6, classes: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.l1 = nn.Linear(features, 16, dtype=torch.float64)
        self.bn = nn.BatchNorm1d(16, dtype=torch.float64)
        self.drop = nn.Dropout(dropout)
        self.l2 = nn.Linear(16, classes, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(torch.relu(self.bn(self.l1(x)))))


def serialise(module: nn.Module) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


# --------------------------------------------------------------------------- the KL term
@pytest.mark.parametrize("tau", [0.5, 1.0, 5.0])
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (32, 10)])
def test_trajectory_kl_matches_transcription(tau: float, shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    z_ref = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    got = trajectory_kl(z, z_ref, tau=tau)
    torch.testing.assert_close(got, term_by_hand(z, z_ref, tau), rtol=1e-12, atol=1e-14)
    assert got.dim() == 0
    # zero against itself, positive otherwise
    assert trajectory_kl(z, z, tau=tau).abs().item() < 1e-12
    assert got.item() > 0


def test_trajectory_kl_half_precision_is_computed_in_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    z_ref = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    got = trajectory_kl(z.bfloat16(), z_ref.bfloat16(), tau=2.0)
    assert got.dtype == torch.float32
    want = term_by_hand(z.bfloat16(), z_ref.bfloat16(), 2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_gradient_flows_into_current_logits_only() -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    z_ref = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_z, grad_ref = torch.autograd.grad(
        trajectory_kl(z, z_ref, tau=3.0), [z, z_ref], allow_unused=True
    )
    assert grad_ref is None
    torch.testing.assert_close(grad_z, grad_by_hand(z, z_ref, 3.0), rtol=1e-10, atol=1e-14)


def test_mesa_gradient_never_reaches_the_ema() -> None:
    torch.manual_seed(0)
    model = Net()
    mesa = MESA(model, start_epoch=0)
    x = torch.randn(8, 6, dtype=torch.float64)
    logits = model(x)
    mesa(logits, x, epoch=0).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in mesa.ema.parameters())


# --------------------------------------------------------------------------- SAF
NUM_SAMPLES, NUM_CLASSES, DELAY, START, LAM, TAU = 6, 4, 2, 3, 0.7, 2.0
EPOCHS = 8
# Sample 5 is not seen in epoch 1, so it has no reference in epoch 3. Samples 5 and 2 are not
# seen in epoch 4, so in epoch 6 their ring slot (4 ≡ 1 mod 3) still holds epoch 1's logits:
# a stale slot must not count as a reference.
SKIPPED = {(1, 5), (4, 5), (4, 2)}


def saf_table() -> torch.Tensor:
    """The logits 'the model' gives sample i in epoch e: table[e, i]."""
    gen = torch.Generator().manual_seed(3)
    return 2 * torch.randn(EPOCHS, NUM_SAMPLES, NUM_CLASSES, generator=gen, dtype=torch.float64)


def saf_batches(epoch: int) -> list[list[int]]:
    """Two batches per epoch in an epoch-dependent order, skipping SKIPPED."""
    order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(epoch)).tolist()
    seen = [i for i in order if (epoch, i) not in SKIPPED]
    return [seen[:3], seen[3:]]


def test_saf_reference_is_the_logits_recorded_delay_epochs_earlier() -> None:
    table = saf_table()
    saf = SAF(NUM_SAMPLES, NUM_CLASSES, lam=LAM, tau=TAU, delay=DELAY, start_epoch=START)
    saf.double()
    active_terms = 0
    for epoch in range(EPOCHS):
        for batch in saf_batches(epoch):
            index = torch.tensor(batch)
            logits = table[epoch, index].clone().requires_grad_()
            term = saf(logits, index, epoch)
            assert term.dim() == 0
            if epoch < START:
                # inactive: a constant exactly 0, no graph
                assert term.item() == 0.0
                assert term.grad_fn is None
                continue
            past = epoch - DELAY
            valid = torch.tensor([(past, i) not in SKIPPED for i in batch])
            z_ref = table[past, index]
            want = term_by_hand(logits, z_ref, TAU, LAM, valid)
            torch.testing.assert_close(term.double(), want, rtol=1e-12, atol=1e-15)
            (grad,) = torch.autograd.grad(term, logits)
            torch.testing.assert_close(
                grad, grad_by_hand(logits, z_ref, TAU, LAM, valid), rtol=1e-10, atol=1e-15
            )
            # rows without a reference get exactly no gradient
            assert torch.equal(grad[~valid], torch.zeros_like(grad[~valid]))
            active_terms += int(valid.any())
            assert term.item() > 0 or not valid.any()
    assert active_terms >= 8


def test_saf_inactive_before_the_reference_exists() -> None:
    saf = SAF(4, 3, delay=3, start_epoch=0)
    x = torch.randn(4, 3)
    index = torch.arange(4)
    for epoch in range(3):
        logits = x.clone().requires_grad_()
        term = saf(logits, index, epoch)
        assert term.item() == 0.0
        assert term.grad_fn is None
        y = torch.tensor([0, 1, 2, 0])
        (with_term,) = torch.autograd.grad(F.cross_entropy(logits, y) + term, logits)
        (without,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
        assert torch.equal(with_term, without)
    assert saf(2 * x, index, 3).item() > 0  # (x + 1 would give the same softmax)


def test_saf_stale_non_finite_slot_cannot_reach_the_term() -> None:
    saf = SAF(2, 3, delay=1, start_epoch=3)
    both, one = torch.tensor([0, 1]), torch.tensor([1])
    saf(torch.tensor([[float("nan"), 0.0, float("inf")], [0.0, 1.0, 2.0]]), both, 0)
    saf(torch.randn(2, 3), both, 1)
    saf(torch.randn(1, 3), one, 2)  # sample 0 skipped: its slot still holds epoch 0's values
    logits = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    term = saf(logits, both, 3)
    (grad,) = torch.autograd.grad(term, logits)
    valid = torch.tensor([False, True])
    z_ref = torch.cat([torch.zeros(1, 3), saf.history[1:, 0]]).double()
    torch.testing.assert_close(term.double(), term_by_hand(logits, z_ref, 5.0, 0.3, valid))
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[0], torch.zeros(3, dtype=torch.float64))


def test_saf_records_detached_logits_in_the_ring() -> None:
    saf = SAF(5, 2, delay=1, start_epoch=0)
    logits = torch.randn(2, 2, requires_grad=True)
    saf(logits, torch.tensor([4, 1]), epoch=3)
    assert not saf.history.requires_grad
    assert torch.equal(saf.history[[4, 1], 1], logits.detach())
    assert saf.history_epoch[:, 1].tolist() == [-1, 3, -1, -1, 3]
    assert (saf.history_epoch[:, 0] == -1).all()
    assert saf.history.shape == (5, 2, 2)


def run_saf(saf: SAF, table: torch.Tensor, epochs: range) -> list[torch.Tensor]:
    terms = []
    for epoch in epochs:
        for batch in saf_batches(epoch):
            index = torch.tensor(batch)
            terms.append(saf(table[epoch, index].float(), index, epoch))
    return terms


def test_saf_state_dict_resumes_bit_exactly() -> None:
    table = saf_table()
    kw: dict[str, Any] = dict(lam=LAM, tau=TAU, delay=DELAY, start_epoch=START)
    straight = SAF(NUM_SAMPLES, NUM_CLASSES, **kw)
    first = run_saf(straight, table, range(5))
    state = serialise(straight)
    rest = run_saf(straight, table, range(5, EPOCHS))

    resumed = SAF(NUM_SAMPLES, NUM_CLASSES, **kw)
    resumed.load_state_dict(state)
    again = run_saf(resumed, table, range(5, EPOCHS))
    assert len(again) == len(rest)
    for a, b in zip(again, rest, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resumed.history, straight.history)
    assert torch.equal(resumed.history_epoch, straight.history_epoch)
    assert any(t.item() > 0 for t in rest)
    assert any(t.item() > 0 for t in first)

    # without the state the terms differ: the test above can fail
    fresh = run_saf(SAF(NUM_SAMPLES, NUM_CLASSES, **kw), table, range(5, EPOCHS))
    assert any(not torch.equal(a, b) for a, b in zip(fresh, rest, strict=True))
    # a different ring size does not load
    with pytest.raises(RuntimeError, match="size mismatch"):
        SAF(NUM_SAMPLES, NUM_CLASSES, delay=DELAY + 1).load_state_dict(state)


# --------------------------------------------------------------------------- MESA
@pytest.mark.parametrize("average_buffers", [True, False])
def test_mesa_ema_update_matches_transcription(average_buffers: bool) -> None:
    # The authors (timm's ModelEmaV2) average the whole state_dict, BatchNorm statistics too.
    torch.manual_seed(4)
    model = Net()
    decay = 0.9
    mesa = MESA(model, decay=decay, average_buffers=average_buffers)
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema_buffers = {name: b.clone() for name, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(5):
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mesa.update(model)
        ema_by_hand(ema, model, decay)
        for name, p in mesa.ema.named_parameters():
            torch.testing.assert_close(p, ema[name], rtol=1e-13, atol=1e-15)
            assert not p.requires_grad
        for (name, b), (_, src) in zip(
            mesa.ema.named_buffers(), model.named_buffers(), strict=True
        ):
            if average_buffers and b.is_floating_point():
                ema_buffers[name] = decay * ema_buffers[name] + (1 - decay) * src
                torch.testing.assert_close(b, ema_buffers[name], rtol=1e-13, atol=1e-15)
                assert not torch.equal(b, src), name
            else:  # integer buffers (num_batches_tracked) are copied
                assert torch.equal(b, src), name
            assert b.data_ptr() != src.data_ptr()
    # the average lags behind the weights: it is not a copy
    assert not torch.equal(mesa.ema.l1.weight, model.l1.weight)
    assert mesa.ema.bn.num_batches_tracked.item() == 5


def test_mesa_exposes_no_trainable_parameters() -> None:
    model = Net()
    mesa = MESA(model)
    assert all(not p.requires_grad for p in mesa.parameters())
    ids = {id(p) for p in model.parameters()}
    assert not ids & {id(p) for p in mesa.parameters()}
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("ema_train_mode", [False, True])
def test_mesa_term_uses_the_ema_model_output(ema_train_mode: bool) -> None:
    torch.manual_seed(5)
    model = Net(dropout=0.0)
    decay, lam, tau = 0.8, 0.5, 3.0
    mesa = MESA(model, decay=decay, lam=lam, tau=tau, start_epoch=2, ema_train_mode=ema_train_mode)
    # the weights and the BatchNorm statistics are averaged (num_batches_tracked is copied)
    ema = {name: t.clone() for name, t in model.state_dict().items() if t.is_floating_point()}
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(4):
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mesa.update(model)
        ema_by_hand(ema, model, decay)
    mesa.train()  # must not switch the EMA's mode
    assert mesa.ema.training is ema_train_mode

    # the reference model: the hand-made average
    reference = copy.deepcopy(model)
    reference.load_state_dict({**model.state_dict(), **ema})
    reference.train(ema_train_mode)
    x = torch.randn(16, 6, dtype=torch.float64)
    with torch.no_grad():
        z_ref = reference(x)
        other_mode = copy.deepcopy(reference).train(not ema_train_mode)(x)
    assert not torch.allclose(z_ref, other_mode)
    logits = model(x)
    running_mean = mesa.ema.bn.running_mean.clone()

    assert mesa(logits, x, epoch=1).item() == 0.0  # before start_epoch
    term = mesa(logits, x, epoch=2)
    torch.testing.assert_close(term, term_by_hand(logits, z_ref, tau, lam), rtol=1e-10, atol=1e-14)
    (grad,) = torch.autograd.grad(term, logits)
    torch.testing.assert_close(grad, grad_by_hand(logits, z_ref, tau, lam), rtol=1e-8, atol=1e-14)
    # in eval mode the EMA forward leaves its statistics alone
    assert torch.equal(mesa.ema.bn.running_mean, running_mean) is (not ema_train_mode)


def test_mesa_state_dict_round_trip() -> None:
    torch.manual_seed(6)
    model = Net()
    mesa = MESA(model, decay=0.7, start_epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mesa.update(model)
    state = serialise(mesa)
    resumed = MESA(Net(), decay=0.7, start_epoch=0)
    resumed.load_state_dict(state)
    for a, b in zip(resumed.state_dict().values(), mesa.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in resumed.parameters())
    assert resumed.ema.training is False
    x = torch.randn(16, 6, dtype=torch.float64)
    logits = model(x).detach()
    assert torch.equal(resumed(logits, x, 0), mesa(logits, x, 0))
    mesa.update(model)
    resumed.update(model)
    assert torch.equal(resumed(logits, x, 0), mesa(logits, x, 0))


def test_mesa_unwraps_data_parallel() -> None:
    model = Net()
    mesa = MESA(nn.DataParallel(model), decay=0.5)
    assert not any(key.startswith("module.") for key in mesa.ema.state_dict())
    with torch.no_grad():
        model.l1.weight.add_(1.0)
    before = mesa.ema.l1.weight.clone()
    mesa.update(nn.DataParallel(model))
    torch.testing.assert_close(mesa.ema.l1.weight, 0.5 * before + 0.5 * model.l1.weight)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 4, (16,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_mesa_update_follows_tensors_replaced_after_the_first_call() -> None:
    # update() keeps its pairing of the model's tensors with the EMA's between calls; a cast
    # (parameters keep their objects and change their data, buffers are new objects) must not
    # leave it averaging stale tensors.
    torch.manual_seed(7)
    model = Net()
    mesa = MESA(model, decay=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ema = {n: t.clone() for n, t in model.state_dict().items() if t.is_floating_point()}
    for _ in range(2):
        _train_step(model, opt, torch.float64)
        mesa.update(model)
        ema_by_hand(ema, model, 0.6)
    model.float()
    mesa.float()
    ema = {n: t.float() for n, t in ema.items()}
    for _ in range(2):
        _train_step(model, opt, torch.float32)
        mesa.update(model)
        ema_by_hand(ema, model, 0.6)
    state = mesa.ema.state_dict()
    for name, expected in ema.items():
        torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6)
        assert state[name].dtype == torch.float32
    assert mesa.ema.bn.num_batches_tracked.item() == 4

    # without buffers the same parameter objects stay, only their data changes
    linear = nn.Linear(6, 4, dtype=torch.float64)
    mesa = MESA(linear, decay=0.5)
    mesa.update(linear)
    linear.float()
    mesa.float()
    with torch.no_grad():
        linear.weight.add_(1.0)
    before = mesa.ema.weight.clone()
    mesa.update(linear)
    torch.testing.assert_close(mesa.ema.weight, 0.5 * before + 0.5 * linear.weight)


def test_mesa_update_averages_a_source_of_another_dtype() -> None:
    model = Net()
    mesa = MESA(model, decay=0.5)
    model.float()  # the EMA stays float64
    with torch.no_grad():
        model.l1.weight.add_(1.0)
    before = mesa.ema.l1.weight.clone()
    mesa.update(model)
    expected = 0.5 * before + 0.5 * model.l1.weight.double()
    torch.testing.assert_close(mesa.ema.l1.weight, expected)
    assert mesa.ema.l1.weight.dtype == torch.float64


def test_mesa_copy_steps_like_the_original() -> None:
    torch.manual_seed(8)
    model = Net()
    mesa = MESA(model, decay=0.7, start_epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    _train_step(model, opt, torch.float64)
    mesa.update(model)  # the pairing is made here
    twin = copy.deepcopy(mesa)
    assert twin._update_plan is None  # a copy holds no reference to the model's tensors
    _train_step(model, opt, torch.float64)
    mesa.update(model)
    twin.update(model)
    for a, b in zip(mesa.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_mesa_reference_forward_runs_without_autograd() -> None:
    model = Net(dropout=0.0)
    mesa = MESA(model, start_epoch=0)
    modes: list[tuple[bool, bool]] = []
    mesa.ema.register_forward_pre_hook(
        lambda *_: modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
    )
    x = torch.randn(8, 6, dtype=torch.float64)
    logits = model(x)
    term = mesa(logits, x, 0)
    assert modes == [(False, True)]
    term.backward()  # the reference is saved for backward: it must not be an inference tensor
    assert model.l1.weight.grad is not None


# --------------------------------------------------------------------------- errors
def _saf_call(**kw: Any) -> Callable[[], Any]:
    args: dict[str, Any] = dict(logits=torch.randn(3, 4), indices=torch.arange(3), epoch=0)
    args.update(kw)
    return lambda: SAF(5, 4)(args["logits"], args["indices"], args["epoch"])


ERRORS: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (lambda: SAF(5, 4, lam=-0.1), ValueError, "Invalid lam value: -0.1"),
    (lambda: SAF(5, 4, lam=float("inf")), ValueError, "Invalid lam value"),
    (lambda: SAF(5, 4, lam=float("nan")), ValueError, "Invalid lam value"),
    (lambda: SAF(5, 4, tau=0.0), ValueError, "Invalid tau value: 0.0"),
    (lambda: SAF(5, 4, tau=float("inf")), ValueError, "Invalid tau value"),
    (lambda: SAF(5, 4, delay=0), ValueError, "Invalid delay value: 0"),
    (lambda: SAF(5, 4, delay=1.5), TypeError, "delay must be an int"),
    (lambda: SAF(5, 4, start_epoch=-1), ValueError, "Invalid start_epoch value: -1"),
    (lambda: SAF(0, 4), ValueError, "Invalid num_samples value: 0"),
    (lambda: SAF(5, 0), ValueError, "Invalid num_classes value: 0"),
    (lambda: SAF(5, 4, dtype=torch.int64), TypeError, "dtype must be a floating-point"),
    (_saf_call(logits=torch.randn(3, 5)), ValueError, r"logits must have shape \[batch, 4\]"),
    (_saf_call(logits=torch.randn(3)), ValueError, r"logits must have shape \[batch, num_classes"),
    (_saf_call(logits=torch.randn(0, 4)), ValueError, "batch >= 1"),
    (_saf_call(logits=torch.ones(3, 4, dtype=torch.int64)), TypeError, "floating-point"),
    (_saf_call(logits=[[0.0] * 4] * 3), TypeError, "logits must be a Tensor"),
    (_saf_call(indices=torch.arange(3.0)), TypeError, "indices must be an integer tensor"),
    (_saf_call(indices=torch.ones(3, dtype=torch.bool)), TypeError, "integer tensor"),
    (_saf_call(indices=[0, 1, 2]), TypeError, "indices must be a Tensor"),
    (_saf_call(indices=torch.arange(4)), ValueError, r"indices must have shape \[3\]"),
    (_saf_call(indices=torch.arange(3).view(3, 1)), ValueError, r"must have shape \[3\]"),
    (_saf_call(indices=torch.tensor([0, 1, 5])), ValueError, r"must lie in \[0, 5\)"),
    (_saf_call(indices=torch.tensor([-1, 0, 1])), ValueError, r"must lie in \[0, 5\)"),
    (_saf_call(indices=torch.tensor([1, 1, 2])), ValueError, "must not repeat"),
    (_saf_call(epoch=-1), ValueError, "Invalid epoch value: -1"),
    (_saf_call(epoch=1.0), TypeError, "epoch must be an int"),
    (_saf_call(epoch=True), TypeError, "epoch must be an int"),
    (lambda: MESA(Net(), decay=1.5), ValueError, "Invalid decay value: 1.5"),
    (lambda: MESA(Net(), decay=-0.1), ValueError, "Invalid decay value"),
    (lambda: MESA(Net(), lam=-1.0), ValueError, "Invalid lam value"),
    (lambda: MESA(Net(), tau=-1.0), ValueError, "Invalid tau value"),
    (lambda: MESA(lambda x: x), TypeError, "model must be an nn.Module"),
    (lambda: MESA(Net()).update(nn.Linear(6, 4)), ValueError, "parameters differ in names"),
    (lambda: MESA(Net()).update(Net(features=5)), ValueError, r"l1.weight has shape \(16, 5\)"),
    (lambda: MESA(Net()).update("model"), TypeError, "model must be an nn.Module"),
    (
        lambda: MESA(Net(classes=3), start_epoch=0)(
            torch.randn(4, 4), torch.randn(4, 6).double(), 0
        ),
        ValueError,
        "EMA model's output must have the shape of logits",
    ),
    (lambda: trajectory_kl(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "reference must"),
    (lambda: trajectory_kl(torch.randn(2, 3), torch.randn(2, 3), tau=0), ValueError, "tau"),
]


@pytest.mark.parametrize(("call", "error", "message"), ERRORS)
def test_errors(call: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- end to end
class CountingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def blobs(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    y = torch.arange(n) % 3
    centres = 2 * torch.randn(3, 8, generator=gen)
    return centres[y] + torch.randn(n, 8, generator=gen), y


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("method", ["saf", "mesa", "none"])
def test_end_to_end_one_forward_per_step(method: str) -> None:
    x, y = blobs()
    torch.manual_seed(8)
    model = CountingMLP()
    initial = F.cross_entropy(model(x), y).item()
    saf = SAF(len(x), 3, delay=1, start_epoch=2)
    mesa = MESA(model, decay=0.9, start_epoch=2)  # before the hook: deepcopy copies hooks
    model_calls, ema_calls = count_calls(model), count_calls(mesa.ema)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = active_steps = 0
    terms = []
    for epoch in range(6):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for index in order.split(16):
            logits = model(x[index])
            if method == "saf":
                term = saf(logits, index, epoch)
            elif method == "mesa":
                term = mesa(logits, x[index], epoch)
            else:
                term = logits.new_zeros(())
            loss = F.cross_entropy(logits, y[index]) + term
            opt.zero_grad()
            loss.backward()
            opt.step()
            mesa.update(model)
            steps += 1
            active_steps += epoch >= 2
            terms.append(term.item())
            assert model_calls[0] == steps  # never a second pass of the model
            assert ema_calls[0] == (active_steps if method == "mesa" else 0)
    assert steps == 36
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.5 * initial
    if method != "none":
        assert all(t == 0.0 for t in terms[:12])
        assert all(t > 0.0 for t in terms[12:])
        assert mesa.ema.training is False


# --------------------------------------------------------------------------- host synchronisations
def saf_and_mesa_loop(
    device: str, place: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[[], None]:
    """A training loop with SAF (delay 1, active from epoch 1) and MESA on ``device``, built
    now and run by the returned function: two epochs of two batches of forward, backward,
    optimizer step and EMA update. ``place`` puts each batch's indices where SAF gets them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).to(device)
    saf = SAF(12, 4, delay=1, start_epoch=1).to(device)
    mesa = MESA(model, decay=0.9, start_epoch=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(12, 6, device=device)
    batches = [(place(rows), rows.to(device)) for rows in torch.arange(12).split(6)]

    def run() -> None:
        for epoch in range(2):
            for index, rows in batches:
                logits = model(x[rows])
                term = saf(logits, index, epoch) + mesa(logits, x[rows], epoch)
                opt.zero_grad()
                (logits.square().mean() + term).backward()
                opt.step()
                mesa.update(model)

    return run


def test_saf_and_mesa_take_no_host_synchronisation_on_the_cpu() -> None:
    """Counted as the optimizer benchmarks count them: no operator that brings a value to the
    host (``item``, ``nonzero``, a device-to-host copy). CPU indices are read where they are,
    on the host, which is no synchronisation; the device path is checked on ``meta`` below."""
    from torchsam.experiments._dispatch_count import DispatchCounter

    run = saf_and_mesa_loop("cpu", lambda index: index)
    with DispatchCounter() as counter:
        run()
    assert counter.ops > 0
    assert counter.syncs == 0, counter.sync_ops


def test_saf_on_an_accelerator_checks_indices_without_reading_them() -> None:
    """On the ``meta`` device no value exists, so any read on the host raises: a whole SAF
    call (active term, record, backward) on meta tensors proves that the indices are checked on
    the device (one ``_assert_async``), never brought to the host."""
    from torchsam.experiments._dispatch_count import DispatchCounter

    saf = SAF(10, 4, delay=1, start_epoch=1).to("meta")
    with DispatchCounter() as counter:
        for epoch in range(2):
            logits = torch.randn(5, 4, device="meta", requires_grad=True)
            term = saf(logits, torch.arange(5, device="meta"), epoch)
    term.backward()
    assert term.device.type == "meta"
    assert logits.grad is not None
    assert counter.syncs == 0, counter.sync_ops
    assert counter.by_op["aten._assert_async.msg"] == 2


@pytest.mark.parametrize(
    ("values", "ok"),
    [
        ([0, 3, 9], True),
        ([4], True),
        ([9, 0, 5, 1], True),
        ([0, 10, 2], False),
        ([-1, 2, 3], False),
        ([2, 7, 2], False),
        ([5, 5], False),
    ],
)
def test_the_device_side_index_check(values: list[int], ok: bool) -> None:
    """The check that indices on an accelerator get, run on the CPU (where ``_assert_async``
    raises at once): range and repeats, as the host check."""
    from torchsam._trajectory import _assert_indices_async

    index = torch.tensor(values)
    if ok:
        _assert_indices_async(index, 10)
    else:
        with pytest.raises(RuntimeError, match=r"SAF: indices must lie in \[0, 10\) and not"):
            _assert_indices_async(index, 10)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


PLACES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cuda": lambda index: index.cuda(),
    "cpu": lambda index: index,
    "pinned": lambda index: index.pin_memory(),
}


@cuda
@pytest.mark.parametrize("indices_on", list(PLACES))
def test_saf_and_mesa_on_cuda_never_synchronise(indices_on: str) -> None:
    """With CUDA's sync debug mode set to "error" any synchronising call raises."""
    run = saf_and_mesa_loop("cuda", PLACES[indices_on])
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@cuda
def test_saf_on_cuda_equals_the_cpu_in_float64() -> None:
    """The same calls on CUDA and on the CPU, in float64: the same terms and records."""
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        saf = SAF(20, 5, delay=1, start_epoch=1, dtype=torch.float64).to(device)
        terms = []
        for epoch in range(3):
            for index in torch.randperm(20, generator=torch.Generator().manual_seed(epoch)).split(
                8
            ):
                logits = torch.randn(len(index), 5, dtype=torch.float64).to(device)
                terms.append(saf(logits, index.to(device), epoch).cpu())
        results.append((torch.stack(terms), saf.history.cpu(), saf.history_epoch.cpu()))
    (cpu_terms, cpu_history, cpu_epochs), (gpu_terms, gpu_history, gpu_epochs) = results
    torch.testing.assert_close(gpu_terms, cpu_terms, rtol=1e-12, atol=1e-15)
    assert torch.equal(gpu_history, cpu_history)
    assert torch.equal(gpu_epochs, cpu_epochs)
