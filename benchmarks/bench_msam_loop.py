"""MomentumSAM's cost in a training loop, interleaved with SGD's, beside a hand-written floor.

Run it as ``python benchmarks/bench_msam_loop.py``. In one process it trains three copies of
``torchsam compare``'s small CNN (16/32 channels + BatchNorm) on ``noisy_digits(noise=0.2)``,
batch 64, SGD lr 0.01 with a cosine schedule, momentum 0.9, weight decay 5e-4, each through
``optimizer.step(closure)`` as ``torchsam compare`` trains:

* ``sgd``: ``torch.optim.SGD`` alone;
* ``momentumsam``: ``torchsam.MomentumSAM`` over that SGD, its defaults (``rho=0.5``);
* ``floor``: MomentumSAM's step written out by hand for this one case (one param group, every
  parameter with a gradient, float32 on the CPU, SGD with a coupled weight decay): the same
  arithmetic in the same order (the exact restore, the finiteness check and its one read, the
  decay taken at the perturbed point, the SGD step, the copy of ``w``, the norm, the
  perturbation), none of the general code around them, and two copies fewer (the decay's
  correction out of place instead of into a copy of the gradients; the finiteness check on
  the gradients themselves instead of on the guard's flat buffer of the small ones). Before
  timing, the floor and MomentumSAM train 40 steps from the same weights on the same batches,
  and the script prints whether their weights and momentum buffers are then equal bit for
  bit: the floor does the same work, so what MomentumSAM costs above it is mostly its
  Python.

The contenders take turns: a round is ``--steps`` steps of each, their order rotating from
round to round, for ``--rounds`` rounds, with the garbage collector paused. It prints, per
contender, the time per step (fastest round and median round) and the ratio to SGD, as the
ratio of the fastest rounds and as the median over rounds of the ratio to SGD's time in the
same round; then issue 22's target (MomentumSAM at most 1.05x SGD's time) against the median
of paired rounds. ``torch.set_num_threads`` is 1 unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import torchsam
from torchsam.experiments import noisy_digits, small_cnn
from torchsam.experiments.bench import measure
from torchsam.experiments.tables import aligned

NOISE = 0.2
BATCH = 64
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
RHO = 0.5  # MomentumSAM's default
CHANNELS = 16
ROUNDS = 150
STEPS = 18
CHECK_STEPS = 40
TARGET = 1.05
_EPS = 1e-12  # MomentumSAM's


class Floor:
    """MomentumSAM's step for one param group of float32 CPU parameters that all have
    gradients, over SGD with a coupled weight decay, written out (see the module docstring)."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.w: list[Tensor] | None = None
        self.scale: Tensor | None = None  # the factor the weights are perturbed with
        self.found, self.one = torch.zeros(()), torch.ones(())

    def zero_grad(self) -> None:
        self.sgd.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        with torch.enable_grad():
            loss = closure()
        params, state = self.params, self.sgd.state
        grads = [p.grad for p in params]
        if self.w is not None:
            torch._foreach_copy_(params, self.w)  # back to w, exactly
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found, self.one)
        if self.found.item():
            raise RuntimeError("a non-finite gradient (the floor does not skip steps)")
        if self.scale is not None:  # the decay at the perturbed point: g + lambda (w~ - w)
            momenta = [state[p]["momentum_buffer"] for p in params]
            corrected = torch._foreach_addcmul(
                grads, momenta, [WEIGHT_DECAY * self.scale] * len(params)
            )
            for p, g in zip(params, corrected, strict=True):
                p.grad = g
        try:
            self.sgd.step()
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        momenta = [state[p]["momentum_buffer"] for p in params]
        if self.w is None:
            self.w = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(self.w, params)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(momenta)).to(torch.float64))
        self.scale = torch.scalar_tensor((1.0 / (norm.item() + _EPS)) * -RHO)
        torch._foreach_addcmul_(params, momenta, [self.scale] * len(params))
        return loss


class Contender:
    """A model, its optimizer, its scheduler and its own batch order."""

    def __init__(self, name: str, x: Tensor, y: Tensor) -> None:
        torch.manual_seed(0)
        self.model = small_cnn(num_classes=10, channels=CHANNELS)
        params = list(self.model.parameters())
        self.name = name
        self.optimizer: Any
        if name == "sgd":
            self.optimizer = torch.optim.SGD(
                params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            )
            scheduled = self.optimizer
        elif name == "momentumsam":
            self.optimizer = torchsam.MomentumSAM(
                params, torch.optim.SGD, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
            )
            scheduled = self.optimizer
        else:
            self.optimizer = Floor(params)
            scheduled = self.optimizer.sgd
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(scheduled, T_max=10**6)
        self.x, self.y = x, y
        self.generator = torch.Generator().manual_seed(0)
        self.loss_fn = nn.CrossEntropyLoss()
        self.order = torch.randperm(len(x), generator=self.generator)
        self.at = 0

    def run(self, steps: int) -> None:
        optimizer, model, loss_fn = self.optimizer, self.model, self.loss_fn
        for _ in range(steps):
            if self.at + BATCH > len(self.order):
                self.order, self.at = torch.randperm(len(self.x), generator=self.generator), 0
            index = self.order[self.at : self.at + BATCH]
            self.at += BATCH
            x, y = self.x[index], self.y[index]

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            optimizer.step(closure)
            self.scheduler.step()

    def momenta(self) -> list[Tensor]:
        sgd = self.optimizer.sgd if self.name == "floor" else self.optimizer.base_optimizer
        return [sgd.state[p]["momentum_buffer"] for p in self.model.parameters()]


def same_work(x: Tensor, y: Tensor, steps: int) -> bool:
    """Whether the floor and MomentumSAM hold the same weights and momenta, bit for bit,
    after ``steps`` steps from the same weights on the same batches."""
    floor, msam = Contender("floor", x, y), Contender("momentumsam", x, y)
    floor.run(steps)
    msam.run(steps)
    pairs = [*zip(floor.model.parameters(), msam.model.parameters(), strict=True)]
    pairs += [*zip(floor.momenta(), msam.momenta(), strict=True)]
    return all(torch.equal(a, b) for a, b in pairs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"(default: {ROUNDS})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"per round (default: {STEPS})")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.threads) < 1:
        parser.error("--rounds, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = noisy_digits(NOISE, seed=0)
    x, y = split.x_train, split.y_train
    print("MomentumSAM in a training loop on compare's CNN, interleaved with SGD (CPU)")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchsam {getattr(torchsam, '__version__', '?')}, {platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"small CNN {CHANNELS}/{2 * CHANNELS} channels + BatchNorm; batch {BATCH}, lr {LR}; "
        f"{args.rounds} rounds of {args.steps} steps per contender"
    )
    same = same_work(x, y, CHECK_STEPS)
    print(f"the floor's weights and momenta equal MomentumSAM's after {CHECK_STEPS} steps: {same}")
    print()
    contenders = [Contender(name, x, y) for name in ("sgd", "momentumsam", "floor")]
    steps = {c.name: functools.partial(c.run, 1) for c in contenders}
    times = measure(steps, warmup=args.steps, reps=args.steps, trials=args.rounds)
    base = times["sgd"]
    header = ("contender", "ms/step (fastest)", "ms/step (median)", "vs SGD (fastest)",
              "vs SGD (median of rounds)")  # fmt: skip
    lines = [header]
    paired: dict[str, float] = {}
    for name, ts in times.items():
        paired[name] = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        lines.append(
            (
                name,
                f"{1e3 * min(ts):.3f}",
                f"{1e3 * statistics.median(ts):.3f}",
                f"{min(ts) / min(base):.3f}x",
                f"{paired[name]:.3f}x",
            )
        )
    print(aligned(lines))
    print()
    ratio = paired["momentumsam"]
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"target: momentumsam {ratio:.3f}x <= {TARGET:.2f}x SGD (median of rounds) {verdict}")
    total = time.perf_counter() - start
    print(f"(load average at the end {os.getloadavg()[0]:.2f}; total {total:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
