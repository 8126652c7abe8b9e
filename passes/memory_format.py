"""choose_memory_format: run a whole model in the memory format that is faster on its back end.

In eager mode ATen runs a convolution in the channels-last format when its input *or* its weight is
channels-last, and converts the other one on every call. A "+linear" form's output permute leaves a
channels-last tensor, so the next conv of a model stored in the default format copies its weight on
each call, its output is channels-last again, and formats alternate through the model. With every
4-D parameter and buffer stored channels-last instead, the first conv converts the input once and
every later op runs in one format (on resnet18 at batch 1, ``max_pool2d`` also leaves its slow
default-format path). The function is the same up to float rounding; what changes is the speed,
which this pass measures rather than assumes: the model is timed in both formats, side by side, and
the faster kept.

The choice goes into ``gm.meta["fxtucker"]`` (``GraphRecord.memory_format`` and
``memory_format_reason``), travels with a manifest and is applied again by :func:`fxtucker.load`.
Nothing in the graph changes: only the strides of the stored tensors.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.latency import TimingCache, check_backend, check_device, measure_latency
from fxtucker.meta import graph_record, set_graph_record
from fxtucker.passes._common import model_digest, prepare

__all__ = ["MEMORY_FORMATS", "choose_memory_format", "set_memory_format", "model_to_channels_last",
           "restore_strides", "keep_memory_format"]

CONTIGUOUS, CHANNELS_LAST = "contiguous", "channels_last"
MEMORY_FORMATS = (CONTIGUOUS, CHANNELS_LAST)
#: How far the channels-last model's outputs may be from the default format's, relative to the
#: largest finite output magnitude: a different summation order, never a different function. For
#: types coarser than float32 a few of their own epsilons (float16: about 1e-3).
RTOL = 1e-4
EPS_FACTOR = 8


def model_to_channels_last(model: nn.Module) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """Put ``model``'s 4-D parameters and buffers in the channels-last format, in place (tensors of
    other ranks, Conv3d's say, and any not laid out densely in one of the two formats, are left as
    they are); (tensor, its strides before) for each one converted, for :func:`restore_strides`."""
    converted = []
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        dense = t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
        if t.dim() != 4 or id(t) in seen or not dense:
            continue
        seen.add(id(t))
        converted.append((t, t.stride()))
        # the format's own strides even where the old ones pass for it (a 1x1 or one-channel kernel):
        # a conv takes its format from its input and weight, and such a kernel would keep it in the default
        t.data = torch.empty_like(t.data, memory_format=torch.channels_last).copy_(t.data)
    return converted


def keep_memory_format(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``'s 4-D weights in the format its record names, in place: the passes that build modules
    (decompose_conv, strip_gates, fold_or_restore) call it last, so a channels-last model never ends
    with default-format factors (each conv would copy its kernel to its input's format every call)."""
    if graph_record(gm).memory_format == CHANNELS_LAST:
        model_to_channels_last(gm)
    return gm


def restore_strides(converted: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Give each tensor :func:`model_to_channels_last` converted its strides from before, values kept."""
    for t, stride in converted:
        if t.stride() != stride:
            t.data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t.data)


def _to_contiguous(model: nn.Module) -> None:
    """Every 4-D parameter and buffer of ``model`` with row-major strides, in place."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.dim() == 4 and t.stride() != torch.empty(t.shape, device="meta").stride():
            t.data = t.data.clone(memory_format=torch.contiguous_format)


def _check_format(memory_format: object, who: str) -> str:
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"{who}: memory_format {memory_format!r} is not known; valid: {list(MEMORY_FORMATS)}")
    return memory_format  # type: ignore[return-value]


def _apply(gm: fx.GraphModule, memory_format: str, reason: str) -> fx.GraphModule:
    if memory_format == CHANNELS_LAST:
        model_to_channels_last(gm)
    else:
        _to_contiguous(gm)
    set_graph_record(gm, dataclasses.replace(graph_record(gm), memory_format=memory_format,
                                             memory_format_reason=reason))
    return gm


def set_memory_format(gm: fx.GraphModule, memory_format: str, *example_inputs: Any, inplace: bool = False,
                      reason: str = "given") -> fx.GraphModule:
    """``gm`` with every 4-D parameter and buffer in ``memory_format`` (``"contiguous"`` or
    ``"channels_last"``), recorded in its GraphRecord; the graph and the values are unchanged.

    With ``example_inputs`` (one batch), ``"channels_last"`` is refused with a ValueError where the
    model does not run in it or computes other outputs there (a ``.view()`` of a conv's output)."""
    _check_format(memory_format, "set_memory_format")
    if not isinstance(reason, str):
        raise TypeError(f"set_memory_format: reason must be a str, got {type(reason).__name__}")
    gm = prepare(gm, inplace, "set_memory_format")
    if memory_format == CHANNELS_LAST and example_inputs:
        why_not = _runs_alike(gm, example_inputs)
        if why_not:
            raise ValueError(f"set_memory_format: the model cannot be stored channels-last: {why_not}; use "
                             f"memory_format='contiguous' (or 'auto', which times only the formats it runs in)")
    return _apply(gm, memory_format, reason)


def _clone(example_inputs: tuple) -> tuple:
    """A fresh copy of each tensor input, so that a model that writes into its input sees the same data."""
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs)


def _tolerance(a: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) for comparing ``a`` computed in the two formats (see :data:`RTOL`)."""
    rtol = max(RTOL, EPS_FACTOR * torch.finfo(a.dtype).eps)
    finite = a[torch.isfinite(a)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return rtol, rtol * max(scale, 1e-12)


def _runs_alike(gm: fx.GraphModule, example_inputs: tuple) -> str:
    """Why ``gm`` in the channels-last format does not compute what it computes in the default one
    ("" when it does): it fails (a ``.view()`` of a channels-last tensor), or its outputs differ.
    A model that does not run in the default format on these inputs is an error, not a reason."""
    with torch.no_grad():
        want = fx_copy(gm, CONTIGUOUS)(*_clone(example_inputs))
        try:
            got = fx_copy(gm, CHANNELS_LAST)(*_clone(example_inputs))
        except Exception as exc:  # noqa: BLE001 - any failure means: not in this format
            return f"it does not run channels-last ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]})"
    flat_want, spec_want = torch.utils._pytree.tree_flatten(want)
    flat_got, spec_got = torch.utils._pytree.tree_flatten(got)
    if spec_want != spec_got:
        return "its outputs channels-last have another structure"
    for a, b in zip(flat_want, flat_got):
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return "its outputs channels-last have other shapes or types"
        if a.is_floating_point():
            rtol, atol = _tolerance(a)
            if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                return "its outputs channels-last differ from the default format's beyond float rounding"
        elif not torch.equal(a, b):
            return "its outputs channels-last differ from the default format's"
    return ""


def fx_copy(gm: fx.GraphModule, memory_format: str) -> fx.GraphModule:
    """A deep copy of ``gm`` with its 4-D tensors in ``memory_format``, in eval mode."""
    return _apply(prepare(gm, False, "fx_copy"), memory_format, "").eval()


def choose_memory_format(gm: fx.GraphModule, *example_inputs: Any, backend: str = "eager", device: str = "cpu",
                         threads: Optional[int] = None, rounds: int = 3, inplace: bool = False) -> fx.GraphModule:
    """``gm`` in the memory format (``"contiguous"`` or ``"channels_last"``) in which it runs faster
    on ``backend`` / ``device`` / ``threads``, timed on ``example_inputs`` (one batch).

    The two formats are timed alternately over ``rounds`` rounds (each :func:`measure_latency`'s
    median of 20 runs), the median per format compared; timings are cached by the model's code,
    modules and input shapes (``fxtucker.latency.cache_dir()``), and a model timed before is not
    timed again. Channels-last is only a candidate where the model runs in it and computes the
    same outputs (a ``.view()`` of a conv's output, say, fails there). The choice and the times go
    into the GraphRecord (``memory_format``, ``memory_format_reason``).
    """
    check_backend(backend, "choose_memory_format")
    check_device(device, "choose_memory_format")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"choose_memory_format: threads must be a positive int or None (torch's current "
                         f"setting), got {threads!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"choose_memory_format: rounds must be an int >= 1, got {rounds!r}")
    gm = prepare(gm, inplace, "choose_memory_format")
    if not any(t.dim() == 4 for t in [*gm.parameters(), *gm.buffers()]):
        return _apply(gm, CONTIGUOUS, "no 4-D weights: the format changes nothing")
    why_not = _runs_alike(gm, example_inputs)
    if why_not:
        return _apply(gm, CONTIGUOUS, f"contiguous: {why_not}")
    used = threads if threads is not None else torch.get_num_threads()
    timed_on = f"{backend}/{device}/{used} thread{'s' if used != 1 else ''}"
    cache = TimingCache()
    digest = model_digest(gm)
    shapes = [[list(x.shape), str(x.dtype), x.dim() == 4 and not x.is_contiguous()] if isinstance(x, torch.Tensor)
              else repr(x) for x in example_inputs]
    keys = {f: TimingCache.key(backend, device, used, what="choose_memory_format", model=digest, inputs=shapes,
                               memory_format=f) for f in MEMORY_FORMATS}
    times = {f: cache.get(k) for f, k in keys.items()}
    if any(ms is None for ms in times.values()):  # one sitting's timings only are compared
        models = {f: fx_copy(gm, f) for f in MEMORY_FORMATS}
        runs: dict[str, list[float]] = {f: [] for f in MEMORY_FORMATS}
        for i in range(rounds):
            for f in (MEMORY_FORMATS if i % 2 == 0 else MEMORY_FORMATS[::-1]):
                runs[f].append(measure_latency(models[f], _clone(example_inputs), backend=backend, device=device,
                                               threads=threads))
        times = {f: statistics.median(runs[f]) for f in MEMORY_FORMATS}
        for f in MEMORY_FORMATS:
            cache.put(keys[f], times[f])
    best = min(MEMORY_FORMATS, key=lambda f: times[f])
    other = CONTIGUOUS if best == CHANNELS_LAST else CHANNELS_LAST
    return _apply(gm, best, f"faster on {timed_on}: {best} {times[best]:.3f} ms, {other} {times[other]:.3f} ms")
