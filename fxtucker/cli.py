"""The ``fxtucker`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import tomllib
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

import fxtucker
from fxtucker import data, models
from fxtucker.io import save_torch, write_atomic, write_text
from fxtucker.runs import record_run
from fxtucker.latency import measure_latency, measure_side_by_side
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


def _positive(text: str) -> int:
    """An integer >= 1 (channels, sizes, counts, epochs, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= 1")
    return value


def _seed(text: str) -> int:
    """A seed: an integer in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a seed in [0, 2**32)") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: give a seed in [0, 2**32)")
    return value


def _threshold(text: str) -> float:
    """A gate threshold: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a finite number >= 0") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number >= 0 (untrained gates: 0)")
    return value


def _json_object(text: str) -> dict:
    """--model-kwargs: a JSON object of keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--model-kwargs {text!r} is not JSON ({e}); give an object such as "
                                         f"'{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs {text!r} is a JSON {type(value).__name__}, not an object; "
                                         f"give keyword arguments such as '{{\"width\": 32}}'")
    return value


_MODEL_HELP = ("resnet20/32/56, vgg_small, a torchvision classification model, timm:NAME (pip install fxtucker[timm]), "
               "or your own factory as module.path:callable or path/to/file.py:callable")
_MODEL_KWARGS_HELP = "keyword arguments for the model's constructor or factory, as a JSON object"


def _model(name: str, num_classes: int, in_channels: int, checkpoint: Optional[str],
           model_kwargs: Optional[dict] = None) -> torch.nn.Module:
    choices = models.list_models()
    if ":" not in name and name.lower() not in [c.lower() for c in choices]:
        close = difflib.get_close_matches(name, choices, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise _UsageError(f"unknown model {name!r}.{hint} Choices: {', '.join(choices)}, or timm:NAME, "
                          f"module.path:callable, path/to/file.py:callable")
    try:
        return models.get_model(name, num_classes=num_classes, in_channels=in_channels, checkpoint=checkpoint,
                                model_kwargs=model_kwargs)
    except ImportError as exc:  # timm missing
        raise _UsageError(str(exc)) from None


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inspect(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = _model(args.model, args.num_classes, args.in_channels, args.checkpoint, args.model_kwargs).eval()
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size)
    gm = cost_model(fxtucker.trace(model), x)
    if args.graph:
        print("== graph before ==")
        print(gm.graph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decomposed = decompose_conv(gm, ranks=args.ranks, linear=args.linear, method=args.method)
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
        write_text(out_path, json.dumps(summary, indent=2))
        print(f"wrote {out_path}")
    return 0


# The --quick profile: a ~10-minute run on 2 CPU cores (resnet20, Fashion-MNIST).
QUICK = dict(train_subset=10000, eval_subset=2000, baseline_epochs=4)
QUICK_CONFIG = dict(train_epochs=1, reg_epochs=4, finetune_epochs=2, reg_weight=0.2, target_speedup=2.0)


def _dataset(name: str):
    if name not in data.DATASETS:
        close = difflib.get_close_matches(name, list(data.DATASETS), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise _UsageError(f"unknown dataset {name!r}.{hint} Choices: {', '.join(data.DATASETS)}")
    return name


def _check_out(out: Path, resume: bool) -> None:
    """--out must be a directory that exists (with --resume) or can be made, and can be written: checked
    before any training, not after the first epoch."""
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is" if folder == out else f"is under {str(folder)!r}, which is"
                raise _UsageError(f"--out {str(out)!r} {where} an existing file, not a directory; give the path of "
                                  f"a directory (it is made if needed)")
            break
    if resume and not out.is_dir():
        return  # record_run says that there is no run to continue
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise _UsageError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc}); give a directory you can "
                          f"write to") from None


def _check_toml(path: str) -> str:
    """``path`` if it is a readable TOML file whose ``compress`` key, if any, is a table; else a usage error
    naming the file."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
        parsed = tomllib.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise _UsageError(f"--config {path!r} does not exist") from None
    except OSError as exc:
        raise _UsageError(f"--config {path!r} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise _UsageError(f"--config {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                          f"UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise _UsageError(f"--config {path!r} is not valid TOML: {exc}") from None
    if "compress" in parsed and not isinstance(parsed["compress"], dict):
        raise _UsageError(f"--config {path!r}: 'compress' must be a table ([compress] followed by key = value "
                          f"lines), got a {type(parsed['compress']).__name__}")
    return path


def _markdown(summary: dict, layers: list[dict]) -> str:
    lines = ["# fxtucker compress", "", f"`{summary['command']}`", "",
             "| | original | compressed | ratio |", "|---|---|---|---|"]
    for key, label in (("accuracy", "accuracy"), ("macs", "MACs"), ("params", "params"), ("latency_ms", "CPU latency, batch 1 (ms)")):
        b, a = summary[f"{key}_before"], summary[f"{key}_after"]
        if key == "accuracy":
            lines.append(f"| {label} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
        else:
            lines.append(f"| {label} | {b:,.6g} | {a:,.6g} | {b / a:.2f}x |")
    lines += ["", "## Accuracy after each stage", "", "| stage | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.4f} |" for k, v in summary["stages"].items() if v.get("accuracy") is not None]
    lines += ["", "## Layers", "", "| layer | full ranks | ranks | MACs before | MACs after | decision |", "|---|---|---|---|---|---|"]
    for l in layers:
        fmt = lambda t: "x".join(map(str, t)) or "-"  # noqa: E731
        lines.append(f"| {l['name']} | {fmt(l['full_ranks'])} | {fmt(l['ranks'])} | {l['macs_before'] or '-'} | "
                     f"{l['macs_after'] or '-'} | {l['decision']} |")
    return "\n".join(lines) + "\n"


def _histograms(stages: dict, out: Path) -> list[str]:
    """One PNG of the gate histogram per stage (the paper's Figure 4), if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for stage, info in stages.items():
        hist = info.get("gate_histogram")
        if not hist:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        edges = hist["log10_edges"]
        ax.bar(edges[:-1], hist["counts"], width=edges[1] - edges[0], align="edge")
        ax.set_xlabel("log10 (|gate| / mean |gate| of its vector)" if hist.get("relative") else "log10 |gate|")
        ax.set_ylabel("gates")
        ax.set_title(f"gates after stage '{stage}' ({hist['zeros']} of {hist['total']} exactly 0)")
        fig.tight_layout()
        path = out / f"gates_{stage}.png"
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
        written.append(path.name)
    return written


def _launch_rank() -> int:
    """This process's rank under torchrun (0 in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0  # a stray RANK without torchrun's WORLD_SIZE must not silence the only process
    return int(os.environ.get("RANK", "0") or 0)


def _finish_distributed() -> None:
    """Under torchrun: wait until rank 0 has written everything, then leave the process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank stays until the last one is done: a rank that tears gloo down early can abort the others.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _flow_device() -> torch.device:
    """Where train() puts this rank's model: the local GPU under torchrun with GPUs, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def _compress(args: argparse.Namespace) -> int:
    from fxtucker.compress import CompressConfig, compress
    from fxtucker.train import TrainConfig, evaluate, train

    # Under torchrun every rank runs the whole flow (train() shards the data and keeps the models
    # identical); only rank 0 prints and writes files.
    main_rank = _launch_rank() == 0
    say = print if main_rank else (lambda *_a, **_k: None)
    dataset = _dataset(args.dataset)
    in_ch, n_cls, size = data.dataset_info(dataset, root=args.root)
    torch.manual_seed(args.seed)  # before the model's initial weights are drawn: --seed fixes the whole run
    model = _model(args.model, n_cls, in_ch, args.checkpoint, args.model_kwargs)
    train_set = data.get_dataset(dataset, True, root=args.root)
    eval_set = data.get_dataset(dataset, False, root=args.root)
    quick = QUICK if args.quick else {}
    train_subset = args.train_subset or quick.get("train_subset")
    eval_subset = args.eval_subset or quick.get("eval_subset")
    train_loader = data.make_loader(train_set, args.batch_size, True, subset=train_subset, seed=args.seed)
    eval_loader = data.make_loader(eval_set, 256, False, subset=eval_subset, seed=args.seed)
    if args.config:
        config = CompressConfig.from_toml(_check_toml(args.config))
    else:
        config = CompressConfig(**QUICK_CONFIG) if args.quick else CompressConfig()
    config = dataclasses.replace(config, seed=args.seed, **({"method": args.method} if args.method else {}))
    out = Path(args.out or f"runs/{models.model_label(args.model)}-{dataset}" + ("-quick" if args.quick else ""))
    epochs = args.baseline_epochs or quick.get("baseline_epochs", 30)
    # The whole run configuration is stored with the checkpoints; --resume continues only that run.
    run = {"model": args.model, "model_kwargs": args.model_kwargs or {}, "checkpoint": args.checkpoint,
           "dataset": dataset, "train_subset": train_subset, "eval_subset": eval_subset,
           "batch_size": args.batch_size, "seed": args.seed,
           "baseline_epochs": epochs if args.checkpoint is None else None, "config": dataclasses.asdict(config)}
    _check_out(out, args.resume)
    if main_rank or args.resume:
        record_run(out, run, resume=args.resume, require=True)
    baseline_history = []
    if args.checkpoint is None:
        say(f"training the baseline {args.model} for {epochs} epochs (no --checkpoint given)")
        baseline_history = train(model, train_loader, TrainConfig(epochs=epochs, lr=0.1, seed=args.seed),
                                 eval_data=eval_loader, out_dir=out, stage="baseline", resume=args.resume,
                                 progress=not args.no_progress)
        if main_rank:
            save_torch(model.state_dict(), out / "baseline_state_dict.pt")
    x = torch.randn(1, in_ch, size, size)
    # compress() traces and measures with x on the model's device, and train() moves the model to the
    # local GPU under torchrun: both start there. The report and the files are made on the CPU.
    dev = _flow_device()
    result = compress(model.to(dev), train_loader, x.to(dev), eval_data=eval_loader, config=config, out_dir=out,
                      resume=args.resume, progress=not args.no_progress)
    if not main_rank:
        _finish_distributed()
        return 0
    model.cpu()
    result.model.cpu()
    rep = result.report
    lat_before, lat_after = measure_latency(model, x, threads=args.threads), measure_latency(result.model, x, threads=args.threads)
    summary = {
        "command": ("fxtucker " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("fxtucker", "__main__.py")
                    else "fxtucker compress"),
        "model": args.model, "dataset": dataset, "quick": args.quick,
        "accuracy_before": rep["accuracy_before"], "accuracy_after": rep["accuracy_after"],
        "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
        "params_before": rep["params_before"], "params_after": rep["params_after"],
        "latency_ms_before": lat_before, "latency_ms_after": lat_after, "stages": rep["stages"],
    }
    write_text(out / "report.json", json.dumps({**rep, **summary, "baseline_history": baseline_history,
                                                "history": result.history}, indent=2) + "\n")
    write_text(out / "report.md", _markdown(summary, rep["layers"]))
    save_torch(result.model.state_dict(), out / "compressed_state_dict.pt")
    # The manifest lets `fxtucker export --from <out>` (and fxtucker.load) rebuild the compressed model.
    fxtucker.export(result.model, x, out / "manifest", "manifest",
                    model_factory=lambda: models.get_model(args.model, num_classes=n_cls, in_channels=in_ch,
                                                           model_kwargs=args.model_kwargs),
                    config=config, extra={"model": args.model, "model_kwargs": args.model_kwargs or {},
                                          "num_classes": n_cls, "in_channels": in_ch,
                                          "input_shape": list(x.shape), "dataset": dataset})
    pngs = _histograms(rep["stages"], out)
    rows = [("", "original", "compressed", "ratio"),
            ("accuracy", f"{rep['accuracy_before']:.4f}", f"{rep['accuracy_after']:.4f}",
             f"{rep['accuracy_after'] - rep['accuracy_before']:+.4f}"),
            ("MACs", f"{rep['macs_before']:,}", f"{rep['macs_after']:,}", f"{rep['macs_before'] / rep['macs_after']:.2f}x"),
            ("params", f"{rep['params_before']:,}", f"{rep['params_after']:,}", f"{rep['params_before'] / rep['params_after']:.2f}x"),
            ("CPU latency, batch 1 (ms)", f"{lat_before:.2f}", f"{lat_after:.2f}", f"{lat_before / lat_after:.2f}x")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\nwrote {out}/report.json, report.md, compressed_state_dict.pt, manifest/" + (f", {', '.join(pngs)}" if pngs else ""))
    _finish_distributed()
    return 0


def _manifest_dir(source: str) -> Path:
    """The manifest directory of ``--from``: a manifest directory, a compress run directory or a file in one."""
    path = Path(source)
    for candidate in (path, path / "manifest", path.parent / "manifest"):
        if (candidate / "manifest.json").is_file():
            return candidate
    if path.name == "manifest.json" and path.is_file():
        return path.parent
    if not path.exists():
        raise FileNotFoundError(f"--from {source!r} does not exist")
    raise _UsageError(f"--from {source!r} holds no fxtucker manifest (manifest.json): give the output directory of "
                      f"`fxtucker compress` or a directory written by fxtucker.export(..., format='manifest'); a "
                      f"compressed state_dict alone does not say how to rebuild the model")


def _export(args: argparse.Namespace) -> int:
    from fxtucker.export import ExportError, export, read_manifest
    from fxtucker.meta import graph_record

    torch.manual_seed(args.seed)
    extra, config = {}, None
    if args.source:
        if args.checkpoint:
            raise _UsageError("give --from (a compressed model) or --checkpoint (an uncompressed one), not both")
        folder = _manifest_dir(args.source)
        manifest = read_manifest(folder)
        extra, config = manifest.get("extra") or {}, manifest.get("config")
        name = args.model or extra.get("model")
        if not name:
            raise _UsageError(f"the manifest in {str(folder)!r} does not name its model: give --model")
        if args.model and extra.get("model") and args.model.lower() != str(extra["model"]).lower():
            raise _UsageError(f"--model {args.model!r} differs from the model {extra['model']!r} the manifest was "
                              f"written for")
    elif not args.model:
        raise _UsageError("give --from DIR (the output of `fxtucker compress`) or --model NAME [--checkpoint FILE]")
    else:
        name = args.model
    n_cls = args.num_classes or extra.get("num_classes") or 1000
    in_ch = args.in_channels or extra.get("in_channels") or 3
    shape = extra.get("input_shape")
    size = (args.input_size,) * 2 if args.input_size else tuple(shape[2:]) if shape else (224, 224)
    model_kwargs = args.model_kwargs if args.model_kwargs is not None else extra.get("model_kwargs") or {}
    factory = lambda: _model(name, n_cls, in_ch, None, model_kwargs)  # noqa: E731
    if args.source:
        gm = fxtucker.load(folder, factory)
        print(f"rebuilt {name} from {folder}: {sum(p.numel() for p in gm.parameters()):,} parameters")
    else:
        gm = fxtucker.trace(_model(name, n_cls, in_ch, args.checkpoint, model_kwargs).eval())
    if args.fold_bn:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = fxtucker.fold_bn(gm)
        folded = [b for b in graph_record(gm).batchnorms if b.folded]
        print(f"folded {len(folded)} BatchNorm layer(s) into their convs")
        for w in caught:
            print(f"note: {w.message}")
    x = torch.randn(args.batch, in_ch, *size)
    kw = {}
    if args.format == "manifest":
        kw = dict(model_factory=factory, config=config,
                  extra={**extra, "model": name, "model_kwargs": model_kwargs, "num_classes": n_cls, "in_channels": in_ch, "input_shape": list(x.shape)})
    try:
        result = export(gm, x, args.out, args.format, rtol=args.rtol, atol=args.atol, **kw)
    except ImportError as exc:
        raise _UsageError(str(exc)) from None
    except ExportError as exc:
        print(f"fxtucker export: parity check failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(f) for f in result.files)} ({result.format}, {result.method})")
    print(f"reloaded and checked on a {'x'.join(map(str, x.shape))} input: max abs error {result.max_abs_error:.3g}, "
          f"max rel error {result.max_rel_error:.3g} (atol={result.atol:g}, rtol={result.rtol:g})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fxtucker.deploy import optimize_for_inference

    if args.ranks is None:
        raise _UsageError("bench compares the original with a compressed model: give --ranks a fraction in (0, 1] "
                          "or 'vbmf', not 'full'")
    torch.manual_seed(args.seed)
    model = _model(args.model, args.num_classes, args.in_channels, args.checkpoint, args.model_kwargs).eval()
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size)
    baseline = optimize_for_inference(model, x)
    macs_before = fxtucker.count_macs(baseline, x)
    threads = args.threads or torch.get_num_threads()
    print(f"{args.model} at {args.input_size}x{args.input_size}, batch {args.batch}, {threads} thread(s); original: "
          f"BatchNorm folded; compressed: ranks {args.ranks}" + (f" rounded to {args.round_to}" if args.round_to else "")
          + (", each layer's form chosen by timing on the back end" if args.search == "layer" else
             ", forms chosen by timing each layer and then whole models on the back end")
          + f"; timed alternately, median of {args.rounds} round{'s' if args.rounds != 1 else ''}")
    rows = [("back end", "original ms", "compressed ms", "speed-up", "original MACs", "compressed MACs", "MACs ratio")]
    summary = []
    for backend in args.backend:
        try:
            compressed = optimize_for_inference(model, x, ranks=args.ranks, method=args.method, backend=backend,
                                                round_to=args.round_to, threads=args.threads, search=args.search)
            before, after = measure_side_by_side([baseline, compressed], x, rounds=args.rounds, backend=backend,
                                                 threads=args.threads, repeats=args.repeats)
        except ImportError as exc:
            raise _UsageError(str(exc)) from None
        macs_after = fxtucker.count_macs(compressed, x)
        rows.append((backend, f"{before:.2f}", f"{after:.2f}", f"{before / after:.2f}x", f"{macs_before:,}",
                     f"{macs_after:,}", f"{macs_before / macs_after:.2f}x"))
        summary.append({"backend": backend, "original_ms": before, "compressed_ms": after, "speedup": before / after,
                        "original_macs": macs_before, "compressed_macs": macs_after, "rounds": args.rounds})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if args.json:
        out_path = Path(args.json)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(out_path, json.dumps({"model": args.model, "input_size": args.input_size, "batch": args.batch,
                                         "threads": threads, "ranks": args.ranks, "round_to": args.round_to,
                                         "rows": summary}, indent=2))
        print(f"wrote {out_path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtucker", description=fxtucker.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fxtucker {fxtucker.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="run the pass chain at given ranks (nothing trained) and print the report")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP)
    p.add_argument("--ranks", type=_ranks, default=0.5, help="fraction of each mode in (0, 1], 'vbmf' or 'full' (default 0.5)")
    p.add_argument("--threshold", type=_threshold, default=0.0, help="strip gates below this (untrained gates: keep 0)")
    p.add_argument("--linear", action="store_true", help="also decompose Linear layers")
    p.add_argument("--method", choices=("tucker2", "svd"), default="tucker2",
                   help="how kxk convs are decomposed: Tucker-2 (first/core/last) or an SVD pair (default tucker2)")
    p.add_argument("--checkpoint", help="state_dict of trained weights (loaded with weights_only=True)")
    p.add_argument("--input-size", type=_positive, default=224)
    p.add_argument("--in-channels", type=_positive, default=3)
    p.add_argument("--num-classes", type=_positive, default=1000)
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for the latency measurement")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--graph", action="store_true", help="print the graph before and after")
    p.add_argument("--json", help="also write the numbers and the report to this JSON file")
    p.set_defaults(func=_inspect)

    c = sub.add_parser("compress", help="train (if needed) and compress a model with the funnel flow")
    c.add_argument("--model", required=True, help=_MODEL_HELP)
    c.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP)
    c.add_argument("--dataset", required=True, help=f"one of {', '.join(data.DATASETS)}")
    c.add_argument("--root", help="dataset directory (default: Debian's /usr/share/datasets/fashion-mnist, ...)")
    c.add_argument("--config", help="a TOML file of CompressConfig fields")
    c.add_argument("--method", choices=("tucker2", "svd"),
                   help="how kxk convs are decomposed (overrides the config's method; default tucker2)")
    c.add_argument("--checkpoint", help="trained weights (state_dict, loaded with weights_only=True); "
                                        "without it the baseline is trained first")
    c.add_argument("--quick", action="store_true", help="a ~10 minute run: data subsets and short stages")
    c.add_argument("--baseline-epochs", type=_positive, help="epochs of baseline training (default 4 with --quick, else 30)")
    c.add_argument("--batch-size", type=_positive, default=128)
    c.add_argument("--train-subset", type=_positive, help="train on a fixed random subset of this many images")
    c.add_argument("--eval-subset", type=_positive, help="evaluate on a fixed random subset of this many images")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--resume", action="store_true", help="continue a killed run from the checkpoints in --out")
    c.add_argument("--threads", type=_positive, default=None, help="CPU threads for the latency measurement")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--out", help="output directory: logs, checkpoints, report.json, report.md "
                                 "(default runs/<model>-<dataset>[-quick])")
    c.set_defaults(func=_compress)

    from fxtucker.export import FORMATS

    e = sub.add_parser("export", help="write a (compressed) model as ONNX, TorchScript, torch.export or a manifest, "
                                      "and check the reloaded file computes the same")
    e.add_argument("--from", "--compressed", dest="source", metavar="DIR",
                   help="a compressed model: the output directory of `fxtucker compress` (or its manifest/)")
    e.add_argument("--model", help="the model (read from the manifest with --from); alone: export it uncompressed; "
                                   + _MODEL_HELP)
    e.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP + " (default: from the manifest)")
    e.add_argument("--checkpoint", help="weights of an uncompressed --model (state_dict, loaded with weights_only=True)")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", required=True, help="the file to write (a directory for --format manifest)")
    e.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding convs first")
    e.add_argument("--input-size", type=_positive,
                   help="example input height and width (default: from the manifest, else 224)")
    e.add_argument("--in-channels", type=_positive, help="default: from the manifest, else 3")
    e.add_argument("--num-classes", type=_positive, help="default: from the manifest, else 1000")
    e.add_argument("--batch", type=_positive, default=1, help="batch size of the example input")
    e.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the parity check")
    e.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance of the parity check")
    e.add_argument("--seed", type=_seed, default=0)
    e.set_defaults(func=_export)

    from fxtucker.latency import BACKENDS

    b = sub.add_parser("bench", help="time the BN-folded original against the compressed model on each back end")
    b.add_argument("--model", required=True, help=_MODEL_HELP)
    b.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP)
    b.add_argument("--ranks", type=_ranks, default=0.5, help="fraction of each mode in (0, 1] or 'vbmf' (default 0.5)")
    b.add_argument("--backend", nargs="+", default=["eager"], choices=BACKENDS, help="one or more (default eager)")
    b.add_argument("--batch", type=_positive, default=1)
    b.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: torch's setting)")
    b.add_argument("--input-size", type=_positive, default=224)
    b.add_argument("--round-to", type=_positive, default=None, help="round fractional ranks up to a multiple of this")
    b.add_argument("--method", choices=("tucker2", "svd"), default="tucker2",
                   help="how kxk convs are decomposed: Tucker-2 (first/core/last) or an SVD pair (default tucker2)")
    b.add_argument("--search", choices=("layer", "model"), default="layer",
                   help="layer: each layer's fastest form; model: also whole models timed with candidate form sets, "
                        "the fastest kept (slower to prepare; default layer)")
    b.add_argument("--in-channels", type=_positive, default=3)
    b.add_argument("--num-classes", type=_positive, default=1000)
    b.add_argument("--checkpoint", help="state_dict of trained weights (loaded with weights_only=True)")
    b.add_argument("--repeats", type=_positive, default=20, help="timed runs per model and round (their median is taken)")
    b.add_argument("--rounds", type=_positive, default=3,
                   help="rounds, the two models timed alternately in each (the median round is shown; default 3)")
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--json", help="also write the numbers to this JSON file")
    b.set_defaults(func=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from fxtucker.train import TrainingDiverged

    try:
        return args.func(args)
    except (_UsageError, fxtucker.TraceError, FileNotFoundError, ValueError) as exc:
        print(f"fxtucker {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"fxtucker {args.command}: training diverged: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fxtucker {args.command}: interrupted; every finished epoch is checkpointed: "
              f"rerun the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
