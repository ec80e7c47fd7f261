import inspect

import torch

import torchsam

OPTIMIZERS = {
    "SAM",
    "GSAM",
    "FriendlySAM",
    "VaSSO",
    "WSAM",
    "MSAM",
    "LookSAM",
    "ESAM",
    "IntermittentSAM",
}


def test_public_names():
    assert set(torchsam.__all__) >= OPTIMIZERS | {
        "MESA",
        "SAF",
        "SharpnessAwareOptimizer",
        "__version__",
        "freeze_running_stats",
        "trajectory_kl",
    }
    for name in torchsam.__all__:
        assert getattr(torchsam, name) is not None, name
    for name in OPTIMIZERS:
        cls = getattr(torchsam, name)
        assert issubclass(cls, torchsam.SAM), name
        assert issubclass(cls, torch.optim.Optimizer), name
        assert list(inspect.signature(cls).parameters)[:3] == ["params", "base_optimizer", "rho"]
    for name in ("MESA", "SAF"):
        assert issubclass(getattr(torchsam, name), torch.nn.Module), name
    assert callable(torchsam.freeze_running_stats)
    assert torchsam.__version__.count(".") == 2
