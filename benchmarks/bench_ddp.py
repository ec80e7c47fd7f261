"""Communication and time per step of SAM under DDP: synchronised against local first pass.

Two CPU processes on the gloo backend (spawned here), an MLP, SGD with momentum. Contenders,
run in the same processes and interleaved round by round:

* ``sgd``: plain SGD under DDP (one pass, one gradient all-reduce per step), for scale;
* ``sam sync``: ``torchsam.SAM`` with both passes all-reduced (plain DDP);
* ``sam local``: the first pass inside ``no_sync`` via ``torchsam.distributed.sam_pass``,
  which then all-reduces a 4-byte flag so that an overflow on any rank skips the step on all;
* ``sam nosync``: the first pass inside a bare ``model.no_sync()``, without that flag (what
  the flag costs; unsafe: an overflow on one rank lets the ranks disagree).

A DDP comm hook counts the all-reduce calls and bytes per step. Time per step is the median
over rounds of rank 0's mean step time in a round. Run ``python benchmarks/bench_ddp.py``
(``--quick`` for a smoke run; ``--width``, ``--batch``, ``--steps``, ``--rounds``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torchsam
from torchsam.distributed import AllReduceCounter, count_all_reduces, sam_pass

WORLD = 2
MODES = ("sgd", "sam sync", "sam local", "sam nosync")


def _worker(rank: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    w = args.width
    net = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    model = DDP(net)
    counter = AllReduceCounter()
    model.register_comm_hook(counter, count_all_reduces)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 64, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sam = torchsam.SAM(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9)

    def step(mode: str) -> None:
        if mode == "sgd":
            sgd.zero_grad()
            loss_fn(model(x), y).backward()
            sgd.step()
            return
        local = mode == "sam local"
        with model.no_sync() if mode == "sam nosync" else sam_pass(model, sam, local=local):
            loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)
        with sam_pass(model, sam, local=local):
            loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)

    times: dict[str, list[float]] = {m: [] for m in MODES}
    comm: dict[str, tuple[float, float]] = {}
    for mode in MODES:  # warm-up
        step(mode)
    for _ in range(args.rounds):
        for mode in MODES:
            counter.calls = counter.bytes = 0
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(mode)
            times[mode].append((time.perf_counter() - start) / args.steps)
            comm[mode] = (counter.calls / args.steps, counter.bytes / args.steps)
    if rank == 0:
        params = sum(p.numel() for p in net.parameters())
        torch.save({"times": times, "comm": comm, "params": params}, os.path.join(out, "r.pt"))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()
    # The results are saved: skip the interpreter's teardown, where gloo's background threads
    # have aborted a finished worker (SIGABRT) on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.rounds = 32, 2, 1
    with tempfile.TemporaryDirectory() as out:
        init = f"file://{os.path.join(out, 'init')}"
        mp.spawn(_worker, args=(init, args, out), nprocs=WORLD, join=True)
        result: dict[str, Any] = torch.load(os.path.join(out, "r.pt"))
    times = {m: statistics.median(t) for m, t in result["times"].items()}
    comm = result["comm"]
    print(
        f"DDP, {WORLD} CPU processes (gloo), MLP 64-{args.width}-{args.width}-10 "
        f"({result['params']:,} parameters, float32), batch {args.batch} per rank, "
        f"SGD momentum 0.9; median of {args.rounds} rounds x {args.steps} steps"
    )
    print(
        f"{'mode':<10} {'all-reduces/step':>16} {'MB/step':>9} {'ms/step':>9} "
        f"{'bytes vs sync':>13} {'time vs sync':>12}"
    )
    sync_bytes, sync_time = comm["sam sync"][1], times["sam sync"]
    for mode in MODES:
        calls, nbytes = comm[mode]
        print(
            f"{mode:<10} {calls:>16.2f} {nbytes / 1e6:>9.3f} {times[mode] * 1e3:>9.2f} "
            f"{nbytes / sync_bytes:>13.2f} {times[mode] / sync_time:>12.2f}"
        )


if __name__ == "__main__":
    main()
