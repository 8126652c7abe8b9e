"""forms: every form of a decomposed layer computes the layer's function; pointwise_as_linear."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import graph_record
from fxtucker.passes import cost_model, decompose_conv
from fxtucker.passes.forms import (FORMS, LINEAR, ChannelsLinear, base_forms, candidate_forms, dense_module,
                                   is_pointwise, merged_module, pointwise_as_linear, with_linear)
from tests.conftest import REL_CHAIN_FLOAT64, rel_error
from tests.passes.test_time_forms import three_layers
from tests.strategies import OneConv, conv_and_input


def _run(chain, x):
    for m in chain:
        x = m(x)
    return x


@given(conv_and_input(), st.floats(0.3, 1.0), st.sampled_from(["tucker2", "svd"]))
@settings(max_examples=30, deadline=None)
def test_every_candidate_form_computes_the_factors_function(case, frac, method):
    conv, x = case
    decomposed = decompose_conv(cost_model(fxtucker.trace(OneConv(conv).eval()), x), ranks=frac, method=method)
    rec = graph_record(decomposed).layers[0]
    container = decomposed.get_submodule(rec.name)
    forms = with_linear(candidate_forms(container, rec.spec), batched=x.dim() == conv.weight.dim())
    assert set(f.removesuffix(LINEAR) for f in forms) <= set(FORMS)
    assert list(candidate_forms(container, rec.spec)) == list(base_forms(container))
    want = _run(forms["tucker2" if "core" in container else "svd"], x)
    for name, chain in forms.items():
        assert rel_error(_run(chain, x), want) < REL_CHAIN_FLOAT64, name
        assert any(isinstance(m, ChannelsLinear) for m in chain) == name.endswith(LINEAR)


def test_merged_modules_with_groups_and_biases():
    torch.manual_seed(0)
    first = nn.Conv2d(8, 6, 1, groups=2, bias=False).double()
    core = nn.Conv2d(6, 10, 3, padding=1, stride=2, groups=2).double()
    last = nn.Conv2d(10, 12, 1, groups=2).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    want = last(core(first(x)))
    assert rel_error(last(merged_module(core, first, "first")(x)), want) < 1e-12
    merged = merged_module(core, last, "last")
    assert (merged.in_channels, merged.out_channels, merged.groups, merged.stride) == (6, 12, 2, (2, 2))
    assert rel_error(merged(first(x)), want) < 1e-12
    with pytest.raises(ValueError, match=r"merge: into must be 'first' or 'last', got 'core'"):
        merged_module(core, last, "core")


def test_dense_module_of_each_layer_kind_is_the_product():
    _, x, decomposed = three_layers(torch.float64)
    for rec in graph_record(decomposed).layers:
        container = decomposed.get_submodule(rec.name)
        dense = dense_module(container, rec.spec)
        assert type(dense) is (nn.Linear if rec.spec is None else nn.Conv2d)
        assert dense.weight.stride() == torch.empty(dense.weight.shape).stride()  # row-major: see standard_strides
        x_in = torch.randn(2, *(container["first"].weight.shape[1:2]), *((5, 5) if rec.spec else ()), dtype=torch.float64)
        if rec.spec is not None and rec.spec.groups > 1:
            x_in = torch.randn(2, rec.spec.in_channels, 5, 5, dtype=torch.float64)
        assert rel_error(dense(x_in), _run(list(container.values()), x_in)) < REL_CHAIN_FLOAT64


def test_pointwise_as_linear_refuses_other_convs():
    _, x, decomposed = three_layers()
    node = next(n for n in decomposed.graph.nodes if n.target == "a.core")
    assert not is_pointwise(decomposed.get_submodule("a.core")) and is_pointwise(decomposed.get_submodule("a.first"))
    with pytest.raises(ValueError, match=r"'a.core' is not a pointwise conv \(1x1, stride 1, no padding, groups 1\)"):
        pointwise_as_linear(decomposed, "a.core", [node])
