"""MomentumSAM in the Hugging Face ``Trainer``, against a plain loop.

The plain ``transformers.Trainer`` calls ``optimizer.step()`` after its backward passes (with
gradient accumulation and clipping in between): MomentumSAM is an ordinary one-pass optimizer
there. ``torchsam.huggingface.SAMTrainer``, which drives the two-pass step, refuses it. The
tiny float64 classifier, data and arguments are those of ``tests/test_huggingface.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
import transformers
from torch import nn

import torchsam
from tests.test_huggingface import DictDataset, N, assert_same_weights, make_model, train_args
from torchsam.huggingface import SAMTrainer


class InOrder(transformers.Trainer):
    """The samples in dataset order (the Trainer shuffles by default)."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        return torch.utils.data.SequentialSampler(self.train_dataset)


def momentum_sam(params: Any) -> torchsam.MomentumSAM:
    return torchsam.MomentumSAM(
        params, torch.optim.AdamW, rho=1.0, lr=0.05, weight_decay=0.1, betas=(0.9, 0.99)
    )


def plain_loop(
    model: nn.Module, steps: int, batch: int, micro_batches: int, max_grad_norm: float
) -> torchsam.MomentumSAM:
    data = DictDataset()
    optimizer = momentum_sam(model.parameters())
    for step in range(steps):
        start = (step * batch) % N
        optimizer.zero_grad()
        for part in torch.arange(start, start + batch).chunk(micro_batches):
            (model(data.x[part], data.y[part])["loss"] / micro_batches).backward()
        if max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(("micro_batches", "max_grad_norm"), [(1, 0.0), (2, 0.05)])
def test_trainer_equals_the_plain_loop(
    tmp_path: Any, micro_batches: int, max_grad_norm: float
) -> None:
    model, ref = make_model(), make_model()
    opt = momentum_sam(model.parameters())
    passes = 0

    def count(*_: Any) -> None:
        nonlocal passes
        passes += 1

    model.out.register_forward_hook(count)
    args = train_args(
        tmp_path,
        max_steps=5,
        per_device_train_batch_size=4 // micro_batches,
        gradient_accumulation_steps=micro_batches,
        max_grad_norm=max_grad_norm,
    )
    InOrder(model=model, args=args, train_dataset=DictDataset(), optimizers=(opt, None)).train()
    ref_opt = plain_loop(ref, 5, batch=4, micro_batches=micro_batches, max_grad_norm=max_grad_norm)
    assert passes == 5 * micro_batches  # one forward per micro-batch: no second pass
    assert_same_weights(model, ref)
    # the weights are at the perturbed point after training: eval() moves both to w alike
    opt.eval()
    ref_opt.eval()
    assert_same_weights(model, ref)


def test_sam_trainer_refuses_it_with_the_reason(tmp_path: Any) -> None:
    model = make_model()
    with pytest.raises(TypeError, match="one forward/backward pass per step"):
        SAMTrainer(
            model=model,
            args=train_args(tmp_path),
            train_dataset=DictDataset(),
            optimizers=(momentum_sam(model.parameters()), None),
        ).train()
