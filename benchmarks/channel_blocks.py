"""What a conv's channel count costs on a back end: are MACs at an arbitrary rank the time it takes?

    .venv/bin/python benchmarks/channel_blocks.py --threads 1                   # onnxruntime, batch 64, 28x28
    .venv/bin/python benchmarks/channel_blocks.py --backend eager --batch 1

A 3x3 conv (padding 1) followed by a ReLU, at batch ``--batch`` on ``--size``x``--size`` inputs, is
timed with ``fxtucker.measure_latency`` for several output channel counts (32 input channels) and
several input channel counts (32 output channels). Every count is timed once per round, the
rounds alternate over all of them, and the median round is kept, so a slow phase of a shared
machine hits every count. A Tucker-2 layer's ``first``, ``core`` and ``last`` convs have the ranks
as channel counts: where a back end computes channels in blocks (onnxruntime's NCHWc kernels use
blocks of 16 channels on AVX-512 CPUs, 8 on AVX2), a rank between two multiples of the block costs
what the next multiple does, and MACs counted at the exact rank overstate the speed-up. One row per
run is appended to ``benchmarks/results/channel_blocks.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from fxtucker.latency import BACKENDS, measure_latency

sys.path.insert(0, str(Path(__file__).parent))
from compare import append_row  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "channel_blocks.json"
COUNTS = (8, 11, 16, 20, 24, 32)
WIDE = 32


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per count and round (their median)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cases = {}
    for c in COUNTS:
        cases[f"out {c}"] = (nn.Sequential(nn.Conv2d(WIDE, c, 3, padding=1), nn.ReLU()).eval(),
                             torch.randn(args.batch, WIDE, args.size, args.size))
        cases[f"in {c}"] = (nn.Sequential(nn.Conv2d(c, WIDE, 3, padding=1), nn.ReLU()).eval(),
                            torch.randn(args.batch, c, args.size, args.size))
    times: dict[str, list[float]] = {k: [] for k in cases}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ONNX exporter's notices
        for _ in range(args.rounds):
            for name, (model, x) in cases.items():
                times[name].append(measure_latency(model, x, backend=args.backend, threads=args.threads,
                                                   repeats=args.repeats))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"backend": args.backend, "batch": args.batch, "size": args.size, "threads": args.threads, "wide": WIDE,
           "rounds": args.rounds, "repeats": args.repeats, "median_ms": {k: round(v, 4) for k, v in med.items()},
           "rounds_ms": {k: [round(t, 4) for t in v] for k, v in times.items()},
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"3x3 conv, {args.backend}, batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}; median of {args.rounds} rounds, ms")
    print(f"{'channels':>9}  {f'{WIDE} in -> c out':>15}  {f'c in -> {WIDE} out':>15}  {'MACs vs 16':>10}")
    for c in COUNTS:
        print(f"{c:>9}  {med[f'out {c}']:>15.2f}  {med[f'in {c}']:>15.2f}  {c / 16:>10.2f}")
    append_row(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
