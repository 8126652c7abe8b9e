"""cost_model: per-node MACs, parameters and output shapes, measured by running the graph once."""

from __future__ import annotations

import contextlib
import io
import math
import operator
import sys
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from fxtucker.meta import MACS, PARAMS
from fxtucker.passes._common import check_graph_module

__all__ = ["cost_model", "count_macs", "conv_macs"]

_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_T_FUNCTIONS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm"}
_ADDMM_FUNCTIONS = {torch.addmm, torch.baddbmm}
# Ops that certainly multiply nothing: counted 0 without asking FlopCounterMode.
_NO_MAC_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softmax, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.Flatten, nn.Unflatten,
    nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish,
)  # fmt: skip
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, torch.sigmoid}
_POOLS = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)  # fmt: skip
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.max_pool2d, F.avg_pool2d, torch.flatten}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def conv_macs(out_numel: int, in_channels_per_group: int, kernel_size: tuple[int, ...]) -> int:
    """MACs of a (non-transposed) convolution that produced ``out_numel`` output elements."""
    return out_numel * in_channels_per_group * math.prod(kernel_size)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """Positional argument ``index``, or the keyword ``name`` when it was passed by keyword."""
    return args[index] if len(args) > index else kwargs[name]


def _numel(value: Any) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


class _CostModel(ShapeProp):
    """ShapeProp that also writes ``node.meta["macs"]`` and ``node.meta["params"]``."""

    def __init__(self, gm: fx.GraphModule, include_elementwise: bool):
        super().__init__(gm)
        self.include_elementwise = include_elementwise
        self.current: fx.Node | None = None  # the node being run, named when it fails

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self._has_formula(n):
            out = super().run_node(n)
            macs = self._formula_macs(n, args, kwargs, out)
        else:
            # Grad on: under no_grad, eval-mode nn.MultiheadAttention takes a fused fast path
            # (torch._native_multi_head_attention) that FlopCounterMode has no formula for.
            with FlopCounterMode(display=False) as counter, torch.enable_grad():
                out = super().run_node(n)
            out = out.detach() if isinstance(out, torch.Tensor) else out
            macs = counter.get_total_flops() // 2
        if self.include_elementwise:
            macs += self._elementwise_macs(n, args, out)
        n.meta[MACS] = int(macs)
        n.meta[PARAMS] = self._params(n)
        return out

    def _has_formula(self, n: fx.Node) -> bool:
        """Whether the MACs of ``n`` come from a formula here rather than from FlopCounterMode."""
        if n.op in ("placeholder", "output", "get_attr"):
            return True
        if n.op == "call_module":
            return isinstance(self.module.get_submodule(n.target), (nn.modules.conv._ConvNd, nn.Linear, *_NO_MAC_MODULES))
        if n.op == "call_function":
            t = n.target
            return t in _CONV_FUNCTIONS or t in _CONV_T_FUNCTIONS or t is F.linear or t in _MATMUL_FUNCTIONS or t in _ADDMM_FUNCTIONS
        return n.op == "call_method" and n.target in _MATMUL_METHODS

    def _formula_macs(self, n: fx.Node, args: tuple, kwargs: dict, out: Any) -> int:
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                if m.transposed:
                    return _numel(_arg(args, kwargs, 0, "input")) * (m.out_channels // m.groups) * math.prod(m.kernel_size)
                return conv_macs(_numel(out), m.in_channels // m.groups, m.kernel_size)
            if isinstance(m, nn.Linear):
                return _numel(out) * m.in_features
            return 0
        if n.op == "call_function":
            t = n.target
            if t in _CONV_FUNCTIONS or t in _CONV_T_FUNCTIONS or t is F.linear:
                weight = _arg(args, kwargs, 1, "weight")
                # conv weight is (C_out, C_in/g, *k); transposed (C_in, C_out/g, *k); linear (out, in)
                if t in _CONV_T_FUNCTIONS:
                    return _numel(_arg(args, kwargs, 0, "input")) * math.prod(weight.shape[1:])
                return _numel(out) * math.prod(weight.shape[1:])
            if t in _MATMUL_FUNCTIONS or t in _ADDMM_FUNCTIONS:
                if t in _ADDMM_FUNCTIONS:
                    a = _arg(args, kwargs, 1, "mat1" if t is torch.addmm else "batch1")
                else:
                    a = _arg(args, kwargs, 0, "input")
                return _numel(out) * (a.shape[-1] if a.dim() else 1)
        if n.op == "call_method" and n.target in _MATMUL_METHODS:
            return _numel(out) * (args[0].shape[-1] if args[0].dim() else 1)
        return 0

    def _elementwise_macs(self, n: fx.Node, args: tuple, out: Any) -> int:
        """The extra operations ptflops counts: bias, BN, activations, pooling, adds."""
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                return _numel(out) if m.bias is not None else 0
            if isinstance(m, nn.Linear):
                return m.out_features if m.bias is not None else 0
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return _numel(_arg(args, {}, 0, "input") if args else out) * (2 if m.affine else 1)
            if isinstance(m, _ACTIVATIONS):
                return _numel(out)
            if isinstance(m, _POOLS):
                return _numel(args[0] if args else out)
            return 0
        if n.op == "call_function":
            if n.target in _ACTIVATION_FUNCTIONS:
                return _numel(out)
            if n.target in _POOL_FUNCTIONS and n.target is not torch.flatten:
                return _numel(args[0] if args else out)
            if n.target in _ADD_FUNCTIONS:
                return _numel(out)
        if n.op == "call_method" and n.target in ("add", "add_"):
            return _numel(out)
        return 0

    def _params(self, n: fx.Node) -> int:
        if n.op == "call_module":
            return sum(p.numel() for p in self.module.get_submodule(n.target).parameters())
        if n.op == "get_attr":
            value = self.fetch_attr(n.target)
            return value.numel() if isinstance(value, nn.Parameter) else 0
        return 0


def _describe_input(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
    return type(t).__name__


def _check_inputs(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """A floating-point input must match the dtype and device of the model's floating-point parameters."""
    params = [p for p in gm.parameters() if p.is_floating_point()]
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            continue
        if t.dim() and t.numel() == 0:
            raise ValueError(
                f"cost_model: example input {i} has shape {tuple(t.shape)}: it holds no elements, so every layer "
                f"would cost 0 MACs and every decision would be void; pass one batch of at least one sample"
            )
        if t.is_floating_point() and len(dtypes) == 1 and t.dtype not in dtypes:
            (dtype,) = dtypes
            raise TypeError(
                f"cost_model: example input {i} has dtype {t.dtype} but the model's parameters are {dtype}; "
                f"pass the input as x.to({dtype}) or convert the model with model.to({t.dtype})"
            )
        if len(devices) == 1 and t.device not in devices:
            (device,) = devices
            raise ValueError(
                f"cost_model: example input {i} is on {t.device} but the model's parameters are on {device}; "
                f"pass the input as x.to({str(device)!r})"
            )


def cost_model(gm: fx.GraphModule, *example_inputs: Any, include_elementwise: bool = False) -> fx.GraphModule:
    """Annotate every node with its MACs, parameter count and output shape.

    An analysis pass: it runs ``gm`` once on ``example_inputs`` (in eval mode and without
    gradients, so BatchNorm statistics are left alone) and writes, on every node,
    ``node.meta["macs"]`` (multiply-accumulates for this batch; 0 where nothing multiplies),
    ``node.meta["params"]`` and ``node.meta["tensor_meta"]`` (as ShapeProp does). It returns
    ``gm`` itself; nothing else is changed.

    MACs follow torchvision's convention: ``N*C_out*H_out*W_out*(C_in/groups)*k_h*k_w`` for a
    conv (transposed: per input position), ``N*in*out`` for linear, the matmul family likewise;
    bias, BatchNorm and activations excluded, so the total equals
    ``torch.utils.flop_counter.FlopCounterMode`` / 2. Layers without a formula here (attention,
    say) are counted by FlopCounterMode. ``include_elementwise=True`` adds bias, BatchNorm,
    activations, pooling and adds the way ptflops counts them (the paper's GMAC figures).

    Args:
        gm: the GraphModule to annotate.
        example_inputs: the positional inputs of ``gm``, for one batch.
        include_elementwise: also count elementwise work (see above).

    Raises:
        TypeError: a floating-point input whose dtype is not the parameters' dtype.
        ValueError: no inputs, an input on another device than the parameters, or inputs the
            model does not run on (wrong shape, say); the message names the node that failed.

    Example::

        >>> gm = cost_model(fxtucker.trace(resnet18()), torch.randn(1, 3, 224, 224))
        >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].meta["macs"]
        118013952
    """
    check_graph_module(gm, "cost_model")
    if not example_inputs:
        raise ValueError("cost_model needs example inputs: call cost_model(gm, *example_inputs) with one batch")
    if not isinstance(include_elementwise, bool):
        raise TypeError(f"cost_model: include_elementwise must be True or False, got {include_elementwise!r}")
    _check_inputs(gm, example_inputs)
    # A model that changes its input in place must not change the caller's example tensors.
    example_inputs = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    interpreter = _CostModel(gm, include_elementwise)
    # ShapeProp prints a traceback before re-raising; the error below says it all, so what went
    # to stderr is passed on only when the run succeeds.
    stderr = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(stderr):
            interpreter.propagate(*example_inputs)
        sys.stderr.write(stderr.getvalue())
    except Exception as exc:
        n = interpreter.current
        cause = exc.__cause__ if exc.__cause__ is not None and "ShapeProp error" in str(exc) else exc
        where = "" if n is None else f" at node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)!s})"
        found = ", ".join(_describe_input(t) for t in example_inputs)
        first_line = (str(cause).strip().splitlines() or [""])[0]
        raise ValueError(
            f"cost_model could not run the model on the example inputs ({found}){where}: "
            f"{type(cause).__name__}: {first_line}; pass one batch of the inputs the model expects "
            f"(shape, dtype and device as in training)"
        ) from cause
    finally:
        for m, training in modes.items():
            m.train(training)
    return gm


def count_macs(module_or_gm: nn.Module, *example_inputs: Any, include_elementwise: bool = False) -> int:
    """Total MACs of a model for ``example_inputs`` (see :func:`cost_model` for the convention)."""
    from fxtucker.tracing import trace

    gm = trace(module_or_gm)
    cost_model(gm, *example_inputs, include_elementwise=include_elementwise)
    return sum(n.meta[MACS] for n in gm.graph.nodes)
