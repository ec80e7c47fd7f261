"""torchsam: Sharpness-Aware Minimization for PyTorch."""

from torchsam._batchnorm import freeze_running_stats
from torchsam._engine import SharpnessAwareOptimizer
from torchsam._sam import SAM

__version__ = "0.1.0"

__all__ = ["SAM", "SharpnessAwareOptimizer", "__version__", "freeze_running_stats"]
