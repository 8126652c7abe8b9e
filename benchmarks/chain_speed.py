"""Wall time of the whole pass chain (cost_model included) on torchvision models at 224x224.

    .venv/bin/python benchmarks/chain_speed.py [--models resnet50 resnet18] [--repeats 3] [--threads 2]

Each pass is timed separately; the row records the median over repeats of the total. Rows are
appended to benchmarks/results/chain_speed.json as they finish; a rerun skips rows already there
unless --force.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torchvision

import fxtucker
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, strip_gates

RESULTS = Path(__file__).parent / "results" / "chain_speed.json"


def run_chain(model, x, ranks):
    times = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        times[name] = time.perf_counter() - start
        return out

    gm = timed("trace", fxtucker.trace, model)
    gm = timed("cost_model", cost_model, gm, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = timed("decompose_conv", decompose_conv, gm, ranks=ranks)
    gm = timed("insert_gates", insert_gates, gm)
    gm = timed("strip_gates", strip_gates, gm, 0.0)
    gm = timed("fold_or_restore", fold_or_restore, gm, x)
    times["total"] = sum(times.values())
    return gm, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--ranks", nargs="+", default=["full", "0.5"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    done = {(r["model"], r["ranks"]) for r in rows}
    for name in args.models:
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        for ranks_text in args.ranks:
            if (name, ranks_text) in done and not args.force:
                print(f"skip {name} ranks={ranks_text}: already in {RESULTS}")
                continue
            ranks = None if ranks_text == "full" else float(ranks_text)
            runs = [run_chain(model, x, ranks)[1] for _ in range(args.repeats)]
            row = {
                "model": name, "ranks": ranks_text, "input": [1, 3, 224, 224], "threads": args.threads,
                "repeats": args.repeats,
                "seconds_median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
                "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            }
            rows = [r for r in rows if (r["model"], r["ranks"]) != (name, ranks_text)] + [row]
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in row["seconds_median"].items())
            print(f"{name} ranks={ranks_text}: {parts}")


if __name__ == "__main__":
    main()
