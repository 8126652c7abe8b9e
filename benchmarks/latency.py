"""Latency of the compressed model against its BN-folded original, side by side, on each back end.

    .venv/bin/python benchmarks/latency.py                 # resnet18, resnet50, mobilenet_v2 at 224x224, 2 threads, batch 1 and 8
    .venv/bin/python benchmarks/latency.py --quick         # a smoke run: resnet18 at 32x32, eager, batch 1
    .venv/bin/python benchmarks/latency.py --torch-pruning # also Torch-Pruning at the same MACs (pip install fxtucker[bench])
    .venv/bin/python benchmarks/latency.py --plot          # only draw results/latency.png from the stored rows

For each (model, batch, back end) the baseline is ``optimize_for_inference(model, x, backend=B)``
(BatchNorm folded, nothing decomposed; on eager, its weights in the memory format it runs faster in) and the compressed model is ``optimize_for_inference(model, x,
ranks=R, backend=B, round_to=16, max_macs=baseline MACs / 2, search=S)`` (per-layer forms chosen
by timing on B, within the issue's MAC goal: ``--min-macs-ratio``; ``--search model`` also times
whole models with candidate form sets). Both are timed in the
same run, alternately, ``--rounds`` times a median of ``--repeats`` runs each; the row keeps the
median over rounds. Each finished row is appended to the output JSON ({"rows": [...]}) at once; a
rerun skips the rows already there (``--force`` redoes them). Random weights: latency does not
depend on them. Run it on a quiet machine: other processes on the same cores distort every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

import fxtucker
from fxtucker import models
from fxtucker.deploy import optimize_for_inference
from fxtucker.io import write_text
from fxtucker.latency import compare_latency
from fxtucker.meta import graph_record

sys.path.insert(0, str(Path(__file__).parent))
from compare import git_commit  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "latency.json"
PLOT = RESULTS.with_suffix(".png")
FULL = dict(models=["resnet18", "resnet50", "mobilenet_v2"], input_size=224, batches=[1, 8],
            backends=["eager", "compile", "compile-freezing", "onnxruntime"],
            threads=2, ranks=0.5, round_to=16, min_macs_ratio=2.0, search="model", repeats=20, rounds=5)
QUICK = dict(models=["resnet18"], input_size=32, batches=[1], backends=["eager"], threads=1, ranks=0.5,
             round_to=16, min_macs_ratio=2.0, search="layer", repeats=5, rounds=2)
# Per model, where the profile's ranks cannot reach the MAC goal (--ranks / --round-to override): in
# resnet50's bottlenecks 1x1 convs dominate, and an SVD pair at half rank costs 62-75% of its conv;
# mobilenet_v2's depthwise convs are not decomposed and its narrow layers stop at a rank of 16.
MODEL_RANKS = {"resnet50": dict(ranks=0.35), "mobilenet_v2": dict(ranks=0.25, round_to=8)}
# Issue 19's goals at >= 2x fewer MACs: the efficiency (speed-up / MAC ratio; the MAC ratio is the
# ceiling) per back end on resnet18, at batch 1 and 8; a plain speed-up on resnet50.
EFFICIENCY_GOALS = {"resnet18": {"eager": 0.92, "compile": 0.92, "onnxruntime": 0.92, "compile-freezing": 0.85}}
SPEEDUP_GOALS = {"resnet50": {"compile": 1.8, "onnxruntime": 1.8}}
BACKENDS = ("eager", "compile", "compile-freezing", "onnxruntime")


def goal_met(row: dict) -> Optional[bool]:
    """Whether an fxtucker row meets its goal (None where the issue sets none, or where the rounds
    disagreed by more than the allowed spread)."""
    if row.get("reliable") is False:
        return None
    eff = EFFICIENCY_GOALS.get(row["model"], {}).get(row["backend"])
    if eff is not None:
        return row["speedup"] / row["macs_ratio"] >= eff
    speed = SPEEDUP_GOALS.get(row["model"], {}).get(row["backend"])
    return None if speed is None else row["speedup"] >= speed


def row_key(row: dict) -> tuple:
    return (row["method"], row["model"], row["input_size"], row["batch"], row["backend"], row["threads"],
            row["ranks"], row["round_to"], row.get("min_macs_ratio"), row.get("search", "layer"))


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def append_row(path: Path, row: dict, key=row_key) -> None:
    """Add ``row`` to the file at once (atomically), replacing a row with the same ``key``."""
    rows = [r for r in load_rows(path) if key(r) != key(row)] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"rows": rows}, indent=1) + "\n")


def torch_pruning_missing(what: str) -> bool:
    """Whether Torch-Pruning cannot be imported; if so, says so on stderr with ``what`` (which option
    needs it, or what to do instead) and how to install it."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        print(f"Torch-Pruning is not installed ({what}): pip install fxtucker[bench]", file=sys.stderr)
        return True
    return False


def _layers_slower(gm) -> int:
    """Layers whose kept form was timed slower than the original conv (possible only under max_macs)."""
    return sum(1 for l in fxtucker.report(gm).layers
               if l.timings_ms and dict(l.timings_ms)[l.form] > dict(l.timings_ms)["dense"])


def _torch_pruning(model, x, target_macs: int):
    """Torch-Pruning (magnitude, L2 of each channel group) at the given MACs: prune in small steps until at or under."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       iterative_steps=200, pruning_ratio=0.95,
                                       ignored_layers=[m for m in model.modules() if isinstance(m, torch.nn.Linear)])
    for _ in range(200):
        if fxtucker.count_macs(model, x) <= target_macs:
            break
        pruner.step()
    return model


def original(model_name: str) -> torch.nn.Module:
    """The model every row of ``model_name`` starts from: random weights drawn with seed 0."""
    torch.manual_seed(0)
    return models.get_model(model_name, num_classes=1000, in_channels=3, checkpoint=None).eval()


def torch_pruned(model, x, target_macs: int, backend: str = "eager", threads: Optional[int] = None):
    """Torch-Pruning's model at ``target_macs``, deployed as the baseline is (BatchNorm folded; on eager,
    the memory format it runs faster in)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize_for_inference(_torch_pruning(model, x, target_macs), x, backend=backend, threads=threads)


def build(args, model_name: str, batch: int, backend: str, method: str) -> tuple:
    """A row's models and input: ``(baseline, compressed, x)``, the baseline BN-folded, the
    compressed one fxtucker's (forms chosen on ``backend``) or, for ``method`` "torch-pruning",
    Torch-Pruning's at fxtucker's MACs."""
    model = original(model_name)
    x = torch.randn(batch, 3, args.input_size, args.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        baseline = optimize_for_inference(model, x, backend=backend, threads=args.threads)
        # The MAC goal (>= 2x fewer) as a bound: forms with fewer MACs replace the fastest where needed.
        max_macs = int(fxtucker.count_macs(baseline, x) / args.min_macs_ratio) if args.min_macs_ratio else None
        compressed = optimize_for_inference(model, x, ranks=args.ranks, backend=backend, round_to=args.round_to,
                                            threads=args.threads, max_macs=max_macs, search=args.search)
    if method == "torch-pruning":
        compressed = torch_pruned(model, x, fxtucker.count_macs(compressed, x), backend, args.threads)
    return baseline, compressed, x


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() elsewhere): speed-ups depend on it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def run_row(args, model_name: str, batch: int, backend: str, method: str) -> dict:
    start = time.perf_counter()
    baseline, compressed, x = build(args, model_name, batch, backend, method)
    prepare_s = time.perf_counter() - start
    load_before = os.getloadavg()[0]
    # The one measurement fxtucker's reports use: alternating rounds, the round with the median
    # speed-up kept, the spread of the rounds' speed-ups recorded (unreliable above MAX_SPREAD).
    cmp = compare_latency(baseline, compressed, x, rounds=args.rounds, backend=backend, threads=args.threads,
                          repeats=args.repeats)
    base_macs, comp_macs = fxtucker.count_macs(baseline, x), fxtucker.count_macs(compressed, x)
    row = dict(method=method, model=model_name, input_size=args.input_size, batch=batch, backend=backend,
               threads=args.threads, ranks=args.ranks, round_to=args.round_to, min_macs_ratio=args.min_macs_ratio,
               search=args.search, baseline_ms=cmp.baseline_ms,
               compressed_ms=cmp.candidate_ms, speedup=cmp.speedup, baseline_macs=base_macs, compressed_macs=comp_macs,
               macs_ratio=base_macs / comp_macs, repeats=args.repeats, rounds=args.rounds,
               baseline_rounds_ms=list(cmp.baseline_rounds_ms), compressed_rounds_ms=list(cmp.candidate_rounds_ms),
               spread=cmp.spread, reliable=cmp.reliable, others_cpu=cmp.others_cpu, max_others=cmp.max_others,
               prepare_s=round(prepare_s, 2), torch=torch.__version__, python=platform.python_version(),
               cpus=os.cpu_count(), cpu_model=cpu_model(), quick=args.quick, commit=git_commit("benchmarks/latency.py"),
               memory_formats=[graph_record(m).memory_format for m in (baseline, compressed)],
               load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],  # before and after the timing
               time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if method == "fxtucker":
        forms = [l.form for l in fxtucker.report(compressed).layers if l.form]
        forced = sum(1 for l in fxtucker.report(compressed).layers if l.reason.startswith("fastest within max_macs"))
        row.update(forms={f: forms.count(f) for f in sorted(set(forms))}, layers_slower_than_dense=_layers_slower(compressed),
                   layers_traded_for_macs=forced)
    return row


def plot(rows: list[dict], out: Path) -> Optional[Path]:
    """Speed-up against MAC ratio, one panel per model: colour per method, marker per back end, filled
    at batch 1 and hollow at larger batches, the line speed-up = MAC ratio (the ceiling) drawn. Rows
    whose rounds disagreed (``reliable`` false) are left out; returns None when no row is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("reliable") is not False]
    if not rows:
        return None
    panels = sorted({(r["model"], r["input_size"], r["threads"]) for r in rows})
    markers = dict(zip(BACKENDS, "osD^"))
    colours = {"fxtucker": "tab:blue", "torch-pruning": "tab:orange"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (model, size, threads) in zip(axes[0], panels):
        mine = [r for r in rows if (r["model"], r["input_size"], r["threads"]) == (model, size, threads)]
        for r in mine:
            colour = colours.get(r["method"], "tab:gray")
            ax.scatter(r["macs_ratio"], r["speedup"], marker=markers.get(r["backend"], "x"), s=36,
                       facecolors=colour if r["batch"] == 1 else "none", edgecolors=colour)
        top = max(max(r["macs_ratio"], r["speedup"]) for r in mine) * 1.08
        ax.plot([1, top], [1, top], "k--", lw=0.8, label="speed-up = MAC ratio")
        for method, colour in colours.items():
            if any(r["method"] == method for r in mine):
                ax.scatter([], [], marker="s", color=colour, label=method)
        for backend, marker in markers.items():
            if any(r["backend"] == backend for r in mine):
                ax.scatter([], [], marker=marker, facecolors="none", edgecolors="k", label=backend)
        ax.set_title(f"{model}, {size}x{size}, {threads} thread(s); filled: batch 1, hollow: batch > 1", fontsize=8)
        ax.set_xlabel("MACs fewer (x)")
        ax.set_ylabel("measured speed-up (x)")
        ax.set_xlim(1, top)
        ax.set_ylim(0, top)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke profile: resnet18 at 32x32, eager, batch 1")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--ranks", type=float)
    parser.add_argument("--round-to", type=int)
    parser.add_argument("--min-macs-ratio", type=float,
                        help="keep at least this many times fewer MACs than the baseline (default 2.0; 0: no bound)")
    parser.add_argument("--search", choices=("layer", "model"),
                        help="fxtucker's form choice: each layer's fastest, or also whole models (default: model; --quick: layer)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--torch-pruning", action="store_true", help="also Torch-Pruning at the same MACs")
    parser.add_argument("--force", action="store_true", help="redo rows that are already in --out")
    parser.add_argument("--plot", action="store_true",
                        help=f"only draw the speed-up against the MAC ratio from the rows in --out (to {PLOT.name} beside it)")
    args = parser.parse_args(argv)
    if args.plot:
        drawn = plot(load_rows(args.out), args.out.with_suffix(".png"))
        print(drawn or f"no reliable rows in {args.out} to plot")
        return 0
    args.given = {name for name in ("ranks", "round_to") if getattr(args, name) is not None}
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args) -> int:
    methods = ["fxtucker"] + (["torch-pruning"] if args.torch_pruning else [])
    if args.torch_pruning and torch_pruning_missing("--torch-pruning needs it"):
        return 2
    done = {row_key(r) for r in load_rows(args.out)}
    base = args
    for method in methods:
        for model_name in base.models:
            per_model = {k: v for k, v in MODEL_RANKS.get(model_name, {}).items() if k not in base.given}
            args = argparse.Namespace(**{**vars(base), **per_model})
            for batch in args.batches:
                for backend in args.backends:
                    probe = dict(method=method, model=model_name, input_size=args.input_size, batch=batch,
                                 backend=backend, threads=args.threads, ranks=args.ranks, round_to=args.round_to,
                                 min_macs_ratio=args.min_macs_ratio, search=args.search)
                    if row_key(probe) in done and not args.force:
                        print(f"skip {method} {model_name} batch {batch} {backend}: already in {args.out}")
                        continue
                    row = run_row(args, model_name, batch, backend, method)
                    append_row(args.out, row)
                    print(f"{method} {model_name} {args.input_size}x{args.input_size} batch {batch} {backend}: "
                          f"{row['baseline_ms']:.2f} -> {row['compressed_ms']:.2f} ms ({row['speedup']:.2f}x, "
                          f"rounds' spread {row['spread']:.2f}x{'' if row['reliable'] else ': unreliable'}), "
                          f"MACs {row['macs_ratio']:.2f}x fewer", flush=True)
    args = base
    rows = [r for r in load_rows(args.out) if r["input_size"] == args.input_size and r["threads"] == args.threads]
    if rows:
        print("\n| method | model | batch | back end | baseline ms | compressed ms | speed-up | MACs ratio | "
              "efficiency | rounds' spread | goal met |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            met = goal_met(r) if r["method"] == "fxtucker" else None
            # rows from before the spread was recorded kept each model's median over rounds
            spread = (f"{r['spread']:.2f}x" + ("" if r["reliable"] else " (unreliable)")) if "spread" in r else "not recorded"
            print(f"| {r['method']} | {r['model']} | {r['batch']} | {r['backend']} | {r['baseline_ms']:.2f} | "
                  f"{r['compressed_ms']:.2f} | {r['speedup']:.2f}x | {r['macs_ratio']:.2f}x | "
                  f"{r['speedup'] / r['macs_ratio']:.2f} | {spread} | {'-' if met is None else 'yes' if met else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
