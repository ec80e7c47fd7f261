"""The ``torchsam`` command end to end: subprocesses with tiny settings, the JSON, the PNGs, the
exit codes and the error lines; and the pure pieces (option parsing, summary, verdict)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from torchsam.experiments.cli import main
from torchsam.experiments.compare import contenders, parse_optimizers, summarise, verdict

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
SRC = str(Path(__file__).resolve().parent.parent / "src")
INSTRUMENTS = importlib.util.find_spec("torchsam.landscape") is not None
TINY = [
    "--epochs", "1", "--train-size", "256", "--batch-size", "32", "--instrument-samples", "64",
    "--hessian-iters", "3", "--landscape-steps", "3", "--quiet",
]  # fmt: skip


def environment() -> dict[str, str]:
    """The tests' environment for a subprocess, with one thread and this checkout's sources
    first on the path (a relative ``PYTHONPATH=src`` would not hold in another folder)."""
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def torchsam(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchsam", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment(),
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def sweep(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One tiny sweep shared by the tests that read its outputs."""
    cwd = tmp_path_factory.mktemp("compare")
    args = ["compare", *TINY, "--optimizers", "sgd,sam,looksam:k=2", "--rho", "0.05,0.1"]
    proc = torchsam(*args, "--seeds", "2", "--threads", "1", "--out", "run", cwd=cwd)
    return cwd / "run", proc


def test_compare_prints_the_table_and_writes_json_pngs_and_checkpoints(
    sweep: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = sweep
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("optimizer"))
    for column in ("test acc %", "gain vs sgd (pp)", "train loss", "time", "SAM sharpness"):
        assert column in header
    labels = ["sgd", "sam rho=0.05", "sam rho=0.1", "looksam(k=2) rho=0.05", "looksam(k=2) rho=0.1"]
    rows = {
        line[: len(label)]: line for line in lines for label in labels if line.startswith(label)
    }
    assert set(rows) == set(labels)
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"] is False
    assert report["config"]["rho"] == [0.05, 0.1]
    assert report["config"]["seeds"] == [0, 1]
    assert report["config"]["model"] == "small_cnn"  # the digits' default, resolved
    runs = report["runs"]
    assert len(runs) == 2 * len(labels)
    assert all(r["complete"] for r in runs)
    for run in runs:
        assert len(run["history"]) == 1
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["steps"] == 256 // 32
        assert run["wall_time"] > 0
        if run["method"] == "sam":
            assert run["forwards_per_step"] == 2.0
        if INSTRUMENTS:
            assert math.isfinite(run["instruments"]["hessian_top"])
            assert math.isfinite(run["instruments"]["sam_sharpness"])
    # the summary is the runs' numbers: recompute two entries
    by_label = {row["label"]: row for row in report["summary"]}
    sam = [r for r in runs if r["label"] == "sam rho=0.1"]
    sgd = {r["seed"]: r for r in runs if r["label"] == "sgd"}
    gains = [100 * (r["test_accuracy"] - sgd[r["seed"]]["test_accuracy"]) for r in sam]
    assert by_label["sam rho=0.1"]["gain"] == pytest.approx(sum(gains) / 2)
    assert by_label["sam rho=0.1"]["gain_se"] == pytest.approx(abs(gains[0] - gains[1]) / 2)
    assert by_label["sgd"]["time_ratio"] == pytest.approx(1.0)
    assert report["verdict"] in proc.stdout
    expected = ["learning_curves.png", "accuracy_vs_time.png", "accuracy_vs_rho.png"]
    if INSTRUMENTS:
        expected.append("landscape.png")
        assert report["landscape"]["models"][0] == "sgd"
    for name in expected:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert name in report["files"]
    assert (out / "checkpoints" / "sgd.pt").is_file()


def test_config_file_reruns_the_same_numbers(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    out, _ = sweep
    first = json.loads((out / "results.json").read_text())
    # rerun two of the contenders only (a command-line option overrides the file)
    proc = torchsam(
        "compare", "--config", str(out / "results.json"), "--optimizers", "sgd,sam",
        "--rho", "0.1", "--seeds", "0,1", "--out", "again", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["config"]["epochs"] == 1  # from the file
    assert again["config"]["instrument_samples"] == 64

    def numbers(report: dict[str, Any], label: str) -> list[Any]:
        return [
            (r["seed"], r["test_accuracy"], r["final_train_loss"], r.get("instruments"))
            for r in report["runs"]
            if r["label"] == label
        ]

    assert numbers(again, "sgd") == numbers(first, "sgd")
    assert numbers(again, "sam") == numbers(first, "sam rho=0.1")


def test_landscape_command_draws_one_or_two_checkpoints(
    sweep: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path, capfd: Any
) -> None:
    if not INSTRUMENTS:
        pytest.skip("torchsam.landscape is not installed")
    out, _ = sweep
    ckpts = [str(out / "checkpoints" / "sgd.pt"), str(out / "checkpoints" / "sam_rho=0.1.pt")]
    proc = torchsam(
        "landscape", *ckpts, "--steps", "3", "--samples", "64", "--out", "pair.png", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pair.png").read_bytes()[:8] == PNG
    assert "sgd: loss at the centre" in proc.stdout
    # a plain state_dict needs its model named
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(ckpts[0], weights_only=True)["state_dict"], plain)
    assert main(["landscape", str(plain), "--steps", "3"]) == 2
    assert capfd.readouterr().err.strip().endswith("name its --model and --dataset as in compare")
    proc = torchsam(
        "landscape", str(plain), "--model", "small_cnn", "--dataset", "digits", "--steps", "3",
        "--samples", "64", "--out", "one.png", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG


# The second run waits for Ctrl-C at a known epoch: the test does not race the training.
PAUSING = """
import sys, time
from pathlib import Path
from torchsam.experiments import compare
from torchsam.experiments.cli import main

real, calls, pause = compare.train, [], int(sys.argv[1])

def train(*args, on_epoch, **kwargs):
    calls.append(None)

    def hook(stats):
        on_epoch(stats)
        if len(calls) == 2 and stats.epoch == pause:
            Path("paused").write_text("")
            time.sleep(120)

    return real(*args, on_epoch=hook, **kwargs)

compare.train = train
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("pause", "stage"), [(4, "training"), (11, "final evaluation")])
def test_ctrl_c_writes_what_was_gathered(tmp_path: Path, pause: int, stage: str) -> None:
    """Ctrl-C in the second run, after its epoch ``pause`` (from 0) of 12: after the last
    one, the epochs are all there but the final evaluation is not, and the record says so."""
    args = ["compare", "--epochs", "12", "--seeds", "3", "--train-size", "128"]
    args += ["--batch-size", "32", "--optimizers", "sgd,sam", "--no-instruments", "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING, str(pause), *args, "--out", "run"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["interrupted"] is True
    first, last = report["runs"]
    assert first["complete"]
    assert len(first["history"]) == 12
    assert (last["complete"], last["unfinished"]) == (False, stage)
    assert len(last["history"]) == pause + 1
    assert [r["runs"] for r in report["summary"]] == [1, 0]  # the unfinished run counts nowhere
    out = tmp_path / "run"
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(report["files"]) == on_disk
    assert "checkpoints/resume/sam-seed0.pt" in report["files"]  # for --resume
    assert (tmp_path / "run" / "learning_curves.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "sgd,nope"], "unknown optimizer 'nope'; choose from: sgd, sam"),
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--rho", "0.05,-0.1"], "argument --rho: invalid rho -0.1: rho must be >= 0"),
        (["--label-noise", "1"], "argument --label-noise: label noise must lie in [0, 1), got 1"),
        (["--label-noise", "-0.1"], "label noise must lie in [0, 1), got -0.1"),
        (["--dataset", "cifar10", "--data-dir", "missing"], "--data-dir: no such folder: missing"),
        (["--dataset", "cifar10"], "pass --data-dir DIR (nothing is downloaded)"),
        (["--dataset", "toy", "--model", "small_cnn"], "--model small_cnn needs images"),
        (["--optimizers", "sgd,looksam:k=0"], "looksam(k=0): Invalid k value: 0"),
        (["--optimizers", "sgd,sam:bogus=1"], "unexpected keyword argument 'bogus'"),
        (["--optimizers", "sgd,sam:rho=-1"], "Invalid rho value: -1; rho must be >= 0"),
        (["--epochs", "0"], "argument --epochs: expected a whole number >= 1, got 0"),
        (["--config", "missing.json"], "--config: no such file: missing.json"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["compare", "--quiet", *args])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    captured = capfd.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("torchsam compare: error: ")
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


def test_bad_arguments_in_a_subprocess(tmp_path: Path) -> None:
    proc = torchsam("compare", "--optimizers", "sgd,adamw2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("torchsam compare: error: unknown optimizer 'adamw2'")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CIFAR files
def _write_cifar(root: Path, name: str, per_file: int, seed: int = 0) -> dict[str, Any]:
    """Small files in the standard python format (pickled dicts of numpy arrays)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, key, classes = (
            root / "cifar-10-batches-py",
            [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"],
            b"labels",
            10,
        )
    else:
        folder, files, key, classes = (
            root / "cifar-100-python",
            ["train", "test"],
            b"fine_labels",
            100,
        )
    folder.mkdir(parents=True)
    written = {}
    for f in files:
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, size=per_file)]
        entry = {b"data": data, key: labels, b"filenames": [b"x.png"] * per_file}
        with (folder / f).open("wb") as handle:
            pickle.dump(entry, handle)
        written[f] = (data, labels)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reader_on_files_in_the_standard_format(name: str, tmp_path: Path) -> None:
    from torchsam.experiments.cifar import cifar

    written = _write_cifar(tmp_path, name, per_file=20)
    split = cifar(name, tmp_path, noise=0.25, seed=1)
    train_files = [f for f in written if f not in ("test_batch", "test")]
    n_train = 20 * len(train_files)
    assert split.x_train.shape == (n_train, 3072)
    assert split.num_classes == (10 if name == "cifar10" else 100)
    clean = torch.tensor([label for f in train_files for label in written[f][1]])
    assert torch.equal(split.y_train_clean, clean)
    assert torch.equal(
        split.y_test, torch.tensor(written["test_batch" if name == "cifar10" else "test"][1])
    )
    assert (split.y_train != clean).sum().item() == round(0.25 * n_train)
    # per-channel normalisation with the training set's statistics
    raw = torch.cat([torch.as_tensor(written[f][0]) for f in train_files]).float() / 255
    channels = raw.reshape(n_train, 3, 1024)
    expected = (channels - channels.mean(dim=(0, 2), keepdim=True)) / channels.std(
        dim=(0, 2), keepdim=True
    )
    torch.testing.assert_close(split.x_train, expected.reshape(n_train, 3072))
    assert split.x_test.shape == (20, 3072)
    subset = cifar(
        name,
        tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"),
        train_size=7,
    )
    assert subset.x_train.shape == (7, 3072)


def test_cifar_reader_refuses_code_and_missing_files(tmp_path: Path) -> None:
    from torchsam.experiments.cifar import cifar

    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz"):
        cifar("cifar10", tmp_path)
    _write_cifar(tmp_path, "cifar10", per_file=4)

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned",))

    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": [0]}, handle)
    with pytest.raises(ValueError, match="refusing to load"):
        cifar("cifar10", tmp_path)


def test_compare_on_cifar_files_with_resnet18(tmp_path: Path) -> None:
    _write_cifar(tmp_path / "data", "cifar10", per_file=16)
    proc = torchsam(
        "compare", "--dataset", "cifar10", "--data-dir", "data", "--model", "resnet18",
        "--width", "4", "--epochs", "1", "--seeds", "1", "--batch-size", "16",
        "--optimizers", "sgd,sam", "--no-instruments", "--quiet", "--out", "run", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    assert report["config"]["model"] == "resnet18"
    assert [r["steps"] for r in report["runs"]] == [5, 5]  # 80 images, batches of 16
    assert "(one seed: no error estimate; use more seeds)" in report["verdict"] or (
        report["verdict"].startswith("No optimizer beats SGD")
    )


# --------------------------------------------------------------------------- pure pieces
def test_optimizer_specs_with_options_and_a_rho_sweep() -> None:
    assert parse_optimizers("sgd,looksam:k=5,alpha=0.2,sam:adaptive=true,gsam") == [
        ("sgd", {}),
        ("looksam", {"k": 5, "alpha": 0.2}),
        ("sam", {"adaptive": True}),
        ("gsam", {}),
    ]
    entries = contenders("sgd:lr=0.1,sam,looksam:rho=0.3", [0.05, 0.2])
    assert [(c.label, c.rho) for c in entries] == [
        ("sgd(lr=0.1)", None),
        ("sam rho=0.05", 0.05),
        ("sam rho=0.2", 0.2),
        ("looksam rho=0.3", 0.3),
    ]
    assert entries[0].train_options == {"lr": 0.1}
    assert entries[0].options == {}
    for bad, match in [
        ("k=5", "starts with an option"),
        ("sam:k", "malformed option"),
        ("sam,,sgd", "empty item"),
        ("sam,sam", "listed twice"),
        ("sam:rho=1,rho=2", "given twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            contenders(bad, [0.05])


def _row(label: str, gain: float | None, se: float | None, ratio: float) -> dict[str, Any]:
    return {"label": label, "method": label.split()[0], "baseline": gain is None, "gain": gain,
            "gain_se": se, "time_ratio": ratio, "seeds": 4, "runs": 3,
            "hessian_top": None}  # fmt: skip


def test_verdict_sentences() -> None:
    table = [_row("sgd", None, None, 1.0), _row("sam", 5.08, 0.8, 2.0)]
    table.append(_row("looksam", 4.1, 0.5, 1.2))
    table[0]["hessian_top"], table[1]["hessian_top"] = 27.0, 7.5
    assert verdict(table) == (
        "SAM gains +5.1 ± 0.8 points over SGD at 2.0x time, with a 3.6x smaller top Hessian "
        "eigenvalue; LookSAM keeps 81% of it at 1.2x time."
    )
    noisy = [_row("sgd", None, None, 1.0), _row("sam", 1.0, 0.6, 2.0)]
    assert verdict(noisy) == (
        "SAM gains +1.0 ± 0.6 points over SGD at 2.0x time (within twice its standard error "
        "over 3 seeds: more --seeds would settle it)."
    )
    worse = [_row("sgd", None, None, 1.0), _row("sam", -1.0, 0.6, 2.0)]
    assert (
        verdict(worse) == "No optimizer beats SGD here (best: SAM, -1.0 ± 0.6 points at 2.0x time)."
    )
    single = [_row("sgd", None, None, 1.0), _row("sam", 3.0, None, 2.0)]
    assert verdict(single) == (
        "SAM gains +3.0 points over SGD at 2.0x time (one seed: no error estimate; use more seeds)."
    )


def test_verdict_of_a_rho_sweep_never_compares_a_method_with_itself() -> None:
    # The rows of `compare --optimizers sgd,sam,periodic --rho 0.05,0.1 --seeds 1 --epochs 2`,
    # where periodic SAM at 0.1 had the best gain and once read "periodic SAM rho=0.1 gains
    # +0.6 ... ; periodic SAM rho=0.05 keeps 67% of it at 1.3x time".
    sweep = [_row("sgd", None, None, 1.0), _row("sam rho=0.05", 0.2, None, 2.0)]
    sweep += [_row("sam rho=0.1", 0.3, None, 2.0), _row("periodic rho=0.05", 0.4, None, 1.3)]
    sweep.append(_row("periodic rho=0.1", 0.6, None, 1.4))
    assert verdict(sweep) == (
        "periodic SAM rho=0.1 gains +0.6 points over SGD at 1.4x time "
        "(one seed: no error estimate; use more seeds)."
    )
    sweep[2]["gain"] = 0.9  # SAM at 0.1 best: the cheap variant is measured against it
    assert verdict(sweep).endswith("; periodic SAM rho=0.1 keeps 67% of it at 1.4x time.")


def test_summary_keeps_incomplete_runs_out() -> None:
    entries = contenders("sgd,sam", [0.05])
    runs = [
        {"label": "sgd", "seed": 0, "complete": True, "test_accuracy": 0.5, "wall_time": 1.0,
         "final_train_loss": 1.0, "forwards_per_step": 1.0},
        {"label": "sam", "seed": 0, "complete": True, "test_accuracy": 0.6, "wall_time": 2.0,
         "final_train_loss": 0.9, "forwards_per_step": 2.0},
        {"label": "sgd", "seed": 1, "complete": False, "history": []},
    ]  # fmt: skip
    rows = {r["label"]: r for r in summarise(runs, entries)}
    assert (rows["sgd"]["runs"], rows["sgd"]["seeds"]) == (1, 2)
    assert rows["sam"]["gain"] == pytest.approx(10.0)
    assert rows["sam"]["gain_se"] is None
    assert rows["sam"]["time_ratio"] == pytest.approx(2.0)


def test_bench_command_runs_the_benchmark_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchsam.experiments import bench

    seen: list[list[str]] = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["bench", "--quick", "--threads", "2"]) == 0
    assert seen == [["--threads", "2", "--quick"]]
    wrapper = (
        Path(__file__).resolve().parent.parent / "benchmarks" / "bench_overhead.py"
    ).read_text()
    assert "from torchsam.experiments.bench import main" in wrapper


def test_adamw_gets_its_own_learning_rate_unless_given() -> None:
    entries = contenders("adamw,adamw:lr=0.01", [0.05])
    assert [(c.label, c.train_options) for c in entries] == [
        ("adamw", {"lr": 0.001}),
        ("adamw(lr=0.01)", {"lr": 0.01}),
    ]


def test_ci_runs_the_readme_commands() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text().splitlines()
    assert 'pip install ".[cli]" && torchsam compare' in readme
    test_line = next(line for line in readme if line.startswith('pip install -e ".[test]"'))
    ci = (root / ".ci" / "run").read_text()
    assert test_line.replace("pip install", "python -m pip install --quiet", 1) in ci
    assert "mkdocs build --strict" in ci
    assert (root / "docs" / "landscape.png").read_bytes()[:8] == PNG


def test_list_optimizers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--list-optimizers"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[:-1]]
    assert names[:2] == ["sgd", "sam"]
    assert {"looksam", "gsam", "esam", "saf", "mesa", "adamw"} <= set(names)


def test_list_optimizers_shows_the_rho_compare_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--list-optimizers"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[:-1]}
    assert lines["sam"].endswith(" [rho=0.1 (--rho)]")  # --rho's default, not the class's 0.05
    assert lines["periodic"].endswith(" [rho=0.1 (--rho), every=5]")
    assert lines["looksam"].endswith(" [rho=0.1 (--rho), k=5]")
    assert not any("rho=0.05" in line for line in lines.values())
    assert main(["compare", "--rho", "0.05,0.2", "--list-optimizers"]) == 0
    sam = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sam "))
    assert sam.endswith(" [rho=0.05 and 0.2 (--rho)]")


def test_help_names_the_default_out_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchsam.experiments.cli import _default_out

    monkeypatch.setenv("COLUMNS", "300")  # one line per option: nothing wrapped at a hyphen
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    lines = capsys.readouterr().out.splitlines()
    out_help = next(line for line in lines if line.lstrip().startswith("--out OUT"))
    form, example = re.search(
        r"a new (compare-\S+) folder, e\.g\. (compare-\d+-\d+)\)", out_help
    ).groups()
    assert form == "compare-<date>-<time>"
    monkeypatch.chdir(tmp_path)
    made = _default_out().name
    assert re.fullmatch(r"compare-\d{8}-\d{6}", made)
    assert re.fullmatch(r"compare-\d{8}-\d{6}", example)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_cuda_is_one_line(tmp_path: Path, capfd: Any) -> None:
    assert main(["compare", "--device", "cuda", "--quiet", "--out", str(tmp_path / "r")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "torchsam compare: error: --device cuda: CUDA is not available here; "
        "use --device cpu or auto"
    ]


def test_a_config_file_with_bad_values_is_one_line(tmp_path: Path, capfd: Any) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {"epochs": "ten", "seeds": [0]}}))
    assert main(["compare", "--config", str(bad), "--quiet"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        f"torchsam compare: error: --config {bad}: Invalid epochs value: 'ten'; it must be an "
        "int >= 1"
    ]
    bad.write_text(json.dumps({"config": {"colour": "red"}}))
    assert main(["compare", "--config", str(bad), "--quiet"]) == 2
    assert "unknown option 'colour'" in capfd.readouterr().err
