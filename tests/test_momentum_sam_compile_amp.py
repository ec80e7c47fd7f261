"""MomentumSAM with a ``torch.compile``-d model and with mixed precision (CPU).

* ``torch.compile`` (backend ``"aot_eager"``, to keep the test fast on CPU): the compiled model
  trains as the eager one does, and the in-place moves of the weights between ``w~`` and ``w``
  (each step, and ``eval()``/``train()``) do not recompile it.
* bfloat16 autocast, and float16 autocast with the ``torch.amp.GradScaler`` recipe (unscale,
  then ``scaler.step(optimizer)``): the loop records, at every step, the weights at which the
  gradient was taken and the (unscaled) gradient the optimizer receives; a float32
  transcription of the authors' SGD rule (weight decay at the perturbed point) fed the same
  gradients must produce the same weights. Autocast changes only the gradients; the update is
  the rule's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import torchsam

LR, MOMENTUM, DECAY, RHO, STEPS = 0.1, 0.9, 0.01, 0.5, 6


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def momentum_sam(model: nn.Module) -> torchsam.MomentumSAM:
    return torchsam.MomentumSAM(
        model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM, weight_decay=DECAY
    )


def _weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- torch.compile
def test_compiled_model_trains_like_the_eager_one_without_recompiling() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of earlier tests' graphs
    eager, compiled_model = make_model(), make_model()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    runs = []
    for model, forward in ((eager, eager), (compiled_model, compiled)):
        opt = momentum_sam(model)
        for t in range(STEPS):
            x, y = batch(t)
            opt.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
            if t == 2:  # an evaluation at w in the middle, as a training loop would
                opt.eval()
                with torch.no_grad():
                    forward(x)
                opt.train()
        opt.eval()
        runs.append(_weights(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], _weights(make_model()), strict=True))
    # one graph for training (with its backward) and one under no_grad: the weights moving in
    # place between w~ and w did not recompile anything
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


# --------------------------------------------------------------------------- mixed precision
def transcription(
    w0: list[Tensor], grads: list[list[Tensor]]
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """The authors' SGD rule fed the recorded gradients: the weights w~ at which each
    gradient is taken, and the final w."""
    tilde = [p.clone() for p in w0]
    v = [torch.zeros_like(p) for p in w0]
    inv, at = 0.0, []
    for g in grads:
        at.append([p.clone() for p in tilde])
        w = [p + RHO * inv * vi for p, vi in zip(tilde, v, strict=True)]
        v = [MOMENTUM * vi + gi + DECAY * p for vi, gi, p in zip(v, g, tilde, strict=True)]
        w = [wi - LR * vi for wi, vi in zip(w, v, strict=True)]
        inv = 1 / (math.sqrt(sum(float((vi.double() ** 2).sum()) for vi in v)) + 1e-12)
        tilde = [wi - RHO * inv * vi for wi, vi in zip(w, v, strict=True)]
    return at, [p + RHO * inv * vi for p, vi in zip(tilde, v, strict=True)]


@pytest.mark.parametrize("recipe", ["bf16", "fp16+GradScaler"])
def test_autocast_changes_only_the_gradients(recipe: str) -> None:
    if recipe == "fp16+GradScaler":
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                pass
        except RuntimeError:
            pytest.skip("this torch has no float16 autocast on CPU")
    dtype = torch.bfloat16 if recipe == "bf16" else torch.float16
    model = make_model()
    w0 = _weights(model)
    opt = momentum_sam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, enabled=recipe != "bf16")
    seen, grads = [], []
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        assert loss.dtype == torch.float32  # cross_entropy runs in float32 under autocast
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # the recipe's unscale (where clipping would go)
        seen.append(_weights(model))
        grads.append([p.grad.clone() for p in model.parameters()])
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[-1])
        scaler.step(opt)
        scaler.update()
    opt.eval()
    at, w = transcription(w0, grads)
    for step, (got, want) in enumerate(zip(seen, at, strict=True)):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    for a, b in zip(_weights(model), w, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the half-precision forward did change the gradients (the test is not vacuous)
    x, y = batch(0)
    reference = make_model()
    nn.functional.cross_entropy(reference(x), y).backward()
    assert not torch.equal(next(reference.parameters()).grad, grads[0][0])
