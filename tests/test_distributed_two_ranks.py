"""On two CPU processes (gloo): mixed precision, ESAM, MSAM, the moving-average variants and
clipping by value after a local pass under DDP, and the experiments' data-parallel training
loop (``train(..., distributed=True)``, what ``torchsam compare`` runs under torchrun).

One spawn runs every scenario (starting processes and building the first DDP model take
seconds); the workers save what they ended with and the tests compare it with one-process runs
or hand-written references (float64, except the GradScaler runs, which need float32 for an
overflow, and the training loop, which is float32).
"""

from __future__ import annotations

import datetime
import math
import os
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchsam
from tests.test_distributed import _exit_cleanly, _WithNoSync
from torchsam.distributed import sam_pass
from torchsam.experiments import compare
from torchsam.experiments.models import mlp
from torchsam.experiments.train import train

WORLD = 2
LOCAL_BATCH = 4
LR, RHO = 0.1, 0.05

# GradScaler runs: which rank overflows in which pass of which step
AMP_STEPS = 5
OVERFLOWS = {1: (1, "first"), 2: (0, "second")}
INIT_SCALE = 2.0**10


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, dtype=dtype), nn.Tanh(), nn.Linear(8, 2, dtype=dtype))


def make_data(steps: int, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(2)
    n = WORLD * LOCAL_BATCH
    return [
        (torch.randn(n, 4, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype))
        for _ in range(steps)
    ]


def shard(batch: tuple[torch.Tensor, ...], rank: int) -> tuple[torch.Tensor, ...]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return tuple(t[rows] for t in batch)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean(dim=1)


def fresh(model: DDP) -> DDP:
    """``model`` back at the initial weights (building a DDP model takes a while: reuse one)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), make_model(dtype).parameters(), strict=True):
            p.copy_(p0)
            p.grad = None
    return model


def sgd(cls: type, params: Any, **kwargs: Any) -> Any:
    return cls(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, **kwargs)


# ---------------------------------------------------------------------- mixed precision
def amp_train(
    model: nn.Module,
    data: list[tuple[torch.Tensor, ...]],
    rank: int,
    *,
    local: bool,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """SAM in the two-call GradScaler recipe. With a scaler, the loss of one rank's pass is
    multiplied by 1e38 on the steps of ``OVERFLOWS``, so that its scaled backward overflows
    (as a float16 gradient would); without one, those steps are left out."""
    opt = sgd(torchsam.SAM, model.parameters())
    for step, (x, y) in enumerate(data):
        if scaler is None and step in OVERFLOWS:
            continue
        for which in ("first", "second"):
            with sam_pass(model, opt, local=local):
                loss = ((model(x) - y) ** 2).mean()
                if scaler is None:
                    loss.backward()
                else:
                    if OVERFLOWS.get(step) == (rank, which):
                        loss = loss * 1e38
                    scaler.scale(loss).backward()
            if which == "first":
                opt.first_step(zero_grad=True, grad_scaler=scaler)
        opt.second_step(zero_grad=True, grad_scaler=scaler)
        if scaler is not None:
            scaler.update()


def _amp_runs(rank: int) -> dict[str, Any]:
    data = [shard(b, rank) for b in make_data(AMP_STEPS, torch.float32)]
    results: dict[str, Any] = {}
    ddp = DDP(make_model(torch.float32))
    for local in (False, True):
        for amp in (True, False):
            model = fresh(ddp)
            scaler = None
            if amp:
                scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1)
            amp_train(model, data, rank, local=local, scaler=scaler)
            scale = scaler.get_scale() if scaler is not None else None
            results[f"amp/{local}/{amp}"] = (flat(model.module), scale)
    return results


# ---------------------------------------------------------------------- ESAM and MSAM
def per_sample_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    def closure(rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return per_sample(model(x), y)
        return per_sample(model(x[rows]), y[rows])

    return closure


ESAM_CASES = {"esam_swp": dict(beta=0.6, gamma=1.0, seed=3), "esam_sds": dict(beta=1.0, gamma=0.5)}
MSAM_M = 2


def _esam_msam_runs(rank: int, ddp: DDP) -> dict[str, Any]:
    data = [shard(b, rank) for b in make_data(3)]
    results: dict[str, Any] = {}
    for name, kwargs in ESAM_CASES.items():
        model = fresh(ddp)
        opt = sgd(torchsam.ESAM, model.parameters(), **kwargs)
        for x, y in data:
            opt.step(per_sample_closure(model, x, y))
        results[name] = flat(model.module)
    model = fresh(ddp)
    opt = sgd(torchsam.MSAM, model.parameters(), m=MSAM_M)
    for x, y in data:
        opt.step(per_sample_closure(model, x, y), batch_size=LOCAL_BATCH)
    results["msam"] = flat(model.module)
    return results


def esam_sds_reference() -> torch.Tensor:
    """ESAM with beta = 1, gamma = 0.5 under DDP, written out: the perturbation from the
    averaged gradient, each rank keeping the half of its own rows whose loss rose most."""
    model = make_model()
    params = list(model.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    keep = math.ceil(0.5 * LOCAL_BATCH)
    for batch in make_data(3):
        shards = [shard(batch, r) for r in range(WORLD)]
        losses = sum(per_sample(model(x), y).mean() for x, y in shards) / WORLD
        g = torch.autograd.grad(losses, params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            before = [per_sample(model(x), y) for x, y in shards]
            for p, gi in zip(params, g, strict=True):
                p.add_(RHO * gi / (norm + 1e-12))
            after = [per_sample(model(x), y) for x, y in shards]
        chosen = [torch.topk(a - b, keep).indices for a, b in zip(after, before, strict=True)]
        loss2 = (
            sum(
                per_sample(model(x[c]), y[c]).mean()
                for (x, y), c in zip(shards, chosen, strict=True)
            )
            / WORLD
        )
        g2 = torch.autograd.grad(loss2, params)
        with torch.no_grad():
            for p, wi, m, gi in zip(params, w, momentum, g2, strict=True):
                p.copy_(wi)
                m.mul_(0.9).add_(gi)
                p.sub_(LR * m)
    return flat(model)


def msam_one_process() -> torch.Tensor:
    """MSAM on one process with micro-batches of ``MSAM_M * WORLD``: micro-batch j is the union
    of the ranks' j-th micro-batches (whose gradients DDP averages)."""
    order = [
        r * LOCAL_BATCH + j * MSAM_M + i
        for j in range(LOCAL_BATCH // MSAM_M)
        for r in range(WORLD)
        for i in range(MSAM_M)
    ]
    model = make_model()
    opt = sgd(torchsam.MSAM, model.parameters(), m=MSAM_M * WORLD)
    for x, y in make_data(3):
        opt.step(per_sample_closure(model, x[order], y[order]), batch_size=WORLD * LOCAL_BATCH)
    return flat(model)


# ---------------------------------------------------------------------- moving averages
EMA_STEPS = 6
EMA_VARIANTS = {"fsam": torchsam.FriendlySAM, "vasso": torchsam.VaSSO}


def _ema_runs(rank: int, ddp: DDP) -> dict[str, Any]:
    data = [shard(b, rank) for b in make_data(EMA_STEPS)]
    results: dict[str, Any] = {}
    for name, cls in EMA_VARIANTS.items():
        model = fresh(ddp)
        opt = sgd(cls, model.parameters())
        for x, y in data:

            def closure(
                x: torch.Tensor = x, y: torch.Tensor = y, model: Any = model, opt: Any = opt
            ) -> torch.Tensor:
                opt.zero_grad()
                with sam_pass(model, opt, local=True):
                    loss = ((model(x) - y) ** 2).mean()
                    loss.backward()
                return loss

            opt.step(closure)
        own = [v for entry in opt.state_dict()["state"].values() for k, v in entry.items()]
        own = [v for v in own if isinstance(v, torch.Tensor)]
        results[name] = (flat(model.module), torch.cat([v.reshape(-1) for v in own]))
    return results


# ---------------------------------------------------------------------- clipping by value
CLIP_STEPS, CLIP_INF = 3, (0, 1)  # rank 0's first gradient has an inf on step 1


def _value_clip_run(rank: int, ddp: DDP) -> dict[str, Any]:
    """SAM with sam_pass(local=True), the gradients clipped by value after each pass; on one
    step one rank's first gradient has an inf (which clipping alone would make finite).
    Returns the weights and how many steps were skipped (the optimizer's warnings)."""
    model = fresh(ddp)
    opt = sgd(torchsam.SAM, model.parameters())
    bias = model.module.get_parameter("0.bias")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(shard(b, rank) for b in make_data(CLIP_STEPS)):

            def closure(x: torch.Tensor = x, y: torch.Tensor = y, step: int = step) -> Any:
                opt.zero_grad()
                with sam_pass(model, opt, local=True):
                    loss = ((model(x) - y) ** 2).mean()
                    if (rank, step) == CLIP_INF and not opt.perturbed:
                        loss = loss + bias[0] * math.inf
                    loss.backward()
                nn.utils.clip_grad_value_(model.parameters(), 0.01)
                return loss

            opt.step(closure)
    skipped = sum("not finite (inf or NaN)" in str(w.message) for w in caught)
    return {"value_clip": (flat(model.module), skipped)}


# ---------------------------------------------------------------------- the training loop
TRAIN_METHODS = ("sgd", "sam", "looksam", "esam")


def split() -> Any:
    """A small split of the generated signals."""
    return compare.load_dataset("toy", noise=0.4, seed=0, train_size=128)


def train_model(s: Any) -> torch.nn.Module:
    return mlp(s.num_features, s.num_classes, hidden=16, batch_norm=False)


def run(method: str, distributed: bool) -> Any:
    return train(
        method,
        split(),
        epochs=2,
        batch_size=32,
        model_fn=train_model,
        curves=True,
        distributed=distributed,
    )


def _train_runs() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for method in TRAIN_METHODS:
        r = run(method, True)
        results[f"train/{method}"] = (
            flat(r.model),
            r.test_accuracy,
            r.train_loss,
            r.forward_samples,
        )
    for name, kwargs in (("odd", {"batch_size": 31}), ("saf", {"method": "saf"})):
        try:
            args = {"method": "sgd", "split": split(), "epochs": 1, **kwargs}
            train(**args, distributed=True)
        except ValueError as error:
            results[f"train/{name}"] = str(error)
    return results


def test_distributed_training_equals_one_process_on_the_global_batches(
    ranks: list[dict[str, Any]],
) -> None:
    for method in TRAIN_METHODS:
        weights, test_accuracy, train_loss, samples = ranks[0][f"train/{method}"]
        other = ranks[1][f"train/{method}"]
        assert torch.equal(weights, other[0]), method
        assert (test_accuracy, train_loss, samples) == other[1:], method
        single = run(method, False)
        assert not torch.equal(weights, flat(train_model(split())))
        torch.testing.assert_close(weights, flat(single.model), rtol=1e-4, atol=1e-5, msg=method)
        assert train_loss == pytest.approx(single.train_loss, rel=1e-5)
        assert abs(test_accuracy - single.test_accuracy) <= 1 / len(split().y_test)
        assert samples == single.forward_samples
    assert "must be a multiple of 2" in ranks[0]["train/odd"]
    assert "run saf in one process" in ranks[0]["train/saf"]


# ---------------------------------------------------------------------- workers
def _run(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    # a short timeout: ranks that disagree on a collective fail the test instead of hanging it
    timeout = datetime.timedelta(seconds=30)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timeout)
    try:
        ddp = DDP(make_model())
        results = {**_amp_runs(rank), **_esam_msam_runs(rank, ddp), **_ema_runs(rank, ddp)}
        results.update(_value_clip_run(rank, ddp))
        results.update(_train_runs())
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp_variants")
    mp.spawn(_run, args=(f"file://{tmp / 'init'}", str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("local", [False, True])
def test_grad_scaler_overflow_on_one_rank_skips_the_step_on_every_rank(
    ranks: list[dict[str, Any]], local: bool
) -> None:
    (weights, scale), (weights1, scale1) = (
        ranks[0][f"amp/{local}/True"],
        ranks[1][f"amp/{local}/True"],
    )
    assert torch.equal(weights, weights1), "ranks differ"
    assert scale == scale1
    # grew on the three finite steps, backed off on the two overflows
    assert scale == INIT_SCALE * 2.0 ** (AMP_STEPS - 2 * len(OVERFLOWS))
    # the steps taken are those of the unscaled run without the overflowing steps
    unscaled, _ = ranks[0][f"amp/{local}/False"]
    assert torch.equal(unscaled, ranks[1][f"amp/{local}/False"][0])
    assert not torch.equal(unscaled, flat(make_model(torch.float32)))
    torch.testing.assert_close(weights, unscaled, rtol=1e-6, atol=1e-7)


def test_local_and_synchronised_amp_runs_differ(ranks: list[dict[str, Any]]) -> None:
    # the local runs are not the synchronised ones under another name
    assert not torch.allclose(ranks[0]["amp/True/True"][0], ranks[0]["amp/False/True"][0])


def test_esam_synchronised_equals_one_process_when_it_selects_no_samples(
    ranks: list[dict[str, Any]],
) -> None:
    weights = ranks[0]["esam_swp"]
    assert torch.equal(weights, ranks[1]["esam_swp"])
    model = make_model()
    opt = sgd(torchsam.ESAM, model.parameters(), **ESAM_CASES["esam_swp"])
    for x, y in make_data(3):
        opt.step(per_sample_closure(model, x, y))
    assert not torch.equal(flat(model), flat(make_model()))
    torch.testing.assert_close(weights, flat(model), rtol=1e-12, atol=1e-12)


def test_esam_sample_selection_is_per_rank(ranks: list[dict[str, Any]]) -> None:
    weights = ranks[0]["esam_sds"]
    assert torch.equal(weights, ranks[1]["esam_sds"])
    torch.testing.assert_close(weights, esam_sds_reference(), rtol=1e-12, atol=1e-12)
    # ... which is not one process selecting from the whole batch
    model = make_model()
    opt = sgd(torchsam.ESAM, model.parameters(), **ESAM_CASES["esam_sds"])
    for x, y in make_data(3):
        opt.step(per_sample_closure(model, x, y))
    assert not torch.allclose(weights, flat(model), atol=1e-6)


def test_msam_synchronised_averages_the_ranks_micro_batches(ranks: list[dict[str, Any]]) -> None:
    weights = ranks[0]["msam"]
    assert torch.equal(weights, ranks[1]["msam"])
    torch.testing.assert_close(weights, msam_one_process(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(EMA_VARIANTS))
def test_moving_average_variants_in_local_mode_keep_the_ranks_identical(
    ranks: list[dict[str, Any]], name: str
) -> None:
    (weights, state), (weights1, state1) = ranks[0][name], ranks[1][name]
    assert torch.equal(weights, weights1)
    assert not torch.equal(weights, flat(make_model()))
    # each rank's moving average comes from its own gradients
    assert state.numel() > 0
    assert not torch.allclose(state, state1)


def test_an_inf_clipped_by_value_after_a_local_pass_skips_the_step_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    """sam_pass fills every rank's gradients with NaN, the overflowing rank's too: clipping by
    value would turn an inf into a finite number, and that rank alone would step."""
    (weights, skipped), (weights1, skipped1) = ranks[0]["value_clip"], ranks[1]["value_clip"]
    assert torch.equal(weights, weights1), "ranks differ"
    assert skipped == skipped1 == 1
    assert not torch.equal(weights, flat(make_model()))  # the other steps were taken


@pytest.mark.parametrize("cls", [torchsam.ESAM, torchsam.MSAM])
def test_sam_pass_local_refuses_esam_and_msam(cls: type) -> None:
    model = _WithNoSync(2, 1)
    opt = sgd(cls, model.parameters())
    refused = pytest.raises(ValueError, match=r"optimizer.step\(closure\) without sam_pass")
    with refused, sam_pass(model, opt):
        pass


def test_non_finite_agreement_is_a_no_op_without_a_process_group() -> None:
    model = _WithNoSync(2, 1)
    model.no_sync = lambda: torch.enable_grad()  # type: ignore[method-assign]
    opt = sgd(torchsam.SAM, model.parameters())
    with sam_pass(model, opt):
        model(torch.ones(3, 2)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
