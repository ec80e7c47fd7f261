"""The benchmark scripts run (a smoke run; their numbers are not asserted here)."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


def test_overhead_benchmark_smoke_run() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    for scenario in ("1 many small: own cost", "2 ResNet-sized: total", "3 allocations/step"):
        assert scenario in out
    # the allocation count is deterministic: none after the first step
    assert "torchsam: 0 parameter-sized allocations" in out
    assert "scenario 1 components, torchsam, minimum over 40 single calls: first_step() " in out


def test_overhead_benchmark_prints_issue_20_targets() -> None:
    """``--targets-only`` prints every CPU target with its measurement and a verdict; on tiny
    sizes the timed verdicts are noise, the operator counts and graph breaks are not."""
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_overhead.py"),
            "--targets-only",
            "--tiny",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = {
        line.split("  ")[0]: line for line in out.splitlines() if line.endswith(("PASS", "FAIL"))
    }
    expected = {
        "own ops of GSAM (6 / 12 tensors)": "PASS",
        "own ops of LookSAM k=5, sharpness step (6 / 12 tensors)": "PASS",
        "own ops of IntermittentSAM's plain step": "PASS",
        "memory-bound step (20 tensors, 46,400 params), 1 thread(s)": None,
        "SAM's own cost (20 small tensors), 1 thread(s)": None,
        "graph breaks of the step's kernels under torch.compile (20 tensors)": "PASS",
    }
    assert set(rows) == set(expected), out
    for label, verdict in expected.items():
        if verdict is not None:
            assert rows[label].endswith(verdict), rows[label]
    assert "eager vs compiled" in out
    assert "aot_eager: compiled in" in out


def test_variants_benchmark_runs_the_cnn_with_batchnorm() -> None:
    pytest.importorskip("sklearn")
    script = ROOT / "benchmarks" / "bench_variants.py"
    args = ["--model", "cnn", "--channels", "4", "--epochs", "1", "--seeds", "1"]
    out = subprocess.run(
        [sys.executable, str(script), "--quick", *args, "--methods", "looksam"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert "model: CNN 4/8 channels + BatchNorm" in out
    table = out.split("(SGD trains")[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert rows["sgd"][-1] == "1.00"  # forward passes per step
    assert rows["looksam"][-1] == "1.21"  # 19 steps in one epoch, 4 with a second pass (k=5)


def test_sweep_defaults_smoke_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    # in-process (the script's main), to spare a second interpreter start
    sweep = load_script("sweep_defaults", monkeypatch)
    out_file, report = tmp_path / "runs.jsonl", tmp_path / "report.md"
    argv = ["--quick", "--tasks", "signals/mlp/adamw", "--out", str(out_file)]
    threads = torch.get_num_threads()
    try:
        assert sweep.main([*argv, "--report", str(report)]) == 0
        rows = [json.loads(line) for line in out_file.read_text().splitlines()]
        assert {r["task"] for r in rows} == {"signals/mlp/adamw"}
        knobs = {r["knob"] for r in rows}
        assert {"SGD", "SAM rho", "ASAM rho", "LookSAM alpha", "LookSAM k", "ESAM gamma"} <= knobs
        passes = {r["config"]: r["forwards_per_step"] for r in rows}
        assert passes["sgd()"] == 1.0
        assert passes["sam(rho=0.05)"] == 2.0
        assert (
            "| LookSAM alpha | signals/mlp/adamw | fwd/step | time vs SGD |" in report.read_text()
        )
        # a second call finds every run in the file and repeats none
        capsys.readouterr()
        assert sweep.main(argv) == 0
        assert "seed 0" not in capsys.readouterr().out  # no run was logged
        assert len(out_file.read_text().splitlines()) == len(rows)
    finally:
        torch.set_num_threads(threads)


INSTRUMENTS = ROOT / "benchmarks" / "bench_instruments.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_instruments_benchmark_says_plainly_that_cuda_is_missing() -> None:
    run = subprocess.run(
        [sys.executable, str(INSTRUMENTS), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "--device cuda: CUDA is not available here" in run.stderr
    assert run.stdout == ""


def test_instruments_benchmark_prints_issue_20_targets_for_each_thread_count() -> None:
    pytest.importorskip("pyhessian")
    pytest.importorskip("loss_landscapes")
    args = ["--quick", "--short", "--threads", "1", "2"]
    out = subprocess.run(
        [sys.executable, str(INSTRUMENTS), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    table = out.split("## Issue 20's instrument targets")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| target | setting | measured | verdict |"
    settings = [row.split(" | ")[1] for row in rows[1:]]
    assert settings == ["CPU, 1 thread"] * 4 + ["CPU, 2 threads"] * 4
    names = [row.split(" | ")[0].lstrip("| ") for row in rows[1:5]]
    assert names == [
        "top eigenvalue: time <= 0.5x PyHessian's",
        "top eigenvalue: within 1% of PyHessian's",
        "trace: time <= 0.5x PyHessian's",
        "trace: within 1% of PyHessian's",
    ]
    # the values agree whatever the load; the times are not asserted
    assert all(row.endswith(("| met |", "| MISSED |")) for row in rows[1:])
    assert all(row.endswith("| met |") for row in rows[1:] if "within 1%" in row)
    # --short: the default contenders alone, issue 20's two sections
    assert "method='power'" not in out
    assert "### 3." not in out
    assert out.count("operators dispatched (load-independent)") == 4


RUN_WITHOUT_LOSS_LANDSCAPES = """
import importlib.metadata
import runpy
import sys

sys.modules["loss_landscapes"] = None  # not installed: importing it raises ImportError
installed = importlib.metadata.version


def version(name):
    if name.lower() == "pyhessian":  # carried as a bare folder on PYTHONPATH: no metadata
        raise importlib.metadata.PackageNotFoundError(name)
    return installed(name)


importlib.metadata.version = version
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_instruments_short_needs_neither_loss_landscapes_nor_package_metadata(
    tmp_path: Path,
) -> None:
    """``--short`` (gpu_check.sh's run) measures issue 20's two instruments with PyHessian
    alone, also where PyHessian is a bare folder on PYTHONPATH: its version is "unknown"."""
    pytest.importorskip("pyhessian")
    runner = tmp_path / "run.py"
    runner.write_text(RUN_WITHOUT_LOSS_LANDSCAPES)
    run = subprocess.run(
        [sys.executable, str(runner), str(INSTRUMENTS), "--quick", "--short", "--trials", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert ", PyHessian unknown, Python " in run.stdout
    assert "loss-landscapes 3" not in run.stdout
    assert "| trace: within 1% of PyHessian's |" in run.stdout


def test_instruments_package_version_falls_back_to_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = load_script("bench_instruments", monkeypatch)
    assert module.package_version("torch", "torch") == importlib.metadata.version("torch")
    carried = type(sys)("carried_without_metadata")
    monkeypatch.setitem(sys.modules, carried.__name__, carried)
    assert module.package_version("no-such-distribution", carried.__name__) == "unknown"
    carried.__version__ = "0.1"  # type: ignore[attr-defined]
    assert module.package_version("no-such-distribution", carried.__name__) == "0.1"
