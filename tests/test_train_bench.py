"""A smoke run of benchmarks/bench_cifar_gpu.py's paths on the CPU, at toy sizes: the profiler
and timing code runs, the paths train through train() (the graph paths eagerly, saying why),
and ``--cpu-smoke`` and the answer without CUDA say plainly that CUDA is missing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_cifar_gpu.py"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_script("bench_cifar_gpu", monkeypatch)


def test_every_path_runs_and_reports_on_a_tiny_cpu_problem(bench: ModuleType) -> None:
    sizes = bench.SMOKE
    split = bench.random_cifar(sizes)
    assert split.images is not None
    assert split.images.train.shape == (sizes.n_train, 3, 32, 32)
    assert split.images.train.dtype == torch.uint8
    for name in ("old", "train bf16", "SAM graphs"):
        report = bench.measure(bench.PATHS[name], split, torch.device("cpu"), sizes)
        assert report["epoch_seconds"] > 0
        assert report["busy_fraction"] > 0  # CPU ops under the profiler here
        assert report["kernels_in_window"] > 0
        assert report["window_steps"] == 2
        if name != "old":  # on the CPU a graph path runs eagerly, and says why
            assert report["cuda_graphs"] == (
                "eager: the device is cpu; CUDA graphs need a CUDA device"
            )


def test_cpu_smoke_says_cuda_is_missing_and_runs_every_path(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--cpu-smoke``: every path runs on the CPU at toy sizes, and the output says plainly
    that CUDA is missing and why the graph paths ran eagerly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--cpu-smoke", "--json", str(tmp_path / "out.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("bench_cifar_gpu --cpu-smoke: CUDA is missing here")
    assert "(no CUDA: 'busy' is the CPU operators' share of the wall time, not a GPU's)" in out
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["cuda"] is False
    assert list(report["results"]) == [
        "old",
        "train fp32",
        "train bf16",
        "graphs fp32",
        "graphs bf16",
        "SAM eager",
        "SAM graphs",
    ]
    for numbers in report["results"].values():
        assert numbers["epoch_seconds"] > 0
        assert numbers["cuda_graphs"] in out


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


def test_a_failing_path_is_reported_and_the_others_still_run(
    bench: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each row is printed as soon as its path is measured; a path that raises (here inside
    the profiled window, as a failed capture would) prints its exception's type and message,
    the next path still runs (and profiles), a skipped path says why, and the status is 1."""
    printed_before: dict[str, str] = {}

    def fails_in_window(split: Any, device: torch.device, probe: Any, sizes: Any) -> str:
        printed_before["broken"] = capsys.readouterr().out

        def on_step(epoch: int, steps: int, loss: torch.Tensor) -> None:
            probe(epoch, steps, loss)
            if "window_start" in probe.marks:
                raise RuntimeError("capture failed\nthe rest of the message")

        return bench.old_path(split, device, on_step, sizes)

    profiling_after_the_failure: list[bool] = []
    train_fp32 = bench.PATHS["train fp32"]

    def after(split: Any, device: torch.device, probe: Any, sizes: Any) -> str:
        profiling_after_the_failure.append(torch._C._autograd._profiler_enabled())
        return str(train_fp32(split, device, probe, sizes))

    paths = {"old": bench.PATHS["old"], "broken": fails_in_window, "train fp32": after}
    paths["train bf16"] = bench.PATHS["train bf16"]
    monkeypatch.setattr(bench, "PATHS", paths)
    monkeypatch.setattr(
        bench,
        "skip_reason",
        lambda path, device: "no bfloat16 here" if path is paths["train bf16"] else None,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = bench.main(["--cpu-smoke", "--json", str(tmp_path / "out.json")])
    finally:
        torch.set_num_threads(threads)
    assert status == 1
    assert re.search(r"^old +\d+\.\d{3} +1\.00 ", printed_before["broken"], re.MULTILINE)
    out = capsys.readouterr()
    rows = out.out.splitlines()
    assert "broken         FAILED: RuntimeError: capture failed" in rows
    assert re.search(r"^train fp32 +\d+\.\d{3} +\d+\.\d\d ", out.out, re.MULTILINE)
    assert "train bf16     skipped: no bfloat16 here" in rows
    assert "failed: broken (tracebacks on stderr)" in rows
    assert "RuntimeError: capture failed\nthe rest of the message" in out.err  # the traceback
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert results["broken"] == {"error": "RuntimeError: capture failed"}
    assert results["train bf16"] == {"skipped": "no bfloat16 here"}
    # the failed path's profiler was stopped (a second one started over it crashes at exit)
    assert profiling_after_the_failure == [False]
    assert results["train fp32"]["kernels_in_window"] > 0


def test_bf16_paths_are_skipped_on_a_gpu_without_bfloat16(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = torch.device("cuda")  # a device object only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert "does not support bfloat16" in bench.skip_reason(bench.PATHS["graphs bf16"], cuda)
    assert bench.skip_reason(bench.PATHS["graphs fp32"], cuda) is None
    assert bench.skip_reason(bench.PATHS["old"], cuda) is None
    assert bench.skip_reason(bench.PATHS["train bf16"], torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert bench.skip_reason(bench.PATHS["train bf16"], cuda) is None
