"""The ``torchsam`` command: ``compare``, ``landscape`` and ``bench``.

``torchsam compare`` trains SGD, SAM and a cheap variant (or any optimizers of the package) on
a task over a few seeds and prints a table: test accuracy, gain over SGD, final training loss,
wall time relative to SGD, and the sharpness of each final model; it writes a JSON report, the
plots and the checkpoints of the first seed. ``torchsam landscape CKPT [CKPT2]`` draws the
loss landscape of saved checkpoints; ``torchsam bench`` runs the optimizer step-cost benchmark.

It needs the ``cli`` extra: ``pip install "torchsam[cli]"``. Bad arguments get one line on
stderr and exit status 2; an interrupted comparison (Ctrl-C) writes what it gathered and exits
with status 130.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = ["main"]

_PROG = "torchsam"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _UsageError(Exception):
    """A bad argument found after parsing: one line, exit status 2."""


# --------------------------------------------------------------------------- argument types
def _number(text: str, kind: type[float] | type[int] = float) -> float:
    try:
        return kind(text)
    except ValueError:
        name = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def _rhos(text: str) -> list[float]:
    values = [_number(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    for v in values:
        if not (math.isfinite(v) and v >= 0):
            raise argparse.ArgumentTypeError(f"invalid rho {v:g}: rho must be >= 0")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value is repeated in {text!r}")
    return values


def _noise(text: str) -> float:
    value = _number(text)
    if not (0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"label noise must lie in [0, 1), got {value:g}")
    return value


def _positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``0,5,7`` lists them."""
    values = [int(_number(v, int)) for v in text.split(",") if v.strip()]
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(f"the number of seeds must be >= 1, got {values[0]}")
        return list(range(values[0]))
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return values


# --------------------------------------------------------------------------- parser
def _dataset_defaults() -> str:
    """``digits and toy: ...; cifar10 and cifar100: ...`` from the code's own defaults."""
    from torchsam.experiments.compare import DATASET_DEFAULTS

    groups: dict[str, list[str]] = {}
    for name, d in DATASET_DEFAULTS.items():
        text = f"{d['model']}, {d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']:g}"
        groups.setdefault(text, []).append(name)
    return "; ".join(f"{' and '.join(names)}: {text}" for text, names in groups.items())


def _parser() -> _Parser:
    """The ``torchsam`` parser: ``compare``, ``landscape`` and ``bench``."""
    parser = _Parser(
        prog=_PROG,
        description="Does SAM help here, at what rho, at what cost, and how flat? "
        "Compare optimizers, draw loss landscapes, benchmark the step cost.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_compare(commands)
    _add_landscape(commands)
    _add_bench(commands)
    return parser


def _add_compare(commands: Any) -> None:
    """``torchsam compare`` and its options."""
    compare = commands.add_parser(
        "compare",
        help="train optimizers side by side and report accuracy, cost and sharpness",
        description="Train each optimizer for each seed, then print test accuracy (mean ± std), "
        "gain over SGD (± standard error of the paired per-seed differences), final training "
        "loss, wall time relative to SGD, the top Hessian eigenvalue and the SAM sharpness of "
        "each final model, and a verdict. Writes results.json (every number and the full "
        "configuration), PNG plots and the first seed's checkpoints to --out (a new or empty "
        "folder). A run that diverges is recorded as diverged, counts in no mean (the runs "
        "column says how many runs each row covers) and the others go on. Defaults that "
        f"depend on the dataset: {_dataset_defaults()}.",
    )
    _add_run_options(compare.add_argument)
    _add_output_options(compare.add_argument)


def _add_run_options(add: Callable[..., Any]) -> None:
    """``compare``'s options of the runs: the task, the optimizers, the training."""
    from torchsam.experiments.compare import DATASETS, MODELS

    S = argparse.SUPPRESS
    add("--dataset", choices=DATASETS, default=S, help="the task (default: digits)")
    add("--data-dir", default=S, help="folder with the CIFAR python files (cifar10/cifar100)")
    add("--train-size", type=_positive_int, default=S, help="keep N training samples (all)")
    add("--model", choices=MODELS, default=S, help="the network (default: per dataset)")
    add("--width", type=_positive_int, default=S, help="model width (default: per model)")
    add(
        "--optimizers",
        default=S,
        help="comma-separated optimizers with options, e.g. "
        "'sgd,sam,looksam:k=5,alpha=0.2' (default: sgd,sam,periodic)",
    )
    add("--rho", type=_rhos, default=S, help="rho, or a list for a sweep (default: 0.1)")
    add("--label-noise", type=_noise, default=S, help="share of wrong training labels (0.4)")
    add("--epochs", type=_positive_int, default=S, help="epochs per run")
    add("--batch-size", type=_positive_int, default=S, help="samples per step")
    add("--lr", type=_positive_float, default=S, help="peak learning rate (cosine schedule)")
    add("--momentum", type=_non_negative_float, default=S, help="SGD momentum (0.9)")
    add("--weight-decay", type=_non_negative_float, default=S, help="weight decay (5e-4)")
    add("--seeds", type=_seeds, default=S, help="a count (4: seeds 0-3) or a list (0,5,7)")
    add("--data-seed", type=int, default=S, help="seed of the split and the noise (0)")
    add("--device", default=S, help="auto (CUDA when present), cpu, cuda, cuda:1... (auto)")
    add(
        "--threads",
        type=_positive_int,
        default=S,
        help="torch CPU threads (1 for digits and toy, else torch's default)",
    )


def _add_output_options(add: Callable[..., Any]) -> None:
    """``compare``'s options of the output, the measurements and the long runs."""
    S = argparse.SUPPRESS
    add(
        "--out",
        default=None,
        help="output folder, new or empty (default: a new compare-<date>-<time> folder, "
        "e.g. compare-20261207-223906)",
    )
    add("--config", default=None, help="rerun the configuration of a results.json")
    add("--quiet", action="store_true", help="no progress bars")
    add(
        "--no-instruments",
        dest="instruments",
        action="store_false",
        default=S,
        help="skip the Hessian, sharpness and landscape measurements",
    )
    add("--instrument-samples", type=_positive_int, default=S, help="training samples (512)")
    add("--hessian-iters", type=_positive_int, default=S, help="eigenvalue iterations (20)")
    add("--sharpness-rho", type=_non_negative_float, default=S, help="rho of the measure (0.05)")
    add("--landscape-steps", type=_positive_int, default=S, help="grid points per axis (21)")
    add("--landscape-span", type=_positive_float, default=S, help="half-width of the grid (1)")
    add(
        "--monitor-every",
        type=_non_negative_int,
        default=S,
        help="top Hessian eigenvalue every N steps of each run, on 64 training samples, "
        "drawn in sharpness.png (0: off; default 150)",
    )
    add("--list-optimizers", action="store_true", help="describe the optimizers and exit")
    add(
        "--augment",
        choices=("none", "basic", "cutout"),
        default=S,
        help="CIFAR augmentation on the device: basic = 4-px pad random crop + flip, cutout = "
        "basic + a 16x16 square (default: basic for CIFAR, none for digits and toy)",
    )
    add(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=S,
        help="bf16: autocast and channels_last; auto: bf16 on CUDA, fp32 on the CPU (auto)",
    )
    add(
        "--graphs",
        choices=("auto", "on", "off"),
        default=S,
        help="capture each training step in a CUDA graph: SGD, and SAM with "
        "sam:skip_nonfinite=False; auto: where the run allows; not yet run on a GPU (off)",
    )
    add(
        "--preset",
        default=S,
        help="a paper's protocol, e.g. foret2021 (WRN-28-10, CIFAR, SGD vs SAM, 200 epochs) "
        "or foret2021-noise; options given here win; see docs/cifar.md",
    )
    add(
        "--resume",
        action="store_true",
        help="continue the runs of an interrupted comparison in --out from their checkpoints",
    )


def _add_landscape(commands: Any) -> None:
    """``torchsam landscape CKPT [CKPT2]`` and its options."""
    from torchsam.experiments.compare import DATASETS, MODELS

    landscape = commands.add_parser(
        "landscape",
        help="draw the loss landscape of one checkpoint, or two side by side",
        description="Draw the 2-D loss landscape (filter-normalised random directions) of a "
        "checkpoint written by 'torchsam compare' (checkpoints/*.pt), or of a plain state_dict "
        "given with --model and --dataset; with two checkpoints, the side-by-side picture.",
    )
    landscape.add_argument("checkpoints", nargs="+", metavar="CKPT", help="one or two files")
    landscape.add_argument("--model", choices=MODELS, default=None, help="for a plain state_dict")
    landscape.add_argument("--width", type=_positive_int, default=None, help="its width")
    landscape.add_argument("--dataset", choices=DATASETS, default=None, help="the data")
    landscape.add_argument("--data-dir", default=None, help="CIFAR folder")
    landscape.add_argument("--label-noise", type=_noise, default=None, help="as trained")
    landscape.add_argument("--samples", type=_positive_int, default=512, help="training samples")
    landscape.add_argument("--steps", type=_positive_int, default=21, help="points per axis")
    landscape.add_argument("--span", type=_positive_float, default=1.0, help="grid half-width")
    landscape.add_argument("--seed", type=int, default=0, help="seed of the directions")
    landscape.add_argument("--out", default="landscape.png", help="the PNG to write")
    landscape.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (as compare: 1 for digits and toy, else torch's default)",
    )


def _add_bench(commands: Any) -> None:
    """``torchsam bench`` and its options."""
    bench = commands.add_parser(
        "bench",
        help="the optimizer step-cost benchmark (torchsam.SAM against a plain implementation)",
        description="Time torchsam.SAM's step against the seed implementation of SAM and "
        "count its allocations (the same tables as benchmarks/bench_overhead.py).",
    )
    bench.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    bench.add_argument("--threads", type=_positive_int, default=1, help="torch threads (1)")


# --------------------------------------------------------------------------- compare
def _compare_config(args: argparse.Namespace) -> Any:
    from torchsam.experiments.compare import CompareConfig, contenders

    values: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise _UsageError(f"--config: no such file: {path}")
        try:
            loaded = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _UsageError(f"--config: {path} is not JSON ({exc})") from exc
        if not isinstance(loaded, dict):
            raise _UsageError(f"--config: {path} holds no configuration")
        try:
            from_file = CompareConfig.from_dict(loaded)
            from_file.validate()
        except ValueError as exc:
            raise _UsageError(f"--config {path}: {exc}") from exc
        values = from_file.to_dict()
    skip = {"command", "out", "config", "quiet", "list_optimizers", "resume"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    if values.get("preset") is not None:
        from torchsam.experiments.presets import expand_preset

        values = expand_preset(values["preset"], values)
    config = CompareConfig(**values)
    config.validate()
    contenders(config.optimizers, config.rho)  # a bad --optimizers list fails here, not later
    if config.data_dir is not None and not Path(config.data_dir).is_dir():
        raise _UsageError(f"--data-dir: no such folder: {config.data_dir}")
    return config


def _default_out() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(f"compare-{stamp}")
    n = 1
    while out.exists():
        n += 1
        out = Path(f"compare-{stamp}-{n}")
    return out


def _progress(quiet: bool) -> Any:
    from torchsam.experiments.compare import Progress

    if quiet:
        return Progress()
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError('the progress bars need tqdm: pip install "torchsam[cli]"') from exc

    state: dict[str, Any] = {"bar": None, "label": ""}

    def start_run(label: str, seed: int, total: int) -> None:
        state["bar"] = tqdm(total=total, desc=f"{label} seed {seed}", unit="step", leave=True)
        state["epoch"] = None

    def step(epoch: int, steps: int, loss: torch.Tensor) -> None:
        # The loss is read (a host synchronisation) once per epoch and at the last step, not
        # every few steps: on a GPU each read drains the device's queue.
        bar = state["bar"]
        bar.update(1)
        if epoch != state.get("epoch") or steps == bar.total:
            state["epoch"] = epoch
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)

    def end_run() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    def note(text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    return Progress(start_run=start_run, step=step, end_run=end_run, note=note)


def _list_optimizers(rhos: list[float] | None) -> None:
    """Each optimizer with the options compare runs it with: ``rho`` is ``--rho``'s value
    (``rhos``, or the default when ``None``), the others the optimizer's defaults."""
    from torchsam.experiments.compare import CompareConfig
    from torchsam.experiments.train import METHODS

    rho = " and ".join(str(r) for r in (CompareConfig().rho if rhos is None else rhos))
    width = max(len(n) for n in METHODS)
    for name, method in METHODS.items():
        options = ", ".join(
            f"rho={rho} (--rho)" if k == "rho" else f"{k}={v}" for k, v in method.defaults.items()
        )
        print(f"{name:<{width}}  {method.description}" + (f" [{options}]" if options else ""))
    print(
        "in brackets, the options compare runs with: rho is --rho's unless an optimizer sets "
        "its own (sam:rho=0.2) or a --preset the paper's; the others are each one's defaults"
    )


def _run_compare(args: argparse.Namespace) -> int:
    if args.list_optimizers:
        _list_optimizers(getattr(args, "rho", None))
        return 0
    from torchsam.experiments.compare import check_output_folder, init_distributed

    config = _compare_config(args)
    if args.resume and args.out is None:
        raise _UsageError("--resume continues the comparison in --out DIR: name that folder")
    out = Path(args.out) if args.out is not None else _default_out()
    if int(os.environ.get("RANK", "0")) == 0:  # the writer (torchrun's rank 0, or alone)
        check_output_folder(out, resume=args.resume)
    if not init_distributed(config.device):
        return _compare_and_print(args, config, out)
    import torch.distributed as dist

    try:
        status = _compare_and_print(args, config, out, rank=dist.get_rank())
    finally:
        dist.destroy_process_group()
    # End the process without the interpreter's teardown: there, gloo's threads have aborted
    # a process whose work was done ("terminate called without an active exception", exit
    # status -6) in about one run in six, which torchrun reports as a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _compare_and_print(args: argparse.Namespace, config: Any, out: Path, rank: int = 0) -> int:
    """Run the comparison; rank 0 (the only process without torchrun) shows the progress and
    prints the results, the other processes only train."""
    from torchsam.experiments.compare import Progress, format_table, run_compare

    progress = _progress(args.quiet) if rank == 0 else Progress()
    report = run_compare(config, out, progress=progress, resume=args.resume)
    if rank != 0:
        return 130 if report["interrupted"] else 0
    cfg = report["config"]
    processes = report["environment"]["processes"]
    print(
        f"{cfg['dataset']} (label noise {cfg['label_noise']:g}), {cfg['model']}, "
        f"{cfg['epochs']} epochs, seeds {','.join(map(str, cfg['seeds']))}, "
        f"device {report['environment']['device']}"
        + (f" x {processes} processes" if processes > 1 else "")
    )
    print(format_table(report["summary"]))
    if not report["environment"]["instruments"] and cfg["instruments"]:
        print("(torchsam.sharpness / torchsam.landscape are not available: no sharpness columns)")
    print()
    print(report["verdict"])
    if cfg.get("preset") is not None:
        from torchsam.experiments.presets import reference_lines

        print(
            "\n".join(
                reference_lines(
                    cfg["preset"], cfg["dataset"], cfg["label_noise"], report["summary"]
                )
            )
        )
    print(
        f"Results in {out}/: "
        + ", ".join(report["files"][:5])
        + ("..." if len(report["files"]) > 5 else "")
    )
    if report["interrupted"]:
        print("Interrupted: the results cover the runs that finished.", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------- landscape
def _some(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _mismatch(model: torch.nn.Module, state: dict[str, Any]) -> str | None:
    """What in ``state`` does not fit ``model.state_dict()``: shapes, missing and extra keys."""
    mine = model.state_dict()
    shapes = [
        k
        for k, v in mine.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    others = [k for k in mine if k in state and not isinstance(state[k], torch.Tensor)]
    missing = [k for k in mine if k not in state]
    extra = [k for k in state if k not in mine]
    parts = []
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more shapes differ)" if len(shapes) > 1 else ""
        parts.append(
            f"{k!r} has shape {list(state[k].shape)} in the file but {list(mine[k].shape)} "
            f"in the model{more}"
        )
    if others:
        parts.append(f"{_some(others)} in the file is not a tensor")
    if missing:
        parts.append(f"the file lacks {_some(missing)}")
    if extra:
        parts.append(f"the model has no {_some(extra)}")
    return "; ".join(parts) or None


def _load_checkpoint(path: Path, args: argparse.Namespace) -> tuple[str, Any, list[Any], str]:
    """(label, model, data, dataset) of one checkpoint given to ``torchsam landscape``."""
    from torchsam.experiments.compare import build_model, finite_loss, load_dataset, probe_data

    if not path.is_file():
        raise _UsageError(f"no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file it cannot read
        raise _UsageError(f"{path} is not a PyTorch checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict):
        raise _UsageError(f"{path} holds no state_dict")
    meta: dict[str, Any] = ckpt if "state_dict" in ckpt else {"state_dict": ckpt}
    model_name = args.model or meta.get("model")
    dataset = args.dataset or meta.get("dataset")
    if model_name is None or dataset is None:
        raise _UsageError(
            f"{path} is a plain state_dict: name its --model and --dataset as in compare"
        )
    noise = args.label_noise if args.label_noise is not None else meta.get("label_noise", 0.0)
    split = load_dataset(
        dataset,
        noise=noise,
        seed=meta.get("data_seed", 0),
        data_dir=args.data_dir or meta.get("data_dir"),
        train_size=meta.get("train_size"),
    )
    width = args.width or meta.get("width")
    model = build_model(model_name, dataset, split, width)
    state = meta["state_dict"]
    described = f"--model {model_name}" + (f" --width {width}" if width else "")
    problem = _mismatch(model, state) if isinstance(state, dict) else "it holds no state_dict"
    if problem is None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            problem = " ".join(str(exc).split())
    if problem is not None:
        raise _UsageError(
            f"{path} does not fit {described} on {dataset}: {problem} "
            "(name the model it was trained as with --model and --width)"
        )
    model.eval()
    data = probe_data(split, args.samples)
    if not finite_loss(model, data):
        raise _UsageError(
            f"{path}: the model's loss on the data is not finite (a diverged run): "
            "there is no landscape to draw"
        )
    return str(meta.get("label", path.stem)), model, data, str(dataset)


def _landscape_threads(given: int | None, datasets: Sequence[str]) -> int | None:
    """``--threads``, else compare's default for the checkpoints' data (1 for digits and toy,
    whose small models gain nothing from more threads; None: torch's default)."""
    from torchsam.experiments.compare import CompareConfig

    if given is not None:
        return given
    defaults = {CompareConfig(dataset=d).resolved().threads for d in datasets}
    return defaults.pop() if len(defaults) == 1 else None


def _run_landscape(args: argparse.Namespace) -> int:
    from torch import nn

    import torchsam.landscape as landscape
    from torchsam.experiments.compare import check_output_file

    if len(args.checkpoints) > 2:
        raise _UsageError("landscape takes one or two checkpoints")
    out = Path(args.out)
    check_output_file(out)
    if out.suffix.lower() != ".png":
        raise _UsageError("--out: the landscape is written as a PNG: give a name ending in .png")
    loaded = [_load_checkpoint(Path(name), args) for name in args.checkpoints]
    threads = torch.get_num_threads()
    try:
        wanted = _landscape_threads(args.threads, [dataset for *_, dataset in loaded])
        if wanted is not None:
            torch.set_num_threads(wanted)
        surfaces = [
            landscape.surface_2d(
                model,
                nn.CrossEntropyLoss(),
                data,
                steps=args.steps,
                span=args.span,
                generator=torch.Generator().manual_seed(args.seed),
            )
            for _, model, data, _ in loaded
        ]
    finally:
        torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    from torchsam.experiments import plots

    if len(surfaces) == 2:
        figure = landscape.plot_side_by_side(
            surfaces[0], surfaces[1], titles=(loaded[0][0], loaded[1][0]), path=out
        )
        plots.close(figure)
    else:
        plots.close(landscape.plot_contour(surfaces[0], title=loaded[0][0], path=out))
    for (label, *_), surface in zip(loaded, surfaces, strict=True):
        print(
            f"{label}: loss at the centre {surface.center:.4f}, "
            f"max on the grid {float(torch.as_tensor(surface.loss).max()):.4f}"
        )
    print(f"Landscape written to {out}")
    return 0


# --------------------------------------------------------------------------- bench
def _run_bench(args: argparse.Namespace) -> int:
    from torchsam.experiments import bench

    argv = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    return bench.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``torchsam`` command with ``argv`` (default: ``sys.argv[1:]``); return its status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    command = {"compare": _run_compare, "landscape": _run_landscape, "bench": _run_bench}
    prog = f"{_PROG} {args.command}"
    if extra:
        print(
            f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)",
            file=sys.stderr,
        )
        return 2
    try:
        return command[args.command](args)
    except (_UsageError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
