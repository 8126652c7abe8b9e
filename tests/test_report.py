"""fxtucker.report: the per-layer table as text and as a JSON-ready dict."""

import json

import pytest
import torch
import torch.nn as nn

import fxtucker
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, strip_gates


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)

    def forward(self, x):
        return self.dw(self.conv(x))


def test_report_text_and_dict_after_the_chain():
    x = torch.randn(1, 8, 8, 8)
    gm = cost_model(fxtucker.trace(Net()), x)
    with pytest.warns(UserWarning, match="left 1 layer"):
        d = decompose_conv(gm, ranks=0.25)
    final = fold_or_restore(strip_gates(insert_gates(d), 0.0), x)
    rep = fxtucker.report(final)
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["layer", "op", "in", "out", "full", "ranks"]
    assert lines[2].split()[:8] == ["conv", "Conv2d", "1x8x8x8", "1x16x8x8", "8x16", "2x4", "73,728", "9,728"]  # 64 * (8*2 + 2*4*9 + 4*16)
    assert "decomposed" in lines[2] and "skipped" in lines[3] and "one input channel per group" in lines[3]
    assert lines[-1] == "total over these layers: 82,944 -> 18,944 MACs (4.38x fewer)"
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["stage"] == "fold_or_restore" and d["macs_before"] == 73728 + 64 * 16 * 9 and d["macs_after"] == 9728 + 64 * 16 * 9
    assert d["layers"][0]["ranks"] == [2, 4] and d["layers"][0]["spec"]["padding"] == [1, 1]


def test_report_errors():
    with pytest.raises(ValueError, match=r"carries no fxtucker record: run decompose_conv"):
        fxtucker.report(fxtucker.trace(Net()))
    with pytest.raises(TypeError, match=r"report expects a GraphModule"):
        fxtucker.report(Net())
