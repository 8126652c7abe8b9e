"""fold_or_restore: the cheaper form per layer, original names back, MACs never up."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import FoldRecord, graph_record
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, kept_ranks, predict_macs, strip_gates
from fxtucker.passes.fold_or_restore import recorded_forms
from tests.passes.test_time_forms import three_layers
from tests.conftest import REL_CHAIN_FLOAT32, REL_CHAIN_FLOAT64, reference, rel_error
from tests.strategies import OneConv, TwoConvs, conv_and_input


def _chain(model, x, ranks=None, threshold=0.0):
    gm = cost_model(fxtucker.trace(model), x)
    return fold_or_restore(strip_gates(insert_gates(decompose_conv(gm, ranks=ranks)), threshold), x)


@given(conv_and_input())
@settings(max_examples=30, deadline=None)
def test_whole_chain_full_rank_keeps_function_and_never_raises_macs(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    final = _chain(model, x)
    final.graph.lint()
    assert rel_error(final(x), ref(x)) < REL_CHAIN_FLOAT64
    assert fxtucker.count_macs(final, x) <= fxtucker.count_macs(ref, x)


@given(conv_and_input(), st.floats(0.05, 1.0))
@settings(max_examples=30, deadline=None)
def test_truncated_chain_never_raises_macs(case, frac):
    conv, x = case
    model = OneConv(conv).eval()
    final = _chain(model, x, ranks=frac)
    assert fxtucker.count_macs(final, x) <= fxtucker.count_macs(model, x)
    layer = fxtucker.report(final).layers[0]
    assert layer.macs_after <= layer.macs_before


def test_restore_puts_back_original_names_and_code_golden():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    original = fxtucker.trace(model)
    final = _chain(model, x)  # full rank: every factorisation costs more, so all are restored
    assert final.code == original.code
    assert [n.name for n in final.graph.nodes] == [n.name for n in original.graph.nodes]
    assert [(n.op, n.target) for n in final.graph.nodes] == [(n.op, n.target) for n in original.graph.nodes]
    assert all(type(final.get_submodule(t)) is nn.Conv2d for t in ("conv1", "layer1.0.conv1", "layer2.0.downsample.0"))
    node = next(n for n in final.graph.nodes if n.name == "layer1_0_conv1")
    assert node.meta["fxtucker"] == FoldRecord(source="layer1.0.conv1", decision="restored",
                                               macs_original=64 * 64 * 9 * 16 * 16, macs_decomposed=16 * 16 * (64 * 64 + 64 * 64 * 9 + 64 * 64))
    assert all(l.decision == "restored" for l in fxtucker.report(final).layers)


def test_decision_follows_the_macs():
    model = TwoConvs().double().eval()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    gm = cost_model(fxtucker.trace(model), x)
    final = fold_or_restore(strip_gates(insert_gates(decompose_conv(gm, ranks={"a": (4, 4), "b": (15, 15)})), 0.0), x)
    rep = {l.name: l for l in fxtucker.report(final).layers}
    # a: 64*(16*4 + 4*4*9 + 4*16) = 17408 < 64*16*16*9 = 147456; b: 64*(16*15 + 15*15*9 + 15*16) > 147456
    assert (rep["a"].decision, rep["a"].macs_before, rep["a"].macs_after) == ("decomposed", 147456, 17408)
    assert (rep["b"].decision, rep["b"].macs_after) == ("restored", 147456)
    assert isinstance(final.b, nn.Conv2d) and isinstance(final.get_submodule("a.core"), nn.Conv2d)
    assert final.get_submodule("a.last").__class__ is nn.Conv2d
    assert next(n for n in final.graph.nodes if n.name == "a_last").meta["fxtucker"].decision == "decomposed"
    # the restored b is the HOSVD truncation at (15, 15) multiplied back out
    d = decompose_conv(gm, ranks={"b": (15, 15)})
    assert rel_error(final.b(x), d.get_submodule("b.last")(d.get_submodule("b.core")(d.get_submodule("b.first")(x)))) < 1e-12
    assert sum(n.meta["macs"] for n in final.graph.nodes) == 17408 + 147456


def test_errors():
    x = torch.randn(1, 3, 8, 8)
    gated = insert_gates(decompose_conv(fxtucker.trace(OneConv(nn.Conv2d(3, 4, 3)))))
    with pytest.raises(ValueError, match=r"'conv' still has gate node 'conv_gate_in': run strip_gates\(gm, threshold\) before fold_or_restore"):
        fold_or_restore(gated, x)
    with pytest.raises(ValueError, match=r"fold_or_restore found no decomposed layers"):
        fold_or_restore(fxtucker.trace(OneConv(nn.Conv2d(3, 4, 3))), x)


def test_final_metadata_equals_a_fresh_cost_model_run():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    final = _chain(model, x, ranks={"layer1.0.conv1": (8, 8), "layer2.0.conv2": (120, 120)})
    got = {n.name: (n.meta["macs"], n.meta["params"], tuple(n.meta["tensor_meta"].shape)) for n in final.graph.nodes
           if n.op != "output"}
    fresh = cost_model(copy.deepcopy(final), x)
    want = {n.name: (n.meta["macs"], n.meta["params"], tuple(n.meta["tensor_meta"].shape)) for n in fresh.graph.nodes
            if n.op != "output"}
    assert got == want
    assert [l.decision for l in fxtucker.report(final).layers if l.decision != "skipped"] == ["decomposed", "restored"]


@given(conv_and_input(dtype=torch.float32), st.floats(0.0, 1.5), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_predict_macs_equals_the_real_chain(case, threshold, seed):
    conv, x = case
    model = OneConv(conv).eval()
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: spread the gates over [0, 2)
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(2 * torch.rand(gate.shape, generator=g))
    final = fold_or_restore(strip_gates(gated, threshold), x)
    assert predict_macs(gated, threshold) == fxtucker.count_macs(final, x)
    assert {k: v[0] for k, v in kept_ranks(gated, threshold).items()} == {l.name: l.ranks for l in fxtucker.report(final).layers if l.ranks}


def test_predict_macs_on_resnet18_at_several_thresholds():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model), linear=True)), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape))
    for threshold in (0.0, 0.3, 0.7, 0.95):
        final = fold_or_restore(strip_gates(gated, threshold), x)
        assert predict_macs(gated, threshold) == fxtucker.count_macs(final, x)
    with pytest.raises(ValueError, match=r"predict_macs needs cost-model annotations"):
        predict_macs(insert_gates(decompose_conv(fxtucker.trace(model))), 0.1)


@given(conv_and_input(dtype=torch.float32))
@settings(max_examples=30, deadline=None)
def test_whole_chain_full_rank_float32(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    assert rel_error(_chain(model, x)(x), ref(x)) < REL_CHAIN_FLOAT32


@given(conv_and_input(dtype=torch.float32), st.floats(0.0, 1.5), st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_predict_macs_counts_rounded_ranks(case, threshold, round_to, seed):
    conv, x = case
    model = OneConv(conv).eval()
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(2 * torch.rand(gate.shape, generator=g))
    final = fold_or_restore(strip_gates(gated, threshold, round_to=round_to), x)
    assert predict_macs(gated, threshold, round_to) == fxtucker.count_macs(final, x)
    assert predict_macs(gated, threshold, round_to) >= predict_macs(gated, threshold)


def test_predict_macs_with_round_to_on_resnet18():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape))
    final = fold_or_restore(strip_gates(gated, 0.6, round_to=16), x)
    assert predict_macs(gated, 0.6, 16) == fxtucker.count_macs(final, x)
    ranks = [r for l in fxtucker.report(final).layers for r, f in zip(l.ranks, l.full_ranks) if r != f]
    assert ranks and all(r % 16 == 0 for r in ranks)


def test_threshold_for_budget_with_round_to_meets_the_budget_exactly():
    from fxtucker.compress import CompressConfig, threshold_for_budget

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape))
    target = fxtucker.count_macs(model, x) // 2
    th = threshold_for_budget(gated, target, round_to=16)
    final = fold_or_restore(strip_gates(gated, th, 16), x)
    assert fxtucker.count_macs(final, x) == predict_macs(gated, th, 16) <= target
    # the threshold is the smallest that fits: the next gate value below it would not
    below = max(v for v in torch.cat([g.detach().abs().flatten().double() for l in fxtucker.gates(gated).values()
                                      for g in l.values()]).tolist() if v < th)
    assert predict_macs(gated, below, 16) > target
    assert all(r % 16 == 0 or r == f for l in fxtucker.report(final).layers for r, f in zip(l.ranks, l.full_ranks) if r)
    with pytest.raises(ValueError, match=r"CompressConfig.round_to must be None or an integer >= 1"):
        CompressConfig(round_to=0)


# plan=: the forms given, applied as they are.


def test_plan_applies_every_form_and_keeps_the_function():
    _, x, decomposed = three_layers(torch.float64)
    ref = decomposed(x)
    plans = [{"a": a, "b": b, "c": c, "fc": fc}
             for a, b, c, fc in [("dense", "dense", "dense", "dense"), ("tucker2", "merge_first", "svd", "svd"),
                                 ("merge_first+linear", "merge_last", "dense+linear", "dense"),
                                 ("merge_last+linear", "tucker2", "svd+linear", "svd"),
                                 ("tucker2+linear", "merge_first", "svd", "dense")]]
    for plan in plans:
        final = fold_or_restore(decomposed, x, plan=plan)
        final.graph.lint()
        layers = {l.name: l for l in fxtucker.report(final).layers}
        assert {n: l.form for n, l in layers.items()} == plan
        assert {n: l.decision for n, l in layers.items()} == {
            n: "restored" if f.startswith("dense") else "decomposed" for n, f in plan.items()}
        assert all(l.reason.startswith("given by the plan; ") for l in layers.values())
        assert rel_error(final(x), ref) < REL_CHAIN_FLOAT64
        assert fxtucker.count_macs(final, x) == sum(l.macs_after for l in layers.values())
        fresh = cost_model(copy.deepcopy(final), x)
        assert [n.meta["macs"] for n in final.graph.nodes] == [n.meta["macs"] for n in fresh.graph.nodes]
        assert recorded_forms(graph_record(final).layers) == plan


def test_plan_without_example_inputs_gives_the_structure():
    _, x, decomposed = three_layers(torch.float64)
    plan = {"a": "merge_last+linear", "b": "dense", "c": "svd+linear", "fc": "svd"}
    measured = fold_or_restore(decomposed, x, plan=plan)
    bare = fold_or_restore(decomposed, plan=plan)
    assert bare.code == measured.code
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in measured.state_dict().items())
    assert {l.name: l.form for l in fxtucker.report(bare).layers} == plan
    assert next(n for n in bare.graph.nodes if n.name == "b").meta["fxtucker"] == FoldRecord(
        source="b", decision="restored", macs_original=None, macs_decomposed=None, form="dense")


def test_recorded_forms_of_the_macs_rule():
    _, x, decomposed = three_layers(torch.float64, ranks={"a": (4, 4), "b": (16, 16), "c": 20, "fc": 5})
    final = fold_or_restore(decomposed, x)
    assert all(l.form == "" for l in fxtucker.report(final).layers)  # cost="macs" records no form
    plan = recorded_forms(graph_record(final).layers)
    assert plan == {"a": "tucker2", "b": "dense", "c": "dense", "fc": "svd"}
    assert fold_or_restore(decomposed, x, plan=plan).code == final.code


def test_plan_errors():
    _, x, decomposed = three_layers()
    plan = {"a": "tucker2", "b": "tucker2", "c": "svd", "fc": "svd"}
    with pytest.raises(ValueError, match=r"the plan names \['z'\], which are not decomposed layers of the model"):
        fold_or_restore(decomposed, x, plan={**plan, "z": "dense"})
    with pytest.raises(ValueError, match=r"the plan has no form for \['fc'\]: give every decomposed layer a form"):
        fold_or_restore(decomposed, x, plan={k: v for k, v in plan.items() if k != "fc"})
    with pytest.raises(ValueError, match=r"the plan gives 'c' the form 'tucker2', which its factors do not have; "
                                         r"valid: \['dense', 'svd'\]"):
        fold_or_restore(decomposed, x, plan={**plan, "c": "tucker2"})
    with pytest.raises(ValueError, match=r"the plan gives 'b' the form 'tucker2\+linear', but its tucker2 form has no "
                                         r"pointwise conv"):
        fold_or_restore(decomposed, x, plan={**plan, "b": "tucker2+linear"})
    with pytest.raises(ValueError, match=r"fold_or_restore: plan= applies the forms given and decides nothing, so "
                                         r"\['threads'\] cannot apply; pass them to plan_forms"):
        fold_or_restore(decomposed, x, plan=plan, threads=1)
    with pytest.raises(ValueError, match=r"so \['cost'\] cannot apply"):
        fold_or_restore(decomposed, x, plan=plan, cost="latency")
    with pytest.raises(TypeError, match=r"plan must be a dict layer name -> form, got list"):
        fold_or_restore(decomposed, x, plan=list(plan))
    with pytest.raises(TypeError, match=r"fold_or_restore needs example_inputs"):
        fold_or_restore(decomposed)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x3 = torch.randn(8, 6, 6)  # unbatched: (C, H, W)
    unbatched = decompose_conv(cost_model(fxtucker.trace(model), x3), ranks=0.5)
    with pytest.raises(ValueError, match=r"the plan gives '0' the form 'svd\+linear', but the layer gets an unbatched "
                                         r"input"):
        fold_or_restore(unbatched, x3, plan={"0": "svd+linear", "2": "tucker2"})
