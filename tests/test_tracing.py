"""fxtucker.trace: leaf modules, concrete args and the TraceError message."""

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxtucker
from fxtucker.passes import decompose_conv


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = DataDependent()

    def forward(self, x, flip: bool = False):
        y = self.gate(self.conv(x))
        return -y if flip else y


def test_trace_error_names_module_line_and_hints():
    with pytest.raises(fxtucker.TraceError) as info:
        fxtucker.trace(Net())
    msg = str(info.value)
    assert "could not trace Net: inside DataDependent ('gate')" in msg
    assert "test_tracing.py:" in msg and "if x.sum() > 0:" in msg
    assert "pass leaf_modules=[DataDependent]" in msg
    assert isinstance(info.value.__cause__, Exception)


def test_leaf_modules_by_type_or_name_and_concrete_args():
    x = torch.randn(1, 3, 6, 6)
    model = Net()
    for leaves in ([DataDependent], ["gate"]):
        gm = fxtucker.trace(model, leaf_modules=leaves, concrete_args={"flip": True})
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "gate"]
        torch.testing.assert_close(gm(x, True), model(x, flip=True))


def test_top_level_control_flow_suggests_concrete_args():
    class Top(nn.Module):
        def forward(self, x):
            return x if x.shape[0] > 1 and x.sum() > 0 else x

    with pytest.raises(fxtucker.TraceError, match=r"pass concrete_args=\{...\} to fix the arguments that steer control flow"):
        fxtucker.trace(Top())


def test_plain_symbolic_trace_output_works_with_the_passes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).double()
    gm = decompose_conv(fx.symbolic_trace(model))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(gm(x), model(x))
    assert fxtucker.trace(gm) is gm


def test_errors():
    with pytest.raises(TypeError, match=r"trace expects an nn.Module, got function"):
        fxtucker.trace(lambda x: x)
    with pytest.raises(TypeError, match=r"valid entries are nn.Module subclasses or qualified module names"):
        fxtucker.trace(Net(), leaf_modules=[3])
    with pytest.raises(ValueError, match=r"leaf_modules names \['nope'\] that are not submodules of Net"):
        fxtucker.trace(Net(), leaf_modules=["nope"])


def test_traced_graph_module_pickles_and_saves(tmp_path):
    import io
    import pickle

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    gm = fxtucker.trace(model)
    x = torch.randn(1, 3, 8, 8)
    again = pickle.loads(pickle.dumps(gm))
    assert torch.equal(again(x), gm(x))
    buf = io.BytesIO()
    torch.save(gm, buf)  # a whole-module save (weights_only=False on load: trusted files only)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), gm(x))
