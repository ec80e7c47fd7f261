"""A smoke run of benchmarks/bench_cifar_gpu.py's two paths on the CPU, at a tiny size: the
profiler and timing code runs, and the new path trains through train() (on CUDA the lead runs
the full benchmark; here it only says that CUDA is missing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_cifar_gpu.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cifar_gpu", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_paths_run_and_report_on_a_tiny_cpu_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _load()
    for name, value in {"N_TRAIN": 96, "N_TEST": 16, "BATCH": 16, "WIDTH": 2}.items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "WINDOW", (1, 4))
    split = bench.random_cifar()
    assert split.images is not None
    assert split.images.train.shape == (96, 3, 32, 32)
    assert split.images.train.dtype == torch.uint8
    for path in (bench.old_path, bench.new_path):
        report = bench.measure(path, split, torch.device("cpu"))
        assert report["epoch_seconds"] > 0
        assert report["busy_fraction"] > 0  # CPU ops under the profiler here
        assert report["kernels_in_window"] > 0
        assert report["window_steps"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "CUDA is not available here" in proc.stdout
    assert not (tmp_path / "out.json").exists()
