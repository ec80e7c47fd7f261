"""Host synchronisations per step of the training loop of ``train()``, counted on the CPU.

Between two calls of ``on_step`` the loop builds a batch (indexing, augmentation,
normalisation), takes the method's step, adds the loss to the epoch's sum on the device and
steps the learning-rate schedule. None of that may bring a value to the host: on a GPU each
synchronisation empties the launch queue. The only one allowed is the optimizer's own (SAM's
guard against a non-finite gradient: 1; with ``skip_nonfinite=False``: 0). The epoch's mean
loss is read once, at the end of the epoch.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from torch import Tensor

from tests._cifar_runs import one_thread_fixture, split_fixture, tiny_resnet
from torchsam.experiments import train
from torchsam.experiments._dispatch_count import DispatchCounter
from torchsam.experiments.data import Split

_one_thread = one_thread_fixture()


split = split_fixture()


_model = tiny_resnet


def syncs_per_step(split: Split, method: str, **kwargs: Any) -> list[int]:
    """Synchronisations between consecutive ``on_step`` calls of the same epoch (so the
    once-per-epoch work, evaluation and checkpoint are left out), over two epochs."""
    counter = DispatchCounter()
    marks: list[tuple[int, int]] = []

    def on_step(epoch: int, step: int, loss: Tensor) -> None:
        marks.append((epoch, counter.syncs))

    options: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 8,
        "seed": 1,
        "model_fn": _model,
        "augment": "cutout",
        "on_step": on_step,
    }
    with counter:
        train(method, split, **{**options, **kwargs})
    return [
        after - before
        for (epoch, before), (next_epoch, after) in pairwise(marks)
        if epoch == next_epoch
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sgd_steps_never_synchronise(split: Split, precision: str) -> None:
    counts = syncs_per_step(split, "sgd", precision=precision)
    assert len(counts) >= 4
    assert counts == [0] * len(counts)


def test_sam_steps_synchronise_only_in_the_optimizer_guard(split: Split) -> None:
    counts = syncs_per_step(split, "sam", rho=0.05)
    assert len(counts) >= 4
    assert counts == [1] * len(counts)
    counts = syncs_per_step(split, "sam", rho=0.05, skip_nonfinite=False)
    assert counts == [0] * len(counts)


def test_the_count_sees_a_synchronisation_in_the_loop(split: Split) -> None:
    """The measure can fail: a callback reading the loss every step is counted."""

    counter = DispatchCounter()
    marks: list[int] = []

    def on_step(epoch: int, step: int, loss: Tensor) -> None:
        loss.item()
        marks.append(counter.syncs)

    with counter:
        train("sgd", split, epochs=1, batch_size=8, model_fn=_model, on_step=on_step)
    assert [b - a for a, b in pairwise(marks)] == [1] * (len(marks) - 1)
