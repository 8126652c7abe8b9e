"""The FX passes of fxtucker, in pipeline order.

    cost_model -> plan_decomposition -> decompose_conv -> insert_gates -> (train, through compose_factors) -> strip_gates -> plan_forms -> fold_or_restore -> fold_bn -> choose_memory_format

Each takes a GraphModule and returns one (a copy unless ``inplace=True``; cost_model annotates
and returns its argument).
"""

from fxtucker.passes._common import layer_nodes
from fxtucker.passes.cost_model import cost_model, count_macs
from fxtucker.passes.plan_decomposition import plan_decomposition
from fxtucker.passes.decompose_conv import decompose_conv
from fxtucker.passes.insert_gates import Gate, UnitNorm, gates, insert_gates
from fxtucker.passes.compose_factors import ComposedConv, compose_factors
from fxtucker.passes.strip_gates import kept_ranks, strip_gates
from fxtucker.passes.time_forms import plan_forms
from fxtucker.passes.fold_or_restore import fold_or_restore, predict_macs
from fxtucker.passes.fold_bn import fold_bn
from fxtucker.passes.memory_format import choose_memory_format, set_memory_format

__all__ = [
    "layer_nodes",
    "cost_model",
    "count_macs",
    "plan_decomposition",
    "decompose_conv",
    "insert_gates",
    "gates",
    "Gate",
    "UnitNorm",
    "compose_factors",
    "ComposedConv",
    "strip_gates",
    "kept_ranks",
    "plan_forms",
    "fold_or_restore",
    "predict_macs",
    "fold_bn",
    "choose_memory_format",
    "set_memory_format",
]
