"""Sensitivity of SAM, ASAM, LookSAM and ESAM to their hyper-parameters, over several tasks (CPU).

Run it as ``python benchmarks/sweep_defaults.py`` (432 training runs, about an hour on a busy
2-core machine; ``--quick`` for a smoke run of a few seconds). It is the evidence behind the
default values of ``LookSAM.hyperparameters``/``options`` and ``ESAM.options``: defaults are
judged on tasks nobody tuned them for, so they are chosen where accuracy holds on every task
here, not where it peaks on one.

The tasks (``TASKS``) cross the axes that change a method's behaviour: an MLP and a CNN with
BatchNorm, SGD with momentum and AdamW, with and without label noise, the embedded digits and a
generated 1-D signal task (:func:`torchsam.experiments.noisy_signals`):

* ``digits/mlp/sgd``: ``noisy_digits(0.2)``, MLP 2x128 + BatchNorm, SGD lr 0.05 momentum 0.9
  weight decay 5e-4, 20 epochs;
* ``digits/cnn/sgd``: the same data and optimizer, ``small_cnn(channels=16)`` (two conv layers
  with BatchNorm), 15 epochs. With no warm-up, lr 0.05 and momentum 0.9 put this CNN at the
  edge of stability: even SGD's loss rises to about 6 in the first ten steps, and a run that
  is pushed further can end in a dead network (10% accuracy). That is a regime users meet, so
  it is kept; ``digits/cnn/sgd@0.02`` is the same task at lr 0.02, where training is stable;
* ``digits-clean/cnn/adamw``: ``noisy_digits(0.0)``, the same CNN, AdamW lr 2e-3 weight decay
  0.01, 15 epochs;
* ``signals/mlp/adamw``: ``noisy_signals(0.3)`` (6 classes, 30% label noise), the MLP, AdamW lr
  1e-3 weight decay 0.01, 20 epochs;
* ``signals/mlp/sgd``: the same data and model, SGD lr 0.05 momentum 0.9 weight decay 5e-4, 20
  epochs.

Every run uses batch 64 and a cosine learning-rate schedule (``torchsam.experiments.train``),
and reports the accuracy on the clean test labels and the training wall time. Seed ``s`` fixes
the data (split, label noise, generated signals), the initialisation and the batch order, so
every configuration of a task sees the same data and initial weights for a given seed.

The configurations (``configs``) vary one knob at a time around the class defaults; every
variant runs at the class's default ``rho`` (0.05) unless the knob is ``rho``:

* ``SAM rho`` and ``ASAM rho`` (``SAM(adaptive=True)``, whose default ``rho`` is SAM's);
* ``LookSAM alpha`` at ``k=5``, and ``LookSAM k`` at ``alpha=K_ALPHA``;
* ``ESAM gamma`` at ``beta=0.6``, and ``ESAM beta`` at ``gamma=1`` (weight selection alone).

Results go to a JSON-lines file (``--out``, one line per run, appended; a run already there is
not repeated, so an interrupted sweep resumes) and a Markdown report (``--report``): one table
per knob (a column per task: mean ± standard deviation over seeds of the test accuracy; then
the model forward passes per step and the wall time relative to SGD on the same task and seed,
median over tasks and seeds), then one table across tasks (gain over SGD on the worst task and
on average, and the runs that collapsed). ``torch`` runs on one
thread unless ``--threads`` says otherwise. The script always exits with status 0 unless its
arguments are wrong: it is a report, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import torchsam
from torchsam.experiments import (
    Method,
    Split,
    get_method,
    mlp,
    noisy_digits,
    noisy_signals,
    small_cnn,
    train,
)

SEEDS = 3
QUICK_SEEDS = 1
QUICK_EPOCHS = 1
K_ALPHA = 0.2  # LookSAM's alpha while k varies


@dataclass(frozen=True)
class Task:
    """A dataset, a model and a base optimizer with its recipe."""

    name: str
    data: Callable[[int], Split]
    model: str  # "mlp" or "cnn"
    base: str  # "sgd" or "adamw"
    lr: float
    weight_decay: float
    epochs: int
    description: str

    def model_fn(self, split: Split) -> nn.Module:
        if self.model == "cnn":
            return small_cnn(num_classes=split.num_classes, channels=16)
        return mlp(split.num_features, split.num_classes)


TASKS: tuple[Task, ...] = (
    Task(
        "digits/mlp/sgd",
        lambda seed: noisy_digits(0.2, seed=seed),
        "mlp",
        "sgd",
        lr=0.05,
        weight_decay=5e-4,
        epochs=20,
        description="8x8 digits, 20% label noise; MLP 2x128+BN; SGD-momentum; 20 epochs",
    ),
    Task(
        "digits/cnn/sgd",
        lambda seed: noisy_digits(0.2, seed=seed),
        "cnn",
        "sgd",
        lr=0.05,
        weight_decay=5e-4,
        epochs=15,
        description="8x8 digits, 20% label noise; CNN 16/32 ch + BN; SGD-momentum; 15 epochs",
    ),
    Task(
        "digits/cnn/sgd@0.02",
        lambda seed: noisy_digits(0.2, seed=seed),
        "cnn",
        "sgd",
        lr=0.02,
        weight_decay=5e-4,
        epochs=15,
        description="as digits/cnn/sgd with SGD lr 0.02 (0.05 is at the edge of stability)",
    ),
    Task(
        "signals/mlp/adamw",
        lambda seed: noisy_signals(0.3, seed=seed),
        "mlp",
        "adamw",
        lr=1e-3,
        weight_decay=0.01,
        epochs=20,
        description="generated 1-D signals, 30% label noise; MLP 2x128+BN; AdamW; 20 epochs",
    ),
    Task(
        "signals/mlp/sgd",
        lambda seed: noisy_signals(0.3, seed=seed),
        "mlp",
        "sgd",
        lr=0.05,
        weight_decay=5e-4,
        epochs=20,
        description="generated 1-D signals, 30% label noise; MLP 2x128+BN; SGD-momentum; 20 epochs",
    ),
    Task(
        "digits-clean/cnn/adamw",
        lambda seed: noisy_digits(0.0, seed=seed),
        "cnn",
        "adamw",
        lr=2e-3,
        weight_decay=0.01,
        epochs=15,
        description="8x8 digits, clean labels; CNN 16/32 ch + BN; AdamW; 15 epochs",
    ),
)


@dataclass(frozen=True)
class Config:
    """One point of a sweep: a knob (the table it belongs to), a method and its options."""

    knob: str  # e.g. "LookSAM alpha"
    value: float | int | None  # the knob's value; None for the SGD baseline
    method: str  # "sgd", "sam", "looksam" or "esam" (the registered step)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}({opts})"


def configs(quick: bool = False) -> list[Config]:
    """The sweep: one knob at a time around the class defaults (fewer values with ``quick``)."""

    def pick(full: Sequence[Any], short: Sequence[Any]) -> Sequence[Any]:
        return short if quick else full

    out = [Config("SGD", None, "sgd")]
    out += [
        Config("SAM rho", r, "sam", {"rho": r})
        for r in pick((0.02, 0.05, 0.1, 0.2, 0.5), (0.05, 0.2))
    ]
    out += [
        Config("ASAM rho", r, "sam", {"rho": r, "adaptive": True})
        for r in pick((0.05, 0.2, 0.5, 1.0, 2.0), (0.5,))
    ]
    out += [
        Config("LookSAM alpha", a, "looksam", {"alpha": a, "k": 5})
        for a in pick((0.0, 0.1, 0.2, 0.4, 0.7), (0.2, 0.7))
    ]
    out += [
        Config("LookSAM k", k, "looksam", {"alpha": K_ALPHA, "k": k}) for k in pick((2, 10), (2,))
    ]
    out += [
        Config("ESAM gamma", g, "esam", {"gamma": g, "beta": 0.6})
        for g in pick((0.5, 0.7, 0.9, 1.0), (0.5, 1.0))
    ]
    out += [Config("ESAM beta", b, "esam", {"gamma": 1.0, "beta": b}) for b in pick((0.3, 1.0), ())]
    out += [
        Config("MomentumSAM rho", r, "momentumsam", {"rho": r})
        for r in pick((0.02, 0.05, 0.1, 0.2, 0.5, 0.7, 1.0, 3.0), (0.5,))
    ]
    return out


_CLASSES: dict[str, type[torchsam.SAM]] = {
    "sam": torchsam.SAM,
    "looksam": torchsam.LookSAM,
    "esam": torchsam.ESAM,
    "momentumsam": torchsam.MomentumSAM,
}


def _method(config: Config, task: Task) -> Method:
    """The method of a configuration around the task's base optimizer, with the registered
    step of its class (ESAM's per-sample closure, the standard closure otherwise)."""
    base: type[Optimizer] = torch.optim.AdamW if task.base == "adamw" else torch.optim.SGD

    def make(
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float,
        weight_decay: float,
        **kwargs: Any,
    ) -> Optimizer:
        base_kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
        if base is torch.optim.SGD:
            base_kwargs["momentum"] = momentum
        if config.method == "sgd":
            return base(params, **base_kwargs)
        return _CLASSES[config.method](params, base, **kwargs, **base_kwargs)

    return Method(
        name=config.key, make_optimizer=make, make_step=get_method(config.method).make_step
    )


def run_one(task: Task, config: Config, seed: int, split: Split, epochs: int) -> dict[str, Any]:
    result = train(
        _method(config, task),
        split,
        epochs=epochs,
        seed=seed,
        lr=task.lr,
        weight_decay=task.weight_decay,
        model_fn=task.model_fn,
        **config.options,
    )
    return {
        "task": task.name,
        "knob": config.knob,
        "value": config.value,
        "config": config.key,
        "seed": seed,
        "epochs": epochs,
        "test_accuracy": result.test_accuracy,
        "train_accuracy_clean": result.train_accuracy,
        "wall_time": result.wall_time,
        "forwards_per_step": result.forwards_per_step,
    }


def _print_now(message: str) -> None:
    print(message, flush=True)


def sweep(
    tasks: Sequence[Task],
    grid: Sequence[Config],
    seeds: int,
    out: Path,
    epochs: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every (task, seed, config) not yet in ``out``; append each result as a JSON line.

    Before its first timed run, each task trains SGD and the first SAM configuration for one
    epoch, untimed (warm-up)."""
    done: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["task"], row["config"], row["seed"], row["epochs"])] = row
    total = len(tasks) * seeds * len(grid)
    count = 0
    start = time.perf_counter()
    if log is None:
        log = _print_now
    warmed: set[str] = set()
    with out.open("a") as sink:
        # seeds outermost: an interrupted sweep still covers every task
        for seed in range(seeds):
            for task in tasks:
                n_epochs = task.epochs if epochs is None else epochs
                split = task.data(seed)
                for config in grid:
                    count += 1
                    if (task.name, config.key, seed, n_epochs) in done:
                        continue
                    if task.name not in warmed:  # one-time costs (kernels, allocator), untimed
                        warmed.add(task.name)
                        for warm in grid[:2]:
                            run_one(task, warm, seed, split, 1)
                    row = run_one(task, config, seed, split, n_epochs)
                    done[(task.name, config.key, seed, n_epochs)] = row
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    log(
                        f"[{count}/{total} {time.perf_counter() - start:6.0f} s] {task.name} "
                        f"seed {seed} {config.key}: test {100 * row['test_accuracy']:.1f}% "
                        f"{row['wall_time']:.2f} s"
                    )
    return [
        done[(t.name, c.key, s, t.epochs if epochs is None else epochs)]
        for t in tasks
        for s in range(seeds)
        for c in grid
    ]


def _mean_std(values: Sequence[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def report(rows: Sequence[dict[str, Any]], tasks: Sequence[Task], grid: Sequence[Config]) -> str:
    """Markdown: one table per knob (rows: the knob's values, SGD first; columns: the tasks,
    then forward passes per step and wall time relative to SGD), then the table across tasks."""
    names = [t.name for t in tasks if any(r["task"] == t.name for r in rows)]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    sgd_time = {(r["task"], r["seed"]): r["wall_time"] for r in rows if r["config"] == grid[0].key}

    def cells(config: Config) -> list[str]:
        runs = by.get(config.key, [])
        out = []
        for task in names:
            accs = [r["test_accuracy"] for r in runs if r["task"] == task]
            out.append(_mean_std(accs) if accs else "—")
        ratios = [
            r["wall_time"] / sgd_time[(r["task"], r["seed"])]
            for r in runs
            if (r["task"], r["seed"]) in sgd_time
        ]
        passes = [r["forwards_per_step"] for r in runs]
        out.append(f"{statistics.fmean(passes):.2f}" if passes else "—")
        out.append(f"{statistics.median(ratios):.2f}x" if ratios else "—")
        return out

    lines: list[str] = []
    for knob in dict.fromkeys(c.knob for c in grid[1:]):
        lines.append(f"| {knob} | " + " | ".join(names) + " | fwd/step | time vs SGD |")
        lines.append("|---" * (len(names) + 3) + "|")
        for config in [grid[0], *(c for c in grid if c.knob == knob)]:
            label = "SGD" if config.value is None else f"{config.value:g}"
            lines.append(f"| {label} | " + " | ".join(cells(config)) + " |")
        lines.append("")
    lines += _robustness(rows, names, grid)
    return "\n".join(lines)


def _robustness(
    rows: Sequence[dict[str, Any]], names: Sequence[str], grid: Sequence[Config]
) -> list[str]:
    """One row per configuration: its gain over SGD (mean over seeds, in points) on the worst
    task, on average over the tasks, and the number of (task, seed) runs that collapsed (test
    accuracy below half of SGD's on the same task and seed)."""
    acc: dict[tuple[str, str, int], float] = {
        (r["task"], r["config"], r["seed"]): r["test_accuracy"] for r in rows
    }
    base = grid[0].key
    lines = [
        "**Across tasks**: gain over SGD in points (mean over seeds) on the worst task and on "
        "average over the tasks; collapsed runs (test accuracy below half of SGD's, same task "
        "and seed) out of all runs",
        "",
        "| configuration | worst task | mean over tasks | collapsed |",
        "|---|---|---|---|",
    ]
    for config in grid[1:]:
        gains, collapsed, total = [], 0, 0
        for task in names:
            pairs = [
                (a, acc[(task, base, seed)])
                for (t, c, seed), a in acc.items()
                if t == task and c == config.key and (task, base, seed) in acc
            ]
            if not pairs:
                continue
            gains.append(100 * statistics.fmean(a - b for a, b in pairs))
            collapsed += sum(a < 0.5 * b for a, b in pairs)
            total += len(pairs)
        if gains:
            lines.append(
                f"| {config.knob} {config.value:g} | {min(gains):+.1f} | "
                f"{statistics.fmean(gains):+.1f} | {collapsed}/{total} |"
            )
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, few values")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds (default: {SEEDS})")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs of every task (default: the task's)"
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task names (default: all): " + ", ".join(t.name for t in TASKS),
    )
    parser.add_argument(
        "--out", type=Path, default=Path("sweep_defaults.jsonl"), help="JSON-lines results"
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="also write the Markdown tables there"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--knobs",
        default=None,
        help="comma-separated knobs to sweep (default: all; SGD always runs): "
        + ", ".join(dict.fromkeys(c.knob for c in configs()[1:])),
    )
    args = parser.parse_args(argv)

    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else SEEDS)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else None)
    if min(seeds, args.threads, epochs or 1) < 1:
        parser.error("--seeds, --epochs and --threads must be >= 1")
    known = {t.name: t for t in TASKS}
    names = list(known) if args.tasks is None else [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(known)}")
    tasks = [known[n] for n in names]
    grid = configs(args.quick)
    if args.knobs is not None:
        wanted = [k.strip() for k in args.knobs.split(",") if k.strip()]
        missing = [k for k in wanted if k not in {c.knob for c in grid}]
        if missing:
            parser.error(f"unknown knob(s) {', '.join(missing)}")
        grid = [grid[0], *(c for c in grid[1:] if c.knob in wanted)]

    torch.set_num_threads(args.threads)
    header = [
        "Hyper-parameter sensitivity of SAM, ASAM, LookSAM and ESAM (CPU)",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchsam {getattr(torchsam, '__version__', '?')}, {platform.machine()}, "
        f"torch threads {torch.get_num_threads()}",
        f"mode: {'quick' if args.quick else 'full'}; seeds 0..{seeds - 1}; "
        f"{len(grid)} configurations per task; variants at rho 0.05 unless rho is the knob",
        *(f"task {t.name}: {t.description}" for t in tasks),
    ]
    print("\n".join(header))
    print()
    start = time.perf_counter()
    rows = sweep(tasks, grid, seeds, args.out, epochs)
    text = report(rows, tasks, grid)
    cells = (
        "test accuracy % (clean test labels), mean ± std over seeds; fwd/step: model forward "
        "passes per step (mean over runs); time vs SGD: training wall time over SGD's on the "
        "same task and seed, median over tasks and seeds"
    )
    print()
    print(cells)
    print()
    print(text)
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.report is not None:
        args.report.write_text("\n".join(header) + "\n\n" + cells + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
