"""Small problems shared by the flow's tests: a conv of known Tucker rank and data it labels itself."""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from fxtucker import tucker


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.fc = nn.Linear(24 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def toy_problem(seed=0):
    """A conv of Tucker rank (4, 6) and data labelled by the model itself."""
    torch.manual_seed(seed)
    model = Toy()
    core = torch.randn(6, 4, 3, 3)
    u_out, u_in = torch.linalg.qr(torch.randn(24, 6))[0], torch.linalg.qr(torch.randn(16, 4))[0]
    with torch.no_grad():
        model.conv.weight.copy_(0.5 * tucker.reconstruct_tucker2(core, u_out, u_in))
        x = torch.randn(2048, 16, 4, 4)
        y = model(x).argmax(1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256)
    return model, train, test, x[:1]
