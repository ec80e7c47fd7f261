"""torchsam's instruments against PyHessian and loss-landscapes, side by side in one process.

Run it as ``python benchmarks/bench_instruments.py`` after ``pip install -e ".[bench]"``.
Options: ``--threads N [N ...]`` the intra-op thread counts, each measured in turn (1 by
default; ``--threads 1 2`` for issue 20's two settings); ``--short`` only issue 20's
instruments (the top eigenvalue and the trace, the default contenders alone) on the full
model; ``--quick`` a smoke run on a smaller model; ``--device cuda`` on the GPU (an error
where CUDA is not available; the default sections there are issue 20's two); ``--trials N``
the number of timed rounds; ``--only SECTION`` (repeatable). It always needs PyHessian, and
loss-landscapes only for the landscape section (so neither with ``--short`` nor on the GPU by
default). It prints a report, ending with issue 20's instrument targets beside their
measurements, and exits with status 0 whether the targets are met or missed: it is a
measurement, not a test.

Besides the times, it counts the operators each default contender dispatches and its host
synchronisations (one untimed run under ``torchsam.experiments._dispatch_count``): these
counts do not depend on the machine's load, where a timing on a shared 2-core machine does.

The model is an MLP of 99,978 parameters (256 -> 256 -> 128 -> 10, ReLU), trained for two epochs
with SGD on 2,000 synthetic 16x16 inputs labelled by a fixed random teacher network, so that
the Hessian is that of a model partway through training. The data is ten batches of 200; the
loss is cross-entropy, the model in eval mode. (An MLP rather than a CNN of the same size: on
this shared 2-core machine a CNN's forward pass over the data made one full run take over half
an hour.)

Scenarios and targets (from the project's issue 11):

1. top Hessian eigenvalue. PyHessian 0.1 ``hessian(model, criterion, dataloader=batches)``
   ``.eigenvalues(top_n=1)`` with its defaults (power iteration, ``maxIter=100``,
   ``tol=1e-3``), against ``torchsam.sharpness.hessian_eigenvalues(k=1)`` with its defaults
   (Lanczos, ``tol=1e-3``, gradient graphs kept). Target: within 1% of PyHessian, at most 0.5x
   its time. For information: torchsam with ``method="power"`` (same algorithm as PyHessian, graphs
   kept), torchsam with ``keep_graphs=False`` (Lanczos, graphs rebuilt), and a tight reference
   value (torchsam Lanczos, ``tol=1e-6``).
2. Hessian trace. PyHessian ``.trace(maxIter=S, tol=0)`` (``tol=0`` so that it draws all ``S``
   vectors instead of stopping when its running mean settles) against
   ``torchsam.sharpness.hessian_trace(samples=S)``, ``S = 50``. Target: the same estimate within
   the standard error, no more time; and issue 20's target for the trace as for the top
   eigenvalue: within 1% of PyHessian, at most 0.5x its time (issue 20 states it with
   ``--threads 2``).
3. Spectral density. PyHessian ``.density(iter=100, n_v=1)`` against
   ``torchsam.sharpness.hessian_spectrum(steps=100, runs=1)``. PyHessian 0.1 calls
   ``torch.eig``, which torch removed in 1.13; the benchmark gives it a stand-in built on
   ``torch.linalg.eigh`` (same eigenvalues and eigenvectors of the symmetric tridiagonal
   matrix), labelled "PyHessian 0.1 + torch.eig shim"; the rest is PyHessian's own code.
   Both draw the same Rademacher start vector (same seed, same order). Target: the same
   spectrum (the nodes and weights of the two quadratures compared), no slower.
4. A 21 x 21 loss landscape. loss-landscapes 3.0.6 ``random_plane(model, Loss(...),
   steps=21, normalization="filter", deepcopy_model=True)`` against
   ``torchsam.landscape.surface_2d`` on the same directions and the same points: the
   benchmark re-draws loss-landscapes' directions (same seed, its own functions) and passes them
   to ``surface_2d(directions=..., coordinates=...)``. The data is one batch of 2,000, as
   loss-landscapes' ``Loss`` metric takes. Target: the same values, no slower.

Timing: each contender runs once per trial with ``time.perf_counter``, the order of the
contenders alternating from trial to trial, the garbage collector paused (on a GPU, the device
synchronised before and after); the reported time is the median over trials. Random vectors
are seeded identically at every trial.

Issue 20's instrument targets: the top eigenvalue and the trace each at most 0.5x PyHessian's
time and within 1% of its value, on CPU with 2 threads and on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import torchsam
from torchsam import landscape, sharpness
from torchsam.experiments._dispatch_count import DispatchCounter

Batches = list[tuple[Tensor, Tensor]]

#: issue 20: torchsam's top eigenvalue and trace at most this fraction of PyHessian's time
TIME_TARGET = 0.5
#: ... and within this relative difference of PyHessian's value
VALUE_TARGET = 0.01


@dataclass(frozen=True)
class Target:
    """One of issue 20's instrument targets beside its measurement."""

    name: str
    setting: str
    measured: str
    met: bool

    def row(self) -> str:
        verdict = "met" if self.met else "MISSED"
        return f"| {self.name} | {self.setting} | {self.measured} | {verdict} |"


def setting() -> str:
    """The device and thread count of the current measurement."""
    if DEVICE.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(DEVICE)})"
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


DEVICE = torch.device("cpu")  # set once by main() from --device


# --------------------------------------------------------------------------- model and data
def make_mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(256, width),
        nn.ReLU(),
        nn.Linear(width, width // 2),
        nn.ReLU(),
        nn.Linear(width // 2, 10),
    )


def make_problem(samples: int, batch: int, width: int) -> tuple[nn.Module, Batches]:
    torch.manual_seed(0)
    x = torch.randn(samples, 1, 16, 16)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 10))
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    model = make_mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for xb, yb in zip(x.split(50), y.split(50), strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    model.to(DEVICE)
    x, y = x.to(DEVICE), y.to(DEVICE)
    return model, list(zip(x.split(batch), y.split(batch), strict=True))


# --------------------------------------------------------------------------- timing
def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    gc.disable()
    try:
        synchronize()
        start = time.perf_counter()
        out = fn()
        synchronize()
        return time.perf_counter() - start, out
    finally:
        gc.enable()


def counted(fn: Callable[[], Any]) -> DispatchCounter:
    """The operators ``fn`` dispatches and its host synchronisations (one untimed run)."""
    with DispatchCounter() as counter:
        fn()
    return counter


def counts_line(theirs: DispatchCounter, ours: DispatchCounter) -> str:
    return (
        f"operators dispatched (load-independent): PyHessian {theirs.ops:,}, torchsam "
        f"{ours.ops:,} ({ours.ops / theirs.ops:.2f}x); host synchronisations: PyHessian "
        f"{theirs.syncs}, torchsam {ours.syncs}"
    )


def race(contenders: dict[str, Callable[[], Any]], trials: int) -> dict[str, tuple[float, Any]]:
    """Median time of each contender over trials (order alternating) and its last result."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    results: dict[str, Any] = {}
    names = list(contenders)
    for trial in range(trials):
        order = names if trial % 2 == 0 else names[::-1]
        for name in order:
            seconds, results[name] = timed(contenders[name])
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), results[name]) for name in names}


def row(label: str, seconds: float, base: float, note: str = "") -> str:
    return f"| {label} | {seconds:.2f} | {seconds / base:.2f}x | {note} |"


# --------------------------------------------------------------------------- peers
def import_peers(landscapes: bool = True) -> tuple[Any, Any, Any]:
    """PyHessian's ``hessian``, and ``loss_landscapes`` with its metrics where ``landscapes``
    (the landscape section alone needs them; None, None otherwise)."""
    try:
        from pyhessian import hessian as pyhessian_hessian
    except ImportError as error:
        sys.exit(f'PyHessian is missing ({error}): pip install -e ".[bench]"')
    if not landscapes:
        return pyhessian_hessian, None, None
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError as error:
        sys.exit(f'loss-landscapes is missing ({error}): pip install -e ".[bench]"')
    return pyhessian_hessian, loss_landscapes, loss_landscapes.metrics


def package_version(distribution: str, module: str) -> str:
    """The installed version of ``distribution``; for a package carried as a bare folder on
    ``PYTHONPATH`` (no distribution metadata), the ``__version__`` of ``module`` (imported
    already), else "unknown"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        found = getattr(sys.modules.get(module), "__version__", None)
        return "unknown" if found is None else str(found)


def _eig_shim(matrix: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.eig`` as PyHessian 0.1 calls it, for a symmetric matrix (removed in torch 1.13)."""
    values, vectors = torch.linalg.eigh(matrix)
    return torch.stack([values, torch.zeros_like(values)], dim=1), vectors


def pyhessian_for(pyhessian_hessian: Any, model: nn.Module, data: Batches) -> Any:
    cuda = DEVICE.type == "cuda"
    return pyhessian_hessian(model, nn.CrossEntropyLoss(), dataloader=data, cuda=cuda)


# --------------------------------------------------------------------------- scenarios
def bench_eigenvalue(
    model: nn.Module, data: Batches, trials: int, peer: Any, short: bool = False
) -> tuple[list[str], list[Target]]:
    ce = nn.functional.cross_entropy
    tight = sharpness.hessian_eigenvalues(model, ce, data, tol=1e-6, max_iter=300)[0]

    def pyh() -> tuple[float, int]:
        torch.manual_seed(1)
        counter = {"n": 0}
        h = pyhessian_for(peer, model, data)
        inner = h.dataloader_hv_product

        def counted(v: Any) -> Any:
            counter["n"] += 1
            return inner(v)

        h.dataloader_hv_product = counted
        values, _ = h.eigenvalues(top_n=1)
        return float(values[0]), counter["n"]

    def ours(**kw: Any) -> Callable[[], tuple[float, int]]:
        def run() -> tuple[float, int]:
            r = sharpness.hessian_eigenvalues(
                model, ce, data, generator=torch.Generator().manual_seed(1), **kw
            )
            return r[0], r.products

        return run

    contenders = {
        "PyHessian 0.1 (power, graphs rebuilt)": pyh,
        "torchsam (Lanczos, graphs kept)": ours(),
    }
    if not short:
        contenders["torchsam method='power' (graphs kept)"] = ours(method="power")
        contenders["torchsam keep_graphs=False (Lanczos)"] = ours(keep_graphs=False)
    res = race(contenders, trials)
    counts = counts_line(counted(pyh), counted(ours()))
    base, (ref, _) = res["PyHessian 0.1 (power, graphs rebuilt)"]
    lines = [
        "### 1. top Hessian eigenvalue",
        "",
        f"reference (torchsam Lanczos, tol=1e-6): {tight:.6f}",
        "",
        "| contender | time (s) | vs PyHessian | eigenvalue; vs PyHessian; vs reference; "
        "products |",
        "| --- | --- | --- | --- |",
    ]
    for name, (seconds, (value, products)) in res.items():
        note = (
            f"{value:.6f}; {100 * (value - ref) / ref:+.3f}%; "
            f"{100 * (value - tight) / tight:+.3f}%; {products}"
        )
        lines.append(row(name, seconds, base, note))
    ours_s, (ours_v, _) = res["torchsam (Lanczos, graphs kept)"]
    gap = (ours_v - ref) / abs(ref)
    targets = issue_20_targets("top eigenvalue", ours_s, base, gap)
    lines += ["", counts, "", *(f"target (issues 11 and 20): {t.row()}" for t in targets)]
    return lines, targets


def issue_20_targets(what: str, seconds: float, base: float, gap: float) -> list[Target]:
    """Issue 20's two targets for one measure: time against PyHessian's (``base``) and the
    relative ``gap`` between the two values."""
    return [
        Target(
            f"{what}: time <= 0.5x PyHessian's",
            setting(),
            f"{seconds / base:.2f}x ({seconds:.2f} s against {base:.2f} s)",
            seconds <= TIME_TARGET * base,
        ),
        Target(
            f"{what}: within 1% of PyHessian's",
            setting(),
            f"{100 * gap:+.3f}%",
            abs(gap) <= VALUE_TARGET,
        ),
    ]


def bench_trace(
    model: nn.Module, data: Batches, trials: int, peer: Any, samples: int
) -> tuple[list[str], list[Target]]:
    ce = nn.functional.cross_entropy

    def pyh() -> tuple[float, float]:
        torch.manual_seed(2)
        draws = pyhessian_for(peer, model, data).trace(maxIter=samples, tol=0.0)
        t = torch.tensor(draws, dtype=torch.float64)
        return float(t.mean()), float(t.std()) / math.sqrt(len(draws))

    def ours() -> tuple[float, float]:
        r = sharpness.hessian_trace(
            model, ce, data, samples=samples, generator=torch.Generator().manual_seed(2)
        )
        return float(r), r.stderr

    res = race({"PyHessian 0.1": pyh, "torchsam": ours}, trials)
    counts = counts_line(counted(pyh), counted(ours))
    base, (pv, pse) = res["PyHessian 0.1"]
    seconds, (ov, ose) = res["torchsam"]
    diff_se = math.sqrt(pse**2 + ose**2)
    gap = (ov - pv) / abs(pv)
    targets = issue_20_targets("trace", seconds, base, gap)
    lines = [
        f"### 2. Hessian trace (Hutchinson, {samples} Rademacher vectors each)",
        "",
        "| contender | time (s) | vs PyHessian | estimate ± standard error |",
        "| --- | --- | --- | --- |",
        row("PyHessian 0.1", base, base, f"{pv:.3f} ± {pse:.3f}"),
        row("torchsam", seconds, base, f"{ov:.3f} ± {ose:.3f}"),
        "",
        f"difference {ov - pv:+.3f}, {abs(ov - pv) / diff_se:.2f} standard errors of the "
        f"difference ({diff_se:.3f}); target: same estimate within the standard error: "
        f"{'met' if abs(ov - pv) <= diff_se else 'MISSED'}; no slower: "
        f"{'met' if seconds <= base else 'MISSED'} ({seconds / base:.2f}x)",
        "",
        counts,
        "",
        *(f"target (issue 20): {t.row()}" for t in targets),
    ]
    return lines, targets


def bench_density(model: nn.Module, data: Batches, trials: int, peer: Any, steps: int) -> list[str]:
    ce = nn.functional.cross_entropy

    def pyh() -> tuple[Tensor, Tensor]:
        torch.manual_seed(3)
        saved = getattr(torch, "eig", None)
        torch.eig = _eig_shim  # type: ignore[attr-defined]
        try:
            nodes, weights = pyhessian_for(peer, model, data).density(iter=steps, n_v=1)
        finally:
            if saved is None:
                del torch.eig  # type: ignore[attr-defined]
            else:
                torch.eig = saved  # type: ignore[attr-defined]
        return torch.tensor(nodes[0], dtype=torch.float64), torch.tensor(
            weights[0], dtype=torch.float64
        )

    def ours() -> tuple[Tensor, Tensor]:
        s = sharpness.hessian_spectrum(
            model, ce, data, steps=steps, generator=torch.Generator().manual_seed(3)
        )
        keep = torch.isfinite(s.nodes[0])
        return s.nodes[0][keep], s.weights[0][keep]

    res = race({"PyHessian 0.1 + torch.eig shim": pyh, "torchsam": ours}, trials)
    base, pm = res["PyHessian 0.1 + torch.eig shim"]
    seconds, om = res["torchsam"]

    def describe(m: tuple[Tensor, Tensor]) -> str:
        return (
            f"max node {float(m[0].max()):.4f}, min node {float(m[0].min()):.4f}, "
            f"mean {float((m[0] * m[1]).sum()):.3e}"
        )

    top = abs(float(om[0].max()) - float(pm[0].max())) / abs(float(pm[0].max()))
    width = float(pm[0].max() - pm[0].min())
    same_shape = om[0].shape == pm[0].shape
    if same_shape:
        o_order, p_order = om[0].argsort(), pm[0].argsort()
        node_gap = float((om[0][o_order] - pm[0][p_order]).abs().max()) / width
        weight_gap = float((om[1][o_order] - pm[1][p_order]).abs().max())
        compare = (
            f"sorted nodes differ by at most {node_gap:.1e} of the spectrum's width, weights by "
            f"at most {weight_gap:.1e}"
        )
    else:
        compare = f"{len(om[0])} nodes against {len(pm[0])}"
    return [
        f"### 3. spectral density (stochastic Lanczos quadrature, {steps} steps, 1 run)",
        "",
        "| contender | time (s) | vs PyHessian | quadrature |",
        "| --- | --- | --- | --- |",
        row("PyHessian 0.1 + torch.eig shim", base, base, describe(pm)),
        row("torchsam", seconds, base, describe(om)),
        "",
        "Both start from the same Rademacher vector (the same seed, drawn in the same order). "
        f"{compare}; largest node within {100 * top:.3f}%. Target: same spectrum: "
        f"{'met' if top <= 0.01 else 'MISSED'} (largest node within 1%); no slower: "
        f"{'met' if seconds <= base else 'MISSED'} ({seconds / base:.2f}x)",
    ]


def bench_landscape(
    model: nn.Module, data: Batches, trials: int, ll: Any, metrics: Any, steps: int
) -> list[str]:
    ce = nn.functional.cross_entropy
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    def peer() -> Any:
        torch.manual_seed(4)
        return ll.random_plane(
            model, metrics.Loss(ce, x, y), steps=steps, normalization="filter", deepcopy_model=True
        )

    # loss-landscapes' directions, re-drawn with its own functions from the same seed
    torch.manual_seed(4)
    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    one = rand_u_like(start)
    two = orthogonal_to(one)
    one.filter_normalize_(start)
    two.filter_normalize_(start)
    one.mul_(((start.model_norm() / 1) / steps) / one.model_norm())
    two.mul_(((start.model_norm() / 1) / steps) / two.model_norm())
    directions = ([t.clone() for t in one.parameters], [t.clone() for t in two.parameters])
    # its grid: row i at i - steps/2 along direction one; in even rows the points along direction
    # two are at j + 1 - steps/2, in odd rows at j - steps/2 (j = 0..steps-1)
    xs = [i - steps / 2 for i in range(steps)]
    ys_all = [j - steps / 2 for j in range(steps + 1)]
    ys_timed = ys_all[1:]

    def ours() -> Any:
        return landscape.surface_2d(
            model, ce, [(x, y)], directions=directions, coordinates=(xs, ys_timed)
        )

    res = race({"loss-landscapes 3.0.6": peer, "torchsam": ours}, trials)
    base, theirs = res["loss-landscapes 3.0.6"]
    seconds, _ = res["torchsam"]
    check = landscape.surface_2d(
        model, ce, [(x, y)], directions=directions, coordinates=(xs, ys_all)
    ).loss
    theirs_t = torch.tensor(theirs, dtype=torch.float64)
    ours_t = torch.stack(
        [check[1:, i] if i % 2 == 0 else check[:-1, i] for i in range(steps)]
    )  # (steps along one, steps along two), loss-landscapes' layout
    diff = (ours_t - theirs_t).abs()
    rel = float((diff / theirs_t.abs()).max())
    return [
        f"### 4. loss landscape, {steps} x {steps} points, one batch of {len(y)}",
        "",
        "| contender | time (s) | vs loss-landscapes |",
        "| --- | --- | --- |",
        f"| loss-landscapes 3.0.6 | {base:.2f} | 1.00x |",
        f"| torchsam | {seconds:.2f} | {seconds / base:.2f}x |",
        "",
        f"values: max |difference| {float(diff.max()):.2e}, max relative {rel:.2e} over "
        f"{diff.numel()} points (loss-landscapes walks the grid by repeated in-place steps; "
        "torchsam sets each point from the saved weights); target: same values: "
        f"{'met' if rel <= 1e-4 else 'MISSED'}; no slower: "
        f"{'met' if seconds <= base else 'MISSED'} ({seconds / base:.2f}x)",
    ]


# --------------------------------------------------------------------------- main
SECTIONS = ("eigenvalue", "trace", "density", "landscape")
ISSUE_20 = ("eigenvalue", "trace")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a smaller model")
    parser.add_argument(
        "--short",
        action="store_true",
        help="issue 20's instruments only (top eigenvalue, trace), default contenders alone",
    )
    parser.add_argument("--trials", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch intra-op thread counts, each measured in turn (default 1)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", choices=SECTIONS, action="append")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: CUDA is not available here (torch "
            f"{torch.__version__}, torch.cuda.is_available() is False); run on a machine with "
            "a GPU and a CUDA build of torch, or leave --device out for the CPU"
        )
    if any(n < 1 for n in args.threads):
        parser.error(f"--threads takes positive counts, got {args.threads}")
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    return args


def print_section(lines: list[str]) -> None:
    """A section of the report, printed (flushed) as soon as it is measured: a run cut short
    keeps the sections before."""
    print("\n".join(lines))
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    args = parse_args(argv)
    DEVICE = torch.device(args.device)
    if args.only:
        only = set(args.only)
    elif args.short or DEVICE.type == "cuda":
        only = set(ISSUE_20)
    else:
        only = set(SECTIONS)
    peer, ll, metrics = import_peers(landscapes="landscape" in only)
    if args.quick:
        samples, batch, width, trials, trace_samples, density_steps, grid = 200, 50, 32, 1, 5, 10, 5
    else:
        samples, batch, width, trials, trace_samples, density_steps, grid = (
            2000,
            200,
            256,
            3,
            50,
            100,
            21,
        )
    if args.trials is not None:
        trials = args.trials
    model, data = make_problem(samples, batch, width)
    n_params = sum(p.numel() for p in model.parameters())
    peers = f"PyHessian {package_version('pyhessian', 'pyhessian')}"
    if ll is not None:
        peers += f", loss-landscapes {package_version('loss-landscapes', 'loss_landscapes')}"
    print("## torchsam instruments against PyHessian and loss-landscapes")
    print()
    print(
        f"torch {torch.__version__}, torchsam {torchsam.__version__}, {peers}, Python "
        f"{platform.python_version()}, {platform.machine()}, device {DEVICE}"
    )
    print(
        f"model: MLP with {n_params:,} parameters; data: {samples} samples in batches of "
        f"{batch}; trials: {trials} (median)"
    )
    print()
    targets: list[Target] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"## {setting()}")
        print()
        if "eigenvalue" in only:
            lines, found = bench_eigenvalue(model, data, trials, peer, short=args.short)
            print_section(lines)
            targets += found
        if "trace" in only:
            lines, found = bench_trace(model, data, trials, peer, trace_samples)
            print_section(lines)
            targets += found
        if "density" in only:
            print_section(bench_density(model, data, trials, peer, density_steps))
        if "landscape" in only:
            print_section(bench_landscape(model, data, trials, ll, metrics, grid))
    if targets:
        print("## Issue 20's instrument targets")
        print()
        print("| target | setting | measured | verdict |")
        print("| --- | --- | --- | --- |")
        for target in targets:
            print(target.row())
        print()


if __name__ == "__main__":
    main()
