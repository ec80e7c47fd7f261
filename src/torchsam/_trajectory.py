"""Sharpness-aware training for free: the SAF and MESA trajectory losses.

Du, Zhou, Feng, Tan and Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022
(arXiv:2205.14083). Instead of SAM's second forward/backward pass, SAF adds to the ordinary loss
a *trajectory loss* that penalises how fast the model's outputs move along the trajectory of the
weights, which the paper shows behaves as SAM's sharpness measure does. With ``z`` the current
logits of a sample, ``z_ref`` a reference for the same sample and ``B`` the batch, the term is

.. math::

    L^{tra} = \\lambda \\, \\tau^2 \\, \\frac{1}{|B|} \\sum_{i \\in B}
              \\mathrm{KL}\\big(\\mathrm{softmax}(z^{ref}_i / \\tau) \\,\\|\\,
              \\mathrm{softmax}(z_i / \\tau)\\big),

with gradients through ``z`` only (``z_ref`` is a constant). The two methods differ in ``z_ref``:

* :class:`SAF`: the logits the model gave the same training sample ``delay`` epochs earlier
  (recorded by :class:`SAF` itself): no extra forward pass, memory ``num_samples x (delay + 1)
  x num_classes``.
* :class:`MESA` (memory-efficient SAF): the output of an exponential moving average (EMA) of the
  weights on the same inputs: one extra forward pass without gradient, memory of one model copy.

The hyper-parameter defaults are those of the authors' code (github.com/AngusDujw/SAF).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MESA", "SAF", "trajectory_kl"]


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau < math.inf:
        raise ValueError(f"Invalid tau value: {tau} (expected a finite number > 0)")
    return float(tau)


def _check_nonnegative_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"Invalid {name} value: {value} (expected >= 0)")
    return value


def _check_logits(logits: Tensor, num_classes: int | None = None) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(
            "logits must have shape [batch, num_classes] with batch >= 1, "
            f"got {tuple(logits.shape)}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"logits must have shape [batch, {num_classes}], got {tuple(logits.shape)}"
        )


def _per_sample_kl(logits: Tensor, reference: Tensor, tau: float) -> Tensor:
    """``tau² · KL(softmax(reference/tau) || softmax(logits/tau))`` per row, in >= float32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype) / tau, dim=-1)
    log_p_ref = F.log_softmax(
        reference.detach().to(device=logits.device, dtype=dtype) / tau, dim=-1
    )
    kl = F.kl_div(log_p, log_p_ref, reduction="none", log_target=True)
    return kl.sum(dim=-1) * (tau * tau)


def trajectory_kl(logits: Tensor, reference: Tensor, *, tau: float = 5.0) -> Tensor:
    r"""The trajectory loss of SAF without its coefficient: a tempered KL divergence.

    Returns ``tau² · mean_i KL(softmax(reference_i / tau) || softmax(logits_i / tau))``, the KL
    summed over classes and averaged over the batch, as in Du et al. (2022). ``reference`` is
    treated as a constant: the gradient flows into ``logits`` only. Half-precision inputs are
    computed in float32.

    Args:
        logits (Tensor): current logits, shape ``[batch, num_classes]``
        reference (Tensor): reference logits of the same samples, same shape
        tau (float, optional): temperature of the softmax (default: 5.0)

    Example:
        >>> loss = F.cross_entropy(z, y) + 0.3 * torchsam.trajectory_kl(z, z_old, tau=5.0)
    """
    tau = _check_tau(tau)
    _check_logits(logits)
    if not isinstance(reference, Tensor) or reference.shape != logits.shape:
        shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference)
        raise ValueError(
            f"reference must have the shape of logits {tuple(logits.shape)}, got {shape}"
        )
    return _per_sample_kl(logits, reference, tau).mean()


class _TrajectoryLoss(nn.Module):
    """What SAF and MESA share: ``lam``, ``tau``, ``start_epoch`` and the inactive term."""

    def __init__(self, lam: float, tau: float, start_epoch: int) -> None:
        super().__init__()
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < math.inf:
            raise ValueError(f"Invalid lam value: {lam} (expected a finite number >= 0)")
        self.lam = float(lam)
        self.tau = _check_tau(tau)
        self.start_epoch = _check_nonnegative_int(start_epoch, "start_epoch")

    @staticmethod
    def _zero(logits: Tensor) -> Tensor:
        # A constant: adding it to the loss changes neither the value nor the gradient.
        return logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))

    def extra_repr(self) -> str:
        return f"lam={self.lam}, tau={self.tau}, start_epoch={self.start_epoch}"


def _assert_indices_async(index: Tensor, num_samples: int) -> None:
    """Assert on ``index``'s device that it lies in ``[0, num_samples)`` without repeats.

    No value comes to the host: on a GPU a failure is a device-side assertion, reported at the
    next synchronisation (on the CPU it raises at once, a ``RuntimeError``).
    """
    ordered = index.sort().values
    ok = (ordered[0] >= 0) & (ordered[-1] < num_samples)
    ok &= (ordered[1:] != ordered[:-1]).all()
    torch._assert_async(
        ok, f"SAF: indices must lie in [0, {num_samples}) and not repeat within a batch"
    )


class SAF(_TrajectoryLoss):
    r"""Sharpness-Aware training for Free (Du et al., NeurIPS 2022): the trajectory loss term.

    Add the returned term to the ordinary loss; there is no second forward or backward pass and
    the optimizer is any ``torch.optim`` optimizer. Each call records ``logits.detach()`` for the
    batch's sample indices in the slot of ``epoch`` and, from ``start_epoch`` on, returns

        ``lam · tau² · (1/B) Σ_i KL(softmax(z_i^(epoch - delay) / tau) || softmax(z_i / tau))``

    where ``z_i^(epoch - delay)`` are the logits recorded for sample ``i`` exactly ``delay``
    epochs earlier (the paper's trajectory loss with :math:`\tilde E` = ``delay``). A sample whose
    logits were not recorded in that epoch contributes zero (value and gradient); the mean stays
    over the whole batch, so a sample's weight does not depend on the others. Before
    ``start_epoch`` and before epoch ``delay`` the term is a constant zero without a graph.

    The history is a ring over ``delay + 1`` epochs, held in buffers: ``history`` (the logits,
    ``[num_samples, delay + 1, num_classes]``) and ``history_epoch`` (the epoch each slot was
    recorded in, ``-1`` when never), so ``state_dict()``/``load_state_dict()`` resume exactly.
    The buffers stay where they are created (the CPU by default) unless the module is moved;
    batches on another device are copied across. Memory is ``num_samples · (delay + 1) ·
    num_classes`` elements of ``dtype``: 8 MB for CIFAR-10, about 20 GB for ImageNet in float32
    (use ``dtype=torch.float16`` and keep it on the CPU there, or use :class:`MESA`).

    Call it on training batches only, with the logits of the training-mode forward pass, the
    dataset indices of the samples (a dataset that returns ``(index, x, y)``), and the current
    epoch counted from 0. On a GPU, move the module with the model (``saf.to(device)``): a call
    then never waits for the device (no host synchronisation). Indices on the CPU, as a
    ``DataLoader`` yields them, are checked on the host (out of range or repeated:
    ``ValueError``) and copied asynchronously; indices already on the GPU are checked there, by
    a device-side assertion that stops the program at its next synchronisation. A history kept
    on the CPU with logits on a GPU costs a copy each way.

    Args:
        num_samples (int): size of the training set; indices lie in ``[0, num_samples)``
        num_classes (int): number of classes (the logits' last dimension)
        lam (float, optional): coefficient :math:`\lambda` of the trajectory loss (default: 0.3,
            the authors' recommendation for SAF in their README; their script's default is 0.16)
        tau (float, optional): temperature :math:`\tau` (default: 5.0, the authors' default)
        delay (int, optional): :math:`\tilde E`, how many epochs back the reference logits are
            taken from (default: 3; the authors use 2 or 3)
        start_epoch (int, optional): first epoch in which the term is active (default: 5, the
            authors' ``kl_start_epoch``; note their script activates the term for epochs
            strictly after it, so their ``kl_start_epoch=5`` is ``start_epoch=6`` here)
        dtype (torch.dtype, optional): storage type of the recorded logits
            (default: torch.float32)

    Example:
        >>> saf = torchsam.SAF(len(train_set), num_classes=10)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> for epoch in range(epochs):
        ...     for index, x, y in loader:
        ...         logits = model(x)
        ...         loss = F.cross_entropy(logits, y) + saf(logits, index, epoch)
        ...         optimizer.zero_grad()
        ...         loss.backward()
        ...         optimizer.step()
        >>> torch.save({"model": model.state_dict(), "saf": saf.state_dict()}, "ckpt.pt")
    """

    history: Tensor
    history_epoch: Tensor

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        *,
        lam: float = 0.3,
        tau: float = 5.0,
        delay: int = 3,
        start_epoch: int = 5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(lam, tau, start_epoch)
        for name, value in (("num_samples", num_samples), ("num_classes", num_classes)):
            if _check_nonnegative_int(value, name) < 1:
                raise ValueError(f"Invalid {name} value: {value} (expected >= 1)")
        if _check_nonnegative_int(delay, "delay") < 1:
            raise ValueError(f"Invalid delay value: {delay} (expected >= 1)")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.delay = delay
        slots = delay + 1
        self.register_buffer("history", torch.zeros(num_samples, slots, num_classes, dtype=dtype))
        self.register_buffer(
            "history_epoch", torch.full((num_samples, slots), -1, dtype=torch.int64)
        )

    def _check_indices(self, indices: Tensor, batch: int) -> Tensor:
        """``indices`` as int64 on the history's device, checked without a host synchronisation.

        The type, dtype and shape are checked on the host. The values (in range, no repeats)
        are read on the host where they already are (indices on the CPU, as a ``DataLoader``
        yields them, or a history kept on the CPU) and raise a ``ValueError``; indices already
        on the history's accelerator are checked there, by a device-side assertion that stops
        the program at its next synchronisation, so that a step never waits for the device.
        """
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a Tensor, got {type(indices).__name__}")
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.shape != (batch,):
            raise ValueError(
                f"indices must have shape [{batch}] (one per row of logits), "
                f"got {tuple(indices.shape)}"
            )
        device = self.history.device
        if indices.device.type == "cpu" or device.type == "cpu":
            on_host = indices.to("cpu", torch.int64)
            self._check_values_on_host(on_host)
            # host to device: asynchronous, from pinned or (staged by the driver) pageable memory
            return on_host.to(device, non_blocking=True)
        index = indices.to(device, torch.int64)
        _assert_indices_async(index, self.num_samples)
        return index

    def _check_values_on_host(self, indices: Tensor) -> None:
        # the range and the repeats from one sort, read in one transfer (host memory: no sync)
        ordered = indices.sort().values
        repeats = (ordered[1:] == ordered[:-1]).sum().reshape(1)
        low, high, repeated = torch.cat([ordered[:1], ordered[-1:], repeats]).tolist()
        if low < 0 or high >= self.num_samples:
            raise ValueError(
                f"indices must lie in [0, {self.num_samples}), got values in [{low}, {high}]"
            )
        if repeated:
            raise ValueError("indices must not repeat within a batch")

    def forward(self, logits: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """Record ``logits`` for ``indices`` in ``epoch`` and return the trajectory term.

        Args:
            logits (Tensor): the model's logits for the batch, ``[batch, num_classes]``
            indices (Tensor): the samples' dataset indices, integer, ``[batch]``
            epoch (int): the current epoch, counted from 0

        Returns:
            Tensor: a 0-dim tensor; a constant 0 while the term is inactive.
        """
        _check_logits(logits, self.num_classes)
        index = self._check_indices(indices, logits.shape[0])
        epoch = _check_nonnegative_int(epoch, "epoch")
        term = self._zero(logits)
        past = epoch - self.delay
        if epoch >= self.start_epoch and past >= 0:
            slot = past % (self.delay + 1)
            valid = (self.history_epoch[index, slot] == past).to(logits.device)
            reference = self.history[index, slot].to(logits.device)
            # Rows without a reference compare the logits with themselves and are masked out:
            # whatever the buffer holds there cannot reach the value or the gradient.
            stand_in = logits.detach().to(reference.dtype)
            reference = torch.where(valid.unsqueeze(1), reference, stand_in)
            kl = _per_sample_kl(logits, reference, self.tau)
            term = self.lam * (kl * valid.to(kl.dtype)).sum() / logits.shape[0]
        slot = epoch % (self.delay + 1)
        with torch.no_grad():
            record = logits.detach().to(self.history.device, self.history.dtype)
            self.history[:, slot].index_copy_(0, index, record)
            # a Python scalar fills on the device: no host-to-device copy of the epoch
            self.history_epoch[:, slot].index_fill_(0, index, epoch)
        return term

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"{super().extra_repr()}, delay={self.delay}"
        )


_MESA = TypeVar("_MESA", bound="MESA")


@dataclass
class _UpdatePlan:
    """What :meth:`MESA.update` does, kept while the model's and the EMA's tensors are the same
    objects: the fused average, the averaged tensors of another dtype or device, the copies."""

    tensors: list[Tensor]
    averaged_ema: list[Tensor] = field(default_factory=list)
    averaged_src: list[Tensor] = field(default_factory=list)
    converted: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    copied: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def _same_objects(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


class MESA(_TrajectoryLoss):
    r"""Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022): SAF with an EMA.

    The trajectory loss of :class:`SAF` with the reference taken from an exponential moving
    average of the weights instead of recorded logits. From ``start_epoch`` on, ``forward``
    runs the EMA model on the batch's inputs (without gradient) and returns

        ``lam · tau² · (1/B) Σ_i KL(softmax(ema(x)_i / tau) || softmax(z_i / tau))``

    where ``z = model(x)`` are the current logits; before ``start_epoch`` it returns a constant
    zero and skips the EMA forward pass. Call :meth:`update` after every ``optimizer.step()``
    (from the first epoch on), which sets, for every floating-point parameter and buffer
    (BatchNorm running statistics),

        ``ema = decay · ema + (1 - decay) · w``

    as the authors' code does (timm's ``ModelEmaV2`` over the whole ``state_dict``), and copies
    integer buffers (BatchNorm's ``num_batches_tracked``, which the authors' float average
    truncates) and any non-floating parameter. ``average_buffers=False`` copies every buffer
    instead.

    The EMA is a deep copy of the model, made at construction (hooks already registered on the
    model come with it), held as the submodule ``ema``: ``state_dict()`` holds it, ``.to()``
    moves it, and its parameters have ``requires_grad=False`` and never a gradient. Build the
    optimizer on ``model.parameters()``, not on the ``MESA`` object. The EMA runs in eval mode
    (BatchNorm with running statistics, no dropout), as in the authors' code, whatever
    ``MESA.train()``/``eval()`` is called with; ``ema_train_mode=True`` runs it in training mode
    instead. A ``DataParallel`` or ``DistributedDataParallel`` wrapper is unwrapped (both here
    and in :meth:`update`).

    Args:
        model (nn.Module): the model being trained; copied for the EMA
        decay (float, optional): EMA decay in ``[0, 1]`` (default: 0.9998, the authors'
            default; short runs want less, e.g. 0.99)
        lam (float, optional): coefficient :math:`\lambda` of the trajectory loss (default: 0.8,
            the authors' recommendation for MESA)
        tau (float, optional): temperature :math:`\tau` (default: 5.0)
        start_epoch (int, optional): first epoch in which the term is active (default: 5; the
            authors' script activates it for epochs strictly after its ``kl_start_epoch``)
        ema_train_mode (bool, optional): run the EMA model in training mode (default: False)
        average_buffers (bool, optional): average the floating-point buffers as the weights,
            as the authors do; False copies them from the model (default: True)

    Example:
        >>> mesa = torchsam.MESA(model, decay=0.9998)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> for epoch in range(epochs):
        ...     for x, y in loader:
        ...         logits = model(x)
        ...         loss = F.cross_entropy(logits, y) + mesa(logits, x, epoch)
        ...         optimizer.zero_grad()
        ...         loss.backward()
        ...         optimizer.step()
        ...         mesa.update(model)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9998,
        lam: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 5,
        ema_train_mode: bool = False,
        average_buffers: bool = True,
    ) -> None:
        super().__init__(lam, tau, start_epoch)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"Invalid decay value: {decay} (expected a number in [0, 1])")
        self.decay = float(decay)
        self.ema_train_mode = bool(ema_train_mode)
        if not isinstance(average_buffers, bool):
            raise TypeError(f"average_buffers must be True or False, got {average_buffers!r}")
        self.average_buffers = average_buffers
        ema = copy.deepcopy(_unwrap(model))
        for param in ema.parameters():
            param.requires_grad_(False)
            param.grad = None
        self.ema = ema.train(self.ema_train_mode)
        self._update_plan: _UpdatePlan | None = None

    def train(self: _MESA, mode: bool = True) -> _MESA:
        """Set this module's mode; the EMA model keeps the mode chosen by ``ema_train_mode``."""
        super().train(mode)
        self.ema.train(self.ema_train_mode)
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA towards ``model``: ``ema = decay · ema + (1 - decay) · w``.

        Floating-point parameters and (with ``average_buffers``) buffers are averaged, in one
        fused pass (``torch._foreach_lerp_``, ``ema += (1 - decay) · (w - ema)``); the other
        tensors are copied. The pairing of the model's tensors with the EMA's is checked (names
        and shapes) on the first call and whenever the model's tensors change, and kept in
        between, so a call costs no per-tensor Python work beyond the kernels.

        Args:
            model (nn.Module): the model ``MESA`` was built from, after the optimizer step
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = _unwrap(model)
        # ``.to()``/``load_state_dict`` may replace tensors: the pairing is re-made then
        tensors = [*model.parameters(), *model.buffers(), *self.ema.parameters()]
        tensors.extend(self.ema.buffers())
        plan = self._update_plan
        if plan is None or not _same_objects(plan.tensors, tensors):
            plan = self._update_plan = self._plan_update(model, tensors)
        weight = 1.0 - self.decay
        if plan.averaged_ema:
            torch._foreach_lerp_(plan.averaged_ema, plan.averaged_src, weight)
        for ema_t, src_t in plan.converted:  # a source of another dtype or device
            ema_t.lerp_(src_t.to(ema_t), weight)
        for ema_t, src_t in plan.copied:
            ema_t.copy_(src_t)

    def _plan_update(self, model: nn.Module, tensors: list[Tensor]) -> _UpdatePlan:
        """Pair the model's tensors with the EMA's, by name, and check their shapes."""
        plan = _UpdatePlan(tensors)
        average = {"parameters": True, "buffers": self.average_buffers}
        for kind, ema_named, src_named in (
            ("parameters", self.ema.named_parameters(), model.named_parameters()),
            ("buffers", self.ema.named_buffers(), model.named_buffers()),
        ):
            ema_items, src_items = list(ema_named), list(src_named)
            if [name for name, _ in ema_items] != [name for name, _ in src_items]:
                raise ValueError(
                    f"update() expects the model MESA was built from: its {kind} differ in names"
                )
            for (name, ema_t), (_, src_t) in zip(ema_items, src_items, strict=True):
                if ema_t.shape != src_t.shape:
                    raise ValueError(
                        f"update() expects the model MESA was built from: {name} has shape "
                        f"{tuple(src_t.shape)}, the EMA {tuple(ema_t.shape)}"
                    )
                if average[kind] and ema_t.is_floating_point():
                    if src_t.dtype != ema_t.dtype or src_t.device != ema_t.device:
                        plan.converted.append((ema_t, src_t))
                    else:
                        plan.averaged_ema.append(ema_t)
                        plan.averaged_src.append(src_t)
                else:
                    plan.copied.append((ema_t, src_t))
        return plan

    def __getstate__(self) -> dict[str, Any]:
        # the cached pairing refers to the model's tensors: a copy re-makes it
        return {**super().__getstate__(), "_update_plan": None}

    def forward(self, logits: Tensor, inputs: Tensor, epoch: int) -> Tensor:
        """Return the trajectory term of ``logits`` against the EMA model's output on ``inputs``.

        Args:
            logits (Tensor): the model's logits for the batch, ``[batch, num_classes]``
            inputs (Tensor): the batch the logits were computed from, passed as ``ema(inputs)``
            epoch (int): the current epoch, counted from 0

        Returns:
            Tensor: a 0-dim tensor; a constant 0 (and no EMA forward pass) before
            ``start_epoch``.
        """
        _check_logits(logits)
        epoch = _check_nonnegative_int(epoch, "epoch")
        if epoch < self.start_epoch:
            return self._zero(logits)
        # No autograd bookkeeping at all for the EMA's forward pass (not even version counters);
        # its output is copied out of inference mode, so the term's backward may save it.
        with torch.inference_mode():
            reference = self.ema(inputs)
        if not isinstance(reference, Tensor) or reference.shape != logits.shape:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference)
            raise ValueError(
                f"the EMA model's output must have the shape of logits {tuple(logits.shape)}, "
                f"got {shape}"
            )
        return self.lam * _per_sample_kl(logits, reference.clone(), self.tau).mean()

    def extra_repr(self) -> str:
        return (
            f"decay={self.decay}, {super().extra_repr()}, ema_train_mode={self.ema_train_mode}, "
            f"average_buffers={self.average_buffers}"
        )
