"""benchmarks/bench_gpu.py without a GPU: its one-line answer, its contenders, its verdicts.

The GPU measurements themselves (CUDA events, the sync debug mode, the profiler) need CUDA and
run in ``benchmarks/gpu_check.sh``; here every contender's training step runs on the CPU on a
tiny ResNet-18, so that the script cannot break silently where CI has no GPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import torchsam
from tests._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as mp:
        yield load_script("bench_gpu", mp)


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


class _CpuGraphProblem:
    """``GraphSetup`` on the CPU: the same model and SAM, a small batch."""

    def __init__(self, warmup: int, steps: int, rounds: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(4, 3, 32, 32, generator=gen)
        self.y = torch.randint(10, (4,), generator=gen)
        self.timing = dict(warmup=warmup, steps=steps, rounds=rounds)

    def build(self, base: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        from torchsam.experiments.models import small_cnn

        torch.manual_seed(0)
        model = small_cnn((3, 32, 32), 10, channels=4)
        return model, torchsam.SAM(model.parameters(), base, rho=0.05, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes CUDA's absence of streams")
def test_graphs_part_prints_each_number_before_compiling(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--part graphs`` on the CPU, the timing faked (each step runs once and takes 2 ms):
    the eager numbers and the graph's error are printed before ``torch.compile`` starts, so
    that a timeout while compiling keeps them (gpu_check.sh gives this part no --json)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(bench, "environment", lambda: {"torch": torch.__version__})
    monkeypatch.setattr(bench, "GraphSetup", _CpuGraphProblem)
    monkeypatch.setattr(
        bench,
        "GRAPH_BASES",
        {"SGD": (torch.optim.SGD, {"lr": 0.1}), "Adam": (torch.optim.Adam, {})},
    )

    def best_ms(fn: Any, warmup: int, steps: int, rounds: int) -> float:
        fn()
        return 2.0

    printed_before_compiling: list[str] = []

    def compile_times_out(problem: Any, row: dict[str, Any]) -> None:
        printed_before_compiling.append(capsys.readouterr().out)
        raise SystemExit(124)  # what the timeout leaves: the process ends here

    monkeypatch.setattr(bench, "_best_ms", best_ms)
    monkeypatch.setattr(bench, "add_compiled", compile_times_out)
    with pytest.raises(SystemExit):
        bench.main(["--part", "graphs"])
    out = printed_before_compiling[0]
    assert out.startswith("CUDA graphs: a whole SAM step")
    assert "  SGD: eager 2.00 ms/step\n" in out
    assert "  Adam: eager 2.00 ms/step\n" in out
    # the CUDA graph needs a CUDA stream: its error is printed at once, and Adam still ran
    assert "  SGD: graph: RuntimeError: torch.cuda.Stream requires CUDA support\n" in out
    assert out.index("SGD: graph: RuntimeError") < out.index("Adam: eager")


def test_a_measured_time_is_printed_with_its_gain(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    row: dict[str, Any] = {"base": "SGD", "errors": []}
    bench.record_ms(row, "eager_ms", 3.0)
    bench.record_ms(row, "graph_ms", 1.5)
    bench.record_ms(row, "compiled_ms", 2.0)
    assert capsys.readouterr().out.splitlines() == [
        "  SGD: eager 3.00 ms/step",
        "  SGD: CUDA graph 1.50 ms/step, 2.00x eager",
        '  SGD: torch.compile(mode="reduce-overhead") 2.00 ms/step, 1.50x eager',
    ]
    assert row["graph_gain"] == 2.0
    assert row["compiled_gain"] == 1.5
    bench.print_graph_gain([row])
    assert "SGD             3.00   1.50        2.00x  2.00      1.50x" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("supported", "native", "autocast", "words"),
    [
        (True, True, True, "bf16 autocast"),
        (True, False, True, "bf16 autocast (emulated: compute capability below 8.0)"),
        (False, False, False, "float32 (this GPU does not support bfloat16: no autocast)"),
    ],
)
def test_the_table_says_which_precision_ran(
    bench: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    supported: bool,
    native: bool,
    autocast: bool,
    words: str,
) -> None:
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return supported if including_emulation else native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert bench.gpu_precision() == (autocast, words)


def test_kernel_launches_count_every_launch_api(bench: ModuleType) -> None:
    """cuBLAS, cuDNN and CUTLASS launch with cudaLaunchKernelExC (Hopper's clusters), Triton
    with cuLaunchKernel or cuLaunchKernelEx: each is one kernel; a graph launch is not."""
    assert {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"} <= set(
        bench.LAUNCH_APIS
    )
    assert "cudaGraphLaunch" not in bench.LAUNCH_APIS


class _FakeEvent:
    """A CUDA event on the CPU: every timed stretch takes 30 ms."""

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self) -> None:
        pass

    def elapsed_time(self, end: Any) -> float:
        return 30.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes CUDA's events on the CPU")
def test_each_round_of_the_table_is_printed_as_it_is_measured(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table's timing prints each contender's time of each round, and a failure, as
    soon as it has them, so that a timeout later in the table keeps them."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    setup = bench.Setup(torch.device("cpu"), batch=2, width=4, image=8, autocast=False)
    chosen = bench.choose("SGD,SAM")  # SAM's target brings the reference along
    results = {c.name: bench.Result(c.name) for c in chosen}
    trainers = {c.name: c.build(setup) for c in chosen}

    def fails(i: int) -> None:
        raise RuntimeError("out of memory")

    trainers["SAM"] = bench.Trainer(trainers["SAM"].model, fails)
    bench.time_rounds(trainers, results, warmup=0, timed=2, rounds=2)
    assert capsys.readouterr().out.splitlines() == [
        "  round 1/2: SGD 15.00 ms/step",
        "  round 1/2: reference 15.00 ms/step",
        "  SAM: timing: RuntimeError: out of memory",
        "  round 2/2: reference 15.00 ms/step",
        "  round 2/2: SGD 15.00 ms/step",
    ]
    assert results["SGD"].rounds_ms == [15.0, 15.0]
