"""A module neither torch.export nor torch.fx can trace: its forward branches on tensor data."""
from torch import nn


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.lin(x)
        return x
