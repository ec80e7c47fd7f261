"""The figures of ``torchsam compare`` (matplotlib, imported only here and only when drawing).

Each function takes the records or the summary that :func:`~torchsam.experiments.compare.
run_compare` builds, writes one PNG and returns its path.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
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


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    close(figure)
    return path


def learning_curves(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss and test accuracy against the epoch, mean over seeds per contender."""
    plt = _pyplot()
    figure, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    for label in labels:
        histories = [r["history"] for r in runs if r["label"] == label and r["history"]]
        if not histories:
            continue
        length = min(len(h) for h in histories)
        epochs = [e + 1 for e in range(length)]
        loss = [statistics.fmean(h[e]["train_loss"] for h in histories) for e in range(length)]
        ax_loss.plot(epochs, loss, label=label)
        accs = [
            [100 * h[e]["test_accuracy"] for h in histories if h[e]["test_accuracy"] is not None]
            for e in range(length)
        ]
        if all(accs):
            ax_acc.plot(epochs, [statistics.fmean(a) for a in accs], label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (noisy labels)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
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
    ax.legend(fontsize="small")
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
    ax.legend(fontsize="small")
    return _save(figure, path)


def sharpness_over_training(
    runs: Sequence[Mapping[str, Any]], path: Path, *, lr: float | None
) -> Path:
    """The top Hessian eigenvalue on the probe against the step, mean over seeds per contender
    (``--monitor-every``), with the line ``2 / lr``: gradient descent's stability limit at the
    peak learning rate (a quadratic of curvature above it diverges under plain gradient
    descent)."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.5))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    for label in labels:
        series = [r["sharpness"] for r in runs if r["label"] == label and r.get("sharpness")]
        if not series:
            continue
        length = min(len(s) for s in series)
        points = []
        for i in range(length):
            values = [s[i]["top_eigenvalue"] for s in series if s[i]["top_eigenvalue"] is not None]
            if values:
                points.append((series[0][i]["step"], statistics.fmean(values)))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if lr:
        ax.axhline(2 / lr, color="black", linestyle="--", label=f"2/lr = {2 / lr:g}")
    ax.set(
        xlabel="step",
        ylabel="top Hessian eigenvalue (training probe)",
        title="Sharpness during training",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)
