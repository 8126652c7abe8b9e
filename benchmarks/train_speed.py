"""What one training step costs: the original model, the gated chain, and the composed training view,
eager and under torch.compile (``TrainConfig(compile=True)``).

    .venv/bin/python benchmarks/train_speed.py                      # ResNet-20, batch 128, 28x28, 2 threads
    .venv/bin/python benchmarks/train_speed.py --threads 1 --rounds 7
    .venv/bin/python benchmarks/train_speed.py --batch 8 --size 8 --rounds 1 --steps 1 --out /tmp/t.json  # a check

A step is forward, cross-entropy, backward and an SGD step; the gated ones also compute the
funnel penalty (logged) and take its proximal step, steered to a 2x budget, as step 3 of the flow
does. The compiled step runs the composed view's forward (and so its backward) under
torch.compile, as train() does with compile=True; the penalty and the optimizer stay eager. Its
compilation happens in the warm-up, which is not timed; the original model compiled the same way
is the fifth step. The sixth and seventh are the original and the composed view in the
channels-last format (``TrainConfig(channels_last=True)``: the model's 4-D tensors and the batch).
The eighth and ninth are the original distilled from a copy of itself (``distillation_loss``, as
every distilled stage trains): the teacher's forward on every step, and with a
:class:`~fxtucker.distill.TeacherCache` that has seen the batch (every epoch after the first on a
fixed training set), a lookup instead.
Its numerical cost is measured beside it: the relative error (2-norm) of the original model's
whole gradient on the batch against the same gradient in float64, in each format
(``gradient_error_vs_float64`` in the row). The nine steps are timed in alternating rounds (each round runs every step
``--steps`` times), so a slow phase of a shared machine hits all of them; the median round is kept. One row per run is appended to
``benchmarks/results/train_speed.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import fxtucker
from fxtucker import data, models, pretrained, regularizers
from fxtucker.batches import model_to_channels_last, to_device
from fxtucker.compress import GatePenalty
from fxtucker.distill import TeacherCache, distillation_loss
from fxtucker.passes import compose_factors, cost_model, decompose_conv, insert_gates

sys.path.insert(0, str(Path(__file__).parent))
from compare import _provenance, append_row  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_speed.json"


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, penalty=None, compiled: bool = False,
             channels_last: bool = False, extra_loss=None):
    if channels_last:  # as train() does with TrainConfig.channels_last
        model_to_channels_last(model)
        x = to_device(x, x.device, channels_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    forward = torch.compile(model) if compiled else model  # as train() wraps the step's model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = forward(x)
        loss = nn.functional.cross_entropy(out, y)
        if penalty is not None:
            loss = loss + penalty(model, 0, 1)
        if extra_loss is not None:  # distillation, as train() adds it
            loss = loss + extra_loss(x, out, y)
        loss.backward()
        opt.step()
        if penalty is not None:
            penalty.after_step(model, 0, 1, 0.01)
    return step


def _gradient_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels_last: bool) -> float:
    """The relative error (2-norm, over all parameters) of ``model``'s cross-entropy gradient on (x, y)
    in training mode, in float32 in the given format, against the same gradient in float64."""
    def grads(m: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
        m.train()
        nn.functional.cross_entropy(m(inputs), y).backward()
        return [p.grad.double() for p in m.parameters()]

    exact = grads(copy.deepcopy(model).double(), x.double())
    m = copy.deepcopy(model)
    if channels_last:
        model_to_channels_last(m)
    got = grads(m, to_device(x, x.device, channels_last))
    return float(torch.sqrt(sum(((g - e) ** 2).sum() for g, e in zip(got, exact))
                            / sum((e ** 2).sum() for e in exact)))


def _trained_batch(model: str, batch: int):
    """(fxtucker's shipped ``model`` for Fashion-MNIST, a batch of its training images, their labels),
    or None when no weights are shipped for it or the dataset is not installed."""
    entry = pretrained.shipped(model, "fashion-mnist")
    if entry is None:
        return None
    try:
        images = data.get_dataset("fashion-mnist", True)
        weights = pretrained.verified_path(entry)
    except OSError:  # FileNotFoundError among them
        return None
    net = models.get_model(model, 10, 1)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    x, y = next(iter(data.make_loader(images, batch, True, seed=0)))
    return net, x, y


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps of each model per round")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the JSON file the row is appended to "
                                                                  f"(default {RESULTS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = models.get_model(args.model, 10, 1)
        x = torch.randn(args.batch, 1, args.size, args.size)
        y = torch.randint(0, 10, (args.batch,))
        gated = cost_model(insert_gates(decompose_conv(cost_model(fxtucker.trace(plain), x[:1]))), x[:1])
    macs = sum(n.meta["macs"] for n in cost_model(fxtucker.trace(plain), x[:1]).graph.nodes)

    def penalty(of: nn.Module = gated):
        return GatePenalty(of, "funnel", 0.2, regularizers.c_schedule("constant", c_start=1.0),
                           target_macs=macs // 2, epochs=2, steps_per_epoch=100)

    view = compose_factors(gated)
    teacher = copy.deepcopy(plain).eval()  # distillation's original model (a cached step looks its batch up)
    gated_cl = copy.deepcopy(gated)
    view_cl = compose_factors(gated_cl)

    errors = {f"plain{', channels-last' if cl else ''}": _gradient_error(plain, x, y, cl) for cl in (False, True)}
    trained = _trained_batch(args.model, args.batch)
    if trained is not None:  # a trained model's gradients are small against its activations: the harder case
        errors.update({f"shipped weights, a Fashion-MNIST batch{', channels-last' if cl else ''}":
                       _gradient_error(*trained, cl) for cl in (False, True)})
    steps = {"plain": _step_fn(plain, x, y), "gated chain": _step_fn(gated, x, y, penalty()),
             "composed view": _step_fn(view, x, y, penalty()),
             "composed view, compiled": _step_fn(view, x, y, penalty(), compiled=True),
             "plain, compiled": _step_fn(copy.deepcopy(plain), x, y, compiled=True),
             "plain, channels-last": _step_fn(copy.deepcopy(plain), x, y, channels_last=True),
             "composed view, channels-last": _step_fn(view_cl, x, y, penalty(gated_cl), channels_last=True),
             "plain, distilled": _step_fn(copy.deepcopy(plain), x, y, extra_loss=distillation_loss(teacher)),
             "plain, distilled, teacher cached": _step_fn(copy.deepcopy(plain), x, y,
                                                          extra_loss=distillation_loss(teacher, cache=TeacherCache()))}
    for step in steps.values():  # warm up, twice: the compiled step compiles here, and any recompile too
        step()
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": args.model, "batch": args.batch, "size": args.size, "threads": args.threads,
           "rounds": args.rounds, "steps_per_round": args.steps,
           "median_s": {k: round(v, 5) for k, v in med.items()},
           "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items()},
           "rounds_s": {k: [round(t, 5) for t in v] for k, v in times.items()},
           "gradient_error_vs_float64": {k: float(f"{v:.3g}") for k, v in errors.items()},
           **_provenance()}
    print(f"{'step':<32}{'median s':>10}{'x plain':>9}")
    for k in steps:
        print(f"{k:<32}{med[k]:>10.4f}{med[k] / med['plain']:>9.2f}")
    print("gradient's relative error against float64: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items()))
    append_row(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
