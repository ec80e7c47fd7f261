"""The variant contract: what a sharpness-aware variant decides, and what a step gives it.

A variant is a subclass of :class:`torchsam.SAM` (or of :class:`SharpnessAwareOptimizer` for a
new perturbation) that overrides some of the members of :class:`VariantContract`, each with a
default that is SAM's behaviour. The engine calls them in this order within one step::

    second_pass_due()            whether this step takes the second pass
    perturb(ctx)                 the perturbation (SAM: ascent_direction(view) and radius(group))
    on_perturbed(ctx)            state computed from the gradients at w (committed via ctx.defer)
    -- second forward/backward at w + e, restore w, finiteness check --
    base_gradient(ctx)           the gradient the base optimizer steps with (ctx.base_grads)
    -- base optimizer step --
    after_base_step(ctx)         what follows the base step (WSAM's decoupled update)

A :class:`StepContext` passes values along the step (never the variant's own attributes): the
views of the gradients, the norm and inner products (left on the device), scratch buffers, the
first gradients (``needs_first_grads``), and deferred state updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from torchsam._engine import _functional as F
from torchsam._engine._guard import NonFiniteGuard
from torchsam._engine._layout import GroupView
from torchsam._engine._workspace import Workspace

if TYPE_CHECKING:
    from torchsam._engine._optimizer import SharpnessAwareOptimizer

__all__ = ["StepContext", "VariantContract"]


class StepContext:
    """What one sharpness-aware step gives a variant.

    Attributes:
        views (list[GroupView]): the param groups reduced to the parameters with a gradient:
            at ``w`` in :meth:`VariantContract.perturb`, at ``w + e`` (after the restore) in
            :meth:`VariantContract.base_gradient` on a step with a second pass
        two_pass (bool): whether this step took the second pass
        grad_scaler (torch.amp.GradScaler | None): the scaler given to ``first_step``
    """

    def __init__(
        self,
        optimizer: SharpnessAwareOptimizer,
        views: list[GroupView],
        workspace: Workspace,
        guard: NonFiniteGuard,
    ) -> None:
        self.optimizer = optimizer
        self._views = views
        self.two_pass = True
        self.grad_scaler: Any = None
        #: values a variant computes in one part of the step for a later one (MSAM's number
        #: of micro-batches): the step's own, never attributes of the optimizer
        self.variables: dict[str, Any] = {}
        self._workspace = workspace
        self._guard = guard
        self._grad_norm: Tensor | None = None
        self._pending: list[Callable[[], None]] = []

    @property
    def views(self) -> list[GroupView]:
        return self._views

    @views.setter
    def views(self, views: list[GroupView]) -> None:
        self._views = views
        self._grad_norm = None  # the norm of the gradients of the views

    def gradients_now(self) -> list[GroupView]:
        """Views of the gradients as they are now (after a pass the variant ran itself)."""
        return self.optimizer._views()

    # ------------------------------------------------------------------ math
    def norm(self, tensor_lists: list[list[Tensor]]) -> Tensor:
        """The 2-norm of all tensors of ``tensor_lists`` (one list per view) together, on the
        device (a 0-dim tensor, no synchronisation; global under FSDP2)."""
        return F.norm(self.views, tensor_lists)

    def grad_norm(self) -> Tensor:
        """The 2-norm of the gradients of :attr:`views`, computed once per pass (the engine
        derives its finiteness check from it where :meth:`VariantContract.uses_grad_norm`
        says so)."""
        if self._grad_norm is None:
            self._grad_norm = self.norm([v.grads for v in self.views])
        return self._grad_norm

    def dot(self, xs: list[list[Tensor]], ys: list[list[Tensor]]) -> Tensor:
        """The inner product of ``xs`` and ``ys`` (one list per view), a 0-dim float64 tensor
        on the device."""
        return F.dot(self.views, xs, ys)

    # ------------------------------------------------------------------ buffers
    def scratch(self, view: GroupView, name: str) -> list[Tensor]:
        """Persistent buffers called ``name`` aligned with ``view.params`` (workspace: not
        saved, allocated once)."""
        return self._workspace.scratch(view, name)

    def first_grads(self, view: GroupView) -> list[Tensor]:
        """The gradients at ``w`` of ``view``'s parameters (kept when the class sets
        ``needs_first_grads``)."""
        return self._workspace.scratch(view, "first_grad")

    def base_grads(self, view: GroupView, name: str = "base_grad") -> list[Tensor]:
        """The buffers the base optimizer will see as ``view``'s gradients on this step.

        A variant writes the gradient it wants the base optimizer to step with into them;
        ``p.grad`` stays exactly as backward left it (torch.optim never writes ``p.grad``);
        the engine points ``p.grad`` at them only for the duration of the base step.
        """
        buffers = self._workspace.scratch(view, name)
        view.base_grads = buffers
        return buffers

    def save_weights(self, view: GroupView) -> None:
        """Save ``view``'s weights for the exact restore; call it before changing them."""
        self._workspace.save_weights(view)

    # ------------------------------------------------------------------ the guard
    @property
    def skip_nonfinite(self) -> bool:
        """The ``skip_nonfinite`` option: whether a non-finite gradient skips the step."""
        return self.optimizer.skip_nonfinite

    def flag_first_norm(self, norm: Tensor) -> None:
        """Record (on the device) whether ``first_step``'s norm is finite."""
        if self.skip_nonfinite:
            self._guard.flag_first_norm(norm)

    def flag_grads(self, views: list[GroupView]) -> None:
        """Record (on the device) whether the gradients of ``views`` are finite."""
        if self.skip_nonfinite:
            self._guard.flag_grads(views)

    def defer(self, update: Callable[[], None]) -> None:
        """Run ``update`` (a state change) once the step's gradients are known to be finite;
        a skipped step never runs it."""
        self._pending.append(update)

    def commit(self) -> None:
        pending, self._pending = self._pending, []
        for update in pending:
            update()


class VariantContract:
    """The members a sharpness-aware variant may override (defaults: SAM's behaviour).

    Capabilities, read by the engine and by integrations (``torchsam.distributed``,
    ``torchsam.lightning``, ``torchsam.huggingface``):

    * ``needs_first_grads``: the variant reads the gradients at ``w`` after the second pass
      (:meth:`StepContext.first_grads`); a per-rank first pass under DDP would then differ.
    * ``no_two_call_style``: why ``first_step()``/``second_step()`` are unavailable (the
      variant runs its own passes in ``step``), or None.
    * ``device_skip``: the step changes nothing but what the base optimizer's step changes,
      so with a fused base optimizer (one that takes ``found_inf``) and no ``GradScaler`` the
      skip of a non-finite step stays on the device: no host synchronisation, and the
      warning comes at a later step. Declared by each class itself, never inherited.
    """

    needs_first_grads: ClassVar[bool] = False
    device_skip: ClassVar[bool] = False
    no_two_call_style: ClassVar[str | None] = None

    def second_pass_due(self) -> bool:
        """Whether the coming step takes the second pass (True for every step by default)."""
        return True

    def perturb(self, ctx: StepContext) -> None:
        """Move the weights of ``ctx.views`` to ``w + e``, calling ``ctx.save_weights(view)``
        before changing a view's weights, and ``ctx.flag_first_norm`` on the norm it divides
        by. :class:`torchsam.SAM` implements it from :meth:`ascent_direction` and
        :meth:`radius`."""
        raise NotImplementedError

    def ascent_direction(self, view: GroupView) -> list[Tensor]:
        """The direction ``d`` that is normalised into the perturbation: the gradient.

        It must not change any state (a non-finite norm skips the step after it is called);
        state that follows the gradient belongs in :meth:`on_perturbed`.
        """
        return view.grads

    def radius(self, group: dict[str, Any]) -> float:
        """The radius of the neighbourhood for ``group`` on this step: ``group["rho"]``."""
        return float(group["rho"])

    def on_perturbed(self, ctx: StepContext) -> None:
        """Compute state from the gradients at ``w`` (into scratch buffers), and commit it with
        ``ctx.defer`` so that a skipped step leaves the state as it was. Nothing by default."""

    def uses_grad_norm(self, two_pass: bool) -> bool:
        """Whether :meth:`base_gradient` reads ``ctx.grad_norm()`` on a step with (or
        without) a second pass; the finiteness check is then derived from that norm, one pass
        over the gradients for both. False by default."""
        return False

    def base_gradient(self, ctx: StepContext) -> None:
        """Write the gradient the base optimizer steps with into ``ctx.base_grads(view)``;
        by default nothing, and the base optimizer uses ``p.grad`` (the gradient at ``w + e``,
        or at ``w`` when ``ctx.two_pass`` is False)."""

    def after_base_step(self, ctx: StepContext) -> None:
        """Act on the weights after the base step (decoupled updates); nothing by default."""

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for an invalid hyper-parameter in ``group``."""

    def complete_group(self, group: dict[str, Any]) -> None:
        """Fill hyper-parameters whose default depends on the base optimizer's (GSAM's
        ``lr_max``); called once the base optimizer's defaults are in ``group``."""
