"""A CIFAR-sized training epoch on CUDA: the old loop against ``train()``, eager and in CUDA graphs.

Run it as ``python benchmarks/bench_cifar_gpu.py [--json PATH]`` on a machine with a GPU
(without CUDA it says so and exits with status 0). It needs no files and downloads nothing: it
draws 50,000 random uint8 images of CIFAR's shape (and 10,000 test images) in memory, then
trains ResNet-18 (the CIFAR form, 11.2M parameters), lr 0.1, momentum 0.9, weight decay 5e-4,
cosine schedule, batch 128, 390 steps per epoch, along these paths:

* **old**: the training loop of ``torchsam compare`` before device-resident data, written out
  here with its settings: the normalised float32 features (614 MB) on the GPU, the batch
  order drawn on the CPU and each batch's index copied to the GPU, no augmentation, float32,
  SGD;
* **train fp32 / train bf16**: :func:`torchsam.experiments.train` with SGD as
  ``torchsam compare --dataset cifar10`` runs it: the uint8 images on the GPU (150 MB), each
  batch indexed, augmented (``basic``) and normalised there; ``precision="fp32"``, or
  ``"bf16"`` (autocast and ``channels_last``); eager (``graphs="off"``);
* **graphs fp32 / graphs bf16**: the same with ``graphs="on"``: each whole step replayed from
  a CUDA graph (:mod:`torchsam.experiments.graphs`);
* **SAM eager / SAM graphs**: SAM (``rho=0.05``, ``skip_nonfinite=False`` so that the step can
  be captured) in float32, eager and from a CUDA graph.

Each path trains 3 epochs: the first warms up (and captures), the second is timed
(``torch.cuda.synchronize`` at both ends), and during the third ``torch.profiler`` records the
CUDA kernels of steps 50 to 250: the **GPU busy fraction** is the union of the kernel
intervals over the wall time of those steps (copies and memsets excluded; a path whose
kernels the profiler did not record is reported as not measured). It prints each path's row
as soon as the path is measured (flushed: a run cut short by a timeout keeps the rows it
measured), with the issue's targets (busy >= 90%; an SGD epoch <= ~0.5x the old one) after the
table, and ``--json`` writes the same numbers with each run's ``cuda_graphs`` status (after
each path). A path that raises prints its exception's type and message (the traceback goes to
stderr) and the next path runs; on a GPU without bfloat16 (``torch.cuda.is_bf16_supported()``
False) the bf16 paths are skipped with a line that says so. The exit status is 1 when a path
failed, 0 otherwise.

``--cpu-smoke`` runs every path on the CPU at toy sizes (32 images, batch 8, a ResNet-18 of
width 4), so that a test can check the script without a GPU. CUDA is missing there: the
graph paths run eagerly (their status says why) and the numbers say nothing about a GPU; the
output says so on its first line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchsam.experiments import train
from torchsam.experiments.data import Images, Split
from torchsam.experiments.models import resnet18

EPOCHS = 3
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


@dataclass(frozen=True)
class Sizes:
    """The sizes of a benchmark run."""

    n_train: int = 50_000
    n_test: int = 10_000
    batch: int = 128
    width: int = 64
    window: tuple[int, int] = (50, 250)  # steps of the last epoch under the profiler

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch


FULL = Sizes()
SMOKE = Sizes(n_train=32, n_test=8, batch=8, width=4, window=(1, 3))


def random_cifar(sizes: Sizes = FULL, seed: int = 0) -> Split:
    """CIFAR-10-shaped random data: uint8 images, their normalised float rows, 10 classes."""
    n_train, n_test = sizes.n_train, sizes.n_test
    generator = torch.Generator().manual_seed(seed)
    train_pixels = torch.randint(0, 256, (n_train, 3, 32, 32), generator=generator).to(torch.uint8)
    test_pixels = torch.randint(0, 256, (n_test, 3, 32, 32), generator=generator).to(torch.uint8)
    scaled = train_pixels.float().div_(255)
    images = Images(
        train=train_pixels,
        test=test_pixels,
        mean=scaled.mean(dim=(0, 2, 3)),
        std=scaled.std(dim=(0, 2, 3)),
    )
    del scaled
    y_train = torch.randint(0, 10, (n_train,), generator=generator)
    y_test = torch.randint(0, 10, (n_test,), generator=generator)
    return Split(
        x_train=images.normalise(train_pixels).reshape(n_train, -1),
        y_train=y_train,
        y_train_clean=y_train,
        x_test=images.normalise(test_pixels).reshape(n_test, -1),
        y_test=y_test,
        num_classes=10,
        train_index=torch.arange(n_train),
        test_index=torch.arange(n_test),
        noisy_index=torch.zeros(0, dtype=torch.int64),
        images=images,
    )


class Probe:
    """``on_step`` callback: times the second epoch and profiles a window of the third.

    On CUDA the profiler records the kernels; elsewhere (the tests' smoke run) the CPU ops.
    """

    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        self.steps_per_epoch = sizes.steps_per_epoch
        self.window = sizes.window
        self.marks: dict[str, float] = {}
        cuda = device.type == "cuda"
        activity = (
            torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        )
        self.kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        self.synchronize: Callable[[], None] = torch.cuda.synchronize if cuda else lambda: None
        self.profiler = torch.profiler.profile(activities=[activity])

    def close(self) -> None:
        """Stop the profiler if a path stopped inside the window (the next path starts its own)."""
        if "window_start" in self.marks and "window_end" not in self.marks:
            self.profiler.stop()

    def __call__(self, epoch: int, steps: int, loss: Tensor) -> None:
        if steps in (self.steps_per_epoch, 2 * self.steps_per_epoch):
            self.synchronize()
            self.marks["epoch_start" if steps == self.steps_per_epoch else "epoch_end"] = (
                time.perf_counter()
            )
        if steps == 2 * self.steps_per_epoch + self.window[0]:
            self.synchronize()
            self.profiler.start()
            self.marks["window_start"] = time.perf_counter()
        if steps == 2 * self.steps_per_epoch + self.window[1]:
            self.synchronize()
            self.marks["window_end"] = time.perf_counter()
            self.profiler.stop()

    def report(self) -> dict[str, float]:
        intervals = sorted(
            (event.time_range.start, event.time_range.end)
            for event in self.profiler.events()
            if event.device_type == self.kind and not event.name.startswith(("Memcpy", "Memset"))
        )
        busy, end = 0.0, float("-inf")
        for start, stop in intervals:  # the union of the kernels' intervals, in microseconds
            if stop > end:
                busy += stop - max(start, end)
                end = stop
        window = self.marks["window_end"] - self.marks["window_start"]
        return {
            "epoch_seconds": self.marks["epoch_end"] - self.marks["epoch_start"],
            "busy_fraction": busy / 1e6 / window,
            "kernels_in_window": len(intervals),
            "window_steps": self.window[1] - self.window[0],
        }


def old_path(split: Split, device: torch.device, probe: Probe, sizes: Sizes) -> str:
    """The loop before device-resident data: float rows on the GPU, CPU batch order, fp32."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=sizes.width).to(device)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    n_train, batch = sizes.n_train, sizes.batch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS * n_train // batch)
    loss_fn, generator, steps = nn.CrossEntropyLoss(), torch.Generator().manual_seed(0), 0
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(n_train, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, n_train - batch + 1, batch):
            index = order[start : start + batch].to(device)

            def closure(index: Tensor = index) -> Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x_train[index]), y_train[index])
                loss.backward()
                return loss

            loss = optimizer.step(closure)  # type: ignore[arg-type]
            loss_sum += loss.detach()
            scheduler.step()
            steps += 1
            probe(epoch, steps, loss)
        (loss_sum / sizes.steps_per_epoch).item()
    return "eager: the old loop"


@dataclass(frozen=True)
class TrainPath:
    """A path through :func:`train`: its method, precision, graphs mode and options."""

    method: str
    precision: str
    graphs: str
    options: tuple[tuple[str, Any], ...] = ()

    def __call__(self, split: Split, device: torch.device, probe: Probe, sizes: Sizes) -> str:
        graphs = self.graphs if device.type == "cuda" else "auto"  # CPU: eager, with why
        result = train(
            self.method,
            split,
            epochs=EPOCHS,
            batch_size=sizes.batch,
            lr=LR,
            momentum=MOMENTUM,
            weight_decay=WEIGHT_DECAY,
            model_fn=lambda s: resnet18(num_classes=s.num_classes, width=sizes.width),
            device=device,
            augment="basic",
            precision=self.precision,
            graphs=graphs,
            on_step=probe,
            **dict(self.options),
        )
        return result.cuda_graphs


_SAM = (("rho", 0.05), ("skip_nonfinite", False))
PATHS: dict[str, Callable[[Split, torch.device, Probe, Sizes], str]] = {
    "old": old_path,
    "train fp32": TrainPath("sgd", "fp32", "off"),
    "train bf16": TrainPath("sgd", "bf16", "off"),
    "graphs fp32": TrainPath("sgd", "fp32", "on"),
    "graphs bf16": TrainPath("sgd", "bf16", "on"),
    "SAM eager": TrainPath("sam", "fp32", "off", _SAM),
    "SAM graphs": TrainPath("sam", "fp32", "on", _SAM),
}
"""The paths, in the order of the table; SGD unless named."""


def measure(
    path: Callable[[Split, torch.device, Probe, Sizes], str],
    split: Split,
    device: torch.device,
    sizes: Sizes,
) -> dict[str, Any]:
    """Run one path for ``EPOCHS`` epochs and return its :meth:`Probe.report` and status."""
    probe = Probe(sizes, device)
    try:
        status = path(split, device, probe, sizes)
    finally:
        probe.close()
    return {**probe.report(), "cuda_graphs": status}


def skip_reason(path: Callable[..., str], device: torch.device) -> str | None:
    """Why ``path`` cannot run on ``device``, or None: a bf16 path on a GPU without bfloat16."""
    bf16 = isinstance(path, TrainPath) and path.precision == "bf16"
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bfloat16 (torch.cuda.is_bf16_supported() is False)"
    return None


HEADER = f"{'path':13}{'epoch (s)':>10}{'x old':>7}{'busy':>8}  steps"


def row(name: str, numbers: dict[str, Any], old: float | None) -> str:
    """``name``'s line of the table: a measured path's numbers (``x old``: ``-`` without the
    old loop's), or why it was skipped or how it failed."""
    if "skipped" in numbers:
        return f"{name:13}  skipped: {numbers['skipped']}"
    if "error" in numbers:
        return f"{name:13}  FAILED: {numbers['error']}"
    seconds = numbers["epoch_seconds"]
    ratio = "-" if old is None else f"{seconds / old:.2f}"
    busy = numbers["busy_fraction"] if numbers["kernels_in_window"] else None
    return (
        f"{name:13}{seconds:>10.3f}{ratio:>7}{'n/a' if busy is None else f'{busy:.1%}':>8}"
        f"  {numbers['cuda_graphs']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run every path on the CPU at toy sizes (checks the script; measures no GPU)",
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device, sizes = torch.device("cpu"), SMOKE
        where = "the CPU"
        print(
            "bench_cifar_gpu --cpu-smoke: CUDA is missing here, so every path runs on the CPU "
            "at toy sizes and the graph paths run eagerly; these numbers say nothing about a GPU."
        )
    elif not torch.cuda.is_available():
        print("bench_cifar_gpu: CUDA is not available here; run it on a machine with a GPU.")
        return 0
    else:
        device, sizes = torch.device("cuda"), FULL
        where = torch.cuda.get_device_name()
    split = random_cifar(sizes)
    print(
        f"ResNet-18 (width {sizes.width}), batch {sizes.batch}, {sizes.n_train} random "
        f"CIFAR-shaped images, on {where}; each row as its path is measured"
    )
    print(HEADER, flush=True)
    results: dict[str, dict[str, Any]] = {}
    report = {
        "device": where,
        "cuda": device.type == "cuda",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": sizes.batch,
        "n_train": sizes.n_train,
        "width": sizes.width,
        "results": results,
        "targets": {"busy_fraction_min": 0.9, "epoch_ratio_max": 0.5},
    }
    for name, path in PATHS.items():
        reason = skip_reason(path, device)
        if reason is not None:
            results[name] = {"skipped": reason}
        else:
            try:
                results[name] = measure(path, split, device, sizes)
            except Exception as exc:  # one path's failure must not lose the others
                first_line = f"{exc}".splitlines()[0] if f"{exc}" else ""
                results[name] = {"error": f"{type(exc).__name__}: {first_line}"}
                traceback.print_exc()
                sys.stderr.flush()
        old = results.get("old", {}).get("epoch_seconds")
        print(row(name, results[name], old), flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("targets: busy >= 90%; an SGD epoch <= ~0.5x old")
    if device.type != "cuda":
        print("(no CUDA: 'busy' is the CPU operators' share of the wall time, not a GPU's)")
    for name, numbers in results.items():
        if numbers.get("kernels_in_window") == 0:
            print(f"({name}: the profiler recorded no kernels; its busy fraction is not measured)")
    failed = [name for name, numbers in results.items() if "error" in numbers]
    if failed:
        print(f"failed: {', '.join(failed)} (tracebacks on stderr)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
