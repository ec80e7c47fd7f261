"""The PyTorch Lightning callback of :class:`torchsam.monitor.SharpnessMonitor`.

Imported only by :meth:`SharpnessMonitor.lightning_callback`, so that ``import torchsam`` does
not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import lightning.pytorch as pl
except ImportError as error:
    raise ImportError(
        'SharpnessMonitor.lightning_callback needs PyTorch Lightning: pip install "torchsam['
        'lightning]" (or pip install lightning)'
    ) from error

if TYPE_CHECKING:
    from torchsam.monitor import SharpnessMonitor

__all__ = ["MonitorCallback"]


class MonitorCallback(pl.Callback):
    """Drive a :class:`~torchsam.monitor.SharpnessMonitor` from a Lightning ``Trainer``.

    After each training batch it reports the trainer's global step (optimizer steps) to
    :meth:`~torchsam.monitor.SharpnessMonitor.step`, and after each training epoch the epochs
    completed to :meth:`~torchsam.monitor.SharpnessMonitor.epoch_end`. Lightning's checkpoints
    hold the monitor's state, so a fit resumed from one continues its records.

    Args:
        monitor (SharpnessMonitor): the monitor, built on the LightningModule or the network
            it trains
    """

    def __init__(self, monitor: SharpnessMonitor) -> None:
        super().__init__()
        self.monitor = monitor

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self.monitor.step(trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.monitor.epoch_end(trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's :meth:`~torchsam.monitor.SharpnessMonitor.state_dict`, which Lightning
        saves in its checkpoints."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)
