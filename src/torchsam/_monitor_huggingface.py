"""The Hugging Face ``TrainerCallback`` of :class:`torchsam.monitor.SharpnessMonitor`.

Imported only by :meth:`SharpnessMonitor.trainer_callback`, so that ``import torchsam`` does not
import ``transformers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import transformers
except ImportError as error:
    raise ImportError(
        'SharpnessMonitor.trainer_callback needs transformers: pip install "torchsam[hf]"'
    ) from error

if TYPE_CHECKING:
    from torchsam.monitor import SharpnessMonitor

__all__ = ["MonitorTrainerCallback"]


class MonitorTrainerCallback(transformers.TrainerCallback):
    """Drive a :class:`~torchsam.monitor.SharpnessMonitor` from a Hugging Face ``Trainer``.

    At the end of each optimizer step it reports ``state.global_step`` to
    :meth:`~torchsam.monitor.SharpnessMonitor.step`, and at the end of each epoch counts one to
    :meth:`~torchsam.monitor.SharpnessMonitor.epoch_end`.

    Args:
        monitor (SharpnessMonitor): the monitor, built on the model the Trainer trains
    """

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor = monitor

    def on_step_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.monitor.step(state.global_step)

    def on_epoch_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.monitor.epoch_end()
