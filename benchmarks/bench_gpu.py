"""Time, host synchronisations and kernels per training step of SAM and its family on a GPU.

Run it as ``python benchmarks/bench_gpu.py`` on a machine with CUDA. Where CUDA is not
available it prints one line saying so and exits with status 0 (``--json`` then records
that). ``--cpu-proxy`` runs the same contenders on the CPU instead, on a narrow model, and counts
what a GPU would pay for: host synchronisations and dispatched operators per step (see below).
It prints a report and always exits with status 0: it is a measurement, not a test.

Setup (issue 20): the package's CIFAR ResNet-18 (:func:`torchsam.experiments.models.resnet18`,
11.2M parameters), a batch of ``--batch`` (512) random 32x32 images and labels already on the
GPU, bf16 autocast (float32 on a GPU without bfloat16: the header says which precision ran),
``channels_last`` model and inputs, ``torch.backends.cudnn.benchmark`` on, cross-entropy loss,
SGD with lr 0.1, momentum 0.9 and weight decay 5e-4 as the (base) optimizer, rho 0.05,
BatchNorm statistics frozen in the second pass with :func:`torchsam.freeze_running_stats`.
Each contender owns a copy of the same initial model.

Contenders, side by side in one process:

* ``SGD``: the base optimizer alone, one forward/backward per step: the unit of the ratios.
* ``reference``: the seed's SAM (:class:`torchsam.experiments.bench.ReferenceSAM`).
* ``SAM``: ``torchsam.SAM`` with its defaults (the non-finite guard on), two-call style;
  ``SAM skip_nonfinite=False`` without the guard; ``SAM fused SGD`` with ``fused=True`` passed
  to SGD.
* ``LookSAM k=5``, ``IntermittentSAM every=5``, ``GSAM``, ``FriendlySAM``, ``VaSSO``: two-call
  style with their defaults (``first_step`` returning False means no second pass).
* ``SAF``: SGD with :class:`torchsam.SAF`'s term (50,000 samples, the module on the GPU, each
  batch's indices on the GPU), ``MESA``: SGD with :class:`torchsam.MESA`'s term and its EMA
  update, both in an epoch where the term is active.
* ``ESAM beta=gamma=0.5``: ``step(closure)`` with per-sample losses.

Measurements:

* **ms/step**: per round, each contender (in an order that rotates from round to round) takes
  ``--warmup`` steps, then ``--steps`` steps between two CUDA events, with
  ``torch.cuda.synchronize`` before and after; the best of ``--rounds`` rounds is reported.
  Warm-up and timed steps are multiples of 5 by default, so that LookSAM k=5 and
  IntermittentSAM every=5 take whole cycles.
* **syncs/step**: host synchronisations over 10 steps (two cycles) under
  ``torch.cuda.set_sync_debug_mode("warn")``, counted from the warnings, divided by 10 (the
  warnings of the calling thread: a synchronisation inside a backward pass, which autograd
  runs in its own thread on a GPU, would be printed but not counted).
* **kernels/step**: CUDA kernels (memory copies and sets apart) recorded by
  ``torch.profiler`` over 5 steps (one cycle) at batch ``--profile-batch`` (64), divided by 5;
  the JSON's ``kernel_launches_per_step`` counts the host's launch calls (``LAUNCH_APIS``).
  Each time, sync count and kernel count is printed (flushed) as soon as it is measured,
  and the table once before the kernel count (times and syncs) and once after it.
* **CUDA graphs** (``--part graphs``, or after the table by default): a whole SAM step with
  ``skip_nonfinite=False`` on a small CNN (32/64 channels, BatchNorm, batch 256 of 32x32,
  float32), with SGD and with Adam(``capturable=True``): eager and replayed from a
  ``torch.cuda.CUDAGraph``, and, unless ``--no-compile``, with SGD, the model compiled by
  ``torch.compile(mode="reduce-overhead")`` (docs/gpu.md's recipes); ms per step (``--warmup``
  and ``--steps`` per round, best of ``--rounds``) and the gain over eager, each printed
  (flushed) as soon as it is measured, so that a timeout while compiling keeps them.
* With ``--cpu-proxy``: syncs and operators per step counted on the CPU by
  :class:`torchsam.experiments._dispatch_count.DispatchCounter` (ResNet-18 of width 4, batch
  4 of 8x8 images, float32: counts, not times; an operator is a proxy for a kernel launch;
  the counts do not depend on the sizes).

Targets (issue 20), printed beside each measurement with PASS or MISS: SAM (default guard) at
most 1.00x the reference's time; LookSAM k=5 at most 1.25x SGD, IntermittentSAM every=5 at most
1.22x, SAF at most 1.05x, MESA at most 1.40x; GSAM at most 1.05x SAM's time, FriendlySAM and
VaSSO at most 1.03x; host syncs per step 0 for SAF and MESA, 0 for every optimizer without the
guard and with a fused base optimizer (whose ``found_inf`` keeps the skip decision on the
device), at most 1 for the others.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsam
from torchsam.experiments._dispatch_count import DispatchCounter
from torchsam.experiments.bench import ReferenceSAM
from torchsam.experiments.models import resnet18, small_cnn
from torchsam.experiments.tables import aligned

LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
RHO = 0.05
NUM_CLASSES = 10
NUM_SAMPLES = 50_000  # SAF's history: CIFAR's training set
EPOCH = 5  # SAF's and MESA's terms are active from their default start_epoch, 5
BATCHES = 5  # distinct batches, cycled
COUNTED_STEPS = 10  # steps over which syncs are counted (two 5-step cycles)
PROFILED_STEPS = 5  # steps over which kernels are counted (one cycle: one LookSAM sharp step)
SYNC_WARNING = "called a synchronizing CUDA operation"
LAUNCH_APIS = (
    # the CUDA runtime's launches: ATen's kernels (cudaLaunchKernel), CUTLASS and cuBLAS/cuDNN
    # kernels launched with attributes such as clusters on Hopper (cudaLaunchKernelExC), and
    # cooperative kernels
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cudaLaunchCooperativeKernel",
    "cudaLaunchCooperativeKernelMultiDevice",
    # the driver's launches: Triton's and cuDNN's/cuBLAS's runtime-compiled kernels
    # (cuLaunchKernel), with attributes (cuLaunchKernelEx), cooperative kernels
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cuLaunchCooperativeKernel",
)
"""The names ``torch.profiler`` gives the CUDA runtime and driver calls that launch one kernel
each (as kineto and ``torch.profiler``'s own tools list them); the ``kernel_launches_per_step``
of the JSON counts these. A graph replay (``cudaGraphLaunch``) launches many and is not one."""


@dataclass(frozen=True)
class Trainer:
    """A contender's copy of the model and its training step on batch ``i`` (cycled)."""

    model: nn.Module
    step: Callable[[int], None]


# --------------------------------------------------------------------------- the set-up
@dataclass
class Setup:
    """Where and how a contender trains: the device, the batches, autocast."""

    device: torch.device
    batch: int
    width: int = 64
    image: int = 32
    autocast: bool = True
    seed: int = 0
    xs: list[Tensor] = field(default_factory=list)
    ys: list[Tensor] = field(default_factory=list)
    indices: list[Tensor] = field(default_factory=list)
    model: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(BATCHES):
            x = torch.randn(self.batch, 3, self.image, self.image, generator=gen)
            self.xs.append(x.to(self.device).contiguous(memory_format=torch.channels_last))
            self.ys.append(torch.randint(NUM_CLASSES, (self.batch,), generator=gen).to(self.device))
            index = torch.randperm(NUM_SAMPLES, generator=gen)[: self.batch]
            self.indices.append(index.to(self.device))
        torch.manual_seed(self.seed)
        shape = (3, self.image, self.image)
        model = resnet18(shape, num_classes=NUM_CLASSES, width=self.width)
        # Module.to takes memory_format (its type stubs do not say so)
        self.model = model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]

    def fresh_model(self) -> nn.Module:
        """A copy of the initial model (every contender starts from the same weights)."""
        return copy.deepcopy(self.model)

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(x)

    def loss(self, model: nn.Module, i: int) -> Tensor:
        """The mean cross-entropy of batch ``i`` (cycled)."""
        x, y = self.xs[i % BATCHES], self.ys[i % BATCHES]
        return F.cross_entropy(self.logits(model, x).float(), y)

    def per_sample_loss(self, model: nn.Module, i: int, rows: Tensor | None) -> Tensor:
        """The per-sample cross-entropy of the ``rows`` of batch ``i`` (all when None)."""
        x, y = self.xs[i % BATCHES], self.ys[i % BATCHES]
        if rows is not None:
            x, y = x[rows], y[rows]
        return F.cross_entropy(self.logits(model, x).float(), y, reduction="none")


def sgd_kwargs(**extra: Any) -> dict[str, Any]:
    return dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **extra)


# --------------------------------------------------------------------------- the contenders
def sgd_step(setup: Setup) -> Trainer:
    model = setup.fresh_model()
    opt = torch.optim.SGD(model.parameters(), **sgd_kwargs())

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        setup.loss(model, i).backward()
        opt.step()

    return Trainer(model, step)


def two_call_step(make: Callable[[Any], Any]) -> Callable[[Setup], Trainer]:
    """The two-call style of the README: ``first_step``, a second pass with BatchNorm's
    statistics frozen when it is due (LookSAM and IntermittentSAM skip it on their plain steps:
    ``first_step`` returns False), ``second_step``."""

    def build(setup: Setup) -> Trainer:
        model = setup.fresh_model()
        opt = make(model.parameters())

        def step(i: int) -> None:
            setup.loss(model, i).backward()
            if opt.first_step(zero_grad=True) is not False:  # the reference returns None
                with torchsam.freeze_running_stats(model):
                    setup.loss(model, i).backward()
            opt.second_step(zero_grad=True)

        return Trainer(model, step)

    return build


def sam_family(cls: Any, **options: Any) -> Callable[[Setup], Trainer]:
    return two_call_step(lambda params: cls(params, torch.optim.SGD, **options, **sgd_kwargs()))


def saf_step(setup: Setup) -> Trainer:
    model = setup.fresh_model()
    opt = torch.optim.SGD(model.parameters(), **sgd_kwargs())
    saf = torchsam.SAF(NUM_SAMPLES, NUM_CLASSES).to(setup.device)

    def step(i: int) -> None:
        x, y = setup.xs[i % BATCHES], setup.ys[i % BATCHES]
        logits = setup.logits(model, x).float()
        loss = F.cross_entropy(logits, y) + saf(logits, setup.indices[i % BATCHES], EPOCH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Trainer(model, step)


def mesa_step(setup: Setup) -> Trainer:
    model = setup.fresh_model()
    opt = torch.optim.SGD(model.parameters(), **sgd_kwargs())
    mesa = torchsam.MESA(model)

    def step(i: int) -> None:
        x, y = setup.xs[i % BATCHES], setup.ys[i % BATCHES]
        logits = setup.logits(model, x)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.autocast):
            term = mesa(logits.float(), x, EPOCH)  # the EMA's forward pass under autocast too
        loss = F.cross_entropy(logits.float(), y) + term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mesa.update(model)

    return Trainer(model, step)


def esam_step(setup: Setup) -> Trainer:
    model = setup.fresh_model()
    opt = torchsam.ESAM(
        model.parameters(), torch.optim.SGD, rho=RHO, beta=0.5, gamma=0.5, **sgd_kwargs()
    )

    def step(i: int) -> None:
        def closure(rows: Tensor | None) -> Tensor:
            with torchsam.freeze_running_stats(model, enabled=opt.perturbed):
                return setup.per_sample_loss(model, i, rows)

        opt.step(closure)

    return Trainer(model, step)


@dataclass(frozen=True)
class Target:
    """At most ``limit`` times the time of ``against`` (a contender's name)."""

    limit: float
    against: str


@dataclass(frozen=True)
class Contender:
    name: str
    build: Callable[[Setup], Trainer]
    time_target: Target | None = None
    sync_target: int | None = None


def contenders() -> list[Contender]:
    """The contenders of issue 20, with its targets."""
    looksam, intermittent = torchsam.LookSAM, torchsam.IntermittentSAM
    return [
        Contender("SGD", sgd_step, sync_target=0),
        Contender(
            "reference",
            two_call_step(lambda p: ReferenceSAM(p, torch.optim.SGD, rho=RHO, **sgd_kwargs())),
        ),
        Contender("SAM", sam_family(torchsam.SAM, rho=RHO), Target(1.00, "reference"), 1),
        Contender(
            "SAM skip_nonfinite=False",
            sam_family(torchsam.SAM, rho=RHO, skip_nonfinite=False),
            sync_target=0,
        ),
        Contender("SAM fused SGD", sam_family(torchsam.SAM, rho=RHO, fused=True), sync_target=0),
        Contender("LookSAM k=5", sam_family(looksam, rho=RHO, k=5), Target(1.25, "SGD"), 1),
        Contender(
            "IntermittentSAM every=5", sam_family(intermittent, every=5), Target(1.22, "SGD"), 1
        ),
        Contender("GSAM", sam_family(torchsam.GSAM, rho=RHO), Target(1.05, "SAM"), 1),
        Contender("FriendlySAM", sam_family(torchsam.FriendlySAM, rho=RHO), Target(1.03, "SAM"), 1),
        Contender("VaSSO", sam_family(torchsam.VaSSO, rho=RHO), Target(1.03, "SAM"), 1),
        Contender("SAF", saf_step, Target(1.05, "SGD"), 0),
        Contender("MESA", mesa_step, Target(1.40, "SGD"), 0),
        Contender("ESAM beta=gamma=0.5", esam_step),
    ]


# --------------------------------------------------------------------------- measuring
@dataclass
class Result:
    """What was measured for one contender (None: not measured)."""

    name: str
    rounds_ms: list[float] = field(default_factory=list)
    syncs: float | None = None
    kernels: float | None = None
    launches: float | None = None
    ops: float | None = None
    sync_ops: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    next_index: int = 0

    @property
    def ms(self) -> float | None:
        return min(self.rounds_ms) if self.rounds_ms else None


def progress(line: str) -> None:
    """A measurement of the GPU table as soon as it exists (flushed): a run cut short by a
    timeout keeps it in its log."""
    print(f"  {line}", flush=True)


def _fail(result: Result, what: str, exc: BaseException) -> None:
    result.errors.append(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0][:300])


def time_rounds(
    trainers: dict[str, Trainer], results: dict[str, Result], warmup: int, timed: int, rounds: int
) -> None:
    """Best-of-rounds timing with CUDA events; the order of the contenders rotates. Each time
    is printed (flushed) as soon as it is measured, each failure too."""
    names = list(trainers)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            result = results[name]
            if result.errors:
                continue
            try:
                step, i = trainers[name].step, result.next_index
                for _ in range(warmup):
                    step(i)
                    i += 1
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(timed):
                    step(i)
                    i += 1
                end.record()
                torch.cuda.synchronize()
                result.next_index = i
                result.rounds_ms.append(start.elapsed_time(end) / timed)
                progress(f"round {r + 1}/{rounds}: {name} {result.rounds_ms[-1]:.2f} ms/step")
            except Exception as exc:  # one contender's failure must not stop the others
                _fail(result, "timing", exc)
                progress(f"{name}: {result.errors[-1]}")


def count_syncs(trainer: Trainer, result: Result) -> None:
    """Host synchronisations per step: CUDA's sync debug mode warns at each one."""
    torch.cuda.synchronize()
    i = result.next_index
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for k in range(COUNTED_STEPS):
                    trainer.step(i + k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    except Exception as exc:
        _fail(result, "syncs", exc)
        progress(f"{result.name}: {result.errors[-1]}")
        return
    result.next_index = i + COUNTED_STEPS
    result.syncs = sum(SYNC_WARNING in str(w.message) for w in caught) / COUNTED_STEPS
    progress(f"syncs: {result.name} {result.syncs:.1f}/step")


def count_kernels(contender: Contender, setup: Setup, result: Result) -> None:
    """CUDA kernels per step (``torch.profiler``), on a fresh copy at the profiling batch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        step = contender.build(setup).step
        for i in range(BATCHES):  # warm-up: lazy state, cuDNN's autotuning
            step(i)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(BATCHES, BATCHES + PROFILED_STEPS):
                step(i)
            torch.cuda.synchronize()
        events = list(prof.events())
    except Exception as exc:
        _fail(result, "kernels", exc)
        progress(f"{result.name}: {result.errors[-1]}")
        return
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
    launches = [e for e in events if e.name in LAUNCH_APIS]
    result.kernels = len(kernels) / PROFILED_STEPS
    result.launches = len(launches) / PROFILED_STEPS
    progress(f"kernels: {result.name} {result.kernels:.0f}/step")


def count_on_cpu(contender: Contender, setup: Setup, result: Result) -> None:
    """The CPU proxy: syncs and dispatched operators per step, with ``DispatchCounter``."""
    try:
        step = contender.build(setup).step
        for i in range(BATCHES):
            step(i)
        with DispatchCounter() as counter:
            for i in range(BATCHES, BATCHES + COUNTED_STEPS):
                step(i)
    except Exception as exc:
        _fail(result, "cpu proxy", exc)
        return
    result.syncs = counter.syncs / COUNTED_STEPS
    result.ops = counter.ops / COUNTED_STEPS
    result.sync_ops = dict(counter.sync_ops)


# --------------------------------------------------------------------------- CUDA graphs
GRAPH_BATCH = 256


def _sam_step(model: nn.Module, optimizer: Any, x: Tensor, y: Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    optimizer.first_step(zero_grad=True)
    with torchsam.freeze_running_stats(model):
        F.cross_entropy(model(x), y).backward()
    optimizer.second_step(zero_grad=True)


def _best_ms(fn: Callable[[], None], warmup: int, steps: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / steps)
    return best


class GraphSetup:
    """The problem of the CUDA-graph timing: a small CNN (32x32 inputs, 32/64 channels,
    BatchNorm, float32), one batch of ``GRAPH_BATCH``, SAM with ``skip_nonfinite=False``."""

    def __init__(self, warmup: int, steps: int, rounds: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(GRAPH_BATCH, 3, 32, 32, generator=gen).cuda()
        self.y = torch.randint(NUM_CLASSES, (GRAPH_BATCH,), generator=gen).cuda()
        self.timing = dict(warmup=warmup, steps=steps, rounds=rounds)

    def build(self, base: Any, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        model = small_cnn((3, 32, 32), NUM_CLASSES, channels=32).cuda()
        sam = torchsam.SAM(model.parameters(), base, rho=RHO, skip_nonfinite=False, **kwargs)
        return model, sam


GRAPH_BASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, sgd_kwargs()),
    "Adam capturable=True": (torch.optim.Adam, dict(lr=1e-3, capturable=True)),
}


GRAPH_MEASURES = {
    "eager_ms": "eager",
    "graph_ms": "CUDA graph",
    "compiled_ms": 'torch.compile(mode="reduce-overhead")',
}
"""The keys of a CUDA-graph row's times, and their words in the lines printed as each is
measured."""


def record_ms(row: dict[str, Any], key: str, ms: float) -> None:
    """Keep ``ms`` in ``row`` under ``key`` and print it at once (flushed), with its gain over
    eager: a run cut short later (by a timeout in ``torch.compile``) still shows it."""
    row[key] = ms
    line = f"  {row['base']}: {GRAPH_MEASURES[key]} {ms:.2f} ms/step"
    if key != "eager_ms" and "eager_ms" in row:
        gain = row["eager_ms"] / ms
        row[key.replace("_ms", "_gain")] = gain
        line += f", {gain:.2f}x eager"
    print(line, flush=True)


def record_error(row: dict[str, Any], what: str, exc: BaseException) -> None:
    """Keep the first line of ``exc`` in ``row``'s errors and print it at once (flushed)."""
    error = f"{what}: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    row["errors"].append(error)
    print(f"  {row['base']}: {error}", flush=True)


def graph_gain(problem: GraphSetup) -> list[dict[str, Any]]:
    """Eager against CUDA-graph replay of a whole SAM step (docs/gpu.md's first recipe), with
    each base optimizer of ``GRAPH_BASES``: ms per step, best of the rounds, and the gain, each
    printed as soon as it is measured."""
    rows = []
    for name, (base, kwargs) in GRAPH_BASES.items():
        row: dict[str, Any] = {"base": name, "errors": []}
        rows.append(row)
        try:
            model, opt = problem.build(base, kwargs)
            x, y = problem.x, problem.y
            eager = functools.partial(_sam_step, model, opt, x, y)
            record_ms(row, "eager_ms", _best_ms(eager, **problem.timing))
            model, opt = problem.build(base, kwargs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: the optimizer's state is made here
                for _ in range(3):
                    _sam_step(model, opt, x, y)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _sam_step(model, opt, x, y)
            record_ms(row, "graph_ms", _best_ms(graph.replay, **problem.timing))
        except Exception as exc:
            record_error(row, "graph", exc)
    return rows


def add_compiled(problem: GraphSetup, row: dict[str, Any]) -> None:
    """docs/gpu.md's second recipe, the model compiled with ``mode="reduce-overhead"`` (the
    optimizer runs eagerly, so one base optimizer, ``row``'s, is enough)."""
    try:
        plain, opt = problem.build(*GRAPH_BASES[row["base"]])
        compiled = cast(nn.Module, torch.compile(plain, mode="reduce-overhead"))
        x, y = problem.x, problem.y

        def compiled_step() -> None:
            torch.compiler.cudagraph_mark_step_begin()
            _sam_step(compiled, opt, x, y)

        record_ms(row, "compiled_ms", _best_ms(compiled_step, **{**problem.timing, "warmup": 5}))
    except Exception as exc:
        record_error(row, "compile", exc)


def print_graph_header() -> None:
    print(
        "CUDA graphs: a whole SAM step (skip_nonfinite=False), small CNN 32/64 channels + "
        f"BatchNorm, batch {GRAPH_BATCH} of 32x32, float32; ms/step, best of rounds "
        "(each printed as measured, then the table)",
        flush=True,
    )


def print_graph_gain(rows: list[dict[str, Any]]) -> None:
    """The table of the CUDA-graph gain (the errors were printed as they happened)."""
    table = [("base optimizer", "eager", "CUDA graph", "gain", "compiled", "gain")]
    for row in rows:
        table.append(
            (
                row["base"],
                _fmt(row.get("eager_ms"), ".2f"),
                _fmt(row.get("graph_ms"), ".2f"),
                _fmt(row.get("graph_gain"), ".2f") + "x",
                _fmt(row.get("compiled_ms"), ".2f"),
                _fmt(row.get("compiled_gain"), ".2f") + "x",
            )
        )
    print_table(table)


# --------------------------------------------------------------------------- the report
def verdict(value: float | None, limit: float | None) -> str:
    if value is None or limit is None:
        return ""
    return "PASS" if value <= limit + 1e-9 else "MISS"


def time_check(contender: Contender, results: dict[str, Result]) -> dict[str, Any] | None:
    """The time target of ``contender``: the measured ratio beside the limit."""
    target = contender.time_target
    if target is None:
        return None
    other_result = results.get(target.against)
    own, other = results[contender.name].ms, other_result.ms if other_result else None
    ratio = own / other if own is not None and other is not None else None
    return {
        "against": target.against,
        "limit": target.limit,
        "ratio": ratio,
        "verdict": verdict(ratio, target.limit) or "not measured",
    }


def sync_check(contender: Contender, result: Result) -> dict[str, Any] | None:
    if contender.sync_target is None:
        return None
    return {
        "limit": contender.sync_target,
        "value": result.syncs,
        "verdict": verdict(result.syncs, contender.sync_target) or "not measured",
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(
    chosen: list[Contender], results: dict[str, Result], *, cpu_proxy: bool
) -> tuple[list[tuple[str, ...]], list[dict[str, Any]]]:
    """The printed table and the JSON rows."""
    sgd = results["SGD"].ms if "SGD" in results else None
    if cpu_proxy:
        header: tuple[str, ...] = ("contender", "syncs/step", "target", "ops/step", "sync ops")
    else:
        header = (
            "contender",
            "ms/step",
            "x SGD",
            "time target",
            "syncs/step",
            "sync target",
            "kernels/step",
        )
    table = [header]
    rows = []
    for c in chosen:
        r = results[c.name]
        timing, syncs = time_check(c, results), sync_check(c, r)
        sync_cell = "" if syncs is None else f"<= {syncs['limit']} {syncs['verdict']}"
        x_sgd = r.ms / sgd if r.ms is not None and sgd is not None else None
        if cpu_proxy:
            table.append(
                (c.name, _fmt(r.syncs, ".1f"), sync_cell, _fmt(r.ops, ".0f"), str(r.sync_ops))
            )
        else:
            time_cell = ""
            if timing is not None:
                time_cell = (
                    f"{_fmt(timing['ratio'], '.2f')}x {timing['against']} "
                    f"<= {timing['limit']:.2f} {timing['verdict']}"
                )
            table.append(
                (
                    c.name,
                    _fmt(r.ms, ".2f"),
                    _fmt(x_sgd, ".2f"),
                    time_cell,
                    _fmt(r.syncs, ".1f"),
                    sync_cell,
                    _fmt(r.kernels, ".0f"),
                )
            )
        rows.append(
            {
                "name": c.name,
                "ms_per_step": r.ms,
                "rounds_ms": r.rounds_ms,
                "x_sgd": x_sgd,
                "time_target": timing,
                "syncs_per_step": r.syncs,
                "sync_target": syncs,
                "kernels_per_step": r.kernels,
                "kernel_launches_per_step": r.launches,
                "ops_per_step": r.ops,
                "sync_ops": r.sync_ops,
                "errors": r.errors,
            }
        )
    return table, rows


def print_table(table: Sequence[tuple[str, ...]]) -> None:
    print(aligned(table))


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# --------------------------------------------------------------------------- the command
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_gpu.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (30)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps per round (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (3)")
    parser.add_argument("--batch", type=int, default=512, help="batch of the timing (512)")
    parser.add_argument(
        "--profile-batch", type=int, default=64, help="batch of the kernel count; 0: skip (64)"
    )
    parser.add_argument("--only", default="", help="comma-separated contender names (all)")
    parser.add_argument(
        "--part",
        choices=("all", "table", "graphs"),
        default="all",
        help="the contenders' table, the CUDA-graph gain, or both (all)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="leave torch.compile out of the CUDA-graph gain",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--cpu-proxy",
        action="store_true",
        help="count syncs and operators per step on the CPU instead (no timing)",
    )
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.profile_batch < 0:
        parser.error("--warmup and --profile-batch must be >= 0")
    return args


def choose(only: str) -> list[Contender]:
    every = contenders()
    if not only:
        return every
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = {c.name: c for c in every}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"bench_gpu.py: unknown contender(s) {unknown}; known: {list(known)}")
    # the contenders a target compares against come along
    wanted = set(names)
    for name in names:
        target = known[name].time_target
        if target is not None:
            wanted.add(target.against)
    return [c for c in every if c.name in wanted]


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = choose(args.only)
    results = {c.name: Result(c.name) for c in chosen}
    if args.cpu_proxy:
        setup = Setup(torch.device("cpu"), batch=4, width=4, image=8, autocast=False)
        print(
            "bench_gpu.py --cpu-proxy: host synchronisations and dispatched operators per "
            f"training step, counted on the CPU over {COUNTED_STEPS} steps after {BATCHES} "
            "warm-up steps (ResNet-18 of width 4, batch 4 of 8x8, float32; forward and backward "
            "included; torch " + torch.__version__ + ")"
        )
        for c in chosen:
            count_on_cpu(c, setup, results[c.name])
        table, rows = report(chosen, results, cpu_proxy=True)
        print_table(table)
        _print_errors(rows)
        write_json(args.json, {"mode": "cpu-proxy", "environment": environment(), "rows": rows})
        return 0
    if not torch.cuda.is_available():
        print(
            f"bench_gpu.py: CUDA is not available here (torch {torch.__version__}); "
            "this benchmark measures on a GPU, nothing was measured"
        )
        write_json(args.json, {"mode": "skipped", "environment": environment(), "rows": []})
        return 0

    torch.backends.cudnn.benchmark = True
    env = environment()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload: dict[str, Any] = {"mode": "gpu", "environment": env, "args": config}
    if args.part in ("all", "table"):

        def save(rows: list[dict[str, Any]]) -> None:
            payload["rows"] = rows
            write_json(args.json, payload)

        contenders_table(args, chosen, results, env, save)
    if args.part in ("all", "graphs"):
        print_graph_header()
        problem = GraphSetup(args.warmup, args.steps, args.rounds)
        payload["graphs"] = graphs = graph_gain(problem)
        # printed as measured and saved: kept even if compiling runs out of time
        write_json(args.json, payload)
        if not args.no_compile:
            print(
                '  compiling the model (torch.compile(mode="reduce-overhead"); a cold compile '
                "takes a minute or more)",
                flush=True,
            )
            add_compiled(problem, graphs[0])
            write_json(args.json, payload)
        print_graph_gain(graphs)
    return 0


def contenders_table(
    args: argparse.Namespace,
    chosen: list[Contender],
    results: dict[str, Result],
    env: dict[str, Any],
    save: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Time, syncs and kernels of every chosen contender on the GPU; prints the table and
    passes the rows to ``save`` (also before the kernel count, which takes longest)."""
    device = torch.device("cuda")
    bf16, precision = gpu_precision()
    env["precision"] = precision
    print(
        f"bench_gpu.py on {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}: ResNet-18 "
        f"(CIFAR), batch {args.batch} of 32x32, {precision}, channels_last, SGD lr {LR} "
        f"momentum {MOMENTUM} wd {WEIGHT_DECAY}, rho {RHO}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per round, best of {args.rounds} interleaved rounds",
        flush=True,
    )
    setup = Setup(device, args.batch, autocast=bf16)
    trainers: dict[str, Trainer] = {}
    for c in chosen:
        try:
            trainers[c.name] = c.build(setup)
        except Exception as exc:
            _fail(results[c.name], "build", exc)
    time_rounds(trainers, results, args.warmup, args.steps, args.rounds)
    for name, trainer in trainers.items():
        if not results[name].errors:
            count_syncs(trainer, results[name])
    del trainers, setup
    torch.cuda.empty_cache()
    table, rows = report(chosen, results, cpu_proxy=False)
    save(rows)
    if args.profile_batch:
        print_table(table)  # the times and syncs, kept if the kernel count runs out of time
        print("counting kernels (torch.profiler); the table follows with them", flush=True)
        small = Setup(device, args.profile_batch, autocast=bf16)
        for c in chosen:
            count_kernels(c, small, results[c.name])
            torch.cuda.empty_cache()
    table, rows = report(chosen, results, cpu_proxy=False)
    print_table(table)
    print(
        f"syncs: per step over {COUNTED_STEPS} steps (torch.cuda.set_sync_debug_mode('warn')); "
        f"kernels: CUDA kernels per step over {PROFILED_STEPS} steps at batch "
        f"{args.profile_batch} (torch.profiler)"
    )
    _print_errors(rows)
    save(rows)


def gpu_precision() -> tuple[bool, str]:
    """Whether the contenders' table runs under bf16 autocast on this GPU, and the words that
    say so in its header: float32 where the GPU does not support bfloat16 (CUDA's autocast
    would refuse it), and "emulated" where torch supports it only by emulation (below compute
    capability 8.0), where it is slower than float32 would be."""
    if not torch.cuda.is_bf16_supported():
        return False, "float32 (this GPU does not support bfloat16: no autocast)"
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        return True, "bf16 autocast (emulated: compute capability below 8.0)"
    return True, "bf16 autocast"


def _print_errors(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for error in row["errors"]:
            print(f"  {row['name']}: {error}")


if __name__ == "__main__":
    sys.exit(main())
