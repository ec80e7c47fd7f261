"""Checkpoints of a training run, written after every epoch, from which a run resumes bit for bit.

A checkpoint holds everything the rest of a run depends on: the model's ``state_dict``
(weights and BatchNorm statistics), the optimizer's and the learning-rate scheduler's, the
states of the run's ``torch.Generator`` objects (batch order, augmentation, the method's own)
and of the global generators (the CPU's, and on a GPU the run's CUDA device's, which dropout
in the model draws from), the counters and the per-epoch history, plus a *fingerprint* of
the run's configuration: a checkpoint resumes only the run that wrote it. The fingerprint
holds the type of the run's device (``"device_type"``): a generator's state is the device's
own (a CUDA generator's is 16 bytes, a CPU one's 5056), so a checkpoint resumes on the kind
of device that wrote it (any CUDA device for a CUDA run), and another is refused. It is written to a
temporary file and renamed over the old one, so an interrupted write leaves the last complete
checkpoint in place. Files are read with ``torch.load(weights_only=True)``: no code runs.

When the run has finished, :func:`finished_state` slims its checkpoint to what a finished run
needs: the model's ``state_dict``, the counters and history and the fingerprint, without the
optimizer, the scheduler and the generators (for SAM around SGD with momentum the optimizer's
state is as large as the model). Resuming a finished run from it trains nothing: the model is
restored and evaluated again, as the full checkpoint would have given it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "FORMAT",
    "finished_state",
    "is_finished",
    "load_checkpoint",
    "restore_state",
    "run_state",
    "save_checkpoint",
]

FORMAT = 1
"""Version of the checkpoint layout; a file of another version is refused."""


def run_state(
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator],
    progress: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The state of a run between two epochs, as :func:`save_checkpoint` writes it.

    Args:
        model (nn.Module): the bare model (not its DDP or autocast wrapper)
        optimizer (Optimizer): the run's optimizer
        scheduler: its learning-rate scheduler
        generators (Mapping[str, torch.Generator]): the run's generators by name
        progress (Mapping[str, Any]): plain values (next epoch, steps, counters, history)
        fingerprint (Mapping[str, Any]): the configuration the checkpoint belongs to
        device (torch.device, optional): the run's device; for a CUDA device the state of
            its global generator is saved too (default: None, the CPU)
    """
    return {
        "format": FORMAT,
        "fingerprint": dict(fingerprint),
        "progress": dict(progress),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generators": {name: g.get_state() for name, g in generators.items()},
        "global_rng": torch.get_rng_state(),
        "cuda_rng": (
            torch.cuda.get_rng_state(device)
            if device is not None and device.type == "cuda"
            else None
        ),
    }


def finished_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The slim checkpoint of a finished run: ``state`` (a :func:`run_state`) without the
    optimizer, the scheduler and the generators, marked ``"finished": True``."""
    kept = ("format", "fingerprint", "progress", "model")
    return {**{key: state[key] for key in kept}, "finished": True}


def is_finished(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is the slim checkpoint of a finished run (:func:`finished_state`)."""
    return state.get("finished") is True


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file renamed over it (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(dict(state), partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path, fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The state saved in ``path``, checked against the run's ``fingerprint``.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: for a file that is not a checkpoint of this layout, or one written by a
            run of another configuration (the message names the first difference) or on
            another kind of device (the message says how to resume it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file it cannot read
        raise ValueError(f"{path} is not a torchsam training checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a torchsam training checkpoint (format {FORMAT})")
    saved = state.get("fingerprint", {})
    there, here = saved.get("device_type"), fingerprint.get("device_type")
    if there is not None and here is not None and there != here:
        raise ValueError(
            f"{path} was written by a run on {there!r} and this run is on {here!r}: a "
            "checkpoint holds its device's generator states and resumes on the kind of device "
            f"that wrote it; resume on {there!r} (device={there!r}, or --device {there}), or "
            "start the run again without resuming"
        )
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            raise ValueError(
                f"{path} belongs to another run: {key} is {saved.get(key)!r} there and "
                f"{fingerprint.get(key)!r} here; resume with the same configuration"
            )
    return state


def restore_state(
    state: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: Any,
    generators: Mapping[str, torch.Generator],
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Load a :func:`run_state` into the run's objects and torch's global generators (the
    CPU's, and the CUDA ``device``'s when the state holds one); return its ``progress``
    values.

    A finished run's slim state (:func:`finished_state`) restores the model only: nothing
    else is used again.

    Raises:
        ValueError: if the state's generators are not the run's, or it holds a CUDA
            generator's state and ``device`` is not a CUDA device."""
    cuda_rng = state.get("cuda_rng")
    cuda_device = device if device is not None and device.type == "cuda" else None
    if cuda_rng is not None and cuda_device is None:
        raise ValueError(
            "the checkpoint holds a CUDA generator's state: restore it on a CUDA device, "
            f"not {device or 'the CPU'}"
        )
    model.load_state_dict(state["model"])
    if is_finished(state):
        return dict(state["progress"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved = state["generators"]
    if set(saved) != set(generators):
        raise ValueError(
            f"the checkpoint holds generators {sorted(saved)}, not {sorted(generators)}"
        )
    for name, generator in generators.items():
        generator.set_state(saved[name])
    torch.set_rng_state(state["global_rng"])
    if cuda_rng is not None and cuda_device is not None:
        torch.cuda.set_rng_state(cuda_rng, cuda_device)
    return dict(state["progress"])
