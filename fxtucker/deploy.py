"""optimize_for_inference(): a model ready to deploy on one back end, as a plain-torch GraphModule."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker import pipeline
from fxtucker.latency import check_backend, check_device
from fxtucker.meta import factor_record
from fxtucker.passes.decompose_conv import RanksArg
from fxtucker.passes.fold_or_restore import SEARCHES
from fxtucker.passes.memory_format import MEMORY_FORMATS
from fxtucker.tracing import trace

__all__ = ["optimize_for_inference"]


def _has_factors(model: nn.Module) -> bool:
    return isinstance(model, fx.GraphModule) and any(factor_record(n) is not None for n in model.graph.nodes)


def optimize_for_inference(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    *,
    ranks: RanksArg = None,
    method: str = "tucker2",
    backend: str = "eager",
    device: str = "cpu",
    round_to: Optional[int] = None,
    threads: Optional[int] = None,
    max_macs: Optional[int] = None,
    search: str = "layer",
    linear: bool = False,
    memory_format: str = "auto",
    pointwise: bool = True,
) -> fx.GraphModule:
    """Trace, fold BatchNorm, decompose at ``ranks`` and keep per layer the form that runs fastest on ``backend``.

    The steps: :func:`fxtucker.trace` a copy of ``model`` in eval mode, :func:`fold_bn`,
    :func:`cost_model`, and, when ``ranks`` are given, :func:`decompose_conv` (``ranks`` rounded
    up to a multiple of ``round_to``) and ``fold_or_restore(cost="latency")``, which times each
    decomposed layer as the original conv, as Tucker-2 and as the two Tucker-1 merges at its real
    input shape on ``backend`` / ``device`` / ``threads`` and keeps the fastest (timings cached,
    see :func:`fxtucker.passes.fold_or_restore`). BatchNorm is folded before decomposing, so the
    truncation approximates the kernels the network really applies.

    Last, the weights are stored in the memory format the model runs faster in
    (:func:`fxtucker.passes.choose_memory_format`): on ``backend="eager"`` the whole model is timed
    with its 4-D weights in the default format and channels-last and the faster kept, since a conv
    runs channels-last when its weight is, and a "+linear" form leaves channels-last tensors that
    make a default-format conv convert its weight on every call. The graph and the function do not
    change; ``memory_format`` fixes the format instead of timing it.

    With ``ranks=None`` nothing is decomposed: the result is the BN-folded original (its memory
    format chosen the same way), the fair baseline to time a compressed model against. A GraphModule that is already decomposed (the
    ``model`` of :func:`fxtucker.compress`, or any output of the pass chain) keeps its ranks: its
    BatchNorms are folded and its layers get the back-end-aware decision.

    The result holds only standard ``torch.nn`` modules and plain graph code: it runs as it is in
    eager mode, in ``channels_last``, under ``torch.compile``, ``torch.export`` and
    ``torch.onnx.export``. fxtucker does not apply
    :func:`torch.fx.experimental.optimization.optimize_for_inference` (MKLDNN layout between
    convs) for ``backend="eager"``: it swaps convs for MKLDNN TorchScript modules, which
    ``torch.export`` and ONNX export do not take; apply it yourself to the result for eager CPU.

    Args:
        model: the trained network (left untouched), or a decomposed GraphModule.
        example_inputs: a tensor or tuple of tensors: one batch at the deployment shape (layers
            are timed at the shapes this batch gives them).
        ranks: as in :func:`decompose_conv` (a fraction in (0, 1], a dict, a callable,
            ``"vbmf"``); None decomposes nothing.
        method: how kxk convs are decomposed: ``"tucker2"`` or ``"svd"`` (see :func:`decompose_conv`).
        backend: ``"eager"``, ``"compile"``, ``"compile-freezing"`` or ``"onnxruntime"``.
        device: ``"cpu"`` or ``"cuda"``: where the layers are timed.
        round_to: round fractional ranks up to a multiple of this (e.g. 8 or 16).
        threads: CPU threads while timing (None: torch's current setting).
        max_macs: an upper bound on the result's MACs (see ``fold_or_restore``).
        search: ``"layer"`` (each layer's fastest form) or ``"model"`` (also a few whole models
            timed with candidate form sets, the fastest kept: slower to prepare, it sees what
            the back end does across layers; see ``fold_or_restore``).
        linear: also decompose Linear layers.
        pointwise: also decompose 1x1 convs (``False`` leaves them whole; see ``decompose_conv``).
        memory_format: ``"auto"`` (timed on ``"eager"``; the default format on the other back ends,
            which lay tensors out themselves or export the graph), ``"contiguous"`` or
            ``"channels_last"`` (a ValueError where the model does not run in it, e.g. a ``.view()``
            of a conv's output); the result's ``GraphRecord.memory_format`` says which, and why.

    Returns:
        A GraphModule in eval mode, with the fxtucker records (:func:`fxtucker.report`).

    Example::

        >>> x = torch.randn(1, 3, 224, 224)
        >>> baseline = optimize_for_inference(resnet18, x)
        >>> fast = optimize_for_inference(resnet18, x, ranks=0.5, backend="onnxruntime", round_to=16, threads=2)
    """
    check_backend(backend, "optimize_for_inference")
    check_device(device, "optimize_for_inference")
    if memory_format not in ("auto", *MEMORY_FORMATS):
        raise ValueError(f"memory_format {memory_format!r} is not known to optimize_for_inference; valid: "
                         f"{['auto', *MEMORY_FORMATS]}")
    if search not in SEARCHES:
        raise ValueError(f"search {search!r} is not known to optimize_for_inference; valid: {list(SEARCHES)}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (one batch of the model's inputs)")
    decomposed = _has_factors(model)
    if decomposed and ranks is not None:
        raise ValueError(f"model is already decomposed (it has fxtucker factor nodes), so ranks={ranks!r} cannot "
                         f"apply; pass ranks=None to keep its ranks, or the original model to decompose it afresh")
    if decomposed and round_to is not None:
        raise ValueError("model is already decomposed: round_to cannot change its ranks; use "
                         "strip_gates(..., round_to=...) or CompressConfig(round_to=...) when compressing")
    if ranks is None and not decomposed and max_macs is not None:
        raise ValueError("max_macs bounds the layers' decomposed forms: it needs ranks (nothing is decomposed "
                         "with ranks=None)")
    gm = copy.deepcopy(model).eval() if decomposed else trace(copy.deepcopy(model).eval())
    gm.eval()
    chain = pipeline.deployment(inputs, ranks=ranks, decomposed=decomposed, method=method, linear=linear,
                                round_to=round_to, backend=backend, device=device, threads=threads,
                                max_macs=max_macs, search=search, memory_format=memory_format, pointwise=pointwise)
    return chain(gm).eval()
