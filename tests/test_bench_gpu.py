"""benchmarks/bench_gpu.py without a GPU: its one-line answer, its contenders, its verdicts.

The GPU measurements themselves (CUDA events, the sync debug mode, the profiler) need CUDA and
run in ``benchmarks/gpu_check.sh``; here every contender's training step runs on the CPU on a
tiny ResNet-18, so that the script cannot break silently where CI has no GPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench_gpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_without_cuda_one_plain_line_and_status_0(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "bench_gpu.json"
    assert bench.main(["--json", str(out_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench_gpu.py: CUDA is not available here")
    assert lines[1:] == [f"wrote {out_file}"]
    payload = json.loads(out_file.read_text())
    assert payload["mode"] == "skipped"
    assert payload["rows"] == []


NAMES = [
    "SGD",
    "reference",
    "SAM",
    "SAM skip_nonfinite=False",
    "SAM fused SGD",
    "LookSAM k=5",
    "IntermittentSAM every=5",
    "GSAM",
    "FriendlySAM",
    "VaSSO",
    "SAF",
    "MESA",
    "ESAM beta=gamma=0.5",
]


def test_the_contenders_of_the_issue(bench: ModuleType) -> None:
    chosen = bench.contenders()
    assert [c.name for c in chosen] == NAMES
    targets = {c.name: (c.time_target, c.sync_target) for c in chosen}
    assert targets["SAM"] == (bench.Target(1.00, "reference"), 1)
    assert targets["LookSAM k=5"] == (bench.Target(1.25, "SGD"), 1)
    assert targets["IntermittentSAM every=5"] == (bench.Target(1.22, "SGD"), 1)
    assert targets["GSAM"] == (bench.Target(1.05, "SAM"), 1)
    assert targets["FriendlySAM"][0] == targets["VaSSO"][0] == bench.Target(1.03, "SAM")
    assert targets["SAF"] == (bench.Target(1.05, "SGD"), 0)
    assert targets["MESA"] == (bench.Target(1.40, "SGD"), 0)
    assert targets["SAM skip_nonfinite=False"][1] == 0
    # a target's reference comes along with --only
    assert [c.name for c in bench.choose("GSAM")] == ["SAM", "GSAM"]
    with pytest.raises(SystemExit, match="unknown contender"):
        bench.choose("SAM,Adam")


@pytest.mark.parametrize("name", NAMES)
def test_every_contender_trains_on_the_cpu(bench: ModuleType, name: str) -> None:
    """Three steps of each contender's training loop (its public API as the README shows it)
    move the weights and keep them finite."""
    setup = bench.Setup(torch.device("cpu"), batch=4, width=4, image=8, autocast=False)
    contender = {c.name: c for c in bench.contenders()}[name]
    trainer = contender.build(setup)
    start = [p.detach().clone() for p in setup.model.parameters()]
    for i in range(3):
        trainer.step(i)
    # the contender trains its own copy: the set-up's model is untouched
    for p, p0 in zip(setup.model.parameters(), start, strict=True):
        assert torch.equal(p, p0)
    params = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, start, strict=True))


def test_the_verdicts(bench: ModuleType) -> None:
    results = {name: bench.Result(name) for name in ("SGD", "SAF", "SAM", "GSAM")}
    results["SGD"].rounds_ms = [10.0, 9.0, 9.5]
    results["SAF"].rounds_ms = [9.45]  # 1.05x SGD: on the limit
    results["SAF"].syncs = 0.0
    results["SAM"].rounds_ms = [20.0]
    results["SAM"].syncs = 1.0
    results["GSAM"].rounds_ms = [21.2]  # 1.06x SAM
    chosen = [c for c in bench.contenders() if c.name in results]
    table, rows = bench.report(chosen, results, cpu_proxy=False)
    by_name = {row["name"]: row for row in rows}
    assert by_name["SGD"]["ms_per_step"] == 9.0  # the best round
    assert by_name["SAF"]["time_target"]["verdict"] == "PASS"
    assert by_name["SAF"]["sync_target"]["verdict"] == "PASS"
    assert by_name["GSAM"]["time_target"]["ratio"] == pytest.approx(1.06)
    assert by_name["GSAM"]["time_target"]["verdict"] == "MISS"
    assert by_name["SAM"]["time_target"]["verdict"] == "not measured"  # no reference run
    assert by_name["GSAM"]["sync_target"]["verdict"] == "not measured"
    cells = {row[0]: row for row in table}
    assert cells["GSAM"][3] == "1.06x SAM <= 1.05 MISS"
    assert cells["SAF"][5] == "<= 0 PASS"


def test_the_cpu_proxy_counts_syncs(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "proxy.json"
    assert bench.main(["--cpu-proxy", "--only", "SAF", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "SAF" in out
    rows = {row["name"]: row for row in json.loads(out_file.read_text())["rows"]}
    assert set(rows) == {"SGD", "SAF"}
    assert rows["SAF"]["syncs_per_step"] == 0
    assert rows["SAF"]["sync_target"]["verdict"] == "PASS"
    assert rows["SAF"]["ops_per_step"] > rows["SGD"]["ops_per_step"] > 0
    assert rows["SAF"]["errors"] == []
