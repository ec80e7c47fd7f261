"""Overhead of ``torchsam.SAM`` against the reference PyTorch SAM, on CPU, in one process.

A thin wrapper: the benchmark lives in :mod:`torchsam.experiments.bench` (also run by
``torchsam bench``), which documents its contenders, scenarios and targets. Run it as
``python benchmarks/bench_overhead.py`` (``--quick`` for a short smoke run, ``--threads N`` for
the intra-op thread count, 1 by default). It prints a report and always exits with status 0.

``--targets-only`` prints instead each CPU target of issue 20 beside its measurement, with
PASS or FAIL (``--quick`` for fewer repetitions, ``--tiny`` for small problems, as the smoke
test runs it; the timed targets are then not meaningful):

* own operators per step of GSAM and of LookSAM's sharpness step at most 3x SAM's, the same
  for ``layers`` and ``2 * layers`` Linear layers (multi-tensor inner products);
* IntermittentSAM's plain steps add no operator to the base step (without the non-finite
  guard; with it, the guard's check is listed);
* the memory-bound step (200 tensors, 11.7M parameters: scenario 2) at most 1.05x the
  reference's time, with 1 and with 2 threads;
* SAM's own cost on 200 tensors of 1,000 elements (scenario 1) at most 0.35x the reference's,
  with 1 and with 2 threads;
* the engine's functional kernels of a step (norm, guarded perturbation, inner product,
  combination, average, restore; on 20 tensors, 5.9M parameters) traced by
  ``torch.compile(fullgraph=True)`` with no graph break; their eager and compiled times
  (``aot_eager``, and ``inductor`` where it compiles on the machine, as it needs a C++
  compiler; not with ``--tiny`` or ``--no-inductor``) are reported beside it.

Time ratios are medians over interleaved trials in one process; operator counts do not depend
on the machine's load.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from torchsam._engine import _functional as F
from torchsam._engine._layout import GroupView, Layout
from torchsam.experiments import bench
from torchsam.experiments.bench import main

Row = tuple[str, str, str, str]  # target, measurement, limit, result


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------- operator counts
def _own_ops(name: str, layers: int, **options: Any) -> int:
    contenders = {c.name: c for c in bench.sync_contenders()}
    counter, base = bench.count_step(contenders[name], layers, **options)
    return counter.ops - base.ops


def op_targets(layers: int) -> list[Row]:
    rows: list[Row] = []
    sam = _own_ops("SAM", layers)
    for name in ("GSAM", "LookSAM k=5, sharpness step"):
        own = _own_ops(name, layers)
        doubled = _own_ops(name, 2 * layers)
        ok = own <= 3 * sam and own == doubled
        rows.append(
            (
                f"own ops of {name} ({2 * layers} / {4 * layers} tensors)",
                f"{own} / {doubled} (SAM {sam}: {own / sam:.2f}x)",
                "<= 3x SAM, constant",
                _verdict(ok),
            )
        )
    plain = "IntermittentSAM every=5, other step"
    unguarded = _own_ops(plain, layers, skip_nonfinite=False)
    guarded = _own_ops(plain, layers)
    rows.append(
        (
            "own ops of IntermittentSAM's plain step",
            f"{unguarded} without the guard ({guarded} with its check)",
            "== 0",
            _verdict(unguarded == 0),
        )
    )
    return rows


# --------------------------------------------------------------------------- timed targets
def _ratio_row(
    label: str,
    problem: bench.Problem,
    limit: float,
    own: bool,
    timing: dict[str, int],
) -> Row:
    names = (bench.BASE, bench.REFERENCE, bench.TORCHSAM)
    times = bench.measure({n: bench.build(n, problem) for n in names}, **timing)
    if own:  # the optimizer's own cost: minus the SGD step, paired per trial
        value = {
            n: statistics.median(t - b for t, b in zip(times[n], times[bench.BASE], strict=True))
            for n in names[1:]
        }
    else:
        value = {n: statistics.median(times[n]) for n in names[1:]}
    ratio = value[bench.TORCHSAM] / value[bench.REFERENCE]
    return (
        f"{label}, {torch.get_num_threads()} thread(s)",
        f"{ratio:.2f}x ({bench.fmt_time(value[bench.TORCHSAM])} vs "
        f"{bench.fmt_time(value[bench.REFERENCE])})",
        f"<= {limit:.2f}x",
        _verdict(ratio <= limit),
    )


def _fused_kernel_row(problem: bench.Problem, reps: int) -> Row:
    """The perturbation's fused kernel (``torch._fused_sgd_`` with ``found_inf``) alone on the
    small tensors: it hands each tensor to OpenMP on its own, so its time grows with threads."""
    params = [w.clone() for w in problem.weights]
    scale, nonfinite = torch.tensor(1e-6), torch.tensor(0.0)

    def call() -> None:
        F._fused_add_(params, problem.grads, scale, nonfinite)

    seconds = _best_time(call, reps)
    return (
        f"  the fused perturbation kernel alone ({len(params)} small tensors), "
        f"{torch.get_num_threads()} thread(s)",
        bench.fmt_time(seconds) + " (best of runs)",
        "-",
        "info",
    )


def _bare_row(timing: dict[str, int]) -> Row:
    """SAM's step with the base step called bare (the default when no hook or profiler
    watches) against the same step through ``torch.optim``'s step wrapper, interleaved, on 8
    tensors of 100 elements (a step short enough for the wrapper's fixed cost to show)."""
    from torchsam._engine import _construct

    problem = bench.Problem.random([(100,)] * 8, seed=3)
    bare_step = _construct._bare_step
    wrapped_step = bench.build(bench.TORCHSAM, problem)

    def wrapped() -> None:
        _construct._bare_step = lambda base: None
        try:
            wrapped_step()
        finally:
            _construct._bare_step = bare_step

    steps = {"bare": bench.build(bench.TORCHSAM, problem), "wrapped": wrapped}
    times = bench.measure(steps, **timing)
    saved = statistics.median(w - b for w, b in zip(times["wrapped"], times["bare"], strict=True))
    bare, plain = (statistics.median(times[n]) for n in ("bare", "wrapped"))
    return (
        f"  SAM's step (8 x 100), base step bare vs wrapped, {torch.get_num_threads()} thread(s)",
        f"{bench.fmt_time(bare)} vs {bench.fmt_time(plain)} (paired: {bench.fmt_time(saved)})",
        "-",
        "info",
    )


def timed_targets(threads: Sequence[int], tiny: bool, quick: bool) -> Iterator[Row]:
    """The timed rows, each thread count in turn, yielded as they are measured."""
    if tiny:
        small = bench.Problem.random([(100,)] * 20, seed=1)
        big = bench.Problem.random([(32, 16, 3, 3)] * 10 + [(32,)] * 10, seed=2)
    else:
        small = bench.Problem.random(bench.small_shapes(), seed=1)
        big = bench.Problem.random(bench.resnet_sized_shapes(), seed=2)
    if quick or tiny:
        small_timing = dict(warmup=5, reps=20, trials=3)
        big_timing = dict(warmup=1, reps=2, trials=3)
        tiny_timing = dict(warmup=5, reps=20, trials=3)
    else:
        small_timing = dict(warmup=50, reps=200, trials=9)
        big_timing = dict(warmup=3, reps=10, trials=9)
        tiny_timing = dict(warmup=50, reps=300, trials=15)
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            label = f"memory-bound step ({len(big.weights)} tensors, {big.numel:,} params)"
            yield _ratio_row(label, big, 1.05, own=False, timing=big_timing)
            label = f"SAM's own cost ({len(small.weights)} small tensors)"
            yield _ratio_row(label, small, 0.35, own=True, timing=small_timing)
            yield _fused_kernel_row(small, reps=small_timing["reps"])
            yield _bare_row(tiny_timing)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- compiled kernels
def kernel_step(
    view: GroupView, backup: list[Tensor], first: list[Tensor], out: list[Tensor]
) -> Tensor:
    """The functional kernels of one step of SAM and GSAM, on one group of one dtype."""
    norm = F.norm([view], [view.grads])
    denominator = torch.nan_to_num(norm + 1e-12, nan=math.inf, posinf=math.inf)
    F.copy_(backup, view.params, True)
    scale = (0.05 / denominator).to(view.params[0].dtype)
    F.perturb_(view, 0, view.params, view.grads, scale, F.nonfinite_flag(norm), normed=True)
    coef = F.dot([view], [first], [view.grads])
    F.combine_(out, view.grads, 1.0 + 0.2 * coef.to(out[0].dtype), first, -0.2, True)
    F.lerp_(first, view.grads, 0.1, True)
    F.copy_(view.params, backup, True)
    return coef


def _best_time(call: Callable[[], object], reps: int) -> float:
    best = math.inf
    gc.collect()
    for _ in range(reps):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def compile_targets(tiny: bool, quick: bool, inductor: bool) -> tuple[list[Row], list[str]]:
    import torch._dynamo

    # 20 tensors (10 convolution weights, 10 biases): tracing 200 tensors takes minutes
    shapes = (
        [(32, 16, 3, 3)] * 10 + [(32,)] * 10 if tiny else [(256, 256, 3, 3)] * 10 + [(256,)] * 10
    )
    problem = bench.Problem.random(shapes, seed=4)
    params = [w.clone() for w in problem.weights]
    view = GroupView({"foreach": True}, params, problem.grads, Layout.of(params))
    backup = [torch.empty_like(p) for p in params]
    first = [g.clone() for g in problem.grads]
    out = [torch.empty_like(p) for p in params]
    args = (view, backup, first, out)
    kernel_step(*args)  # eager: builds the layout's cached buffers
    torch._dynamo.reset()
    explained = torch._dynamo.explain(kernel_step)(*args)
    breaks = explained.graph_break_count
    rows: list[Row] = [
        (
            f"graph breaks of the step's kernels under torch.compile ({len(shapes)} tensors)",
            f"{breaks} ({explained.graph_count} graph)",
            "== 0",
            _verdict(breaks == 0),
        )
    ]
    reps = 3 if quick or tiny else 20
    backends = ["aot_eager", *(["inductor"] if inductor else [])]
    times = {"eager": _best_time(lambda: kernel_step(*args), reps)}
    notes = []
    for backend in backends:
        torch._dynamo.reset()
        compiled = torch.compile(kernel_step, fullgraph=True, backend=backend)
        start = time.perf_counter()
        try:
            compiled(*args)
        except Exception as error:  # a backend that does not work on this machine
            notes.append(f"{backend}: did not compile here ({type(error).__name__})")
            continue
        notes.append(f"{backend}: compiled in {time.perf_counter() - start:.1f} s")
        times[backend] = _best_time(lambda c=compiled: c(*args), reps)
    text = ", ".join(f"{k} {bench.fmt_time(v)}" for k, v in times.items())
    rows.append(("the step's kernels, eager vs compiled (best of runs)", text, "-", "info"))
    return rows, notes


# --------------------------------------------------------------------------- report
def targets(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="Issue 20's CPU targets beside measurements")
    parser.add_argument("--targets-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--tiny", action="store_true", help="small problems (a smoke run)")
    parser.add_argument("--threads", default="1,2", help="thread counts of the timed targets")
    parser.add_argument("--no-inductor", action="store_true", help="do not time inductor")
    args = parser.parse_args(argv)
    threads = [int(n) for n in args.threads.split(",")]
    layers = 3 if args.tiny else 100
    print("issue 20's CPU targets (torchsam vs the reference PyTorch SAM)")
    print(f"torch {torch.__version__}, threads {threads}, {'tiny' if args.tiny else 'full'} sizes")
    widths = (78, 44, 20)
    header: Row = ("target", "measured", "limit", "result")

    def show(row: Row) -> None:  # each row as soon as it is measured
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3]]).rstrip(), flush=True)

    show(header)
    show(("-" * 78, "-" * 44, "-" * 20, "-" * 6))
    for row in op_targets(layers):
        show(row)
    for row in timed_targets(threads, args.tiny, args.quick):
        show(row)
    compiled, notes = compile_targets(
        args.tiny, args.quick, inductor=not (args.tiny or args.no_inductor)
    )
    for row in compiled:
        show(row)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    if "--targets-only" in sys.argv[1:]:
        targets(sys.argv[1:])
    else:
        main()
    sys.exit(0)
