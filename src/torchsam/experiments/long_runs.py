"""What the comparison needs for long runs: the augmentation default, the options' checks,
one resumable checkpoint per run, and a time estimate from the first epoch.

``torchsam compare`` writes ``checkpoints/resume/<label>-seed<N>.pt`` after every epoch of
every run (:func:`run_checkpoint`); with ``--resume`` and the same ``--out`` a run whose file
exists continues from it, bit for bit (:func:`~torchsam.experiments.train.train` with
``resume=True``), and a finished run is only evaluated again.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from torchsam.experiments.augment import check_augment
from torchsam.experiments.presets import PRESETS
from torchsam.experiments.train import PRECISIONS, EpochStats

__all__ = ["check_options", "default_augment", "epoch_estimate", "run_checkpoint"]

_IMAGE_DATASETS = ("cifar10", "cifar100")


def default_augment(dataset: str) -> str:
    """``"basic"`` for CIFAR (the literature's setting), ``"none"`` for the digits and toy."""
    return "basic" if dataset in _IMAGE_DATASETS else "none"


def check_options(dataset: str, augment: Any, precision: Any, preset: Any) -> None:
    """A ValueError for an unknown augmentation, precision or preset, or an augmentation of
    a dataset that is not made of images."""
    if augment is not None:
        check_augment(augment)
        if augment != "none" and dataset not in _IMAGE_DATASETS:
            raise ValueError(
                f"--augment {augment} needs CIFAR; {dataset} is trained as it is: use none"
            )
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")


def run_checkpoint(out: Path, label: str, seed: int) -> Path:
    """``out/checkpoints/resume/<label>-seed<seed>.pt``, the label made safe for a file name."""
    name = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)
    return out / "checkpoints" / "resume" / f"{name}-seed{seed}.pt"


def epoch_estimate(stats: EpochStats, epochs: int, runs_left: int) -> str:
    """A line after a run's first epoch: its duration, the run's expected end and, assuming
    the other runs cost the same, the comparison's (the runs after it are left out of the
    line when there are none).

    Args:
        stats (EpochStats): the first epoch's record (``wall_time`` is that epoch's)
        epochs (int): epochs of the run
        runs_left (int): runs after this one
    """
    per_epoch = stats.wall_time
    run_left = per_epoch * (epochs - 1)
    others = per_epoch * epochs * runs_left
    end = datetime.datetime.now() + datetime.timedelta(seconds=run_left + others)
    line = f"epoch 1 took {_duration(per_epoch)}: this run needs about {_duration(run_left)} more"
    if runs_left:
        after = "the run" if runs_left == 1 else f"the {runs_left} runs"
        line += (
            f"; {after} after it about {_duration(others)} at this cost (two-pass methods take "
            "about twice as long)"
        )
    return f"{line}, done around {end:%a %H:%M}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
