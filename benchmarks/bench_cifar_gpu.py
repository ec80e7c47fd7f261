"""A CIFAR-sized SGD epoch on CUDA: the old input path against the new one, and how busy the GPU is.

Run it as ``python benchmarks/bench_cifar_gpu.py [--json PATH]`` on a machine with a GPU
(without CUDA it says so and exits with status 0). It needs no files and downloads nothing: it
draws 50,000 random uint8 images of CIFAR's shape (and 10,000 test images) in memory, then
trains ResNet-18 (the CIFAR form, 11.2M parameters) with SGD (lr 0.1, momentum 0.9, weight
decay 5e-4, cosine schedule), batch 128, 390 steps per epoch, along two paths:

* **old**: the training loop of ``torchsam compare`` before device-resident data, written out
  here with its settings: the normalised float32 features (614 MB) on the GPU, the batch
  order drawn on the CPU and each batch's index copied to the GPU, no augmentation, float32;
* **new**: :func:`torchsam.experiments.train` as ``torchsam compare --dataset cifar10`` runs
  it now: the uint8 images on the GPU (150 MB), each batch indexed, augmented (``basic``:
  4-pixel pad random crop and horizontal flip) and normalised there, bf16 autocast, model and
  batches in ``channels_last``;
* **new in fp32**: the same with ``precision="fp32"`` (no autocast, no ``channels_last``),
  which separates what the data path costs from what the precision does.

Each path trains 3 epochs: the first warms up, the second is timed (``torch.cuda.synchronize``
at both ends), and during the third ``torch.profiler`` records the CUDA kernels of steps 50 to
250: the **GPU busy fraction** is the union of the kernel intervals over the wall time of
those steps (copies and memsets excluded). It prints both paths side by side with the issue's
targets (busy >= 90% on the new path; new epoch <= ~0.5x the old one), and ``--json`` writes
the same numbers. On an H200 the script takes well under three minutes. It always exits with
status 0: it is a report, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from torchsam.experiments import train
from torchsam.experiments.data import Images, Split
from torchsam.experiments.models import resnet18

N_TRAIN, N_TEST, BATCH, EPOCHS, WIDTH = 50_000, 10_000, 128, 3, 64
WINDOW = (50, 250)  # steps of the last epoch under the profiler
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def random_cifar(seed: int = 0) -> Split:
    """CIFAR-10-shaped random data: uint8 images, their normalised float rows, 10 classes."""
    generator = torch.Generator().manual_seed(seed)
    train_pixels = torch.randint(0, 256, (N_TRAIN, 3, 32, 32), generator=generator).to(torch.uint8)
    test_pixels = torch.randint(0, 256, (N_TEST, 3, 32, 32), generator=generator).to(torch.uint8)
    scaled = train_pixels.float().div_(255)
    images = Images(
        train=train_pixels,
        test=test_pixels,
        mean=scaled.mean(dim=(0, 2, 3)),
        std=scaled.std(dim=(0, 2, 3)),
    )
    del scaled
    y_train = torch.randint(0, 10, (N_TRAIN,), generator=generator)
    y_test = torch.randint(0, 10, (N_TEST,), generator=generator)
    return Split(
        x_train=images.normalise(train_pixels).reshape(N_TRAIN, -1),
        y_train=y_train,
        y_train_clean=y_train,
        x_test=images.normalise(test_pixels).reshape(N_TEST, -1),
        y_test=y_test,
        num_classes=10,
        train_index=torch.arange(N_TRAIN),
        test_index=torch.arange(N_TEST),
        noisy_index=torch.zeros(0, dtype=torch.int64),
        images=images,
    )


class Probe:
    """``on_step`` callback: times the second epoch and profiles a window of the third.

    On CUDA the profiler records the kernels; elsewhere (the tests' smoke run) the CPU ops.
    """

    def __init__(self, steps_per_epoch: int, device: torch.device) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.marks: dict[str, float] = {}
        cuda = device.type == "cuda"
        activity = (
            torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        )
        self.kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        self.synchronize: Callable[[], None] = torch.cuda.synchronize if cuda else lambda: None
        self.profiler = torch.profiler.profile(activities=[activity])

    def __call__(self, epoch: int, steps: int, loss: Tensor) -> None:
        if steps in (self.steps_per_epoch, 2 * self.steps_per_epoch):
            self.synchronize()
            self.marks["epoch_start" if steps == self.steps_per_epoch else "epoch_end"] = (
                time.perf_counter()
            )
        if steps == 2 * self.steps_per_epoch + WINDOW[0]:
            self.synchronize()
            self.profiler.start()
            self.marks["window_start"] = time.perf_counter()
        if steps == 2 * self.steps_per_epoch + WINDOW[1]:
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
            "window_steps": WINDOW[1] - WINDOW[0],
        }


def old_path(split: Split, device: torch.device, probe: Probe) -> None:
    """The loop before device-resident data: float rows on the GPU, CPU batch order, fp32."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=WIDTH).to(device)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    steps_per_epoch = N_TRAIN // BATCH
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS * steps_per_epoch)
    loss_fn, generator, steps = nn.CrossEntropyLoss(), torch.Generator().manual_seed(0), 0
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(N_TRAIN, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, N_TRAIN - BATCH + 1, BATCH):
            index = order[start : start + BATCH].to(device)

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
        (loss_sum / steps_per_epoch).item()


def new_path(split: Split, device: torch.device, probe: Probe, precision: str = "auto") -> None:
    """:func:`train` as the command runs CIFAR now (augment basic; ``precision="auto"``: bf16
    and channels_last on CUDA)."""
    train(
        "sgd",
        split,
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        model_fn=lambda s: resnet18(num_classes=s.num_classes, width=WIDTH),
        device=device,
        augment="basic",
        precision=precision,
        on_step=probe,
    )


def new_path_fp32(split: Split, device: torch.device, probe: Probe) -> None:
    """The new path in float32: device-resident data and augmentation without bf16."""
    new_path(split, device, probe, precision="fp32")


def measure(
    path: Callable[[Split, torch.device, Probe], None], split: Split, device: torch.device
) -> dict[str, float]:
    """Run one path for ``EPOCHS`` epochs and return its :meth:`Probe.report`."""
    probe = Probe(N_TRAIN // BATCH, device)
    path(split, device, probe)
    return probe.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cifar_gpu: CUDA is not available here; run it on a machine with a GPU.")
        return 0
    split = random_cifar()
    cuda = torch.device("cuda")
    paths = {"old": old_path, "new": new_path, "new_fp32": new_path_fp32}
    results = {name: measure(path, split, cuda) for name, path in paths.items()}
    ratio = results["new"]["epoch_seconds"] / results["old"]["epoch_seconds"]
    gpu = torch.cuda.get_device_name()
    print(f"ResNet-18, SGD, batch {BATCH}, {N_TRAIN} random CIFAR-shaped images, on {gpu}")
    print(f"{'':28}{'old (fp32, rows)':>18}{'new (bf16, uint8)':>19}{'new in fp32':>13}   target")
    old, new, fp32 = results["old"], results["new"], results["new_fp32"]
    print(
        f"{'epoch (s)':28}{old['epoch_seconds']:>18.2f}{new['epoch_seconds']:>19.2f}"
        f"{fp32['epoch_seconds']:>13.2f}   new <= ~0.5x old: {ratio:.2f}x"
    )
    print(
        f"{'GPU busy (kernels / wall)':28}{old['busy_fraction']:>18.1%}"
        f"{new['busy_fraction']:>19.1%}{fp32['busy_fraction']:>13.1%}   new >= 90%"
    )
    for name, numbers in results.items():
        if numbers["kernels_in_window"] == 0:
            print(f"({name}: the profiler recorded no kernels; its busy fraction is not measured)")
    report = {
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "batch_size": BATCH,
        "n_train": N_TRAIN,
        "results": results,
        "epoch_ratio": ratio,
        "targets": {"busy_fraction_min": 0.9, "epoch_ratio_max": 0.5},
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
