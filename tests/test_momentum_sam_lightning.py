"""MomentumSAM in PyTorch Lightning's automatic optimisation, against a plain loop.

Lightning calls ``optimizer.step(closure)``; MomentumSAM evaluates the closure once (one
forward/backward pass at the perturbed weights) and steps. The runs use the tiny float64 model,
data, scheduler and ``fit`` helper of ``tests/test_lightning.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import torchsam
import torchsam.lightning
from tests.test_lightning import (
    Lit,
    assert_same,
    closure_loop,
    fit,
    loss_fn,
    make_batches,
    make_model,
    scheduled,
)


def momentum_sam(params: Any) -> torch.optim.Optimizer:
    return torchsam.MomentumSAM(
        params, torch.optim.SGD, rho=0.5, lr=0.2, momentum=0.9, weight_decay=0.01
    )


def test_automatic_optimization_equals_the_closure_loop() -> None:
    lit = Lit(make_model(batchnorm=True), momentum_sam)
    fit(lit)
    ref = closure_loop(make_model(batchnorm=True), momentum_sam)
    assert lit.perturbed == [False] * len(make_batches())  # no two-pass phase, ever
    assert_same(lit.model, ref)


def test_accumulate_grad_batches_steps_with_the_summed_gradient() -> None:
    """Lightning runs the earlier micro-batches' backward outside ``step(closure)``; a one-pass
    optimizer steps with the accumulated gradient, as the base optimizer would."""
    lit = Lit(make_model(), momentum_sam)
    fit(lit, accumulate_grad_batches=2)
    ref = make_model()
    optimizer = momentum_sam(ref.parameters())
    scheduler = scheduled(optimizer)
    batches = make_batches()
    for first in range(0, len(batches), 2):
        optimizer.zero_grad()
        for x, y in batches[first : first + 2]:
            (loss_fn(ref(x), y) / 2).backward()
        optimizer.step()
        scheduler.step()
    assert_same(lit.model, ref, exact=False)


class EvaluatedAtW(Lit):
    """Validation at the weights w: ``optimizer.eval()`` before it, ``train()`` after, in the
    hooks docs/family.md names; it records the weights each validation sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, momentum_sam)
        self.seen: list[list[Tensor]] = []

    def on_validation_epoch_start(self) -> None:
        self.optimizers().optimizer.eval()

    def on_validation_epoch_end(self) -> None:
        self.optimizers().optimizer.train()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx == 0:
            self.seen.append([p.detach().clone() for p in self.model.parameters()])
        return loss_fn(self.model(batch[0]), batch[1])


def test_validation_hooks_evaluate_at_w_and_leave_training_unchanged() -> None:
    lit = EvaluatedAtW(make_model())
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        train = DataLoader(make_batches(), batch_size=None)
        trainer.fit(lit, train, DataLoader(make_batches()[:2], batch_size=None))
    plain = Lit(make_model(), momentum_sam)
    fit(plain, max_epochs=2)
    assert_same(lit.model, plain.model)  # validating changed nothing in training
    # each validation saw w: the weights of the plain run's optimizer in evaluation mode
    ref = make_model()
    optimizer = momentum_sam(ref.parameters())
    scheduler = scheduled(optimizer)
    expected = []
    for _ in range(2):
        for x, y in make_batches():
            optimizer.zero_grad()
            loss_fn(ref(x), y).backward()
            optimizer.step()
            scheduler.step()
        optimizer.eval()
        expected.append([p.detach().clone() for p in ref.parameters()])
        optimizer.train()
    assert len(lit.seen) == 2
    for seen, want in zip(lit.seen, expected, strict=True):
        for a, b in zip(seen, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_local_perturbation_refuses_it_with_the_reason() -> None:
    lit = Lit(make_model(), momentum_sam)
    with pytest.raises(ValueError, match="one forward/backward pass per step"):
        fit(lit, callbacks=[torchsam.lightning.LocalPerturbation()])
