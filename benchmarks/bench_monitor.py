"""What a SharpnessMonitor costs at its default frequency on the task of ``torchsam compare``.

Run it as ``python benchmarks/bench_monitor.py`` (``--methods``, ``--epochs``, ``--every``,
``--probe``, ``--tol``, ``--threads`` to vary it). It prints a report and always exits with
status 0: it is a measurement, not a test.

The task is the default comparison's (``torchsam compare`` with no option): the ``digits``
data set with 40% label noise, the small CNN, 30 epochs of batches of 64 (570 steps), learning
rate 0.02 on a cosine schedule, one intra-op thread, seed 0, trained by
:func:`torchsam.experiments.train`. Each method is trained twice, without and with a
:class:`torchsam.SharpnessMonitor` driven by ``on_step`` after every step, with the monitor's
default ``every`` and ``tol`` unless told, on a probe of the first ``--probe`` training
samples (:func:`torchsam.experiments.compare.probe_data`).

Reported per method: the training time of the runs without and with the monitor (the loop's
own ``wall_time``), the time the monitor's measurements took (the sum of the records'
``seconds``), its ratio to the rest of the same run's training time (issue 22's target: at most
5%; numerator and denominator are timed under the same load) and to the run without the
monitor, the number of
measurements, the Hessian-vector products of each (deterministic: they do not depend on the
machine's load), and whether the two runs ended with the same weights and buffers, bit for
bit (the monitor never changes training).
"""

from __future__ import annotations

import argparse
import inspect
import platform

import torch
from torch import nn

from torchsam import SharpnessMonitor
from torchsam.experiments import train
from torchsam.experiments.compare import CompareConfig, build_model, load_dataset, probe_data

TARGET = 0.05  # issue 22: at most 5% of training time at the default frequency

_DEFAULTS = inspect.signature(SharpnessMonitor).parameters


def run(
    method: str, epochs: int, every: int, probe_size: int, tol: float
) -> tuple[float, SharpnessMonitor | None, dict[str, torch.Tensor]]:
    """Train once; with ``every > 0`` a monitor measures. Returns the training loop's time,
    the monitor and the final weights and buffers."""
    config = CompareConfig().resolved()
    split = load_dataset(config.dataset, noise=config.label_noise, seed=config.data_seed)
    probe = probe_data(split, probe_size)
    monitors: list[SharpnessMonitor] = []

    def model_fn(s: object) -> nn.Module:
        model = build_model(str(config.model), config.dataset, split, config.width)
        if every > 0:
            monitors.append(
                SharpnessMonitor(model, nn.CrossEntropyLoss(), probe, every=every, tol=tol)
            )
        return model

    def on_step(epoch: int, step: int, loss: torch.Tensor) -> None:
        if monitors:
            monitors[0].step(step)

    result = train(
        method,
        split,
        epochs=epochs,
        batch_size=int(config.batch_size or 64),
        lr=float(config.lr or 0.02),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        seed=0,
        model_fn=model_fn,
        on_step=on_step,
    )
    if result.model is None:
        raise RuntimeError("train() returned no model")
    state = {k: v.clone() for k, v in result.model.state_dict().items()}
    return result.wall_time, (monitors[0] if monitors else None), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="sgd,sam")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--every", type=int, default=_DEFAULTS["every"].default)
    parser.add_argument("--probe", type=int, default=64, help="probe samples (default: 64)")
    parser.add_argument("--tol", type=float, default=_DEFAULTS["tol"].default)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s); every={args.every} steps, probe={args.probe} samples, "
        f"tol={args.tol}, {args.epochs} epochs"
    )
    print("(timings on a shared machine are noisy; the product counts are not)")
    for method in args.methods.split(","):
        plain, _, plain_state = run(method, args.epochs, 0, args.probe, args.tol)
        watched_time, monitor, watched_state = run(
            method, args.epochs, args.every, args.probe, args.tol
        )
        if monitor is None:
            raise RuntimeError("the monitored run built no monitor")
        spent = sum(r.seconds for r in monitor.records)
        same = all(torch.equal(plain_state[k], watched_state[k]) for k in plain_state)
        # the share within the monitored run (numerator and denominator timed under the same
        # load), and against the run without the monitor
        ratio = spent / (watched_time - spent)
        verdict = "meets" if ratio <= TARGET else "MISSES"
        print(f"\n{method}: training {plain:.2f} s without the monitor, {watched_time:.2f} s with")
        print(
            f"  monitor: {len(monitor.records)} measurements, {spent:.3f} s = {ratio:.1%} of the "
            f"same run's training (target <= {TARGET:.0%}: {verdict}); "
            f"{spent / plain:.1%} of the run without it"
        )
        print(f"  products per measurement: {[r.products for r in monitor.records]}")
        print(f"  top eigenvalue: {[round(r.top_eigenvalue, 2) for r in monitor.records]}")
        print(f"  all converged: {all(r.converged for r in monitor.records)}")
        print(f"  same final weights and buffers, bit for bit: {same}")


if __name__ == "__main__":
    main()
