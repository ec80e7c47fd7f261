"""MomentumSAM under FSDP2 and the sharpness monitor under DDP: two gloo CPU processes.

One pair of processes runs both jobs (starting them takes seconds on a loaded machine):

* FSDP2: ``fully_shard`` on each linear layer and the whole model (DTensor parameters, one of
  them leaving rank 1 an empty shard), MomentumSAM over SGD and AdamW with weight decay, each
  rank on half of every batch; the gathered weights must equal one process on the whole batch.
* The monitor under DDP, built on ``model.module`` as docs/monitor.md says, on a model with
  BatchNorm (whose buffers DDP broadcasts in every training forward): a run without monitor, a
  run where every rank measures, and a run where only rank 0 measures. The weights must be the
  same bit for bit in all three (the monitor does not change training), the ranks must measure
  the same values, and a process group with a time-out turns a deadlock into a failure.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchsam
from tests import test_fsdp as fsdp
from tests.test_distributed import WORLD, _exit_cleanly, loss_fn
from torchsam.monitor import SharpnessMonitor

STEPS, EVERY = 6, 2
#: base optimizers of the FSDP2 job, with weight decay (where the authors' rule moves it)
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}


def make_model(batchnorm: bool = False) -> nn.Sequential:
    """``tests/test_fsdp.py``'s model (a parameter leaves rank 1 an empty shard), with a
    BatchNorm after the first layer when asked."""
    model = fsdp.make_model()
    if batchnorm:
        model.insert(1, nn.BatchNorm1d(8, dtype=torch.float64))
    return model


def make_data() -> list[tuple[torch.Tensor, ...]]:
    return fsdp.make_data(STEPS)


def _half(batch: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    return fsdp.shard_batch(batch, rank)


def momentum_sam(model: nn.Module, base: str) -> torchsam.MomentumSAM:
    cls, kwargs = BASES[base]
    return torchsam.MomentumSAM(model.parameters(), cls, rho=0.5, **kwargs)


def train_momentum_sam(model: nn.Module, base: str, rank: int | None) -> None:
    """STEPS steps of MomentumSAM; ``rank`` None: one process on the whole batch."""
    opt = momentum_sam(model, base)
    for batch in make_data():
        x, y = batch if rank is None else _half(batch, rank)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    opt.eval()


# ---------------------------------------------------------------------- jobs in the workers
def _fsdp_job(rank: int) -> dict[str, Any]:
    out = {}
    for base in BASES:
        model = fsdp.shard_layers(make_model())
        train_momentum_sam(model, base, rank)
        out[f"fsdp/{base}"] = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
    return out


def _monitor_job(rank: int, measuring: str) -> dict[str, Any]:
    """DDP training with SGD; ``measuring``: "none", "every rank" or "rank 0"."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(batchnorm=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = [make_data()[0]]  # the same fixed probe on every rank
    # BatchNorm's running statistics differ between ranks (each updates them with its own
    # half of the batch), so measurements that use them ("eval") differ too; with the
    # probe's batch statistics ("train") every rank measures the same function
    batch_norm = "train" if measuring == "every rank" else "eval"
    monitor = SharpnessMonitor(
        model.module, loss_fn, probe, every=EVERY, sam_rho=0.05, batch_norm=batch_norm
    )
    measures = measuring == "every rank" or (measuring == "rank 0" and rank == 0)
    for batch in make_data():
        x, y = _half(batch, rank)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if measures:
            monitor.step()
    state = [t.detach().clone() for t in model.module.state_dict().values()]
    values = [(r.step, r.top_eigenvalue, r.products, r.sam_sharpness) for r in monitor.records]
    try:  # the wrapper is refused, with what to do instead
        SharpnessMonitor(model, loss_fn, probe)
        refused = ""
    except TypeError as error:
        refused = str(error)
    return {
        f"monitor/{measuring}/state": state,
        f"monitor/{measuring}/records": values,
        "monitor/wrapper": refused,
    }


def _run(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    # a time-out, so that a collective one rank skips fails the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = _fsdp_job(rank)
        for measuring in ("none", "every rank", "rank 0"):
            results.update(_monitor_job(rank, measuring))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("msam_distributed")
    mp.spawn(_run, args=(f"file://{out / 'init'}", str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------- the tests
@pytest.mark.parametrize("base", list(BASES))
def test_fsdp2_momentum_sam_equals_one_process(ranks: list[dict[str, Any]], base: str) -> None:
    sharded = [r[f"fsdp/{base}"] for r in ranks]
    assert torch.equal(sharded[0], sharded[1])  # every rank gathers the same weights
    model = make_model()
    train_momentum_sam(model, base, None)
    whole = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(sharded[0], whole, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(whole, torch.cat([p.reshape(-1) for p in make_model().parameters()]))


def test_monitor_under_ddp_measures_alike_and_changes_nothing(
    ranks: list[dict[str, Any]],
) -> None:
    # on each rank, the same weights and buffers (BatchNorm's running statistics, which DDP
    # broadcasts from rank 0 at each forward and each rank then updates with its own half of
    # the batch) with and without the monitor, bit for bit
    for r in ranks:
        reference = r["monitor/none/state"]
        for measuring in ("every rank", "rank 0"):
            state = r[f"monitor/{measuring}/state"]
            assert all(torch.equal(a, b) for a, b in zip(state, reference, strict=True))
    weights = [r["monitor/none/state"] for r in ranks]  # the parameters agree across ranks
    names = list(make_model(batchnorm=True).state_dict())
    for name, a, b in zip(names, *weights, strict=True):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(a, b), name
    # with batch_norm="train", every rank measured the same values at the same steps
    due = list(range(EVERY, STEPS + 1, EVERY))
    every = [r["monitor/every rank/records"] for r in ranks]
    assert [s for s, *_ in every[0]] == due
    assert every[0] == every[1]
    assert all(value > 0 for _, value, _, _ in every[0])
    # rank 0 alone measured (the monitor makes no collective call: no deadlock)
    assert [s for s, *_ in ranks[0]["monitor/rank 0/records"]] == due
    assert ranks[1]["monitor/rank 0/records"] == []
    assert "build it on the module inside (model.module)" in ranks[0]["monitor/wrapper"]
