"""Write ``tests/answer_keys/engine_v1.pt``: what every optimizer did before the engine redesign.

For every variant, a SGD (momentum, weight decay) and an AdamW base, and each call style the
variant has (two calls, ``step(closure)``), three float64 steps on a small model with three
param groups, a parameter that never gets a gradient and a frozen one: the weights and the
``state_dict()`` after each step. ``tests/test_answer_key.py`` replays the same runs and
requires the same numbers bit for bit (``torch.equal``), so a refactor of the engine cannot
change a single rounding.

Run ``python tests/make_answer_key.py`` only to record a deliberate change of the numbers, and
say why in the commit. ``--only NAME [NAME ...]`` re-records only the runs of those variants (the
keys of :data:`VARIANTS`) and keeps every other entry of the key as it was, bit for bit; it
prints the largest relative change of a weight or state tensor in the runs it re-records.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import torchsam

KEY = Path(__file__).parent / "answer_keys" / "engine_v1.pt"
STEPS = 3
N = 12  # batch rows; MSAM's m=5 splits them 5, 5, 2

BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}

#: name -> (class, variant arguments, per-group variant arguments, call styles)
VARIANTS: dict[str, tuple[type, dict[str, Any], tuple[dict[str, Any], ...], tuple[str, ...]]] = {
    "SAM": (torchsam.SAM, {}, ({}, {}, {}), ("two_call", "closure")),
    "SAM-foreach-off": (torchsam.SAM, {"foreach": False}, ({}, {}, {}), ("two_call", "closure")),
    "ASAM": (
        torchsam.SAM,
        {"adaptive": True},
        ({"eta": 0.01}, {}, {"eta": 0.1}),
        ("two_call", "closure"),
    ),
    "GSAM": (
        torchsam.GSAM,
        {"rho_min": 0.01},
        ({"alpha": 0.3}, {}, {"alpha": 0.1}),
        ("two_call", "closure"),
    ),
    "FriendlySAM": (
        torchsam.FriendlySAM,
        {},
        ({"sigma": 0.5}, {}, {"lmbda": 0.5}),
        ("two_call", "closure"),
    ),
    "VaSSO": (torchsam.VaSSO, {}, ({"theta": 0.4}, {}, {}), ("two_call", "closure")),
    "WSAM": (torchsam.WSAM, {}, ({"gamma": 0.7}, {}, {}), ("two_call", "closure")),
    "WSAM-coupled": (
        torchsam.WSAM,
        {"decouple": False},
        ({"gamma": 0.7}, {}, {}),
        ("two_call", "closure"),
    ),
    "LookSAM": (torchsam.LookSAM, {"k": 2}, ({"alpha": 0.5}, {}, {}), ("two_call", "closure")),
    "IntermittentSAM-every": (
        torchsam.IntermittentSAM,
        {"every": 2, "offset": 1},
        ({}, {}, {}),
        ("two_call", "closure"),
    ),
    "IntermittentSAM-probability": (
        torchsam.IntermittentSAM,
        {"probability": 0.5, "seed": 3},
        ({}, {}, {}),
        ("two_call", "closure"),
    ),
    "ESAM": (torchsam.ESAM, {"beta": 0.6, "gamma": 0.5, "seed": 1}, ({}, {}, {}), ("closure",)),
    "MSAM": (torchsam.MSAM, {"m": 5}, ({}, {}, {}), ("closure",)),
}


class Net(nn.Module):
    """Two layers, a trainable parameter that never receives a gradient and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(3, 4, dtype=torch.float64)
        self.l2 = nn.Linear(4, 2, dtype=torch.float64)
        self.unused = nn.Parameter(torch.randn(2, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(2, dtype=torch.float64), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x))) + self.frozen


def run(variant: str, base: str, style: str) -> list[dict[str, Any]]:
    """The weights and ``state_dict()`` after each of :data:`STEPS` steps of one run."""
    cls, kwargs, per_group, _ = VARIANTS[variant]
    base_cls, base_kwargs = BASES[base]
    torch.manual_seed(0)
    model = Net()
    data = [
        (torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64))
        for _ in range(STEPS)
    ]
    lr = base_kwargs["lr"]
    groups = [
        {"params": list(model.l1.parameters()), "rho": 0.05, **per_group[0]},
        {"params": [model.l2.weight], "rho": 0.1, "lr": lr / 2, **per_group[1]},
        {
            "params": [model.l2.bias, model.unused, model.frozen],
            "rho": 0.02,
            "lr": lr / 5,
            **per_group[2],
        },
    ]
    opt = cls(groups, base_cls, **base_kwargs, **kwargs)
    records = []
    for x, y in data:
        _one_step(model, opt, x, y, variant, style)
        records.append(
            {
                "weights": [p.detach().clone() for p in model.parameters()],
                "state_dict": opt.state_dict(),
            }
        )
    return records


def _one_step(model: Net, opt: Any, x: Tensor, y: Tensor, variant: str, style: str) -> None:
    def loss() -> Tensor:
        return ((model(x) - y) ** 2).mean()

    if variant.startswith(("ESAM", "MSAM")):

        def per_sample(rows: Tensor | None) -> Tensor:
            xb, yb = (x, y) if rows is None else (x[rows], y[rows])
            return ((model(xb) - yb) ** 2).mean(dim=1)

        if variant.startswith("MSAM"):
            opt.step(per_sample, batch_size=N)
        else:
            opt.step(per_sample)
        return
    if style == "closure":

        def closure() -> Tensor:
            opt.zero_grad()
            value = loss()
            value.backward()
            return value

        opt.step(closure)
        return
    opt.zero_grad()
    loss().backward()
    if opt.first_step(zero_grad=True):
        loss().backward()
    opt.second_step(zero_grad=True)


def cases() -> list[tuple[str, str, str]]:
    return [
        (variant, base, style)
        for variant, (*_, styles) in VARIANTS.items()
        for base in BASES
        for style in styles
    ]


def record(make: Callable[[str, str, str], list[dict[str, Any]]] = run) -> dict[str, Any]:
    return {"/".join(case): make(*case) for case in cases()}


def max_relative_change(old: Any, new: Any) -> float:
    """The largest ``|new - old| / |old|`` over the floating-point tensors of two records of
    the same structure (``|new - old|`` where ``old`` is 0)."""
    if isinstance(old, Tensor):
        if not old.is_floating_point() or old.numel() == 0:
            return 0.0
        diff = (new.double() - old.double()).abs()
        scale = old.double().abs()
        return float(torch.where(scale > 0, diff / scale, diff).max())
    if isinstance(old, dict):
        return max((max_relative_change(old[k], new[k]) for k in old), default=0.0)
    if isinstance(old, (list, tuple)):
        pairs = zip(old, new, strict=True)
        return max((max_relative_change(a, b) for a, b in pairs), default=0.0)
    return 0.0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Record the engine's answer key.")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(VARIANTS),
        metavar="VARIANT",
        help="re-record only these variants' runs; every other entry is kept bit for bit",
    )
    args = parser.parse_args(argv)
    KEY.parent.mkdir(parents=True, exist_ok=True)
    if args.only is None:
        torch.save(record(), KEY)
        print(f"wrote {KEY} ({KEY.stat().st_size} bytes, {len(cases())} runs of {STEPS} steps)")
        return
    key = torch.load(KEY, weights_only=True)
    for case in cases():
        if case[0] not in args.only:
            continue
        name = "/".join(case)
        new = run(*case)
        print(f"{name}: max relative change {max_relative_change(key[name], new):.3g}")
        key[name] = new
    torch.save(key, KEY)
    print(f"rewrote the runs of {', '.join(args.only)} in {KEY}")


if __name__ == "__main__":
    main()
