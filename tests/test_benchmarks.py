"""The benchmark scripts run (a smoke run; their numbers are not asserted here)."""

import subprocess
import sys
from pathlib import Path

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
