"""Lightning's ``strategy="ddp"`` on two CPU processes (gloo), run by ``tests/test_lightning.py``.

``python tests/_lightning_ddp.py OUT_DIR`` starts rank 0; Lightning's launcher starts rank 1 by
running the same command again. Each rank trains on its half of every batch, in automatic
optimisation (SAM, gradient clipping, a per-step LR scheduler) and with the manual-optimisation
pattern (micro-batches accumulated inside the closure), each with both passes all-reduced and
with :class:`torchsam.lightning.LocalPerturbation`, and saves the final weights, the number
of gradient all-reduces and the number of steps skipped for a gradient that was not finite
(the optimizer's warnings) of each run to ``OUT_DIR/rank{r}.pt``. The test compares them with
one process on the whole batch (:func:`one_process`) and with the per-rank perturbation written
out (:func:`local_reference`). Two more local runs put a NaN, or an inf clipped by value, into
one rank's first gradient of the step :data:`NON_FINITE_STEP`: every rank must skip it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import torchsam
import torchsam.lightning
from torchsam.distributed import AllReduceCounter, count_all_reduces

WORLD, STEPS, LOCAL_BATCH, MICRO = 2, 3, 4, 2
CLIP = 0.05  # small enough to clip every gradient of this model
NON_FINITE_STEP = 1  # the step whose first gradient is not finite on one rank


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_batches() -> list[tuple[Tensor, Tensor]]:
    """One global batch (``WORLD * LOCAL_BATCH`` rows) per step."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(STEPS)
    ]


def make_optimizer(
    params: Any, every: int | None = None
) -> tuple[torchsam.SAM, torch.optim.lr_scheduler.LRScheduler]:
    """SAM, or IntermittentSAM with a SAM step every ``every`` steps."""
    if every is None:
        optimizer = torchsam.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    else:
        optimizer = torchsam.IntermittentSAM(
            params, torch.optim.SGD, rho=0.05, every=every, lr=0.1, momentum=0.9
        )
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def loss_fn(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


class Automatic(L.LightningModule):
    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        self.model = make_model()
        self.every = every
        self.counter = AllReduceCounter()

    def on_train_start(self) -> None:  # count the gradient all-reduces of this fit
        self.trainer.strategy.model.register_comm_hook(self.counter, count_all_reduces)  # type: ignore[union-attr]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return loss_fn(self.model(x), y)

    def configure_optimizers(self) -> Any:
        optimizer, scheduler = make_optimizer(self.parameters(), self.every)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class NonFinite(Automatic):
    """On step :data:`NON_FINITE_STEP`, rank ``rank``'s first (local) gradient has one entry
    ``value`` (NaN or inf); the other entries and the other ranks' gradients are finite."""

    def __init__(self, rank: int, value: float) -> None:
        super().__init__()
        self.rank, self.value = rank, value

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        first_pass = not self.optimizers().perturbed  # type: ignore[union-attr]
        if first_pass and batch_idx == NON_FINITE_STEP and self.global_rank == self.rank:
            bias = self.model.get_parameter("0.bias")
            loss = loss + bias[0] * self.value  # d loss / d bias[0] = value
        return loss


class Manual(Automatic):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers()
        chunks = list(zip(x.chunk(MICRO), y.chunk(MICRO), strict=True))

        def closure() -> Tensor:
            optimizer.zero_grad()
            total = torch.zeros((), dtype=x.dtype)
            for xb, yb in chunks:
                loss = loss_fn(self.model(xb), yb) * len(xb) / len(x)
                self.manual_backward(loss)
                total += loss.detach()
            self.clip_gradients(optimizer, gradient_clip_val=CLIP)
            return total

        loss = optimizer.step(closure=closure)
        self.lr_schedulers().step()  # type: ignore[union-attr]
        return loss


def local_reference(every: int = 1, skip: int | None = None) -> list[Tensor]:
    """Each rank perturbed with its own gradient, the gradients at the perturbed points
    averaged, written out for the two ranks in one process (the first gradient is not clipped:
    clipping by norm does not change the perturbation but for rounding). With ``every > 1``,
    only the steps ``0, every, 2 every, ...`` are perturbed; the others step with the gradient
    at ``w`` averaged over the ranks. Step ``skip`` is skipped (the scheduler still steps)."""
    model = make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.5)
    for step, (x, y) in enumerate(make_batches()):
        if step == skip:
            scheduler.step()
            continue
        rho = 0.05 if step % every == 0 else 0.0  # rho=0: the second pass is the first
        w = [p.detach().clone() for p in params]
        average = [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            g = torch.autograd.grad(loss_fn(model(x[part]), y[part]), params)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            with torch.no_grad():
                for p, gi in zip(params, g, strict=True):
                    p.add_(gi * rho / (norm + 1e-12))
            h = torch.autograd.grad(loss_fn(model(x[part]), y[part]), params)
            with torch.no_grad():
                for p, wi, a, hi in zip(params, w, average, h, strict=True):
                    p.copy_(wi)
                    a.add_(hi / WORLD)
        for p, a in zip(params, average, strict=True):
            p.grad = a
        nn.utils.clip_grad_norm_(params, CLIP)
        base.step()
        scheduler.step()
    return [p.detach() for p in params]


def one_process(clip: float | None = CLIP) -> list[Tensor]:
    """The weights of one process trained on the whole batches with the same steps."""
    model = make_model()
    optimizer, scheduler = make_optimizer(model.parameters())
    for x, y in make_batches():

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            return loss

        optimizer.step(closure)
        scheduler.step()
    return [p.detach() for p in model.parameters()]


def _fit(
    module: L.LightningModule,
    rank_batches: Callable[[int], list[Any]],
    local: bool,
    clip_algorithm: str = "norm",
) -> int:
    """Fit ``module``; return how many steps the optimizer skipped for a non-finite gradient."""
    callbacks: list[L.Callback] = [torchsam.lightning.SharpnessAwareCheck()]
    if local:
        callbacks.append(torchsam.lightning.LocalPerturbation())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_epochs=1,
        gradient_clip_val=CLIP if module.automatic_optimization else None,
        gradient_clip_algorithm=clip_algorithm,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    loader = DataLoader(rank_batches(int(os.environ.get("LOCAL_RANK", "0"))), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return sum("not finite (inf or NaN)" in str(w.message) for w in caught)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)

    def rank_batches(rank: int) -> list[tuple[Tensor, Tensor]]:
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        return [(x[part], y[part]) for x, y in make_batches()]

    results = {}
    for name, module, local, clip_algorithm in (
        ("automatic", Automatic(), False, "norm"),
        ("manual", Manual(), False, "norm"),
        ("local automatic", Automatic(), True, "norm"),
        ("local manual", Manual(), True, "norm"),
        ("local intermittent", Automatic(every=2), True, "norm"),
        ("local nan", NonFinite(rank=1, value=math.nan), True, "norm"),
        # clipping by value would turn this rank's inf into a finite number
        ("local inf clipped by value", NonFinite(rank=0, value=math.inf), True, "value"),
    ):
        skipped = _fit(module, rank_batches, local, clip_algorithm)
        weights = [p.detach().clone() for p in module.model.parameters()]
        results[name] = {
            "weights": weights,
            "all_reduces": module.counter.calls,
            "skipped": skipped,
        }
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # gloo's threads can abort a finished process at interpreter exit (SIGABRT, "terminate
    # called without an active exception"): tear the group down, then leave without teardown
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
