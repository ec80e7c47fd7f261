"""torchsam: Sharpness-Aware Minimization for PyTorch."""

import warnings

# torch warns "Failed to initialize NumPy" on import when NumPy is missing. The library never
# needs NumPy (only the plots and the experiments do, and their extras install it), so a fresh
# install (torch is the only dependency) should not print that. This hides it only where
# torchsam is imported before torch; the install page says the warning is harmless.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from torchsam import distributed, landscape, sharpness
from torchsam._batchnorm import freeze_running_stats
from torchsam._engine import GroupView, SharpnessAwareOptimizer, StepContext, VariantContract
from torchsam._esam import ESAM
from torchsam._fsam import FriendlySAM
from torchsam._gsam import GSAM
from torchsam._intermittent import IntermittentSAM
from torchsam._looksam import LookSAM
from torchsam._momentum_sam import MomentumSAM
from torchsam._msam import MSAM
from torchsam._sam import SAM
from torchsam._trajectory import MESA, SAF, trajectory_kl
from torchsam._vasso import VaSSO
from torchsam._wsam import WSAM
from torchsam.monitor import SharpnessMonitor

__version__ = "0.1.0"

__all__ = [
    "ESAM",
    "GSAM",
    "MESA",
    "MSAM",
    "SAF",
    "SAM",
    "WSAM",
    "FriendlySAM",
    "GroupView",
    "IntermittentSAM",
    "LookSAM",
    "MomentumSAM",
    "SharpnessAwareOptimizer",
    "SharpnessMonitor",
    "StepContext",
    "VaSSO",
    "VariantContract",
    "__version__",
    "distributed",
    "freeze_running_stats",
    "landscape",
    "sharpness",
    "trajectory_kl",
]
