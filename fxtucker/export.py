"""export() and load(): write a compressed model for deployment, reload it, check it computes the same.

Four formats:

- ``"onnx"``: ``torch.onnx.export`` (the dynamo exporter), checked with onnxruntime.
- ``"torchscript"``: ``torch.jit.script`` (``torch.jit.trace`` where scripting fails), checked
  with ``torch.jit.load``.
- ``"torch.export"``: ``torch.export.export`` + ``torch.export.save``, checked with
  ``torch.export.load``.
- ``"manifest"``: a directory with ``manifest.json`` (versions, the per-layer decisions and ranks
  from the graph's records, the compress config) and ``weights.pt`` (a state_dict of tensors
  only). :func:`load` rebuilds the compressed model from the original architecture by replaying
  the pass chain at the recorded ranks, then loads the weights with ``weights_only=True``:
  nothing in a manifest is code, and nothing is unpickled but tensors.

Every export reloads what it wrote and compares its outputs with the model's on the example
inputs; :class:`ExportError` says by how much they differ when they do.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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

from fxtucker.io import load_error, save_torch, sha256_file, write_atomic, write_text
from fxtucker.meta import (
    CORE,
    DECOMPOSED,
    FIRST,
    GATE_ROLES,
    KEY,
    LAST,
    RESTORED,
    BatchNormRecord,
    ConvSpec,
    FactorRecord,
    FoldRecord,
    GraphRecord,
    LayerRecord,
    graph_record,
    set_graph_record,
)
from fxtucker.passes import decompose_conv, fold_bn
from fxtucker.passes.forms import LINEAR, pointwise_as_linear, is_pointwise as _pointwise
from fxtucker.tracing import trace

__all__ = ["export", "load", "read_manifest", "ExportError", "ExportResult", "FORMATS", "MANIFEST_VERSION"]

FORMATS = ("onnx", "torchscript", "torch.export", "manifest")
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.pt"
_MANIFEST_FORMAT = "fxtucker-manifest"
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


def _compare(ref: Any, got: Any, fmt: str, rtol: float, atol: float) -> tuple[float, float]:
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


# ----------------------------------------------------------------------------- manifest: writing


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _check_graph_for_manifest(gm: nn.Module) -> fx.GraphModule:
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"format='manifest' needs a torch.fx.GraphModule (the output of the fxtucker pass chain, or "
                        f"fxtucker.trace(model)), got {type(gm).__name__}")
    for node in gm.graph.nodes:
        rec = node.meta.get(KEY)
        if isinstance(rec, FactorRecord) and rec.role in GATE_ROLES:
            raise ValueError(f"{rec.source!r} still has gate node {node.name!r}: run strip_gates(gm, threshold) "
                             f"before exporting a manifest")
    return gm


def _manifest(gm: fx.GraphModule, state: dict[str, torch.Tensor], weights_sha256: str,
              config: Optional[dict], extra: Optional[dict]) -> dict:
    import fxtucker

    rec = graph_record(gm)
    nodes = []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op in ("call_module", "get_attr"):
            entry["target"] = node.target
        r = node.meta.get(KEY)
        if isinstance(r, (FactorRecord, FoldRecord)):
            entry["record"] = {"type": type(r).__name__, **_jsonable(r)}
        nodes.append(entry)
    seed = config.get("seed") if isinstance(config, dict) else None
    return {
        "format": _MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "fxtucker_version": fxtucker.__version__,
        "torch_version": torch.__version__,
        "weights": WEIGHTS_NAME,
        "weights_sha256": weights_sha256,
        "stage": rec.stage,
        "layers": _jsonable(rec.layers),
        "batchnorms": _jsonable(rec.batchnorms),
        "nodes": nodes,
        "state_dict": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()},
        "config": config,
        "seed": seed,
        "extra": extra or {},
    }


def _config_dict(config: Any) -> Optional[dict]:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _jsonable(config)
    if isinstance(config, dict):
        return _jsonable(config)
    raise TypeError(f"config must be a CompressConfig (or another dataclass) or a dict, got {type(config).__name__}")


def _write_manifest(gm: fx.GraphModule, path: Path, config: Any, extra: Any) -> tuple[Path, ...]:
    gm = _check_graph_for_manifest(gm)
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of JSON values, got {type(extra).__name__}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"format='manifest' writes a directory, but {str(path)!r} is an existing file; "
                         f"give a directory path")
    state = {}
    for k, v in gm.state_dict().items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state_dict entry {k!r} is a {type(v).__name__}, not a tensor; a manifest holds tensors only")
        state[k] = v.detach().cpu().clone()
    path.mkdir(parents=True, exist_ok=True)
    weights = save_torch(state, path / WEIGHTS_NAME)
    manifest = _manifest(gm, state, sha256_file(weights), _config_dict(config), extra)
    try:
        text = _dumps(manifest)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config and extra must hold JSON values only (str, int, float, bool, None, lists, dicts): "
                         f"{exc}") from None
    write_text(path / MANIFEST_NAME, text + "\n")
    return path / MANIFEST_NAME, weights


def _dumps(value: Any, indent: str = "") -> str:
    """JSON with two-space indents, but short lists and records on one line each."""
    flat = json.dumps(value, allow_nan=False)
    if not isinstance(value, (dict, list)) or not value or len(flat) + len(indent) <= 110:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    return "[\n" + ",\n".join(f"{inner}{_dumps(v, inner)}" for v in value) + f"\n{indent}]"


# ----------------------------------------------------------------------------- manifest: reading


class _Bad(ValueError):
    pass


def _expect(value: Any, types: Union[type, tuple], where: str) -> Any:
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int
        names = " or ".join(t.__name__ for t in types)
        raise _Bad(f"{where} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _ints(value: Any, where: str) -> tuple[int, ...]:
    _expect(value, list, where)
    return tuple(_expect(v, int, f"{where}[{i}]") for i, v in enumerate(value))


def _counts(value: Any, where: str) -> tuple[int, ...]:
    """A list of ints >= 0 (ranks, shapes): a negative one is refused, never clamped."""
    out = _ints(value, where)
    for i, v in enumerate(out):
        if v < 0:
            raise _Bad(f"{where}[{i}] is {v}; it must be >= 0 (a rank or size cannot be negative)")
    return out


def _opt_int(value: Any, where: str) -> Optional[int]:
    return None if value is None else _expect(value, int, where)


def _spec(value: Any, where: str) -> Optional[ConvSpec]:
    if value is None:
        return None
    _expect(value, dict, where)
    fields = {f.name for f in dataclasses.fields(ConvSpec)}
    if set(value) != fields:
        raise _Bad(f"{where} must have the keys {sorted(fields)}, got {sorted(value)}")
    padding = value["padding"]
    return ConvSpec(
        cls_name=_expect(value["cls_name"], str, f"{where}.cls_name"),
        in_channels=_expect(value["in_channels"], int, f"{where}.in_channels"),
        out_channels=_expect(value["out_channels"], int, f"{where}.out_channels"),
        kernel_size=_ints(value["kernel_size"], f"{where}.kernel_size"),
        stride=_ints(value["stride"], f"{where}.stride"),
        padding=padding if isinstance(padding, str) else _ints(padding, f"{where}.padding"),
        dilation=_ints(value["dilation"], f"{where}.dilation"),
        groups=_expect(value["groups"], int, f"{where}.groups"),
        bias=_expect(value["bias"], bool, f"{where}.bias"),
        padding_mode=_expect(value["padding_mode"], str, f"{where}.padding_mode"),
    )


def _generic(value: Any, where: str) -> Any:
    """A field fxtucker's own schema does not type here: JSON scalars, lists become tuples."""
    if isinstance(value, list):
        return tuple(_generic(v, f"{where}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise _Bad(f"{where} must be a JSON scalar or a list, got {type(value).__name__}")


# Field types of the records a manifest carries; a record field not named here (added by a later
# fxtucker) is read as a JSON scalar or tuple.
_STR, _INT, _BOOL = (lambda v, w: _expect(v, str, w)), (lambda v, w: _expect(v, int, w)), (lambda v, w: _expect(v, bool, w))
_FIELDS: dict[type, dict[str, Callable[[Any, str], Any]]] = {
    LayerRecord: {"name": _STR, "node": _STR, "op": _STR, "kind": _STR, "spec": _spec, "in_shape": _counts,
                  "out_shape": _counts, "full_ranks": _counts, "ranks": _counts, "macs_before": _opt_int,
                  "macs_after": _opt_int, "decision": _STR, "reason": _STR, "call_sites": _INT},
    BatchNormRecord: {"name": _STR, "node": _STR, "conv": _STR, "folded": _BOOL, "reason": _STR},
    FactorRecord: {"source": _STR, "role": _STR, "ranks": _counts, "replaces": _STR, "decision": _STR,
                   "macs_original": _opt_int, "macs_decomposed": _opt_int},
    FoldRecord: {"source": _STR, "decision": _STR, "macs_original": _INT, "macs_decomposed": _INT},
}
_RECORD_TYPES = {cls.__name__: cls for cls in (FactorRecord, FoldRecord)}


def _record(cls: type, value: Any, where: str) -> Any:
    _expect(value, dict, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise _Bad(f"{where} has unknown key(s) {unknown}; a {cls.__name__} has {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = sorted(set(required) - set(value))
    if missing:
        raise _Bad(f"{where} lacks the key(s) {missing}")
    typed = _FIELDS.get(cls, {})
    return cls(**{k: typed.get(k, _generic)(v, f"{where}.{k}") for k, v in value.items()})


_REQUIRED = {"format": str, "format_version": int, "fxtucker_version": str, "torch_version": str, "weights": str,
             "weights_sha256": str, "stage": str, "layers": list, "batchnorms": list, "nodes": list,
             "state_dict": dict}


#: Bounds on what a manifest may ask for: its own size, and the sizes in its ``extra`` block.
MAX_MANIFEST_BYTES = 64 << 20
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 65_536
MAX_INPUT_ELEMENTS = 1 << 26  # one example input of at most 64 Mi elements (256 MiB in float32)


def _inside(file: Path, folder: Path, what: str) -> Path:
    """``file`` unless it resolves (through links) outside ``folder``: ValueError naming both."""
    real, home = file.resolve(), folder.resolve()
    if home not in real.parents:
        raise ValueError(f"{file}: refused: the manifest's {what} resolves to {str(real)!r}, outside the manifest "
                         f"directory {str(home)!r} (a symbolic link?); fxtucker reads only files inside that "
                         f"directory: copy the real file there")
    return file


def _check_extra(extra: dict) -> dict:
    """The ``extra`` block's known fields, type- and bound-checked (they size tensors and models)."""
    for key in ("model", "dataset"):
        if key in extra and extra[key] is not None:
            value = _expect(extra[key], str, f"extra.{key}")
            if not 0 < len(value) <= 200:
                raise _Bad(f"extra.{key} must be a name of 1 to 200 characters, got {len(value)}")
    for key, high in (("num_classes", MAX_CLASSES), ("in_channels", MAX_CHANNELS)):
        if key in extra and extra[key] is not None:
            value = _expect(extra[key], int, f"extra.{key}")
            if not 1 <= value <= high:
                raise _Bad(f"extra.{key} must be an integer in [1, {high:,}], got {value:,}")
    if extra.get("input_shape") is not None:
        shape = _ints(extra["input_shape"], "extra.input_shape")
        if not 3 <= len(shape) <= 5 or min(shape) < 1:
            raise _Bad(f"extra.input_shape must be 3 to 5 sizes >= 1 (batch, channels, spatial...), got {list(shape)}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise _Bad(f"extra.input_shape {list(shape)} has {math.prod(shape):,} elements, above the "
                       f"{MAX_INPUT_ELEMENTS:,} fxtucker allocates for an example input")
    return extra


def _read_manifest(path: Path) -> tuple[dict, Path]:
    """The parsed and checked manifest of ``path`` (a directory or its manifest.json) and its directory."""
    folder = path if path.is_dir() else path.parent
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no fxtucker manifest at {str(path)!r}: expected a directory written by "
                                f"fxtucker.export(..., format='manifest') holding {MANIFEST_NAME}")
    _inside(file, folder, MANIFEST_NAME)
    with file.open("rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{file}: refused: larger than {MAX_MANIFEST_BYTES:,} bytes, which no manifest fxtucker "
                         f"writes is")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not a JSON manifest ({exc})") from None
    except RecursionError:
        raise ValueError(f"{file}: refused: its JSON is nested too deeply to be an fxtucker manifest") from None
    try:
        _expect(manifest, dict, "the manifest")
        if manifest.get("format") != _MANIFEST_FORMAT:
            raise _Bad(f"'format' must be {_MANIFEST_FORMAT!r}, got {manifest.get('format')!r}")
        version = manifest.get("format_version")
        if version != MANIFEST_VERSION:
            raise _Bad(f"format_version {version!r} is not supported: this fxtucker reads version {MANIFEST_VERSION}; "
                       f"export the model again with this fxtucker, or load it with the fxtucker that wrote it "
                       f"({manifest.get('fxtucker_version')!r})")
        missing = sorted(set(_REQUIRED) - set(manifest))
        if missing:
            raise _Bad(f"required key(s) {missing} are missing")
        for key, typ in _REQUIRED.items():
            _expect(manifest[key], typ, f"'{key}'")
        for key in ("config", "extra"):
            if manifest.get(key) is not None:
                _expect(manifest[key], dict, f"'{key}'")
        _check_extra(manifest.get("extra") or {})
        if Path(manifest["weights"]).name != manifest["weights"]:
            raise _Bad(f"'weights' must be a file name inside the manifest's directory, got {manifest['weights']!r}")
        manifest["layers"] = tuple(_record(LayerRecord, v, f"layers[{i}]") for i, v in enumerate(manifest["layers"]))
        manifest["batchnorms"] = tuple(_record(BatchNormRecord, v, f"batchnorms[{i}]")
                                       for i, v in enumerate(manifest["batchnorms"]))
        for i, node in enumerate(manifest["nodes"]):
            where = f"nodes[{i}]"
            _expect(node, dict, where)
            _expect(node.get("name"), str, f"{where}.name")
            _expect(node.get("op"), str, f"{where}.op")
            if "target" in node:
                _expect(node["target"], str, f"{where}.target")
            if "record" in node:
                rec = _expect(node["record"], dict, f"{where}.record")
                cls = _RECORD_TYPES.get(rec.get("type"))
                if cls is None:
                    raise _Bad(f"{where}.record.type must be one of {sorted(_RECORD_TYPES)}, got {rec.get('type')!r}")
                node["record"] = _record(cls, {k: v for k, v in rec.items() if k != "type"}, f"{where}.record")
        for key, entry in manifest["state_dict"].items():
            where = f"state_dict[{key!r}]"
            _expect(entry, dict, where)
            manifest["state_dict"][key] = (_ints(entry.get("shape"), f"{where}.shape"),
                                           _expect(entry.get("dtype"), str, f"{where}.dtype"))
    except _Bad as exc:
        raise ValueError(f"{file}: invalid fxtucker manifest: {exc}") from None
    return manifest, file.parent


def read_manifest(path: Union[str, Path]) -> dict[str, Any]:
    """The manifest at ``path`` (its directory or ``manifest.json``), schema-checked, without the weights.

    Records come back as dataclasses (``"layers"``: LayerRecords, ``"batchnorms"``:
    BatchNormRecords); ``"config"`` and ``"extra"`` as written. ValueError names the first
    problem (format version, a missing key, a wrong type).
    """
    manifest, _ = _read_manifest(Path(path))
    return manifest


def _load_weights(file: Path, manifest: dict) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"the manifest names the weights file {file.name!r}, which is missing from {str(file.parent)!r}")
    _inside(file, file.parent, "weights file")
    if sha256_file(file) != manifest["weights_sha256"]:
        raise ValueError(f"{file}: the weights file does not match the SHA-256 recorded in the manifest; it was changed "
                         f"or replaced after export")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a refused global, a torn zip, garbage that matches its checksum
        raise ValueError(f"{file}: refused: not a plain state_dict of tensors: {load_error(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        bad = type(state).__name__ if not isinstance(state, dict) else next(
            f"{k!r}: {type(v).__name__}" for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
        raise ValueError(f"{file}: refused: a manifest's weights file must hold a dict of name -> tensor, found {bad}")
    want = manifest["state_dict"]
    if set(state) != set(want):
        raise ValueError(f"{file}: the weights do not match the manifest: missing {sorted(set(want) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(want))[:5]}")
    for k, (shape, dtype) in want.items():
        if tuple(state[k].shape) != shape or str(state[k].dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"{file}: weight {k!r} is {tuple(state[k].shape)} {state[k].dtype}, the manifest says "
                             f"{shape} {dtype}")
    return state


def _give_form(gm: fx.GraphModule, rec: LayerRecord) -> None:
    """Give a layer the form fold_or_restore(cost="latency") kept: ``merge_first`` (first multiplied
    into core) or ``merge_last`` (last into core), and with ``+linear`` its pointwise convs as
    nn.Linear between permutes. Shapes only: the weights come later."""
    form = getattr(rec, "form", "") or ""
    base, linear = form.removesuffix(LINEAR), form.endswith(LINEAR)
    if base in ("merge_first", "merge_last"):
        container = gm.get_submodule(rec.name)
        first, core, last = container[FIRST], container[CORE], container[LAST]
        in_ch = first.in_channels if base == "merge_first" else core.in_channels
        out_ch = last.out_channels if base == "merge_last" else core.out_channels
        bias = core.bias is not None or (base == "merge_last" and last.bias is not None)
        container[CORE] = type(core)(in_ch, out_ch, core.kernel_size, stride=core.stride, padding=core.padding,
                                     dilation=core.dilation, groups=core.groups, bias=bias,
                                     padding_mode=core.padding_mode).to(core.weight.dtype)
        nodes = {role: [n for n in gm.graph.nodes if n.op == "call_module" and n.target == f"{rec.name}.{role}"]
                 for role in (FIRST, CORE, LAST)}
        if base == "merge_first":
            for f, c in zip(nodes[FIRST], nodes[CORE]):
                c.args = (f.args[0],)
                gm.graph.erase_node(f)
            del container[FIRST]
        else:
            for c, l_ in zip(nodes[CORE], nodes[LAST]):
                l_.replace_all_uses_with(c)
                gm.graph.erase_node(l_)
            del container[LAST]
    if linear:
        targets = [rec.name] if rec.decision != DECOMPOSED else [f"{rec.name}.{role}" for role in (FIRST, CORE, LAST)]
        for target in targets:
            try:
                module = gm.get_submodule(target)
            except AttributeError:  # a factor merged away above
                continue
            if _pointwise(module):  # the rule fold_or_restore applied
                pointwise_as_linear(gm, target, [n for n in gm.graph.nodes
                                                 if n.op == "call_module" and n.target == target])
    gm.recompile()


def _rebuild(model: nn.Module, manifest: dict, leaf_modules: Sequence[type]) -> fx.GraphModule:
    """Replay the pass chain on the fresh model so that its structure is the exported one."""
    gm = trace(model.eval(), leaf_modules=tuple(leaf_modules))
    layers: tuple[LayerRecord, ...] = manifest["layers"]
    decomposed = {r.name: r for r in layers if r.decision == DECOMPOSED and r.kind != "skip"}
    if decomposed:
        # A whole dead rank (0) is built as one zeroed component, as strip_gates does.
        # A kxk conv recorded as an SVD pair was decomposed with method="svd"; 1x1 convs and
        # Linear layers are SVD pairs under either method.
        by_method: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, rec in decomposed.items():
            kxk = rec.spec is not None and math.prod(rec.spec.kernel_size) > 1
            method = "svd" if rec.kind == "svd" and kxk else "tucker2"
            by_method.setdefault(method, {})[name] = tuple(max(1, r) for r in rec.ranks)
        linear = any(r.op == "Linear" for r in decomposed.values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the summary of layers left alone; the records say which
            try:
                for method, ranks in by_method.items():
                    gm = decompose_conv(gm, ranks=ranks, method=method, linear=linear, inplace=True)
            except ValueError as exc:
                raise ValueError(f"the manifest does not fit the model that model_factory() returned: {exc}") from None
    # The BatchNorm calls the exported graph no longer has were folded (whenever fold_bn ran: the
    # node list says so even where a later decompose_conv dropped fold_bn's record).
    exported = {n["name"] for n in manifest["nodes"]}
    gone = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.name not in exported
            and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
    if gone:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fold_bn(gm, nodes=gone, inplace=True)
        left = [b.node for b in graph_record(gm).batchnorms if b.node in gone and not b.folded]
        if left:
            reason = next(b.reason for b in graph_record(gm).batchnorms if b.node == left[0])
            raise ValueError(f"the exported graph has no BatchNorm node {left[0]!r}, but on the model from "
                             f"model_factory() it cannot be folded ({reason}); model_factory() must return the "
                             f"architecture the manifest was exported from")
    # After fold_bn: fold_or_restore gave the forms to the BN-folded layers (a "+linear" form's
    # permute would stand between a conv and its BatchNorm).
    for rec in layers:
        if rec.decision in (DECOMPOSED, RESTORED) and rec.kind != "skip":
            _give_form(gm, rec)
    # The structure must now be the exported one, node for node.
    want = [(n["name"], n["op"], n.get("target")) for n in manifest["nodes"]]
    have = [(n.name, n.op, n.target if n.op in ("call_module", "get_attr") else None) for n in gm.graph.nodes]
    if want != have:
        diff = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        w = want[diff] if diff < len(want) else "(end of graph)"
        h = have[diff] if diff < len(have) else "(end of graph)"
        raise ValueError(f"the rebuilt graph differs from the exported one at node {diff}: the manifest has {w}, the "
                         f"model from model_factory() gives {h}; model_factory() must return the architecture the "
                         f"manifest was exported from (traced with the same leaf_modules)")
    # The records come back as they were exported, so report() and later passes see the same history.
    for node, entry in zip(gm.graph.nodes, manifest["nodes"]):
        node.meta.pop(KEY, None)
        if "record" in entry:
            node.meta[KEY] = entry["record"]
    set_graph_record(gm, GraphRecord(layers=manifest["layers"], stage=manifest["stage"],
                                     batchnorms=manifest["batchnorms"]))
    return gm


def load(path: Union[str, Path], model_factory: Callable[[], nn.Module], *,
         leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Rebuild a compressed model from a manifest written by ``export(..., format="manifest")``.

    ``model_factory()`` returns a fresh, uncompressed instance of the original architecture (its
    weights do not matter). It is traced, decomposed at the recorded ranks where the manifest's
    layers were kept decomposed (restored and skipped layers stay dense), BatchNorms are folded
    if they were; then the graph must equal the exported one node for node, the recorded
    metadata is put back, and the weights are loaded with ``torch.load(weights_only=True)`` and
    strict key and shape checks. Nothing is unpickled but tensors.

    Args:
        path: the manifest directory (or its ``manifest.json``).
        model_factory: a callable with no arguments returning the original ``nn.Module``.
        leaf_modules: as for :func:`fxtucker.trace`, when the exported model was traced with them.

    Returns:
        The compressed GraphModule in eval mode, on the CPU.

    Raises:
        FileNotFoundError: no manifest or weights file.
        ValueError: the manifest fails its schema checks (format version, required keys, types),
            the weights file was changed or holds anything but tensors, or the model from
            ``model_factory`` does not rebuild to the exported structure.

    Example::

        >>> gm = fxtucker.load("runs/resnet20/manifest", lambda: fxtucker.models.get_model("resnet20", num_classes=10))
    """
    path = Path(path)
    manifest, folder = _read_manifest(path)
    if not callable(model_factory):
        raise TypeError(f"model_factory must be a callable returning a fresh nn.Module, got {type(model_factory).__name__}")
    state = _load_weights(folder / manifest["weights"], manifest)
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory() must return an nn.Module, got {type(model).__name__}")
    gm = _rebuild(model, manifest, leaf_modules)
    own = gm.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit the rebuilt model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"weight {k!r} has shape {tuple(v.shape)} in the manifest, the rebuilt model's is "
                             f"{tuple(own[k].shape)}: the recorded ranks and the weights disagree")
    # assign=True: the parameters become the saved tensors, with their strides, so that the rebuilt
    # model picks the same kernels as the exported one (copying into the rebuilt factors' strided
    # parameters changes float32 results in the last bits).
    gm.load_state_dict(state, strict=True, assign=True)
    return gm.eval()


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
        _check_graph_for_manifest(gm)
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
            files = _write_manifest(gm, path, config, extra)
            rebuilt = load(path, model_factory).to(next((t.device for t in inputs), "cpu"))
            with torch.no_grad():
                got, method = rebuilt(*_fresh(inputs)), "fxtucker.load"
    finally:
        for m, training in modes.items():
            m.train(training)
    max_abs, max_rel = _compare(ref, got, format, rtol, atol)
    return ExportResult(path=path, format=format, files=tuple(files), max_abs_error=max_abs, max_rel_error=max_rel,
                        rtol=rtol, atol=atol, method=method)
