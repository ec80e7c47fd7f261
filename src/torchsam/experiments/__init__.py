"""Experiments: embedded data, small models and a training loop for comparing SAM variants.

Nothing here is imported by ``import torchsam``. The digits need scikit-learn
(``pip install "torchsam[data]"``), imported only when a dataset is built.

Example:
    >>> from torchsam.experiments import noisy_digits, train
    >>> split = noisy_digits(noise=0.2, seed=0)
    >>> result = train("sam", split, epochs=20, seed=0, rho=0.05)
    >>> result.test_accuracy, result.forwards_per_step
"""

from torchsam.experiments import methods as _methods  # noqa: F401 (registers the SAM family)
from torchsam.experiments.data import Split, noisy_digits, noisy_signals
from torchsam.experiments.models import mlp, small_cnn
from torchsam.experiments.train import (
    METHODS,
    Batch,
    EpochStats,
    Method,
    OptimizerFactory,
    Result,
    StepBuilder,
    StepFn,
    TrainContext,
    accuracy,
    closure_step,
    get_method,
    register_method,
    sharpness_aware,
    train,
)

__all__ = [
    "METHODS",
    "Batch",
    "EpochStats",
    "Method",
    "OptimizerFactory",
    "Result",
    "Split",
    "StepBuilder",
    "StepFn",
    "TrainContext",
    "accuracy",
    "closure_step",
    "get_method",
    "mlp",
    "noisy_digits",
    "noisy_signals",
    "register_method",
    "sharpness_aware",
    "small_cnn",
    "train",
]
