"""Wall time and accuracy of the cheap variants side by side with SGD and SAM.

Run it as ``python benchmarks/bench_cheap.py`` (``--quick`` for a short smoke run). In one
process it trains SGD, SAM, SAF, MESA, ESAM (``beta = gamma = 0.5``, the authors' setting for
WideResNet and PyramidNet), LookSAM (``k=5``), periodic SAM (IntermittentSAM ``every=5``)
and MomentumSAM (one pass per step, evaluated at its unperturbed weights)
with the experiments' recipe on ``noisy_digits(noise=0.2)``: the small CNN with BatchNorm
(``--model cnn``, the default, ``--channels`` wide; ``--model mlp``: the MLP 2 x ``--hidden``
with BatchNorm), batch 128 (``--batch``), SGD lr 0.01 with a cosine schedule,
momentum 0.9, weight decay 5e-4, each method with its registered defaults except ESAM's
``beta`` and ``gamma``, both set to 0.5 (torchsam's default ``gamma`` is 1.0: no sample
selection). (At the experiments' usual lr 0.05 this CNN's first epoch blows up at batch 128: SGD
recovers, SAM ends at chance level.) It prints:

1. **The cost of the passes** on this model and batch, each timed alone (median of
   ``--pass-repeats`` after a warm-up): a forward pass with gradients (``F``), its backward
   (``B``), a forward pass without autograd (``F0``, under ``torch.inference_mode``), ESAM's
   first backward that takes the gradients of a draw of ``beta`` of the tensors only
   (``B_swp``), and a forward/backward pass on ``gamma`` of the batch (``FB_gamma``), plus the
   SGD step (``S``) and MomentumSAM's step (``S_msam``, with the same gradient; a line after
   the floors sets its step beside SGD's with the passes); then the floor of each method: its
   passes and the SGD step written out by hand, without the method's own work, timed per step
   (see :func:`floors`): SGD and SAF ``F + B + S`` (SAF's term costs no pass; MomentumSAM the
   same), MESA ``F + B + S + F0``, ESAM ``F + B_swp + F0 + FB_gamma + S``, SAM
   ``2 (F + B) + S``, LookSAM and periodic SAM one SAM step and four SGD steps in five. The
   floor is what a method cannot go below with its passes on this machine; what it costs above
   its floor is its own work.
2. **The training table**: test accuracy (clean labels) and training accuracy on the clean
   labels (mean ± std over seeds), and wall time relative to SGD, with the floor ratio beside
   it, the model's forward calls per step and the samples they took, in batches (ESAM: 2.5,
   its second pass takes half the batch; MESA's EMA model is another module, not counted).
   Times are per step in the fastest epoch among those from ``--timed-from`` on (epoch 5 by
   default, where SAF's and MESA's terms are active: before their ``start_epoch`` they cost
   nothing) and among ``--repeats`` runs per seed (the fastest epoch is the one least disturbed
   by other load on a shared machine), the per-seed ratio to SGD, median over seeds. Within
   a round the order of the methods rotates; the garbage collector is paused during training;
   ``torch.set_num_threads`` is 1 unless ``--threads`` says otherwise.
3. The issue's targets (SAF <= 1.08x, MESA <= 1.40x, ESAM <= 1.60x, LookSAM and periodic SAM
   <= 1.25x, MomentumSAM <= 1.05x SGD), PASS/FAIL.

The script always exits with status 0: it is a report, not a test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsam
from torchsam.experiments import Result, Split, mlp, noisy_digits, small_cnn, train
from torchsam.experiments.tables import aligned

ModelFn = Callable[[Split], nn.Module]

NOISE = 0.2
BATCH = 128
LR = 0.01
EPOCHS = 12
QUICK_EPOCHS = 7
SEEDS = 3
QUICK_SEEDS = 1
REPEATS = 3
TIMED_FROM = 5
PASS_REPEATS = 30
STEP_REPEATS = 300
BETA = 0.5
GAMMA = 0.5
EVERY = 5  # LookSAM's k and periodic SAM's period: a sharpness step every 5th step
CHANNELS = 32
HIDDEN = 1024

#: contender -> (registered method, options over its registered defaults)
CONTENDERS: dict[str, tuple[str, dict[str, float]]] = {
    "sgd": ("sgd", {}),
    "sam": ("sam", {}),
    "saf": ("saf", {}),
    "mesa": ("mesa", {}),
    "esam": ("esam", {"beta": BETA, "gamma": GAMMA}),
    "looksam": ("looksam", {"k": EVERY}),
    "periodic": ("periodic", {"every": EVERY}),
    "momentumsam": ("momentumsam", {}),
}
TARGETS = {
    "saf": 1.08,
    "mesa": 1.40,
    "esam": 1.60,
    "looksam": 1.25,
    "periodic": 1.25,
    "momentumsam": 1.05,
}


def model_fn(model: str, channels: int, hidden: int) -> ModelFn:
    if model == "cnn":
        return lambda s: small_cnn(num_classes=s.num_classes, channels=channels)
    if model == "mlp":
        return lambda s: mlp(s.num_features, s.num_classes, hidden=hidden)
    raise ValueError(f"Unknown model {model!r}; choose cnn or mlp")


# ----------------------------------------------------------------------------- pass costs
def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pass_costs(build: ModelFn, split: Split, repeats: int) -> dict[str, float]:
    """Milliseconds of each pass on one batch, timed alone (see the module doc)."""
    torch.manual_seed(0)
    model = build(split).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x, y = split.x_train[:BATCH], split.y_train[:BATCH]
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(0)
    draws = [[p for p in params if rng.random() < BETA] or params[:1] for _ in range(16)]
    keep = max(1, math.ceil(GAMMA * BATCH))
    rows = torch.randperm(BATCH, generator=torch.Generator().manual_seed(0))[:keep]
    counter = [0]

    def loss_at(xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(model(xb), yb)

    def forward() -> Tensor:
        return loss_at(x, y)

    def fb() -> None:
        opt.zero_grad(set_to_none=True)
        forward().backward()

    def backward_only() -> float:
        loss = forward()
        start = time.perf_counter()
        loss.backward()
        return time.perf_counter() - start

    def swp_backward_only() -> float:
        opt.zero_grad(set_to_none=True)
        loss = forward()
        counter[0] += 1
        start = time.perf_counter()
        loss.backward(inputs=draws[counter[0] % len(draws)])
        return time.perf_counter() - start

    def inference_forward() -> None:
        with torch.inference_mode():
            model(x)

    def fb_gamma() -> None:
        opt.zero_grad(set_to_none=True)
        loss_at(x[rows], y[rows]).backward()

    def median_of(fn: Callable[[], float]) -> float:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            fn()
        samples = []
        for _ in range(repeats):
            opt.zero_grad(set_to_none=True)
            samples.append(fn())
        return 1e3 * statistics.median(samples)

    fb()
    costs = {
        "F": _median_ms(forward, repeats),
        "B": median_of(backward_only),
        "F0": _median_ms(inference_forward, repeats),
        "B_swp": median_of(swp_backward_only),
        "FB_gamma": _median_ms(fb_gamma, repeats),
    }
    fb()
    steps = max(repeats, STEP_REPEATS)  # a step is short: more samples for its median
    costs["S"] = _median_ms(opt.step, steps)
    # MomentumSAM's step alone on a copy of the model, with the same gradient held fixed
    twin = copy.deepcopy(model)
    msam = torchsam.MomentumSAM(
        twin.parameters(), torch.optim.SGD, lr=1e-3, momentum=0.9, weight_decay=5e-4
    )
    F.cross_entropy(twin(x), y).backward()
    costs["S_msam"] = _median_ms(msam.step, steps)
    return costs


def floors(build: ModelFn, split: Split, repeats: int) -> dict[str, float]:
    """Milliseconds per step of each contender's passes alone, written out by hand.

    Each sequence takes the passes of one step of its method with the SGD step and nothing
    else: SGD (and SAF) ``F + B + S``; MESA the same plus the forward pass of an eval-mode copy
    of the model under ``torch.inference_mode``; SAM two forward/backward passes and ``S``;
    ESAM the first pass with ``backward(inputs=<a draw of beta of the tensors>)``, a forward
    pass at the same weights without gradients, the top ``gamma`` of the rows by loss rise,
    their forward/backward pass, ``S`` (BatchNorm statistics frozen after the first pass, as
    the harness does). The sequences are timed in interleaved rounds; median per sequence.
    """
    torch.manual_seed(0)
    model = build(split).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    x, y = split.x_train[:BATCH], split.y_train[:BATCH]
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(0)
    keep = max(1, math.ceil(GAMMA * BATCH))

    def sgd() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def mesa() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        with torch.inference_mode():
            ema(x)
        opt.step()

    def sam() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.zero_grad(set_to_none=True)
        with torchsam.freeze_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.step()

    def esam() -> None:
        selected = [p for p in params if rng.random() < BETA] or params[:1]
        opt.zero_grad(set_to_none=True)
        before = F.cross_entropy(model(x), y, reduction="none")
        before.mean().backward(inputs=selected)
        opt.zero_grad(set_to_none=True)
        with torchsam.freeze_running_stats(model):
            with torch.no_grad():
                after = F.cross_entropy(model(x), y, reduction="none")
            rows = torch.topk(after - before.detach(), keep, sorted=False).indices
            F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()

    sequences = {"sgd": sgd, "sam": sam, "mesa": mesa, "esam": esam}
    times: dict[str, list[float]] = {name: [] for name in sequences}
    for rep in range(repeats + 2):
        for name, fn in sequences.items():
            start = time.perf_counter()
            fn()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    floor = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    floor["saf"] = floor["momentumsam"] = floor["sgd"]  # the same passes
    # one two-pass step and EVERY - 1 one-pass steps in every EVERY steps
    floor["looksam"] = floor["periodic"] = (floor["sam"] + (EVERY - 1) * floor["sgd"]) / EVERY
    return floor


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Run:
    result: Result
    step_time: float  # seconds per step in the fastest of the timed epochs


def _run(name: str, split: Split, seed: int, epochs: int, timed_from: int, build: ModelFn) -> Run:
    method, options = CONTENDERS[name]
    gc.collect()
    gc.disable()
    try:
        result = train(
            method,
            split,
            epochs=epochs,
            batch_size=BATCH,
            lr=LR,
            seed=seed,
            model_fn=build,
            **options,
        )
    finally:
        gc.enable()
    ends = [h.wall_time for h in result.history]
    durations = [end - start for start, end in zip([0.0, *ends], ends, strict=False)]
    return Run(result, min(durations[timed_from:]) / (result.steps // epochs))


def run(
    names: list[str], seeds: int, epochs: int, timed_from: int, repeats: int, build: ModelFn
) -> dict[str, list[Run]]:
    """Every contender for every seed; per seed the first run with the fastest step time."""
    splits = [noisy_digits(NOISE, seed=seed) for seed in range(seeds)]
    for name in names:  # warm-up
        _run(name, splits[0], 0, 1, 0, build)
    out: dict[str, list[Run]] = {n: [] for n in names}
    for seed, split in enumerate(splits):
        runs: dict[str, list[Run]] = {n: [] for n in names}
        for rep in range(repeats):
            shift = (seed * repeats + rep) % len(names)
            for name in names[shift:] + names[:shift]:
                runs[name].append(_run(name, split, seed, epochs, timed_from, build))
        for name, rs in runs.items():
            if any(r.result.test_accuracy != rs[0].result.test_accuracy for r in rs):
                print(f"warning: {name} is not deterministic (seed {seed})")
            out[name].append(dataclasses.replace(rs[0], step_time=min(r.step_time for r in rs)))
    return out


def _mean_std(values: Sequence[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def _rows_per_step(runs: list[Run]) -> float:
    """Samples through the model's forward per step, in batches (MESA's EMA not counted)."""
    return sum(r.result.forward_samples / (r.result.steps * BATCH) for r in runs) / len(runs)


def table(results: dict[str, list[Run]], floor: dict[str, float]) -> list[tuple[str, float]]:
    """Print the training table; return (contender, time ratio) rows."""
    base = results["sgd"]
    header = (
        "method",
        "test acc %",
        "train acc (clean) %",
        "ms/step",
        "time vs SGD",
        "floor",
        "fwd/step",
        "rows/step",
    )
    lines = [header]
    ratios = []
    for name, runs in results.items():
        ratio = statistics.median(
            r.step_time / b.step_time for r, b in zip(runs, base, strict=True)
        )
        ratios.append((name, ratio))
        label = {
            "esam": f"esam b={BETA} g={GAMMA}",
            "looksam": f"looksam k={EVERY}",
            "periodic": f"periodic every={EVERY}",
        }.get(name, name)
        lines.append(
            (
                label,
                _mean_std([r.result.test_accuracy for r in runs]),
                _mean_std([r.result.train_accuracy for r in runs]),
                f"{1e3 * statistics.median(r.step_time for r in runs):.2f}",
                f"{ratio:.2f}x",
                f"{floor[name] / floor['sgd']:.2f}x",
                f"{sum(r.result.forwards_per_step for r in runs) / len(runs):.2f}",
                f"{_rows_per_step(runs):.2f}",
            )
        )
    print(aligned(lines))
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    global BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few epochs, one seed (smoke run)")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds (default: {SEEDS})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default: {EPOCHS})")
    parser.add_argument(
        "--timed-from",
        type=int,
        default=TIMED_FROM,
        help=f"first timed epoch (default: {TIMED_FROM}, SAF's and MESA's start_epoch)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"runs per seed (default: {REPEATS})"
    )
    parser.add_argument(
        "--pass-repeats",
        type=int,
        default=None,
        help=f"timed repeats of each pass (default: {PASS_REPEATS})",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    parser.add_argument("--channels", type=int, default=CHANNELS, help="CNN's first conv width")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="MLP width")
    parser.add_argument(
        "--batch", type=int, default=BATCH, help=f"batch size (default: {BATCH}; compare's: 64)"
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated contenders (sgd always runs)"
    )
    args = parser.parse_args(argv)
    BATCH = args.batch  # read by the pass timings, the floors and the training runs
    seeds = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else SEEDS)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else EPOCHS)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else REPEATS)
    pass_repeats = (
        args.pass_repeats if args.pass_repeats is not None else (5 if args.quick else PASS_REPEATS)
    )
    if min(seeds, repeats, pass_repeats, args.threads, args.channels, args.hidden, args.batch) < 1:
        parser.error("--seeds, --repeats, --pass-repeats, --threads and widths must be >= 1")
    if not 0 <= args.timed_from < epochs:
        parser.error("--timed-from must be in [0, epochs)")
    names = list(CONTENDERS) if args.methods is None else [m for m in args.methods.split(",") if m]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {list(CONTENDERS)}")
    names = ["sgd"] + [n for n in dict.fromkeys(names) if n != "sgd"]

    torch.set_num_threads(args.threads)
    build = model_fn(args.model, args.channels, args.hidden)
    model = (
        f"small CNN {args.channels}/{2 * args.channels} channels + BatchNorm"
        if args.model == "cnn"
        else f"MLP 2x{args.hidden} + BatchNorm"
    )
    print("the cheap variants on noisy 8x8 digits (CPU)")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchsam {getattr(torchsam, '__version__', '?')}, {platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"mode: {'quick' if args.quick else 'full'}; {model}; batch {BATCH}, lr {LR}; "
        f"{epochs} epochs, "
        f"timed from epoch {args.timed_from}; seeds 0..{seeds - 1}; {repeats} run(s) per seed"
    )
    print()
    start = time.perf_counter()
    split = noisy_digits(NOISE, seed=0)
    costs = pass_costs(build, split, pass_repeats)
    floor = floors(build, split, pass_repeats)
    passes = ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
    print(f"passes on one batch (ms, median): {passes}")
    print(
        "passes alone, ms per step (vs SGD): "
        + ", ".join(f"{n} {floor[n]:.2f} ({floor[n] / floor['sgd']:.2f}x)" for n in names)
    )
    if "momentumsam" in names:
        one_pass = costs["F"] + costs["B"]
        print(
            f"MomentumSAM's own work: its step alone {costs['S_msam']:.3f} ms against SGD's "
            f"{costs['S']:.3f} ms; with the passes, (F + B + S_msam) / (F + B + S) = "
            f"{(one_pass + costs['S_msam']) / (one_pass + costs['S']):.3f}x"
        )
    print()
    results = run(names, seeds, epochs, args.timed_from, repeats, build)
    ratios = table(results, floor)
    print()
    print("targets:")
    for name, ratio in ratios:
        if name in TARGETS:
            verdict = "PASS" if ratio <= TARGETS[name] else "FAIL"
            print(f"  {name}: {ratio:.2f}x <= {TARGETS[name]:.2f}x {verdict}")
    print(f"(load average at the end {os.getloadavg()[0]:.2f})")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    main()
    sys.exit(0)
