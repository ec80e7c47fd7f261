"""SAM and the variants under FSDP2 (``fully_shard``, DTensor parameters): two CPU processes.

The workers (gloo, a CPU device mesh) train a sharded float64 model and save the full weights
that each rank gathers; the tests compare the ranks bit for bit and the weights with one
process on the whole batch. The model has parameters that split evenly, unevenly (7 rows) and
one that leaves rank 1 an empty shard (1 row). ESAM, MSAM and the GradScaler recipe run on the
model and data of ``tests/test_distributed_two_ranks.py`` and are compared with its DDP
references (the GradScaler one in float32). A second job round-trips the sharded optimizer
state through ``torch.distributed.checkpoint`` and compares the resumed run with the
uninterrupted one, bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import warnings
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchsam
from tests import test_distributed_two_ranks as two_ranks
from tests.test_distributed import (
    DISTRIBUTED_PAGE,
    LOCAL_BATCH,
    LR,
    RHO,
    STEPS,
    VARIANTS,
    WORLD,
    _exit_cleanly,
    loss_fn,
)
from torchsam import _dtensor
from torchsam._engine import _functional

#: base optimizers of the checkpoint test: SGD's momentum buffer, Adam's moments and step
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, dict(lr=LR, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
}
#: GradScaler runs: steps, which rank overflows in which pass of which step, initial scale
AMP_STEPS, OVERFLOWS, INIT_SCALE = two_ranks.AMP_STEPS, two_ranks.OVERFLOWS, two_ranks.INIT_SCALE
#: (variant, call style, foreach) of the runs compared with one process: the per-tensor
#: kernels (foreach=False) are those of both call styles, so one style tests them
EQUAL_RUNS = [(n, s, True) for n in VARIANTS for s in ("two_call", "closure")]
EQUAL_RUNS += [(n, "two_call", False) for n in VARIANTS]
#: (variant, base) pairs of the checkpoint test: their own state ("sam." per parameter, "sam_"
#: per group) and the base optimizer's must both come back
CHECKPOINTED = [("sam", "sgd"), ("fsam", "adam"), ("looksam", "sgd"), ("gsam", "adam")]
#: steps before the checkpoint (STEPS + 1 after it): LookSAM (k=2) resumes on a step without
#: second pass, which uses the saved "sam.gv" and "sam_gv_norm"
SAVE_AT = 3


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 8, dtype=torch.float64),  # 8 rows: 4 per rank
        nn.Tanh(),
        nn.Linear(8, 7, dtype=torch.float64),  # 7 rows: 4 and 3
        nn.Tanh(),
        nn.Linear(7, 1, dtype=torch.float64),  # 1 row: rank 1 holds nothing
    )


def make_data(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 1, generator=g, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def shard_batch(batch: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return tuple(t[rows] for t in batch)


def make_optimizer(
    name: str, model: nn.Module, *, foreach: bool = True, base: str = "sgd"
) -> torchsam.SharpnessAwareOptimizer:
    cls, kwargs = VARIANTS[name]
    base_cls, base_kwargs = BASES[base]
    return cls(
        model.parameters(), base_cls, **{"rho": RHO, **kwargs, **base_kwargs, "foreach": foreach}
    )


def fully_sharded(seed: int = 0) -> nn.Sequential:
    return shard_layers(make_model(seed))


def shard_layers(model: nn.Sequential) -> nn.Sequential:
    """``fully_shard`` on each linear layer, then on the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full_weights(model: nn.Module) -> torch.Tensor:
    """All weights, gathered from the shards (a collective: every rank calls it)."""
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])


def train(
    name: str,
    opt: torchsam.SharpnessAwareOptimizer,
    model: nn.Module,
    data: list[tuple[torch.Tensor, ...]],
    style: str,
) -> None:
    for x, y in data:
        if style == "closure":

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            loss_fn(model(x), y).backward()
            if opt.first_step(zero_grad=True):
                loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)


# ---------------------------------------------------------------------- jobs in the workers
def _equal_job(rank: int, out: str) -> dict[str, Any]:
    data = [shard_batch(batch, rank) for batch in make_data()]
    model = fully_sharded()
    start = [p.to_local().clone() for p in model.parameters()]

    def reset() -> None:
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                p.to_local().copy_(p0)
                p.grad = None

    results: dict[str, Any] = {}
    for name, style, foreach in EQUAL_RUNS:
        reset()
        opt = make_optimizer(name, model, foreach=foreach)
        train(name, opt, model, data, style)
        results[f"{name}/{style}/{foreach}"] = full_weights(model)
    for foreach in (True, False):  # the perturbation, and the restore, on their own
        reset()
        opt = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.0, foreach=foreach)
        x, y = data[0]
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        shards = [p.to_local().clone() for p in model.parameters()]
        results[f"perturbation/{foreach}"] = full_weights(model)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)  # lr = 0: only the restore changes the weights
        results[f"restored/{foreach}"] = all(
            torch.equal(p.to_local(), p0) for p, p0 in zip(model.parameters(), start, strict=True)
        ) and not all(torch.equal(s, p0) for s, p0 in zip(shards, start, strict=True) if s.numel())
    results["readme"] = _run_readme(data, out)
    results.update(_layouts_job(model))
    results.update(_collectives_job(model, data[0]))
    results.update(_one_rank_job(model, data[0], rank))
    results["mixed"] = _mixed_job(data[0])
    return results


def _per_sample_job(rank: int) -> dict[str, Any]:
    """ESAM and MSAM (backward passes inside their own step) on the model and data of the DDP
    test of ``tests/test_distributed_two_ranks.py``, sharded, so that its references apply."""
    data = [two_ranks.shard(b, rank) for b in two_ranks.make_data(3)]
    results: dict[str, Any] = {}
    for name, kwargs in two_ranks.ESAM_CASES.items():
        model = shard_layers(two_ranks.make_model())
        opt = two_ranks.sgd(torchsam.ESAM, model.parameters(), **kwargs)
        for x, y in data:
            opt.step(two_ranks.per_sample_closure(model, x, y))
        results[name] = full_weights(model)
    model = shard_layers(two_ranks.make_model())
    opt = two_ranks.sgd(torchsam.MSAM, model.parameters(), m=two_ranks.MSAM_M)
    for x, y in data:
        opt.step(two_ranks.per_sample_closure(model, x, y), batch_size=two_ranks.LOCAL_BATCH)
    results["msam"] = full_weights(model)
    return results


def _amp_job(rank: int) -> dict[str, Any]:
    """SAM in the two-call GradScaler recipe (float32). With a scaler, on the steps and passes
    of ``OVERFLOWS`` an inf is written into one element of this rank's shard of a gradient
    after the backward (an overflow that the reduce-scatter left on one rank's shard only);
    without one, those steps are left out."""
    data = [two_ranks.shard(b, rank) for b in two_ranks.make_data(AMP_STEPS, torch.float32)]
    results: dict[str, Any] = {}
    for amp in (True, False):
        model = shard_layers(two_ranks.make_model(torch.float32))
        opt = two_ranks.sgd(torchsam.SAM, model.parameters())
        scaler = None
        if amp:
            scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1)
        for step, (x, y) in enumerate(data):
            if scaler is None and step in OVERFLOWS:
                continue
            for which in ("first", "second"):
                loss = ((model(x) - y) ** 2).mean()
                if scaler is None:
                    loss.backward()
                else:
                    scaler.scale(loss).backward()
                    if OVERFLOWS.get(step) == (rank, which):
                        next(model.parameters()).grad.to_local()[0, 0] = float("inf")
                if which == "first":
                    if scaler is not None:
                        scaler.unscale_(opt)
                    opt.first_step(zero_grad=True)
            opt.second_step(zero_grad=True, grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
        results[f"amp/{amp}"] = full_weights(model)
        results[f"amp/{amp}/scale"] = scaler.get_scale() if scaler is not None else None
    return results


def _mixed_job(batch: tuple[torch.Tensor, ...]) -> str:
    """The error when fully_shard was applied to a submodule only."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])  # the other layers stay plain
    opt = make_optimizer("sam", model)
    x, y = batch
    loss_fn(model(x), y).backward()
    try:
        opt.first_step()
    except RuntimeError as error:
        return str(error)
    return "no error"


def _one_rank_job(model: nn.Module, batch: tuple[torch.Tensor, ...], rank: int) -> dict[str, Any]:
    """What only one rank's shard shows decides for every rank: a non-finite gradient skips
    the step, a non-zero gradient makes step() without closure raise."""
    x, y = batch
    before = full_weights(model)
    opt = make_optimizer("sam", model)
    results: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        if rank == 1:
            next(model.parameters()).grad.to_local()[0, 0] = float("inf")
        opt.second_step(zero_grad=True)
    results["skipped"] = torch.equal(full_weights(model), before)
    results["skip warnings"] = sorted({str(w.message)[:56] for w in caught})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if rank == 1:
        next(model.parameters()).grad.to_local()[0, 0] = 1.0
    try:
        opt.step()
        results["step without closure"] = "stepped"
    except RuntimeError as error:
        results["step without closure"] = str(error)[:40]
    opt.zero_grad()
    return results


def _collectives_job(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """The all-reduces torchsam adds to FSDP2's own collectives, per call."""
    from torch.distributed.tensor.debug import CommDebugMode

    x, y = batch
    counts: dict[str, Any] = {}
    for name, foreach in itertools.product(("sam", "gsam"), (True, False)):
        opt = make_optimizer(name, model, foreach=foreach)
        loss_fn(model(x), y).backward()
        with CommDebugMode() as first:
            opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        with CommDebugMode() as second:
            opt.second_step(zero_grad=True)
        for call, mode in (("first_step", first), ("second_step", second)):
            counts[f"collectives/{name}/{call}/{foreach}"] = {
                str(op): n for op, n in mode.get_comm_counts().items()
            }
    return counts


def _layouts_job(model: nn.Module) -> dict[str, Any]:
    """The DTensor helpers on tensors laid out differently from the parameters."""
    from torch.distributed.tensor import Replicate

    weight = next(model.parameters())  # 8 x 4, sharded by rows
    whole = weight.redistribute(placements=[Replicate()])
    copied = torch.empty_like(weight)
    _functional.copy_([copied], [whole], True)  # one tensor at a time, redistributed
    results: dict[str, Any] = {"copied": copied.full_tensor()}
    results["dot"] = _dtensor.full(_dtensor.dot(weight, whole, torch.float64)).item()
    try:
        _dtensor.dot(weight, whole.to_local(), torch.float64)
        results["dot with a plain tensor"] = "no error"
    except TypeError as error:
        results["dot with a plain tensor"] = str(error)
    return results


def _checkpoint_job(rank: int, out: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    data = [shard_batch(batch, rank) for batch in make_data(SAVE_AT + STEPS + 1)]
    before, after = data[:SAVE_AT], data[SAVE_AT:]
    results: dict[str, Any] = {}
    for name, base in CHECKPOINTED:
        key = f"{name}/{base}"
        model = fully_sharded()
        opt = make_optimizer(name, model, base=base)
        train(name, opt, model, before, "two_call")
        model_state, optim_state = get_state_dict(model, opt)
        path = os.path.join(out, key.replace("/", "-"))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        flat = get_state_dict(
            model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)
        )
        dcp.save({"model": flat[0], "optim": flat[1]}, checkpoint_id=path + "-flat")
        # what was saved per parameter, and whether as shards (DTensors)
        results[f"{key}/state"] = sorted(
            {
                (k, type(v).__name__)
                for entry in optim_state["state"].values()
                for k, v in entry.items()
                if isinstance(v, torch.Tensor) and v.dim() > 0
            }
        )
        train(name, opt, model, after, "two_call")
        results[f"{key}/uninterrupted"] = full_weights(model)

        fresh_model = fully_sharded(seed=5)  # other weights, which the checkpoint overwrites
        fresh = make_optimizer(name, fresh_model, base=base)
        model_state, optim_state = get_state_dict(fresh_model, fresh)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            fresh_model, fresh, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        results[f"{key}/step"] = fresh.param_groups[0]["sam_step"]
        results[f"{key}/flattened"] = _load_flattened(fresh_model, fresh, path)
        train(name, fresh, fresh_model, after, "two_call")
        results[f"{key}/resumed"] = full_weights(fresh_model)
    return results


def _load_flattened(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> str:
    """Loading with flatten_optimizer_state_dict=True (rebuilt from ``optimizer.state``, which
    holds the base optimizer's entries and torchsam's own); the training that follows must
    then resume exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(model, opt, options=options)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path + "-flat")
    try:
        set_state_dict(model, opt, model_state_dict={}, optim_state_dict=state["optim"])
    except RuntimeError as error:
        return str(error)
    return "loaded"


def _run(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    # a time-out, so that a collective one rank skips fails the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = _equal_job(rank, out)
            results.update(_per_sample_job(rank))
            results.update(_amp_job(rank))
        results["warnings"] = sorted({str(w.message) for w in caught})
        results.update(_checkpoint_job(rank, out))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


def readme_blocks() -> list[str]:
    """The examples of the FSDP2 section of docs/distributed.md (fenced ``py``: they need a
    process group, so the docs test skips them)."""
    section = DISTRIBUTED_PAGE.read_text().split("\n## FSDP2\n")[1].split("\n## ")[0]
    return re.findall(r"```py\n(.*?)```", section, flags=re.DOTALL)


def _run_readme(data: list[tuple[torch.Tensor, ...]], out: str) -> torch.Tensor:
    """Run the FSDP2 examples of docs/distributed.md in order; the final full weights."""
    ns: dict[str, Any] = {
        "torch": torch,
        "torchsam": torchsam,
        "YourModel": make_model,
        "loss_fn": loss_fn,
        "loader": data,
    }
    cwd = os.getcwd()
    os.chdir(out)  # the examples write their checkpoint to a relative path
    try:
        for i, block in enumerate(readme_blocks()):
            exec(compile(block, f"docs/distributed.md FSDP2 block {i + 1}", "exec"), ns)
    finally:
        os.chdir(cwd)
    return full_weights(ns["model"])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both jobs in one pair of processes (starting them takes seconds): each rank's results."""
    out = tmp_path_factory.mktemp("fsdp")
    init = f"file://{out / 'init'}"
    mp.spawn(_run, args=(init, str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for key, value in results[0].items():  # the ranks agree bit for bit on everything
        other = results[1][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    return results


# ---------------------------------------------------------------------- references
@functools.cache
def one_process(name: str, style: str) -> torch.Tensor:
    """The same steps in this process, on the whole batch."""
    model = make_model()
    train(name, make_optimizer(name, model), model, make_data(), style)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------- tests
def test_fsdp2_equals_one_process(ranks: list[dict[str, Any]]) -> None:
    results = ranks[0]
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    for name, style, foreach in EQUAL_RUNS:
        key = f"{name}/{style}/{foreach}"
        expected = one_process(name, style)
        assert not torch.equal(expected, start), key
        torch.testing.assert_close(results[key], expected, rtol=1e-12, atol=1e-12, msg=key)
    for foreach in (True, False):
        # the perturbation has norm rho over all shards together (a per-shard norm would give
        # each rank's shard the norm rho, and the whole sqrt(2) rho)
        e = results[f"perturbation/{foreach}"] - start
        torch.testing.assert_close(torch.linalg.vector_norm(e).item(), RHO, rtol=1e-12, atol=0)
        assert results[f"restored/{foreach}"]  # bit-exact, on every shard
    weight = make_model()[0].weight.detach()
    assert torch.equal(results["copied"], weight)
    torch.testing.assert_close(results["dot"], (weight**2).sum().item(), rtol=1e-12, atol=0)
    assert "fully_shard to the root module" in results["dot with a plain tensor"]
    # one all-reduce per norm, inner product and finiteness check of the gradients
    for foreach in (True, False):
        all_reduces = {
            f"{name}/{call}": results[f"collectives/{name}/{call}/{foreach}"]
            for name in ("sam", "gsam")
            for call in ("first_step", "second_step")
        }
        assert all_reduces == {
            "sam/first_step": {"c10d_functional.all_reduce": 1},  # the norm
            "sam/second_step": {"c10d_functional.all_reduce": 1},  # the finiteness check
            "gsam/first_step": {"c10d_functional.all_reduce": 1},
            # its norm (which also decides finiteness) and the dot
            "gsam/second_step": {"c10d_functional.all_reduce": 2},
        }
    assert results["skipped"]  # an inf on rank 1's shard only: no rank stepped
    assert results["skip warnings"] == ["SAM.second_step(): a gradient is not finite (inf or NaN)"]
    assert results["step without closure"].startswith("SAM.step() needs a closure")
    assert "2 DTensor parameters (sharded by fully_shard) and 4 plain" in results["mixed"]
    assert results["warnings"] == []  # e.g. none from DTensor about the engine's tensors
    torch.testing.assert_close(
        results["readme"], one_process("sam", "two_call"), rtol=1e-12, atol=1e-12
    )


def test_fsdp2_distributed_checkpoint_resumes_bit_exactly(ranks: list[dict[str, Any]]) -> None:
    results = ranks[0]
    for name, base in CHECKPOINTED:
        assert results[f"{name}/{base}/step"] == SAVE_AT
        # flatten_optimizer_state_dict=True loads too (then the resumed run below must match)
        assert results[f"{name}/{base}/flattened"] == "loaded"
        uninterrupted = results[f"{name}/{base}/uninterrupted"]
        assert torch.equal(results[f"{name}/{base}/resumed"], uninterrupted), (name, base)
        saved = results[f"{name}/{base}/state"]
        assert {kind for _, kind in saved} == {"DTensor"}, saved  # shards, not gathered copies
        keys = {key for key, _ in saved}
        expected = {"sgd": {"momentum_buffer"}, "adam": {"exp_avg", "exp_avg_sq"}}[base]
        expected |= {"fsam": {"sam.grad_ema"}, "looksam": {"sam.gv"}}.get(name, set())
        assert expected <= keys, (name, keys)


def test_fsdp2_esam_and_msam_equal_their_ddp_references(ranks: list[dict[str, Any]]) -> None:
    # gamma = 1 (no sample selection), beta = 0.6: one process on the whole batch
    model = two_ranks.make_model()
    opt = two_ranks.sgd(torchsam.ESAM, model.parameters(), **two_ranks.ESAM_CASES["esam_swp"])
    for x, y in two_ranks.make_data(3):
        opt.step(two_ranks.per_sample_closure(model, x, y))
    assert not torch.equal(two_ranks.flat(model), two_ranks.flat(two_ranks.make_model()))
    weights = ranks[0]["esam_swp"]
    torch.testing.assert_close(weights, two_ranks.flat(model), rtol=1e-12, atol=1e-12)
    # gamma = 0.5: each rank selects from its own rows, as under DDP
    weights = ranks[0]["esam_sds"]
    torch.testing.assert_close(weights, two_ranks.esam_sds_reference(), rtol=1e-12, atol=1e-12)
    # MSAM: the ranks' j-th micro-batches are averaged, as under DDP
    weights = ranks[0]["msam"]
    torch.testing.assert_close(weights, two_ranks.msam_one_process(), rtol=1e-12, atol=1e-12)


def test_fsdp2_grad_scaler_overflow_on_one_shard_skips_the_step_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    # the ranks are bit-identical (the fixture checks every result), scales included: an inf
    # on one rank's shard made every rank's scaler back off, on both overflowing steps, and
    # the scale grew on the three others
    assert ranks[0]["amp/True/scale"] == INIT_SCALE * 2.0 ** (AMP_STEPS - 2 * len(OVERFLOWS))
    # no rank took an overflowing step: the weights are those of the run without a scaler
    # and without those steps (scaling by powers of two is exact)
    unscaled = ranks[0]["amp/False"]
    assert not torch.equal(unscaled, two_ranks.flat(two_ranks.make_model(torch.float32)))
    assert torch.equal(ranks[0]["amp/True"], unscaled)
