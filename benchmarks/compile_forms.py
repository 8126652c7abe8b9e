"""Batch-1 torch.compile speed of resnet18 with the layer forms chosen for each back end (issue 8's missed goal).

    .venv/bin/python benchmarks/compile_forms.py               # inductor's defaults
    .venv/bin/python benchmarks/compile_forms.py --freezing    # torch._inductor.config.freezing = True

Prepares the BN-folded baseline and three compressed models, ``optimize_for_inference(model, x,
ranks=0.5, backend=B, round_to=16, max_macs=baseline MACs / 2)`` with the forms chosen by timing
on B = compile, onnxruntime and eager, compiles each once, and times them alternately under
torch.compile (``--rounds`` rounds of a median of ``--repeats`` runs; the median over rounds is
printed). It shows whether the per-layer choice is what limits the compiled model's speed-up.
Run it on a quiet machine. Prints one line per model; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from fxtucker.deploy import optimize_for_inference
from fxtucker.passes import count_macs, set_memory_format


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freezing", action="store_true", help="inductor's freezing (weights as constants)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    base = optimize_for_inference(model, x, backend="compile")
    base_macs = count_macs(base, x)
    variants = {"baseline": base}
    for backend in ("compile", "onnxruntime", "eager"):
        # the forms each back end chooses, timed here under compile in the default format (on eager the
        # forms were chosen with the weights channels-last where that ran faster there)
        chosen = optimize_for_inference(model, x, ranks=0.5, backend=backend, round_to=16, threads=args.threads,
                                        max_macs=base_macs // 2)
        variants[f"forms for {backend}"] = set_memory_format(chosen, "contiguous")
    import torch._inductor.config as inductor_config

    inductor_config.freezing = args.freezing
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        compiled = {k: torch.compile(v, dynamic=False) for k, v in variants.items()}
        for f in compiled.values():
            for _ in range(3):
                f(x)
        for _ in range(args.rounds):
            for k, f in compiled.items():
                runs = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    f(x)
                    runs.append(time.perf_counter() - t)
                times[k].append(1000 * statistics.median(runs))
    ref = statistics.median(times["baseline"])
    print(f"resnet18 224x224 batch 1, torch.compile{' (freezing)' if args.freezing else ''}, {args.threads} threads")
    for k, v in times.items():
        ms = statistics.median(v)
        print(f"{k:24s} {ms:7.2f} ms  speed-up {ref / ms:4.2f}x  MACs {base_macs / count_macs(variants[k], x):4.2f}x fewer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
