"""The README's quickstart: the pass chain on a small CNN, printing the graph at each stage."""

import torch
import torch.nn as nn

import fxtucker
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, strip_gates


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


torch.manual_seed(0)
model = SmallCNN().eval()
x = torch.randn(1, 3, 32, 32)

gm = cost_model(fxtucker.trace(model), x)  # node.meta["macs"] on every node
print(gm.graph)

gm = decompose_conv(gm)  # full rank: the function is unchanged
gated = insert_gates(gm)  # gate x unit vector per component
print(gated.graph)

# ... train `gated` with the funnel penalty on fxtucker.gates(gated) ...
with torch.no_grad():  # stand-in for training: pretend most of conv2's input components died
    fxtucker.gates(gated)["conv2"]["gate_in"][4:] = 0.0

final = fold_or_restore(strip_gates(gated, threshold=0.01), x)
print(final.graph)
print(fxtucker.report(final))
