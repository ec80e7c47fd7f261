"""What a SharpnessMonitor costs at its default frequency on the task of ``torchsam compare``.

Run it as ``python benchmarks/bench_monitor.py`` (``--methods``, ``--seeds``, ``--epochs``,
``--every``, ``--probe``, ``--tol``, ``--threads`` to vary it). It prints a report and always
exits with status 0: it is a measurement, not a test.

The task is the default comparison's (``torchsam compare`` with no option): the ``digits``
data set with 40% label noise, the small CNN, 30 epochs of batches of 64 (570 steps), learning
rate 0.02 on a cosine schedule, one intra-op thread, trained by
:func:`torchsam.experiments.train` on compare's seeds (0 to 3; ``--seeds N`` takes the first
``N``, or more). Each method and seed is trained twice, without and with a
:class:`torchsam.SharpnessMonitor` built as ``torchsam compare`` builds it: passed as
``train(monitor=...)`` (which measures MomentumSAM at its weights ``w``), at compare's default
frequency (``--monitor-every``, 150 steps) and the monitor's default ``tol`` unless told, on a
probe of the first 64 training samples (compare's, :func:`torchsam.experiments.compare.probe_data`),
its generator seeded with the run's seed.

Reported per method and seed: the training time of the runs without and with the monitor (the
loop's own ``wall_time``, which leaves the measurements out), the time the monitor's
measurements took (the sum of the records' ``seconds``), its ratio to the same run's training
time (numerator and denominator are timed under the same load) and to the run without the
monitor, the number of measurements, the Hessian-vector products of each (deterministic: they
do not depend on the machine's load), and whether the two runs ended with the same weights and
buffers, bit for bit (the monitor never changes training). Then per method, over its seeds:
the measurements' time over the monitored runs' training time (issue 22's target: at most
5%), and the smallest and largest share of a run.
"""

from __future__ import annotations

import argparse
import inspect
import platform

import torch
from torch import nn

from torchsam.experiments import train
from torchsam.experiments.compare import (
    MONITOR_SAMPLES,
    CompareConfig,
    build_model,
    load_dataset,
    probe_data,
)
from torchsam.monitor import SharpnessMonitor, SharpnessRecord

TARGET = 0.05  # issue 22: at most 5% of training time at the default frequency

_DEFAULTS = inspect.signature(SharpnessMonitor).parameters


def run(
    method: str, seed: int, epochs: int, every: int, probe_size: int, tol: float
) -> tuple[float, list[SharpnessRecord], dict[str, torch.Tensor]]:
    """Train once; with ``every > 0`` a monitor measures. Returns the training loop's time
    (without the measurements), the monitor's records and the final weights and buffers."""
    config = CompareConfig().resolved()
    split = load_dataset(config.dataset, noise=config.label_noise, seed=config.data_seed)
    probe = probe_data(split, probe_size)

    def monitor(model: nn.Module) -> SharpnessMonitor:
        generator = torch.Generator().manual_seed(seed)
        return SharpnessMonitor(
            model, nn.CrossEntropyLoss(), probe, every=every, tol=tol, generator=generator
        )

    result = train(
        method,
        split,
        epochs=epochs,
        batch_size=int(config.batch_size or 64),
        lr=float(config.lr or 0.02),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        seed=seed,
        model_fn=lambda s: build_model(str(config.model), config.dataset, split, config.width),
        monitor=monitor if every > 0 else None,
    )
    if result.model is None:
        raise RuntimeError("train() returned no model")
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    return result.wall_time, list(result.sharpness), state


def one_seed(method: str, seed: int, args: argparse.Namespace) -> tuple[float, float]:
    """Train ``method`` on ``seed`` without and with the monitor; print the run's report and
    return (the measurements' seconds, the monitored run's training seconds)."""
    plain, _, plain_state = run(method, seed, args.epochs, 0, args.probe, args.tol)
    watched_time, records, watched_state = run(
        method, seed, args.epochs, args.every, args.probe, args.tol
    )
    spent = sum(r.seconds for r in records)
    same = all(torch.equal(plain_state[k], watched_state[k]) for k in plain_state)
    # the share within the monitored run (numerator and denominator timed under the same
    # load), and against the run without the monitor
    print(
        f"\n{method}, seed {seed}: training {plain:.2f} s without the monitor, "
        f"{watched_time:.2f} s with"
    )
    print(
        f"  monitor: {len(records)} measurements, {spent:.3f} s = {spent / watched_time:.1%} of "
        f"the same run's training; {spent / plain:.1%} of the run without it"
    )
    print(f"  products per measurement: {[r.products for r in records]}")
    print(f"  top eigenvalue: {[round(r.top_eigenvalue, 2) for r in records]}")
    print(f"  all converged: {all(r.converged for r in records)}")
    print(f"  same final weights and buffers, bit for bit: {same}")
    return spent, watched_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="sgd,sam,momentumsam")
    parser.add_argument("--seeds", type=int, default=len(CompareConfig().seeds))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=CompareConfig().monitor_every)
    parser.add_argument("--probe", type=int, default=MONITOR_SAMPLES)
    parser.add_argument("--tol", type=float, default=_DEFAULTS["tol"].default)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    seeds = list(range(args.seeds))  # compare's default seeds are 0 to 3
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s); every={args.every} steps, probe={args.probe} samples, "
        f"tol={args.tol}, {args.epochs} epochs, seeds {seeds}"
    )
    print("(timings on a shared machine are noisy; the product counts are not)")
    for method in args.methods.split(","):
        runs = [one_seed(method, seed, args) for seed in seeds]
        share = sum(spent for spent, _ in runs) / sum(time for _, time in runs)
        shares = [spent / time for spent, time in runs]
        verdict = "meets" if share <= TARGET else "MISSES"
        print(
            f"\n{method} over {len(seeds)} seed(s): the monitor took {share:.1%} of the "
            f"training (target <= {TARGET:.0%}: {verdict}); runs from {min(shares):.1%} to "
            f"{max(shares):.1%}"
        )


if __name__ == "__main__":
    main()
