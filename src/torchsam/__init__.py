"""torchsam: Sharpness-Aware Minimization for PyTorch."""

from torchsam import landscape, sharpness
from torchsam._batchnorm import freeze_running_stats
from torchsam._engine import SharpnessAwareOptimizer
from torchsam._esam import ESAM
from torchsam._fsam import FriendlySAM
from torchsam._gsam import GSAM
from torchsam._intermittent import IntermittentSAM
from torchsam._looksam import LookSAM
from torchsam._msam import MSAM
from torchsam._sam import SAM
from torchsam._trajectory import MESA, SAF, trajectory_kl
from torchsam._vasso import VaSSO
from torchsam._wsam import WSAM

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
    "IntermittentSAM",
    "LookSAM",
    "SharpnessAwareOptimizer",
    "VaSSO",
    "__version__",
    "freeze_running_stats",
    "landscape",
    "sharpness",
    "trajectory_kl",
]
