"""fxtucker.pipeline: the one place the pass chain is composed."""

import copy

import pytest
import torch
import torch.fx as fx

import fxtucker
from fxtucker import pipeline
from fxtucker.models import get_model
from fxtucker.passes import cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, strip_gates

from .conftest import EXACT


def _traced(seed=0):
    torch.manual_seed(seed)
    return fxtucker.trace(get_model("resnet20", num_classes=10, in_channels=1).eval())


def _same_graph(a: fx.GraphModule, b: fx.GraphModule):
    assert [(n.op, n.name, str(n.target)) for n in a.graph.nodes] == [(n.op, n.name, str(n.target)) for n in b.graph.nodes]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **EXACT)


def test_pipelines_print_their_steps():
    x = torch.randn(2, 1, 28, 28)
    assert repr(pipeline.decomposition((x,))) == "Pipeline(cost_model -> decompose_conv -> insert_gates -> cost_model)"
    assert repr(pipeline.decomposition((x,), gated=False)) == "Pipeline(cost_model -> decompose_conv)"
    assert pipeline.pruning((x,), 0.1).names == ["strip_gates", "fold_or_restore"]
    timed = "choose_memory_format"  # on the eager back end, the weights' format is timed last
    assert pipeline.deployment((x,)).names == ["fold_bn", "cost_model", timed]
    # the forms are timed in the format chosen on the factors, which is timed again with the forms
    assert pipeline.deployment((x,), ranks=0.5).names == ["fold_bn", "cost_model", "decompose_conv", timed,
                                                          "fold_or_restore", timed]
    assert pipeline.deployment((x,), decomposed=True).names == ["fold_bn", "cost_model", timed, "fold_or_restore", timed]
    assert pipeline.deployment((x,), decomposed=True, memory_format="contiguous").names == [
        "fold_bn", "cost_model", "set_memory_format", "fold_or_restore"]
    # other back ends lay tensors out themselves: the default format, set untimed; a given format is set
    assert pipeline.deployment((x,), backend="onnxruntime").names == ["fold_bn", "cost_model", "set_memory_format"]
    assert pipeline.deployment((x,), memory_format="channels_last").names == ["fold_bn", "cost_model",
                                                                               "set_memory_format"]
    both = pipeline.decomposition((x,)) + pipeline.pruning((x,), 0.1)
    assert len(both) == 6 and [s.name for s in both][-1] == "fold_or_restore"


def test_pipeline_equals_the_passes_called_by_hand():
    x = torch.randn(2, 1, 28, 28)
    by_hand = cost_model(insert_gates(decompose_conv(cost_model(_traced(), x), ranks=0.5)), x)
    by_hand = fold_or_restore(strip_gates(by_hand, 0.5, relative=True), x)
    chained = (pipeline.decomposition((x,), ranks=0.5) + pipeline.pruning((x,), 0.5, relative=True))(_traced())
    _same_graph(by_hand, chained)
    assert [n.meta.get("macs") for n in by_hand.graph.nodes] == [n.meta.get("macs") for n in chained.graph.nodes]
    torch.testing.assert_close(by_hand(x), chained(x), **EXACT)


def test_deployment_equals_the_passes_called_by_hand():
    x = torch.randn(1, 1, 28, 28)
    by_hand = decompose_conv(cost_model(fold_bn(_traced()), x), ranks=0.5)
    chained = pipeline.deployment((x,), ranks=0.5, decomposed=False)
    # the timed steps come after decompose_conv; the MAC path is compared above
    chained = pipeline.Pipeline(chained.steps[:3])(_traced())  # before the timed format and forms
    _same_graph(by_hand, chained)  # asserts node for node and tensor for tensor
    torch.testing.assert_close(by_hand(x), chained(x), **EXACT)


def test_pipeline_rejects_what_is_not_a_pass_chain():
    with pytest.raises(TypeError, match="Step"):
        pipeline.Pipeline([lambda gm: gm])
    with pytest.raises(TypeError, match="GraphModule"):
        pipeline.decomposition((torch.randn(1, 1, 28, 28),))(torch.nn.Linear(2, 2))
    bad = pipeline.Pipeline([pipeline.Step("returns_none", lambda gm: None)])
    with pytest.raises(TypeError, match="'returns_none' returned NoneType"):
        bad(_traced())


def test_pipeline_works_on_the_graph_it_is_given():
    gm = _traced()
    out = pipeline.decomposition((torch.randn(1, 1, 28, 28),), ranks=0.5, gated=False)(gm)
    assert out is gm  # in place: the caller hands over a GraphModule it owns
    copy.deepcopy(out)(torch.randn(1, 1, 28, 28))
