"""What :func:`fxtucker.train.train` optimises: parameter groups, optimizer, schedule, and the loss terms.

- Weight decay applies to every parameter of two or more dimensions that is not a gate: gates
  (1-d, and found through ``node.meta``), biases and normalization weights only feel the
  gradient of the loss and of the penalty.
- The learning rate changes once per epoch, by the schedule.
- What the callbacks return is checked here: the penalty (and ``extra_loss``) must be a
  floating-point scalar tensor, ``epoch_stats`` a JSON-ready dict that adds keys of its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from fxtucker.passes.insert_gates import Gate, gates

__all__ = ["OPTIMIZERS", "SCHEDULES", "gate_parameters", "param_groups", "make_optimizer", "make_scheduler",
           "lr_factor", "check_penalty", "check_stats"]

#: Valid values of ``TrainConfig.optimizer``.
OPTIMIZERS = ("sgd", "adamw")
#: Valid values of ``TrainConfig.schedule``; the learning rate changes once per epoch.
SCHEDULES = ("cosine", "step", "constant")


def gate_parameters(model: nn.Module) -> set[int]:
    """ids of the gate parameters: every Gate module's (a composed training view holds gates without
    gate nodes) and those fxtucker.passes.gates finds through node.meta in each GraphModule."""
    ids = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        ids.update(id(p) for roles in gates(gm).values() for p in roles.values())
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] parameter groups; gates and 1-d parameters are not decayed."""
    gate_ids = gate_parameters(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or id(p) in gate_ids else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(
            f"train: the model ({type(model).__name__}) has no parameter with requires_grad=True, "
            f"so there is nothing to train; unfreeze some parameters"
        )
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, optimizer: str, *, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``optimizer`` (one of OPTIMIZERS: SGD with ``momentum``, not Nesterov, or AdamW) over :func:`param_groups`."""
    groups = param_groups(model, weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(schedule: str, position: float, *, span: int, step_size: int, gamma: float) -> float:
    """The factor of the base rate at ``position`` epochs into a run whose schedule spans ``span``
    epochs (a fraction for a step within an epoch): cosine to 0 at ``span``, times ``gamma`` every
    ``step_size`` epochs, or 1."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(position, span) / span))
    if schedule == "step":
        return gamma ** math.floor(position / step_size)
    return 1.0


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, *, epochs: int, step_size: int, gamma: float,
                   first_epoch: int = 0, schedule_epochs: Optional[int] = None):
    """The per-epoch learning-rate ``schedule`` (one of SCHEDULES) of ``opt``: cosine to 0 over ``epochs``,
    times ``gamma`` every ``step_size`` epochs, or constant.

    With ``first_epoch`` (and ``schedule_epochs``, default ``first_epoch + epochs``), the stage is
    epochs ``first_epoch`` on of a run whose schedule spans ``schedule_epochs``: its first epoch runs
    at the rate that epoch of the run would, the cosine reaches 0 at the run's end, and the step
    schedule counts the run's epochs (:func:`lr_factor` at the run's epoch). ``TrainConfig.per_step``
    sets the rate of every step from :func:`lr_factor` instead."""
    span = first_epoch + epochs if schedule_epochs is None else schedule_epochs
    if (first_epoch, span) != (0, epochs) and schedule != "constant":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: lr_factor(schedule, first_epoch + e, span=span, step_size=step_size, gamma=gamma))
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def check_penalty(value: object, epoch: int, step: int) -> torch.Tensor:
    """The penalty as a 0-dim tensor, or an error saying what penalty returned."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"train: penalty(model, epoch={epoch}, step={step}) returned a "
            f"{type(value).__name__}; it must return a scalar tensor (e.g. lam * "
            f"fxtucker.regularizers.penalty(gates, 'funnel', c)) so its gradient reaches the gates"
        )
    if value.numel() != 1:
        raise ValueError(
            f"train: penalty(model, epoch={epoch}, step={step}) returned a tensor of shape "
            f"{tuple(value.shape)}; it must return a scalar (one element), e.g. sum it with .sum()"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"train: penalty(model, epoch={epoch}, step={step}) returned a {value.dtype} tensor; "
            f"it must be floating point to be added to the loss"
        )
    return value.reshape(())


def check_stats(stats: object, record_keys: Sequence[str]) -> dict:
    """epoch_stats' dict, checked to be JSON-ready and not to shadow ``record_keys``, the record's own keys."""
    if not isinstance(stats, dict):
        raise TypeError(f"train: epoch_stats(model) returned a {type(stats).__name__}; it must "
                        f"return a dict of JSON-ready values")
    clash = sorted(set(stats) & set(record_keys))
    if clash:
        raise ValueError(f"train: epoch_stats(model) returned keys {clash} that the history "
                         f"record already has ({list(record_keys)}); rename them")
    try:
        json.dumps(stats)
    except (TypeError, ValueError) as e:
        raise TypeError(f"train: epoch_stats(model) returned a dict that is not JSON-ready "
                        f"({e}); return only str keys and numbers, strings, bools, None, lists "
                        f"and dicts of them (use .item() / .tolist() for tensors)") from None
    return stats
