"""SAM and the variants under DistributedDataParallel: two CPU processes on gloo.

Each test spawns two processes once and runs several optimizers inside them; the workers save
their final weights (and the all-reduces a comm hook counted), and the test compares them with
one process on the whole batch, or with a hand-written per-rank reference, in float64.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchsam
from torchsam.distributed import AllReduceCounter, count_all_reduces, sam_pass

WORLD = 2
STEPS = 3
LOCAL_BATCH = 4
LR, RHO = 0.1, 0.05  # the README's example
DISTRIBUTED_PAGE = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"

#: name -> (class, keyword arguments); every two-pass variant and the two with one-pass steps
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "sam": (torchsam.SAM, {}),
    "asam": (torchsam.SAM, dict(adaptive=True, rho=0.5)),
    "gsam": (torchsam.GSAM, {}),
    "fsam": (torchsam.FriendlySAM, {}),
    "vasso": (torchsam.VaSSO, {}),
    "wsam": (torchsam.WSAM, {}),
    "looksam": (torchsam.LookSAM, dict(k=2)),
    "intermittent": (torchsam.IntermittentSAM, dict(every=2)),
}
#: the variants whose final gradient does not use the gradient at w: local mode applies
LOCAL_VARIANTS = ("sam", "asam", "fsam", "vasso", "intermittent")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 2, dtype=torch.float64)
    )


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One global batch (WORLD * LOCAL_BATCH rows) per step."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 2, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def make_optimizer(name: str, params: Any) -> torchsam.SharpnessAwareOptimizer:
    cls, kwargs = VARIANTS[name]
    kwargs = {"rho": RHO, **kwargs}
    return cls(params, torch.optim.SGD, lr=LR, momentum=0.9, **kwargs)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def shard(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, ...]:
    x, y = batch
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[rows], y[rows]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ---------------------------------------------------------------------- training loops
def train(
    name: str,
    model: nn.Module,
    data: list[tuple[torch.Tensor, ...]],
    style: str,
    *,
    local: bool = False,
    micro: int = 1,
) -> None:
    """``STEPS`` steps on ``data`` (already this rank's shard) in the given call style.

    ``micro`` > 1 accumulates each pass over that many micro-batches, with ``no_sync`` on all
    but the last (the pattern of the README); ``model`` may be a DDP model or a plain one.
    """
    opt = make_optimizer(name, model.parameters())
    ddp = isinstance(model, DDP)

    def one_pass(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=x.dtype)
        xs, ys = x.chunk(micro), y.chunk(micro)
        for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
            last = i == micro - 1
            if not ddp:
                context: Any = torch.enable_grad()
            elif last:
                context = sam_pass(model, opt, local=local)
            else:
                context = model.no_sync()
            with context:
                loss = loss_fn(model(xi), yi) / micro
                loss.backward()
            total += loss.detach()
        return total

    for x, y in data:
        if style == "closure":

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                return one_pass(x, y)

            opt.step(closure)
        else:
            one_pass(x, y)
            if opt.first_step(zero_grad=True):
                one_pass(x, y)
            opt.second_step(zero_grad=True)


def _run(rank: int, init: str, out: str, job: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        data = [shard(batch, rank) for batch in make_data()]
        results: dict[str, Any] = {}
        runs: list[tuple[str, str, bool, int]] = []
        if job == "sync":
            runs = [(n, s, False, 1) for n in VARIANTS for s in ("two_call", "closure")]
            runs += [(n, "two_call", False, 2) for n in ("sam", "gsam")]
            runs += [("sam", "closure", False, 2)]
        else:
            runs = [(n, s, True, 1) for n in LOCAL_VARIANTS for s in ("two_call", "closure")]
            runs += [(n, "two_call", False, 1) for n in LOCAL_VARIANTS]  # to count
            runs += [("sam", "two_call", True, 2), ("sam", "closure", True, 2)]
        # One DDP model for all runs (building one takes a while): reset to the same start.
        model = DDP(make_model())
        start = [p.detach().clone() for p in model.parameters()]
        counter = AllReduceCounter()
        model.register_comm_hook(counter, count_all_reduces)
        for name, style, local, micro in runs:
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), start, strict=True):
                    p.copy_(p0)
                    p.grad = None
            counter.calls = counter.bytes = 0
            train(name, model, data, style, local=local, micro=micro)
            results[f"{name}/{style}/{local}/{micro}"] = (
                flat(model.module),
                counter.calls,
                counter.bytes,
            )
        if job == "local":
            results.update(_run_readme(data))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


def _exit_cleanly() -> None:
    """End a worker whose results are saved without the interpreter's teardown, where gloo's
    background threads have aborted a finished process (SIGABRT, "terminate called without an
    active exception") in about 1 run in 6 on a loaded machine."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def readme_blocks() -> list[str]:
    """The examples of the DDP section of docs/distributed.md (fenced ``py`` and marked as run
    here, which the docs test skips: they need a process group)."""
    section = DISTRIBUTED_PAGE.read_text().split("\n## FSDP2\n")[0]
    return re.findall(r"```py\n(.*?)```", section, flags=re.DOTALL)


def _run_readme(data: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    """Run the DDP examples of docs/distributed.md in order."""
    ns: dict[str, Any] = {
        "torch": torch,
        "torchsam": torchsam,
        "YourModel": make_model,
        "loss_fn": loss_fn,
        "loader": data,
        "device": "cpu",
    }
    results = {}
    for i, block in enumerate(readme_blocks()):
        # from the start again, to compare with one process or the local reference
        if "def accumulate" in block or "GradScaler" in block:
            ns["model"] = model = DDP(make_model())
            ns["optimizer"] = make_optimizer("sam", model.parameters())
        exec(compile(block, f"docs/distributed.md DDP block {i + 1}", "exec"), ns)
        results[f"readme/{i}"] = (flat(ns["model"].module), 0, 0)
    return results


def spawn(job: str, tmp_path: Path) -> list[dict[str, Any]]:
    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_run, args=(init, str(tmp_path), job), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------------- references
def one_process(name: str, style: str) -> torch.Tensor:
    """The same steps in this process, on the whole batch."""
    model = make_model()
    train(name, model, make_data(), style)
    return flat(model)


def local_sam_reference() -> torch.Tensor:
    """SAM with SGD (momentum 0.9), each rank perturbed with its own gradient, written out."""
    model = make_model()
    params = list(model.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    for batch in make_data():
        w = [p.detach().clone() for p in params]
        second = [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            x, y = shard(batch, rank)
            g = torch.autograd.grad(loss_fn(model(x), y), params)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            with torch.no_grad():
                for p, wi, gi in zip(params, w, g, strict=True):
                    p.copy_(wi + RHO * gi / (norm + 1e-12))
            g2 = torch.autograd.grad(loss_fn(model(x), y), params)
            with torch.no_grad():
                for s, gi in zip(second, g2, strict=True):
                    s += gi / WORLD
                for p, wi in zip(params, w, strict=True):
                    p.copy_(wi)
        with torch.no_grad():
            for p, m, g in zip(params, momentum, second, strict=True):
                m.mul_(0.9).add_(g)
                p.sub_(LR * m)
    return flat(model)


# ---------------------------------------------------------------------- tests
def test_ddp_synchronised_equals_one_process(tmp_path: Path) -> None:
    ranks = spawn("sync", tmp_path)
    assert ranks[0].keys() == ranks[1].keys()
    for key, (weights, calls, _) in ranks[0].items():
        name, style, _, _ = key.split("/")
        assert torch.equal(weights, ranks[1][key][0]), f"{key}: ranks differ"
        expected = one_process(name, style)
        assert not torch.equal(expected, flat(make_model())), f"{key}: no step taken"
        torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12, msg=key)
        two_pass = {"looksam": 2, "intermittent": 2}.get(name)
        passes = STEPS * 2 if two_pass is None else STEPS + len(range(0, STEPS, two_pass))
        assert calls == passes, f"{key}: {calls} all-reduces for {passes} passes"


def test_ddp_local_perturbation(tmp_path: Path) -> None:
    ranks = spawn("local", tmp_path)
    results = ranks[0]
    for key, (weights, _, _) in results.items():
        assert torch.equal(weights, ranks[1][key][0]), f"{key}: ranks differ"
    # Each rank perturbs with its own gradient; the second gradient is averaged.
    reference = local_sam_reference()
    for style in ("two_call", "closure"):
        for micro in (1, 2):
            weights = results[f"sam/{style}/True/{micro}"][0]
            torch.testing.assert_close(weights, reference, rtol=1e-12, atol=1e-12)
    for style in ("two_call", "closure"):  # accumulation: still one all-reduce per step
        assert results[f"sam/{style}/True/2"][1] == STEPS
    # The page's examples: two-call local, closure local, accumulation synchronised, and
    # local with a GradScaler (float64 here: autocast leaves it, the scale is exact).
    blocks = readme_blocks()
    assert len(blocks) == 4
    torch.testing.assert_close(results["readme/3"][0], reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["readme/0"][0], reference, rtol=1e-12, atol=1e-12)
    assert not torch.equal(results["readme/1"][0], results["readme/0"][0])
    expected = one_process("sam", "two_call")
    torch.testing.assert_close(results["readme/2"][0], expected, rtol=1e-12, atol=1e-12)
    # ... which is not the synchronised result.
    assert not torch.allclose(results["sam/two_call/False/1"][0], reference, atol=1e-6)
    for name in LOCAL_VARIANTS:
        _, calls, nbytes = results[f"{name}/two_call/True/1"]
        _, sync_calls, sync_bytes = results[f"{name}/two_call/False/1"]
        if name == "intermittent":  # passes 0 and 2 local, the one-pass step 1 synchronised
            assert (calls, sync_calls) == (3, 5)
        else:  # one all-reduce per step instead of two
            assert (calls, sync_calls) == (STEPS, 2 * STEPS)
        assert nbytes * sync_calls == sync_bytes * calls
        assert results[f"{name}/closure/True/1"][1] == calls


class _WithNoSync(nn.Linear):
    def no_sync(self) -> Any:
        raise AssertionError("not reached")


@pytest.mark.parametrize("name", ["gsam", "wsam", "looksam"])
def test_sam_pass_local_refuses_variants_using_the_first_gradient(name: str) -> None:
    model = _WithNoSync(2, 1)
    opt = make_optimizer(name, model.parameters())
    with pytest.raises(ValueError, match="local=False"), sam_pass(model, opt):
        pass
    with sam_pass(model, opt, local=False):  # synchronised: nothing to refuse
        pass


def test_sam_pass_argument_errors() -> None:
    model = nn.Linear(2, 1)
    opt = make_optimizer("sam", model.parameters())
    with pytest.raises(TypeError, match="no_sync"), sam_pass(model, opt):
        pass
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torchsam optimizer"), sam_pass(_WithNoSync(2, 1), base):  # type: ignore[arg-type]
        pass


def test_ddp_benchmark_smoke_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process, with benchmarks/ on the path that the spawned workers inherit
    monkeypatch.syspath_prepend(str(DISTRIBUTED_PAGE.parents[1] / "benchmarks"))
    import bench_ddp

    bench_ddp.main(["--quick"])
    rows = {
        line[:10].strip(): line[10:].split()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("sgd", "sam"))
    }
    assert rows["sam sync"][0] == "2.00"  # all-reduces per step: one per pass (one bucket)
    assert rows["sam local"][0] == "1.00"
    assert rows["sam local"][3] == "0.50"  # bytes vs synchronised
    nosync, local = rows["sam nosync"], rows["sam local"]
    assert nosync[:2] + nosync[3:4] == local[:2] + local[3:4]  # the flag is no gradient bucket
