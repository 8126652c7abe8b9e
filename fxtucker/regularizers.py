"""Sparsity regularizers for gate vectors, and schedules for the funnel parameter c.

The funnel regularizer of Chu & Lee (2021), ``|g| / (|g| + c)``, is a smooth stand-in for the
L0 norm: it is about ``|g| / c`` for ``|g| << c`` and tends to 1 for ``|g| >> c``, so shrinking
``c`` during training pushes small gates to zero while large gates pay an almost constant price.

Every regularizer takes a tensor and returns the elementwise penalty; the caller sums it
(:func:`penalty` does that over a list of gate tensors). All of them go through ``torch.abs``,
whose autograd subgradient at exactly 0 is 0, so a gate that is exactly zero gets no gradient
from the regularizer (``l2`` has gradient ``2 g``, which is 0 there anyway).

This module imports nothing from fxtucker.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

__all__ = [
    "funnel",
    "funnel_scaled",
    "l1",
    "l2",
    "REGULARIZERS",
    "FUNNEL_KINDS",
    "get_regularizer",
    "penalty",
    "CSchedule",
    "SCHEDULE_KINDS",
    "c_schedule",
]


def _check_c(c: object, name: str = "c") -> float:
    """Return ``c`` as a float, or raise ValueError unless it is a finite real number > 0."""
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise ValueError(
            f"{name} must be a finite real number > 0 (an int or float), "
            f"got {c!r} of type {type(c).__name__}"
        )
    value = float(c)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite real number > 0, got {c!r}")
    return value


def _check_tensor(g: object, fn: str) -> None:
    """Raise TypeError unless ``g`` is a floating-point tensor."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{fn}() expects a torch.Tensor of gate values, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(
            f"{fn}() expects a floating-point tensor of gate values, got dtype {g.dtype}; "
            f"convert it with .float()"
        )


def funnel(g: torch.Tensor, c: float) -> torch.Tensor:
    """Funnel regularizer ``|g| / (|g| + c)``, elementwise (Chu & Lee 2021).

    Values lie in ``[0, 1)``; the slope at 0 is ``1 / c`` and the derivative elsewhere is
    ``c / (|g| + c)**2 * sign(g)``. At ``g == 0`` autograd gives the subgradient 0.

    Args:
        g: gate values, any shape, floating point.
        c: the funnel width, a finite number > 0. Smaller ``c`` is closer to the L0 norm.

    Returns:
        A tensor shaped like ``g``; sum it for the penalty.
    """
    _check_tensor(g, "funnel")
    c = _check_c(c)
    a = torch.abs(g)
    return a / (a + c)


def funnel_scaled(g: torch.Tensor, c: float) -> torch.Tensor:
    """Scaled funnel ``c * |g| / (|g| + c)``, elementwise: slope 1 at 0, tends to |g| as c grows.

    Values lie in ``[0, c)``; the derivative is ``c**2 / (|g| + c)**2 * sign(g)``, and autograd
    gives the subgradient 0 at ``g == 0``.

    Args:
        g: gate values, any shape, floating point.
        c: the funnel width, a finite number > 0.

    Returns:
        A tensor shaped like ``g``; sum it for the penalty.
    """
    _check_tensor(g, "funnel_scaled")
    c = _check_c(c)
    a = torch.abs(g)
    return c * a / (a + c)


def l1(g: torch.Tensor) -> torch.Tensor:
    """L1 regularizer ``|g|``, elementwise; autograd gives the subgradient 0 at ``g == 0``.

    Args:
        g: gate values, any shape, floating point.

    Returns:
        A tensor shaped like ``g``; sum it for the penalty.
    """
    _check_tensor(g, "l1")
    return torch.abs(g)


def l2(g: torch.Tensor) -> torch.Tensor:
    """The paper's "L2 function": the squared magnitude ``g**2``, elementwise (not the L2 norm).

    Args:
        g: gate values, any shape, floating point.

    Returns:
        A tensor shaped like ``g``; sum it for the penalty (the squared L2 norm).
    """
    _check_tensor(g, "l2")
    return g**2


REGULARIZERS: dict[str, Callable[..., torch.Tensor]] = {
    "funnel": funnel,
    "funnel_scaled": funnel_scaled,
    "l1": l1,
    "l2": l2,
}

#: Regularizers that take the funnel parameter ``c``.
FUNNEL_KINDS = frozenset({"funnel", "funnel_scaled"})


def get_regularizer(name: str) -> Callable[..., torch.Tensor]:
    """Return the regularizer function called ``name``.

    Args:
        name: one of the keys of :data:`REGULARIZERS`.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    try:
        return REGULARIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown regularizer {name!r}; valid names are {sorted(REGULARIZERS)}"
        ) from None


def penalty(
    gates: Iterable[torch.Tensor], name: str = "funnel", c: Optional[float] = None
) -> torch.Tensor:
    """Sum of the regularizer ``name`` over every element of every gate tensor in ``gates``.

    Args:
        gates: an iterable of gate tensors (for example every gate vector of a model).
        name: the regularizer, a key of :data:`REGULARIZERS`.
        c: the funnel width; required for ``"funnel"`` and ``"funnel_scaled"``, and must be
            left as ``None`` for ``"l1"`` and ``"l2"``, which take no parameter.

    Returns:
        A 0-dim tensor. For an empty ``gates`` it is a float32 zero on the CPU with no grad.
    """
    fn = get_regularizer(name)
    if name in FUNNEL_KINDS:
        if c is None:
            raise ValueError(
                f"regularizer {name!r} needs the funnel width c; pass c=<float > 0> "
                f"(or a value from a c_schedule)"
            )
        c = _check_c(c)
        terms = (fn(g, c).sum() for g in gates)
    else:
        if c is not None:
            raise ValueError(
                f"regularizer {name!r} takes no parameter but c={c!r} was given; "
                f"pass c=None, or use one of {sorted(FUNNEL_KINDS)} for a funnel width"
            )
        terms = (fn(g).sum() for g in gates)
    total: Optional[torch.Tensor] = None
    for term in terms:
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


SCHEDULE_KINDS = ("constant", "linear", "exp")

# The arguments each schedule kind uses besides c_start; any other one given is an error.
_SCHEDULE_ARGS = {
    "constant": (),
    "linear": ("c_end", "total"),
    "exp": ("factor", "every"),
}


def _check_positive_int(value: object, name: str, kind: str) -> int:
    """Return ``value`` as an int, or raise ValueError unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"c_schedule kind {kind!r}: {name} must be an integer >= 1, got {value!r}"
        )
    return int(value)


@dataclass(frozen=True)
class CSchedule:
    """The funnel width c as a function of the training step; build one with :func:`c_schedule`.

    Fields that the kind does not use are ``None``; the constructor validates like
    :func:`c_schedule`, so ``CSchedule(**dataclasses.asdict(s))`` round-trips a recorded config.
    Calling it with a step (an int >= 0) returns c for that step as a float.
    """

    kind: str
    c_start: float
    c_end: Optional[float] = None
    total: Optional[int] = None
    factor: Optional[float] = None
    every: Optional[int] = None

    def __post_init__(self) -> None:
        """Validate the fields for the kind and normalize their types."""
        kind = self.kind
        if not isinstance(kind, str) or kind not in _SCHEDULE_ARGS:
            raise ValueError(
                f"unknown c_schedule kind {kind!r}; valid kinds are {list(SCHEDULE_KINDS)}"
            )
        given = {"c_end": self.c_end, "total": self.total, "factor": self.factor,
                 "every": self.every}
        needed = _SCHEDULE_ARGS[kind]
        missing = [name for name in needed if given[name] is None]
        if missing:
            raise ValueError(
                f"c_schedule kind {kind!r} needs {', '.join(needed)}; "
                f"missing {', '.join(missing)}"
            )
        extra = [name for name, value in given.items() if value is not None and name not in needed]
        if extra:
            uses = ", ".join(("c_start",) + needed)
            raise ValueError(
                f"c_schedule kind {kind!r} uses only {uses}; got unused {', '.join(extra)}"
            )
        # object.__setattr__ because the dataclass is frozen; fields become plain floats/ints.
        object.__setattr__(self, "c_start", _check_c(self.c_start, "c_start"))
        if kind == "linear":
            object.__setattr__(self, "c_end", _check_c(self.c_end, "c_end"))
            object.__setattr__(self, "total", _check_positive_int(self.total, "total", kind))
        elif kind == "exp":
            factor = self.factor
            if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (
                0.0 < float(factor) <= 1.0
            ):
                raise ValueError(
                    f"c_schedule kind 'exp': factor must be a number in (0, 1], got {factor!r}"
                )
            object.__setattr__(self, "factor", float(factor))
            object.__setattr__(self, "every", _check_positive_int(self.every, "every", kind))

    def __call__(self, step: int) -> float:
        """Return c at ``step``."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(
                f"{self!r}: step must be an integer >= 0, got {step!r} of type "
                f"{type(step).__name__}"
            )
        if step < 0:
            raise ValueError(f"{self!r}: step must be an integer >= 0, got {step}")
        step = int(step)
        if self.kind == "constant":
            return self.c_start
        if self.kind == "linear":
            if step >= self.total:
                return self.c_end
            return self.c_start + (self.c_end - self.c_start) * (step / self.total)
        return self.c_start * self.factor ** (step // self.every)

    def __repr__(self) -> str:
        """Show the kind, c_start and only the fields this kind uses."""
        fields = [f"kind={self.kind!r}", f"c_start={self.c_start!r}"]
        fields += [f"{name}={getattr(self, name)!r}" for name in _SCHEDULE_ARGS[self.kind]]
        return f"CSchedule({', '.join(fields)})"


def c_schedule(
    kind: str,
    *,
    c_start: float,
    c_end: Optional[float] = None,
    total: Optional[int] = None,
    factor: Optional[float] = None,
    every: Optional[int] = None,
) -> CSchedule:
    """Build a schedule ``step -> c`` for the funnel width.

    Kinds:
        ``"constant"``: ``c_start`` at every step.
        ``"linear"``: from ``c_start`` at step 0 linearly to ``c_end`` at step ``total``, then
        ``c_end`` for ever (Chu & Lee 2021, eq. 9).
        ``"exp"``: ``c_start * factor ** (step // every)``; with many decays c can underflow
        to 0.0, which the funnel then rejects.

    Args:
        kind: one of :data:`SCHEDULE_KINDS`.
        c_start: c at step 0, a finite number > 0 (every kind).
        c_end: c from step ``total`` on, a finite number > 0 (``"linear"`` only).
        total: the number of steps of the linear ramp, an integer >= 1 (``"linear"`` only).
        factor: the decay factor, in (0, 1] (``"exp"`` only).
        every: steps between decays, an integer >= 1 (``"exp"`` only).

    Returns:
        A frozen :class:`CSchedule`; call it with the step.

    Raises:
        ValueError: for an unknown kind, a missing argument for the kind, an argument the kind
            does not use, or an out-of-range value; the message names it and the valid range.
    """
    return CSchedule(
        kind=kind, c_start=c_start, c_end=c_end, total=total, factor=factor, every=every
    )
