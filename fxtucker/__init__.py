"""fxtucker: compress trained CNNs by Tucker-2 decomposition, as torch.fx graph passes.

Implements "Low-rank Tensor Decomposition for Compression of CNNs Using Funnel Regularization"
(Chu and Lee, 2021). See README.md for the pass chain.
"""

__version__ = "0.1.0"

import importlib
import types

from fxtucker.tracing import TraceError, trace
from fxtucker.passes import (
    cost_model,
    count_macs,
    decompose_conv,
    fold_bn,
    fold_or_restore,
    gates,
    insert_gates,
    plan_decomposition,
    plan_forms,
    strip_gates,
)
from fxtucker.report import Report, report

# The flow, export and latency tools load the training loop, torch.distributed, ONNX hooks: they
# are imported on first use, so that ``import fxtucker.passes`` (which runs this file first) loads
# the passes alone.
_LAZY = {
    "compress": "fxtucker.compress", "CompressConfig": "fxtucker.compress", "CompressResult": "fxtucker.compress",
    "export": "fxtucker.export", "load": "fxtucker.manifest", "ExportError": "fxtucker.export",
    "ExportResult": "fxtucker.export",
    "measure_latency": "fxtucker.latency", "compare_latency": "fxtucker.latency", "LatencyComparison": "fxtucker.latency",
    "optimize_for_inference": "fxtucker.deploy",
    "recalibrate_batchnorm": "fxtucker.train",
}


_SHADOWED = ("compress", "export", "report")
#: Submodules the README calls as attributes (``fxtucker.models.get_model``), imported on first use too.
_SUBMODULES = ("models", "data", "regularizers", "tucker", "train", "latency", "deploy")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # binds itself on the package
    if name not in _LAZY:
        raise AttributeError(f"module 'fxtucker' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``fxtucker.compress``, ``fxtucker.export`` and ``fxtucker.report`` are functions that share
    their names with the submodules defining them. Importing a submodule binds it on its package;
    this keeps the function bound instead, whichever is imported first (as the eager imports did)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
del _sys

__all__ = [
    "__version__",
    "trace",
    "TraceError",
    "count_macs",
    "gates",
    "report",
    "Report",
    "passes",
    "cost_model",
    "plan_decomposition",
    "plan_forms",
    "decompose_conv",
    "insert_gates",
    "strip_gates",
    "fold_or_restore",
    "fold_bn",
    "compress",
    "CompressConfig",
    "CompressResult",
    "export",
    "load",
    "ExportError",
    "ExportResult",
    "measure_latency",
    "compare_latency",
    "LatencyComparison",
    "optimize_for_inference",
    "recalibrate_batchnorm",
]
