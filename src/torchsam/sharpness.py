r"""Sharpness of a model's loss: Hessian eigenvalues, trace and spectral density, SAM sharpness.

Every function here is a pure function of ``(model, loss_fn, data, ...)``:

* ``data`` is an iterable of ``(inputs, targets)`` batches (a list, a tuple or a
  ``DataLoader``; not an iterator). Each call reads it exactly once, at the start, into a list
  of batches, and measures on that list: every pass sees the same batches in the same order,
  so a shuffling loader, or one with ``drop_last=True``, measures one fixed function (the
  batches of one pass, held in memory for the call). ``loss_fn(outputs, targets)`` returns the
  mean loss of a batch; the loss measured is the sample-weighted mean over those batches,

  .. math:: L(w) = \frac{1}{N} \sum_b n_b\, \mathrm{loss\_fn}(f_w(x_b), y_b).

* The loss is deterministic: every module is put in evaluation mode for the measurement
  (dropout off). ``batch_norm="eval"`` (the default, as PyHessian does) normalises with the
  running statistics; ``batch_norm="train"`` normalises with the statistics of each batch, and
  the running statistics are left untouched.
* The model comes back exactly as it came: weights and buffers bit-identical, ``.grad``
  untouched (the functions use ``torch.autograd.grad``, never ``backward()``), every module's
  train/eval flag, and torch's global RNG state (CPU, and CUDA when initialised), which is also
  given back around the reading of ``data`` (a ``DataLoader`` draws its base seed, and a
  shuffling sampler its order, from it): a measurement taken during training does not change
  the training.
* Random vectors come from ``generator`` (a ``torch.Generator``); without one, a new generator
  seeded with 0 is used, so the results are reproducible and the global RNG is never drawn from.
* A diverged model: when the loss or a Hessian-vector product is not finite (NaN or
  infinite), the result is NaN (every eigenvalue, eigenvector entry, the trace and its
  standard error, the spectrum's nodes, weights, grid and density, the SAM sharpness) and a
  ``RuntimeWarning`` says so.
* ``params`` restricts the Hessian to a subset of the parameters (the others held fixed): a
  submodule, a parameter or submodule name, a parameter, or a list of those; by default every
  parameter that requires a gradient. This answers "which layer is sharp?".

Hessian-vector products are double-backward products
:math:`Hv = \nabla_w (\nabla_w L \cdot v)`. With ``keep_graphs=True`` (the default) the gradient
graph of every batch is built once and kept, so each product costs one backward pass through
the kept graphs; ``keep_graphs=False`` rebuilds them at every product (what PyHessian does) and
needs memory for one batch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from torchsam._measure import (
    Data,
    LossFn,
    ParamSpec,
    batch_loss,
    batches,
    fixed_batches,
    mean_loss,
    measuring,
    model_device,
    not_finite,
    random_generator,
    select_params,
)

__all__ = [
    "Eigenvalues",
    "HessianSpectrum",
    "TraceEstimate",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "plot_spectrum",
    "sam_sharpness",
]

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# --------------------------------------------------------------------------- results
class Eigenvalues(list[float]):
    """The top-k eigenvalues, largest first: a ``list[float]`` with how they were obtained.

    Attributes:
        products (int): the number of Hessian-vector products used
        converged (bool): whether every reported pair ``(value, v)`` has residual
            ``||H v - value v|| <= tol * max|value|`` and no missing copy of a repeated
            eigenvalue was found, within ``max_iter`` (see :func:`hessian_eigenvalues`); False
            for a diverged model (NaN values)
        eigenvectors (list[list[Tensor]] | None): with ``return_eigenvectors=True``, one
            unit-norm eigenvector per eigenvalue, as tensors shaped like the parameters
    """

    products: int
    converged: bool
    eigenvectors: list[list[Tensor]] | None


class TraceEstimate(float):
    """Hutchinson's estimate of the Hessian trace: a ``float`` that also carries its error.

    Attributes:
        value (float): the estimate, the mean of ``v^T H v`` over the samples
        stderr (float): its standard error, the sample standard deviation over ``sqrt(samples)``
        samples (int): the number of random vectors
    """

    stderr: float
    samples: int

    def __new__(cls, value: float, stderr: float, samples: int) -> TraceEstimate:
        self = super().__new__(cls, value)
        self.stderr = float(stderr)
        self.samples = int(samples)
        return self

    @property
    def value(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return f"TraceEstimate({float(self)!r}, stderr={self.stderr!r}, samples={self.samples})"


@dataclass(frozen=True)
class HessianSpectrum:
    """The Hessian's spectral density from stochastic Lanczos quadrature.

    Attributes:
        nodes (Tensor): ``(runs, steps)`` Ritz values of each Lanczos run (the quadrature nodes)
        weights (Tensor): ``(runs, steps)`` their weights (each row sums to 1)
        grid (Tensor): ``(points,)`` eigenvalue axis, ready to plot
        density (Tensor): ``(points,)`` the density on ``grid``: each node spread as a Gaussian
            of variance ``sigma_squared``, averaged over runs, integrating to 1 over ``grid``

    All tensors are float64 on the CPU.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor


# --------------------------------------------------------------------------- the operator
class _NotFinite(Exception):
    """The loss or a Hessian-vector product is not finite: the measurement is NaN."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _Hessian:
    """Hessian-vector products of the loss over ``data`` with respect to ``params``.

    Vectors are flat float64 tensors over the concatenated parameters. A non-finite loss or
    product raises :class:`_NotFinite`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        params: list[Tensor],
        keep_graphs: bool,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.params = params
        self.device = params[0].device
        self.numels = [p.numel() for p in params]
        self.size = sum(self.numels)
        self.products = 0
        self._grads: list[Tensor] | None = None
        if keep_graphs:
            total: Tensor | None = None
            count = 0
            for inputs, targets, n in batches(data, model_device(model)):
                loss = batch_loss(model, loss_fn, inputs, targets) * n
                total = loss if total is None else total + loss
                count += n
            if total is None:  # pragma: no cover - batches() raises first
                raise ValueError("data yielded no non-empty batch")
            if not bool(torch.isfinite(total)):
                raise _NotFinite("the loss")
            self._grads = self._gradient(total / count)

    def gradient(self) -> Tensor:
        """The gradient of the loss as a flat float64 vector: from the kept graphs, or one
        backward pass per batch when they are not kept."""
        if self._grads is not None:
            grads = [g.detach() for g in self._grads]
        else:
            grads = [torch.zeros_like(p) for p in self.params]
            count = 0
            for inputs, targets, n in batches(self.data, model_device(self.model)):
                loss = batch_loss(self.model, self.loss_fn, inputs, targets) * n
                part = torch.autograd.grad(loss, self.params, allow_unused=True)
                for acc, g in zip(grads, _fill(part, self.params), strict=True):
                    acc.add_(g)
                count += n
            grads = [g / count for g in grads]
        return torch.cat([g.reshape(-1).to(self.device, torch.float64) for g in grads])

    def _gradient(self, loss: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return _fill(grads, self.params)

    def _split(self, v: Tensor) -> list[Tensor]:
        return [
            piece.view_as(p).to(device=p.device, dtype=p.dtype)
            for piece, p in zip(v.split(self.numels), self.params, strict=True)
        ]

    def _product(self, grads: list[Tensor], vs: list[Tensor], retain: bool) -> list[Tensor]:
        pairs = [(g, v) for g, v in zip(grads, vs, strict=True) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        hv = torch.autograd.grad(
            [g for g, _ in pairs],
            self.params,
            grad_outputs=[v for _, v in pairs],
            retain_graph=retain,
            allow_unused=True,
        )
        return _fill(hv, self.params)

    def __call__(self, v: Tensor) -> Tensor:
        """``H v``, checked: one host synchronisation per product."""
        out, losses_finite = self.apply(v)
        finite = torch.isfinite(out).all()
        if losses_finite is not None:
            finite = finite & losses_finite
        if not bool(finite):
            raise _NotFinite("the loss or a Hessian-vector product")
        return out

    def apply(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """``H v`` without a host synchronisation, unchecked.

        Also returns, when the graphs are rebuilt (``keep_graphs=False``), a boolean tensor on
        the device telling whether every batch's loss was finite (None when the graphs are
        kept: their loss was checked once, when they were built). A non-finite entry of
        ``H v`` makes ``u @ H v`` non-finite for every ``u`` (``nan * 0`` and ``inf * 0`` are
        NaN), so a caller that reads such a dot product checks the product with it.
        """
        hv, losses_finite = self.apply_parts(self._split(v))
        out = torch.cat([h.reshape(-1).to(self.device, torch.float64) for h in hv])
        return out, losses_finite

    def apply_parts(self, vs: list[Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """:meth:`apply` on a vector given as tensors shaped like the parameters (no copies)."""
        self.products += 1
        losses: list[Tensor] = []
        if self._grads is not None:
            hv = self._product(self._grads, vs, retain=True)
        else:
            acc: list[Tensor] | None = None
            count = 0
            for inputs, targets, n in batches(self.data, model_device(self.model)):
                loss = batch_loss(self.model, self.loss_fn, inputs, targets)
                losses.append(loss.detach())
                part = self._product(self._gradient(loss), vs, retain=False)
                if acc is None:
                    acc = [h * n for h in part]
                else:
                    for a, h in zip(acc, part, strict=True):
                        a.add_(h, alpha=n)
                count += n
            if acc is None:  # pragma: no cover - batches() raises first
                raise ValueError("data yielded no non-empty batch")
            hv = [a / count for a in acc]
        if not losses:
            return hv, None
        return hv, torch.isfinite(torch.stack(losses)).all().to(self.device)


# --------------------------------------------------------------------------- helpers
def _read(*values: Tensor, losses_finite: Tensor | None = None) -> list[float]:
    """Device tensors' values as floats, flattened, in one host synchronisation (``tolist()``).

    A non-finite value, or ``losses_finite`` False, raises :class:`_NotFinite`: the values read
    are dot products or norms of Hessian-vector products, which are non-finite whenever the
    product is (see :meth:`_Hessian.apply`).
    """
    parts = [x.reshape(-1).to(torch.float64) for x in values]
    if losses_finite is not None:
        parts.append(losses_finite.reshape(1).to(parts[0].device, torch.float64))
    read = torch.cat(parts).tolist()
    if losses_finite is not None and read.pop() == 0.0:
        raise _NotFinite("the loss")
    if not all(math.isfinite(x) for x in read):
        raise _NotFinite("a Hessian-vector product")
    return read


def _fill(tensors: Sequence[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    """Zeros for the parameters autograd reports as unused."""
    return [torch.zeros_like(p) if t is None else t for t, p in zip(tensors, like, strict=True)]


def _unflatten(v: Tensor, like: list[Tensor]) -> list[Tensor]:
    """A flat vector as new tensors shaped like the parameters ``like``."""
    sizes = [p.numel() for p in like]
    return [
        piece.reshape(p.shape).to(device=p.device, dtype=p.dtype).clone()
        for piece, p in zip(v.split(sizes), like, strict=True)
    ]


def _normal(size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    v = torch.randn(size, generator=generator, device=generator.device, dtype=torch.float64)
    return v.to(device)


def _rademacher(
    size: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype = torch.float64
) -> Tensor:
    bits = torch.randint(0, 2, (size,), generator=generator, device=generator.device)
    return bits.to(device, dtype).mul_(2).sub_(1)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    return float(tol)


def _prepare(
    model: nn.Module, loss_fn: LossFn, data: Data, params: ParamSpec
) -> tuple[list[Tensor], list[object]]:
    """The parameters measured, and ``data`` read once into a fixed list of batches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, targets)")
    chosen = select_params(model, params)
    return chosen, fixed_batches(data)


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``w`` its components along the rows of ``basis`` (twice, for stability)."""
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _lanczos(
    op: _Hessian,
    start: Tensor,
    steps: int,
    *,
    locked: Tensor | None = None,
    done: Callable[[Tensor, float], bool] | None = None,
) -> tuple[Tensor, Tensor, float, bool]:
    """Lanczos with full reorthogonalisation from ``start``, at most ``steps`` steps.

    Every new vector is orthogonalised against the basis and against the rows of ``locked``
    (orthonormal vectors already found, which ``start`` must be orthogonal to), so the
    iteration works on the Hessian restricted to their orthogonal complement. After each step
    ``done(T, beta)`` may stop it.

    Returns the tridiagonal matrix ``T`` (float64, CPU), the basis (rows), the last ``beta``
    (the residual of a Ritz pair ``(theta_i, basis.T @ s_i)`` is ``beta * |s_i[-1]|``) and
    whether the Krylov space is exhausted (``beta`` ~ 0, or the basis fills the complement):
    then every Ritz pair is an eigenpair, with residual 0 up to rounding.

    Each step synchronises with the device once: ``alpha`` and ``beta`` come back together
    (they also check the product: :func:`_read`).
    """
    n = start.numel()
    room = n - (0 if locked is None else locked.shape[0])
    steps = min(steps, room)
    basis = torch.empty(steps, n, dtype=torch.float64, device=start.device)
    q = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    scale = 0.0
    j = 0
    exhausted = False
    for j in range(steps):
        basis[j] = q
        w, losses_finite = op.apply(q)
        alpha_t = w @ q
        w = w - alpha_t * q
        if j > 0:
            w = w - beta * basis[j - 1]
        w = _orthogonalize(w, basis[: j + 1])
        if locked is not None:
            w = _orthogonalize(w, locked)
        alpha, beta = _read(alpha_t, w.norm(), losses_finite=losses_finite)
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        if beta <= 1e-10 * max(scale, 1e-30) or j + 1 == room:
            exhausted = True
            break
        if j + 1 == steps or (done is not None and done(_tridiagonal(alphas, betas), beta)):
            break
        q = w / beta
        betas.append(beta)
    return _tridiagonal(alphas, betas), basis[: j + 1], beta, exhausted


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


# --------------------------------------------------------------------------- eigenvalues
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    k: int = 1,
    *,
    params: ParamSpec = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    method: str = "lanczos",
    batch_norm: str = "eval",
    keep_graphs: bool = True,
    return_eigenvectors: bool = False,
    generator: torch.Generator | None = None,
    start: Sequence[Tensor] | str | None = None,
) -> Eigenvalues:
    r"""The ``k`` largest eigenvalues of the Hessian of the loss over ``data``, largest first.

    Repeated eigenvalues are returned as often as they occur: with a Hessian
    :math:`I_3 \otimes A` (a linear layer of three outputs under a squared loss), the top three
    values are the top eigenvalue of :math:`A` three times.

    ``method="lanczos"`` (the default) runs the Lanczos iteration with full reorthogonalisation
    from a random Gaussian start. After each Hessian-vector product it computes the Ritz pairs
    :math:`(\theta_i, y_i)` of the tridiagonal matrix; a run stops when each of the top ``k``
    has residual :math:`\lVert H y_i - \theta_i y_i \rVert = \beta\, |s_{m,i}| \le` ``tol``
    times the largest :math:`|\theta|` among the top ``k``, which bounds each eigenvalue's error
    by the same amount (Parlett, "The Symmetric Eigenvalue Problem", Thm. 11.5.1 with full
    reorthogonalisation),
    or when its Krylov space is exhausted (:math:`\beta \approx 0`: its Ritz pairs are then
    exact). The pairs found are locked, and a new run starts from a random vector, every vector
    orthogonalised against the locked ones as well as its own basis. One Krylov space holds one
    direction of each eigenspace, so a single run sees a repeated eigenvalue once; for
    ``k >= 2`` the search therefore ends only when a run in the complement of the pairs found
    converges to nothing above the ``k``-th of them (else its pair joins them and another run
    follows). The eigenvalues are the largest *algebraic* ones.

    ``method="power"`` is power iteration with deflation, as PyHessian does it: one eigenvalue
    at a time, from a new random vector, each iterate projected off the eigenvectors already
    found, at most ``max_iter`` products per eigenvalue. It finds the eigenvalues of largest
    *magnitude*. It stops when the residual of the current pair is within ``tol`` times the
    largest :math:`|\lambda|` (PyHessian stops when the Rayleigh quotient changes by less than
    ``tol``, a weaker test).

    ``result.converged`` is True exactly when every reported pair :math:`(\lambda, v)` has
    residual :math:`\lVert H v - \lambda v \rVert \le` ``tol`` times the largest reported
    :math:`|\lambda|` (for Lanczos pairs found after others were locked, this residual is
    measured with one more product each) and, with Lanczos and ``k >= 2``, the run that looked
    for a missing copy found none. When the budget runs out first, the best estimates are
    returned with ``converged=False``.

    Args:
        model (nn.Module): the model
        loss_fn (callable): ``loss_fn(outputs, targets)``, the mean loss of a batch
        data (iterable): ``(inputs, targets)`` batches, read once into a fixed list (see the
            module docs)
        k (int, optional): how many eigenvalues (default: 1)
        params (optional): the parameters to differentiate (see the module docs; default: all
            that require a gradient)
        tol (float, optional): relative tolerance, see above (default: 1e-3)
        max_iter (int, optional): at most this many Hessian-vector products (Lanczos, all runs
            together, plus at most ``k`` to measure residuals) or this many per eigenvalue
            (power) (default: 100)
        method (str, optional): ``"lanczos"`` or ``"power"`` (default: ``"lanczos"``)
        batch_norm (str, optional): ``"eval"`` or ``"train"`` (default: ``"eval"``)
        keep_graphs (bool, optional): keep each batch's gradient graph between products
            (faster; memory for the whole of ``data``) (default: True)
        return_eigenvectors (bool, optional): also compute the eigenvectors, in
            ``result.eigenvectors`` (default: False)
        generator (torch.Generator, optional): source of the random start (default: a
            generator seeded with 0)
        start (sequence of Tensor, optional): the first start vector instead of a random one,
            as tensors shaped like the parameters measured (in model order), such as
            ``result.eigenvectors[0]`` of an earlier call: a warm start. Lanczos starts its
            first run from it, power iteration its first eigenvalue; later runs and
            eigenvalues start from ``generator`` as usual. It must be finite and not zero.
            ``"gradient"``: the first start is the unit gradient of the loss plus a unit
            random vector of ``generator`` (the gradient of a trained network lies mostly in
            the Hessian's top eigenspace, Gur-Ari et al. 2018, so this start is close to the
            top eigenvector, while the random part keeps a component along every
            eigenvector); with ``keep_graphs=False`` the gradient takes one more backward
            pass per batch (default: None, a random start)

    Returns:
        Eigenvalues: a ``list[float]``, largest first, with ``.products``, ``.converged`` and
        ``.eigenvectors``.

    Example:
        >>> top = torchsam.sharpness.hessian_eigenvalues(model, loss_fn, loader, k=3)
        >>> fc = torchsam.sharpness.hessian_eigenvalues(model, loss_fn, loader, params="fc")
    """
    k = _check_positive_int("k", k)
    max_iter = _check_positive_int("max_iter", max_iter)
    tol = _check_tol(tol)
    if method not in ("lanczos", "power"):
        raise ValueError(f'method must be "lanczos" or "power", got {method!r}')
    if method == "lanczos" and max_iter < k:
        raise ValueError(f"max_iter={max_iter} is less than k={k}: Lanczos needs at least k steps")
    chosen, fixed = _prepare(model, loss_fn, data, params)
    size = sum(p.numel() for p in chosen)
    if k > size:
        raise ValueError(f"k={k} exceeds the number of parameters measured ({size})")
    gen = random_generator(generator)
    from_gradient = isinstance(start, str)
    if from_gradient and start != "gradient":
        raise ValueError(f'start must be None, "gradient" or a sequence of tensors, got {start!r}')
    first = None if start is None or isinstance(start, str) else _start_vector(start, chosen)
    op: _Hessian | None = None
    with measuring(model, batch_norm):
        try:
            op = _Hessian(model, loss_fn, fixed, chosen, keep_graphs)
            if from_gradient:
                first = _gradient_start(op, gen)
            if method == "lanczos":
                values, vectors, converged = _top_lanczos(op, k, tol, max_iter, gen, first)
            else:
                values, vectors, converged = _top_power(op, k, tol, max_iter, gen, first)
        except _NotFinite as error:
            not_finite(error.what)
            values, converged = [math.nan] * k, False
            vectors = [torch.full((size,), math.nan, dtype=torch.float64)] * k
    result = Eigenvalues(values)
    result.products = op.products if op is not None else 0
    result.converged = converged
    result.eigenvectors = [_unflatten(v, chosen) for v in vectors] if return_eigenvectors else None
    return result


def _start_vector(start: Sequence[Tensor], params: list[Tensor]) -> Tensor:
    """A warm start given as tensors shaped like ``params``, as one flat float64 vector."""
    if isinstance(start, Tensor) or not all(isinstance(t, Tensor) for t in start):
        raise TypeError(
            "start must be a sequence of tensors shaped like the parameters measured (such as "
            "result.eigenvectors[0] of an earlier call)"
        )
    pieces = list(start)
    shapes = [tuple(t.shape) for t in pieces]
    wanted = [tuple(p.shape) for p in params]
    if shapes != wanted:
        raise ValueError(
            f"start has tensors of shapes {shapes}; the parameters measured have shapes {wanted}"
        )
    device = params[0].device
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in pieces])
    if not bool(torch.isfinite(flat).all()) or float(flat.norm()) == 0.0:
        raise ValueError("start must be finite and not zero: give None for a random start")
    return flat


def _gradient_start(op: _Hessian, gen: torch.Generator) -> Tensor:
    """The unit gradient plus a unit random vector (the random vector alone where the
    gradient is zero). One host synchronisation."""
    random = _normal(op.size, gen, op.device)
    random = random / random.norm()
    gradient = op.gradient()
    size = float(gradient.norm())
    if not math.isfinite(size):
        raise _NotFinite("the loss or its gradient")
    return random if size == 0.0 else random + gradient / size


def _top_scale(values: Sequence[float], k: int) -> float:
    """The scale of the relative tolerance: the largest ``|value|`` among the top ``k``."""
    top = sorted(values, reverse=True)[:k]
    return max([abs(v) for v in top if math.isfinite(v)] + [1e-30])


def _top_lanczos(
    op: _Hessian,
    k: int,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    first: Tensor | None = None,
) -> tuple[list[float], list[Tensor], bool]:
    """Lanczos runs with locking until the top ``k`` eigenpairs, multiplicities included, are
    found; see :func:`hessian_eigenvalues`."""
    # the pairs found: value, unit vector, residual (None: bounded only for the Hessian
    # restricted to the complement of the pairs locked before it, to be measured)
    found: list[tuple[float, Tensor, float | None]] = []
    pending: list[tuple[float, Tensor, float | None]] = []  # the last run's unconverged pairs
    verified = False
    while op.products < max_iter and len(found) < op.size:
        locked = torch.stack([x for _, x, _ in found]) if found else None
        want = max(k - len(found), 1)
        values = [v for v, _, _ in found]
        kth = sorted(values, reverse=True)[k - 1] if len(found) >= k else None

        def done(t: Tensor, beta: float, want: int = want, values: list[float] = values) -> bool:
            if t.shape[0] < want:
                return False
            theta, s = torch.linalg.eigh(t)  # on the CPU: no synchronisation
            scale = _top_scale(values + theta.tolist(), k)
            return all(beta * abs(x) <= tol * scale for x in s[-1, -want:].tolist())

        if first is not None:
            start, first = first, None
        else:
            start = _normal(op.size, gen, op.device)
        if locked is not None:
            start = _orthogonalize(start, locked)
        t, basis, beta, exhausted = _lanczos(
            op, start, max_iter - op.products, locked=locked, done=done
        )
        # the small eigenproblem lives on the CPU: read as lists, with no scalar reads
        theta_t, s = torch.linalg.eigh(t)
        theta = theta_t.tolist()
        residuals = [0.0] * len(theta) if exhausted else (beta * s[-1].abs()).tolist()
        scale = _top_scale(values + theta, k)
        order: list[int] = torch.argsort(theta_t, descending=True).tolist()
        new = [i for i in (order if exhausted else order[:k]) if residuals[i] <= tol * scale]
        for i in new:
            residual = residuals[i] if locked is None else None
            found.append((theta[i], basis.T @ s[:, i].to(basis.device), residual))
        pending = [
            (theta[i], basis.T @ s[:, i].to(basis.device), residuals[i])
            for i in order[:k]
            if i not in new
        ]
        if len(found) >= k and (
            k == 1  # a copy of the largest eigenvalue does not change the answer
            or (kth is not None and new and theta[new[0]] <= kth + tol * scale)
            or len(found) == op.size
        ):
            verified = True
            break
    return _checked_pairs(op, found + ([] if verified else pending), k, tol, verified)


def _checked_pairs(
    op: _Hessian,
    candidates: list[tuple[float, Tensor, float | None]],
    k: int,
    tol: float,
    verified: bool,
) -> tuple[list[float], list[Tensor], bool]:
    """The top ``k`` of Lanczos's pairs (NaN where fewer were seen) and whether every one of
    them meets the residual test (``verified``: the search itself ended as it should)."""
    pairs = sorted(candidates, key=lambda pair: -pair[0])[:k]
    while len(pairs) < k:  # out of budget before k pairs were seen
        pairs.append((math.nan, torch.full((op.size,), math.nan, dtype=torch.float64), math.nan))
    converged = verified
    if converged:
        scale = _top_scale([v for v, _, _ in pairs], k)
        for value, vector, residual in pairs:
            if residual is None:
                # found after others were locked: a Ritz pair of the Hessian restricted to
                # their complement, whose residual for the whole Hessian is measured
                residual = float((op(vector) - value * vector).norm())
            if not residual <= tol * scale:
                converged = False
                break
    return [v for v, _, _ in pairs], [x for _, x, _ in pairs], converged


def _top_power(
    op: _Hessian,
    k: int,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
    first: Tensor | None = None,
) -> tuple[list[float], list[Tensor], bool]:
    values: list[float] = []
    vectors: list[Tensor] = []
    all_converged = True
    for _ in range(k):
        found = torch.stack(vectors) if vectors else torch.empty(0, op.size, device=op.device)
        found = found.to(torch.float64)
        if first is not None:
            v, first = first, None
        else:
            v = _orthogonalize(_normal(op.size, gen, op.device), found)
        v = v / v.norm()
        value = 0.0
        converged = False
        for _ in range(max_iter):
            hv, losses_finite = op.apply(v)
            value_t = hv @ v
            # the residual of (value, v) for the whole Hessian, not only its deflated part
            residual_t = (hv - value_t * v).norm()
            w = _orthogonalize(hv, found)
            norm = w.norm()
            # one synchronisation per product
            value, residual, norm_read = _read(
                value_t, residual_t, norm, losses_finite=losses_finite
            )
            scale = max([abs(value), *(abs(x) for x in values), 1e-30])
            if residual <= tol * scale:
                converged = True
                break
            if norm_read == 0.0:
                break
            v = w / norm
        all_converged = all_converged and converged
        values.append(value)
        vectors.append(v)
    order = sorted(range(k), key=lambda i: -values[i])
    return [values[i] for i in order], [vectors[i] for i in order], all_converged


# --------------------------------------------------------------------------- trace
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    samples: int = 100,
    *,
    params: ParamSpec = None,
    batch_norm: str = "eval",
    keep_graphs: bool = True,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimate of the trace of the Hessian of the loss over ``data``.

    :math:`\operatorname{tr} H \approx \frac{1}{S}\sum_{s=1}^{S} v_s^\top H v_s` with Rademacher
    vectors :math:`v_s` (entries :math:`\pm 1`; Hutchinson, 1990), one Hessian-vector product
    each. The standard error is the sample standard deviation of the :math:`v_s^\top H v_s` over
    :math:`\sqrt{S}`. The :math:`v_s^\top H v_s` stay on the model's device until all are
    drawn: a constant number of host synchronisations, whatever ``samples``.

    Args:
        model, loss_fn, data: as for :func:`hessian_eigenvalues`
        samples (int, optional): the number of random vectors, at least 2 (default: 100)
        params, batch_norm, keep_graphs, generator: as for :func:`hessian_eigenvalues`

    Returns:
        TraceEstimate: a ``float`` with ``.stderr`` and ``.samples``.

    Example:
        >>> trace = torchsam.sharpness.hessian_trace(model, loss_fn, loader, samples=50)
        >>> print(f"{trace:.2f} ± {trace.stderr:.2f}")
    """
    samples = _check_positive_int("samples", samples)
    if samples < 2:
        raise ValueError("samples must be at least 2 to estimate a standard error")
    chosen, fixed = _prepare(model, loss_fn, data, params)
    gen = random_generator(generator)
    with measuring(model, batch_norm):
        try:
            op = _Hessian(model, loss_fn, fixed, chosen, keep_graphs)
            # v^T H v of every sample stays on the device: one synchronisation in all
            draws = torch.empty(samples, dtype=torch.float64, device=op.device)
            losses_finite: Tensor | None = None
            # parameters of one dtype and device: each vector is drawn in their dtype and used
            # in place (views), v^T H v summed in float64 (v_i H v_i is exact: v_i = +-1)
            like = {(p.dtype, p.device) for p in chosen}
            for i in range(samples):
                if len(like) == 1:
                    v = _rademacher(op.size, gen, chosen[0].device, chosen[0].dtype)
                    pieces = [x.view_as(p) for x, p in zip(v.split(op.numels), chosen, strict=True)]
                    parts, finite = op.apply_parts(pieces)
                    hv = torch.cat([h.reshape(-1) for h in parts])
                    draws[i] = (hv * v).sum(dtype=torch.float64)
                else:
                    v = _rademacher(op.size, gen, op.device)
                    hv, finite = op.apply(v)
                    draws[i] = hv @ v
                if finite is not None:
                    losses_finite = finite if losses_finite is None else losses_finite & finite
            values = torch.tensor(_read(draws, losses_finite=losses_finite), dtype=torch.float64)
        except _NotFinite as error:
            not_finite(error.what)
            return TraceEstimate(math.nan, math.nan, samples)
    stderr = float(values.std(unbiased=True)) / math.sqrt(samples)
    return TraceEstimate(float(values.mean()), stderr, samples)


# --------------------------------------------------------------------------- spectrum
def hessian_spectrum(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    steps: int = 100,
    runs: int = 1,
    points: int = 10_000,
    sigma_squared: float = 1e-5,
    margin: float = 0.01,
    params: ParamSpec = None,
    batch_norm: str = "eval",
    keep_graphs: bool = True,
    generator: torch.Generator | None = None,
) -> HessianSpectrum:
    r"""The spectral density of the Hessian by stochastic Lanczos quadrature.

    Ghorbani, Krishnan and Xiao, "An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density", ICML 2019, Sec. 3 and Algorithm 1: for each of ``runs`` Rademacher
    start vectors :math:`v`, ``steps`` Lanczos steps (with full reorthogonalisation) give a
    tridiagonal :math:`T = U \Theta U^\top`; the Ritz values :math:`\theta_i` are the nodes
    and :math:`\tau_i = U_{1i}^2` the weights of a Gauss quadrature for the spectral measure of
    :math:`v`. The density on ``grid`` is

    .. math:: \phi(t) = \frac{1}{R}\sum_{r}\sum_i \tau^{(r)}_i\,
        \mathcal{N}(t;\, \theta^{(r)}_i,\, \sigma^2),

    with :math:`\sigma^2` = ``sigma_squared`` times ``max(1, width of the spectrum)``, on
    ``points`` equally spaced points from the smallest node minus ``margin`` to the largest
    plus ``margin``, normalised to integrate to 1 there (the sum of the density times the
    grid's spacing is 1; the conventions of PyHessian's example). A grid that would have zero
    width (one distinct node and ``margin=0``, as with ``steps=1``) extends 6 standard deviations
    of the kernel on each side of the node instead. A run stops early if its Krylov space is
    exhausted (then the quadrature is exact).

    Args:
        model, loss_fn, data: as for :func:`hessian_eigenvalues`
        steps (int, optional): Lanczos steps per run (default: 100)
        runs (int, optional): number of random start vectors (default: 1)
        points (int, optional): number of grid points (default: 10000)
        sigma_squared (float, optional): relative variance of the Gaussian kernel
            (default: 1e-5)
        margin (float, optional): extension of the grid beyond the nodes (default: 0.01)
        params, batch_norm, keep_graphs, generator: as for :func:`hessian_eigenvalues`

    Returns:
        HessianSpectrum: ``nodes`` and ``weights`` per run, ``grid`` and ``density``.

    Example:
        >>> spectrum = torchsam.sharpness.hessian_spectrum(model, loss_fn, loader, steps=80)
        >>> plt.semilogy(spectrum.grid, spectrum.density + 1e-7)
    """
    steps = _check_positive_int("steps", steps)
    runs = _check_positive_int("runs", runs)
    points = _check_positive_int("points", points)
    if points < 2:
        raise ValueError("points must be at least 2")
    for name, value in (("sigma_squared", sigma_squared), ("margin", margin)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not sigma_squared > 0:
        raise ValueError("sigma_squared must be positive")
    chosen, fixed = _prepare(model, loss_fn, data, params)
    gen = random_generator(generator)
    all_nodes: list[Tensor] = []
    all_weights: list[Tensor] = []
    with measuring(model, batch_norm):
        try:
            op = _Hessian(model, loss_fn, fixed, chosen, keep_graphs)
            for _ in range(runs):
                start = _rademacher(op.size, gen, op.device)
                t, _, _, _ = _lanczos(op, start, steps)
                theta, s = torch.linalg.eigh(t)
                all_nodes.append(theta)
                all_weights.append(s[0] ** 2)
        except _NotFinite as error:
            not_finite(error.what)
            nan = torch.full((runs, 1), math.nan, dtype=torch.float64)
            flat = torch.full((points,), math.nan, dtype=torch.float64)
            return HessianSpectrum(nodes=nan, weights=nan.clone(), grid=flat, density=flat.clone())
    width = max(len(n) for n in all_nodes)
    nodes = torch.full((runs, width), float("nan"), dtype=torch.float64)
    weights = torch.zeros(runs, width, dtype=torch.float64)
    for r, (theta, tau) in enumerate(zip(all_nodes, all_weights, strict=True)):
        nodes[r, : len(theta)] = theta
        weights[r, : len(tau)] = tau
    grid, density = _smooth(all_nodes, all_weights, points, sigma_squared, margin)
    return HessianSpectrum(nodes=nodes, weights=weights, grid=grid, density=density)


def plot_spectrum(
    spectrum: HessianSpectrum,
    *,
    path: str | Path | None = None,
    title: str | None = None,
    log: bool = True,
) -> Figure:
    """Plot a :class:`HessianSpectrum`'s density (needs ``pip install "torchsam[plot]"``).

    ``log=True`` (the default, as in Ghorbani et al.) draws the density on a logarithmic axis,
    with 1e-7 added so that empty stretches stay on the plot. ``path`` saves a PNG.

    Returns:
        matplotlib.figure.Figure
    """
    from torchsam import _landscape_plot

    return _landscape_plot.plot_spectrum(spectrum, path=path, title=title, log=log)


def _smooth(
    nodes: Sequence[Tensor],
    weights: Sequence[Tensor],
    points: int,
    sigma_squared: float,
    margin: float,
) -> tuple[Tensor, Tensor]:
    low = min(float(n.min()) for n in nodes) - margin
    high = max(float(n.max()) for n in nodes) + margin
    var = sigma_squared * max(1.0, high - low)
    if not high > low:
        # a grid of zero width (one distinct node and margin=0): widen it to 6 standard
        # deviations on each side of the node, where the density is 1.5e-8 of its peak
        middle = (low + high) / 2
        low, high = middle - 6 * math.sqrt(var), middle + 6 * math.sqrt(var)
    grid = torch.linspace(low, high, points, dtype=torch.float64)
    density = torch.zeros(points, dtype=torch.float64)
    for theta, tau in zip(nodes, weights, strict=True):
        diff = grid[:, None] - theta[None, :]
        kernel = torch.exp(-(diff**2) / (2 * var)) / math.sqrt(2 * math.pi * var)
        density += kernel @ tau
    density /= len(nodes)
    total = float(density.sum()) * float(grid[1] - grid[0])
    if total > 0:
        density /= total
    return grid, density


# --------------------------------------------------------------------------- SAM sharpness
def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    rho: float = 0.05,
    adaptive: bool = False,
    steps: int = 1,
    *,
    m: int | None = None,
    eta: float = 0.0,
    params: ParamSpec = None,
    batch_norm: str = "eval",
    generator: torch.Generator | None = None,
) -> float:
    r"""The loss increase at SAM's worst point of the ``rho``-ball: :math:`L(w + e) - L(w)`.

    With ``steps=1`` the perturbation is exactly SAM's first-order one over the whole of
    ``data`` (Foret et al., ICLR 2021, Eq. 2), :math:`e = \rho\, g / (\lVert g \rVert + 10^{-12})`
    with :math:`g = \nabla L(w)`, and with ``adaptive=True`` ASAM's (Kwon et al., ICML 2021,
    Eq. 12), :math:`e = \rho\, T^2 g / (\lVert T g \rVert + 10^{-12})`, :math:`T = |w| + \eta`:
    the same :math:`e` that ``torchsam.SAM`` applies.

    More ``steps`` refine :math:`e` by projected normalised gradient ascent in the ball
    :math:`\lVert T^{-1} e \rVert \le \rho` (:math:`T = 1` without ``adaptive``): in the
    coordinates :math:`u = T^{-1} e`, each step is
    :math:`u \leftarrow \Pi_\rho(u + \rho\, \hat{d})` with :math:`d = T \nabla L(w + T u)` and
    :math:`\Pi_\rho` the projection on the ball; step 1 from :math:`u = 0` is SAM's. The result
    is the largest loss increase among the iterates, so it never decreases with ``steps``.
    Each step costs one forward and backward pass over ``data``, plus one forward pass at the
    end.

    With ``m`` (m-sharpness, Foret et al. Sec. 4.1), every batch is cut into chunks of ``m``
    samples (the last may be smaller); each chunk gets its own perturbation from its own
    gradient and the result is the sample-weighted mean of the chunks' sharpness. This needs
    ``inputs`` and ``targets`` to be tensors.

    Args:
        model, loss_fn, data: as for :func:`hessian_eigenvalues`
        rho (float, optional): radius of the ball (default: 0.05)
        adaptive (bool, optional): ASAM's scale-invariant ball (default: False)
        steps (int, optional): ascent steps (default: 1)
        m (int, optional): chunk size for m-sharpness (default: None, the whole of ``data``)
        eta (float, optional): ASAM's offset in :math:`T = |w| + \eta` (default: 0.0)
        params (optional): the parameters to perturb (default: all that require a gradient)
        batch_norm (str, optional): ``"eval"`` or ``"train"`` (default: ``"eval"``)
        generator (torch.Generator, optional): accepted for a uniform signature; the measure
            is deterministic

    Returns:
        float: :math:`\max_t L(w + e_t) - L(w)`.

    Example:
        >>> torchsam.sharpness.sam_sharpness(model, loss_fn, loader, rho=0.05)
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"Invalid rho value: {rho}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be True or False, got {adaptive!r}")
    steps = _check_positive_int("steps", steps)
    if m is not None:
        m = _check_positive_int("m", m)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"Invalid eta value: {eta}")
    if generator is not None:
        random_generator(generator)
    chosen, fixed = _prepare(model, loss_fn, data, params)
    with measuring(model, batch_norm):
        try:
            if m is None:
                return _sharpness(model, loss_fn, fixed, chosen, float(rho), adaptive, steps, eta)
            total = 0.0
            count = 0
            device = model_device(model)
            for inputs, targets, _ in batches(fixed, device):
                if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
                    raise TypeError(
                        "m-sharpness cuts batches into chunks: inputs and targets must be tensors"
                    )
                for x, y in zip(inputs.split(m), targets.split(m), strict=True):
                    n = int(y.shape[0])
                    total += n * _sharpness(
                        model, loss_fn, [(x, y)], chosen, float(rho), adaptive, steps, eta
                    )
                    count += n
            return total / count
        except _NotFinite as error:
            not_finite(error.what)
            return math.nan


def _loss_and_grad(
    model: nn.Module, loss_fn: LossFn, data: Data, params: list[Tensor]
) -> tuple[float, list[Tensor]]:
    grads = [torch.zeros_like(p) for p in params]
    total = 0.0
    count = 0
    for inputs, targets, n in batches(data, model_device(model)):
        loss = batch_loss(model, loss_fn, inputs, targets)
        parts = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, g in zip(grads, parts, strict=True):
            if g is not None:
                acc.add_(g, alpha=n)
        total += float(loss.detach()) * n
        count += n
    return total / count, [g / count for g in grads]


def _sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    params: list[Tensor],
    rho: float,
    adaptive: bool,
    steps: int,
    eta: float,
) -> float:
    base = [p.detach().clone() for p in params]
    scale = [b.abs().add_(eta) for b in base] if adaptive else None
    try:
        loss0, grads = _loss_and_grad(model, loss_fn, data, params)
        u = [torch.zeros_like(b) for b in base]
        best = -math.inf
        for step in range(steps):
            d = [g * t for g, t in zip(grads, scale, strict=True)] if scale is not None else grads
            norm = float(torch.linalg.vector_norm(torch.stack([x.norm() for x in d])))
            if not math.isfinite(loss0) or not math.isfinite(norm):
                raise _NotFinite("the loss or its gradient")
            u = [ui + (rho / (norm + 1e-12)) * di for ui, di in zip(u, d, strict=True)]
            u_norm = float(torch.linalg.vector_norm(torch.stack([x.norm() for x in u])))
            if u_norm > rho:
                u = [ui * (rho / u_norm) for ui in u]
            with torch.no_grad():
                for i, (p, b) in enumerate(zip(params, base, strict=True)):
                    p.copy_(b + (u[i] * scale[i] if scale is not None else u[i]))
            if step + 1 < steps:
                loss, grads = _loss_and_grad(model, loss_fn, data, params)
            else:
                loss = mean_loss(model, loss_fn, data)
            if not math.isfinite(loss):
                raise _NotFinite("the loss at the perturbed weights")
            best = max(best, loss - loss0)
        return best
    finally:
        with torch.no_grad():
            for p, b in zip(params, base, strict=True):
                p.copy_(b)
