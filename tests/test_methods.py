"""The harness's per-sample step (ESAM, MSAM) on a batch held on a device: the closure indexes
the batch with row indices on the batch's own device, so that a step on a GPU waits for no
copy of the indices to it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchsam
from torchsam.experiments import methods
from torchsam.experiments.train import Batch, TrainContext


class _IndexDevices(TorchDispatchMode):
    """Record ``(device of the indexed tensor, devices of the indices)`` of every ``index``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is torch.ops.aten.index.Tensor:
            indices = tuple(i.device.type for i in args[1] if i is not None)
            self.seen.append((args[0].device.type, indices))
        return func(*args, **(kwargs or {}))


def _step(optimizer_cls: type, device: str, **options: Any) -> tuple[Any, nn.Module]:
    """The harness's step for ``optimizer_cls`` on a small linear model on ``device``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(device)
    optimizer = optimizer_cls(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.05, **options)
    ce = nn.functional.cross_entropy
    context = TrainContext(
        model=model,
        optimizer=optimizer,
        loss_fn=ce,
        per_sample_loss_fn=lambda out, y: ce(out, y, reduction="none"),
        split=None,  # type: ignore[arg-type]  # the per-sample step does not read it
        epochs=1,
        steps_per_epoch=1,
        generator=torch.Generator().manual_seed(1),
    )
    return methods._per_sample_step(context), model


def _batch(device: str, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)
    return Batch(x.to(device), y.to(device), torch.arange(n), epoch=0, step=0)


#: the optimizers whose closure takes row indices (per-sample losses)
PER_SAMPLE = pytest.mark.parametrize(
    ("optimizer_cls", "options"),
    [(torchsam.MSAM, {"m": 2}), (torchsam.ESAM, {"gamma": 0.5})],
    ids=["msam", "esam"],
)


@PER_SAMPLE
def test_the_closure_indexes_the_batch_with_rows_on_its_device(
    optimizer_cls: type, options: dict[str, Any]
) -> None:
    """``meta`` stands for a GPU: MSAM's CPU row indices reach the batch on its device
    (indexing a GPU batch with CPU indices copies them and waits, per tensor and per call);
    ESAM's are there already."""
    step, _ = _step(optimizer_cls, "meta", skip_nonfinite=False, **options)
    with _IndexDevices() as mode:
        loss = step(_batch("meta"))
    assert loss.device.type == "meta"
    assert mode.seen  # the closure indexed the batch
    assert set(mode.seen) == {("meta", ("meta",))}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@PER_SAMPLE
def test_a_per_sample_step_on_cuda_indexes_on_the_device_and_takes_the_cpu_step(
    optimizer_cls: type, options: dict[str, Any]
) -> None:
    """On a GPU every index the closure takes is on the GPU (a CPU index there is a copy to
    the device and a wait), and the step is the CPU's."""
    step, model = _step(optimizer_cls, "cuda", **options)
    cpu_step, cpu_model = _step(optimizer_cls, "cpu", **options)
    with _IndexDevices() as mode:
        loss = step(_batch("cuda"))
    assert mode.seen
    assert set(mode.seen) == {("cuda", ("cuda",))}
    cpu_loss: Tensor = cpu_step(_batch("cpu"))
    torch.testing.assert_close(loss.cpu(), cpu_loss)
    for p, q in zip(model.parameters(), cpu_model.parameters(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach())
