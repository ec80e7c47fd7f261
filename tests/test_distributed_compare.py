"""``torchsam compare`` under torchrun, and the data-parallel training loop behind it.

The command is launched with two CPU processes (gloo) exactly as the docs say; the training
loop's ``distributed=True`` is checked against one process on the same global batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchsam.experiments import compare
from torchsam.experiments.train import train

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

WORLD = 2
TINY = [
    "--dataset", "toy", "--epochs", "1", "--seeds", "1", "--train-size", "256",
    "--batch-size", "32", "--optimizers", "sgd,sam", "--instrument-samples", "64",
    "--hessian-iters", "3", "--landscape-steps", "3", "--quiet",
]  # fmt: skip


def test_compare_under_torchrun(tmp_path: Path) -> None:
    # the documented multi-machine flags, with one machine and a free port
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--rdzv-id=test"]
    command += ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", f"--nproc_per_node={WORLD}"]
    command += ["-m", "torchsam", "compare", *TINY, "--out", "run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # rank 0 alone prints
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(f"device cpu x {WORLD} processes")
    assert sum(line.startswith("optimizer") for line in lines) == 1
    assert sum(line.startswith("Results in run/") for line in lines) == 1
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["environment"]["processes"] == WORLD
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"sgd", "sam"}
    for label, passes in (("sgd", 1), ("sam", 2)):
        run = runs[label]
        assert run["complete"]
        assert run["steps"] == 256 // 32  # global batches of 32
        assert run["forwards_per_step"] == passes  # per process
        # each process runs its 16 samples through every pass: 32 per pass over both
        assert run["forward_samples"] == run["steps"] * passes * 32
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert len(run["history"]) == 1
    assert (tmp_path / "run" / "learning_curves.png").is_file()
    assert (tmp_path / "run" / "checkpoints" / "sam.pt").is_file()
    assert report["verdict"] in proc.stdout


# ---------------------------------------------------------------------- the training loop
# (its two-process run is in test_distributed_two_ranks.py, which spawns once for all)
def test_distributed_training_needs_a_process_group() -> None:
    split = compare.load_dataset("toy", noise=0.4, seed=0, train_size=128)
    with pytest.raises(ValueError, match="torchrun"):
        train("sgd", split, epochs=1, distributed=True)


def test_devices_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compare.resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert compare.resolve_device("auto") == torch.device("cuda", 1)
        with pytest.raises(ValueError, match="LOCAL_RANK"):
            compare.resolve_device("cuda:0")
    else:
        assert compare.resolve_device("auto") == torch.device("cpu")
