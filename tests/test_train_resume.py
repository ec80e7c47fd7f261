"""Training on CIFAR-format files: checkpoints every epoch and a resume that continues bit for
bit; precision and augmentation options; the command's --preset and --resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests._cifar_runs import one_thread_fixture, split_fixture, tiny_resnet
from tests.test_cifar import write_cifar
from torchsam.experiments import train
from torchsam.experiments.data import Split
from torchsam.experiments.train import EpochStats, Result

_one_thread = one_thread_fixture()


split = split_fixture()


_model = tiny_resnet


class _Stop(Exception):
    pass


def _run(split: Split, **kwargs: Any) -> Result:
    options: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 16,
        "lr": 0.1,
        "seed": 2,
        "model_fn": _model,
        "augment": "cutout",
        "curves": True,
        "rho": 0.1,
    }
    return train("sam", split, **{**options, **kwargs})


def _assert_same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    else:
        assert a == b


def _last_full_state(path: Path, saved: dict[str, Any]) -> Any:
    """An ``on_epoch`` that keeps the checkpoint of the last epoch as written before the run
    finishes (and slims it)."""

    def keep(stats: EpochStats) -> None:
        if stats.epoch == 2:
            saved["state"] = torch.load(path, weights_only=True)

    return keep


def test_resume_continues_bit_for_bit(split: Split, tmp_path: Path) -> None:
    full: dict[str, Any] = {}
    straight = _run(
        split,
        checkpoint=tmp_path / "straight.pt",
        on_epoch=_last_full_state(tmp_path / "straight.pt", full),
    )
    path = tmp_path / "run.pt"

    def stop_after_first(stats: EpochStats) -> None:
        if stats.epoch == 0:
            raise _Stop

    with pytest.raises(_Stop):
        _run(split, checkpoint=path, on_epoch=stop_after_first)
    assert torch.load(path, weights_only=True)["progress"]["next_epoch"] == 1
    seen: list[int] = []
    final: dict[str, Any] = {}
    keep = _last_full_state(path, final)

    def on_epoch(stats: EpochStats) -> None:
        seen.append(stats.epoch)
        keep(stats)

    resumed = _run(split, checkpoint=path, resume=True, on_epoch=on_epoch)
    assert seen == [0, 1, 2]  # the restored epoch first
    assert straight.model is not None
    assert resumed.model is not None
    _assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    _assert_same_state(full["state"]["optimizer"], final["state"]["optimizer"])
    assert final["state"]["optimizer"]["state"]  # momentum buffers are there to compare
    keys = ("test_accuracy", "train_accuracy", "train_loss", "steps", "forward_passes")
    assert [getattr(resumed, k) for k in keys] == [getattr(straight, k) for k in keys]
    assert resumed.forward_samples == straight.forward_samples
    assert [(h.train_loss, h.test_accuracy) for h in resumed.history] == [
        (h.train_loss, h.test_accuracy) for h in straight.history
    ]
    # resuming a finished run trains nothing and gives the same result
    again = _run(split, checkpoint=path, resume=True)
    assert again.model is not None
    _assert_same_state(straight.model.state_dict(), again.model.state_dict())


def test_a_finished_run_keeps_a_slim_checkpoint_and_resumes_without_training(
    split: Split, tmp_path: Path
) -> None:
    path = tmp_path / "run.pt"
    full: dict[str, Any] = {}
    first = _run(split, checkpoint=path, on_epoch=_last_full_state(path, full))
    assert set(full["state"]) >= {"optimizer", "scheduler", "generators", "global_rng"}
    slim = torch.load(path, weights_only=True)
    assert sorted(slim) == ["fingerprint", "finished", "format", "model", "progress"]
    assert slim["finished"] is True
    _assert_same_state(slim["model"], full["state"]["model"])
    _assert_same_state(slim["progress"], full["state"]["progress"])
    torch.save(full["state"], tmp_path / "full.pt")
    assert path.stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size  # no momentum
    steps: list[int] = []
    again = _run(split, checkpoint=path, resume=True, on_step=lambda e, s, loss: steps.append(s))
    assert steps == []  # nothing trained
    assert again == first  # accuracies, losses, counters and history
    assert first.model is not None
    assert again.model is not None
    _assert_same_state(first.model.state_dict(), again.model.state_dict())
    assert sorted(torch.load(path, weights_only=True)) == sorted(slim)


def test_resume_refuses_another_configuration(split: Split, tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    _run(split, epochs=1, checkpoint=path)
    with pytest.raises(ValueError, match="belongs to another run: epochs is 1 there and 2 here"):
        _run(split, epochs=2, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="belongs to another run: augment is 'cutout' there"):
        _run(split, epochs=1, augment="basic", checkpoint=path, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        _run(split, checkpoint=tmp_path / "missing.pt", resume=True)
    with pytest.raises(ValueError, match="resume=True needs the checkpoint path"):
        _run(split, resume=True)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a torchsam training checkpoint"):
        _run(split, checkpoint=tmp_path / "junk.pt", resume=True)


def test_a_checkpoint_resumes_only_on_the_kind_of_device_that_wrote_it(
    split: Split, tmp_path: Path
) -> None:
    """The device's type is in the fingerprint: a checkpoint written on a GPU (here the CPU's,
    with the fingerprint and the augmentation generator's 16-byte state of a CUDA run) is
    refused on the CPU with a message saying how to resume it, before anything is loaded
    (restoring a CUDA generator's state into a CPU generator raised a RuntimeError)."""
    path = tmp_path / "run.pt"

    def stop_after_first(stats: EpochStats) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        _run(split, checkpoint=path, on_epoch=stop_after_first)
    state = torch.load(path, weights_only=True)
    assert state["fingerprint"]["device_type"] == "cpu"
    assert state["cuda_rng"] is None  # a CPU run has no CUDA generator to restore
    state["fingerprint"]["device_type"] = "cuda"
    state["generators"]["augment"] = torch.zeros(16, dtype=torch.uint8)  # Philox: seed, offset
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"was written by a run on 'cuda' and this run is on 'cpu': a checkpoint holds "
        r"its device's generator states .* resume on 'cuda' \(device='cuda', or --device cuda\)",
    ):
        _run(split, checkpoint=path, resume=True)


def test_restore_state_refuses_a_cuda_generator_state_off_cuda() -> None:
    from torchsam.experiments.checkpoint import restore_state, run_state

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    parts: dict[str, Any] = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "generators": {},
    }
    state = run_state(**parts, progress={}, fingerprint={})
    assert state["cuda_rng"] is None
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="holds a CUDA generator's state: restore it on a CUDA"):
        restore_state(state, **parts, device=torch.device("cpu"))


def test_methods_with_state_in_their_step_cannot_resume(split: Split, tmp_path: Path) -> None:
    import torchsam.experiments.methods  # noqa: F401 (registers saf)

    path = tmp_path / "saf.pt"
    train("saf", split, epochs=1, batch_size=16, model_fn=_model, checkpoint=path)
    with pytest.raises(ValueError, match="'saf' keeps per-run state in its step function"):
        train("saf", split, epochs=1, batch_size=16, model_fn=_model, checkpoint=path, resume=True)


def test_augmentation_is_seeded_in_training(split: Split) -> None:
    first = _run(split, epochs=1, curves=False)
    again = _run(split, epochs=1, curves=False)
    plain = _run(split, epochs=1, curves=False, augment="none")
    assert first.model is not None
    assert again.model is not None
    assert plain.model is not None
    _assert_same_state(first.model.state_dict(), again.model.state_dict())
    assert not torch.equal(first.model[1].weight, plain.model[1].weight)


def test_bf16_precision_runs_with_channels_last_and_float32_state(split: Split) -> None:
    result = _run(split, epochs=1, precision="bf16", curves=False)
    assert result.model is not None
    conv = result.model[1]
    assert conv.weight.dtype == torch.float32
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(torch.tensor(result.train_loss))
    with pytest.raises(ValueError, match="Invalid precision value: 'fp16'; use one of: auto"):
        _run(split, precision="fp16")


def test_feature_rows_refuse_augmentation() -> None:
    pytest.importorskip("sklearn")
    from torchsam.experiments import noisy_digits

    with pytest.raises(ValueError, match="augment='basic' needs a dataset of images"):
        train("sgd", noisy_digits(0.2), epochs=1, augment="basic")


# --------------------------------------------------------------------------- the command
def test_compare_preset_prints_the_papers_numbers_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    from torchsam.experiments.cli import main

    write_cifar(tmp_path / "data", per_file=8)
    argv = [
        "compare", "--preset", "foret2021", "--data-dir", str(tmp_path / "data"),
        "--width", "1", "--epochs", "2", "--batch-size", "8", "--no-instruments", "--quiet",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "The paper (Foret et al. 2021 (SAM), Table 1; WRN-28-10" in out
    assert "paper 96.5% (error 3.5%)" in out
    assert "paper 97.3% (error 2.7%)" in out
    report = json.loads((tmp_path / "run" / "results.json").read_text())
    config = report["config"]
    assert (config["model"], config["augment"], config["rho"]) == ("wrn28_10", "basic", [0.05])
    assert (config["label_noise"], config["preset"], config["epochs"]) == (0.0, "foret2021", 2)
    resume = tmp_path / "run" / "checkpoints" / "resume"
    assert sorted(p.name for p in resume.iterdir()) == ["sam-seed0.pt", "sgd-seed0.pt"]
    # a finished comparison resumed: every run continues from its last checkpoint (no epoch
    # left) and reports the same numbers
    assert main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    for first, second in zip(report["runs"], again["runs"], strict=True):
        assert first["test_accuracy"] == second["test_accuracy"]
        assert first["history"] == second["history"]
    assert main(["compare", "--dataset", "digits", "--resume"]) == 2
    assert "--resume continues the comparison in --out DIR" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_defaults_to_bf16_and_augments_on_the_device(split: Split) -> None:
    from torchsam.experiments.batches import batch_source

    device = torch.device("cuda")
    result = _run(split, epochs=2, device=device, curves=False)
    assert result.model is not None
    conv = result.model[1]
    assert conv.weight.device.type == "cuda"
    assert conv.weight.dtype == torch.float32
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # precision auto: bf16
    assert torch.isfinite(torch.tensor(result.train_loss))
    batches = [
        batch_source(
            split, device, augment="basic", generator=torch.Generator(device).manual_seed(4)
        ).train_inputs(torch.arange(16, device=device))
        for _ in range(2)
    ]
    assert batches[0].device.type == "cuda"
    assert torch.equal(batches[0], batches[1])


def _mlp_with_dropout(split: Split) -> nn.Module:
    """A small MLP on the images whose dropout draws from the global generator."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, 32),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(32, split.num_classes),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_with_dropout_resumes_exactly_and_only_on_cuda(
    split: Split, tmp_path: Path
) -> None:
    """The checkpoint holds the CUDA generator that dropout draws from (without it the resumed
    run drew other masks); float32, no convolution: cuBLAS gives the same bits run to run. A
    CUDA checkpoint is refused on the CPU."""
    options: dict[str, Any] = {
        "device": "cuda",
        "precision": "fp32",
        "model_fn": _mlp_with_dropout,
        "curves": False,
    }
    straight = _run(split, **options)
    path = tmp_path / "run.pt"

    def stop_after_first(stats: EpochStats) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        _run(split, checkpoint=path, on_epoch=stop_after_first, **options)
    state = torch.load(path, weights_only=True)
    assert state["fingerprint"]["device_type"] == "cuda"
    assert state["cuda_rng"] is not None
    torch.cuda.manual_seed_all(12345)  # what the caller's stream holds must not matter
    resumed = _run(split, checkpoint=path, resume=True, **options)
    assert straight.model is not None
    assert resumed.model is not None
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)
    assert resumed.train_loss == pytest.approx(straight.train_loss, rel=1e-6)
    with pytest.raises(ValueError, match="was written by a run on 'cuda' and this run is on"):
        _run(split, checkpoint=path, resume=True, **{**options, "device": "cpu"})


def test_time_estimate_and_option_checks() -> None:
    from torchsam.experiments.long_runs import check_options, epoch_estimate, run_checkpoint

    line = epoch_estimate(EpochStats(0, 1.0, 90.0), epochs=200, runs_left=3)
    assert line.startswith(
        "epoch 1 took 90 s: this run needs about 5.0 h more; the 3 runs after it about 15.0 h"
    )
    last = epoch_estimate(EpochStats(0, 1.0, 30.0), epochs=9, runs_left=0)
    assert last.startswith("epoch 1 took 30 s: this run needs about 4 min more, done around ")
    assert "after it" not in last  # no "the 0 runs after it about 0 s"
    one = epoch_estimate(EpochStats(0, 1.0, 30.0), epochs=9, runs_left=1)
    assert "more; the run after it about 4 min at this cost" in one
    assert run_checkpoint(Path("out"), "looksam(k=5)", 2) == Path(
        "out/checkpoints/resume/looksam_k=5_-seed2.pt"
    )
    check_options("cifar10", "cutout", "bf16", "foret2021")
    with pytest.raises(ValueError, match="--augment basic needs CIFAR; digits is trained as it"):
        check_options("digits", "basic", "auto", None)
    with pytest.raises(ValueError, match="Invalid precision 'half'"):
        check_options("cifar10", None, "half", None)
    with pytest.raises(ValueError, match="Unknown preset 'paper'"):
        check_options("cifar10", None, "auto", "paper")
