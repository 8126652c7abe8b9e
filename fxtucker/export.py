"""export() and load(): write a compressed model for deployment, reload it, check it computes the same.

Four formats:

- ``"onnx"``: ``torch.onnx.export`` (the dynamo exporter), checked with onnxruntime.
- ``"torchscript"``: ``torch.jit.script`` (``torch.jit.trace`` where scripting fails), checked
  with ``torch.jit.load``.
- ``"torch.export"``: ``torch.export.export`` + ``torch.export.save``, checked with
  ``torch.export.load``.
- ``"manifest"``: a directory with ``manifest.json`` (the graph's records: the recorded plan)
  and ``weights.pt`` (tensors only), written and reloaded by :mod:`fxtucker.manifest`
  (:func:`load` replays the pass chain with the recorded plan on the original architecture).

Every export reloads what it wrote and compares its outputs with the model's on the example
inputs; :class:`ExportError` says by how much they differ when they do.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from fxtucker.io import write_atomic
from fxtucker.manifest import MANIFEST_VERSION, check_manifest_graph, load, read_manifest, write_manifest

__all__ = ["export", "load", "read_manifest", "compare_outputs", "ExportError", "ExportResult", "FORMATS", "MANIFEST_VERSION"]

FORMATS = ("onnx", "torchscript", "torch.export", "manifest")
_INSTALL_HINT = "pip install fxtucker[export]"


class ExportError(RuntimeError):
    """The exported model, reloaded, does not compute what the original does on the example inputs."""

    def __init__(self, message: str, *, max_abs_error: float = math.nan, max_rel_error: float = math.nan):
        super().__init__(message)
        self.max_abs_error = max_abs_error
        self.max_rel_error = max_rel_error


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how closely the reloaded model matched.

    ``path`` is the file (or, for "manifest", the directory) written; ``files`` every file
    written; ``max_abs_error`` / ``max_rel_error`` the largest elementwise ``|out - ref|`` and
    ``|out - ref| / max(|ref|, atol)`` over all outputs of the reloaded model on the example inputs;
    ``method`` how the model was captured (e.g. ``"script"`` or ``"trace"`` for TorchScript).
    """

    path: Path
    format: str
    files: tuple[Path, ...]
    max_abs_error: float
    max_rel_error: float
    rtol: float
    atol: float
    method: str = ""


# ----------------------------------------------------------------------------- comparing outputs


def _tensors(value: Any, what: str) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf.detach())
        elif hasattr(leaf, "__array__"):  # onnxruntime returns numpy arrays
            out.append(torch.as_tensor(leaf))
        else:
            raise ExportError(f"{what} returned a {type(leaf).__name__} among its outputs; only tensor outputs "
                              f"can be compared")
    return out


def compare_outputs(ref: Any, got: Any, fmt: str, rtol: float, atol: float) -> tuple[float, float]:
    """Max abs and rel error of ``got`` against ``ref``; ExportError where they differ beyond the tolerance."""
    refs, gots = _tensors(ref, "the model"), _tensors(got, f"the reloaded {fmt} model")
    if len(refs) != len(gots):
        raise ExportError(f"the reloaded {fmt} model returns {len(gots)} tensor(s), the model {len(refs)}")
    max_abs = max_rel = 0.0
    bad = []
    for i, (r, g) in enumerate(zip(refs, gots)):
        if tuple(r.shape) != tuple(g.shape):
            raise ExportError(f"output {i} of the reloaded {fmt} model has shape {tuple(g.shape)}, "
                              f"the model's {tuple(r.shape)}")
        r64, g64 = r.cpu().double(), g.cpu().double()
        diff = (g64 - r64).abs()
        both_nan = r64.isnan() & g64.isnan()
        diff = torch.where(both_nan, torch.zeros_like(diff), diff.nan_to_num(nan=math.inf))
        # Relative to |ref|, floored at atol: a ReLU's exact zeros would make any rounding "infinitely" relative.
        rel = diff / r64.abs().nan_to_num(nan=0.0).clamp_min(max(atol, torch.finfo(torch.float64).tiny))
        if diff.numel():
            max_abs, max_rel = max(max_abs, float(diff.max())), max(max_rel, float(rel.max()))
        n_bad = int((diff > atol + rtol * r64.abs().nan_to_num(nan=0.0)).sum())
        if n_bad:
            bad.append(f"output {i}: {n_bad} of {diff.numel()} elements")
    if bad:
        raise ExportError(
            f"the reloaded {fmt} model does not match the model on the example inputs: max abs error "
            f"{max_abs:.3g}, max rel error {max_rel:.3g}, beyond the tolerance |out - ref| <= atol + rtol * |ref| "
            f"with atol={atol:g}, rtol={rtol:g} ({'; '.join(bad)}); raise atol/rtol if this difference is expected",
            max_abs_error=max_abs, max_rel_error=max_rel,
        )
    return max_abs, max_rel


# ----------------------------------------------------------------------------- the four writers


def _require(modules: Sequence[str], fmt: str) -> None:
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"format={fmt!r} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: {_INSTALL_HINT}")


def _export_onnx(model: nn.Module, inputs: tuple, path: Path) -> tuple[Any, tuple[Path, ...], str]:
    _require(("onnx", "onnxruntime", "onnxscript"), "onnx")
    import onnxruntime as ort

    # Weights go inside the .onnx file unless they approach protobuf's 2 GB limit.
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1 << 30
    torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False, external_data=large)
    data = path.with_name(path.name + ".data")
    files = (path, data) if large and data.exists() else (path,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(f"the ONNX model at {str(path)!r} takes {len(names)} input(s) ({names}); "
                          f"{len(inputs)} example input(s) were given")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return session.run(None, feeds), files, "torch.onnx.export(dynamo=True)"


def _scriptable(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a GraphModule one sharing its modules whose code has no type annotations."""
    if not isinstance(model, fx.GraphModule):
        return model
    # FX writes annotations such as `x : torch.Tensor` as `_torch_Tensor_`, which TorchScript cannot resolve.
    graph = copy.deepcopy(model.graph)
    for node in graph.nodes:
        node.type = None
    return fx.GraphModule(model, graph)


def _export_torchscript(model: nn.Module, inputs: tuple, path: Path) -> tuple[Any, tuple[Path, ...], str]:
    try:
        scripted, method = torch.jit.script(_scriptable(model)), "script"
    except Exception as exc:  # noqa: BLE001 - scripting fails on many Python constructs; tracing is the fallback
        first = next((line for line in str(exc).splitlines() if line.strip()), "")
        warnings.warn(f"torch.jit.script failed ({type(exc).__name__}: {first}); exporting with torch.jit.trace on "
                      f"the example inputs instead", stacklevel=3)
        with torch.no_grad():
            scripted, method = torch.jit.trace(model, inputs, check_trace=False), "trace"
    write_atomic(path, lambda f: torch.jit.save(scripted, f))
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(*[t.cpu() for t in inputs]), (path,), method


def _export_torch_export(model: nn.Module, inputs: tuple, path: Path) -> tuple[Any, tuple[Path, ...], str]:
    program = torch.export.export(model, inputs)
    write_atomic(path, lambda f: torch.export.save(program, f))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        return loaded(*inputs), (path,), "torch.export.export"


# ----------------------------------------------------------------------------- export()


def _as_inputs(example_inputs: Any) -> tuple:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors (one batch of the model's positional "
                        f"inputs), got {type(example_inputs).__name__}")
    for i, t in enumerate(inputs):
        if t.dim() and t.numel() == 0:
            raise ValueError(f"example input {i} has shape {tuple(t.shape)}: it holds no elements, so the parity check "
                             f"would compare empty tensors; pass one batch of at least one sample")
    return tuple(inputs)


def _fresh(inputs: tuple) -> tuple:
    """Copies of the example inputs: each run sees them as given, and the caller's are never changed."""
    return tuple(t.clone() for t in inputs)


def _check_tolerance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def export(
    gm: nn.Module,
    example_inputs: Any,
    path: Union[str, Path],
    format: str,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    model_factory: Optional[Callable[[], nn.Module]] = None,
    config: Any = None,
    extra: Optional[dict] = None,
) -> ExportResult:
    """Write ``gm`` in ``format``, reload it, and check that it computes the same on ``example_inputs``.

    The model is exported in eval mode (the modes of ``gm``'s modules are put back afterwards).
    Outputs are compared elementwise: ``|out - ref| <= atol + rtol * |ref|``, or ExportError.

    Args:
        gm: the compressed GraphModule (any nn.Module for "onnx", "torchscript", "torch.export").
        example_inputs: a tensor or tuple of tensors: one batch of the model's positional inputs.
        path: the file to write; for "manifest", a directory (made if needed) that gets
            ``manifest.json`` and ``weights.pt``.
        format: "onnx" (needs ``onnx``, ``onnxruntime``, ``onnxscript``: ``pip install
            fxtucker[export]``), "torchscript", "torch.export" or "manifest".
        rtol, atol: tolerance of the parity check.
        model_factory: "manifest" only, and needed there: returns a fresh uncompressed model of
            the original architecture, with which the manifest is reloaded (:func:`load`).
        config: "manifest" only: the compress config (a CompressConfig or a dict), stored with
            its seed.
        extra: "manifest" only: a dict of JSON values stored as is (model name, input shape, ...).

    Returns:
        :class:`ExportResult`: path, files written, max abs and rel error of the reloaded model.

    Raises:
        ExportError: the reloaded model's outputs differ beyond the tolerance (the message names
            the max abs and rel error and the tolerance).
        ImportError: an optional package the format needs is missing.

    Example::

        >>> result = fxtucker.export(final, torch.randn(1, 3, 32, 32), "model.onnx", "onnx")
        >>> result.max_abs_error  # doctest: +SKIP
        5.7e-07
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not known; valid: {', '.join(map(repr, FORMATS))}")
    if not isinstance(gm, nn.Module):
        raise TypeError(f"export expects an nn.Module (a GraphModule from the fxtucker pass chain), got {type(gm).__name__}")
    inputs = _as_inputs(example_inputs)
    rtol, atol = _check_tolerance("rtol", rtol), _check_tolerance("atol", atol)
    if format != "manifest":
        for name, value in (("model_factory", model_factory), ("config", config), ("extra", extra)):
            if value is not None:
                raise ValueError(f"{name} is only used by format='manifest', not {format!r}")
    elif model_factory is None or not callable(model_factory):
        raise TypeError("format='manifest' needs model_factory=, a callable returning a fresh uncompressed model of "
                        "the original architecture: the manifest is reloaded with it to check the rebuilt model")
    if format == "manifest":
        check_manifest_graph(gm)
    path = Path(path)
    if format != "manifest":
        if path.is_dir():
            raise ValueError(f"format={format!r} writes a file, but {str(path)!r} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ref = gm(*_fresh(inputs))
        if format == "onnx":
            got, files, method = _export_onnx(gm, _fresh(inputs), path)
        elif format == "torchscript":
            got, files, method = _export_torchscript(gm, _fresh(inputs), path)
        elif format == "torch.export":
            got, files, method = _export_torch_export(gm, _fresh(inputs), path)
        else:
            files = write_manifest(gm, path, config, extra)
            rebuilt = load(path, model_factory).to(next((t.device for t in inputs), "cpu"))
            with torch.no_grad():
                got, method = rebuilt(*_fresh(inputs)), "fxtucker.load"
    finally:
        for m, training in modes.items():
            m.train(training)
    max_abs, max_rel = compare_outputs(ref, got, format, rtol, atol)
    return ExportResult(path=path, format=format, files=tuple(files), max_abs_error=max_abs, max_rel_error=max_rel,
                        rtol=rtol, atol=atol, method=method)
