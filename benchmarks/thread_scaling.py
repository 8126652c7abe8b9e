"""How a compressed model's speed-up depends on the thread count: ``benchmarks/latency.py``'s rows at
1 and at 2 threads, run in turn (issue 19: resnet18's efficiency at 2 threads).

    .venv/bin/python benchmarks/thread_scaling.py --torch-pruning   # resnet18, 224x224, 2 passes
    .venv/bin/python benchmarks/thread_scaling.py --table           # the stored rows as markdown

A row is ``latency.py``'s: the BN-folded original and the compressed model (forms chosen by timing on
the back end at the row's thread count), timed alternately in ``--rounds`` rounds. A pass runs every
(back end, batch, method) at each thread count, the thread counts in turn (``--threads`` in order,
the next pass reversed), so that a slow phase of the machine falls on both. The table puts each
model's time at the two thread counts side by side: where the original gains more from the second
thread than the compressed model does, the speed-up at 2 threads is lower than at 1, whatever the
graph. Each finished row is appended to ``results/thread_scaling.json`` at once; a rerun skips the
rows already there. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import latency  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "thread_scaling.json"
BACKENDS = ("eager", "compile", "onnxruntime")


def _key(row: dict) -> tuple:
    return latency.row_key(row) + (row["pass"],)


def _args(args, threads: int) -> argparse.Namespace:
    """latency.py's settings for one row at ``threads``: its full profile, this script's options over it."""
    base = dict(latency.FULL, quick=False, **latency.MODEL_RANKS.get(args.model, {}))
    base.update(models=[args.model], input_size=args.input_size, batches=args.batches, backends=args.backends,
                threads=threads, rounds=args.rounds, repeats=args.repeats)
    return argparse.Namespace(**base)


def run(args) -> int:
    methods = ["fxtucker"] + (["torch-pruning"] if args.torch_pruning else [])
    if args.torch_pruning and latency.torch_pruning_missing("--torch-pruning needs it"):
        return 2
    done = {_key(r) for r in latency.load_rows(args.out)}
    for p in range(args.passes):
        order = args.threads if p % 2 == 0 else args.threads[::-1]
        for batch in args.batches:
            for backend in args.backends:
                for method in methods:
                    for threads in order:
                        row_args = _args(args, threads)
                        probe = dict(method=method, model=args.model, input_size=args.input_size, batch=batch,
                                     backend=backend, threads=threads, ranks=row_args.ranks,
                                     round_to=row_args.round_to, min_macs_ratio=row_args.min_macs_ratio,
                                     search=row_args.search, **{"pass": p})
                        if _key(probe) in done:
                            print(f"skip pass {p} {method} batch {batch} {backend} {threads} thread(s): in {args.out}")
                            continue
                        old = torch.get_num_threads()
                        torch.set_num_threads(threads)
                        try:
                            row = latency.run_row(row_args, args.model, batch, backend, method)
                        finally:
                            torch.set_num_threads(old)
                        row["pass"] = p
                        latency.append_row(args.out, row, key=_key)
                        print(f"pass {p} {method} batch {batch} {backend} {threads} thread(s): "
                              f"{row['baseline_ms']:.2f} -> {row['compressed_ms']:.2f} ms ({row['speedup']:.2f}x, "
                              f"MACs {row['macs_ratio']:.2f}x fewer, spread {row['spread']:.2f}x)", flush=True)
    print(table(latency.load_rows(args.out)))
    return 0


def table(rows: list[dict]) -> str:
    """Per (method, model, batch, back end), at each thread count: the median over passes of the
    baseline's and the compressed model's milliseconds, the speed-up and its efficiency (speed-up /
    MAC ratio), over the passes whose rounds agreed (all passes where none did, marked); then what
    the second thread bought each model (its ms at the lower count / at the higher one)."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["model"], r["input_size"], r["batch"], r["backend"]), {}) \
            .setdefault(r["threads"], []).append(r)
    lines = ["| method | model | batch | back end | threads | passes counted (rounds agreed) | baseline ms | "
             "compressed ms | speed-up | MACs fewer | efficiency |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    scaling = ["| method | model | batch | back end | threads | baseline gains | compressed gains | "
               "efficiency ratio |", "|---|---|---|---|---|---|---|---|"]
    med = statistics.median
    for (method, model, size, batch, backend), by_threads in sorted(groups.items()):
        summary = {}
        for threads, every in sorted(by_threads.items()):
            rs = [r for r in every if r["reliable"]] or every
            base, comp = med(r["baseline_ms"] for r in rs), med(r["compressed_ms"] for r in rs)
            speedup, macs = med(r["speedup"] for r in rs), med(r["macs_ratio"] for r in rs)
            summary[threads] = (base, comp, speedup / macs)
            counted = f"{len(rs)} of {len(every)}" if rs is not every or all(r["reliable"] for r in rs) \
                else f"none of {len(every)} (all counted)"
            lines.append(f"| {method} | {model} {size}x{size} | {batch} | {backend} | {threads} | {counted} | "
                         f"{base:.2f} | {comp:.2f} | {speedup:.2f}x | {macs:.2f}x | {speedup / macs:.2f} |")
        counts = sorted(summary)
        for lo, hi in zip(counts, counts[1:]):
            (b_lo, c_lo, e_lo), (b_hi, c_hi, e_hi) = summary[lo], summary[hi]
            scaling.append(f"| {method} | {model} {size}x{size} | {batch} | {backend} | {lo} -> {hi} | "
                           f"{b_lo / b_hi:.2f}x | {c_lo / c_hi:.2f}x | {e_hi / e_lo:.2f} |")
    return "\n".join(lines) + "\n\n" + "\n".join(scaling)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "resnet50", "mobilenet_v2"))
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="the thread counts, run in turn within a pass (default 1 2)")
    parser.add_argument("--passes", type=int, default=2, help="passes over every row (default 2)")
    parser.add_argument("--rounds", type=int, default=latency.FULL["rounds"])
    parser.add_argument("--repeats", type=int, default=latency.FULL["repeats"])
    parser.add_argument("--torch-pruning", action="store_true", help="also Torch-Pruning at the same MACs")
    parser.add_argument("--table", action="store_true", help="only print the stored rows as markdown")
    args = parser.parse_args(argv)
    if args.table:
        print(table(latency.load_rows(args.out)))
        return 0
    for name in ("threads", "batches"):
        bad = [v for v in getattr(args, name) if v < 1]
        if bad:
            parser.error(f"--{name} must be >= 1, got {bad}")
    if args.passes < 1:
        parser.error(f"--passes must be >= 1, got {args.passes}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
