"""How the README's main job (``fxtucker compress --model resnet20 --dataset fashion-mnist --quick``)
splits and trains its epochs, chosen on a validation split, never on the test set.

The main job compresses fxtucker's shipped ResNet-20 with the funnel flow on a 10,000-image subset
of the training images (``make_loader(..., subset=10000, seed=0)``, as the CLI draws it) within
about 5 minutes. The shipped model cannot be validated on training images: it was trained on all
60,000 and scores 0.9998 on them (the first row of ``results/quick_job.json``, kept for that), so
a setting that keeps its memory of them would look best. The settings therefore start from a
stand-in trained by the shipped model's own command on all but 5,000 training images
(``--train-subset 55000``: the first 55,000 of make_loader's seed-0 permutation, which hold the
job's 10,000), and are judged on those 5,000. Each setting runs the job's flow
(``BASE``, the job's recipe before the choice, with the setting's changes); each finished setting is one row of
``results/quick_job.json`` (rerun: stored settings are skipped; a killed one resumes from its stage
checkpoints under ``cache/quick_job/stand-in/``). The stand-in is trained first when it is not there
(about 75 minutes on one core).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quick_job.py --threads 1        # every setting
    .venv/bin/python benchmarks/quick_job.py --table                               # the stored rows
    .venv/bin/python benchmarks/quick_job.py --main-job                            # the job itself, timed
    .venv/bin/python benchmarks/quick_job.py --main-job-table

``--main-job`` runs the README's command as a user does (its own process, the default threads, in
a temporary output folder that is removed after), times it from start to exit, and stores what it
printed and its report in a row of ``results/main_job.json``: the wall time, the accuracy before
and after, the MACs, each timing or why it is unreliable, the seconds its training took, and
whether other runs shared the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from fxtucker import cli, data, models, run_report
from fxtucker.compress import CompressConfig, compress
from fxtucker.train import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from compare import CACHE, _append, _load, _provenance, split  # noqa: E402

VAL_IMAGES = 5000
SEED = 0

#: The main job's recipe before this choice (cli.QUICK_CONFIG then); every setting's changes are to it.
BASE = dict(train_epochs=0, reg_epochs=2, finetune_epochs=3, target_speedup=2.0, distill=False)
#: The training images the job drew before this choice (cli.QUICK's train_subset then); a setting's
#: ``train_subset`` (not a CompressConfig field) changes it.
BASE_SUBSET = 10000
#: The setting the main job took (cli.QUICK_CONFIG is BASE with its changes; tested).
CHOSEN = "0+2+6 distill round_to=8 fresh 10,000 of 55,000 channels_last"

#: name -> changes to BASE. Each name starts with its epochs (decomposed + regularized +
#: fine-tuning, after the trained model; tested): most have the job's 5 and differ in how those are
#: split and trained.
SETTINGS: dict[str, dict] = {
    "0+2+3 (the job's split)": {},
    "0+1+4": dict(reg_epochs=1, finetune_epochs=4),
    "0+2+3 distill": dict(distill=True),
    "0+1+4 distill": dict(reg_epochs=1, finetune_epochs=4, distill=True),
    "0+2+3 finetune_lr=0.003": dict(finetune_lr=0.003),
    "0+2+3 reg_lr=finetune_lr=0.003": dict(reg_lr=0.003, finetune_lr=0.003),
    "0+2+3 unweighted": dict(mac_weighted=False),
    # onnxruntime's CPU convs work in blocks of 16 channels on AVX-512 (8 on AVX2): a rank of 11
    # costs what 16 does, so MACs counted at the exact ranks overstate the deployed speed-up.
    # Ranks rounded up to the block (the budget counts the rounding) make the MACs the ones run.
    # Its row: the 16-channel stage cannot be cut at all, and meeting 2x elsewhere cut both paths
    # of layer2.0 to rank 0 (val 0.1048); compress() now refuses such a cut (it ran before that).
    "0+2+3 distill round_to=16": dict(distill=True, round_to=16),
    # Half the block: the 16-channel stage can then go to rank 8, so the cut need not fall on the
    # wider stages alone. A model with every rank halved and rounded to 8 ran 1.92x faster at batch
    # 64 on onnxruntime for 2.66x fewer MACs (results/latency.json, resnet20 28x28): whether the
    # funnel's own ranks, rounded so, keep the accuracy and reach 1.5x at 2x fewer MACs is this row's
    # question (session 16).
    "0+2+3 distill round_to=8": dict(distill=True, round_to=8),
    "0+1+4 distill round_to=8": dict(reg_epochs=1, finetune_epochs=4, distill=True, round_to=8),
    # The rounded recipe missed the job's accuracy goal on the shipped model (drop 1.16 on the test
    # set) in 195 s of the job's 5 minutes: what one or two more fine-tuning epochs buy (session 17).
    # These two have more epochs than the rest; their names say how many.
    "0+2+4 distill round_to=8": dict(finetune_epochs=4, distill=True, round_to=8),
    "0+2+5 distill round_to=8": dict(finetune_epochs=5, distill=True, round_to=8),
    # On the chosen recipe the cut is free (pruned = regularized) and the regularized stage costs 2.3
    # points of the stand-in's validation accuracy: what the two epochs of the funnel do to a model
    # trained on 55,000 images when they see 10,000. Session 18 asks whether distilling from the
    # original in step 3 too, or weighing each gate by what its component saves at the ranks still
    # alive, keeps more. Rule, fixed before the runs: a setting replaces CHOSEN only if its
    # validation accuracy beats CHOSEN's by more than 0.1 points (the tie margin of the epoch choice).
    "0+2+4 distill distill_reg round_to=8": dict(finetune_epochs=4, distill=True, distill_reg=True, round_to=8),
    "0+2+4 distill round_to=8 live_mac_weights": dict(finetune_epochs=4, distill=True, round_to=8,
                                                      live_mac_weights=True),
    # The same number of images seen (60,000: the job's time), drawn from twice as many: one
    # regularized epoch and two of fine-tuning on 20,000 (the first 20,000 of the same permutation,
    # which hold the 10,000). Two epochs on 10,000 are as many optimizer steps as one on 20,000, so
    # the steered lambda has as many steps to meet the budget; what changes is how often the stage
    # sees each image, and with it how far it drifts toward a subset (session 18). Same rule.
    "0+1+2 distill round_to=8 on 20,000 images": dict(reg_epochs=1, finetune_epochs=2, distill=True, round_to=8,
                                                      train_subset=20000),
    # The chosen recipe lost 1.06 points on the test set (goal 1) while the fifth fine-tuning epoch on
    # the same 10,000 images added nothing on validation: the flow may be learning its 10,000 rather
    # than the original's function. Session 20 asks, at the job's cost (10,000 images an epoch), what
    # drawing each epoch's 10,000 afresh from all the stand-in's 55,000 training images does
    # (make_loader's epoch_items), and what a heavier distillation weight does (0.9: the loss is
    # then mostly the original's softened outputs). Rule, fixed before the runs: a setting replaces
    # CHOSEN only if its mean validation accuracy over seeds 0 and 1 beats CHOSEN's by more than 0.1.
    "0+2+4 distill round_to=8 fresh 10,000 of 55,000": dict(finetune_epochs=4, distill=True, round_to=8,
                                                           train_subset=55000, epoch_images=10000),
    "0+2+4 distill round_to=8 distill_weight=0.9": dict(finetune_epochs=4, distill=True, round_to=8,
                                                       distill_weight=0.9),
    # Neither did (seeds 0 and 1: fresh draws 0.9266 and 0.9286, weight 0.9 0.9258 on seed 0, against
    # 0.9286 and 0.9278). The original scores 0.9998 on the images the job trains on: distilled on
    # them, its outputs are all but the labels. Shifted and flipped (make_loader's augment), they are
    # images it has not memorized, and its outputs on them say more. Same rule.
    "0+2+4 distill round_to=8 augment": dict(finetune_epochs=4, distill=True, round_to=8, augment=True),
    # Nor did it (0.9290 and 0.9256: mean 0.9273 against 0.9282). CHOSEN stays.
    # Session 21: the job takes 203 s of its 300, so two recipes that spend more of them: two more
    # fine-tuning epochs, and a third regularized epoch (session 19: a longer step 3 cut cheaper in
    # the quality rows). Rule, fixed before the runs: on seeds 0, 1 and 2 (CHOSEN's seed 2 run as
    # well), the setting with the highest mean validation accuracy replaces CHOSEN only if that mean
    # beats CHOSEN's by more than 0.1 points (a tie goes to fewer epochs).
    "0+2+6 distill round_to=8": dict(finetune_epochs=6, distill=True, round_to=8),
    "0+3+4 distill round_to=8": dict(reg_epochs=3, finetune_epochs=4, distill=True, round_to=8),
    # Added before any of those two's rows had finished, under the same rule: each stage of the flow
    # starts its learning-rate schedule again, so fine-tuning begins at 0.01 (in the quality rows'
    # `2x kd 3 epochs` the funnel's one fine-tuning epoch ran at 0.01 throughout and on seed 2 left
    # validation under where the cut had (0.9006 -> 0.8976)); with one_schedule the flow's 6 epochs
    # run one cosine and one data stream.
    "0+2+4 distill round_to=8 one schedule": dict(finetune_epochs=4, distill=True, round_to=8, one_schedule=True),
    # None did (means over seeds 0-2: 0+2+6 0.9262, 0+3+4 0.9282, one schedule 0.9275, against
    # CHOSEN's 0.9285). CHOSEN stays.
    # Session 22: more fine-tuning moved the model away from where it ended best (0+2+6 under 0+2+4
    # on every seed, a fifth epoch level), and step 3 costs 1.5-2.3 points of a model that ended its
    # own training at a learning rate near 0: both stages start at 0.01. Lower base rates for each
    # (lambda "auto" follows reg_lr, so step 3's total shrink stays). Rule, fixed before the runs:
    # on seeds 0, 1 and 2, the setting with the highest mean validation accuracy replaces CHOSEN
    # only if that mean beats CHOSEN's (0.9285) by more than 0.1 points.
    "0+2+4 distill round_to=8 finetune_lr=0.005": dict(finetune_epochs=4, distill=True, round_to=8, finetune_lr=0.005),
    "0+2+4 distill round_to=8 finetune_lr=0.0025": dict(finetune_epochs=4, distill=True, round_to=8,
                                                        finetune_lr=0.0025),
    "0+2+4 distill round_to=8 reg_lr=0.005": dict(finetune_epochs=4, distill=True, round_to=8, reg_lr=0.005),
    # Fine-tuning at 0.005 ended lower on seed 0 (0.9246 against 0.9286): the lower rates were stopped
    # there (0.0025 not run) and the other direction added under the same rule.
    "0+2+4 distill round_to=8 finetune_lr=0.02": dict(finetune_epochs=4, distill=True, round_to=8, finetune_lr=0.02),
    # Each stage's cosine moves once an epoch (train() steps it after the epoch), so the job's last
    # fine-tuning epoch runs at 0.15 of its base rate and step 3's second at half: the model stops
    # mid-descent. The same recipe with the rate moved after every step (CompressConfig.lr_per_step,
    # new), reaching 0 at each stage's last step. Added under the same rule.
    "0+2+4 distill round_to=8 lr per step": dict(finetune_epochs=4, distill=True, round_to=8, lr_per_step=True),
    # Every one of them ended under CHOSEN's seed-0 row (0.9238-0.9262 against 0.9286), which was
    # written at commit 5bd40466 (session 17). CHOSEN itself again, at this session's code, in a
    # folder of its own: does the recipe still give its row, or has the code under it moved?
    "0+2+4 distill round_to=8 again": dict(finetune_epochs=4, distill=True, round_to=8),
    # It does (0.9286 again). The chosen recipe's stand-in models end near 0.924 on the test set as the
    # shipped model's job does, from a start 0.55 points lower (--test-rows): what limits the job is
    # what the compressed model reaches, and two more fine-tuning epochs on the same 10,000 images
    # ended lower (session 21). Two more with each epoch's 10,000 drawn afresh from the 55,000 (the
    # job's time: about 250 of its 300 s), under the same rule.
    "0+2+6 distill round_to=8 fresh 10,000 of 55,000": dict(finetune_epochs=6, distill=True, round_to=8,
                                                           train_subset=55000, epoch_images=10000),
    # It did (0.9292, 0.9298, 0.9312: mean 0.9301, 0.16 above 0+2+4's 0.9285): CHOSEN since session
    # 22. The job draws its epochs from all the shipped model's training images (cli.QUICK), as this
    # setting draws from all the stand-in's.
    # Session 23: the job ran 280-303 s against its 300, 8 epochs of it 226-247 s. Training in the
    # channels-last format (CompressConfig.channels_last, now on the CPU too) is the same function
    # with faster convolutions (a fine-tuning step 28% cheaper side by side): a speed change, not a
    # recipe. Rule, fixed before the runs: the job takes it if its mean validation accuracy over seeds
    # 0, 1 and 2 is at most 0.1 points under CHOSEN's (0.9301).
    "0+2+6 distill round_to=8 fresh 10,000 of 55,000 channels_last": dict(
        finetune_epochs=6, distill=True, round_to=8, train_subset=55000, epoch_images=10000, channels_last=True),
    # It was (0.9316, 0.9294, 0.9312: mean 0.9307 against 0.9301): CHOSEN since session 23.
    # Session 37: the job's recipe predates the floor under every mode's rank that put the funnel
    # ahead of every baseline at 2x in the quality rows (compare.py's funnel-floor-high, confirmed on
    # 20 fresh seeds). The floor set as a share of the budget (CompressConfig.floor_share: the largest
    # floor holding at most 90% of the 2x budget's MACs, with the job's rounding to 8), alone and
    # with funnel-floor-high's step 3 (reg_lr 0.02, the penalty not weighted by MACs). Rule, fixed
    # before the runs: on seeds 0, 1 and 2, the setting with the highest mean validation accuracy
    # replaces CHOSEN only if that mean beats CHOSEN's (0.9307) by more than 0.1 points (both means
    # unrounded; said after a review, before any of their rows was stored).
    "0+2+6 distill round_to=8 fresh 10,000 of 55,000 channels_last floor_share=0.9": dict(
        finetune_epochs=6, distill=True, round_to=8, train_subset=55000, epoch_images=10000, channels_last=True,
        floor_share=0.9),
    "0+2+6 distill round_to=8 fresh 10,000 of 55,000 channels_last floor_share=0.9 reg_lr=0.02 unweighted": dict(
        finetune_epochs=6, distill=True, round_to=8, train_subset=55000, epoch_images=10000, channels_last=True,
        floor_share=0.9, reg_lr=0.02, mac_weighted=False),
    # Neither did (0.9302 / 0.9282 / 0.9296 and 0.9296 / 0.9262 / 0.9310: means 0.9293 and 0.9289 against
    # 0.9307), though the floor's cut left more before fine-tuning on the mean. CHOSEN stays.
}

#: A setting's keys that choose its training images (make_loader's), not CompressConfig fields.
LOADER_KEYS = ("train_subset", "epoch_images", "augment")


def config(name: str) -> dict:
    """Setting ``name``'s CompressConfig arguments (BASE with its changes, less LOADER_KEYS)."""
    return {k: v for k, v in {**BASE, **SETTINGS[name]}.items() if k not in LOADER_KEYS}


def train_subset(name: str) -> int:
    """How many training images setting ``name`` draws (the first of make_loader's seed-0 permutation)."""
    return SETTINGS[name].get("train_subset", BASE_SUBSET)


def epoch_images(name: str) -> Optional[int]:
    """How many of them each epoch of setting ``name`` draws afresh (None: all of them, the same each epoch)."""
    return SETTINGS[name].get("epoch_images")


def loader_args(name: str) -> dict:
    """:func:`loaders`' arguments for setting ``name``."""
    return dict(subset=train_subset(name), epoch_items=epoch_images(name), augment=SETTINGS[name].get("augment", False))


def loaders(batch_size: int = 128, subset: int = BASE_SUBSET, epoch_items: Optional[int] = None,
            augment: bool = False):
    """The main job's training loader (its ``subset`` images, 10,000 as the CLI draws them; each epoch
    ``epoch_items`` of them drawn afresh when given; shifted and flipped with ``augment``) and the
    5,000 validation images."""
    full = data.get_dataset("fashion-mnist", True)
    train_loader = data.make_loader(full, batch_size, True, subset=subset, epoch_items=epoch_items, augment=augment,
                                    seed=SEED)
    _, val_idx = split(len(full), subset, VAL_IMAGES, SEED)  # the last of make_loader's permutation
    drawn = train_loader.dataset
    drawn = drawn.dataset if isinstance(drawn, data.Augmented) else drawn
    assert not set(val_idx) & set(drawn.indices)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(full, val_idx), batch_size=256)
    return train_loader, val_loader


#: The stand-in for the shipped model: its command (pretrained.SHIPPED) without the 5,000 validation images.
STAND_IN = CACHE / "quick_job" / "proxy"
STAND_IN_ARGS = ["train", "--model", "resnet20", "--dataset", "fashion-mnist", "--epochs", "15", "--threads", "1",
                 "--seed", str(SEED), "--train-subset", "55000", "--no-progress", "--out", str(STAND_IN)]


#: What the table calls the stand-in of the rows written before rows named theirs: trained in an
#: earlier session and lost with its cache (0.9354 on the 5,000 validation images); session 16 trained it again
#: with the same command and got another model (0.9292 on the test set against 0.9334).
FIRST_STAND_IN = "first (lost)"


def stand_in_id() -> str:
    """The stand-in's SHA-256 (its first 12 hex digits): a row is paired only with rows of the same one."""
    return hashlib.sha256((STAND_IN / "state_dict.pt").read_bytes()).hexdigest()[:12]


def _stored(name: str, sid: str, seed: int = SEED) -> bool:
    return any(r["setting"] == name and r.get("start") == "stand-in" and r.get("stand_in", FIRST_STAND_IN) == sid
               and r.get("seed", SEED) == seed for r in _load("quick_job"))


def stand_in() -> torch.nn.Module:
    """The shipped model's recipe trained without the validation images (trained here when missing)."""
    weights = STAND_IN / "state_dict.pt"
    if not weights.exists():
        print(f"[quick_job] training the stand-in: fxtucker {' '.join(STAND_IN_ARGS)}")
        with torch.random.fork_rng():
            cli.main(STAND_IN_ARGS + (["--resume"] if (STAND_IN / "train-run.json").exists() else []))
    in_ch, n_cls, _ = data.dataset_info("fashion-mnist")
    model = models.get_model("resnet20", n_cls, in_ch)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def compressed(name: str, model: torch.nn.Module, train_loader, val_loader, x: torch.Tensor, progress: bool,
               seed: int = SEED):
    """Setting ``name``'s compress() result from the stand-in with the flow's ``seed`` (its epochs'
    orders and draws of epoch_images; the images, the split and the augmentation's draws stay
    SEED's), resumed from its stage checkpoints: a finished setting returns at once."""
    cfg = CompressConfig(**config(name), seed=seed)
    torch.manual_seed(seed)
    return compress(model, train_loader, x, eval_data=val_loader, config=cfg,
                    out_dir=CACHE / "quick_job" / "stand-in" / stand_in_id() / _folder(name, seed),
                    resume=True, progress=progress)


def _folder(name: str, seed: int) -> str:
    """Setting ``name``'s checkpoint folder for the flow's ``seed`` (under the stand-in's)."""
    return name.replace(" ", "_").replace("(", "").replace(")", "") + (f"_seed{seed}" if seed != SEED else "")


def _ways(interleave: tuple[bool, ...], spinning: tuple[Optional[bool], ...], repeat: int) -> list[tuple]:
    """The (interleave, spinning) pairs of one repeat of ``--latency``, every pair once, in reverse
    order every other repeat, so that no way is always timed first."""
    ways = [(i, s) for s in spinning for i in interleave]
    return ways if repeat % 2 == 0 else ways[::-1]


def latency(names: list[str], batch: int, rounds: int, threads: int, repeat: int = 1,
            interleave: tuple[bool, ...] = (False,), spinning: tuple[Optional[bool], ...] = (None,)) -> None:
    """Each finished setting's model deployed as the main job deploys it (cli.deploy_step: forms chosen
    on onnxruntime at ``batch`` within its MACs) and timed side by side with the BN-folded stand-in
    at ``batch``; one row of ``results/quick_job_latency.json`` per setting and run. With both
    values in ``interleave``, each repeat times the model both ways (``compare_latency``'s
    ``interleave``), in turn, the first way alternating between repeats; likewise with more than one
    value in ``spinning`` (onnxruntime's worker threads spinning: None, its default, or not: False)."""
    import warnings

    from fxtucker.deploy import optimize_for_inference
    from fxtucker.latency import BLOCK, compare_latency
    from fxtucker.passes import count_macs

    in_ch, _, size = data.dataset_info("fashion-mnist")
    x, big = torch.randn(1, in_ch, size, size), torch.randn(batch, in_ch, size, size)
    original = stand_in()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        baseline = optimize_for_inference(original, x, backend="onnxruntime")
    sid = stand_in_id()
    for name in names:
        if not _stored(name, sid):
            print(f"[quick_job] {name}: not trained from stand-in {sid} yet, no latency")
            continue
        train_loader, val_loader = loaders(**loader_args(name))
        model = compressed(name, original, train_loader, val_loader, x, progress=False).model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            deployed = optimize_for_inference(model, big, backend="onnxruntime", threads=threads,
                                              max_macs=count_macs(model, big))
        for i in range(repeat):
            for way, spin in _ways(interleave, spinning, i):
                cmp = compare_latency(baseline, deployed, big, rounds=rounds, backend="onnxruntime", threads=threads,
                                      interleave=way, spinning=spin, max_others=1.0)
                _append("quick_job_latency", {"setting": name, "stand_in": sid, "batch": batch,
                                              "macs_ratio": round(count_macs(baseline, x) / count_macs(deployed, x), 3),
                                              "forms": run_report.forms(deployed), **cmp.to_dict(),
                                              "block": BLOCK if way else None, **_provenance()})
                print(f"[quick_job] {name}{' (interleaved)' if way else ''}{' (not spinning)' if spin is False else ''}: "
                      + (str(cmp.describe()) if cmp.reliable else cmp.unreliable_reason()))


def _spread(ratios: list[float]) -> float:
    return max(ratios) / min(ratios)


#: Rules that say from a run's rounds whether its median speed-up is a number to print, and the
#: rounds they look at: the job's rule on its 5 rounds, the same on all 7, and on the middle 5 of 7
#: (the fastest and the slowest round dropped).
RULES = {"5 rounds, max/min": lambda r: _spread(r[:5]),
         "7 rounds, max/min": _spread,
         "7 rounds, middle 5": lambda r: _spread(sorted(r)[1:-1])}


def rule_table(max_spread: float = 1.2) -> str:
    """Whether each reliability rule keeps its promise over repeated timings of one deployed model
    (``--latency`` rows of one setting, stand-in and batch, each run's rounds stored): per rule, how
    many runs it calls reliable and how far apart those runs' median speed-ups lie (max / min). A
    rule whose reliable runs lie more than ``max_spread`` apart lets a second run contradict a
    printed number by more than the spread it states."""
    import statistics
    groups: dict[tuple, list[dict]] = {}
    for r in _load("quick_job_latency"):
        if len(r["ratios"]) >= 7:
            # runs timed in turn: rows before BLOCK was recorded ran one run at a time
            turn = (r.get("block") or 1) if r.get("interleaved") else 0
            groups.setdefault((r["setting"], r["stand_in"], r["batch"], turn, r.get("spinning")), []).append(r)
    lines = ["| setting | batch | timed | runs (busy) | rule | reliable runs (busy) | their medians | max / min of those |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, _sid, batch, turn, spin), rows in groups.items():
        busy = sum(bool(r.get("other_runners")) for r in rows)
        for rule, spread in RULES.items():
            kept = [r for r in rows if spread(r["ratios"]) <= max_spread]
            medians = [statistics.median_low(r["ratios"][:5] if rule.startswith("5") else r["ratios"]) for r in kept]
            timed = (f"in turns of {turn}" if turn else "model by model") + (", not spinning" if spin is False else "")
            lines.append(f"| {name} | {batch} | {timed} | {len(rows)} ({busy}) | {rule} | {len(kept)} "
                         f"({sum(bool(r.get('other_runners')) for r in kept)}) | "
                         f"{', '.join(f'{m:.2f}' for m in medians) or '-'} | "
                         f"{(max(medians) / min(medians)) if medians else float('nan'):.2f} |")
    return "\n".join(lines)


def run(names: list[str], progress: bool, seed: int = SEED) -> None:
    in_ch, _, size = data.dataset_info("fashion-mnist")
    x = torch.randn(1, in_ch, size, size)
    sid = None
    for name in names:
        model = stand_in()
        sid = sid or stand_in_id()
        if _stored(name, sid, seed):
            print(f"[quick_job] {name}: stored for stand-in {sid} and seed {seed}, skipped")
            continue
        print(f"[quick_job] {name} (stand-in {sid}, seed {seed})")
        train_loader, val_loader = loaders(**loader_args(name))
        val_original = evaluate(model, val_loader)
        start = time.perf_counter()
        result = compressed(name, model, train_loader, val_loader, x, progress, seed)
        stages = result.report["stages"]
        _append("quick_job", {"setting": name, "start": "stand-in", "stand_in": sid, "seed": seed,
                 "changes": SETTINGS[name], "val_images": VAL_IMAGES,
                 "val_original": val_original, "val_after": evaluate(result.model.eval(), val_loader),
                 "val_stages": {k: v.get("accuracy") for k, v in stages.items()},
                 "macs_before": result.report["macs_before"], "macs_after": result.report["macs_after"],
                 "rank_floor": result.report.get("rank_floor"),  # the floor floor_share resolved to (rows from session 38 on)
                 "wall_s": round(time.perf_counter() - start, 1), **_provenance()})
        print(f"[quick_job] {name}: val {val_original:.4f} -> {_load('quick_job')[-1]['val_after']:.4f}")


def _refuse_unchosen(names: list[str]) -> None:
    """Exit before anything reads the test set if ``names`` holds a setting other than CHOSEN."""
    for name in names:
        if name != CHOSEN:
            raise SystemExit(f"--test-rows reads the test set, which is for the chosen recipe ({CHOSEN!r}) only, "
                             f"not {name!r}")


def test_rows(name: str, seeds: list[int]) -> None:
    """Setting ``name``'s finished stand-in models (one per flow seed) and the stand-in itself on the
    whole test set, one row each in results/quick_job_test.json. Only for a setting already chosen:
    it asks whether the validation split's drop is the test set's (the shipped model's job lost 1.06
    points on the test set where the stand-in lost 0.32 on validation), and chooses nothing."""
    _refuse_unchosen([name])
    in_ch, _, size = data.dataset_info("fashion-mnist")
    x = torch.randn(1, in_ch, size, size)
    test = data.make_loader(data.get_dataset("fashion-mnist", False), 256, False)
    sid = stand_in_id()
    for seed in seeds:
        if any(r["setting"] == name and r["stand_in"] == sid and r["seed"] == seed for r in _load("quick_job_test")):
            print(f"[quick_job] {name}, seed {seed}: test row stored, skipped")
            continue
        folder = CACHE / "quick_job" / "stand-in" / sid / _folder(name, seed)
        if not _stored(name, sid, seed) or not (folder / "finetune.ckpt").is_file():
            print(f"[quick_job] {name}, seed {seed}: no validation row or no finished checkpoints (run it first), "
                  f"skipped")
            continue
        model = stand_in()
        train_loader, val_loader = loaders(**loader_args(name))
        result = compressed(name, model, train_loader, val_loader, x, progress=False, seed=seed)  # from its checkpoints
        row = {"setting": name, "stand_in": sid, "seed": seed, "test_images": len(test.dataset),
               "test_original": evaluate(model, test), "test_after": evaluate(result.model.eval(), test),
               **_provenance()}
        _append("quick_job_test", row)
        print(f"[quick_job] {name}, seed {seed}: test {row['test_original']:.4f} -> {row['test_after']:.4f}")


def test_table() -> str:
    val = {(r["setting"], r.get("stand_in"), r.get("seed", SEED)): r for r in _load("quick_job")
           if r.get("start") == "stand-in"}
    lines = ["| setting | stand-in | seed | val original | val after | val drop (points) | test original | test after | "
             "test drop (points) | commit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _load("quick_job_test"):
        v = val[(r["setting"], r["stand_in"], r["seed"])]
        lines.append(f"| {r['setting']} | {r['stand_in']} | {r['seed']} | {v['val_original']:.4f} | {v['val_after']:.4f} | "
                     f"{100 * (v['val_original'] - v['val_after']):.2f} | {r['test_original']:.4f} | "
                     f"{r['test_after']:.4f} | {100 * (r['test_original'] - r['test_after']):.2f} | {r['commit'][:8]} |")
    return "\n".join(lines)


def table() -> str:
    lines = ["| start | stand-in | setting | seed | val original | val after | drop (points) | stages (val) | MAC ratio | wall s | threads | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in _load("quick_job"):
        stages = ", ".join(f"{k} {v:.4f}" for k, v in r["val_stages"].items() if v is not None)
        start = r.get("start", "shipped")
        sid = "-" if start == "shipped" else r.get("stand_in", FIRST_STAND_IN)
        lines.append(f"| {start} | {sid} | {r['setting']} | {r.get('seed', SEED)} | {r['val_original']:.4f} | {r['val_after']:.4f} | "
                     f"{100 * (r['val_original'] - r['val_after']):.2f} | {stages} | "
                     f"{r['macs_before'] / r['macs_after']:.2f}x | {r['wall_s']:.0f} | {r['threads']} | {r['commit'][:8]} |")
    return "\n".join(lines)


MAIN_JOB = ["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--quick"]


def main_job_row() -> dict:
    """Run the README's main job in its own process (a temporary --out, removed after), time it, store a row."""
    import json
    import subprocess
    import tempfile

    before = _provenance()  # other runs at the start; the row's own provenance is taken at the end
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default threads, as a user's
    with tempfile.TemporaryDirectory(prefix="fxtucker-main-job-") as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "fxtucker", *MAIN_JOB, "--no-progress", "--out", str(out)],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"the main job failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        rep = json.loads((out / "report.json").read_text())
        training = sum(json.loads(line)["seconds"] for log in sorted(out.glob("*.jsonl"))
                       for line in log.read_text().splitlines())
    latency = {b: (f"{t['speedup']:.2f}x" if t["reliable"] else t["note"]) for b, t in rep["latency"].items()}
    row = {"command": "fxtucker " + " ".join(MAIN_JOB), "wall_s": round(wall, 1), "training_s": round(training, 1),
           "accuracy_before": rep["accuracy_before"], "accuracy_after": rep["accuracy_after"],
           "accuracy_images": rep["accuracy_images"], "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
           "latency": latency, "parity_max_abs_error": rep["deployed"]["parity"]["max_abs_error"],
           "printed": done.stdout, **_provenance()}
    row["other_runners"] = max(row["other_runners"], before["other_runners"])  # at the start or at the end
    row["load_avg_1m_before"] = before["load_avg_1m"]
    _append("main_job", row)
    return row


def main_job_table() -> str:
    """The stored main-job rows as a markdown table."""
    lines = ["| time | commit | wall s | training s | accuracy before -> after (drop, points) | MACs | batch 1 | batch 64 "
             "| other runners | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in _load("main_job"):
        lat = {b: "unreliable" if v.startswith("timing unreliable") else v for b, v in r["latency"].items()}
        lines.append(f"| {r['time']} | {r['commit'][:8]} | {r['wall_s']:.0f} | {r['training_s']:.0f} | "
                     f"{r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} "
                     f"({100 * (r['accuracy_before'] - r['accuracy_after']):.2f}) | "
                     f"{r['macs_before'] / r['macs_after']:.2f}x | {lat.get('batch_1', '-')} | "
                     f"{lat.get('batch_64', '-')} | {r['other_runners']} | {r['load_avg_1m']} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=SEED,
                    help="the flow's seed (its epochs' orders and draws of fresh images); the images, the split, "
                         f"the augmentation's draws and the stand-in stay those of seed {SEED}")
    ap.add_argument("--table", action="store_true", help="only print the stored rows")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--latency", type=int, metavar="BATCH", default=None,
                    help="only time the finished settings' deployed models against the stand-in at this batch")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds of --latency")
    ap.add_argument("--repeat", type=int, default=1, help="time each setting this many times (one row each)")
    ap.add_argument("--interleave", choices=("no", "yes", "both"), default="no",
                    help="--latency: within each round run the two models in turns of latency.BLOCK runs (yes), "
                         "one after the other (no), or each repeat both ways, in turn (both)")
    ap.add_argument("--spinning", choices=("default", "off", "both"), default="default",
                    help="--latency: onnxruntime's worker threads spinning while they wait (default, as onnxruntime "
                         "runs), not (off: session.intra_op.allow_spinning 0), or each repeat both ways (both)")
    ap.add_argument("--test-rows", action="store_true",
                    help="only measure the chosen recipe's finished stand-in models (--seeds) on the test set")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="--test-rows: the flow seeds (default: --seed)")
    ap.add_argument("--test-table", action="store_true", help="only print the stored test rows")
    ap.add_argument("--rule-table", action="store_true",
                    help="only print how each reliability rule fares over the stored repeated timings")
    ap.add_argument("--main-job", action="store_true",
                    help="only run the README's main job as a user does, timed, and store its row (results/main_job.json)")
    ap.add_argument("--main-job-table", action="store_true", help="only print the stored main-job rows")
    args = ap.parse_args(argv)
    if args.main_job:
        row = main_job_row()
        print(row["printed"])
        print(main_job_table())
        return 0
    if args.main_job_table:
        print(main_job_table())
        return 0
    if args.table:
        print(table())
        return 0
    if args.rule_table:
        print(rule_table())
        return 0
    if args.test_table:
        print(test_table())
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.test_rows:
        _refuse_unchosen(args.settings if args.settings != list(SETTINGS) else [CHOSEN])
        test_rows(CHOSEN, args.seeds or [args.seed])
        print(test_table())
        return 0
    if args.latency:
        ways = {"no": (False,), "yes": (True,), "both": (False, True)}[args.interleave]
        spins = {"default": (None,), "off": (False,), "both": (None, False)}[args.spinning]
        latency(args.settings, args.latency, args.rounds, args.threads or torch.get_num_threads(), args.repeat, ways,
                spins)
        return 0
    run(args.settings, progress=not args.no_progress, seed=args.seed)
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
