"""Intermittent SAM: a sharpness step every k steps or with probability p."""

from __future__ import annotations

import random
from typing import Any, ClassVar

from torchsam._sam import SAM, check_fraction, check_int

__all__ = ["IntermittentSAM"]


class IntermittentSAM(SAM):
    r"""SAM on some steps only; plain base-optimizer steps (one pass) on the others.

    * ``every=k``: a SAM step on steps ``offset, offset + k, offset + 2k, ...`` (steps counted
      from 0; the periodic baseline of Liu et al., CVPR 2022). ``offset=0`` starts with a SAM
      step; ``offset=k - 1`` is the schedule of MosaicML Composer's ``SAM(interval=k)``, whose
      SAM steps are ``k - 1, 2k - 1, ...``;
    * ``probability=p``: a SAM step with probability ``p``, independently on each step
      (randomized switching, Zhao et al., "Randomized Sharpness-Aware Training for Boosting
      Computational Efficiency in Deep Learning", 2022, the constant schedule :math:`p_t = p`).

    The expected cost is ``1 + 1/k`` (or ``1 + p``) forward/backward passes per step. The random
    draws depend only on ``seed`` and the step number, so a resumed run makes the same choices.
    In the two-call style, :meth:`first_step` returns False on the plain steps: run the second
    forward/backward only when it returns True.

    Args:
        params, base_optimizer, rho, adaptive, eta, **kwargs: as for :class:`torchsam.SAM`
        every (int, optional): period of the SAM steps
        offset (int, optional): the first SAM step with ``every``, in ``[0, every)``
            (default: 0)
        probability (float, optional): probability of a SAM step, in [0, 1]
        seed (int, optional): seed of the random choices (default: 0)

    Exactly one of ``every`` and ``probability`` must be given.

    Example:
        >>> optimizer = IntermittentSAM(model.parameters(), torch.optim.SGD, probability=0.5,
        ...                             lr=0.1, momentum=0.9)
        >>> loss = optimizer.step(closure)
    """

    #: its plain steps are base steps and its SAM steps SAM's: the skip of a non-finite step
    #: can stay on the device with a fused base optimizer
    device_skip: ClassVar[bool] = True
    options: ClassVar[dict[str, Any]] = {
        "every": None,
        "offset": 0,
        "probability": None,
        "seed": 0,
    }
    every: int | None
    offset: int
    probability: float | None
    seed: int

    def check_options(self) -> None:
        if (self.every is None) == (self.probability is None):
            raise ValueError("IntermittentSAM needs exactly one of every=k or probability=p")
        check_int("offset", self.offset, low=0)
        if self.every is not None:
            check_int("every", self.every)
            if self.offset >= self.every:
                raise ValueError(
                    f"Invalid offset value: {self.offset}; offset must be below every "
                    f"({self.every})"
                )
        elif self.offset:
            raise ValueError("offset applies to every=k only, not to probability=p")
        if self.probability is not None:
            check_fraction("probability", self.probability, zero_ok=True, one_ok=True)
        check_int("seed", self.seed, low=None)

    def second_pass_due(self) -> bool:
        step = self.step_count
        if self.every is not None:
            return step % self.every == self.offset
        return _uniform(self.seed, step) < float(self.probability or 0.0)


def _uniform(seed: int, step: int) -> float:
    """A uniform draw in [0, 1) that depends only on ``(seed, step)``."""
    # A str seed is hashed with SHA-512 by ``random``: stable across runs and processes.
    return random.Random(f"torchsam.IntermittentSAM:{seed}:{step}").random()
