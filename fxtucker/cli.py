"""The ``fxtucker`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import sys
import tempfile
import tomllib
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import fxtucker
from fxtucker import data, distributed, models, pretrained
from fxtucker import run_report
from fxtucker.io import save_torch, sha256_file, write_text
from fxtucker.runs import record_run
from fxtucker.latency import (MAX_OTHERS, MAX_SPREAD, ROUNDS, TRIM_FROM, BACKENDS, LatencyComparison, compare_latency,
                              default_backend, spread_rule)
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


_BACKEND_HELP = ("eager; compile (torch.compile, inductor); compile-freezing (the same with inductor's freezing=True, "
                 "the weights folded into the compiled graph); onnxruntime (pip install fxtucker[export])")


def _number(convert: Callable[[str], Any], valid: Callable[[Any], bool], kind: str, need: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` where ``valid`` accepts it; otherwise an error that names the
    text and what would be valid (``need``), e.g. "'two' is not an integer; give an integer >= 1"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}; give {need}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give {need}")
        return value
    return parse


# channels, sizes, counts, epochs, threads
_positive = _number(int, lambda v: v >= 1, "an integer", "an integer >= 1")
_seed = _number(int, lambda v: 0 <= v < 2**32, "an integer", "a seed in [0, 2**32)")
_learning_rate = _number(float, lambda v: math.isfinite(v) and v > 0, "a number",
                         "the initial learning rate, a finite number > 0 (e.g. 0.1)")
_threshold = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number",
                     "a finite number >= 0 (untrained gates: 0)")


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


_MODEL_HELP = ("resnet20/32/56, vgg_small, mobilenet_v2_cifar, a torchvision classification model, "
               "timm:NAME (pip install fxtucker[timm]), or your own factory as module.path:callable or "
               "path/to/file.py:callable")
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


def _check_classes(model: torch.nn.Module, name: str, model_kwargs: Optional[dict], in_channels: int, size: int,
                   num_classes: int, dataset: str) -> None:
    """Refuse a model whose outputs are not the dataset's classes before anything trains or is written:
    a model of fewer outputs fails in the loss only after the first batch, one of more trains on
    scores that no label ever asks for and is judged on them."""
    was_training = model.training
    try:  # on the CPU, where the model is built; the seeded run draws nothing more for it
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.eval()(torch.zeros(1, in_channels, size, size))
    finally:
        model.train(was_training)
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != num_classes):
        return
    given = (model_kwargs or {}).get("num_classes")
    if given is not None:
        fix = f"give --model-kwargs num_classes {num_classes}, or leave it out and fxtucker passes {num_classes}"
    elif ":" in name:
        fix = (f"{name} is given num_classes={num_classes} only when it takes a num_classes argument: "
               f"make it take one, or build {num_classes} outputs")
    else:
        fix = f"build it for {num_classes} classes"
    raise _UsageError(f"the model outputs {out.shape[1]} scores per image but {dataset} has {num_classes} classes: {fix}")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_max_spread = _number(float, lambda v: math.isfinite(v) and v >= 1, "a number",
                      f"the largest max/min of the rounds' speed-ups still counted as reliable, a finite number >= 1 "
                      f"(default {MAX_SPREAD})")
_share = _number(float, lambda v: 0 <= v <= 1, "a number",  # --max-others
                 f"the largest share of the machine's CPU time other processes may use while timing, a number "
                 f"from 0 to 1 (default {MAX_OTHERS})")


def _ms(cmp: LatencyComparison, which: str) -> str:
    """A cell of a latency row: the kept round's milliseconds or speed-up, or "unreliable"."""
    if not cmp.reliable:
        return "unreliable"
    return f"{cmp.speedup:.2f}x" if which == "speedup" else f"{getattr(cmp, which):.2f}"


def _add_timing_args(p: argparse.ArgumentParser, rounds: int = ROUNDS) -> None:
    p.add_argument("--rounds", type=_positive, default=rounds,
                   help=f"rounds, the two models timed alternately in each; the round with the median speed-up is "
                        f"shown (default {rounds})")
    p.add_argument("--repeats", type=_positive, default=20, help="timed runs per model and round (their median is "
                                                                 "the round's time; default 20)")
    p.add_argument("--max-spread", type=_max_spread, default=MAX_SPREAD,
                   help=f"the timing is reported as unreliable, with no number, when the rounds' speed-ups differ by "
                        f"more than this factor, max/min, the fastest and the slowest round left out from "
                        f"{TRIM_FROM} rounds on (default {MAX_SPREAD})")
    p.add_argument("--max-others", type=_share, default=MAX_OTHERS,
                   help=f"the timing is reported as unreliable, with no number, when other processes use more than "
                        f"this share of the machine's CPU time while it runs: a busy machine can give another "
                        f"speed-up even when the rounds agree (0 to 1, of the whole machine: raise it on one with "
                        f"many more cores than --threads; 1 never; Linux only, and not measured on a timing shorter than about a "
                        f"second of the machine's CPU time, which the output then says; default {MAX_OTHERS})")


def _timing(args: argparse.Namespace) -> dict:
    """compare_latency's arguments from the options _add_timing_args adds (and --threads)."""
    return dict(rounds=args.rounds, repeats=args.repeats, max_spread=args.max_spread, max_others=args.max_others,
                threads=args.threads)


def _inspect(args: argparse.Namespace) -> int:
    _check_json(args.json)
    torch.manual_seed(args.seed)
    model = _model(args.model, args.num_classes, args.in_channels, args.checkpoint, args.model_kwargs).eval()
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size)
    gm = cost_model(fxtucker.trace(model), x)
    if args.graph:
        print("== graph before ==")
        print(gm.graph)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decomposed = decompose_conv(gm, ranks=args.ranks, linear=args.linear, method=args.method,
                                    pointwise=not args.no_pointwise)
    final = fold_or_restore(strip_gates(insert_gates(decomposed), args.threshold), x)
    if args.graph:
        print("== graph after ==")
        print(final.graph)
    from fxtucker.compress import cut_layers  # compress() refuses such a cut the same way

    dead = cut_layers(model, final, (x,))
    if dead:
        raise _UsageError(f"--threshold {args.threshold:g} cuts every path from the input to the output (layers with "
                          f"a rank of 0: {', '.join(dead)}), so the compressed model is a constant function; give a "
                          f"smaller --threshold (the paper's: 0.01 to 0.02; an untrained model's gates are its "
                          f"components' norms)")
    rep = fxtucker.report(final)
    print(rep)
    for w in caught:
        print(f"note: {w.message}")
    with torch.no_grad():
        ref_out, out = model(x), final(x)
    err = ((out - ref_out).norm() / ref_out.norm()).item()
    macs_before, macs_after = fxtucker.count_macs(model, x), fxtucker.count_macs(final, x)
    # What is timed is what would be deployed: BatchNorm folded on both sides, and the compressed
    # model's forms chosen on the back end by optimize_for_inference (not the eager MAC-based chain).
    from fxtucker.deploy import optimize_for_inference

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the same back end for both: on eager each gets the memory format it runs faster in
            baseline = optimize_for_inference(model, x, backend=args.backend, threads=args.threads)
            deployed = optimize_for_inference(final, x, backend=args.backend, threads=args.threads)
        cmp = compare_latency(baseline, deployed, x, backend=args.backend, **_timing(args))
    except ImportError as exc:
        raise _UsageError(str(exc)) from None
    forms = run_report.forms(deployed)
    rows = [
        ("", "original", "compressed", "ratio"),
        ("MACs", f"{macs_before:,}", f"{macs_after:,}", f"{macs_before / macs_after:.2f}x"),
        ("params", f"{_params(model):,}", f"{_params(final):,}", f"{_params(model) / _params(final):.2f}x"),
        (f"latency, {args.backend}, batch {args.batch} (ms)", _ms(cmp, "baseline_ms"), _ms(cmp, "candidate_ms"),
         _ms(cmp, "speedup")),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print()
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"latency: {cmp.setting()}; original: BatchNorm folded; compressed: BatchNorm folded, each layer's form "
          f"chosen by optimize_for_inference on {args.backend} ({run_report.forms_text(forms)}; "
          f"{fxtucker.count_macs(deployed, x):,} MACs as deployed)")
    if not cmp.reliable:
        print(f"latency: {cmp.unreliable_reason()}")
    print(f"relative output change (untrained, ranks={args.ranks}): {err:.3g}")
    if args.json:
        out_path = Path(args.json)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        summary = {"macs_before": macs_before, "macs_after": macs_after, "params_before": _params(model),
                   "params_after": _params(final), "latency_ms_before": cmp.to_dict()["baseline_ms"],
                   "latency_ms_after": cmp.to_dict()["candidate_ms"],
                   "latency": {**cmp.to_dict(), "forms": forms, "deployed_macs": fxtucker.count_macs(deployed, x)},
                   "relative_output_change": err, "report": rep.to_dict()}
        write_text(out_path, json.dumps(summary, indent=2))
        print(f"wrote {out_path}")
    return 0


# The --quick profile: a run of at most 5 minutes on 2 CPU cores (resnet20, Fashion-MNIST). eval_subset is
# what the stages are watched on; accuracy before and after is measured on the whole test set.
# Each epoch of the main job trains on 10,000 training images drawn afresh from all of them (the
# shipped model's own; --epoch-images), its stages watched on 2,000 test images.
QUICK = dict(train_subset=None, epoch_images=10000, eval_subset=2000, baseline_epochs=4)
# The main job's flow on a trained model: no plain training first (the model is trained), 2 epochs
# with the funnel and 6 of fine-tuning, distilled from the original (8 epochs, within 5 minutes on
# 2 cores). Chosen on a validation split by benchmarks/quick_job.py, from a stand-in for the shipped
# model trained without those images: 0.9354 -> 0.9242 without distillation, 0.9324 with it (0 + 1
# + 4 distilled: also 0.9324; unweighted penalty: 0.9252). Ranks are kept in multiples of 8
# (round_to=8; the budget counts the rounding): onnxruntime computes channels in blocks, and on a
# second stand-in (session 16) the deployed model ran 1.71x faster than the original at batch 64
# with it against 1.21x without (median rounds), for 0.9318 -> 0.9232 on the validation split
# against 0.9268. A fourth fine-tuning epoch (session 17) took the rounded flow to 0.9286; more on
# the same 10,000 images ended lower (session 21), six with each epoch's 10,000 drawn afresh
# ended higher on three seeds (session 22: 0.9301 against 0.9285). Every stage trains in the
# channels-last format (session 23): the job's 8 epochs in 163-196 s instead of 226-247 on 2 cores, and
# on the same three seeds' validation split 0.9316 / 0.9294 / 0.9312 (mean 0.9307) against
# 0.9292 / 0.9298 / 0.9312 (0.9301).
QUICK_CONFIG = dict(train_epochs=0, reg_epochs=2, finetune_epochs=6, target_speedup=2.0, distill=True, round_to=8,
                    channels_last=True)


def _dataset(name: str):
    if name not in data.DATASETS:
        close = difflib.get_close_matches(name, list(data.DATASETS), n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise _UsageError(f"unknown dataset {name!r}.{hint} Choices: {', '.join(data.DATASETS)}")
    return name


def _check_augment(augment: bool, dataset: str) -> None:
    if augment and dataset != "fashion-mnist":
        raise _UsageError(f"--augment shifts and flips Fashion-MNIST's training images; {dataset}'s are augmented "
                          f"already (random crops and flips), so leave it out")


def _train_loader(train_set, dataset: str, batch_size: int, subset: Optional[int], epoch_images: Optional[int],
                  augment: bool, seed: int):
    """The training loader of `train` and `compress`: ``subset``'s images (all without it), each epoch
    ``epoch_images`` of them drawn afresh when given, shifted and flipped with ``augment``."""
    pool = subset or len(train_set)
    if epoch_images is not None and epoch_images > pool:
        where = f"--train-subset {subset}" if subset else f"{dataset}'s training split"
        raise _UsageError(f"--epoch-images {epoch_images} is more than the {pool:,} training images there are to draw "
                          f"from ({where}); give at most {pool}")
    return data.make_loader(train_set, batch_size, True, subset=subset, epoch_items=epoch_images, augment=augment,
                            seed=seed)


def _add_training_images(p: argparse.ArgumentParser) -> None:
    """`train` and `compress`'s options for the training images."""
    p.add_argument("--train-subset", type=_positive, help="train on a fixed random subset of this many images")
    p.add_argument("--epoch-images", type=_positive,
                   help="each training epoch draws this many images afresh from the training images (those of "
                        "--train-subset when given): an epoch's cost, more images seen (compress: each stage counts its epochs "
                        "from 0, so fine-tuning's epoch e draws what step 3's epoch e drew; default: all, every epoch)")
    p.add_argument("--augment", action="store_true",
                   help="shift the training images by up to 2 pixels and flip half of them, a new draw each epoch of "
                        "a stage (fashion-mnist; CIFAR's and ImageFolder's training images are augmented already)")


def _check_out(out: Path, resume: bool) -> None:
    """--out must be a directory that exists (with --resume) or can be made, and can be written: checked
    before any training, not after the first epoch."""
    folder = _first_existing((out, *out.parents))
    if folder is not None and not folder.is_dir():
        where = "is" if folder == out else f"is under {str(folder)!r}, which is"
        raise _UsageError(f"--out {str(out)!r} {where} an existing file, not a directory; give the path of "
                          f"a directory (it is made if needed)")
    if resume and not out.is_dir():
        return  # record_run says that there is no run to continue
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise _UsageError(f"--out {str(out)!r} cannot be written ({exc.strerror or exc}); give a directory you can "
                          f"write to") from None


def _check_json(path: Optional[str]) -> None:
    """--json must name a file that can be made: checked before the timing, not after it."""
    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise _UsageError(f"--json {path!r} is a directory; give the path of a file (e.g. {str(out / 'report.json')!r})")
    folder = _first_existing(out.parents)
    if folder is not None and not folder.is_dir():
        what = "a link to nothing" if folder.is_symlink() and not folder.exists() else "an existing file"
        raise _UsageError(f"--json {path!r} is under {str(folder)!r}, which is {what}, not a directory; "
                          f"give a path whose folders are directories (they are made if needed)")


def _first_existing(paths: Sequence[Path]) -> Optional[Path]:
    """The first of ``paths`` that exists or is a link (to something or nothing); None if none is."""
    return next((p for p in paths if p.exists() or p.is_symlink()), None)


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


def deploy_step(args: argparse.Namespace, model: torch.nn.Module, compressed: torch.nn.Module, x: torch.Tensor,
            n_cls: int, out: Path, say) -> tuple[dict, dict]:
    """The end of the main job: the compressed model deployed for ``--backend`` (BatchNorm folded, each layer's
    form chosen by timing at batch ``--latency-batch``), written with its parity check, and timed side by side
    against the BN-folded original at batch 1 and at ``--latency-batch``. Returns (deployed, latency) for the
    report."""
    from fxtucker.deploy import optimize_for_inference

    backend = args.backend or default_backend()
    batches = sorted({1, args.latency_batch})
    big = torch.randn(args.latency_batch, *x.shape[1:])
    say(f"deploying for {backend}: BatchNorm folded, each layer's form chosen by timing at batch {args.latency_batch} "
        f"among those within the compressed model's MACs")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            baseline = optimize_for_inference(model.eval(), big, backend=backend, threads=args.threads)
            # max_macs: a dense form may win on time, but the deployed model keeps the MACs compress() reached.
            deployed = optimize_for_inference(compressed, big, backend=backend, threads=args.threads,
                                              max_macs=fxtucker.count_macs(compressed, big))
        if backend == "onnxruntime":
            result = fxtucker.export(deployed, x, out / "deployed.onnx", "onnx")
        else:  # eager and compile run the GraphModule itself: a manifest rebuilds it (fxtucker.load)
            result = fxtucker.export(deployed, x, out / "deployed", "manifest",
                                     model_factory=lambda: models.get_model(args.model, num_classes=n_cls,
                                                                            in_channels=x.shape[1],
                                                                            model_kwargs=args.model_kwargs),
                                     extra={"model": args.model, "model_kwargs": args.model_kwargs or {},
                                            "num_classes": n_cls, "in_channels": x.shape[1],
                                            "input_shape": list(x.shape), "backend": backend})
    except ImportError as exc:
        raise _UsageError(f"--backend {backend}: {exc}") from None
    say(f"wrote {result.path} ({result.format}); reloaded and checked on a {'x'.join(map(str, x.shape))} input: max "
        f"abs error {result.max_abs_error:.3g}, max rel error {result.max_rel_error:.3g}")
    forms = run_report.forms(deployed)
    info = {"backend": backend, "file": result.path.name + ("/" if result.format == "manifest" else ""),
            "format": result.format, "forms": forms, "forms_chosen_at_batch": args.latency_batch,
            "macs": fxtucker.count_macs(deployed, x), "params": _params(deployed),
            "parity": {"input_shape": list(x.shape), "max_abs_error": result.max_abs_error,
                       "max_rel_error": result.max_rel_error, "atol": result.atol, "rtol": result.rtol}}
    latency = {}
    from fxtucker.train import progress_bar  # the training loop's bar, so every stage looks the same

    bar = progress_bar(len(batches) * args.rounds, f"timing on {backend}", not args.no_progress)
    try:
        for b in batches:
            xb = x if b == 1 else big
            cmp = compare_latency(baseline, deployed, xb, backend=backend, **_timing(args),
                                  on_round=(lambda _r: bar.update(1)) if bar is not None else None)
            latency[f"batch_{b}"] = {**cmp.to_dict(), "rounds": cmp.rounds, "setting": cmp.setting(),
                                     "baseline": "the original, BatchNorm folded (optimize_for_inference, no ranks)",
                                     "candidate": f"the deployed model ({run_report.forms_text(forms)})"}
    finally:
        if bar is not None:
            bar.close()
    return info, latency


def _train(args: argparse.Namespace) -> int:
    """Train a model from scratch: the starting point that `fxtucker compress --checkpoint` takes."""
    from fxtucker.train import TrainConfig, evaluate, train

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = _dataset(args.dataset)
    _check_augment(args.augment, dataset)
    in_ch, n_cls, size = data.dataset_info(dataset, root=args.root)
    torch.manual_seed(args.seed)  # before the model's initial weights are drawn
    model = _model(args.model, n_cls, in_ch, None, args.model_kwargs)
    _check_classes(model, args.model, args.model_kwargs, in_ch, size, n_cls, dataset)
    train_loader = _train_loader(data.get_dataset(dataset, True, root=args.root), dataset, args.batch_size,
                                 args.train_subset, args.epoch_images, args.augment, args.seed)
    test_loader = data.make_loader(data.get_dataset(dataset, False, root=args.root), 256, False, seed=args.seed)
    out = Path(args.out or f"runs/{models.model_label(args.model)}-{dataset}-train")
    _check_out(out, args.resume)
    run = {"model": args.model, "model_kwargs": args.model_kwargs or {}, "dataset": dataset, "epochs": args.epochs,
           "lr": args.lr, "batch_size": args.batch_size, "train_subset": args.train_subset,
           "epoch_images": args.epoch_images, "augment": args.augment, "seed": args.seed,
           "threads": torch.get_num_threads()}
    record_run(out, run, resume=args.resume, require=True, name="train-run.json",
               defaults={"epoch_images": None, "augment": False})
    images = (f"{len(train_loader.dataset):,} images" if len(train_loader.sampler) == len(train_loader.dataset)
              else f"{len(train_loader.sampler):,} images an epoch, drawn afresh from {len(train_loader.dataset):,}")
    print(f"training {args.model} on {dataset} for {args.epochs} epochs ({images}"
          f"{', shifted and flipped' if args.augment else ''}, {torch.get_num_threads()} thread(s)); "
          f"test accuracy after each epoch")
    history = train(model, train_loader,
                    TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, compile=args.compile,
                                channels_last=args.channels_last),
                    eval_data=test_loader, out_dir=out, stage="train", resume=args.resume,
                    progress=not args.no_progress)
    weights = save_torch(model.state_dict(), out / "state_dict.pt")
    accuracy = evaluate(model.eval(), test_loader)
    summary = {"command": "fxtucker " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("fxtucker", "__main__.py")
               else "fxtucker train", **run, "test_accuracy": accuracy, "test_images": len(test_loader.dataset),
               "state_dict": weights.name, "sha256": sha256_file(weights), "history": history}
    write_text(out / "train.json", json.dumps(summary, indent=2) + "\n")
    print(f"test accuracy {accuracy:.4f} on {len(test_loader.dataset):,} images; weights {weights} "
          f"(SHA-256 {summary['sha256']}); compress them with --checkpoint {weights}")
    return 0


def _fewer(n: Optional[int], size: int) -> Optional[int]:
    """``n`` when it is fewer than ``size`` items, else None (all of them)."""
    return n if n and n < size else None


def _compress(args: argparse.Namespace) -> int:
    from fxtucker.compress import CONFIG_DEFAULTS, CompressConfig, compress
    from fxtucker.train import TrainConfig, evaluate, train

    # Under torchrun every rank runs the whole flow (train() shards the data and keeps the models
    # identical); only rank 0 prints and writes files.
    main_rank = distributed.launch_rank() == 0
    say = print if main_rank else (lambda *_a, **_k: None)
    dataset = _dataset(args.dataset)
    _check_augment(args.augment, dataset)
    in_ch, n_cls, size = data.dataset_info(dataset, root=args.root)
    torch.manual_seed(args.seed)  # before the model's initial weights are drawn: --seed fixes the whole run
    # Without --checkpoint and --baseline-epochs, a shipped trained model is the starting point when
    # fxtucker has one for this model and dataset; otherwise the baseline is trained here.
    ship = (pretrained.shipped(args.model, dataset)
            if args.checkpoint is None and args.baseline_epochs is None and not args.model_kwargs else None)
    checkpoint = str(pretrained.verified_path(ship)) if ship is not None else args.checkpoint
    model = _model(args.model, n_cls, in_ch, checkpoint, args.model_kwargs)
    _check_classes(model, args.model, args.model_kwargs, in_ch, size, n_cls, dataset)
    train_set = data.get_dataset(dataset, True, root=args.root)
    eval_set = data.get_dataset(dataset, False, root=args.root)
    quick = QUICK if args.quick else {}
    train_subset = args.train_subset or quick.get("train_subset")
    # --quick's fresh draws are for a whole training set larger than a draw: a --train-subset of one's
    # own, or a dataset of no more images than that, is used whole each epoch
    epoch_images = args.epoch_images or _fewer(None if args.train_subset else quick.get("epoch_images"),
                                               len(train_set))
    # (--quick's augmentation is Fashion-MNIST's: the others' training images are augmented already)
    augment = args.augment or (quick.get("augment", False) and dataset == "fashion-mnist")
    train_loader = _train_loader(train_set, dataset, args.batch_size, train_subset, epoch_images, augment, args.seed)
    # the stages watched on --quick's number of test images, when there are more
    eval_subset = args.eval_subset or _fewer(quick.get("eval_subset"), len(eval_set))
    eval_loader = data.make_loader(eval_set, 256, False, subset=eval_subset, seed=args.seed)
    # Accuracy before and after: the whole test set, unless --eval-subset asks for less.
    test_loader = (eval_loader if eval_subset == args.eval_subset
                   else data.make_loader(eval_set, 256, False, subset=args.eval_subset, seed=args.seed))
    if args.config:
        config = CompressConfig.from_toml(_check_toml(args.config))
    else:
        config = CompressConfig(**QUICK_CONFIG) if args.quick else CompressConfig()
    config = dataclasses.replace(config, seed=args.seed, **({"method": args.method} if args.method else {}),
                                 **({"compile": True} if args.compile else {}),
                                 **({"cache_teacher": True} if args.cache_teacher else {}),
                                 **({"channels_last": args.channels_last} if args.channels_last is not None else {}))
    out = Path(args.out or f"runs/{models.model_label(args.model)}-{dataset}" + ("-quick" if args.quick else ""))
    epochs = args.baseline_epochs or quick.get("baseline_epochs", 30)
    # The whole run configuration is stored with the checkpoints; --resume continues only that run.
    run = {"model": args.model, "model_kwargs": args.model_kwargs or {},
           "checkpoint": f"shipped:{ship.file}:{ship.sha256}" if ship is not None else args.checkpoint,
           "dataset": dataset, "train_subset": train_subset, "epoch_images": epoch_images, "augment": augment,
           "eval_subset": eval_subset,
           "batch_size": args.batch_size, "seed": args.seed,
           "baseline_epochs": epochs if checkpoint is None else None, "config": dataclasses.asdict(config)}
    _check_out(out, args.resume)
    if main_rank or args.resume:
        record_run(out, run, resume=args.resume, require=True, defaults={**CONFIG_DEFAULTS, "epoch_images": None,
                                                                                "augment": False})
    baseline_history = []
    if ship is not None:
        say(f"starting from fxtucker's shipped {ship.model} for {ship.dataset} (test accuracy {ship.test_accuracy:.4f}, "
            f"{ship.epochs} epochs by `{ship.command}`); --checkpoint takes your own weights")
    if checkpoint is None:
        set_aside = [f for f, v in (("--baseline-epochs", args.baseline_epochs), ("--model-kwargs", args.model_kwargs))
                     if v is not None]
        why = (f"fxtucker ships trained weights for {args.model} on {dataset}, set aside because "
               f"{' and '.join(set_aside)} {'was' if len(set_aside) == 1 else 'were'} given"
               if set_aside and pretrained.shipped(args.model, dataset) is not None else "no --checkpoint given")
        say(f"training the baseline {args.model} for {epochs} epochs ({why})")
        baseline_history = train(model, train_loader, TrainConfig(epochs=epochs, lr=0.1, seed=args.seed,
                                                                  compile=config.compile,
                                                                  channels_last=config.channels_last),
                                 eval_data=eval_loader, out_dir=out, stage="baseline", resume=args.resume,
                                 progress=not args.no_progress)
        if main_rank:
            save_torch(model.state_dict(), out / "baseline_state_dict.pt")
    x = torch.randn(1, in_ch, size, size)
    # compress() traces and measures with x on the model's device, and train() moves the model to the
    # local GPU under torchrun: both start there. The report and the files are made on the CPU.
    dev = distributed.launch_device()
    result = compress(model.to(dev), train_loader, x.to(dev), eval_data=eval_loader, config=config, out_dir=out,
                      resume=args.resume, progress=not args.no_progress)
    if not main_rank:
        distributed.finish_distributed()
        return 0
    model.cpu()
    result.model.cpu()
    rep = result.report
    n_test = len(test_loader.dataset)
    if test_loader is eval_loader and rep["accuracy_before"] is not None:
        acc_before, acc_after = rep["accuracy_before"], rep["accuracy_after"]
    else:
        say(f"measuring accuracy before and after on {n_test:,} test images")
        acc_before, acc_after = evaluate(model.eval(), test_loader), evaluate(result.model.eval(), test_loader)
    deployed, latency = deploy_step(args, model, result.model, x, n_cls, out, say)
    epochs_of = {"baseline": ship.epochs if ship is not None else epochs if checkpoint is None else None,
                 "baseline_from": (f"shipped with fxtucker (`{ship.command}`)" if ship is not None
                                   else "trained here" if checkpoint is None else "given by --checkpoint"),
                 "decomposed": config.train_epochs, "regularize": config.reg_epochs, "finetune": config.finetune_epochs,
                 "finetune_distilled": config.distill, "images_per_epoch": len(train_loader.sampler),
                 "images_drawn_from": len(train_loader.dataset), "images_augmented": augment}
    summary = {
        "command": ("fxtucker " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name in ("fxtucker", "__main__.py")
                    else "fxtucker compress"),
        "model": args.model, "dataset": dataset, "quick": args.quick,
        "accuracy_before": acc_before, "accuracy_after": acc_after, "accuracy_images": n_test,
        "stage_accuracy_images": len(eval_loader.dataset), "epochs": epochs_of,
        "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
        "params_before": rep["params_before"], "params_after": rep["params_after"],
        "deployed": deployed, "latency": latency, "stages": rep["stages"],
        "rank_floor": rep["rank_floor"], "floor_share": config.floor_share,
    }
    write_text(out / "report.json", json.dumps({**rep, **summary, "baseline_history": baseline_history,
                                                "history": result.history}, indent=2) + "\n")
    write_text(out / "report.md", run_report.markdown(summary, rep["layers"]))
    save_torch(result.model.state_dict(), out / "compressed_state_dict.pt")
    # The manifest lets `fxtucker export --from <out>` (and fxtucker.load) rebuild the compressed model.
    fxtucker.export(result.model, x, out / "manifest", "manifest",
                    model_factory=lambda: models.get_model(args.model, num_classes=n_cls, in_channels=in_ch,
                                                           model_kwargs=args.model_kwargs),
                    config=config, extra={"model": args.model, "model_kwargs": args.model_kwargs or {},
                                          "num_classes": n_cls, "in_channels": in_ch,
                                          "input_shape": list(x.shape), "dataset": dataset})
    pngs = run_report.histogram_pngs(rep["stages"], out)
    print()
    print(run_report.summary_text(summary))
    print(f"\nwrote {out}/report.json, report.md, compressed_state_dict.pt, manifest/, {deployed['file']}"
          + (f", {', '.join(pngs)}" if pngs else ""))
    distributed.finish_distributed()
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
        for flag, key in (("--num-classes", "num_classes"), ("--in-channels", "in_channels")):
            given, recorded = getattr(args, key), extra.get(key)
            if given is not None and recorded is not None and given != recorded:
                raise _UsageError(f"{flag} {given} differs from the {recorded} the manifest in {str(folder)!r} records: "
                                  f"its weights are for {recorded}; leave {flag} out")
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
            earlier = graph_record(gm).batchnorms  # a manifest's record holds the folds before this one
            gm = fxtucker.fold_bn(gm)
        folded = [b for b in graph_record(gm).batchnorms if b.folded and b not in earlier]
        print(f"folded {len(folded)} BatchNorm layer(s) into their convs")
        for w in caught:
            print(f"note: {w.message}")
    x = torch.randn(args.batch, in_ch, *size)
    kw = {}
    if args.format == "manifest":
        kw = dict(model_factory=factory, config=config,
                  extra={**extra, "model": name, "model_kwargs": model_kwargs, "num_classes": n_cls, "in_channels": in_ch, "input_shape": list(x.shape)})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = export(gm, x, args.out, args.format, rtol=args.rtol, atol=args.atol, **kw)
    except ImportError as exc:
        raise _UsageError(str(exc)) from None
    except ExportError as exc:
        for note in _export_notes(caught):  # torch's warnings often explain a failed check
            print(f"note: {note}", file=sys.stderr)
        print(f"fxtucker export: parity check failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(f) for f in result.files)} ({result.format}, {result.method})")
    print(f"reloaded and checked on a {'x'.join(map(str, x.shape))} input: max abs error {result.max_abs_error:.3g}, "
          f"max rel error {result.max_rel_error:.3g} (atol={result.atol:g}, rtol={result.rtol:g})")
    for note in _export_notes(caught):
        print(f"note: {note}")
    return 0


def _export_notes(caught: list) -> list[str]:
    """The warnings of an export, each once, first lines only; torch's deprecation warnings for
    torch.jit's script, save and load as one line."""
    notes, jit = [], False
    for w in caught:
        text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
        if issubclass(w.category, FutureWarning) and text.startswith("`torch.jit."):
            jit = True
        elif text and text not in notes:
            notes.append(text)
    if jit:
        notes.append("this torch deprecates TorchScript (torch.jit.script, save and load warn so); the file works, and "
                     "--format torch.export or onnx are its successors")
    return notes


def _bench(args: argparse.Namespace) -> int:
    from fxtucker.deploy import optimize_for_inference

    _check_json(args.json)
    if args.ranks is None:
        raise _UsageError("bench compares the original with a compressed model: give --ranks a fraction in (0, 1] "
                          "or 'vbmf', not 'full'")
    torch.manual_seed(args.seed)
    model = _model(args.model, args.num_classes, args.in_channels, args.checkpoint, args.model_kwargs).eval()
    x = torch.randn(args.batch, args.in_channels, args.input_size, args.input_size)
    macs_before = fxtucker.count_macs(optimize_for_inference(model, x, memory_format="contiguous"), x)
    threads = args.threads or torch.get_num_threads()
    print(f"{args.model} at {args.input_size}x{args.input_size}, batch {args.batch}, {threads} thread(s); original: "
          f"BatchNorm folded; compressed: ranks {args.ranks}" + (f" rounded to {args.round_to}" if args.round_to else "")
          + (", each layer's form chosen by timing on the back end" if args.search == "layer" else
             ", forms chosen by timing each layer and then whole models on the back end")
          + f"; timed alternately over {args.rounds} round{'s' if args.rounds != 1 else ''}, the round with the "
            f"median speed-up shown, " + spread_rule(args.rounds, args.max_spread, args.max_others))
    rows = [("back end", "original ms", "compressed ms", "speed-up", "original MACs", "compressed MACs", "MACs ratio")]
    summary = []
    for backend in args.backend:
        try:
            compressed = optimize_for_inference(model, x, ranks=args.ranks, method=args.method, backend=backend,
                                                round_to=args.round_to, threads=args.threads, search=args.search)
            # the original deployed for the same back end (on eager, in the memory format it runs faster in)
            baseline = optimize_for_inference(model, x, backend=backend, threads=args.threads)
            cmp = compare_latency(baseline, compressed, x, backend=backend, **_timing(args))
        except ImportError as exc:
            raise _UsageError(str(exc)) from None
        macs_after = fxtucker.count_macs(compressed, x)
        rows.append((backend, _ms(cmp, "baseline_ms"), _ms(cmp, "candidate_ms"), _ms(cmp, "speedup"),
                     f"{macs_before:,}", f"{macs_after:,}", f"{macs_before / macs_after:.2f}x"))
        d = cmp.to_dict()
        summary.append({"backend": backend, "original_ms": d["baseline_ms"], "compressed_ms": d["candidate_ms"],
                        "speedup": d["speedup"], "original_macs": macs_before, "compressed_macs": macs_after,
                        "rounds": args.rounds, "forms": run_report.forms(compressed), "timing": d})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for row in summary:
        if not row["timing"]["reliable"]:
            print(f"{row['backend']}: {row['timing']['note']}")
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
    p.add_argument("--no-pointwise", action="store_true", help="leave 1x1 convs whole (decompose_conv's pointwise=False)")
    p.add_argument("--method", choices=("tucker2", "svd"), default="tucker2",
                   help="how kxk convs are decomposed: Tucker-2 (first/core/last) or an SVD pair (default tucker2)")
    p.add_argument("--checkpoint", help="state_dict of trained weights (loaded with weights_only=True)")
    p.add_argument("--input-size", type=_positive, default=224,
                   help="height and width of the example input (default 224; 32 for CIFAR-style models)")
    p.add_argument("--in-channels", type=_positive, default=3, help="input channels (default 3; 1 for Fashion-MNIST)")
    p.add_argument("--num-classes", type=_positive, default=1000, help="classes of the model's output (default 1000)")
    p.add_argument("--batch", type=_positive, default=1, help="batch size of the example input and the timing (default 1)")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for the latency measurement")
    p.add_argument("--backend", choices=BACKENDS, default="eager",
                   help="the back end the compressed model's forms are chosen for and both models are timed on "
                        "(default eager): " + _BACKEND_HELP)
    _add_timing_args(p)
    p.add_argument("--seed", type=_seed, default=0, help="seeds the model's random weights and the input (default 0)")
    p.add_argument("--graph", action="store_true", help="print the graph before and after")
    p.add_argument("--json", help="also write the numbers and the report to this JSON file")
    p.set_defaults(func=_inspect)

    t = sub.add_parser("train", help="train a model from scratch (the starting point for compress --checkpoint)")
    t.add_argument("--model", required=True, help=_MODEL_HELP)
    t.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP)
    t.add_argument("--dataset", required=True, help=f"one of {', '.join(data.DATASETS)}")
    t.add_argument("--root", help="dataset directory (default: Debian's /usr/share/datasets/fashion-mnist, ...)")
    t.add_argument("--epochs", type=_positive, default=15, help="training epochs (SGD, cosine schedule; default 15)")
    t.add_argument("--lr", type=_learning_rate, default=0.1, help="the initial learning rate (default 0.1)")
    t.add_argument("--batch-size", type=_positive, default=128)
    _add_training_images(t)
    t.add_argument("--seed", type=_seed, default=0, help="seeds the initial weights, the data order and the subsets (default 0)")
    t.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for training (default: torch's setting; the result depends on it bit for bit)")
    t.add_argument("--resume", action="store_true", help="continue a killed run from the checkpoint in --out")
    t.add_argument("--compile", action="store_true",
                   help="run the training step under torch.compile (slow first step; checkpoints stay plain)")
    t.add_argument("--channels-last", action="store_true",
                   help="train in the channels-last memory format (TrainConfig.channels_last: the same function, "
                        "faster convolutions on most CPUs and GPUs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--out", help="output directory: state_dict.pt, train.json, the log and checkpoint "
                                 "(default runs/<model>-<dataset>-train)")
    t.set_defaults(func=_train)

    c = sub.add_parser("compress", help="train (if needed) and compress a model with the funnel flow")
    c.add_argument("--model", required=True, help=_MODEL_HELP)
    c.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP)
    c.add_argument("--dataset", required=True, help=f"one of {', '.join(data.DATASETS)}")
    c.add_argument("--root", help="dataset directory (default: Debian's /usr/share/datasets/fashion-mnist, ...)")
    c.add_argument("--config", help="a TOML file of CompressConfig fields")
    c.add_argument("--method", choices=("tucker2", "svd"),
                   help="how kxk convs are decomposed (overrides the config's method; default tucker2)")
    c.add_argument("--checkpoint", help="trained weights (state_dict, loaded with weights_only=True); without it, "
                                        "the weights fxtucker ships for this model and dataset (see README), or where "
                                        "none are shipped, or with --baseline-epochs or --model-kwargs, a baseline "
                                        "trained here first")
    c.add_argument("--quick", action="store_true",
                   help="the main job's recipe (about 4 minutes on 2 cores from shipped weights): 2 regularized + "
                        "6 distilled fine-tuning epochs of 10,000 training images each, drawn afresh, in the "
                        "channels-last format, a 2x MAC budget with ranks in multiples of 8")
    c.add_argument("--baseline-epochs", type=_positive, help="epochs of baseline training (default 4 with --quick, else "
                                                             "30); given, a baseline is trained even where fxtucker "
                                                             "ships trained weights")
    c.add_argument("--batch-size", type=_positive, default=128)
    _add_training_images(c)
    c.add_argument("--eval-subset", type=_positive,
                   help="evaluate on a fixed random subset of this many test images (default: all of them; "
                        "--quick watches the stages on 2,000 and measures accuracy before and after on all)")
    c.add_argument("--seed", type=_seed, default=0, help="seeds the whole run: the baseline's initial weights, the subsets, the data order of every epoch (default 0)")
    c.add_argument("--resume", action="store_true", help="continue a killed run from the checkpoints in --out")
    c.add_argument("--compile", action="store_true",
                   help="run every stage's training step under torch.compile (CompressConfig.compile; slow first step)")
    c.add_argument("--cache-teacher", action="store_true",
                   help="keep the teacher's outputs for distillation by input (CompressConfig.cache_teacher): an "
                        "image seen before costs a lookup instead of a forward of the original model")
    c.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="train every stage in the channels-last memory format (CompressConfig.channels_last: the "
                        "same function, faster convolutions on most CPUs and GPUs, less exact gradients on the CPU; "
                        "on with --quick, --no-channels-last turns it off)")
    c.add_argument("--threads", type=_positive, default=None, help="CPU threads for the latency measurement")
    c.add_argument("--backend", choices=BACKENDS, default=None,
                   help="the back end to deploy the compressed model for and time it on (default: the fastest "
                        "installed: onnxruntime with fxtucker[export], else eager); onnxruntime writes deployed.onnx, "
                        "eager and compile a manifest in deployed/; " + _BACKEND_HELP)
    c.add_argument("--latency-batch", type=_positive, default=64,
                   help="the larger batch the deployed model is timed at, besides batch 1, and its forms are chosen "
                        "for (default 64)")
    _add_timing_args(c)
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
    e.add_argument("--seed", type=_seed, default=0, help="seeds the example input and any random weights (default 0)")
    e.set_defaults(func=_export)

    b = sub.add_parser("bench", help="time the BN-folded original against the compressed model on each back end")
    b.add_argument("--model", required=True, help=_MODEL_HELP)
    b.add_argument("--model-kwargs", type=_json_object, help=_MODEL_KWARGS_HELP)
    b.add_argument("--ranks", type=_ranks, default=0.5, help="fraction of each mode in (0, 1] or 'vbmf' (default 0.5)")
    b.add_argument("--backend", nargs="+", default=["eager"], choices=BACKENDS,
                   help="one or more (default eager): " + _BACKEND_HELP)
    b.add_argument("--batch", type=_positive, default=1, help="batch size of the timing (default 1)")
    b.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: torch's setting)")
    b.add_argument("--input-size", type=_positive, default=224, help="height and width of the input (default 224)")
    b.add_argument("--round-to", type=_positive, default=None, help="round fractional ranks up to a multiple of this")
    b.add_argument("--method", choices=("tucker2", "svd"), default="tucker2",
                   help="how kxk convs are decomposed: Tucker-2 (first/core/last) or an SVD pair (default tucker2)")
    b.add_argument("--search", choices=("layer", "model"), default="layer",
                   help="layer: each layer's fastest form; model: also whole models timed with candidate form sets, "
                        "the fastest kept (slower to prepare; default layer)")
    b.add_argument("--in-channels", type=_positive, default=3, help="input channels (default 3)")
    b.add_argument("--num-classes", type=_positive, default=1000, help="classes of the model's output (default 1000)")
    b.add_argument("--checkpoint", help="state_dict of trained weights (loaded with weights_only=True)")
    _add_timing_args(b)
    b.add_argument("--seed", type=_seed, default=0, help="seeds the model's random weights and the input (default 0)")
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
