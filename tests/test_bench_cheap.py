"""benchmarks/bench_cheap.py runs (a smoke run: the pass counts are asserted, not the times)."""

from pathlib import Path

import pytest

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


def test_cheap_benchmark_smoke_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    # in-process (the script's main), to spare a second interpreter start
    bench = load_script("bench_cheap", monkeypatch)
    args = ["--quick", "--model", "mlp", "--hidden", "16", "--epochs", "6", "--pass-repeats", "1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "MLP 2x16 + BatchNorm; batch 128, lr 0.01; 6 epochs, timed from epoch 5" in out
    assert "passes on one batch (ms, median): F " in out
    assert ", S_msam " in out
    assert "MomentumSAM's own work: its step alone " in out
    table = out.split("targets:")[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    # model forward calls per step and the samples they took, in batches: deterministic
    assert rows["sgd"][-2:] == ["1.00", "1.00"]
    assert rows["sam"][-2:] == ["2.00", "2.00"]
    assert rows["saf"][-2:] == ["1.00", "1.00"]
    assert rows["mesa"][-2:] == ["1.00", "1.00"]  # the EMA model is another module
    assert rows["esam"][-2:] == ["3.00", "2.50"]  # the second pass takes half the batch
    assert rows["looksam"][-2:] == ["1.20", "1.20"]  # a two-pass step in five
    assert rows["periodic"][-2:] == ["1.20", "1.20"]
    assert rows["momentumsam"][-2:] == ["1.00", "1.00"]  # one pass, perturbed between steps
    for name in ("saf", "mesa", "esam", "looksam", "periodic", "momentumsam"):
        assert f"  {name}: " in out.split("targets:")[1]
