"""SAM and adaptive SAM (ASAM)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from torchsam._engine import (
    BaseOptimizerArg,
    GroupView,
    SharpnessAwareOptimizer,
    StepContext,
    real_view,
)
from torchsam._engine import _functional as F

__all__ = ["SAM"]

_NORM_EPS = 1e-12  # added to the gradient norm before dividing, as in the reference code


def check_real(name: str, value: Any, *, low: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name} value: {value!r}; {name} must be a real number")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"Invalid {name} value: {value}; {name} must be finite and >= {low}")


def check_fraction(name: str, value: Any, *, zero_ok: bool, one_ok: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in [0, 1] (ends as allowed)."""
    check_real(name, value)
    if (value == 0 and not zero_ok) or value > 1 or (value == 1 and not one_ok):
        interval = f"{'[' if zero_ok else '('}0, 1{']' if one_ok else ')'}"
        raise ValueError(f"Invalid {name} value: {value}; {name} must be in {interval}")


def check_int(name: str, value: Any, *, low: int | None = 1) -> None:
    """Raise for a value that is not an int (TypeError) or is below ``low`` (ValueError)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name} value: {value!r}; {name} must be an integer")
    if low is not None and value < low:
        raise ValueError(f"Invalid {name} value: {value}; {name} must be an integer >= {low}")


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-Aware Minimization around any base optimizer.

    Each step evaluates the gradient :math:`g = \nabla L(w)`, moves to the approximate worst
    point of the ball of radius :math:`\rho`,

    .. math::
        e(w) = \rho \, \frac{g}{\lVert g \rVert_2 + 10^{-12}},

    evaluates :math:`\nabla L(w + e(w))`, returns to :math:`w` exactly, and lets the base
    optimizer step with that gradient (Foret et al., "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021, Eq. 2 and Algorithm 1).

    With ``adaptive=True`` it is adaptive SAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021, Eq. 12 with
    the elementwise operator :math:`T_w = |w| + \eta`):

    .. math::
        e(w) = \rho \, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2 + 10^{-12}}.

    The operator acts on each real number of the weights: a complex weight counts as its
    real and imaginary parts (``torch.view_as_real``), as ``torch.optim`` treats it. With
    ``eta=0`` this is the formulation of the widely used PyTorch implementation
    (perturbation :math:`\rho\, w^2 g / \lVert |w| g \rVert`); the ASAM paper suggests
    ``rho`` about 10x larger than SAM's (e.g. 0.5 or 2.0).

    The norm is taken over all parameters of all groups together; each group uses its own
    ``rho``, ``adaptive`` and ``eta``.

    Args:
        params (iterable): parameters or dicts defining parameter groups
        base_optimizer (type | callable | Optimizer): the optimizer that takes the actual
            step: a ``torch.optim.Optimizer`` subclass (built on the same param groups with
            ``**kwargs``), a callable returning one, or an already built optimizer over the
            same parameters and groups
        rho (float, optional): radius of the neighbourhood (default: 0.05)
        adaptive (bool, optional): use adaptive SAM (default: False)
        eta (float, optional): ASAM's offset in :math:`T_w = |w| + \eta` (default: 0.0)
        skip_nonfinite (bool, optional): check every gradient of a step and skip the step
            (with a warning) when one is inf or NaN, at the cost of one host synchronisation
            per step; False: no check and no synchronisation at all (which capturing the step
            in a CUDA graph requires), and a non-finite gradient reaches the weights as it would
            with the base optimizer alone (``second_step(grad_scaler=...)`` still skips an
            overflowing step) (default: True)
        **kwargs: passed to ``base_optimizer`` when it is built here (``lr``, ``momentum``,
            ...). ``foreach`` is read by both: ``foreach=False`` selects the per-tensor
            kernels of SAM and of the base optimizer; by default SAM uses the multi-tensor
            (``torch._foreach_*``) kernels.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)

    Notes:
        * The weights return to ``w`` bit-exactly (copied back, not subtracted), using one
          persistent buffer per parameter: no parameter-sized allocation per step after the
          first (for ``adaptive=False``).
        * The gradient norm and the scale :math:`\rho / (\lVert g \rVert + 10^{-12})` stay on
          the device: ``first_step`` does not synchronise. The step's one host
          synchronisation is ``second_step``'s decision to skip the base step because a
          gradient (at ``w`` or at ``w + e``) is not finite (with a warning; the weights stay
          at ``w``); ``skip_nonfinite=False`` removes it.
        * ``state_dict()`` holds the base optimizer's state (momentum, Adam moments) too.
    """

    #: SAM's and ASAM's step changes only what the base step changes: with a fused base
    #: optimizer the skip of a non-finite step stays on the device (not inherited)
    device_skip: ClassVar[bool] = True
    #: A variant's own per-group hyper-parameters (saved in the param groups, may differ per
    #: group and be scheduled), with their defaults; keyword-only arguments of its constructor.
    hyperparameters: ClassVar[dict[str, Any]] = {}
    #: A variant's optimizer-wide options (read as attributes of the optimizer, kept in every
    #: param group), with their defaults; keyword-only arguments of its constructor, validated
    #: in :meth:`check_options`.
    options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerArg,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.0,
        skip_nonfinite: bool = True,
        **kwargs: Any,
    ) -> None:
        own = dict(rho=rho, adaptive=adaptive, eta=eta, skip_nonfinite=skip_nonfinite)
        for name, default in {**self.hyperparameters, **self.options}.items():
            own[name] = kwargs.pop(name, default)
        super().__init__(params, base_optimizer, own, kwargs)

    # Options are optimizer-wide but kept, like the hyper-parameters, in every param group (the
    # same value in each), so that every checkpoint format carries them; ``self.k`` reads them.
    def __getattr__(self, name: str) -> Any:
        source = self.__dict__.get("_option_source")
        if source is None and self.__dict__.get("param_groups"):
            source = self.__dict__["param_groups"][0]
        if name in type(self).options and source is not None:
            return source[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).options and "param_groups" in self.__dict__:
            groups = self.param_groups
            self._check_groups([{**g, name: value} for g in groups])
            for group in groups:
                group[name] = value
        else:
            super().__setattr__(name, value)

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        for name in ("skip_nonfinite", *type(self).options):
            values = [g[name] for g in groups]
            if any(v != values[0] or type(v) is not type(values[0]) for v in values):
                raise ValueError(
                    f"{name} is an option of the whole {type(self).__name__} optimizer; it "
                    f"cannot differ between param groups (got {values})"
                )
        self.__dict__["_option_source"] = groups[0]
        try:
            self.check_options()
        finally:
            del self.__dict__["_option_source"]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each variant the true signature: SAM's plus its own keyword-only arguments.

        A class whose constructor is not SAM's (a user's subclass that writes ``__init__``, or a
        subclass of one) keeps the signature of that constructor.
        """
        super().__init_subclass__(**kwargs)
        constructor = next(c for c in cls.__mro__ if "__init__" in vars(c))
        if constructor is not SAM:
            # None (not inherited from the parent) makes inspect read the constructor itself.
            cls.__signature__ = None  # type: ignore[attr-defined]
            return
        base = list(inspect.signature(SAM.__init__).parameters.values())[1:]  # without self
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
            for name, default in {**cls.hyperparameters, **cls.options}.items()
        ]
        cls.__signature__ = inspect.Signature([*base[:-1], *extra, base[-1]])  # type: ignore[attr-defined]

    def check_options(self) -> None:
        """Raise ``ValueError``/``TypeError`` for an invalid option; none for SAM itself."""

    def check_group(self, group: dict[str, Any]) -> None:
        check_real("rho", group["rho"])
        check_real("eta", group["eta"])
        if not isinstance(group["adaptive"], bool):
            raise TypeError(f"adaptive must be True or False, got {group['adaptive']!r}")
        if not isinstance(group["skip_nonfinite"], bool):
            raise TypeError(
                f"skip_nonfinite must be True or False, got {group['skip_nonfinite']!r}"
            )

    def perturb(self, ctx: StepContext) -> None:
        """``e = radius * d / (||d|| + 1e-12)`` (ASAM: ``radius * T^2 d / (||T d|| + 1e-12)``)
        with the direction ``d`` of :meth:`ascent_direction` and the norm over all groups."""
        # Per group: the vectors whose joint norm normalises the step, and the ASAM operator.
        directions: list[tuple[list[Tensor], list[Tensor] | None]] = []
        for v in ctx.views:
            d = self.ascent_direction(v)
            if v.group["adaptive"]:
                directions.append(_adaptive(v.params, d, v.group["eta"], v.foreach))
            else:
                directions.append((d, None))
        norm = ctx.norm([d for d, _ in directions])
        ctx.flag_first_norm(norm)
        # The scale stays on the device, as the seed's (rho / (norm + eps)). A non-finite norm
        # (the step will be skipped) leaves the weights as they are, decided on the device, so
        # that the second pass runs at w exactly (see F.perturb_).
        denominator = norm + _NORM_EPS
        nonfinite = None
        if ctx.skip_nonfinite:
            denominator = torch.nan_to_num(denominator, nan=math.inf, posinf=math.inf)
            nonfinite = F.nonfinite_flag(norm)
        for v, (d, t) in zip(ctx.views, directions, strict=True):
            ctx.save_weights(v)
            radius = self.radius(v.group)
            if v.group.get("maximize", False):
                radius = -radius  # the "worst" point of a maximised objective is downhill
            scale = radius / denominator
            if t is not None:  # ASAM: d = T g becomes T^2 g (d is a temporary)
                _mul_(d, t, v.foreach)
            for i, (params, part) in enumerate(zip(v.split(v.params), v.split(d), strict=True)):
                device = params[0].device
                if nonfinite is None:
                    F.addcmul_(params, part, scale.to(device), v.foreach)
                else:
                    on_device = (scale.to(device), nonfinite.to(device))
                    F.perturb_(v, i, params, part, *on_device, normed=t is None)

    # Shared by the variants that perturb along a moving average of the gradient.
    def gradient_ema(self, view: GroupView, key: str) -> list[Tensor | None]:
        """The per-parameter gradient EMA kept under ``key`` (None where there is none yet)."""
        return [self.own_state[p].get(key) for p in view.params]

    def update_gradient_ema(
        self, ctx: StepContext, key: str, new_weight: Callable[[dict[str, Any]], float]
    ) -> None:
        """``ema = (1 - a) * ema + a * g`` with ``a = new_weight(group)``; ``ema = g`` at first.

        Computed now, from the gradients at ``w``, into scratch buffers, and committed to the
        state (``ctx.defer``) once the step's gradients are known to be finite (a skipped step
        leaves the state as it was).
        """
        for v in ctx.views:
            foreach = v.foreach
            weight = new_weight(v.group)
            following = ctx.scratch(v, "next " + key)
            emas = self.gradient_ema(v, key)
            if all(m is not None for m in emas):
                F.copy_(following, cast(list[Tensor], emas), foreach)
                F.lerp_(following, v.grads, weight, foreach)
            else:
                for nxt, g, m in zip(following, v.grads, emas, strict=True):
                    if m is None:
                        nxt.copy_(g)
                    else:
                        nxt.copy_(m).lerp_(g, weight)
            ctx.defer(partial(self._commit_ema, v.params, following, key, foreach))

    def _commit_ema(
        self, params: list[Tensor], following: list[Tensor], key: str, foreach: bool
    ) -> None:
        targets, sources = [], []
        for p, nxt in zip(params, following, strict=True):
            m = self.own_state[p].get(key)
            if m is None:
                self.own_state[p][key] = nxt.clone()
            else:
                targets.append(m)
                sources.append(nxt)
        if targets:
            F.copy_(targets, sources, foreach)


# --------------------------------------------------------------------- kernels
def _adaptive(
    params: list[Tensor], direction: list[Tensor], eta: float, foreach: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """ASAM's ``T d`` and ``T = |w| + eta``, elementwise on the real views."""
    if any(p.is_complex() for p in params):
        real_td, real_t = _adaptive(
            [real_view(p) for p in params], [real_view(d) for d in direction], eta, foreach
        )
        # T d as the parameters' type; T stays real (see _mul_)
        return [
            torch.view_as_complex(x) if p.is_complex() else x
            for x, p in zip(real_td, params, strict=True)
        ], real_t
    if foreach:
        t = torch._foreach_abs(params)
        if eta:
            torch._foreach_add_(t, eta)
        return list(torch._foreach_mul(t, direction)), list(t)
    ts = [p.abs().add_(eta) if eta else p.abs() for p in params]
    return [ti * d for ti, d in zip(ts, direction, strict=True)], ts


def _mul_(tensors: list[Tensor], others: list[Tensor], foreach: bool) -> None:
    tensors = [real_view(a) for a in tensors]  # ASAM's T acts on a complex d's real numbers
    if foreach:
        torch._foreach_mul_(tensors, others)
    else:
        for a, b in zip(tensors, others, strict=True):
            a.mul_(b)
