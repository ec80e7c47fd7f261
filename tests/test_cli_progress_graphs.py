"""The command's progress bar reads the loss once per epoch, and ``--graphs`` reaches train()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from torchsam.experiments._dispatch_count import DispatchCounter
from torchsam.experiments.cli import _progress, main

pytest.importorskip("tqdm")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_progress_bar_reads_the_loss_once_per_epoch() -> None:
    progress = _progress(quiet=False)
    epochs, per_epoch = 3, 25
    progress.start_run("sgd", 0, epochs * per_epoch)
    loss = torch.tensor(0.5) * 2  # a tensor as the training loop hands it over
    counter = DispatchCounter()
    with counter:
        for step in range(1, epochs * per_epoch + 1):
            progress.step((step - 1) // per_epoch, step, loss)
    progress.end_run()
    # one read when each epoch starts and one at the last step; every 10 steps would be 7
    assert counter.syncs == epochs + 1


def test_graphs_option_is_recorded_and_on_refuses_a_cpu_run(tmp_path: Path, capfd: Any) -> None:
    common = ["compare", "--epochs", "1", "--train-size", "64", "--seeds", "1"]
    common += ["--optimizers", "sgd,sam", "--no-instruments", "--quiet"]
    assert main([*common, "--graphs", "auto", "--out", str(tmp_path / "auto")]) == 0
    runs = json.loads((tmp_path / "auto" / "results.json").read_text())["runs"]
    assert [r["cuda_graphs"] for r in runs] == [
        "eager: the device is cpu; CUDA graphs need a CUDA device"
    ] * 2
    assert main([*common, "--out", str(tmp_path / "off")]) == 0
    runs = json.loads((tmp_path / "off" / "results.json").read_text())["runs"]
    assert {r["cuda_graphs"] for r in runs} == {"eager: graphs='off'"}
    capfd.readouterr()
    assert main([*common, "--graphs", "on", "--out", str(tmp_path / "on")]) == 2
    err = capfd.readouterr().err.strip()
    assert err.endswith("graphs='on' cannot capture this run in a CUDA graph: the device is cpu; "
                        "CUDA graphs need a CUDA device")  # fmt: skip
    assert "\n" not in err
