"""Hypothesis strategies for conv layers and their inputs."""

from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import strategies as st


class OneConv(nn.Module):
    """A single conv, then a ReLU, so the conv node has a user other than the output."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)) + self.conv(x).mean()


class TwoConvs(nn.Module):
    """Two 16 -> 16 3x3 convs in a row (their MACs make fold-or-restore decisions easy to predict)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


class Twice(nn.Module):
    """One conv called at two sites."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


@st.composite
def conv_and_input(draw, dtype=torch.float64, allow_depthwise=False):
    """A random Conv1d/2d/3d (kernel, stride, padding, dilation, groups, bias, padding_mode) and an input."""
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin_g = draw(st.integers(1 if allow_depthwise else 2, 4))
    cout_g = draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    same = draw(st.booleans()) and dims < 3
    stride = (1,) * dims if same else tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = "same" if same else tuple(draw(st.integers(0, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    size = tuple(e + draw(st.integers(0 if padding == "same" else 0, 3)) + 3 for e in extent)
    conv = getattr(nn, f"Conv{dims}d")(
        cin_g * groups, cout_g * groups, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=draw(st.booleans()), padding_mode=mode,
    ).to(dtype)
    batch = draw(st.integers(1, 2))
    x = torch.randn(batch, cin_g * groups, *size, dtype=dtype)
    return conv, x
