"""``torchsam compare`` and ``torchsam landscape`` report true numbers, or say they cannot
(issue 18, the command's items): the landscape's centre is the model's own loss, ``--samples N``
uses exactly N samples, a diverged run is a result, ``--out`` is checked before any work and
never mixes two runs' files, and a configuration file is held to the command line's rules."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.test_cli import torchsam
from torchsam.experiments import compare as compare_module
from torchsam.experiments.cli import main
from torchsam.experiments.compare import (
    DATASET_DEFAULTS,
    build_model,
    check_output_file,
    check_output_folder,
    contenders,
    finite_loss,
    format_table,
    load_dataset,
    measure,
    summarise,
    verdict,
)

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = [
    "--epochs", "1", "--train-size", "256", "--batch-size", "32", "--instrument-samples", "64",
    "--hessian-iters", "3", "--seeds", "1", "--threads", "1", "--quiet",
]  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent


def strict_json(path: Path) -> Any:
    """``json.loads`` that refuses NaN and Infinity (which are not JSON)."""

    def refuse(token: str) -> Any:
        raise ValueError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def reference_loss(checkpoint: Path, samples: int) -> float:
    """The checkpoint's model's mean cross-entropy on its first ``samples`` training samples,
    summed sample by sample in float64 (BatchNorm in evaluation mode)."""
    meta = torch.load(checkpoint, map_location="cpu", weights_only=True)
    split = load_dataset(
        meta["dataset"],
        noise=meta["label_noise"],
        seed=meta["data_seed"],
        train_size=meta["train_size"],
    )
    with torch.random.fork_rng():
        model = build_model(meta["model"], meta["dataset"], split, meta["width"])
    model.load_state_dict(meta["state_dict"])
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(min(samples, split.x_train.shape[0])):
            out = model(split.x_train[i : i + 1]).double()
            total += float(nn.functional.cross_entropy(out, split.y_train[i : i + 1]))
    return total / min(samples, split.x_train.shape[0])


def checkpoint_of(out: Path, label: str) -> Path:
    for path in (out / "checkpoints").glob("*.pt"):
        if torch.load(path, map_location="cpu", weights_only=True)["label"] == label:
            return path
    raise LookupError(f"no checkpoint of {label!r} in {out}")


def one_line_error(capfd: Any, prefix: str) -> str:
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"torchsam {prefix}: error: "), lines[0]
    assert captured.out == ""
    return lines[0]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """SGD, SAM at a rho of its own and at --rho, and a SAM whose lr makes it diverge, with an
    even number of landscape steps (the grid has no point at the centre)."""
    cwd = tmp_path_factory.mktemp("mixed")
    proc = torchsam(
        "compare", *TINY, "--optimizers", "sgd,sam:rho=0.2,sam,sam:lr=1e30",
        "--landscape-steps", "4", "--out", "run", cwd=cwd,
    )  # fmt: skip
    return cwd / "run", proc


def finished(mixed: tuple[Path, subprocess.CompletedProcess]) -> tuple[Path, dict[str, Any]]:
    """The output folder of the ``mixed`` run and its results.json, once it ended well."""
    out, proc = mixed
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return out, strict_json(out / "results.json")


# --------------------------------------------------------------------------- item 4
def test_compare_center_loss_is_the_models_own_loss_with_even_steps(
    mixed: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, report = finished(mixed)
    pair = report["landscape"]["models"]
    assert pair[0] == "sgd"
    for label, center in zip(pair, report["landscape"]["center_loss"], strict=True):
        expected = reference_loss(checkpoint_of(out, label), 64)
        assert center == pytest.approx(expected, rel=1e-5, abs=1e-6), label


def test_landscape_command_prints_the_models_loss_on_exactly_n_samples(
    mixed: tuple[Path, subprocess.CompletedProcess],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torchsam.landscape as landscape

    out, _ = mixed
    ckpt = out / "checkpoints" / "sgd.pt"
    seen: list[Any] = []
    real = landscape.surface_2d

    def spy(model: nn.Module, loss_fn: Any, data: Any, **kwargs: Any) -> Any:
        seen.append(list(data))
        return real(model, loss_fn, data, **kwargs)

    monkeypatch.setattr(landscape, "surface_2d", spy)
    split = load_dataset("digits", noise=0.4, seed=0, train_size=256)
    for samples, steps in [(257, 4), (200, 2), (64, 5)]:
        with torch.random.fork_rng():
            status = main(
                ["landscape", str(ckpt), "--samples", str(samples), "--steps", str(steps),
                 "--out", str(tmp_path / "one.png")]
            )  # fmt: skip
        assert status == 0
        printed = capfd.readouterr().out.splitlines()[0]
        assert printed.startswith("sgd: loss at the centre ")
        centre = float(printed.split("loss at the centre ")[1].split(",")[0])
        n = min(samples, 256)  # the checkpoint's training set has 256 samples
        assert abs(centre - reference_loss(ckpt, n)) <= 5e-5 + 1e-7, (samples, steps)
        data = seen.pop()
        assert torch.equal(torch.cat([x for x, _ in data]), split.x_train[:n])
        assert torch.equal(torch.cat([y for _, y in data]), split.y_train[:n])


# --------------------------------------------------------------------------- item 7
def test_one_diverged_optimizer_is_recorded_and_the_others_finish(
    mixed: tuple[Path, subprocess.CompletedProcess],
) -> None:
    _, report = finished(mixed)
    proc = mixed[1]
    runs = {r["label"]: r for r in report["runs"]}
    assert set(runs) == {"sgd", "sam rho=0.2", "sam rho=0.1", "sam(lr=1e+30)"}
    bad = runs.pop("sam(lr=1e+30)")
    assert bad["complete"] is True
    assert bad["diverged"] is True
    assert bad["final_train_loss"] is None  # NaN -> null
    assert bad["instruments"] == {"hessian_top": None, "sam_sharpness": None}
    assert 0.0 <= bad["test_accuracy"] <= 1.0
    for run in runs.values():
        assert run["complete"]
        assert run["diverged"] is False
        assert run["instruments"]["hessian_top"] is not None
        assert run["instruments"]["sam_sharpness"] is not None
    rows = {r["label"]: r for r in report["summary"]}
    assert rows["sam(lr=1e+30)"]["diverged"] == 1
    assert rows["sam(lr=1e+30)"]["final_train_loss"] is None
    assert rows["sgd"]["diverged"] == 0
    assert "sam(lr=1e+30)" not in report["landscape"]["models"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("sam(lr=1e+30)")]
    assert len(table) == 1
    assert table[0].startswith("sam(lr=1e+30) [diverged 1/1]")
    assert "SAM(lr=1e+30) (1 of 1)" in report["verdict"]
    assert report["verdict"] in proc.stdout


def test_compare_with_a_learning_rate_that_diverges_everything(tmp_path: Path) -> None:
    proc = torchsam("compare", *TINY, "--lr", "1e30", "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = strict_json(tmp_path / "run" / "results.json")
    assert [r["label"] for r in report["runs"]] == ["sgd", "sam", "periodic"]
    assert all(r["complete"] and r["diverged"] for r in report["runs"])
    assert all(r["final_train_loss"] is None for r in report["runs"])
    assert "landscape" not in report  # no finite model to draw
    assert "sgd [diverged 1/1]" in proc.stdout
    assert report["verdict"] in proc.stdout


class _Sharpness:
    """A stand-in for torchsam.sharpness whose measures fail as they may on a bad model."""

    def __init__(self, top: Any, sharp: Any) -> None:
        self.top, self.sharp = top, sharp

    def hessian_eigenvalues(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.top, Exception):
            raise self.top
        return torch.tensor([self.top])

    def sam_sharpness(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.sharp, Exception):
            raise self.sharp
        return torch.tensor(self.sharp)


@pytest.mark.parametrize(
    ("top", "sharp"),
    [
        (torch.linalg.LinAlgError("linalg.eigh: failed to converge"), float("nan")),
        (float("nan"), float("-inf")),
        (ValueError("the loss is not finite"), 0.25),
    ],
)
def test_measure_records_a_failed_instrument_as_none_with_the_reason(
    top: Any, sharp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        compare_module, "_instrument_modules", lambda: (_Sharpness(top, sharp), None)
    )
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    result = measure(model, data, rho=0.05, iters=3, seed=0)
    assert result["hessian_top"] is None
    assert set(result["errors"]) >= {"hessian_top"}
    if isinstance(sharp, float) and sharp == 0.25:
        assert result["sam_sharpness"] == 0.25
        assert set(result["errors"]) == {"hessian_top"}
    else:
        assert result["sam_sharpness"] is None
        assert "not finite" in result["errors"]["sam_sharpness"]
    if isinstance(top, Exception):
        assert str(top) in result["errors"]["hessian_top"]


def test_finite_loss_tells_a_diverged_model() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    data = [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))]
    model.train()
    assert finite_loss(model, data)
    assert model.training  # the mode is restored
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    assert not finite_loss(model, data)
    with torch.no_grad():
        model[0].weight[0, 0] = 1e38
        model[2].weight.fill_(1e38)  # finite weights, an infinite output
    assert not finite_loss(model, data)


def test_table_and_verdict_mark_diverged_runs() -> None:
    entries = contenders("sgd,sam", [0.05])
    runs = [
        {"label": "sgd", "seed": 0, "complete": True, "diverged": False, "test_accuracy": 0.5,
         "wall_time": 1.0, "final_train_loss": 1.0, "forwards_per_step": 1.0},
        {"label": "sam", "seed": 0, "complete": True, "diverged": True, "test_accuracy": 0.1,
         "wall_time": 2.0, "final_train_loss": float("nan"), "forwards_per_step": 2.0,
         "instruments": {"hessian_top": None, "sam_sharpness": None}},
    ]  # fmt: skip
    summary = summarise(runs, entries)
    assert [r["diverged"] for r in summary] == [0, 1]
    table = format_table(summary).splitlines()
    assert table[3].startswith("sam [diverged 1/1]")
    assert "nan" not in table[3]
    assert verdict(summary).endswith(
        "Diverged runs (loss not finite; null in results.json; left out of the numbers): "
        "SAM (1 of 1)."
    )


# --------------------------------------------------------------------------- items 8, 9
def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training or measuring fail the test (the checks must come first)."""
    import torchsam.landscape as landscape

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(compare_module, "run_compare", fail)
    monkeypatch.setattr(compare_module, "load_dataset", fail)
    monkeypatch.setattr(landscape, "surface_2d", fail)


def test_compare_refuses_a_non_empty_out_folder(
    tmp_path: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_work(monkeypatch)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "old.pt").write_bytes(b"x")
    (run / "landscape.png").write_bytes(b"x")
    assert main(["compare", "--quiet", "--out", str(run)]) == 2
    line = one_line_error(capfd, "compare")
    assert f"--out: {run} is not empty (it holds checkpoints and 1 more)" in line
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "landscape.png", "old.pt"]
    with pytest.raises(ValueError, match="is not empty"):
        compare_module.check_output_folder(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_folder(empty)  # an empty folder is fine, and so is a new one
    check_output_folder(tmp_path / "new" / "deeper")
    # --resume continues in the earlier run's folder: it must exist, and may hold files
    check_output_folder(run, resume=True)
    with pytest.raises(ValueError, match="--resume continues the comparison written there"):
        check_output_folder(tmp_path / "new", resume=True)
    with pytest.raises(ValueError, match="is not a folder"):
        check_output_folder(run / "landscape.png", resume=True)


def test_files_listed_are_exactly_the_files_of_the_run(
    mixed: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, report = finished(mixed)
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(report["files"]) == on_disk
    # each of the four runs: its final model and its per-epoch resume checkpoint
    assert len([f for f in on_disk if f.startswith("checkpoints/resume/")]) == 4
    assert len([f for f in on_disk if f.startswith("checkpoints/")]) == 8


@pytest.mark.parametrize("where", ["under a file", "an existing file"])
def test_compare_bad_out_paths_are_one_line_before_any_work(
    where: str, tmp_path: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_work(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run" if where == "under a file" else tmp_path / "a_file"
    assert main(["compare", "--quiet", "--out", str(out)]) == 2
    line = one_line_error(capfd, "compare")
    if where == "under a file":
        assert line == (
            f"torchsam compare: error: --out: cannot create {out}: {out.parent} is a file, "
            "not a folder"
        )
    else:
        assert line == f"torchsam compare: error: --out: {out} exists and is not a folder"


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_landscape_bad_out_paths_are_one_line_before_any_work(
    where: str,
    mixed: tuple[Path, subprocess.CompletedProcess],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_work(monkeypatch)
    out, _ = mixed
    (tmp_path / "a_file").write_text("x")
    target = tmp_path if where == "a folder" else tmp_path / "a_file" / "pic.png"
    ckpt = str(out / "checkpoints" / "sgd.pt")
    assert main(["landscape", ckpt, "--steps", "3", "--out", str(target)]) == 2
    line = one_line_error(capfd, "landscape")
    assert line.startswith(f"torchsam landscape: error: --out: {target} is a folder") or (
        line.startswith(f"torchsam landscape: error: --out: cannot create {target}: ")
        and line.endswith("a_file is a file, not a folder")
    )


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root may write in any folder, whatever its permissions",
)
def test_unwritable_out_folders_are_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="no permission to write in"):
            check_output_folder(locked / "run")
        with pytest.raises(ValueError, match="no permission to write in"):
            check_output_file(locked / "pic.png")
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- smaller items
def test_help_gives_the_dataset_defaults_the_code_uses(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "digits: small_cnn, 30 epochs, batch 64, lr 0.02;" in text
    assert "toy: mlp, 30 epochs, batch 64, lr 0.05;" in text
    assert "cifar10 and cifar100: resnet18, 10 epochs, batch 128, lr 0.1." in text
    d, t, c = (DATASET_DEFAULTS[k] for k in ("digits", "toy", "cifar10"))
    docs = (ROOT / "docs" / "cli.md").read_text()
    row = (
        f"| {d['epochs']}, {d['batch_size']}, {d['lr']:g} (toy: {t['epochs']}, "
        f"{t['batch_size']}, {t['lr']:g}; CIFAR: {c['epochs']}, {c['batch_size']}, {c['lr']:g}) |"
    )
    assert row in docs
    assert d["lr"] == 0.02


@pytest.mark.parametrize(
    ("cli", "entry"),
    [
        (["--lr", "0"], {"lr": 0}),
        (["--landscape-span", "0"], {"landscape_span": 0}),
        (["--rho", "0.1,0.1"], {"rho": [0.1, 0.1]}),
        (["--seeds", "1,1"], {"seeds": [1, 1]}),
        (["--width", "0"], {"width": 0}),
        (["--epochs", "ten"], {"epochs": "ten"}),
        (["--label-noise", "1"], {"label_noise": 1.0}),
        (["--momentum", "-1"], {"momentum": -1}),
    ],
)
def test_a_config_file_is_held_to_the_command_lines_rules(
    cli: list[str],
    entry: dict[str, Any],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_work(monkeypatch)
    out = str(tmp_path / "run")
    try:
        status = main(["compare", "--quiet", "--out", out, *cli])
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    assert status == 2
    one_line_error(capfd, "compare")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": entry}))
    assert main(["compare", "--quiet", "--out", out, "--config", str(path)]) == 2
    line = one_line_error(capfd, "compare")
    assert line.startswith(f"torchsam compare: error: --config {path}: Invalid {next(iter(entry))}")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"data_dir": 5}, "Invalid data_dir value: 5; give a folder name"),
        ({"instruments": "no"}, "Invalid instruments value: 'no'; it must be true or false"),
        ({"device": 0}, "Invalid device value: 0; give a string"),
        ({"optimizers": ["sgd"]}, "Invalid optimizers value: ['sgd']; give a string"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line(
    entry: dict[str, Any],
    message: str,
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_work(monkeypatch)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(entry))
    assert main(["compare", "--quiet", "--out", str(tmp_path / "r"), "--config", str(path)]) == 2
    assert one_line_error(capfd, "compare") == (
        f"torchsam compare: error: --config {path}: {message}"
    )


def test_rho_given_to_one_sam_and_swept_for_another(
    mixed: tuple[Path, subprocess.CompletedProcess],
) -> None:
    entries = contenders("sgd,sam:rho=0.2,sam", [0.1])
    assert [(c.label, c.rho) for c in entries] == [
        ("sgd", None),
        ("sam rho=0.2", 0.2),
        ("sam rho=0.1", 0.1),
    ]
    assert [c.label for c in contenders("sam:rho=0.2", [0.1])] == ["sam"]  # alone: no suffix
    for same in ("sam,sam:rho=0.1", "sam:rho=0.2,sam:rho=0.2", "sam:rho=1,sam:rho=1.0"):
        with pytest.raises(ValueError, match="listed twice"):
            contenders(same, [0.1])
    runs = finished(mixed)[1]["runs"]
    assert {r["label"]: r["options"]["rho"] for r in runs if r["method"] == "sam"} == {
        "sam rho=0.2": 0.2,
        "sam rho=0.1": 0.1,
        "sam(lr=1e+30)": 0.1,
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sgd,sam:lr=abc", "sam(lr=abc): Invalid lr value: 'abc'; it must be a number > 0"),
        ("sgd,sam:lr=0", "sam(lr=0): Invalid lr value: 0; it must be a number > 0"),
        ("sgd:momentum=-1", "sgd(momentum=-1): Invalid momentum value: -1; it must be a number"),
        ("sam:weight_decay=nan", "Invalid weight_decay value: nan; it must be a number >= 0"),
    ],
)
def test_bad_training_options_of_an_optimizer_are_one_clear_line(
    spec: str, message: str, tmp_path: Path, capfd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_work(monkeypatch)
    assert main(["compare", "--quiet", "--optimizers", spec, "--out", str(tmp_path / "r")]) == 2
    assert message in one_line_error(capfd, "compare")


def test_verdict_with_one_optimizer() -> None:
    entries = contenders("sam", [0.05])
    runs = [
        {"label": "sam", "seed": s, "complete": True, "test_accuracy": acc, "wall_time": 1.0,
         "final_train_loss": 1.0, "forwards_per_step": 2.0}
        for s, acc in enumerate([0.5, 0.6])
    ]  # fmt: skip
    assert verdict(summarise(runs, entries)) == (
        "Only SAM ran (55.00% test accuracy): nothing to compare it with; add a baseline to "
        "--optimizers (e.g. sgd)."
    )
    assert verdict(summarise([], entries)) == (
        "Nothing to compare: SAM was the only optimizer, and no run of it finished (diverged "
        "runs do not count)."
    )


@pytest.fixture
def capture_rng() -> Iterator[None]:
    with torch.random.fork_rng():
        yield


@pytest.mark.usefixtures("capture_rng")
def test_a_checkpoint_that_does_not_fit_says_what_does_not_fit(
    mixed: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, capfd: Any
) -> None:
    out, _ = mixed
    ckpt = out / "checkpoints" / "sgd.pt"
    png = str(tmp_path / "x.png")
    assert main(["landscape", str(ckpt), "--width", "4", "--out", png]) == 2
    line = one_line_error(capfd, "landscape")
    assert f"{ckpt} does not fit --model small_cnn --width 4 on digits: " in line
    assert "'1.weight' has shape [16, 1, 3, 3] in the file but [4, 1, 3, 3] in the model" in line
    assert "more shapes differ" in line
    assert main(["landscape", str(ckpt), "--model", "mlp", "--out", png]) == 2
    line = one_line_error(capfd, "landscape")
    assert "the file lacks " in line
    assert "the model has no " in line
    assert "Error(s) in loading state_dict" not in line
    diverged = checkpoint_of(out, "sam(lr=1e+30)")
    assert main(["landscape", str(diverged), "--out", png]) == 2
    assert "the model's loss on the data is not finite" in one_line_error(capfd, "landscape")
    assert not Path(png).exists()


def test_a_landscape_file_name_not_ending_in_png_is_refused_first(
    mixed: tuple[Path, subprocess.CompletedProcess],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_work(monkeypatch)
    ckpt = str(finished(mixed)[0] / "checkpoints" / "sgd.pt")
    for name in ("pic", "pic.pdf"):  # the picture is a PNG, whatever the name says
        assert main(["landscape", ckpt, "--out", str(tmp_path / name)]) == 2
        assert one_line_error(capfd, "landscape") == (
            "torchsam landscape: error: --out: the landscape is written as a PNG: give a name "
            "ending in .png"
        )


@pytest.mark.parametrize("command", ["compare", "landscape"])
def test_a_folder_without_write_permission_is_one_line(
    command: str,
    mixed: tuple[Path, subprocess.CompletedProcess],
    tmp_path: Path,
    capfd: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as root (CI containers) no folder is unwritable, so the permission answer is faked
    _no_work(monkeypatch)
    ckpt = str(finished(mixed)[0] / "checkpoints" / "sgd.pt")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    target = tmp_path / ("run" if command == "compare" else "pic.png")
    args = ["compare", "--quiet"] if command == "compare" else ["landscape", ckpt]
    assert main([*args, "--out", str(target)]) == 2
    assert one_line_error(capfd, command) == (
        f"torchsam {command}: error: --out: cannot create {target}: no permission to write "
        f"in {tmp_path}"
    )
