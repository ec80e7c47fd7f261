"""Momentum-SAM: the perturbation follows the base optimizer's momentum (one pass per step)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchsam._engine import (
    BaseOptimizerArg,
    GroupView,
    SharpnessAwareOptimizer,
    StepContext,
    group_foreach,
)
from torchsam._engine import _functional as F
from torchsam._engine._layout import same_objects, split_by_device_and_dtype

__all__ = ["MomentumSAM"]

_NORM_EPS = 1e-12  # added to the momentum's norm before dividing, as the authors do
#: per group: the parameters perturbed, their saved w, their momenta, the group
_Perturbed = tuple[list[Tensor], list[Tensor], list[Tensor], dict[str, Any]]
#: a group's 0-dim factor (of the perturbation, or of the decay's correction) in each dtype
#: of its parameters: a group that mixes dtypes (float16 weights, float32 normalisation) takes
#: each dtype's own rounding of it, never the first parameter's
_Scale = dict[torch.dtype, Tensor]
#: the rho of the perturbation the weights are at, per param group (saved with the groups)
_APPLIED_RHO = "sam_perturbed_rho"
_TRAIN_MODE = "train_mode"  # the mode, in the wide state (every param group: "sam_train_mode")

#: where a ``torch.optim`` class keeps the momentum that MomentumSAM follows (the first
#: entry of a base optimizer's class hierarchy found here decides)
MOMENTUM_KEYS: dict[type[Optimizer], str] = {
    torch.optim.SGD: "momentum_buffer",
    torch.optim.RMSprop: "momentum_buffer",
    torch.optim.Adam: "exp_avg",
    torch.optim.AdamW: "exp_avg",
    torch.optim.NAdam: "exp_avg",
    torch.optim.RAdam: "exp_avg",
    torch.optim.Adamax: "exp_avg",
}


class MomentumSAM(SharpnessAwareOptimizer):
    r"""Momentum-SAM: SAM along the base optimizer's momentum, at the cost of the base optimizer.

    Becker, Altrock and Risse, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead", arXiv 2401.12033 (2024), Algorithm 1. Between steps the weights
    sit at the perturbed point

    .. math::
        \tilde w = w - \rho \, \frac{v}{\lVert v \rVert_2 + 10^{-12}},

    where :math:`v` is the base optimizer's momentum (SGD's ``momentum_buffer``, Adam's and
    AdamW's first moment ``exp_avg``), i.e. a step of length :math:`\rho` towards where the
    base optimizer is heading. One step takes the gradient :math:`g = \nabla L(\tilde w)` (one
    forward/backward pass, the user's), moves the weights back to :math:`w` exactly, lets the
    base optimizer step from :math:`w` with :math:`g`, and perturbs again along the new
    momentum. Before the momentum exists (the first step) there is no perturbation.

    Because the weights are perturbed between steps, the optimizer has a training and an
    evaluation mode, as schedule-free optimizers do: :meth:`eval` moves the weights to
    :math:`w` (for evaluating, checkpointing or exporting the model), :meth:`train` moves
    them back to :math:`\tilde w`. Both are safe to call twice; :meth:`step` in evaluation
    mode raises. The mode is saved in the param groups.

    Args:
        params (iterable): parameters or dicts defining parameter groups
        base_optimizer (type | callable | Optimizer): the optimizer that takes the actual
            step, as for :class:`torchsam.SAM`; it must keep a momentum (SGD with
            ``momentum > 0``, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop with
            ``momentum > 0``, or any optimizer with ``momentum_key``)
        rho (float, optional): the length of the perturbation (default: 0.5). The authors
            use much larger values than SAM's 0.05 (0.3 to 3 in their experiments); the
            default is the value that held on every task of ``benchmarks/sweep_defaults.py``
            (see the notes)
        momentum_key (str, optional): the key of the base optimizer's per-parameter state
            that holds the momentum; needed only for a base optimizer that is not one of the
            ``torch.optim`` classes above (default: None)
        authors_weight_decay (bool, optional): apply the base optimizer's weight decay where
            the authors' code applies it (see the notes); False: where the base optimizer
            applies it, at :math:`w` (default: True)
        skip_nonfinite (bool, optional): skip a step (with a warning) whose gradient is inf or
            NaN: the weights, the momentum and the perturbation stay as they were, at the cost
            of one host synchronisation per step (default: True)
        **kwargs: passed to ``base_optimizer`` when it is built here (``lr``, ``momentum``,
            ``weight_decay``, ...)

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.5,
        ...                         lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     optimizer.step()
        >>> optimizer.eval()  # the weights are at w: evaluate, save
        >>> optimizer.train()  # back to the perturbed weights before the next step

    Notes:
        * Weight decay is applied where the authors apply it (``authors_weight_decay=True``,
          the default), through the base optimizer's own ``weight_decay``: the coupled decay
          of ``torch.optim.SGD`` (and of Adam, NAdam, RAdam, Adamax and RMSprop, which add
          :math:`\lambda w` to the gradient) is taken at the perturbed point, where the
          gradient is: the base optimizer steps with :math:`g + \lambda \tilde w`, as the
          authors' SGD code does; the decoupled decay of ``torch.optim.AdamW`` (and of Adam,
          NAdam and RAdam with ``decoupled_weight_decay=True``) shrinks :math:`w` after the
          base update, :math:`w \leftarrow (w - \eta u)(1 - \eta\lambda)`, as the authors'
          AdamW code does (``torch.optim.AdamW`` shrinks before its update). Both are tested
          equal to float64 transcriptions of the authors' code. MomentumSAM corrects the base
          optimizer's step by the difference (for the coupled decay, :math:`\lambda (\tilde
          w - w)` is added to the gradient the base optimizer sees; for the decoupled one,
          :math:`w` is rescaled after the base step), so ``weight_decay`` stays the base
          optimizer's hyper-parameter, per group and schedulable; the results agree with the
          authors' to rounding. ``authors_weight_decay=False`` leaves the decay where the
          base optimizer applies it, at :math:`w`. A base optimizer that is not one of the
          ``torch.optim`` classes above (nor a subclass) decays where it decays itself.
          Without weight decay the two settings are the same, bit for bit.
        * The norm is taken over the momentum of every parameter that has one, in all groups
          together; each group uses its own ``rho``. A parameter without a gradient on a step
          keeps its momentum and :math:`w`, and is perturbed with the step's common scale.
        * ``state_dict()`` holds the base optimizer's state (the momentum), torchsam's own
          state (``"sam.w"``, the unperturbed weights of each stepped parameter) and, in the
          param groups, ``rho``, ``authors_weight_decay``, the step count, the mode and the
          ``rho`` of the perturbation the weights are at (``"sam_perturbed_rho"``). The
          model's own state dict holds the weights as they are: :math:`w` in evaluation mode,
          :math:`\tilde w` in training mode. Save and load the model and the optimizer
          together; resuming is bit-exact in both modes.
        * The default ``rho`` comes from ``benchmarks/sweep_defaults.py --knobs "MomentumSAM
          rho"``: six small CPU tasks (an MLP and a CNN with BatchNorm; SGD with momentum and
          AdamW; noisy and clean labels), 3 seeds each. Gain in test accuracy over the base
          optimizer alone, in points (mean over seeds), on the worst task and on average:

          ====  ==========  =====  ===================
          rho   worst task  mean   collapsed runs
          ====  ==========  =====  ===================
          0.05  -1.8        -0.5   0/18
          0.2   -2.3        -0.4   0/18
          0.5   -0.6        +1.2   0/18
          0.7   -1.5        +1.6   0/18
          1     -3.1        +2.2   0/18
          3     -87.3       -11.2  3/18 (a CNN at 10%)
          ====  ==========  =====  ===================

          Of the radii that gained on average, 0.5 lost least on its worst task (a CNN at the
          edge of stability, within the seeds' spread); larger radii gain more on noisy labels
          and cost more on that CNN.
        * BatchNorm's running statistics are accumulated at :math:`\tilde w` (the one forward
          pass of a step), as in the authors' code.
        * Gradient clipping, accumulation, LR schedulers, ``torch.amp.GradScaler`` (it unscales
          and skips an overflowing step as for any optimizer) and DDP (the one backward
          all-reduces the gradients; every rank then holds the same momentum and perturbation)
          work as with the base optimizer alone (each tested). There is no
          ``first_step``/``second_step``. FSDP2, a ``torch.compile``-d model, CPU autocast,
          PyTorch Lightning's automatic optimisation and the plain Hugging Face ``Trainer``
          are tested with it (``docs/family.md`` says how); ``SAMTrainer`` and
          ``LocalPerturbation``, which drive the two-pass step, refuse it.
    """

    hyperparameters: ClassVar[dict[str, Any]] = {"rho": 0.5}
    options: ClassVar[dict[str, Any]] = {"authors_weight_decay": True}
    no_two_call_style: ClassVar[str | None] = (
        "it takes one forward/backward pass per step: call loss.backward() and then step()"
    )
    #: ``GradScaler.step`` unscales the gradients and skips an overflowing step itself, as for
    #: any one-pass optimizer
    _step_supports_amp_scaling = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: BaseOptimizerArg,
        rho: float = 0.5,
        *,
        momentum_key: str | None = None,
        authors_weight_decay: bool = True,
        skip_nonfinite: bool = True,
        **kwargs: Any,
    ) -> None:
        if momentum_key is not None and not isinstance(momentum_key, str):
            raise TypeError(f"momentum_key must be a str or None, got {momentum_key!r}")
        own = {
            "rho": rho,
            "authors_weight_decay": authors_weight_decay,
            "skip_nonfinite": skip_nonfinite,
        }
        #: per group, what the last perturbation applied: (group, params, momenta, scale)
        self._applied: list[tuple[dict[str, Any], list[Tensor], list[Tensor], _Scale]] | None
        self._applied = None
        #: during :meth:`step`, the perturbed groups found before the base step
        self._step_groups: list[_Perturbed] | None = None
        super().__init__(params, base_optimizer, own, kwargs)
        self.momentum_key = _momentum_key(self.base_optimizer, momentum_key)
        #: whether the base optimizer is (a subclass of) one of the ``torch.optim`` classes of
        #: ``MOMENTUM_KEYS``, whose weight decay MomentumSAM knows how to move
        self._known_decay = any(cls in MOMENTUM_KEYS for cls in type(self.base_optimizer).__mro__)
        for group in self.param_groups:
            self._check_momentum(group)
        if self.wide_state.get(_TRAIN_MODE) is None:
            self.wide_state[_TRAIN_MODE] = True

    # ------------------------------------------------------------------ validation
    def check_group(self, group: dict[str, Any]) -> None:
        rho = group["rho"]
        if isinstance(rho, bool) or not isinstance(rho, (int, float)):
            raise ValueError(f"Invalid rho value: {rho!r}; rho must be a real number")
        if not math.isfinite(rho) or rho < 0:
            raise ValueError(f"Invalid rho value: {rho}; rho must be finite and >= 0")
        if not isinstance(group["authors_weight_decay"], bool):
            raise TypeError(
                f"authors_weight_decay must be True or False, got {group['authors_weight_decay']!r}"
            )
        if not isinstance(group["skip_nonfinite"], bool):
            raise TypeError(
                f"skip_nonfinite must be True or False, got {group['skip_nonfinite']!r}"
            )
        if "momentum_key" in self.__dict__:  # after construction: a group added or loaded
            self._check_momentum(group)

    def _check_momentum(self, group: dict[str, Any]) -> None:
        momentum = group.get("momentum", self.base_optimizer.defaults.get("momentum", 0))
        if self.momentum_key == "momentum_buffer" and momentum == 0:
            raise ValueError(
                f"MomentumSAM follows the base optimizer's momentum, but "
                f"{type(self.base_optimizer).__name__} has momentum={momentum} in a param "
                "group, so it keeps none: pass momentum > 0 (e.g. momentum=0.9)"
            )

    def _check_groups(self, groups: list[dict[str, Any]]) -> None:
        values = [g["skip_nonfinite"] for g in groups]
        if any(v != values[0] for v in values):
            raise ValueError(
                "skip_nonfinite is an option of the whole MomentumSAM optimizer; it cannot "
                f"differ between param groups (got {values})"
            )

    # ------------------------------------------------------------------ the mode
    @property
    def training(self) -> bool:
        """True in training mode (the weights at :math:`\\tilde w`), False after :meth:`eval`."""
        return bool(self.wide_state.get(_TRAIN_MODE, True))

    @torch.no_grad()
    def eval(self) -> None:
        """Move the weights to :math:`w`, for evaluation and checkpointing (nothing if they are
        there already)."""
        if self.training:
            self._to_w()
            self._applied = None
            self.wide_state[_TRAIN_MODE] = False

    @torch.no_grad()
    def train(self) -> None:
        """Move the weights back to :math:`\\tilde w`, for training (nothing if they are there
        already). The weights as they are in evaluation mode are taken as :math:`w`."""
        if not self.training:
            self._perturb()
            self.wide_state[_TRAIN_MODE] = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torchsam.SAM.load_state_dict`; the ``rho`` each group was perturbed with
        is part of the groups, so the next step's decay is taken where the weights are."""
        super().load_state_dict(state_dict)
        self._applied = None  # the groups and momentum tensors are new

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`torchsam.SAM.add_param_group`."""
        super().add_param_group(param_group)
        self._applied = None

    # ------------------------------------------------------------------ the step
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step with the gradients at :math:`\\tilde w` (one forward/backward pass).

        Args:
            closure (Callable, optional): clears the gradients, computes the loss, calls
                ``backward()`` and returns the loss; evaluated once (default: None: the
                gradients are those of the user's own backward pass)

        Returns:
            the loss returned by the closure, or None.
        """
        if not self.training:
            raise RuntimeError(
                "MomentumSAM.step() was called in evaluation mode (the weights are at w, not at "
                "the perturbed point): call optimizer.train() before training, and "
                "optimizer.eval() again before evaluating or saving"
            )
        self.require_idle("step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.begin_step(zero_grad=False, user_backward=True)
        ctx = self.step_context
        views = [] if ctx is None else ctx.views
        # the perturbed parameters, found once for the restore and the decay (nothing
        # changes them before the base step; the perturbation after it finds them again)
        self._step_groups = self._perturbed_groups()
        try:
            self._to_w(self._step_groups)
            self.finish_step(own_closure=True)
        finally:
            self._step_groups = None
            self._perturb(views)
        return loss

    def second_pass_due(self) -> bool:
        """Never: the one gradient of a step is taken at the perturbed point."""
        return False

    # ------------------------------------------------------------------ the perturbation
    def _perturbed_groups(self, new_w: bool = False) -> list[_Perturbed]:
        """Per group, the parameters that have a saved ``w`` and a momentum: (params, w,
        momentum, group). ``new_w``: first give a parameter with a momentum and no ``w`` yet
        an (uninitialised) one."""
        out = []
        base_state = self.base_optimizer.state
        own_state = self.own_state
        for group in self.param_groups:
            params, ws, vs = [], [], []
            for p in group["params"]:
                v = base_state.get(p, {}).get(self.momentum_key)
                own = own_state.get(p)
                w = None if own is None else own.get("w")
                if w is None and new_w and isinstance(v, Tensor):
                    w = own_state[p]["w"] = torch.empty_like(p)
                if w is not None and isinstance(v, Tensor):
                    params.append(p)
                    ws.append(w)
                    vs.append(v)
            if params:
                out.append((params, ws, vs, group))
        return out

    def _to_w(self, groups: list[_Perturbed] | None = None) -> None:
        """Move the weights to ``w``, exactly (a copy of the saved ``w``); ``groups``: those
        of :meth:`_perturbed_groups`, when the caller has them."""
        for params, ws, _, group in self._perturbed_groups() if groups is None else groups:
            F.copy_(params, ws, group_foreach(group))

    def _perturb(self, views: list[GroupView] | None = None) -> None:
        """``w = p`` for every parameter with a momentum, then ``p = w - rho v / (||v|| + eps)``
        with the norm over all of them (on the device, no synchronisation). ``views``: those
        of the step just taken, whose cached layouts tell the groups' devices."""
        groups = self._perturbed_groups(new_w=True)
        for params, ws, _, group in groups:
            F.copy_(ws, params, group_foreach(group))
        scales = self._scales(groups)
        for (params, _, vs, group), scale in zip(groups, scales, strict=True):
            splits = _splits(params, group, views or [])
            _addcmul(params, vs, scale, group_foreach(group), splits)
            group[_APPLIED_RHO] = group["rho"]
        # what was applied, for the weight decay of the next step (see _applied_scales)
        self._applied = [
            (group, params, vs, scale)
            for (params, _, vs, group), scale in zip(groups, scales, strict=True)
        ]

    def _applied_scales(self, groups: list[_Perturbed]) -> list[_Scale]:
        """The factors of the perturbation the weights are at: those the last :meth:`_perturb`
        applied when it perturbed these same parameters along these same momentum tensors
        (``w~ - w = scale * v`` even if ``rho`` was changed since), else computed again from
        the momentum with the ``rho`` each group was perturbed with (saved in the groups, so
        also after :meth:`load_state_dict`)."""
        applied = self._applied
        if applied is not None and len(applied) == len(groups):
            same = all(
                group is g[3] and same_objects(params, g[0]) and same_objects(vs, g[2])
                for (group, params, vs, _), g in zip(applied, groups, strict=True)
            )
            if same:
                return [scale for *_, scale in applied]
        return self._scales(groups, applied=True)

    def _scales(self, groups: list[_Perturbed], applied: bool = False) -> list[_Scale]:
        """Per group of ``groups`` (from :meth:`_perturbed_groups`), the 0-dim factor
        ``-rho / (||v|| + eps)`` of the perturbation in each dtype of the group's parameters
        (rounded from float64 to each), with the norm over the momentum of all groups
        together; ``applied``: with the ``rho`` of the perturbation the weights are at (the
        group's own where none was saved, as in a checkpoint of an older torchsam)."""
        if not groups:
            return []
        norms: list[Tensor] = []
        for _, _, vs, group in groups:
            norms += (
                torch._foreach_norm(vs)
                if group_foreach(group)
                else [torch.linalg.vector_norm(v) for v in vs]
            )
        # per-tensor norms in the tensors' dtype, combined in float64 on the first device
        device = groups[0][0][0].device
        if any(n.device != device for n in norms):
            norms = [n.to(device) for n in norms]
        total = torch.linalg.vector_norm(torch.stack(norms).to(torch.float64))
        rhos = [g[_APPLIED_RHO] if applied and _APPLIED_RHO in g else g["rho"] for *_, g in groups]
        # in float16 the factor may overflow to -inf: F.addcmul_ limits it to float16's range
        if _reads_free(device) and type(total) is Tensor:
            # on the CPU reading the norm costs no synchronisation: the same float64
            # arithmetic in Python, a few operators fewer (bit-identical, see _cpu_factor)
            value = total.item()
            return [
                {dtype: _cpu_factor(value, rho, dtype, p[0].device) for dtype in _dtypes(p)}
                for (p, *_), rho in zip(groups, rhos, strict=True)
            ]
        out = []
        for (p, *_), rho in zip(groups, rhos, strict=True):
            factor = -float(rho) / (total + _NORM_EPS)
            out.append({dtype: factor.to(p[0].device, dtype) for dtype in _dtypes(p)})
        return out

    # ------------------------------------------------------------------ weight decay
    def _decay(self, group: dict[str, Any]) -> str | None:
        """Where the authors' rule moves ``group``'s weight decay: ``"perturbed"`` (a coupled
        decay, taken at ``w~``), ``"after"`` (a decoupled decay, after the base update), or
        None (no decay, the base optimizer's placement asked for, or an unknown base)."""
        decay = group.get("weight_decay", 0)
        if not (self._known_decay and group["authors_weight_decay"]) or not decay:
            return None
        decoupled = isinstance(self.base_optimizer, torch.optim.AdamW) or bool(
            group.get("decoupled_weight_decay", False)
        )
        return "after" if decoupled else "perturbed"

    def base_gradient(self, ctx: StepContext) -> None:
        """For a coupled decay, the base optimizer sees ``g + lambda (w~ - w)`` and adds
        ``lambda w`` itself: its step uses ``g + lambda w~``, the authors' SGD rule. For a
        decoupled decay, save ``w`` of the parameters not yet perturbed (the first step) for
        :meth:`after_base_step`."""
        coupled = []
        for view in ctx.views:
            where = self._decay(view.group)
            if where == "perturbed":
                coupled.append(view)
            elif where == "after":
                for p in view.params:
                    if "w" not in self.own_state.get(p, {}):
                        self.own_state[p]["w"] = p.detach().clone()
        if coupled:
            self._decay_at_perturbed_point(ctx, coupled)

    def _decay_at_perturbed_point(self, ctx: StepContext, views: list[GroupView]) -> None:
        """``base_grad = g + sign * lambda * scale * v`` for the perturbed parameters of
        ``views`` (``w~ - w = scale * v``; ``sign`` is -1 for a maximizing base optimizer,
        which negates the gradient before adding its decay)."""
        groups = self._step_groups
        if groups is None:
            groups = self._perturbed_groups()
        scales = {id(g[3]): s for g, s in zip(groups, self._applied_scales(groups), strict=True)}
        perturbed = {id(g[3]): g for g in groups}
        base_state = self.base_optimizer.state
        for view in views:
            group = perturbed.get(id(view.group))
            if group is not None and same_objects(group[0], view.params):
                moved, momenta = list(range(len(view.params))), group[2]  # all of them
            else:
                moved = [
                    i
                    for i, p in enumerate(view.params)
                    if "w" in self.own_state.get(p, {})
                    and self.momentum_key in base_state.get(p, {})
                ]
                momenta = [base_state[view.params[i]][self.momentum_key] for i in moved]
            if not moved:  # not perturbed yet (the first step): w~ = w
                continue
            grads = ctx.base_grads(view)
            F.copy_(grads, view.grads, view.foreach)
            sign = -1.0 if view.group.get("maximize", False) else 1.0
            decay = sign * float(view.group["weight_decay"])
            coefficient = {dtype: decay * s for dtype, s in scales[id(view.group)].items()}
            if len(moved) == len(grads):
                targets, splits = grads, view.layout.splits
            else:
                targets = [grads[i] for i in moved]
                splits = split_by_device_and_dtype(targets)
            _addcmul(targets, momenta, coefficient, view.foreach, splits)

    def after_base_step(self, ctx: StepContext) -> None:
        """For a decoupled decay: the base optimizer left ``(1 - c) w - lr u`` (``c = lr *
        lambda``); rescale to ``(1 - c) (w - lr u)``, the authors' AdamW rule."""
        for view in ctx.views:
            if self._decay(view.group) != "after":
                continue
            c = view.group["lr"] * float(view.group["weight_decay"])
            ws = [self.own_state[p]["w"] for p in view.params]
            F.combine_(view.params, view.params, 1 - c, ws, c * (1 - c), view.foreach)


def _reads_free(device: torch.device) -> bool:
    """Whether reading a value on ``device`` costs no synchronisation (the CPU)."""
    return device.type == "cpu"


#: the dtypes whose 0-dim factor :func:`torch.scalar_tensor` makes as ``.to(dtype)`` would
_SCALAR_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_factor(total: float, rho: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(-rho / (total + eps)).to(device, dtype)`` of a float64 CPU tensor ``total``, from its
    value: the tensor expression computes ``reciprocal(total + eps) * -rho`` in float64 (what
    ``Tensor.__rdiv__`` does), which Python's float arithmetic repeats bit for bit, and on the
    CPU :func:`torch.scalar_tensor` rounds a float to float32/16 and bfloat16 as ``.to`` does
    (it refuses a float32 beyond float32's range, which ``.to`` makes infinite). A group on
    another device gets the float64 value's ``.to``, as before. The device is always given:
    a default device set by the user (``torch.set_default_device``) is not the group's."""
    value = (1.0 / (total + _NORM_EPS)) * -float(rho)
    if device.type == "cpu" and dtype in _SCALAR_DTYPES:
        try:
            return torch.scalar_tensor(value, dtype=dtype, device=device)
        except RuntimeError:
            pass
    return torch.scalar_tensor(value, dtype=torch.float64, device="cpu").to(device, dtype)


def _splits(
    params: list[Tensor], group: dict[str, Any], views: list[GroupView]
) -> list[list[int]] | None:
    """The indices of ``params`` (a group's) per device and dtype (None: one of each): from
    the step's view of the group where it holds the same parameters (its layout is cached),
    else found again."""
    for view in views:
        if view.group is group and same_objects(view.params, params):
            return view.layout.splits
    return split_by_device_and_dtype(params)


def _dtypes(params: list[Tensor]) -> list[torch.dtype]:
    """The dtypes of ``params``, in order of first appearance."""
    return list(dict.fromkeys(p.dtype for p in params))


def _addcmul(
    dst: list[Tensor],
    src: list[Tensor],
    coefficient: _Scale,
    foreach: bool,
    splits: list[list[int]] | None,
) -> None:
    """``dst += src * coefficient[dtype]``, per device and dtype of ``dst`` (``splits``),
    each with the coefficient of its dtype: a parameter group spread over several GPUs takes
    the 0-dim coefficient on each of them (a multi-tensor kernel refuses one on another
    device), as GSAM's and LookSAM's do (:func:`F.cast_like`)."""
    if splits is None:
        F.addcmul_(dst, src, coefficient[dst[0].dtype], foreach)
        return
    for idx in splits:
        part = [dst[i] for i in idx]
        coef = F.cast_like(coefficient[part[0].dtype], part[0])
        F.addcmul_(part, [src[i] for i in idx], coef, foreach)


def _momentum_key(base: Optimizer, given: str | None) -> str:
    if given is not None:
        return given
    for cls in type(base).__mro__:
        if cls in MOMENTUM_KEYS:
            return MOMENTUM_KEYS[cls]
    raise TypeError(
        f"MomentumSAM does not know where {type(base).__name__} keeps its momentum: pass "
        "momentum_key='<key of its per-parameter state>' (SGD: 'momentum_buffer', Adam: "
        "'exp_avg')"
    )
