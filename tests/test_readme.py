"""Every Python example in README.md runs, in order, against a small model and data."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchsam

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def _namespace() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    x, y = torch.randn(32, 4), torch.randint(0, 10, (32,))
    return {
        "torch": torch,
        "torchsam": torchsam,
        "YourModel": lambda: model,
        "loss_fn": nn.CrossEntropyLoss(),
        "loader": [(x, y), (x.flip(0), y.flip(0))],
        "x": x,
        "y": y,
        "epochs": 2,
        "micro_batches": list(zip(x.split(8), y.split(8), strict=True)),
        "train_set": range(32),
    }


def test_readme_has_examples() -> None:
    assert len(_blocks()) >= 12


def test_readme_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes ckpt.pt
    ns = _namespace()
    for i, block in enumerate(_blocks()):
        if "for x, y, index in loader" in block:  # the trajectory-loss loop yields indices
            ns["loader"] = [(ns["x"], ns["y"], torch.arange(32))]
        weights = [p.detach().clone() for p in ns["YourModel"]().parameters()]
        with warnings.catch_warnings():
            # CPU-only CI: the mixed-precision example asks for CUDA autocast and scaler
            warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
            warnings.filterwarnings("ignore", message=".*device_type of 'cuda'.*")
            try:
                exec(compile(block, f"README.md block {i + 1}", "exec"), ns)
            except Exception as error:  # pragma: no cover - the message names the block
                raise AssertionError(f"README.md block {i + 1} failed:\n{block}") from error
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(weights, ns["YourModel"]().parameters(), strict=True)
        )
        trains = any(k in block for k in ("step(", "second_step("))
        assert changed or not trains, f"README.md block {i + 1} trains but no weight moved"
