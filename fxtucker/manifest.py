"""Manifests: a compressed model as its recorded plan and its weights, written, read, checked, reloaded.

A manifest is a directory with ``manifest.json`` (versions, the graph's records: per-layer
decisions, ranks and forms, the node list, the compress config) and ``weights.pt`` (a state_dict
of tensors only). :func:`load` traces the original architecture and replays the pass chain with
the recorded plan (:func:`fxtucker.pipeline.replay`), then loads the weights with
``weights_only=True``: nothing in a manifest is code, and nothing is unpickled but tensors.
Records are written and read through :func:`fxtucker.meta.to_json` and
:func:`fxtucker.meta.from_json`, from the dataclasses' own fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.io import load_error, save_torch, sha256_file, write_text
from fxtucker.meta import (
    GATE_ROLES,
    KEY,
    BatchNormRecord,
    FactorRecord,
    FoldRecord,
    GraphRecord,
    LayerRecord,
    RecordError,
    from_json,
    graph_record,
    set_graph_record,
    to_json,
)
from fxtucker.passes.memory_format import MEMORY_FORMATS, set_memory_format
from fxtucker.pipeline import replay
from fxtucker.tracing import trace

__all__ = ["load", "read_manifest", "write_manifest", "check_manifest_graph", "MANIFEST_VERSION", "MANIFEST_NAME",
           "WEIGHTS_NAME", "MAX_MANIFEST_BYTES"]

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.pt"
_MANIFEST_FORMAT = "fxtucker-manifest"


# ----------------------------------------------------------------------------- writing


def check_manifest_graph(gm: nn.Module) -> fx.GraphModule:
    """``gm`` if a manifest can describe it: a GraphModule without gates; TypeError or ValueError otherwise."""
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
    import fxtucker  # the package holds the one __version__; imported late, as the package imports this module

    rec = graph_record(gm)
    nodes = []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op in ("call_module", "get_attr"):
            entry["target"] = node.target
        r = node.meta.get(KEY)
        if isinstance(r, (FactorRecord, FoldRecord)):
            entry["record"] = {"type": type(r).__name__, **to_json(r)}
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
        "layers": to_json(rec.layers),
        "batchnorms": to_json(rec.batchnorms),
        "memory_format": rec.memory_format,
        "memory_format_reason": rec.memory_format_reason,
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
        return to_json(config)
    if isinstance(config, dict):
        return to_json(config)
    raise TypeError(f"config must be a CompressConfig (or another dataclass) or a dict, got {type(config).__name__}")


def write_manifest(gm: fx.GraphModule, path: Path, config: Any = None, extra: Any = None) -> tuple[Path, ...]:
    """Write the manifest directory ``path`` (``manifest.json`` and ``weights.pt``) of ``gm``; the files written."""
    gm = check_manifest_graph(gm)
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


# ----------------------------------------------------------------------------- reading


def _expect(value: Any, types: Union[type, tuple], where: str) -> Any:
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int
        names = " or ".join(t.__name__ for t in types)
        raise RecordError(f"{where} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _ints(value: Any, where: str) -> tuple[int, ...]:
    _expect(value, list, where)
    return tuple(_expect(v, int, f"{where}[{i}]") for i, v in enumerate(value))


_NODE_RECORDS = {cls.__name__: cls for cls in (FactorRecord, FoldRecord)}

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
                raise RecordError(f"extra.{key} must be a name of 1 to 200 characters, got {len(value)}")
    for key, high in (("num_classes", MAX_CLASSES), ("in_channels", MAX_CHANNELS)):
        if key in extra and extra[key] is not None:
            value = _expect(extra[key], int, f"extra.{key}")
            if not 1 <= value <= high:
                raise RecordError(f"extra.{key} must be an integer in [1, {high:,}], got {value:,}")
    if extra.get("input_shape") is not None:
        shape = _ints(extra["input_shape"], "extra.input_shape")
        if not 3 <= len(shape) <= 5 or min(shape) < 1:
            raise RecordError(f"extra.input_shape must be 3 to 5 sizes >= 1 (batch, channels, spatial...), got {list(shape)}")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise RecordError(f"extra.input_shape {list(shape)} has {math.prod(shape):,} elements, above the "
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
            raise RecordError(f"'format' must be {_MANIFEST_FORMAT!r}, got {manifest.get('format')!r}")
        version = manifest.get("format_version")
        if version != MANIFEST_VERSION:
            raise RecordError(f"format_version {version!r} is not supported: this fxtucker reads version {MANIFEST_VERSION}; "
                       f"export the model again with this fxtucker, or load it with the fxtucker that wrote it "
                       f"({manifest.get('fxtucker_version')!r})")
        missing = sorted(set(_REQUIRED) - set(manifest))
        if missing:
            raise RecordError(f"required key(s) {missing} are missing")
        for key, typ in _REQUIRED.items():
            _expect(manifest[key], typ, f"'{key}'")
        for key in ("config", "extra"):
            if manifest.get(key) is not None:
                _expect(manifest[key], dict, f"'{key}'")
        _check_extra(manifest.get("extra") or {})
        if Path(manifest["weights"]).name != manifest["weights"]:
            raise RecordError(f"'weights' must be a file name inside the manifest's directory, got {manifest['weights']!r}")
        manifest["layers"] = tuple(from_json(LayerRecord, v, f"layers[{i}]") for i, v in enumerate(manifest["layers"]))
        manifest["batchnorms"] = tuple(from_json(BatchNormRecord, v, f"batchnorms[{i}]")
                                       for i, v in enumerate(manifest["batchnorms"]))
        # Optional (manifests before it have none): the format the weights are stored in.
        manifest.setdefault("memory_format", "contiguous")
        manifest.setdefault("memory_format_reason", "")
        if manifest["memory_format"] not in MEMORY_FORMATS:
            raise RecordError(f"'memory_format' must be one of {list(MEMORY_FORMATS)}, got {manifest['memory_format']!r:.60}")
        _expect(manifest["memory_format_reason"], str, "'memory_format_reason'")
        for i, node in enumerate(manifest["nodes"]):
            where = f"nodes[{i}]"
            _expect(node, dict, where)
            _expect(node.get("name"), str, f"{where}.name")
            _expect(node.get("op"), str, f"{where}.op")
            if "target" in node:
                _expect(node["target"], str, f"{where}.target")
            if "record" in node:
                rec = _expect(node["record"], dict, f"{where}.record")
                cls = _NODE_RECORDS.get(rec.get("type"))
                if cls is None:
                    raise RecordError(f"{where}.record.type must be one of {sorted(_NODE_RECORDS)}, got {rec.get('type')!r}")
                node["record"] = from_json(cls, {k: v for k, v in rec.items() if k != "type"}, f"{where}.record")
        for key, entry in manifest["state_dict"].items():
            where = f"state_dict[{key!r}]"
            _expect(entry, dict, where)
            manifest["state_dict"][key] = (_ints(entry.get("shape"), f"{where}.shape"),
                                           _expect(entry.get("dtype"), str, f"{where}.dtype"))
    except RecordError as exc:
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


# ----------------------------------------------------------------------------- reloading


def _rebuild(model: nn.Module, manifest: dict, leaf_modules: Sequence[type]) -> fx.GraphModule:
    """Replay the pass chain on the fresh model at the recorded plan; its graph must be the exported one."""
    gm = trace(model.eval(), leaf_modules=tuple(leaf_modules))
    try:
        gm = replay(manifest["layers"], [n["name"] for n in manifest["nodes"]])(gm)
    except ValueError as exc:
        raise ValueError(f"the manifest does not fit the model that model_factory() returned: {exc}") from None
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
    set_graph_record(gm, GraphRecord(**{f.name: manifest[f.name] for f in dataclasses.fields(GraphRecord)}))
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
    # The weights file keeps their strides; a channels-last model's format is applied again all the same,
    # so that a weights file rewritten by another tool (contiguous) still runs as it was deployed. The
    # default format changes nothing: the saved strides stay, as above.
    rec = graph_record(gm)
    if rec.memory_format == "channels_last":
        set_memory_format(gm, rec.memory_format, inplace=True, reason=rec.memory_format_reason)
    return gm.eval()
