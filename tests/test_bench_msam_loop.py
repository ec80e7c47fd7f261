"""benchmarks/bench_msam_loop.py runs, and its floor does MomentumSAM's work bit for bit (a
smoke run: the times are not asserted)."""

import pytest

from tests._scripts import load_script


def test_msam_loop_benchmark_smoke_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    bench = load_script("bench_msam_loop", monkeypatch)
    assert bench.main(["--rounds", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 rounds of 2 steps per contender" in out
    assert "the floor's weights and momenta equal MomentumSAM's after 40 steps: True" in out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"sgd", "momentumsam", "floor"} <= rows
    assert "target: momentumsam " in out


def test_floor_check_sees_a_different_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bit-for-bit check is not vacuous: a floor with another radius than MomentumSAM's
    default, or another weight decay, no longer equals it."""
    pytest.importorskip("sklearn")
    bench = load_script("bench_msam_loop", monkeypatch)
    split = bench.noisy_digits(bench.NOISE, seed=0)
    x, y = split.x_train, split.y_train
    assert bench.same_work(x, y, 5)
    monkeypatch.setattr(bench, "RHO", 0.4)
    assert not bench.same_work(x, y, 5)
    monkeypatch.setattr(bench, "RHO", 0.5)
    floor_step = bench.Floor.step

    def plain_decay(self, closure):  # the decay at w, as SGD alone takes it
        self.scale = None
        return floor_step(self, closure)

    monkeypatch.setattr(bench.Floor, "step", plain_decay)
    assert not bench.same_work(x, y, 5)
