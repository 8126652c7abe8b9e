"""fxtucker: compress trained CNNs by Tucker-2 decomposition, as torch.fx graph passes.

Implements "Low-rank Tensor Decomposition for Compression of CNNs Using Funnel Regularization"
(Chu and Lee, 2021). See README.md for the pass chain.
"""

__version__ = "0.1.0"

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
    strip_gates,
)
from fxtucker.report import Report, report
from fxtucker.compress import CompressConfig, CompressResult, compress
from fxtucker.export import ExportError, ExportResult, export, load
from fxtucker.latency import LatencyComparison, compare_latency, measure_latency
from fxtucker.deploy import optimize_for_inference

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
]
