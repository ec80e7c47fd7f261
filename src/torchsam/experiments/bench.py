"""Overhead of ``torchsam.SAM`` against the reference PyTorch SAM, on CPU, in one process.

Run it as ``torchsam bench`` or ``python benchmarks/bench_overhead.py`` (a thin wrapper around
:func:`main`), with ``--quick`` for a short smoke run and ``--threads N`` for the intra-op
thread count (1 by default). It prints a report and always exits with status 0: it is a
measurement, not a test.

Contenders, all wrapping ``torch.optim.SGD(lr=0.1, momentum=0.9)`` with the base optimizer's
default ``foreach`` choice (on CPU tensors that is the per-tensor loop, for every contender):

* ``reference``: the reference PyTorch implementation of SAM (davda54/sam, the code most users
  start from; here without its ``adaptive`` option), re-typed below as :class:`ReferenceSAM`;
  it is the baseline.
* ``torchsam``: ``torchsam.SAM`` with its defaults (its own kernels are ``torch._foreach_*``).
* ``torchsam foreach=False``: ``torchsam.SAM(..., foreach=False)`` (per-tensor kernels; the
  keyword also reaches SGD, which on CPU changes nothing there).
* ``base``: the SGD step alone, used to isolate the optimizer's own cost.

Each contender owns an identical copy of the parameters. Gradients are fixed random tensors set
once (no forward/backward is timed) and never zeroed, so autograd allocates nothing. One timed
"step" of a SAM contender is ``first_step()`` followed by ``second_step()``.

Scenarios:

1. many small tensors: 200 tensors of 1,000 elements. Metric: the optimizer's own cost per
   step, time(first_step + second_step) - time(SGD step alone), paired per trial.
   Target: torchsam <= 0.35x the reference. A component line follows (see
   :func:`step_components`): single calls of ``first_step()``, ``second_step()`` and the SGD
   step, and the two multi-tensor passes over the weights that an exact restore needs.
2. ResNet-sized: the 62 parameter shapes of torchvision's ResNet-18 (11,689,512 elements) plus
   138 bias-like 1-D tensors cycling through 64/128/256/512 elements, 200 tensors and about
   11.7M elements in all. Metric: total time per step (including the SGD step).
   Target: torchsam <= 1.1x the reference.
3. allocations (not timed), on the tensors of scenario 1: op outputs, recorded with a
   ``TorchDispatchMode``, that have at least as many elements as the smallest parameter and
   whose storage is not shared with any input of the op, during one step taken after two
   warm-up steps. Target: 0 for torchsam.
4. host synchronisations and dispatched operators per step (not timed), counted with
   :class:`torchsam.experiments._dispatch_count.DispatchCounter` for the seed's code
   (:class:`ReferenceSAM`), SAM and every variant (both kinds of step for LookSAM ``k=5`` and
   IntermittentSAM ``every=5``), by default and with ``skip_nonfinite=False``, on an MLP of 100
   ``Linear(10, 10)`` layers (the user's forward and backward passes are not counted). An
   operator is a proxy for a kernel launch on a GPU (a ``torch._foreach_*`` call is one; views
   are not counted); a synchronisation stalls a GPU's launch queue. Target: at most 1 per step
   by default (the decision to skip a step with a non-finite gradient), 0 without the guard.

Timing: warm-up steps, then per trial ``reps`` back-to-back steps of each contender (the order
of contenders rotates from trial to trial), ``time.perf_counter``, the garbage collector paused
while timing (as ``timeit`` does); the reported figure is the median over trials.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import torchsam
from torchsam.experiments._dispatch_count import DispatchCounter

LR = 0.1
MOMENTUM = 0.9
RHO = 0.05

REFERENCE = "reference"
TORCHSAM = "torchsam"
TORCHSAM_LOOP = "torchsam foreach=False"
BASE = "base"
SAM_CONTENDERS = (REFERENCE, TORCHSAM, TORCHSAM_LOOP)

Shape = tuple[int, ...]
Step = Callable[[], None]


# --------------------------------------------------------------------------- the baseline
class ReferenceSAM(torch.optim.Optimizer):
    """The reference PyTorch implementation of SAM (davda54/sam), re-typed as the baseline.

    ``first_step`` stacks the per-tensor gradient 2-norms, takes their 2-norm, forms
    ``e_w = grad * rho / (norm + 1e-12)`` (a new tensor per parameter), adds it to the weight and
    keeps it in the state; ``second_step`` subtracts ``e_w`` and lets the base optimizer step.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if rho < 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    def _grad_norm(self) -> Tensor:
        device = self.param_groups[0]["params"][0].device
        per_tensor = [
            p.grad.norm(p=2).to(device)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return torch.norm(torch.stack(per_tensor), p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(self.state[p]["e_w"])
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


# --------------------------------------------------------------------------- problem set-up
def small_shapes() -> list[Shape]:
    """Scenario 1: 200 tensors of 1,000 elements."""
    return [(1000,)] * 200


def resnet18_shapes() -> list[Shape]:
    """The 62 parameter shapes of torchvision's ResNet-18, in module order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    in_ch = 64
    for out_ch, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            cin = in_ch if block == 0 else out_ch
            shapes += [(out_ch, cin, 3, 3), (out_ch,), (out_ch,)]  # conv1, bn1
            shapes += [(out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]  # conv2, bn2
            if block == 0 and (first_stride != 1 or cin != out_ch):
                shapes += [(out_ch, cin, 1, 1), (out_ch,), (out_ch,)]  # downsample conv, bn
        in_ch = out_ch
    shapes += [(1000, 512), (1000,)]  # fc
    return shapes


def resnet_sized_shapes(count: int = 200) -> list[Shape]:
    """Scenario 2: ResNet-18's shapes padded to ``count`` tensors with bias-like vectors."""
    shapes = resnet18_shapes()
    widths = (64, 128, 256, 512)
    shapes += [(widths[i % len(widths)],) for i in range(count - len(shapes))]
    return shapes


@dataclass
class Problem:
    """Fixed initial weights and gradients; every contender gets its own copy."""

    weights: list[Tensor]
    grads: list[Tensor]

    @classmethod
    def random(cls, shapes: Sequence[Shape], seed: int = 0) -> Problem:
        gen = torch.Generator().manual_seed(seed)
        weights = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
        grads = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
        return cls(weights, grads)

    def params(self) -> list[torch.nn.Parameter]:
        out = []
        for w, g in zip(self.weights, self.grads, strict=True):
            p = torch.nn.Parameter(w.clone())
            p.grad = g.clone()
            out.append(p)
        return out

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights)


def build(name: str, problem: Problem) -> Step:
    """A fresh contender over its own copy of ``problem``, as a zero-argument step function."""
    params = problem.params()
    sgd_kwargs: dict[str, Any] = dict(lr=LR, momentum=MOMENTUM)
    if name == BASE:
        return torch.optim.SGD(params, **sgd_kwargs).step
    opt: Any
    if name == REFERENCE:
        opt = ReferenceSAM(params, torch.optim.SGD, rho=RHO, **sgd_kwargs)
    elif name == TORCHSAM:
        opt = torchsam.SAM(params, torch.optim.SGD, rho=RHO, **sgd_kwargs)
    elif name == TORCHSAM_LOOP:
        opt = torchsam.SAM(params, torch.optim.SGD, rho=RHO, foreach=False, **sgd_kwargs)
    else:
        raise ValueError(f"unknown contender {name!r}")

    def step() -> None:
        opt.first_step()
        opt.second_step()

    return step


# --------------------------------------------------------------------------- timing
def measure(steps: dict[str, Step], warmup: int, reps: int, trials: int) -> dict[str, list[float]]:
    """Seconds per step of each contender, one value per trial."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    per_trial: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for trial in range(trials):
            shift = trial % len(names)
            for name in names[shift:] + names[:shift]:
                step = steps[name]
                start = time.perf_counter()
                for _ in range(reps):
                    step()
                per_trial[name].append((time.perf_counter() - start) / reps)
    finally:
        if gc_was_enabled:
            gc.enable()
    return per_trial


def fmt_time(seconds: float) -> str:
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def spread(values: Sequence[float]) -> str:
    return (
        f"{fmt_time(statistics.median(values))} ({fmt_time(min(values))} - {fmt_time(max(values))})"
    )


@dataclass
class Row:
    scenario: str
    contender: str
    reference: str
    value: str
    ratio: str
    target: str
    result: str


def verdict(ok: bool, headline: bool) -> str:
    text = "PASS" if ok else "FAIL"
    return text if headline else f"({text.lower()})"


def scenario_small(warmup: int, reps: int, trials: int) -> tuple[list[Row], list[str]]:
    problem = Problem.random(small_shapes(), seed=1)
    steps = {name: build(name, problem) for name in (BASE, *SAM_CONTENDERS)}
    times = measure(steps, warmup, reps, trials)
    own_trials = {
        name: [t - b for t, b in zip(times[name], times[BASE], strict=True)]
        for name in SAM_CONTENDERS
    }
    own = {name: statistics.median(values) for name, values in own_trials.items()}
    notes = [
        f"scenario 1: {len(problem.weights)} tensors, {problem.numel:,} elements; "
        "per step, median (min - max) over trials:",
        f"  {BASE:<24} total {spread(times[BASE])}",
    ]
    notes += [
        f"  {name:<24} total {spread(times[name])}; own {spread(own_trials[name])}"
        for name in SAM_CONTENDERS
    ]
    notes += step_components(problem, calls=2 * reps)
    return ratio_rows("1 many small: own cost", own, 0.35), notes


def step_components(problem: Problem, calls: int) -> list[str]:
    """Where torchsam's own cost goes on ``problem``: the minimum over ``calls`` single calls
    of ``first_step()``, ``second_step()`` (base step included) and the SGD step alone, and of
    the two per-tensor passes over the weights that an exact restore needs whatever the
    bookkeeping: a multi-tensor copy (the restore) and a multi-tensor ``addcmul_`` with a
    0-dim scale (the perturbation), on copies of the same tensors."""
    params = problem.params()
    opt = torchsam.SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM)
    sgd = torch.optim.SGD(problem.params(), lr=LR, momentum=MOMENTUM)
    weights = [w.clone() for w in problem.weights]
    backup = [w.clone() for w in problem.weights]
    grads = [g.clone() for g in problem.grads]
    scales = [torch.tensor(1e-3)] * len(grads)
    parts: dict[str, Callable[[], object]] = {
        "first_step()": opt.first_step,
        "second_step()": opt.second_step,
        "SGD step": sgd.step,
        "copy": lambda: torch._foreach_copy_(weights, backup),
        "addcmul": lambda: torch._foreach_addcmul_(weights, grads, scales),
    }
    best = dict.fromkeys(parts, float("inf"))
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(calls):
            for name, call in parts.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    own = best["first_step()"] + best["second_step()"] - best["SGD step"]
    return [
        f"scenario 1 components, torchsam, minimum over {calls} single calls: "
        f"first_step() {fmt_time(best['first_step()'])}, "
        f"second_step() {fmt_time(best['second_step()'])} of which the SGD step "
        f"{fmt_time(best['SGD step'])}: own {fmt_time(own)}; the per-tensor passes an exact "
        f"restore needs, on the same tensors: copy (the restore) {fmt_time(best['copy'])}, "
        f"addcmul (the perturbation) {fmt_time(best['addcmul'])}",
    ]


def scenario_resnet(warmup: int, reps: int, trials: int) -> tuple[list[Row], list[str]]:
    problem = Problem.random(resnet_sized_shapes(), seed=2)
    steps = {name: build(name, problem) for name in (BASE, *SAM_CONTENDERS)}
    times = measure(steps, warmup, reps, trials)
    total = {name: statistics.median(times[name]) for name in times}
    notes = [
        f"scenario 2: {len(problem.weights)} tensors, {problem.numel:,} elements; "
        "per step, median (min - max) over trials:"
    ]
    notes += [f"  {name:<24} total {spread(times[name])}" for name in (BASE, *SAM_CONTENDERS)]
    return ratio_rows("2 ResNet-sized: total", total, 1.1), notes


def ratio_rows(scenario: str, value: dict[str, float], target: float) -> list[Row]:
    """One row per torchsam contender: its figure against the reference's, and the target."""
    rows = []
    for name in (TORCHSAM, TORCHSAM_LOOP):
        ratio = value[name] / value[REFERENCE] if value[REFERENCE] > 0 else float("nan")
        rows.append(
            Row(
                scenario,
                name,
                fmt_time(value[REFERENCE]),
                fmt_time(value[name]),
                f"{ratio:.2f}x",
                f"<= {target:.2f}x",
                verdict(ratio <= target, name == TORCHSAM),
            )
        )
    return rows


# --------------------------------------------------------------------------- allocations
def _storage_ptr(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None


class AllocationCounter(TorchDispatchMode):
    """Records op outputs of at least ``min_numel`` elements that own fresh storage."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel = min_numel
        self.records: list[tuple[str, int, int]] = []  # (op, numel, bytes)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.numel() < self.min_numel:
                continue
            ptr = _storage_ptr(t)
            if ptr is not None and ptr not in inputs:
                self.records.append((str(func), t.numel(), t.numel() * t.element_size()))
        return out


def count_allocations(name: str, problem: Problem, warmup: int = 2) -> AllocationCounter:
    step = build(name, problem)
    for _ in range(warmup):
        step()
    counter = AllocationCounter(min(w.numel() for w in problem.weights))
    with counter:
        step()
    return counter


def scenario_allocations() -> tuple[list[Row], list[str]]:
    problem = Problem.random(small_shapes(), seed=3)
    counters = {name: count_allocations(name, problem) for name in SAM_CONTENDERS}
    notes = []
    for name, counter in counters.items():
        ops: dict[str, int] = {}
        for op, _, _ in counter.records:
            ops[op] = ops.get(op, 0) + 1
        size = sum(b for _, _, b in counter.records)
        detail = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) or "none"
        notes.append(
            f"scenario 3: {name}: {len(counter.records)} parameter-sized allocations "
            f"({size / 2**20:.2f} MiB) per step: {detail}"
        )
    reference_count = len(counters[REFERENCE].records)
    rows = []
    for name in (TORCHSAM, TORCHSAM_LOOP):
        count = len(counters[name].records)
        rows.append(
            Row(
                "3 allocations/step",
                name,
                str(reference_count),
                str(count),
                "-",
                "== 0",
                verdict(count == 0, name == TORCHSAM),
            )
        )
    return rows, notes


# --------------------------------------------------------------------------- syncs and ops
@dataclass
class Contender:
    """An optimizer of the sync/op count: how to build it and how it takes a step."""

    name: str
    build: Callable[..., Any]
    style: str = "two-call"  # or "per-sample" (ESAM, MSAM: step(closure) with row indices)
    at: int = 2  # the step counted (after ``at`` warm-up steps); LookSAM k=5's 5th is sharp


def sync_contenders() -> list[Contender]:
    """The seed's code, SAM and every variant (both kinds of step for the intermittent ones)."""
    sgd: dict[str, Any] = dict(lr=LR, momentum=MOMENTUM)

    def make(cls: Any, **options: Any) -> Callable[..., Any]:
        def factory(params: Any, **extra: Any) -> Any:
            return cls(params, torch.optim.SGD, **options, **extra, **sgd)

        return factory

    def seed(params: Any, **extra: Any) -> Any:
        return ReferenceSAM(params, torch.optim.SGD, rho=RHO, **sgd)

    intermittent = torchsam.IntermittentSAM
    return [
        Contender("seed (reference SAM)", seed),
        Contender("SAM", make(torchsam.SAM, rho=RHO)),
        Contender("ASAM", make(torchsam.SAM, rho=0.5, adaptive=True)),
        Contender("GSAM", make(torchsam.GSAM, rho=RHO)),
        Contender("FriendlySAM", make(torchsam.FriendlySAM, rho=RHO)),
        Contender("VaSSO", make(torchsam.VaSSO, rho=RHO)),
        Contender("WSAM", make(torchsam.WSAM, rho=RHO)),
        Contender("MSAM m=4", make(torchsam.MSAM, rho=RHO, m=4), style="per-sample"),
        Contender("LookSAM k=5, sharpness step", make(torchsam.LookSAM, rho=RHO, k=5), at=5),
        Contender("LookSAM k=5, other step", make(torchsam.LookSAM, rho=RHO, k=5), at=6),
        Contender("IntermittentSAM every=5, SAM step", make(intermittent, every=5), at=5),
        Contender("IntermittentSAM every=5, other step", make(intermittent, every=5), at=6),
        Contender("ESAM", make(torchsam.ESAM, rho=RHO), style="per-sample"),
    ]


def count_step(
    contender: Contender, layers: int = 100, *, device: str = "cpu", **options: Any
) -> tuple[DispatchCounter, DispatchCounter]:
    """Count one step of ``contender`` on an MLP of ``layers`` Linear(10, 10) layers (two
    tensors each) on ``device``, after warm-up steps; the user's forward and backward passes
    (and the backward passes ESAM and MSAM run themselves) are not counted. Returns the
    counter of the step and that of the base optimizer's step alone on the same parameters
    (SGD with momentum; on CPU tensors its default is the per-tensor loop). On a GPU the
    counters also see copies to the host (see :mod:`torchsam.experiments._dispatch_count`)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(10, 10) for _ in range(layers)]).to(device)
    x, y = torch.randn(8, 10).to(device), torch.randn(8, 10).to(device)
    opt = contender.build(model.parameters(), **options)
    counter = DispatchCounter()

    def backward() -> None:
        with counter.paused():
            torch.nn.functional.mse_loss(model(x), y).backward()

    def per_sample(rows: Tensor | None) -> Tensor:
        with counter.paused():
            xb, yb = (x, y) if rows is None else (x[rows], y[rows])
            return ((model(xb) - yb) ** 2).mean(dim=1)

    def step() -> None:
        if contender.style == "per-sample":
            extra = {"batch_size": len(x)} if isinstance(opt, torchsam.MSAM) else {}
            opt.step(per_sample, **extra)
            return
        backward()
        if opt.first_step(zero_grad=True) is not False:  # the seed's returns None
            backward()
        opt.second_step(zero_grad=True)

    original_backward = Tensor.backward

    def paused_backward(self: Tensor, *args: Any, **kwargs: Any) -> None:
        with counter.paused():
            original_backward(self, *args, **kwargs)

    Tensor.backward = paused_backward  # type: ignore[method-assign]
    try:
        for _ in range(contender.at):
            step()
        with counter:
            step()
    finally:
        Tensor.backward = original_backward  # type: ignore[method-assign]

    base = DispatchCounter()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    torch.nn.functional.mse_loss(model(x), y).backward()
    sgd.step()
    with base:
        sgd.step()
    return counter, base


def scenario_syncs(layers: int = 100) -> tuple[list[Row], list[str]]:
    """Scenario 4: host synchronisations and dispatched ops per step, not timed."""
    lines = [
        f"scenario 4: host synchronisations and dispatched operators per step (not timed), on an "
        f"MLP of {layers} Linear(10, 10) layers ({2 * layers} tensors), SGD with momentum, after "
        "warm-up steps; 'own ops' leaves out the base SGD step (per-tensor loop on CPU); a "
        "torch._foreach_* call counts as one operator:",
    ]
    header = ("contender", "syncs", "ops", "own ops", "syncs, no guard", "own ops, no guard")
    table = [header]
    rows: list[Row] = []
    for contender in sync_contenders():
        counter, base = count_step(contender, layers)
        own = counter.ops - base.ops
        if contender.name.startswith("seed"):
            table.append((contender.name, str(counter.syncs), str(counter.ops), str(own), "-", "-"))
            continue
        unguarded, _ = count_step(contender, layers, skip_nonfinite=False)
        table.append(
            (
                contender.name,
                str(counter.syncs),
                str(counter.ops),
                str(own),
                str(unguarded.syncs),
                str(unguarded.ops - base.ops),
            )
        )
        ok = counter.syncs <= 1 and unguarded.syncs == 0
        rows.append(
            Row(
                "4 host syncs/step",
                contender.name,
                "0",
                f"{counter.syncs} / {unguarded.syncs}",
                "-",
                "<= 1 / 0",
                verdict(ok, True),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.append(f"  base SGD step alone: {base.ops} ops, {base.syncs} syncs")
    return rows, lines


# --------------------------------------------------------------------------- report
def print_table(rows: list[Row]) -> None:
    header = Row("scenario", "contender", "reference", "torchsam", "ratio", "target", "result")
    fields = list(vars(header))
    widths = {f: max(len(getattr(r, f)) for r in [header, *rows]) for f in fields}
    line = "  ".join("-" * widths[f] for f in fields)
    for i, row in enumerate([header, *rows]):
        print("  ".join(getattr(row, f).ljust(widths[f]) for f in fields).rstrip())
        if i == 0:
            print(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with ``argv`` (default: ``sys.argv[1:]``), print its report, return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.quick:
        small = dict(warmup=5, reps=20, trials=3)
        big = dict(warmup=1, reps=2, trials=3)
    else:
        small = dict(warmup=50, reps=200, trials=9)
        big = dict(warmup=3, reps=10, trials=9)

    print("torchsam SAM overhead vs the reference PyTorch SAM (davda54/sam) (CPU)")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchsam {getattr(torchsam, '__version__', '?')}, {platform.machine()}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"mode: {'quick' if args.quick else 'full'}; scenario 1: {small}; scenario 2: {big}; "
        "figures are medians over trials"
    )
    print()

    rows: list[Row] = []
    notes: list[str] = []
    for run in (
        lambda: scenario_small(**small),
        lambda: scenario_resnet(**big),
        scenario_allocations,
        scenario_syncs,
    ):
        r, n = run()
        rows += r
        notes += n

    print_table(rows)
    print()
    for note in notes:
        print(note)
    print()
    print(
        "Rows marked PASS/FAIL are the targets (torchsam with defaults); "
        "'(pass)'/'(fail)' rows are for information."
    )
    return 0
