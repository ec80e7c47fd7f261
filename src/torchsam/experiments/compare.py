"""The comparison behind ``torchsam compare``: train contenders over seeds, measure, summarise.

:func:`run_compare` trains every contender (an optimizer with its options, at each ``rho`` of
a sweep) for every seed with :func:`~torchsam.experiments.train.train`, measures each final
model with :mod:`torchsam.sharpness` (top Hessian eigenvalue, SAM sharpness), summarises the
runs against the baseline (SGD when it takes part), and writes ``results.json``, the plots
and the seed-0 checkpoints to the output folder. :func:`format_table` and :func:`verdict`
turn the summary into the text the command prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import torchsam
from torchsam.experiments.data import Split, noisy_digits, noisy_signals
from torchsam.experiments.graphs import GRAPH_MODES
from torchsam.experiments.long_runs import (
    check_options,
    default_augment,
    epoch_estimate,
    run_checkpoint,
)
from torchsam.experiments.models import mlp, resnet18, resnet_cifar, small_cnn, wide_resnet
from torchsam.experiments.tables import aligned
from torchsam.experiments.train import (
    METHODS,
    EpochStats,
    Result,
    get_method,
    register_method,
    train,
)
from torchsam.monitor import SharpnessMonitor

__all__ = [
    "DATASETS",
    "DATASET_DEFAULTS",
    "MODELS",
    "CompareConfig",
    "Contender",
    "build_model",
    "check_output_file",
    "check_output_folder",
    "contenders",
    "finite_loss",
    "load_dataset",
    "measure",
    "parse_optimizers",
    "probe_data",
    "run_compare",
    "summarise",
    "verdict",
]

# --------------------------------------------------------------------------- datasets, models
DATASETS = ("digits", "toy", "cifar10", "cifar100")
"""Names accepted by ``--dataset``."""

MODELS = ("mlp", "small_cnn", "resnet18", "wrn16_8", "resnet32", "wrn28_10")
"""Names accepted by ``--model``."""

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": "small_cnn", "epochs": 30, "batch_size": 64, "lr": 0.02},
    "toy": {"model": "mlp", "epochs": 30, "batch_size": 64, "lr": 0.05},
    "cifar10": {"model": "resnet18", "epochs": 10, "batch_size": 128, "lr": 0.1},
    "cifar100": {"model": "resnet18", "epochs": 10, "batch_size": 128, "lr": 0.1},
}
"""The defaults of the options that depend on the dataset (``--help`` prints them)."""
# the small tasks' models gain nothing from more CPU threads, and lose much on a busy machine
_ONE_THREAD = ("digits", "toy")
MONITOR_SAMPLES = 64
"""Training samples of the probe on which ``--monitor-every`` measures (the first ones)."""
_MODEL_WIDTH = {
    "mlp": 128,
    "small_cnn": 16,
    "resnet18": 64,
    "wrn16_8": 8,
    "resnet32": 16,
    "wrn28_10": 10,
}
_IMAGE_SHAPE = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


def load_dataset(
    name: str,
    *,
    noise: float,
    seed: int = 0,
    data_dir: str | None = None,
    train_size: int | None = None,
) -> Split:
    """The :class:`~torchsam.experiments.data.Split` of a ``--dataset`` name.

    ``digits`` is :func:`~torchsam.experiments.noisy_digits`; ``toy`` the generated
    :func:`~torchsam.experiments.noisy_signals`; ``cifar10``/``cifar100`` are read from
    ``data_dir`` by :func:`~torchsam.experiments.cifar.cifar`. ``train_size`` keeps a random
    subset of the training set.

    Raises:
        ValueError: for an unknown name, or CIFAR without ``data_dir``.
        FileNotFoundError: for a missing CIFAR folder or file.
    """
    if name == "digits":
        split = noisy_digits(noise, seed=seed)
    elif name == "toy":
        split = _toy(noise, seed)
    elif name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise ValueError(
                f"--dataset {name} reads the python version of {name} from a local folder: "
                "pass --data-dir DIR (nothing is downloaded)"
            )
        from torchsam.experiments.cifar import cifar

        return cifar(name, data_dir, noise=noise, train_size=train_size, seed=seed)
    else:
        raise ValueError(f"Unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")
    if train_size is not None and train_size < split.x_train.shape[0]:
        keep = torch.randperm(split.x_train.shape[0], generator=torch.Generator().manual_seed(seed))
        keep = keep[:train_size].sort().values
        is_noisy = torch.zeros(split.x_train.shape[0], dtype=torch.bool)
        is_noisy[split.noisy_index] = True
        split = dataclasses.replace(
            split,
            x_train=split.x_train[keep],
            y_train=split.y_train[keep],
            y_train_clean=split.y_train_clean[keep],
            train_index=split.train_index[keep],
            noisy_index=torch.nonzero(is_noisy[keep]).flatten(),
        )
    return split


def _toy(noise: float, seed: int) -> Split:
    return noisy_signals(noise, seed=seed)


def build_model(name: str, dataset: str, split: Split, width: int | None = None) -> nn.Module:
    """A fresh ``--model`` for the data of ``dataset`` (the global RNG initialises it).

    ``width`` is the MLP's hidden width, the small CNN's channels, ResNet-18's base width or
    the WideResNet's multiplier (defaults: 128, 16, 64, 8).

    Raises:
        ValueError: for an unknown model, or an image model on data that are not images.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; use one of: {', '.join(MODELS)}")
    width = _MODEL_WIDTH[name] if width is None else width
    if name == "mlp":
        return mlp(split.num_features, split.num_classes, hidden=width)
    shape = _IMAGE_SHAPE.get(dataset)
    if shape is None:
        raise ValueError(
            f"--model {name} needs images; dataset {dataset!r} is not: use --model mlp"
        )
    if name == "small_cnn":
        return small_cnn(shape, split.num_classes, channels=width)
    if name == "resnet18":
        return resnet18(shape, split.num_classes, width=width)
    if name == "resnet32":
        return resnet_cifar(shape, split.num_classes, depth=32, width=width)
    if name == "wrn28_10":
        return wide_resnet(shape, split.num_classes, depth=28, widen=width)
    return wide_resnet(shape, split.num_classes, depth=16, widen=width)


# --------------------------------------------------------------------------- optimizers
_TRAIN_OPTIONS = ("lr", "momentum", "weight_decay")
# run options that differ by default for a method (an adaptive optimizer wants a smaller lr)
_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {"adamw": {"lr": 1e-3}}


def _adamw(
    params: Any, lr: float, momentum: float, weight_decay: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (``momentum`` is unused: AdamW has its ``betas``)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


if "adamw" not in METHODS:  # a baseline of the command; the benchmarks keep their own set
    register_method("adamw", _adamw, description="torch.optim.AdamW, lr 1e-3 unless given")


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_optimizers(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"sgd,sam,looksam:k=5,alpha=0.2"`` as ``[("sgd", {}), ("sam", {}), ("looksam", {...})]``.

    Items are separated by commas; ``name:key=value`` starts an optimizer with an option, and
    a following ``key=value`` item adds another option to it. Values are read as ints, floats,
    ``true``/``false``/``none``, or else strings. ``lr``, ``momentum`` and ``weight_decay``
    override the run's values for that optimizer.

    Raises:
        ValueError: for an unknown name, an empty item or a malformed option.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty item in --optimizers {spec!r}")
        name, colon, first = item.partition(":")
        if "=" in name and not colon:  # an option of the previous optimizer
            if not out:
                raise ValueError(f"--optimizers {spec!r} starts with an option, not a name")
            name, first = "", item
        if name:
            name = name.strip().lower()
            if name not in METHODS:
                raise ValueError(
                    f"unknown optimizer {name!r}; choose from: {', '.join(METHODS)} "
                    "(torchsam compare --list-optimizers describes them)"
                )
            out.append((name, {}))
        if first:
            key, eq, value = first.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier():
                raise ValueError(f"malformed option {first!r} in --optimizers: use key=value")
            if key in out[-1][1]:
                raise ValueError(f"option {key!r} given twice for {out[-1][0]}")
            out[-1][1][key] = _parse_value(value.strip())
    if not out:
        raise ValueError("--optimizers names no optimizer")
    return out


@dataclass(frozen=True)
class Contender:
    """One line of the comparison: a method with its options and, for a sweep, its ``rho``.

    Attributes:
        label (str): the name shown in the table and the plots (unique)
        method (str): the registered method
        options (dict): method options given by the user, with ``rho`` when swept
        train_options (dict): ``lr``/``momentum``/``weight_decay`` overrides
        rho (float | None): the radius the method runs at (None: no radius)
    """

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    train_options: dict[str, Any] = field(default_factory=dict)
    rho: float | None = None


def _has_rho(method: str) -> bool:
    return "rho" in get_method(method).defaults


def _check_train_option(base: str, key: str, value: Any) -> None:
    """``lr`` must be a number > 0, ``momentum`` and ``weight_decay`` numbers >= 0 (as on the
    command line)."""
    low = "> 0" if key == "lr" else ">= 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (key == "lr" and value == 0)
    ):
        raise ValueError(f"{base}: Invalid {key} value: {value!r}; it must be a number {low}")


def contenders(spec: str, rhos: Sequence[float]) -> list[Contender]:
    """The contenders of ``--optimizers spec`` with ``--rho rhos`` applied.

    Each method with a radius (a ``rho`` default) that was not given ``rho`` explicitly runs
    once per value in ``rhos``; others run once. A label is the method with its options
    (``looksam(k=5)``), followed by `` rho=<rho>`` in a sweep and wherever two contenders
    would otherwise share a label (``sam:rho=0.2,sam`` gives ``sam rho=0.2`` and
    ``sam rho=0.1``).

    Raises:
        ValueError: for a malformed list (see :func:`parse_optimizers`), a ``rho``, ``lr``,
            ``momentum`` or ``weight_decay`` out of range, or two identical contenders.
    """
    parsed = parse_optimizers(spec)
    drafts: list[tuple[str, Contender]] = []  # (label without rho, contender)
    for method, given in parsed:
        extra = ",".join(f"{k}={v}" for k, v in given.items() if k != "rho")
        base = f"{method}({extra})" if extra else method
        for key in _TRAIN_OPTIONS:
            if key in given:
                _check_train_option(base, key, given[key])
        train_options = {
            **_TRAIN_DEFAULTS.get(method, {}),
            **{k: given[k] for k in _TRAIN_OPTIONS if k in given},
        }
        options = {k: v for k, v in given.items() if k not in _TRAIN_OPTIONS}
        if "rho" in options:
            rho = options["rho"]
            if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
                raise ValueError(f"Invalid rho value: {rho!r}; rho must be >= 0")
            drafts.append((base, Contender(base, method, options, train_options, float(rho))))
        elif _has_rho(method):
            for rho in rhos:
                contender = Contender(base, method, {**options, "rho": rho}, train_options, rho)
                drafts.append((base, contender))
        else:
            drafts.append((base, Contender(base, method, options, train_options, None)))
    bases = [base for base, _ in drafts]
    out: list[Contender] = []
    seen: dict[tuple[str, str, str, float | None], str] = {}
    for base, contender in drafts:
        label = base
        if contender.rho is not None and (len(rhos) > 1 or bases.count(base) > 1):
            label = f"{base} rho={contender.options['rho']}"
        run = (
            contender.method,
            repr(sorted((k, v) for k, v in contender.options.items() if k != "rho")),
            repr(sorted(contender.train_options.items())),
            contender.rho,
        )
        if run in seen:
            same = "" if seen[run] == label else f" (the same run as {seen[run]!r})"
            raise ValueError(f"optimizer {label!r} is listed twice in --optimizers{same}")
        seen[run] = label
        out.append(dataclasses.replace(contender, label=label))
    return out


# --------------------------------------------------------------------------- configuration
@dataclass
class CompareConfig:
    """Everything a comparison depends on; ``results.json`` stores it under ``"config"``.

    Options left as None take the dataset's default (see ``torchsam compare --help``).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    train_size: int | None = None
    model: str | None = None
    width: int | None = None
    optimizers: str = "sgd,sam,periodic"
    rho: list[float] = field(default_factory=lambda: [0.1])
    label_noise: float = 0.4
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    data_seed: int = 0
    device: str = "auto"
    threads: int | None = None
    instruments: bool = True
    instrument_samples: int = 512
    hessian_iters: int = 20
    sharpness_rho: float = 0.05
    landscape_steps: int = 21
    landscape_span: float = 1.0
    monitor_every: int = 150
    augment: str | None = None
    precision: str = "auto"
    graphs: str = "off"
    preset: str | None = None

    def resolved(self) -> CompareConfig:
        """A copy with the dataset's defaults filled in."""
        defaults = DATASET_DEFAULTS.get(self.dataset, DATASET_DEFAULTS["digits"])
        values = dataclasses.asdict(self)
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        if values["width"] is None:
            values["width"] = _MODEL_WIDTH.get(values["model"])
        if values["threads"] is None and self.dataset in _ONE_THREAD:
            values["threads"] = 1
        if values["augment"] is None:
            values["augment"] = default_augment(self.dataset)
        return CompareConfig(**values)

    def validate(self) -> None:
        """Raise a ValueError naming the first option of the wrong type or out of range.

        It refuses what the command line refuses, so that a configuration file (``--config``)
        is held to the same rules as the options typed by hand.
        """
        whole, number = _check_whole, _check_number
        if self.dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {self.dataset!r}; use one of: {', '.join(DATASETS)}")
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"Unknown model {self.model!r}; use one of: {', '.join(MODELS)}")
        for name in ("epochs", "batch_size", "width", "train_size", "threads"):
            whole(name, getattr(self, name), optional=True)
        for name in ("instrument_samples", "hessian_iters"):
            whole(name, getattr(self, name))
        whole("landscape_steps", self.landscape_steps, low=2)
        whole("monitor_every", self.monitor_every, low=0)
        whole("data_seed", self.data_seed, low=0)
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ValueError(f"Invalid seeds value: {self.seeds!r}; give a list of seeds")
        for seed in self.seeds:
            whole("seed", seed, low=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"Invalid seeds value: {self.seeds!r}; a seed is repeated")
        if not isinstance(self.rho, list) or not self.rho:
            raise ValueError(f"Invalid rho value: {self.rho!r}; give a list of radii")
        for rho in self.rho:
            number("rho", rho)
        if len(set(self.rho)) != len(self.rho):
            raise ValueError(f"Invalid rho value: {self.rho!r}; a value is repeated")
        if number("label_noise", self.label_noise) >= 1.0:
            raise ValueError(f"Invalid label_noise value: {self.label_noise}; it must be < 1")
        for name in ("momentum", "weight_decay", "sharpness_rho"):
            number(name, getattr(self, name))
        if self.lr is not None and number("lr", self.lr) == 0.0:
            raise ValueError("Invalid lr value: 0; it must be > 0")
        if number("landscape_span", self.landscape_span) == 0.0:
            raise ValueError("Invalid landscape_span value: 0; it must be > 0")
        check_options(self.dataset, self.augment, self.precision, self.preset)
        if self.graphs not in GRAPH_MODES:
            raise ValueError(
                f"Invalid graphs value: {self.graphs!r}; use one of: {', '.join(GRAPH_MODES)}"
            )
        for name in ("optimizers", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Invalid {name} value: {getattr(self, name)!r}; give a string")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ValueError(f"Invalid data_dir value: {self.data_dir!r}; give a folder name")
        if not isinstance(self.instruments, bool):
            raise ValueError(
                f"Invalid instruments value: {self.instruments!r}; it must be true or false"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompareConfig:
        """The config of a ``results.json`` (its ``"config"`` entry) or of a bare mapping.

        Raises:
            ValueError: for a key that is not an option.
        """
        if "config" in values and isinstance(values["config"], Mapping):
            values = values["config"]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} in the configuration file")
        return cls(**dict(values))


def _check_whole(name: str, value: Any, low: int = 1, optional: bool = False) -> None:
    """A ValueError unless ``value`` is an int >= ``low`` (or None, when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r}; it must be an int >= {low}")


def _check_number(name: str, value: Any) -> float:
    """``value`` as a float; a ValueError unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r}; it must be a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name} value: {value!r}; it must be >= 0")
    return float(value)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; otherwise ``torch.device(name)``.

    Under ``torchrun`` (:func:`torchrun_world` > 1) each process takes the GPU of its
    ``LOCAL_RANK``: ``"auto"`` and ``"cuda"`` mean ``cuda:<LOCAL_RANK>``.

    Raises:
        ValueError: for a device that does not exist here, or a numbered GPU under torchrun.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if torchrun_world() > 1 else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"Invalid device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and local_rank is not None:
        if device.index is not None:
            raise ValueError(
                f"--device {name}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                "use --device auto or cuda"
            )
        device = torch.device("cuda", local_rank)
    return device


def torchrun_world() -> int:
    """The number of processes ``torchrun`` started for this job (``WORLD_SIZE``; 1 without
    torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if it started
    more than one process: NCCL when this process's device is a GPU (``cuda:<LOCAL_RANK>``),
    gloo on the CPU. Returns whether a group was joined (leave it with
    ``torch.distributed.destroy_process_group()``).

    Raises:
        ValueError: for a device :func:`resolve_device` refuses.
    """
    if torchrun_world() <= 1:
        return False
    import torch.distributed as dist

    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def _rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- instruments
def _instrument_modules() -> tuple[Any, Any] | None:
    """``(torchsam.sharpness, torchsam.landscape)``, or None when they are not installed."""
    try:
        import torchsam.landscape as landscape
        import torchsam.sharpness as sharpness
    except ImportError:
        return None
    return sharpness, landscape


def probe_data(
    split: Split, samples: int, device: torch.device | None = None, *, batch_size: int = 256
) -> list[tuple[Tensor, Tensor]]:
    """The first ``samples`` training samples of ``split`` (all of them if fewer), with their
    (noisy) training labels, in batches of ``batch_size``: the data the instruments measure."""
    x, y = split.x_train[:samples], split.y_train[:samples]
    if device is not None:
        x, y = x.to(device), y.to(device)
    return [
        (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)
    ]


def finite_loss(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]]) -> bool:
    """Whether ``model``'s weights and its cross-entropy on every batch of ``data`` are finite
    (BatchNorm in evaluation mode; the model's mode is restored). A run whose final model
    fails this has diverged."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                return False
            return all(
                bool(torch.isfinite(nn.functional.cross_entropy(model(x), y))) for x, y in data
            )
    finally:
        model.train(was_training)


def measure(
    model: nn.Module, data: Sequence[tuple[Tensor, Tensor]], *, rho: float, iters: int, seed: int
) -> dict[str, Any]:
    """Top Hessian eigenvalue and SAM sharpness of ``model`` on ``data`` (the training loss).

    Both come from :mod:`torchsam.sharpness`, with BatchNorm in evaluation mode. A measure
    that is not available (the instruments are not installed), that raises a ``ValueError``
    or a ``torch.linalg.LinAlgError`` (as they may on a model whose loss is not finite), or
    whose value is not finite, is None; the reason is then in ``"errors"`` (the name of the
    measure to the message), present only when there is one.
    """
    modules = _instrument_modules()
    if modules is None:
        return {"hessian_top": None, "sam_sharpness": None}
    sharpness = modules[0]
    loss_fn = nn.CrossEntropyLoss()

    def top() -> float:
        values = sharpness.hessian_eigenvalues(
            model, loss_fn, data, k=1, max_iter=iters, generator=torch.Generator().manual_seed(seed)
        )
        return float(values[0])

    def sharp() -> float:
        value = sharpness.sam_sharpness(
            model, loss_fn, data, rho=rho, generator=torch.Generator().manual_seed(seed)
        )
        return float(value)

    out: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, compute in (("hessian_top", top), ("sam_sharpness", sharp)):
        try:
            value = compute()
        except (ValueError, torch.linalg.LinAlgError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            value = None
        if value is not None and not math.isfinite(value):
            errors[name] = f"not finite ({value})"
            value = None
        out[name] = value
    if errors:
        out["errors"] = errors
    return out


# --------------------------------------------------------------------------- running
def _check_creatable(path: Path, option: str) -> None:
    """Raise a ValueError unless ``path`` (which does not exist) can be created: its nearest
    existing ancestor must be a folder this process may write in."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option}: cannot create {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: cannot create {path}: no permission to write in {ancestor}")


def check_output_folder(out: Path, option: str = "--out", *, resume: bool = False) -> None:
    """Raise a ValueError, naming ``option``, unless ``out`` is an empty folder this process may
    write in or can be created as one; with ``resume=True``, unless it is an existing folder
    this process may write in (the earlier run's, which ``--resume`` continues).

    :func:`run_compare` refuses a folder that already holds files, so that every file in its
    output folder is the run's own (no checkpoint or picture of an earlier run beside them).
    """
    if resume and not out.is_dir():
        raise ValueError(
            f"{option}: {out} is not a folder; --resume continues the comparison written "
            "there by an earlier run"
        )
    if not out.exists():
        _check_creatable(out, option)
        return
    if not out.is_dir():
        raise ValueError(f"{option}: {out} exists and is not a folder")
    held = [] if resume else sorted(p.name for p in out.iterdir())
    if held:
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise ValueError(
            f"{option}: {out} is not empty (it holds {held[0]}{more}): give a new or empty "
            "folder, so that everything in it comes from this run"
        )
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: no permission to write in {out}")


def check_output_file(path: Path, option: str = "--out") -> None:
    """Raise a ValueError, naming ``option``, unless the file ``path`` can be written: a file
    this process may overwrite, or a new one whose folder exists or can be created."""
    if path.is_dir():
        raise ValueError(
            f"{option}: {path} is a folder; give the name of the file to write, "
            f"e.g. {path / 'landscape.png'}"
        )
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option}: no permission to overwrite {path}")
        return
    _check_creatable(path, option)


@dataclass
class Progress:
    """Callbacks for the command's progress display; the defaults do nothing."""

    start_run: Callable[[str, int, int], None] = lambda label, seed, total: None
    step: Callable[[int, int, Tensor], None] = lambda epoch, step, loss: None
    end_run: Callable[[], None] = lambda: None
    note: Callable[[str], None] = lambda text: None


def _run_record(contender: Contender, seed: int) -> dict[str, Any]:
    return {
        "label": contender.label,
        "method": contender.method,
        "options": contender.options,
        "train_options": contender.train_options,
        "rho": contender.rho,
        "seed": seed,
        "complete": False,
        "unfinished": "training",
        "history": [],
    }


PICTURES = (
    "learning_curves.png",
    "accuracy_vs_time.png",
    "accuracy_vs_rho.png",
    "sharpness.png",
    "landscape.png",
)
"""The pictures :func:`run_compare` may draw in its output folder."""


@dataclass
class _Session:
    """What the runs of one comparison share, and what they gather."""

    config: CompareConfig
    out: Path
    device: torch.device
    split: Split
    entries: list[Contender]
    progress: Progress
    writer: bool  # rank 0: measures the models and writes the files
    probe: list[tuple[Tensor, Tensor]]  # the instruments' samples
    resume: bool
    earlier: dict[tuple[str, int], list[dict[str, Any]]]  # --resume: monitor records
    report: dict[str, Any]
    checkpoints: list[Path] = field(default_factory=list)
    final_models: dict[str, nn.Module] = field(default_factory=dict)


def run_compare(
    config: CompareConfig,
    out: Path,
    *,
    progress: Progress | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run the comparison of ``config`` and write its results under ``out``.

    Returns the report written to ``out/results.json``: the configuration, the environment,
    one record per run (with its per-epoch history and instruments), the summary per
    contender, the verdict and the files written. A ``KeyboardInterrupt`` stops the runs; what
    was gathered is still summarised and written, with ``"interrupted": true``. A run is
    ``"complete"`` once everything about it is done (training, final evaluation, the first
    seed's checkpoint, the instruments); until then its ``"unfinished"`` names the stage it
    had reached (``"training"``, ``"final evaluation"``, ``"checks"``, ``"checkpoint"`` or
    ``"instruments"``), and the summary leaves it out.

    A run that diverges (its final training loss, or its final model's loss on the measured
    samples, is not finite: :func:`finite_loss`) is a result like any other: it is recorded
    with ``"diverged": true``, its instruments are not measured (None), its non-finite numbers
    are written as ``null``, the other runs go on, and the summary's means leave it out.
    ``out`` must be a new or empty folder (:func:`check_output_folder`), so that the files
    listed are all this run's.

    In a process group of several processes (``torchrun``, after :func:`init_distributed`),
    every process calls it: each run trains data-parallel (``train(..., distributed=True)``:
    ``batch_size`` is the global batch, shared among the processes), and rank 0 alone measures
    the models and writes the files.

    Every run writes a checkpoint after each epoch (``checkpoints/resume/``); with
    ``resume=True`` a run whose checkpoint is there continues from it, bit for bit, and keeps
    the monitor's records (``--monitor-every``) of the earlier ``results.json`` up to the step
    it resumes from; the earlier pictures and final checkpoints are removed first, so that
    every file left is this run's.

    The global random state (torch's, on the CPU and the device) is left as it was, and so is
    torch's number of threads.

    Raises:
        ValueError: for an invalid configuration or an ``out`` that is not a new or empty
            folder; in a process group, also for a batch size that is not a multiple of its
            size and for ``saf``, whose per-sample memory does not follow a sample to another
            process.
    """
    config.validate()
    config = config.resolved()
    device = resolve_device(config.device)
    threads = torch.get_num_threads()
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        with _global_random_state_kept(device):
            return _compare(config, out, device, progress or Progress(), resume)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _global_random_state_kept(device: torch.device) -> Iterator[None]:
    """Restore torch's global generators (the CPU's, and ``device``'s on CUDA), Python's
    ``random`` and NumPy's, as they were on entry: what the comparison imports on the way
    (scikit-learn draws from ``random`` when first imported) leaves them alone too."""
    devices = [device.index or 0] if device.type == "cuda" else []
    python_state = random.getstate()
    has_numpy = importlib.util.find_spec("numpy") is not None
    numpy_random = importlib.import_module("numpy.random") if has_numpy else None
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)


def _compare(
    config: CompareConfig, out: Path, device: torch.device, progress: Progress, resume: bool
) -> dict[str, Any]:
    session = _start(config, out, device, progress, resume)
    try:
        for seed in config.seeds:
            for contender in session.entries:
                _run_one(session, contender, seed)
    except KeyboardInterrupt:
        session.report["interrupted"] = True
        progress.note("interrupted: writing what was gathered")
    return _finish(session)


def _start(
    config: CompareConfig, out: Path, device: torch.device, progress: Progress, resume: bool
) -> _Session:
    """Check everything that can be checked before training, and prepare ``out``."""
    entries = contenders(config.optimizers, config.rho)
    rank, world = _rank_and_world()
    writer = rank == 0
    if writer:
        check_output_folder(out, resume=resume)
    _check_world(entries, config, world)
    split = load_dataset(
        config.dataset,
        noise=config.label_noise,
        seed=config.data_seed,
        data_dir=config.data_dir,
        train_size=config.train_size,
    )
    build_model(str(config.model), config.dataset, split, config.width)  # a bad pair fails here
    _check_options(entries, config)
    earlier: dict[tuple[str, int], list[dict[str, Any]]] = {}
    if writer:
        if resume:
            earlier = _earlier_sharpness(out / "results.json", progress)
            _remove_earlier_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=resume)
    report: dict[str, Any] = {
        "config": config.to_dict(),
        "environment": {**_environment(device), "processes": world},
        "runs": [],
        "interrupted": False,
    }
    probe = probe_data(split, config.instrument_samples, device)
    return _Session(
        config, out, device, split, entries, progress, writer, probe, resume, earlier, report
    )


def _check_world(entries: Sequence[Contender], config: CompareConfig, world: int) -> None:
    """What a process group of ``world`` processes cannot run."""
    if world <= 1:
        return
    if int(config.batch_size or 1) % world:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch, shared among the "
            f"{world} processes: use a multiple of {world}"
        )
    if any(c.method == "saf" for c in entries):
        raise ValueError(
            "saf cannot run under torchrun: its per-sample memory stays in the process "
            "that saw the sample; run it in one process"
        )


def _run_one(session: _Session, contender: Contender, seed: int) -> None:
    """Train, check, save and measure one run; its record says how far it got."""
    config, progress = session.config, session.progress
    record = _run_record(contender, seed)
    session.report["runs"].append(record)
    progress.start_run(contender.label, seed, int(config.epochs or 1) * _steps_per_epoch(session))
    resume_from = run_checkpoint(session.out, contender.label, seed)
    try:
        result = _train_one(session, contender, seed, record, resume_from)
    finally:
        progress.end_run()
        if session.writer:  # an interrupted write of the per-epoch checkpoint leaves nothing
            resume_from.with_name(resume_from.name + ".partial").unlink(missing_ok=True)
        if session.writer and resume_from.is_file():  # the run's per-epoch checkpoint
            session.checkpoints.append(resume_from)
    record["unfinished"] = "checks"
    record.update(_result_fields(result))
    if result.model is not None and session.writer:
        _check_save_measure(session, contender, seed, record, result.model)
    record["complete"] = True
    record["unfinished"] = None


def _check_save_measure(
    session: _Session, contender: Contender, seed: int, record: dict[str, Any], model: nn.Module
) -> None:
    """The divergence check, the first seed's checkpoint and the instruments of one run."""
    config, progress = session.config, session.progress
    if record["diverged"] or not finite_loss(model, session.probe):
        record["diverged"] = True
        progress.note(f"{contender.label} (seed {seed}) diverged")
    if seed == config.seeds[0]:
        record["unfinished"] = "checkpoint"
        session.checkpoints.append(
            _save_checkpoint(session.out, contender, config, model, taken=session.checkpoints)
        )
        if not record["diverged"]:
            session.final_models[contender.label] = model
    if config.instruments and record["diverged"]:
        record["instruments"] = {"hessian_top": None, "sam_sharpness": None}
    elif config.instruments:
        record["unfinished"] = "instruments"
        progress.note(f"measuring {contender.label} (seed {seed})")
        record["instruments"] = measure(
            model, session.probe, rho=config.sharpness_rho, iters=config.hessian_iters, seed=seed
        )


def _finish(session: _Session) -> dict[str, Any]:
    """Summarise, write ``results.json``, draw, and write it again with the pictures."""
    report, out = session.report, session.out
    report["summary"] = summarise(report["runs"], session.entries, seeds=len(session.config.seeds))
    report["verdict"] = verdict(report["summary"])
    resumable = [  # also those of runs not reached, which a later --resume continues
        run_checkpoint(out, contender.label, seed)
        for seed in session.config.seeds
        for contender in session.entries
    ]
    saved = {*session.checkpoints, *(p for p in resumable if p.is_file())}
    report["files"] = ["results.json", *sorted(str(p.relative_to(out)) for p in saved)]
    if not session.writer:
        return report
    _write_report(out, report)  # the runs are on disk before anything is drawn
    try:
        report["files"][1:1] = _plots(
            report, out, session.final_models, session.probe, session.config, session.progress
        )
    except KeyboardInterrupt:  # the pictures drawn until then are listed
        report["interrupted"] = True
        report["files"][1:1] = [name for name in PICTURES if (out / name).is_file()]
    _write_report(out, report)
    return report


def _write_report(out: Path, report: Mapping[str, Any]) -> None:
    """``results.json``: the report, with every number that is not finite as ``null``."""
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False)
    (out / "results.json").write_text(text + "\n")


def _earlier_sharpness(
    path: Path, progress: Progress
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """The monitor's records of each run (label, seed) in an earlier ``results.json``.

    A file that is missing, is not JSON or does not hold runs gives nothing (with a note);
    a run or a record without the expected keys and types is skipped.
    """
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        progress.note(
            f"--resume: {path} is not readable JSON ({exc}); earlier monitor records lost"
        )
        return {}
    runs = loaded.get("runs") if isinstance(loaded, dict) else None
    if not isinstance(runs, list):
        progress.note(f"--resume: {path} holds no runs; earlier monitor records lost")
        return {}
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        if not isinstance(run, dict):
            continue
        label, seed, records = run.get("label"), run.get("seed"), run.get("sharpness")
        if not isinstance(label, str) or type(seed) is not int or not isinstance(records, list):
            continue
        out[(label, seed)] = [r for r in records if _monitor_record(r)]
    return out


def _monitor_record(record: Any) -> bool:
    """Whether ``record`` reads as a monitor record: an int ``step`` and a ``top_eigenvalue``
    that is a number or null."""
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return False
    top = record.get("top_eigenvalue", "missing")
    return top is None or (isinstance(top, (int, float)) and not isinstance(top, bool))


def _remove_earlier_outputs(out: Path) -> None:
    """Delete what an earlier comparison drew and saved in ``out`` (its pictures and final
    checkpoints; ``results.json`` and the per-epoch checkpoints stay): what this one leaves
    there is then its own."""
    stale = [out / name for name in PICTURES]
    if (out / "checkpoints").is_dir():
        stale += [p for p in (out / "checkpoints").iterdir() if p.suffix in (".pt", ".partial")]
    for path in stale:
        if path.is_file():
            path.unlink()


def _check_options(entries: Sequence[Contender], config: CompareConfig) -> None:
    """Build every contender's optimizer once on a tiny model, so a bad option fails first."""
    probe = nn.Linear(2, 2)
    for contender in entries:
        method = get_method(contender.method)
        opt_kwargs, _ = method.split_kwargs(contender.options)
        kwargs = {
            "lr": config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            **contender.train_options,
        }
        try:
            method.make_optimizer(probe.parameters(), **kwargs, **opt_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{contender.label}: {exc}") from exc


def _train_one(
    session: _Session, contender: Contender, seed: int, record: dict[str, Any], checkpoint: Path
) -> Result:
    """Train one run, its epochs recorded in ``record`` as they end, and its monitor's records
    (with the earlier ones of a resumed run) kept in ``record`` even on Ctrl-C."""
    config, progress = session.config, session.progress
    resume = session.resume and checkpoint.is_file()
    epochs = int(config.epochs or 1)
    runs_left = len(session.entries) * len(config.seeds) - len(session.report["runs"])
    watchers: list[SharpnessMonitor] = []
    restored: list[int] = []  # the epochs restored from the checkpoint, once known

    def on_epoch(stats: EpochStats) -> None:
        record["history"].append(dataclasses.asdict(stats))
        if stats.epoch + 1 == epochs:
            record["unfinished"] = "final evaluation"
        if stats.epoch == 0 and not resume:
            progress.note(f"{contender.label} seed {seed}: " + epoch_estimate(
                stats, epochs, runs_left))  # fmt: skip

    probe = probe_data(session.split, MONITOR_SAMPLES, session.device)

    def monitor(model: nn.Module) -> SharpnessMonitor:
        restored.append(len(record["history"]))  # train replays the restored epochs first
        watchers.append(SharpnessMonitor(
            model, nn.CrossEntropyLoss(), probe, every=config.monitor_every,
            generator=torch.Generator().manual_seed(seed),
        ))  # fmt: skip
        return watchers[0]

    def keep(records: Sequence[Any]) -> None:
        earlier = session.earlier.get((contender.label, seed), []) if resume else []
        up_to = (restored[0] if restored else 0) * _steps_per_epoch(session)
        _keep_sharpness(record, [r for r in earlier if r["step"] <= up_to], records)

    try:
        result = _train(session, contender, seed, on_epoch, checkpoint, resume,
                        monitor if config.monitor_every > 0 else None)  # fmt: skip
    except KeyboardInterrupt:
        keep(watchers[0].records if watchers else [])
        raise
    keep(result.sharpness)
    return result


def _steps_per_epoch(session: _Session) -> int:
    return session.split.x_train.shape[0] // int(session.config.batch_size or 1)


def _keep_sharpness(
    record: dict[str, Any], earlier: Sequence[dict[str, Any]], records: Sequence[Any]
) -> None:
    """``record["sharpness"]``: the earlier monitor records, then those of this call (NaN as
    None), and ``monitor_seconds``, their total time; nothing when there are none."""
    merged = list(earlier) + [
        {k: None if v != v else v for k, v in dataclasses.asdict(r).items()} for r in records
    ]
    if merged:
        record["sharpness"] = merged
        record["monitor_seconds"] = sum(float(r.get("seconds") or 0.0) for r in merged)


def _train(
    session: _Session,
    contender: Contender,
    seed: int,
    on_epoch: Callable[[EpochStats], None],
    checkpoint: Path,
    resume: bool,
    monitor: Callable[[nn.Module], SharpnessMonitor] | None,
) -> Result:
    config = session.config
    kwargs: dict[str, Any] = {
        "lr": config.lr,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        **contender.train_options,
    }
    return train(
        contender.method,
        session.split,
        epochs=int(config.epochs or 1),
        batch_size=int(config.batch_size or 1),
        seed=seed,
        model_fn=lambda s: build_model(str(config.model), config.dataset, s, config.width),
        device=session.device,
        curves=True,
        on_step=session.progress.step,
        on_epoch=on_epoch,
        distributed=_rank_and_world()[1] > 1,
        augment=str(config.augment),
        precision=config.precision,
        graphs=config.graphs,
        checkpoint=checkpoint,
        resume=resume,
        monitor=monitor,
        **kwargs,
        **contender.options,
    )


def _result_fields(result: Result) -> dict[str, Any]:
    return {
        "diverged": not math.isfinite(result.train_loss),
        "test_accuracy": result.test_accuracy,
        "train_accuracy_clean": result.train_accuracy,
        "final_train_loss": result.train_loss,
        "wall_time": result.wall_time,
        "steps": result.steps,
        "forward_passes": result.forward_passes,
        "forward_samples": result.forward_samples,
        "forwards_per_step": result.forwards_per_step,
        "cuda_graphs": result.cuda_graphs,
    }


def _save_checkpoint(
    out: Path,
    contender: Contender,
    config: CompareConfig,
    model: nn.Module,
    *,
    taken: Sequence[Path] = (),
) -> Path:
    """``checkpoints/<label>.pt``: the state dict with what ``torchsam landscape`` needs,
    written through a temporary file (an interrupted write leaves nothing behind)."""
    name = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in contender.label)
    path = out / "checkpoints" / f"{name}.pt"
    n = 1
    while path in taken:  # two labels that differ only in characters a file name cannot hold
        n += 1
        path = out / "checkpoints" / f"{name}-{n}.pt"
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(
            {
                "format": "torchsam-checkpoint-1",
                "label": contender.label,
                "model": config.model,
                "width": config.width,
                "dataset": config.dataset,
                "data_dir": config.data_dir,
                "label_noise": config.label_noise,
                "data_seed": config.data_seed,
                "train_size": config.train_size,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            },
            partial,
        )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _environment(device: torch.device) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchsam": torchsam.__version__,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "instruments": _instrument_modules() is not None,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- summary
def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _baseline(entries: Sequence[Contender]) -> Contender:
    for contender in entries:
        if contender.method == "sgd" and not contender.options:
            return contender
    return entries[0]


def summarise(
    runs: Sequence[Mapping[str, Any]], entries: Sequence[Contender], *, seeds: int | None = None
) -> list[dict]:
    """One row per contender over its finished runs, against the baseline (SGD if present).

    A run counts in a row's numbers when it is complete and did not diverge; a diverged run
    is counted in ``diverged`` only, and an unfinished one (interrupted) nowhere. Each row
    holds: ``accuracy`` mean and sample std (in points), ``gain`` over the baseline (mean of
    the per-seed differences where both runs count, in points) with ``gain_se`` (its standard
    error: the std of the differences over the square root of their number),
    ``final_train_loss`` (mean), ``time_ratio`` (median wall time over the baseline's),
    ``hessian_top`` and ``sam_sharpness`` (means over the runs where they were measured),
    ``runs`` (the number of runs the numbers cover), ``seeds`` (the comparison's number of
    seeds: ``seeds``, by default the number of seeds in ``runs``), ``diverged`` (complete
    runs that diverged), ``baseline`` (bool).
    """
    if not entries:
        return []
    if seeds is None:
        seeds = len({r["seed"] for r in runs})
    base = _baseline(entries)
    done = [r for r in runs if r.get("complete") and not r.get("diverged")]
    base_acc = {r["seed"]: r["test_accuracy"] for r in done if r["label"] == base.label}
    base_times = [r["wall_time"] for r in done if r["label"] == base.label]
    base_time = statistics.median(base_times) if base_times else None
    rows = []
    for contender in entries:
        mine = [r for r in done if r["label"] == contender.label]
        row = _row(contender, mine, base_acc, base_time)
        row["baseline"] = contender.label == base.label
        if row["baseline"]:
            row["gain"] = row["gain_se"] = None
        row["seeds"] = seeds
        row["diverged"] = sum(
            1
            for r in runs
            if r["label"] == contender.label and r.get("complete") and r.get("diverged")
        )
        rows.append(row)
    return rows


def _row(
    contender: Contender,
    mine: Sequence[Mapping[str, Any]],
    base_acc: Mapping[int, float],
    base_time: float | None,
) -> dict[str, Any]:
    """A summary row's numbers over the runs ``mine`` (finished, not diverged)."""
    acc, acc_std = _mean_std([100 * r["test_accuracy"] for r in mine])
    diffs = [
        100 * (r["test_accuracy"] - base_acc[r["seed"]]) for r in mine if r["seed"] in base_acc
    ]
    gain, diff_std = _mean_std(diffs)
    times = [r["wall_time"] for r in mine]
    losses = [r["final_train_loss"] for r in mine]

    def mean_of(key: str) -> float | None:
        values = [
            r["instruments"][key]
            for r in mine
            if r.get("instruments") and r["instruments"].get(key) is not None
        ]
        return statistics.fmean(values) if values else None

    return {
        "label": contender.label,
        "method": contender.method,
        "rho": contender.rho,
        "runs": len(mine),
        "accuracy": acc,
        "accuracy_std": acc_std,
        "gain": gain,
        "gain_se": diff_std / math.sqrt(len(diffs)) if diff_std is not None else None,
        "final_train_loss": statistics.fmean(losses) if losses else None,
        "wall_time": statistics.median(times) if times else None,
        "time_ratio": statistics.median(times) / base_time if times and base_time else None,
        "forwards_per_step": statistics.fmean(r["forwards_per_step"] for r in mine)
        if mine
        else None,
        "hessian_top": mean_of("hessian_top"),
        "sam_sharpness": mean_of("sam_sharpness"),
    }


def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, spec)


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary as an aligned text table (what ``torchsam compare`` prints).

    ``runs`` is ``k/n``: the numbers of the row cover k finished runs of the n seeds (diverged
    and unfinished runs are left out). A contender with diverged runs is marked
    ``[diverged k/n]`` (k of its n seeds); a number that is missing or not finite shows as
    ``—``.
    """
    header = (
        "optimizer",
        "runs",
        "test acc %",
        "gain vs " + next((r["label"] for r in summary if r["baseline"]), "baseline") + " (pp)",
        "train loss",
        "time",
        "top Hessian eig",
        "SAM sharpness",
    )
    lines = [header]
    for r in summary:
        acc = _fmt(r["accuracy"], ".2f")
        if r["accuracy_std"] is not None:
            acc += f" ± {r['accuracy_std']:.2f}"
        if r["baseline"]:
            gain = "—"
        else:
            gain = _fmt(r["gain"], "+.2f")
            if r["gain_se"] is not None:
                gain += f" ± {r['gain_se']:.2f}"
        diverged = r.get("diverged", 0)
        ratio = _fmt(r["time_ratio"], ".2f")
        lines.append(
            (
                str(r["label"]) + (f" [diverged {diverged}/{r['seeds']}]" if diverged else ""),
                f"{r['runs']}/{r['seeds']}",
                acc,
                gain,
                _fmt(r["final_train_loss"], ".3f"),
                ratio if ratio == "—" else ratio + "x",
                _fmt(r["hessian_top"], ".3g"),
                _fmt(r["sam_sharpness"], ".3g"),
            )
        )
    return aligned(lines)


def _pretty(label: str) -> str:
    names = {"sam": "SAM", "asam": "ASAM", "gsam": "GSAM", "esam": "ESAM", "msam": "MSAM"}
    head, _, tail = label.partition(" ")
    base, paren, rest = head.partition("(")
    more = {"looksam": "LookSAM", "sgd": "SGD", "periodic": "periodic SAM", "adamw": "AdamW"}
    base = names.get(base, more.get(base, base))
    return (base + paren + rest + (" " + tail if tail else "")).strip()


def verdict(summary: Sequence[Mapping[str, Any]]) -> str:
    """One sentence on the summary: the best gain over the baseline, its cost and its flatness,
    and the cheaper contender of another method that keeps the best share of it (in a ``--rho``
    sweep, never the best method at another rho).

    A gain is called settled when it exceeds twice its standard error; a smaller positive gain
    is reported with that caveat (with one seed there is no error estimate, and the sentence
    says so). With a single contender there is nothing to compare, and the sentence says that.
    Diverged runs count in no number; the contenders that had some are named after it.
    """
    sentence = _gain_sentence(summary)
    diverged = [
        f"{_pretty(r['label'])} ({r['diverged']} of {r['seeds']})"
        for r in summary
        if r.get("diverged")
    ]
    if diverged:
        sentence += (
            " Diverged runs (loss not finite; null in results.json; left out of the numbers): "
            + ", ".join(diverged)
            + "."
        )
    return sentence


def _gain_sentence(summary: Sequence[Mapping[str, Any]]) -> str:
    if len(summary) == 1:
        only = summary[0]
        name = _pretty(only["label"])
        if only.get("accuracy") is None:
            return (
                f"Nothing to compare: {name} was the only optimizer, and no run of it finished "
                "(diverged runs do not count)."
            )
        return (
            f"Only {name} ran ({only['accuracy']:.2f}% test accuracy): nothing to compare it "
            "with; add a baseline to --optimizers (e.g. sgd)."
        )
    base = next((r for r in summary if r["baseline"]), None)
    others = [r for r in summary if not r["baseline"] and r["gain"] is not None]
    if base is None or not others:
        return (
            "Nothing to compare: no run finished without diverging for the baseline and "
            "another optimizer."
        )
    base_name = _pretty(base["label"])
    best = max(others, key=lambda r: r["gain"])

    def cost(r: Mapping[str, Any]) -> str:
        return f"{r['time_ratio']:.1f}x time" if r["time_ratio"] is not None else "unknown time"

    def points(r: Mapping[str, Any]) -> str:
        se = f" ± {r['gain_se']:.1f}" if r["gain_se"] is not None else ""
        return f"{r['gain']:+.1f}{se} points"

    if best["gain"] <= 0:
        return (
            f"No optimizer beats {base_name} here "
            f"(best: {_pretty(best['label'])}, {points(best)} at {cost(best)})."
        )
    sentence = f"{_pretty(best['label'])} gains {points(best)} over {base_name} at {cost(best)}"
    if best["gain_se"] is None:
        sentence += " (one seed: no error estimate; use more seeds)"
    elif best["gain"] <= 2 * best["gain_se"]:
        sentence += (
            f" (within twice its standard error over {best['runs']} seeds: "
            "more --seeds would settle it)"
        )
    flat_base, flat_best = base.get("hessian_top"), best.get("hessian_top")
    if flat_base and flat_best and flat_best > 0 and flat_base > flat_best:
        sentence += f", with a {flat_base / flat_best:.1f}x smaller top Hessian eigenvalue"
    cheaper = [
        r
        for r in others
        if r["method"] != best["method"]  # not the same method at another rho or options
        and r["gain"] > 0
        and r["time_ratio"] is not None
        and best["time_ratio"] is not None
        and r["time_ratio"] < best["time_ratio"]
    ]
    if cheaper:
        pick = max(cheaper, key=lambda r: r["gain"] / max(r["time_ratio"], 1e-9))
        share = 100 * pick["gain"] / best["gain"]
        sentence += f"; {_pretty(pick['label'])} keeps {share:.0f}% of it at {cost(pick)}"
    return sentence + "."


# --------------------------------------------------------------------------- plots
def _plots(
    report: dict[str, Any],
    out: Path,
    models: Mapping[str, nn.Module],
    probe: Sequence[tuple[Tensor, Tensor]],
    config: CompareConfig,
    progress: Progress,
) -> list[str]:
    from torchsam.experiments import plots

    curves, cost, rho, sharp, _ = (out / name for name in PICTURES)
    written = [
        plots.learning_curves(report["runs"], curves),
        plots.accuracy_vs_time(report["summary"], cost),
    ]
    if len(config.rho) > 1:
        written.append(plots.accuracy_vs_rho(report["summary"], rho))
    if any(run.get("sharpness") for run in report["runs"]):
        written.append(plots.sharpness_over_training(report["runs"], sharp, lr=config.lr))
    pair = _landscape_pair(report["summary"], models)
    modules = _instrument_modules()
    if config.instruments and pair is not None and modules is not None:
        progress.note(f"drawing the loss landscape of {pair[0]} and {pair[1]}")
        landscape = modules[1]
        surfaces = [
            landscape.surface_2d(
                models[label],
                nn.CrossEntropyLoss(),
                probe,
                steps=config.landscape_steps,
                span=config.landscape_span,
                generator=torch.Generator().manual_seed(config.data_seed),
            )
            for label in pair
        ]
        figure = landscape.plot_side_by_side(
            surfaces[0],
            surfaces[1],
            titles=(_pretty(pair[0]), _pretty(pair[1])),
            path=out / "landscape.png",
        )
        plots.close(figure)
        written.append(out / "landscape.png")
        report["landscape"] = {
            "models": list(pair),
            "seed": config.seeds[0],
            "center_loss": [s.center for s in surfaces],
        }
    return [str(p.relative_to(out)) for p in written]


def _landscape_pair(
    summary: Sequence[Mapping[str, Any]], models: Mapping[str, nn.Module]
) -> tuple[str, str] | None:
    """The baseline against SAM (its best rho), else against the best-gain contender."""
    base = next((r["label"] for r in summary if r["baseline"]), None)
    if base is None or base not in models:
        return None
    others = [r for r in summary if not r["baseline"] and r["label"] in models]
    sam = [r for r in others if r["method"] == "sam"] or others
    if not sam:
        return None
    best = max(sam, key=lambda r: r["gain"] if r["gain"] is not None else -math.inf)
    return base, str(best["label"])
