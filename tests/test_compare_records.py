"""``torchsam compare`` never reports a wrong number and never loses finished runs: diverged
and unfinished runs count in no mean, the record of a run says how far it got, the global
random state is left alone, ``--resume`` keeps the earlier monitor records and leaves no stale
file, and the plots align runs on the epoch or the step."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from torchsam.experiments import compare as compare_module
from torchsam.experiments.compare import (
    CompareConfig,
    contenders,
    format_table,
    run_compare,
    summarise,
    verdict,
)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def tiny(**changes: Any) -> CompareConfig:
    """Two optimizers, two seeds, two epochs of four steps on 128 digits, no instruments."""
    values: dict[str, Any] = {
        "dataset": "digits", "train_size": 128, "epochs": 2, "batch_size": 32,
        "optimizers": "sgd,sam", "seeds": [0, 1], "instruments": False, "monitor_every": 0,
        "threads": 1,
    }  # fmt: skip
    values.update(changes)
    return CompareConfig(**values)


def files_on_disk(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _run(label: str, seed: int, acc: float, time: float, **more: Any) -> dict[str, Any]:
    return {"label": label, "seed": seed, "complete": True, "diverged": False,
            "test_accuracy": acc, "wall_time": time, "final_train_loss": 1.0 - acc,
            "forwards_per_step": 1.0, **more}  # fmt: skip


# --------------------------------------------------------------------------- 1: diverged runs
def test_diverged_runs_count_in_no_mean_and_the_table_says_how_many_runs() -> None:
    entries = contenders("sgd,sam", [0.05])
    runs = [
        _run("sgd", 0, 0.50, 1.0), _run("sgd", 1, 0.60, 1.0), _run("sgd", 2, 0.70, 1.0),
        _run("sam", 0, 0.60, 2.0, instruments={"hessian_top": 4.0, "sam_sharpness": 0.1}),
        _run("sam", 1, 0.70, 2.0, instruments={"hessian_top": 6.0, "sam_sharpness": 0.3}),
        _run("sam", 2, 0.10, 50.0, diverged=True, final_train_loss=float("nan"),
             instruments={"hessian_top": 1e6, "sam_sharpness": 1e6}),
    ]  # fmt: skip
    rows = {r["label"]: r for r in summarise(runs, entries, seeds=3)}
    sam = rows["sam"]
    assert sam["accuracy"] == pytest.approx(65.0)
    assert sam["gain"] == pytest.approx(10.0)
    assert sam["time_ratio"] == pytest.approx(2.0)
    assert sam["wall_time"] == pytest.approx(2.0)
    assert sam["final_train_loss"] == pytest.approx(0.35)
    assert sam["hessian_top"] == pytest.approx(5.0)
    assert (sam["runs"], sam["seeds"], sam["diverged"]) == (2, 3, 1)
    assert (rows["sgd"]["runs"], rows["sgd"]["seeds"], rows["sgd"]["diverged"]) == (3, 3, 0)
    table = format_table(list(rows.values())).splitlines()
    assert table[0].split()[:2] == ["optimizer", "runs"]
    assert table[2].split()[:2] == ["sgd", "3/3"]
    assert table[3].split()[:10] == [
        "sam", "[diverged", "1/3]", "2/3", "65.00", "±", "7.07", "+10.00", "±", "0.00",
    ]  # fmt: skip
    assert verdict(list(rows.values())).startswith("SAM gains +10.0 ± 0.0 points over SGD at")


def test_a_diverged_baseline_run_takes_its_seed_out_of_the_gain() -> None:
    entries = contenders("sgd,sam", [0.05])
    runs = [
        _run("sgd", 0, 0.50, 1.0), _run("sgd", 1, 0.10, 9.0, diverged=True),
        _run("sam", 0, 0.60, 2.0), _run("sam", 1, 0.80, 2.0),
        {"label": "sam", "seed": 2, "complete": False, "unfinished": "training", "history": []},
    ]  # fmt: skip
    rows = {r["label"]: r for r in summarise(runs, entries)}
    assert rows["sam"]["gain"] == pytest.approx(10.0)  # seed 0 only
    assert rows["sam"]["gain_se"] is None
    assert rows["sgd"]["accuracy"] == pytest.approx(50.0)
    assert rows["sam"]["time_ratio"] == pytest.approx(2.0)
    assert (rows["sam"]["runs"], rows["sam"]["seeds"]) == (2, 3)


# --------------------------------------------------------------------------- 2: global RNG
def test_run_compare_leaves_the_global_random_state_and_threads_alone(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    np.random.seed(1234)  # noqa: NPY002 (the legacy global state is what must not change)
    random.seed(1234)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    report = run_compare(tiny(seeds=[0], optimizers="sgd"), tmp_path / "run")
    assert report["runs"][0]["complete"]
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])  # noqa: NPY002
    assert random.getstate() == before[2]
    assert torch.get_num_threads() == threads


# --------------------------------------------------------------------------- 9: interruptions
class _Stop(KeyboardInterrupt):
    """The Ctrl-C of a test, raised at a chosen point."""


def _interrupt_last_epoch(monkeypatch: pytest.MonkeyPatch, run: int) -> None:
    """Ctrl-C in run number ``run`` (from 1) once its last epoch is recorded: before the final
    evaluation."""
    real, calls = compare_module.train, []

    def train(*args: Any, on_epoch: Any, epochs: int, **kwargs: Any) -> Any:
        calls.append(None)

        def hook(stats: Any) -> None:
            on_epoch(stats)
            if len(calls) == run and stats.epoch + 1 == epochs:
                raise _Stop

        return real(*args, on_epoch=hook, epochs=epochs, **kwargs)

    monkeypatch.setattr(compare_module, "train", train)


def _interrupt_in(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Ctrl-C when the second run calls ``compare_module.<name>``."""
    real, calls = getattr(compare_module, name), []

    def stop(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        if len(calls) == 2:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, name, stop)


@pytest.mark.parametrize(
    ("where", "stage"),
    [
        ("last epoch", "final evaluation"),
        ("finite_loss", "checks"),
        ("_save_checkpoint", "checkpoint"),
        ("measure", "instruments"),
    ],
)
def test_a_run_interrupted_after_its_epochs_says_what_it_had_not_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, stage: str
) -> None:
    if where == "last epoch":
        _interrupt_last_epoch(monkeypatch, run=2)
    else:
        _interrupt_in(monkeypatch, where)
    out = tmp_path / "run"
    with torch.random.fork_rng():
        report = run_compare(tiny(seeds=[0], instruments=True, hessian_iters=2), out)
    assert report["interrupted"] is True
    first, last = report["runs"]
    assert first["complete"] is True
    assert first["unfinished"] is None
    assert last["complete"] is False
    assert last["unfinished"] == stage
    assert len(last["history"]) == 2  # every epoch ran
    rows = {r["label"]: r for r in report["summary"]}
    assert (rows["sam"]["runs"], rows["sam"]["accuracy"]) == (0, None)  # counts nowhere
    assert json.loads((out / "results.json").read_text())["runs"][1]["unfinished"] == stage
    assert sorted(report["files"]) == files_on_disk(out)  # no partial file, none unlisted


# --------------------------------------------------------------------------- 3: --resume
def _interrupt_after_epoch(monkeypatch: pytest.MonkeyPatch, run: int, epoch: int) -> None:
    """Ctrl-C in run number ``run`` (from 1 in this process) once its epoch ``epoch`` is
    recorded (also an epoch replayed from a checkpoint)."""
    real, calls = compare_module.train, []

    def train(*args: Any, on_epoch: Any, **kwargs: Any) -> Any:
        calls.append(None)

        def hook(stats: Any) -> None:
            on_epoch(stats)
            if len(calls) == run and stats.epoch == epoch:
                raise _Stop

        return real(*args, on_epoch=hook, **kwargs)

    monkeypatch.setattr(compare_module, "train", train)


def steps_of(record: dict[str, Any]) -> list[int]:
    return [r["step"] for r in record.get("sharpness", [])]


def test_resume_keeps_the_earlier_monitor_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny(seeds=[0], monitor_every=2)  # 4 steps an epoch: measured at 2, 4, 6, 8
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, run=2, epoch=0)
        first = run_compare(config, out)
    assert first["interrupted"] is True
    assert steps_of(first["runs"][0]) == [2, 4, 6, 8]
    assert steps_of(first["runs"][1]) == [2, 4]  # kept on Ctrl-C, for --resume
    again = run_compare(config, out, resume=True)
    assert again["interrupted"] is False
    sgd, sam = again["runs"]
    assert steps_of(sgd) == [2, 4, 6, 8]  # finished: nothing left to measure, all kept
    assert steps_of(sam) == [2, 4, 6, 8]  # 2, 4 from before, 6, 8 measured now
    assert sgd["sharpness"] == first["runs"][0]["sharpness"]
    assert sam["sharpness"][:2] == first["runs"][1]["sharpness"]
    assert sam["monitor_seconds"] == pytest.approx(sum(r["seconds"] for r in sam["sharpness"]))
    assert "sharpness.png" in again["files"]


def test_resume_leaves_no_stale_file_of_the_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    config = tiny(seeds=[0], rho=[0.05, 0.1])  # a sweep: accuracy_vs_rho.png
    first = run_compare(config, out)
    (out / "sharpness.png").write_bytes(b"drawn by an earlier run with --monitor-every")
    first["files"].append("sharpness.png")
    assert "accuracy_vs_rho.png" in first["files"]
    assert sorted(first["files"]) == files_on_disk(out)
    again = run_compare(config, out, resume=True)  # finished runs: evaluated again
    assert sorted(again["files"]) == files_on_disk(out)
    assert [r["test_accuracy"] for r in again["runs"]] == [
        r["test_accuracy"] for r in first["runs"]
    ]
    # interrupted while replaying the first run's epochs: nothing of the earlier run is left
    # that this one did not write (its final checkpoints and pictures are gone)
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, run=1, epoch=0)
        cut = run_compare(config, out, resume=True)
    assert cut["interrupted"] is True
    assert sorted(cut["files"]) == files_on_disk(out)
    assert not any(f.startswith("checkpoints/") and "resume" not in f for f in cut["files"])
    assert "sharpness.png" not in files_on_disk(out)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"runs": 3}',
        '{"runs": [5, {"label": "sgd"}, {"label": "sgd", "seed": 0, "sharpness": [{"x": 1}]}]}',
        '{"runs": [{"label": "sgd", "seed": 0, "sharpness": [{"step": 2}, {"step": 4, '
        '"top_eigenvalue": "big"}]}]}',
    ],
)
def test_resume_ignores_an_earlier_results_json_it_cannot_read(tmp_path: Path, text: str) -> None:
    out = tmp_path / "run"
    config = tiny(seeds=[0], optimizers="sgd", monitor_every=2)
    run_compare(config, out)
    (out / "results.json").write_text(text)
    notes: list[str] = []
    again = run_compare(
        config, out, resume=True, progress=compare_module.Progress(note=notes.append)
    )
    assert again["runs"][0]["complete"] is True
    assert steps_of(again["runs"][0]) == []  # the earlier records are lost, nothing else
    if not text.startswith('{"runs": ['):
        assert any("earlier monitor records lost" in n for n in notes)


# --------------------------------------------------------------------------- 4, 5: plots
def test_plots_align_runs_on_the_epoch_and_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchsam.experiments import plots

    drawn: list[tuple[list[float], list[float], str]] = []
    lines: list[tuple[float, str]] = []

    class Axes:
        def plot(self, x: Any, y: Any, label: str = "", **kwargs: Any) -> None:
            drawn.append((list(x), list(y), label))

        def axhline(self, y: float, label: str = "", **kwargs: Any) -> None:
            lines.append((y, label))

        def get_legend_handles_labels(self) -> tuple[list[Any], list[str]]:
            return [], []

        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    class Figure:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

    class Pyplot:
        def subplots(self, n: int = 1, m: int = 1, **kwargs: Any) -> Any:
            return Figure(), (Axes() if n * m == 1 else (Axes(), Axes()))

        def close(self, figure: Any) -> None:
            pass

    monkeypatch.setattr(plots, "_pyplot", Pyplot)

    def epoch(e: int, loss: float) -> dict[str, Any]:
        return {"epoch": e, "train_loss": loss, "test_accuracy": loss / 10}

    def point(step: int, top: float) -> dict[str, Any]:
        return {"step": step, "top_eigenvalue": top}

    runs = [  # seed 1 was interrupted after 2 epochs; seed 2 diverged
        {"label": "sgd", "diverged": False, "train_options": {},
         "history": [epoch(0, 3.0), epoch(1, 2.0), epoch(2, 1.0)],
         "sharpness": [point(2, 10.0), point(4, 20.0), point(6, 30.0)]},
        {"label": "sgd", "diverged": False, "train_options": {},
         "history": [epoch(0, 5.0), epoch(1, 4.0)],
         "sharpness": [point(4, 40.0)]},
        {"label": "sgd", "diverged": True, "train_options": {},
         "history": [epoch(0, float("nan"))], "sharpness": [point(2, 1e9)]},
        {"label": "sam", "diverged": False, "train_options": {"lr": 0.5},
         "history": [epoch(0, 1.0)], "sharpness": [point(2, 1.0)]},
    ]  # fmt: skip
    plots.learning_curves(runs, tmp_path / "curves.png")
    loss, acc = drawn[0], drawn[1]
    assert loss == ([1, 2, 3], [4.0, 3.0, 1.0], "sgd")
    assert acc[0] == [1, 2, 3]
    assert acc[1] == pytest.approx([40.0, 30.0, 10.0])
    drawn.clear()
    plots.sharpness_over_training(runs, tmp_path / "sharpness.png", lr=0.1)
    assert drawn[0] == ([2, 4, 6], [10.0, 30.0, 30.0], "sgd")
    assert sorted(lines) == [(4.0, "2/lr = 4 (sam)"), (20.0, "2/lr = 20 (sgd)")]


# --------------------------------------------------------------------------- 6: landscape
def test_landscape_limits_threads_as_compare_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchsam.experiments.cli import main

    run_compare(tiny(seeds=[0], optimizers="sgd", epochs=1), tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoints" / "sgd.pt")
    before = torch.get_num_threads()
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    args = ["landscape", ckpt, "--samples", "32", "--steps", "2", "--out"]
    with torch.random.fork_rng():
        assert main([*args, str(tmp_path / "a.png")]) == 0
        assert calls == [1, before]  # digits: one thread, then torch's number again
        calls.clear()
        assert main([*args, str(tmp_path / "b.png"), "--threads", "2"]) == 0
        assert calls == [2, before]
