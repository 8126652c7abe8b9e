"""Where a compressed model's time goes, next to its original's and Torch-Pruning's at the same MACs:
the profile behind a latency row that falls short of its MAC ratio (issue 19).

    .venv/bin/python benchmarks/profile_latency.py --models mobilenet_v2 --batches 1 --backends compile
    .venv/bin/python benchmarks/profile_latency.py --table        # the stored profiles as markdown

The three models are built as ``benchmarks/latency.py`` builds them (same ranks per model, forms
chosen on the back end, Torch-Pruning pruned to fxtucker's MACs), each run ``--runs`` times under
``torch.profiler`` after a warm-up, the models in turn, ``--passes`` times (each kind's median kept:
a shared machine's slow minute moves one pass), and every op's self time is summed by kind: convolutions by
kernel shape (1x1, depthwise, kxk), GEMMs, inductor's fused kernels (under compile, with
``cpp.enable_kernel_profile``), and the rest (elementwise ops, copies, the framework around them).
Each row also stores the model's MACs by the same kinds (from the cost model, not the profiler), so
the table can give each kind's rate, GMAC/s: how well the kernels a form calls use the machine.
The profiler adds its own overhead to every op, so the milliseconds here are larger than
``latency.py``'s; the shares are what a row compares. Each (model, batch, back end) is one row of
``results/latency_profile.json`` (a rerun skips stored rows; ``--force`` redoes them).
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own log lines, before torch loads it

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import fxtucker
from fxtucker.latency import COMPILE_OPTIONS
from fxtucker.meta import TENSOR_META

sys.path.insert(0, str(Path(__file__).parent))
import latency  # noqa: E402
from compare import git_commit  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "latency_profile.json"
BACKENDS = ("eager", "compile", "compile-freezing")
#: GEMM ops (a pointwise factor in a ``+linear`` form, a classifier) and inductor's own extern GEMM.
GEMMS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise")
#: Inductor's generated kernels, named when ``cpp.enable_kernel_profile`` is on.
FUSED_PREFIXES = ("cpp_fused", "graph_")
#: The framework around a compiled graph (guards, wrappers, the graph call's own time).
FRAMEWORK = ("TorchDynamo", "Torch-Compiled Region", "## Call CompiledFxGraph", "AOTDispatcher", "Pregraph",
             "CompiledFunction")


def _key(row: dict) -> tuple:
    return (row["model"], row["input_size"], row["batch"], row["backend"], row["threads"])


def kind(name: str, shapes: list) -> str:
    """The kind of time an op's self time is: an inductor kernel (with a convolution in it or not),
    a convolution by its weight's shape (the op's second input), a GEMM, the framework around a
    compiled graph, or another op."""
    if name.startswith(FUSED_PREFIXES):
        return "inductor kernel, " + ("with a conv" if "convolution" in name else "elementwise")
    if name.startswith(FRAMEWORK):
        return "framework (compiled graph)"
    if "conv" in name.lower():
        weight = shapes[1] if len(shapes) > 1 else []
        if len(weight) == 4:
            _, in_per_group, kh, kw = weight
            if kh * kw == 1:
                return "conv 1x1"
            return "conv depthwise" if in_per_group == 1 else f"conv {kh}x{kw}"
        return "conv (shape not recorded)"
    if name in GEMMS:
        return "GEMM"
    return "other ops"


#: The functional forms of a Linear and a conv, as a traced graph calls them.
LINEAR_FUNCTIONS = (torch.nn.functional.linear,)
CONV_FUNCTIONS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)


def macs_by_kind(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """``model``'s MACs for ``x`` by the kind of op that computes them, as :func:`kind` names them:
    each conv by its weight's shape, each Linear a GEMM; the cost model's other MACs are "other ops"."""
    gm = fxtucker.cost_model(fxtucker.trace(model), x)
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        macs = node.meta.get("macs", 0)
        if not macs:
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, torch.nn.Linear) or node.target in LINEAR_FUNCTIONS:
            k = "GEMM"
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            k = kind("conv", [[], list(module.weight.shape)])
        elif node.target in CONV_FUNCTIONS:
            k = kind("conv", [[], list(node.args[1].meta[TENSOR_META].shape)])
        else:
            k = "other ops"
        out[k] = out.get(k, 0) + macs
    return dict(sorted(out.items()))


#: Kinds whose rates the table gives, each a sum of kinds: under compile inductor runs some 1x1
#: convolutions as GEMMs, so the pointwise rate counts both.
RATE_GROUPS = {"pointwise (conv 1x1 and GEMM)": ("conv 1x1", "GEMM"), "conv 3x3": ("conv 3x3",),
               "conv 7x7": ("conv 7x7",), "conv depthwise": ("conv depthwise",)}


def rates(row: dict, name: str) -> dict[str, Optional[float]]:
    """GMAC/s of each of RATE_GROUPS for the profiled model ``name`` of a stored row (the group's MACs
    over its profiled self time); ``{}`` for rows stored before MACs by kind were."""
    by_kind = row.get("macs_by_kind", {}).get(name)
    if by_kind is None:
        return {}
    kinds = row["profiles"][name]["kinds"]
    out = {}
    for group, members in RATE_GROUPS.items():
        macs = sum(by_kind.get(k, 0) for k in members)
        ms = sum(kinds[k]["ms"] for k in members if k in kinds)
        if macs:
            out[group] = macs / ms / 1e6 if ms else None
    return out


def ready(model: torch.nn.Module, x: torch.Tensor, backend: str) -> torch.nn.Module:
    """``model`` as ``backend`` runs it (compiled with inductor's kernels named for the profiler),
    compiled and warmed up on ``x``."""
    if backend != "eager":
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
        model = torch.compile(model, dynamic=False, options=COMPILE_OPTIONS[backend] or None)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    return model


def profile_ready(model: torch.nn.Module, x: torch.Tensor, runs: int) -> dict:
    """A :func:`ready` ``model`` run ``runs`` times under the profiler: per kind, self milliseconds
    per run and calls per run (an op called by an op of the same kind, aten::convolution's
    aten::mkldnn_convolution say, is part of its caller's call)."""
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                model(x)
            wall = (time.perf_counter() - start) / runs
    kinds: dict[str, dict[str, float]] = {}
    of = lambda e: kind(e.name, e.input_shapes or [])  # noqa: E731
    for event in prof.events():
        k = kinds.setdefault(of(event), {"ms": 0.0, "calls": 0.0})
        k["ms"] += event.self_cpu_time_total / 1000 / runs
        if event.cpu_parent is None or of(event.cpu_parent) != of(event):
            k["calls"] += 1 / runs
    return {"wall_ms_profiled": wall * 1000,
            "kinds": {k: {"ms": round(v["ms"], 3), "calls": round(v["calls"], 1)} for k, v in sorted(kinds.items())}}


def profile_in_turn(models: dict[str, torch.nn.Module], x: torch.Tensor, backend: str, runs: int,
                    passes: int) -> dict[str, dict]:
    """Each of ``models`` profiled ``passes`` times, the models in turn (the order reversed every
    other pass, so a slow minute of a shared machine falls on all of them): per model each kind's
    median self ms over the passes (its calls from the first), the median wall time and each pass's."""
    torch._dynamo.reset()
    compiled = {name: ready(model, x, backend) for name, model in models.items()}
    seen: dict[str, list[dict]] = {name: [] for name in models}
    for p in range(passes):
        for name in (list(models) if p % 2 == 0 else list(models)[::-1]):
            seen[name].append(profile_ready(compiled[name], x, runs))
    out = {}
    for name, profiles in seen.items():
        names = sorted({k for prof in profiles for k in prof["kinds"]})
        kinds = {k: {"ms": round(statistics.median(prof["kinds"].get(k, {"ms": 0.0})["ms"] for prof in profiles), 3),
                     "calls": next(prof["kinds"][k]["calls"] for prof in profiles if k in prof["kinds"])} for k in names}
        walls = [prof["wall_ms_profiled"] for prof in profiles]
        out[name] = {"wall_ms_profiled": statistics.median(walls), "wall_ms_passes": [round(w, 3) for w in walls],
                     "kinds": kinds}
    return out


def run_row(args, model_name: str, batch: int, backend: str) -> dict:
    row_args = argparse.Namespace(**{**vars(args), **latency.MODEL_RANKS.get(model_name, {})})
    baseline, compressed, x = latency.build(row_args, model_name, batch, backend, "fxtucker")
    profiled = {"baseline": baseline, "fxtucker": compressed}
    macs = {"baseline": fxtucker.count_macs(baseline, x), "fxtucker": fxtucker.count_macs(compressed, x)}
    if args.torch_pruning:
        profiled["torch-pruning"] = latency.torch_pruned(latency.original(model_name), x, macs["fxtucker"], backend,
                                                            args.threads)
        macs["torch-pruning"] = fxtucker.count_macs(profiled["torch-pruning"], x)
    load_before = os.getloadavg()[0]
    out = profile_in_turn(profiled, x, backend, args.runs, args.passes)
    forms = [l.form for l in fxtucker.report(compressed).layers if l.form]
    return dict(model=model_name, input_size=args.input_size, batch=batch, backend=backend, threads=args.threads,
                ranks=row_args.ranks, round_to=row_args.round_to, min_macs_ratio=args.min_macs_ratio,
                search=args.search, runs=args.runs, passes=args.passes, macs=macs, profiles=out,
                macs_by_kind={name: macs_by_kind(model, x) for name, model in profiled.items()},
                forms={f: forms.count(f) for f in sorted(set(forms))},
                torch=torch.__version__, cpus=os.cpu_count(), commit=git_commit("benchmarks/profile_latency.py"),
                load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def table(rows: list[dict]) -> str:
    """Per stored row, each kind's self ms per run (and op calls) for every profiled model, and where the
    row has MACs by kind, the rate of each of RATE_GROUPS (GMAC/s under the profiler)."""
    out = []
    for r in rows:
        names = list(r["profiles"])
        out.append(f"**{r['model']}, batch {r['batch']}, {r['backend']}** ({r['input_size']}x{r['input_size']}, "
                   f"{r['threads']} threads, {r['runs']} runs"
                   + (f", median of {r['passes']} passes in turn" if r.get("passes") else "") + "; MACs "
                   + ", ".join(f"{n} {r['macs'][n] / 1e6:,.0f}M" for n in names) + ")\n")
        out.append("| kind | " + " | ".join(f"{n} ms (calls)" for n in names) + " |")
        out.append("|---|" + "---|" * len(names))
        kinds = sorted({k for p in r["profiles"].values() for k in p["kinds"]})
        for k in kinds:
            cells = []
            for n in names:
                v = r["profiles"][n]["kinds"].get(k)
                cells.append(f"{v['ms']:.2f} ({v['calls']:g})" if v else "-")
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        totals = [sum(v["ms"] for v in r["profiles"][n]["kinds"].values()) for n in names]
        out.append("| **all ops** | " + " | ".join(f"**{t:.2f}**" for t in totals) + " |")
        out.append("| wall ms per run, profiled | "
                   + " | ".join(f"{r['profiles'][n]['wall_ms_profiled']:.2f}" for n in names) + " |")
        if all("wall_ms_passes" in r["profiles"][n] for n in names):
            out.append("| wall ms, each pass | " + " | ".join(
                " / ".join(f"{w:.1f}" for w in r["profiles"][n]["wall_ms_passes"]) for n in names) + " |")
        by_name = {n: rates(r, n) for n in names}
        for group in RATE_GROUPS:
            if any(group in v for v in by_name.values()):
                cells = []
                for n in names:
                    v, macs = by_name[n].get(group), sum(r["macs_by_kind"][n].get(k, 0) for k in RATE_GROUPS[group])
                    cells.append("-" if not macs else f"{v:.1f} ({macs / 1e6:,.0f}M MACs)" if v else "no time")
                out.append(f"| {group}: GMAC/s, profiled | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=["compile"])
    ap.add_argument("--input-size", type=int, default=latency.FULL["input_size"])
    ap.add_argument("--threads", type=int, default=latency.FULL["threads"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--passes", type=int, default=3,
                    help="profile the models in turn this many times and keep each kind's median (default 3)")
    ap.add_argument("--no-torch-pruning", dest="torch_pruning", action="store_false",
                    help="profile the original and fxtucker's model only")
    ap.add_argument("--force", action="store_true", help="redo rows already stored")
    ap.add_argument("--table", action="store_true", help="only print the stored rows")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.table:
        print(table(latency.load_rows(args.out)))
        return 0
    args.ranks, args.round_to = latency.FULL["ranks"], latency.FULL["round_to"]
    args.min_macs_ratio, args.search = latency.FULL["min_macs_ratio"], latency.FULL["search"]
    if args.torch_pruning and latency.torch_pruning_missing("or pass --no-torch-pruning"):
        return 2
    done = {_key(r) for r in latency.load_rows(args.out)}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for model_name in args.models:
            for batch in args.batches:
                for backend in args.backends:
                    if (model_name, args.input_size, batch, backend, args.threads) in done and not args.force:
                        print(f"skip {model_name} batch {batch} {backend}: already in {args.out}")
                        continue
                    row = run_row(args, model_name, batch, backend)
                    latency.append_row(args.out, row, key=_key)
                    print(table([row]), flush=True)
    finally:
        torch.set_num_threads(old_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
