"""The engine every sharpness-aware optimizer in torchsam runs on (a private package).

A sharpness-aware step has one fixed sequence::

    gradient at w  ->  perturb to w + e  ->  gradient at w + e  ->  restore w  ->  base step

Its parts, each readable on its own (``docs/design.md`` draws how they meet in one step):

* :mod:`._optimizer`: :class:`SharpnessAwareOptimizer`, the phases of a step and the public
  methods (``step``, ``first_step``, ``second_step``, ``state_dict``, ...), in the order
  they run; no tensor math;
* :mod:`._contract`: the variant contract (:class:`VariantContract`, what a variant decides)
  and the :class:`StepContext` a step hands it;
* :mod:`._functional`: the math over tensor lists, ``_single_tensor_*``/``_multi_tensor_*``
  (norm, inner product, perturbation, restore, finite direction);
* :mod:`._layout`: :class:`GroupView` and the cached per-group layouts;
* :mod:`._workspace`: scratch buffers and the weight backup of the exact restore;
* :mod:`._guard`: the non-finite guard (device-side flags, a :class:`Status`);
* :mod:`._checkpoint`: the state dict that holds both optimizers' state;
* :mod:`._construct`: the base optimizer from the ``base_optimizer`` argument.
"""

from torchsam._engine._construct import BaseOptimizerArg
from torchsam._engine._contract import StepContext, VariantContract
from torchsam._engine._layout import GroupView, group_foreach, real_view
from torchsam._engine._optimizer import SharpnessAwareOptimizer

__all__ = [
    "BaseOptimizerArg",
    "GroupView",
    "SharpnessAwareOptimizer",
    "StepContext",
    "VariantContract",
    "group_foreach",
    "real_view",
]
