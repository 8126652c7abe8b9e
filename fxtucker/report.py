"""report(): the per-layer table of what the pass chain decided, as text and as a JSON-ready dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx

from fxtucker.meta import DECOMPOSED, GraphRecord, LayerRecord, graph_record

__all__ = ["report", "Report"]


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively (dataclasses.asdict keeps tuples)."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _fmt_int(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:,}"


def _fmt_tuple(t: tuple) -> str:
    return "-" if not t else "x".join(str(v) for v in t)


@dataclass(frozen=True)
class Report:
    """The layers of one GraphModule, as recorded by the passes; ``str()`` gives a table."""

    stage: str
    layers: tuple[LayerRecord, ...]

    @property
    def macs_before(self) -> Optional[int]:
        vals = [r.macs_before for r in self.layers]
        return None if None in vals else sum(vals)

    @property
    def macs_after(self) -> Optional[int]:
        vals = [r.macs_after if r.macs_after is not None else (r.macs_before if r.decision != DECOMPOSED else None)
                for r in self.layers]
        return None if None in vals else sum(vals)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"stage", "macs_before", "macs_after", "layers": [...]}`` (MACs of these layers)."""
        layers = [_jsonable(dataclasses.asdict(r)) for r in self.layers]
        return {"stage": self.stage, "macs_before": self.macs_before, "macs_after": self.macs_after, "layers": layers}

    def __str__(self) -> str:
        head = ("layer", "op", "in", "out", "full ranks", "ranks", "MACs before", "MACs after", "decision", "reason")
        rows = [head] + [
            (r.name, r.op, _fmt_tuple(r.in_shape), _fmt_tuple(r.out_shape), _fmt_tuple(r.full_ranks), _fmt_tuple(r.ranks),
             _fmt_int(r.macs_before), _fmt_int(r.macs_after), r.decision, r.reason)
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        b, a = self.macs_before, self.macs_after
        if b is not None and a is not None and a > 0:
            lines.append(f"total over these layers: {b:,} -> {a:,} MACs ({b / a:.2f}x fewer)")
        return "\n".join(lines)


def report(gm: fx.GraphModule) -> Report:
    """Per layer: name, shapes, full and kept ranks, MACs before and after, decision and reason.

    MACs are filled in where the cost model ran (before ``decompose_conv`` for "before",
    by ``fold_or_restore`` for both). ``str(report(gm))`` is a table; ``.to_dict()`` is JSON-ready.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"report expects a GraphModule that went through fxtucker passes, got {type(gm).__name__}")
    rec: GraphRecord = graph_record(gm)
    if not rec.layers and not rec.stage:
        raise ValueError("this GraphModule carries no fxtucker record: run decompose_conv (or plan_decomposition) first")
    return Report(stage=rec.stage, layers=rec.layers)
