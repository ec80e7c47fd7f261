"""The figures of ``torchsam compare`` (matplotlib, imported only here and only when drawing).

Each function takes the records or the summary that :func:`~torchsam.experiments.compare.
run_compare` builds, writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "accuracy_vs_rho",
    "accuracy_vs_time",
    "close",
    "learning_curves",
    "sharpness_over_training",
]

_INSTALL_HINT = 'the plots need matplotlib: pip install "torchsam[cli]"'


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def close(figure: Any) -> None:
    """Release a figure's memory."""
    _pyplot().close(figure)


def _legend(ax: Any) -> None:
    """The legend of ``ax``, when something on it has a label."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    close(figure)
    return path


def _mean_by(
    series: Sequence[Sequence[Mapping[str, Any]]], key: str, value: Callable[[Mapping], Any]
) -> list[tuple[Any, float]]:
    """``(position, mean)`` for every ``key`` value (epoch, step) that a series holds, in
    order: each run counts where it has that position and a finite value, so that runs of
    different lengths (an interrupted one) are aligned on the position, not the list index."""
    values: dict[Any, list[float]] = {}
    for records in series:
        for record in records:
            v = value(record)
            if v is not None and math.isfinite(v):
                values.setdefault(record[key], []).append(v)
    return [(at, statistics.fmean(vs)) for at, vs in sorted(values.items())]


def _finished(runs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The runs a mean covers: those that did not diverge (as in the summary)."""
    return [r for r in runs if not r.get("diverged")]


def learning_curves(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss and test accuracy against the epoch, mean over seeds per contender.

    Diverged runs are left out (as in the table); at each epoch the mean is over the runs that
    reached it (an interrupted run stops early).
    """
    plt = _pyplot()
    figure, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    kept = _finished(runs)
    for label in dict.fromkeys(r["label"] for r in runs):
        histories = [r["history"] for r in kept if r["label"] == label and r["history"]]
        loss = _mean_by(histories, "epoch", lambda h: h["train_loss"])
        if loss:
            ax_loss.plot([e + 1 for e, _ in loss], [v for _, v in loss], label=label)
        acc = _mean_by(
            histories,
            "epoch",
            lambda h: None if h["test_accuracy"] is None else 100 * h["test_accuracy"],
        )
        if acc:
            ax_acc.plot([e + 1 for e, _ in acc], [v for _, v in acc], label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (noisy labels)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(figure, path)


def accuracy_vs_time(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) against training wall time (median), per contender."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.5))
    for row in summary:
        if row["accuracy"] is None or row["wall_time"] is None:
            continue
        ax.errorbar(
            row["wall_time"],
            row["accuracy"],
            yerr=row["accuracy_std"] or 0.0,
            fmt="o",
            capsize=3,
            label=row["label"],
        )
    ax.set(
        xlabel="training wall time per run (s, median over seeds)",
        ylabel="test accuracy (%)",
        title="Accuracy against cost",
    )
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(figure, path)


def accuracy_vs_rho(summary: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Test accuracy against rho for each swept method; the baseline as a horizontal band."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.5))
    methods: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary:
        if row["rho"] is not None and row["accuracy"] is not None and not row["baseline"]:
            methods.setdefault(str(row["label"]).split(" rho=")[0], []).append(row)
    for name, rows in methods.items():
        rows = sorted(rows, key=lambda r: r["rho"])
        ax.errorbar(
            [r["rho"] for r in rows],
            [r["accuracy"] for r in rows],
            yerr=[r["accuracy_std"] or 0.0 for r in rows],
            marker="o",
            capsize=3,
            label=name,
        )
    base = next((r for r in summary if r["baseline"] and r["accuracy"] is not None), None)
    if base is not None:
        ax.axhline(base["accuracy"], color="black", linestyle="--", label=base["label"])
        if base["accuracy_std"]:
            ax.axhspan(
                base["accuracy"] - base["accuracy_std"],
                base["accuracy"] + base["accuracy_std"],
                color="black",
                alpha=0.08,
            )
    ax.set_xscale("log")
    ax.set(xlabel="rho", ylabel="test accuracy (%)", title="Accuracy against rho")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _save(figure, path)


def sharpness_over_training(
    runs: Sequence[Mapping[str, Any]], path: Path, *, lr: float | None
) -> Path:
    """The top Hessian eigenvalue on the probe against the step, mean over seeds per contender
    (``--monitor-every``; diverged runs left out, runs aligned on the step), with the line
    ``2 / lr``: gradient descent's stability limit at the peak learning rate (a quadratic of
    curvature above it diverges under plain gradient descent). ``lr`` is the comparison's;
    a run whose ``train_options`` set its own ``lr`` gets its own line, labelled with its
    contenders."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.5))
    kept = _finished(runs)
    rates: dict[float, list[str]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in kept if r["label"] == label and r.get("sharpness")]
        points = _mean_by([r["sharpness"] for r in mine], "step", lambda s: s["top_eigenvalue"])
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        own = (mine[0].get("train_options") or {}).get("lr", lr)
        if own:
            rates.setdefault(float(own), []).append(str(label))
    for i, (rate, labels) in enumerate(sorted(rates.items())):
        who = "" if len(rates) == 1 else f" ({', '.join(labels)})"
        ax.axhline(2 / rate, color="black", linestyle=("--", ":", "-.")[i % 3],
                   label=f"2/lr = {2 / rate:g}{who}")  # fmt: skip
    ax.set(
        xlabel="step",
        ylabel="top Hessian eigenvalue (training probe)",
        title="Sharpness during training",
    )
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(figure, path)
