import torch

import torchsam


def test_public_names():
    assert set(torchsam.__all__) >= {"SAM", "freeze_running_stats"}
    assert issubclass(torchsam.SAM, torch.optim.Optimizer)
