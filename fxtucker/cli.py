"""The ``fxtucker`` command line."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

import fxtucker
from fxtucker import models
from fxtucker.latency import measure_latency
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, strip_gates

__all__ = ["main"]


class _UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit status 2."""


def _ranks(text: str):
    if text in ("full", "none"):
        return None
    if text == "vbmf":
        return "vbmf"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: give a fraction in (0, 1], 'vbmf' or 'full'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--ranks {text!r}: a fraction must be in (0, 1]")
    return value


def _model(name: str, num_classes: int, in_channels: int, checkpoint: Optional[str]) -> torch.nn.Module:
    choices = models.list_models()
    if name.lower() not in [c.lower() for c in choices]:
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise _UsageError(f"unknown model {name!r}.{hint} Choices: {', '.join(choices)}")
    return models.get_model(name, num_classes=num_classes, in_channels=in_channels, checkpoint=checkpoint)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inspect(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = _model(args.model, args.num_classes, args.in_channels, args.checkpoint).eval()
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size)
    gm = cost_model(fxtucker.trace(model), x)
    if args.graph:
        print("== graph before ==")
        print(gm.graph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decomposed = decompose_conv(gm, ranks=args.ranks, linear=args.linear)
    final = fold_or_restore(strip_gates(insert_gates(decomposed), args.threshold), x)
    if args.graph:
        print("== graph after ==")
        print(final.graph)
    rep = fxtucker.report(final)
    print(rep)
    for w in caught:
        print(f"note: {w.message}")
    with torch.no_grad():
        ref_out, out = model(x), final(x)
    err = ((out - ref_out).norm() / ref_out.norm()).item()
    macs_before, macs_after = fxtucker.count_macs(model, x), fxtucker.count_macs(final, x)
    lat_before = measure_latency(model, x, threads=args.threads)
    lat_after = measure_latency(final, x, threads=args.threads)
    rows = [
        ("", "original", "compressed", "ratio"),
        ("MACs", f"{macs_before:,}", f"{macs_after:,}", f"{macs_before / macs_after:.2f}x"),
        ("params", f"{_params(model):,}", f"{_params(final):,}", f"{_params(model) / _params(final):.2f}x"),
        (f"CPU latency, batch {args.batch} (ms)", f"{lat_before:.2f}", f"{lat_after:.2f}", f"{lat_before / lat_after:.2f}x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"relative output change (untrained, ranks={args.ranks}): {err:.3g}")
    if args.json:
        out_path = Path(args.json)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"macs_before": macs_before, "macs_after": macs_after, "params_before": _params(model),
                   "params_after": _params(final), "latency_ms_before": lat_before, "latency_ms_after": lat_after,
                   "relative_output_change": err, "report": rep.to_dict()}
        out_path.write_text(json.dumps(summary, indent=2))
        print(f"wrote {out_path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtucker", description=fxtucker.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fxtucker {fxtucker.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="run the pass chain at given ranks (nothing trained) and print the report")
    p.add_argument("--model", required=True, help="a torchvision classification model or resnet20/32/56, vgg_small")
    p.add_argument("--ranks", type=_ranks, default=0.5, help="fraction of each mode in (0, 1], 'vbmf' or 'full' (default 0.5)")
    p.add_argument("--threshold", type=float, default=0.0, help="strip gates below this (untrained gates: keep 0)")
    p.add_argument("--linear", action="store_true", help="also decompose Linear layers")
    p.add_argument("--checkpoint", help="state_dict of trained weights (loaded with weights_only=True)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the latency measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph", action="store_true", help="print the graph before and after")
    p.add_argument("--json", help="also write the numbers and the report to this JSON file")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (_UsageError, fxtucker.TraceError, FileNotFoundError) as exc:
        print(f"fxtucker {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
