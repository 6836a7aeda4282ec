"""Small float64 models shared by the tests."""

import torch
from torch import nn


def mlp(d_out: int = 3, d_in: int = 4, hidden: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).double()


def cnn(d_out: int = 1, seed: int = 0) -> nn.Module:
    """Input ``[B, 1, 6, 6]``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, d_out),
    ).double()


def batchnorm_mlp(d_out: int = 2, seed: int = 0) -> nn.Module:
    """An MLP with BatchNorm whose running statistics were updated, returned in eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, d_out)).double()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4, dtype=torch.float64) * 2 + 1)
    return model.eval()


class TwoInputNet(nn.Module):
    """A model called as ``net(x, z)``, used with dict batches."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fx = nn.Linear(3, 5)
        self.fz = nn.Linear(2, 5)
        self.head = nn.Linear(5, 2)
        self.double()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fx(x) * self.fz(z)))
