"""Train a small classifier with SAM in both call styles, checkpoint it and resume.

Runs on the CPU in a few seconds on generated data (Gaussian blobs with 20% of the training
labels flipped, the kind of noise SAM is known to resist):

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable

import torch
from torch import nn

import torchsam


def make_data(
    gen: torch.Generator, centers: torch.Tensor, n: int, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 4, (n,), generator=gen)
    x = centers[y] + torch.randn(n, 10, generator=gen)
    flip = torch.rand(n, generator=gen) < noise
    y = torch.where(flip, torch.randint(0, 4, (n,), generator=gen), y)
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main(epochs: int = 6) -> float:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centers = torch.randn(4, 10, generator=gen)
    x_train, y_train = make_data(gen, centers, 1024, noise=0.2)
    x_test, y_test = make_data(gen, centers, 512, noise=0.0)

    model = nn.Sequential(nn.Linear(10, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torchsam.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    def make_closure(x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            with torchsam.freeze_running_stats(model, enabled=optimizer.perturbed):
                loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    def run_epoch(epoch: int) -> None:
        for batch in torch.randperm(len(x_train), generator=gen).split(64):
            x, y = x_train[batch], y_train[batch]
            if epoch % 2 == 0:
                # Two calls: first pass at w, second pass at w + e(w).
                loss_fn(model(x), y).backward()
                optimizer.first_step(zero_grad=True)
                with torchsam.freeze_running_stats(model):  # BatchNorm counts each batch once
                    loss_fn(model(x), y).backward()
                optimizer.second_step(zero_grad=True)
            else:
                # One call with a closure, as torch.optim trainers do.
                optimizer.step(make_closure(x, y))
        scheduler.step()
        print(f"epoch {epoch}: test accuracy {accuracy(model, x_test, y_test):.3f}")

    half = epochs // 2
    for epoch in range(half):
        run_epoch(epoch)

    # Checkpoint and resume: SAM's state_dict holds the base optimizer's momentum too.
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": optimizer.state_dict(),
            "sched": scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["opt"])
    scheduler.load_state_dict(ckpt["sched"])
    print("checkpoint saved and restored")

    for epoch in range(half, epochs):
        run_epoch(epoch)
    return accuracy(model, x_test, y_test)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    final = main(args.epochs)
    print(f"final test accuracy {final:.3f}")
