"""Tests for fxtucker.regularizers: values, gradients, limits, schedules and every error."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxtucker.regularizers import (
    FUNNEL_KINDS,
    REGULARIZERS,
    SCHEDULE_KINDS,
    CSchedule,
    c_schedule,
    funnel,
    funnel_scaled,
    get_regularizer,
    l1,
    l2,
    penalty,
)

G = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0], dtype=torch.float64)


# --- values at known points -------------------------------------------------------------------


def test_funnel_values():
    torch.testing.assert_close(
        funnel(G, 1.0),
        torch.tensor([3 / 4, 0.5 / 1.5, 0.0, 0.25 / 1.25, 2 / 3], dtype=torch.float64),
    )
    # |g| == c gives exactly one half.
    assert funnel(torch.tensor([0.7]), 0.7).item() == pytest.approx(0.5)


def test_funnel_scaled_values():
    torch.testing.assert_close(
        funnel_scaled(G, 2.0),
        torch.tensor([6 / 5, 1 / 2.5, 0.0, 0.5 / 2.25, 4 / 4], dtype=torch.float64),
    )


def test_l1_l2_values():
    torch.testing.assert_close(l1(G), torch.tensor([3.0, 0.5, 0.0, 0.25, 2.0], dtype=torch.float64))
    torch.testing.assert_close(
        l2(G), torch.tensor([9.0, 0.25, 0.0, 0.0625, 4.0], dtype=torch.float64)
    )


def test_output_keeps_shape_and_dtype():
    g = torch.randn(3, 4, dtype=torch.float64)
    for name, fn in REGULARIZERS.items():
        out = fn(g, 0.5) if name in FUNNEL_KINDS else fn(g)
        assert out.shape == g.shape and out.dtype == g.dtype, name


# --- gradients --------------------------------------------------------------------------------


def _away_from_zero(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64)
    return (x * sign).requires_grad_(True)


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_gradcheck(name):
    fn = get_regularizer(name)
    g = _away_from_zero()
    if name in FUNNEL_KINDS:
        assert torch.autograd.gradcheck(lambda t: fn(t, 0.3), (g,))
    else:
        assert torch.autograd.gradcheck(fn, (g,))


@pytest.mark.parametrize("c", [0.01, 0.3, 1.0, 7.0])
def test_funnel_gradient_closed_form(c):
    g = _away_from_zero(seed=1)
    funnel(g, c).sum().backward()
    a = g.detach().abs()
    expected = c / (a + c) ** 2 * torch.sign(g.detach())
    torch.testing.assert_close(g.grad, expected)


def test_funnel_scaled_gradient_closed_form():
    c = 0.4
    g = _away_from_zero(seed=2)
    funnel_scaled(g, c).sum().backward()
    a = g.detach().abs()
    torch.testing.assert_close(g.grad, c**2 / (a + c) ** 2 * torch.sign(g.detach()))


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_gradient_is_zero_at_exactly_zero(name):
    fn = get_regularizer(name)
    g = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = fn(g, 0.5) if name in FUNNEL_KINDS else fn(g)
    out.sum().backward()
    assert torch.equal(g.grad, torch.zeros(3, dtype=torch.float64))


# --- limits -----------------------------------------------------------------------------------


def test_funnel_is_l1_over_c_for_large_c():
    g = torch.tensor([1e-3, -2e-3, 5e-4], dtype=torch.float64)
    c = 1e3
    # |g|/(|g|+c) = |g|/c * 1/(1+|g|/c): relative error about |g|/c = 2e-6.
    torch.testing.assert_close(funnel(g, c), g.abs() / c, rtol=1e-5, atol=0)
    assert not torch.allclose(funnel(g, 1e-3), g.abs() / 1e-3, rtol=1e-5, atol=0)


def test_funnel_tends_to_one_for_small_c():
    g = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(funnel(g, 1e-9), torch.ones(3, dtype=torch.float64))


def test_funnel_scaled_tends_to_l1_as_c_grows():
    g = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64)
    errors = [(funnel_scaled(g, c) - g.abs()).abs().max().item() for c in (1.0, 1e2, 1e4, 1e6)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-5
    torch.testing.assert_close(funnel_scaled(g, 1e8), g.abs(), rtol=1e-7, atol=0)


# --- properties -------------------------------------------------------------------------------

finite = st.floats(
    min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False
)
widths = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(a=finite, b=finite, c=widths)
def test_funnel_in_unit_interval_and_monotone_in_magnitude(a, b, c):
    g = torch.tensor([a, b], dtype=torch.float64)
    f = funnel(g, c)
    assert bool(((f >= 0) & (f < 1)).all())
    # Even: depends on |g| only.
    torch.testing.assert_close(funnel(-g, c), f)
    if abs(a) <= abs(b):
        assert f[0] <= f[1]
    else:
        assert f[0] >= f[1]


@settings(max_examples=100, deadline=None)
@given(a=finite, c=widths)
def test_funnel_scaled_is_c_times_funnel_and_below_l1(a, c):
    g = torch.tensor([a], dtype=torch.float64)
    torch.testing.assert_close(funnel_scaled(g, c), c * funnel(g, c))
    assert funnel_scaled(g, c).item() <= abs(a) * (1 + 1e-12)


# --- registry and penalty ---------------------------------------------------------------------


def test_registry():
    assert REGULARIZERS == {"funnel": funnel, "funnel_scaled": funnel_scaled, "l1": l1, "l2": l2}
    assert get_regularizer("funnel") is funnel
    assert get_regularizer("l2") is l2


def test_get_regularizer_unknown():
    with pytest.raises(ValueError, match=r"unknown regularizer 'l0'; valid names are \['funnel', "):
        get_regularizer("l0")


def test_penalty_sums_over_gates():
    gates = [torch.tensor([1.0, -1.0]), torch.tensor([[3.0], [0.0]])]
    assert penalty(gates, "funnel", c=1.0).item() == pytest.approx(0.5 + 0.5 + 0.75)
    assert penalty(gates, "funnel_scaled", c=2.0).item() == pytest.approx(
        2 / 3 + 2 / 3 + 6 / 5
    )
    assert penalty(gates, "l1").item() == pytest.approx(5.0)
    assert penalty(gates, "l2").item() == pytest.approx(11.0)
    # Generators work too, and the default regularizer is the funnel.
    assert penalty((g for g in gates), c=1.0).item() == pytest.approx(1.75)


def test_penalty_backpropagates_to_every_gate():
    gates = [torch.tensor([0.5, -2.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)]
    penalty(gates, "funnel", c=1.0).backward()
    torch.testing.assert_close(gates[0].grad, torch.tensor([1 / 2.25, -1 / 9]))
    torch.testing.assert_close(gates[1].grad, torch.tensor([0.25]))


def test_penalty_empty_is_zero():
    assert penalty([], "l1").item() == 0.0
    assert penalty([], "funnel", c=1.0).item() == 0.0


def test_penalty_needs_c_for_funnel():
    with pytest.raises(ValueError, match=r"regularizer 'funnel_scaled' needs the funnel width c"):
        penalty([torch.ones(2)], "funnel_scaled")


def test_penalty_forbids_c_for_l1():
    with pytest.raises(ValueError, match=r"regularizer 'l1' takes no parameter but c=0.5"):
        penalty([torch.ones(2)], "l1", c=0.5)


def test_penalty_unknown_name():
    with pytest.raises(ValueError, match=r"unknown regularizer 'L1'; valid names"):
        penalty([torch.ones(2)], "L1")


# --- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [funnel, funnel_scaled])
@pytest.mark.parametrize(
    "c, pattern",
    [
        (0.0, r"c must be a finite real number > 0, got 0.0"),
        (-1, r"c must be a finite real number > 0, got -1"),
        (math.inf, r"c must be a finite real number > 0, got inf"),
        (math.nan, r"c must be a finite real number > 0, got nan"),
        ("1", r"c must be a finite real number > 0 \(an int or float\), got '1' of type str"),
        (True, r"got True of type bool"),
    ],
)
def test_bad_c(fn, c, pattern):
    with pytest.raises(ValueError, match=pattern):
        fn(torch.ones(2), c)


def test_non_tensor_gate():
    with pytest.raises(
        TypeError, match=r"funnel\(\) expects a torch.Tensor of gate values, got list"
    ):
        funnel([1.0, 2.0], 1.0)


def test_integer_tensor_gate():
    with pytest.raises(TypeError, match=r"l1\(\) expects a floating-point tensor .* torch.int64"):
        l1(torch.tensor([1, 2]))


# --- schedules --------------------------------------------------------------------------------


def test_constant_schedule():
    s = c_schedule("constant", c_start=0.5)
    assert [s(0), s(1), s(10**9)] == [0.5, 0.5, 0.5]
    assert repr(s) == "CSchedule(kind='constant', c_start=0.5)"


def test_linear_schedule():
    s = c_schedule("linear", c_start=1.0, c_end=0.1, total=10)
    assert s(0) == 1.0
    assert s(5) == pytest.approx(0.55)
    assert s(9) == pytest.approx(0.19)
    assert s(10) == 0.1
    assert s(11) == 0.1 and s(10**6) == 0.1
    assert repr(s) == "CSchedule(kind='linear', c_start=1.0, c_end=0.1, total=10)"


def test_linear_schedule_can_increase():
    s = c_schedule("linear", c_start=1, c_end=3, total=4)
    assert [s(k) for k in range(6)] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0]


def test_exp_schedule():
    s = c_schedule("exp", c_start=2.0, factor=0.5, every=3)
    assert [s(k) for k in range(7)] == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5]
    assert s(30) == pytest.approx(2.0 * 0.5**10)
    assert repr(s) == "CSchedule(kind='exp', c_start=2.0, factor=0.5, every=3)"
    assert c_schedule("exp", c_start=2.0, factor=1, every=1)(100) == 2.0


def test_schedule_is_frozen_and_round_trips():
    s = c_schedule("linear", c_start=1, c_end=0.01, total=100)
    assert isinstance(s, CSchedule)
    assert isinstance(s.c_start, float) and isinstance(s.total, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.c_start = 2.0
    assert CSchedule(**dataclasses.asdict(s)) == s
    assert hash(s) == hash(CSchedule(**dataclasses.asdict(s)))


def test_schedule_kinds_listed():
    assert SCHEDULE_KINDS == ("constant", "linear", "exp")


@pytest.mark.parametrize(
    "kind, kwargs, pattern",
    [
        ("cosine", {"c_start": 1.0}, r"unknown c_schedule kind 'cosine'; valid kinds are "
         r"\['constant', 'linear', 'exp'\]"),
        ("linear", {"c_start": 1.0, "c_end": 0.1},
         r"c_schedule kind 'linear' needs c_end, total; missing total"),
        ("exp", {"c_start": 1.0},
         r"c_schedule kind 'exp' needs factor, every; missing factor, every"),
        ("constant", {"c_start": 1.0, "c_end": 0.5},
         r"c_schedule kind 'constant' uses only c_start; got unused c_end"),
        ("exp", {"c_start": 1.0, "factor": 0.5, "every": 2, "total": 3},
         r"kind 'exp' uses only c_start, factor, every; got unused total"),
        ("constant", {"c_start": 0.0}, r"c_start must be a finite real number > 0, got 0.0"),
        ("linear", {"c_start": 1.0, "c_end": -0.1, "total": 5},
         r"c_end must be a finite real number > 0, got -0.1"),
        ("linear", {"c_start": 1.0, "c_end": 0.1, "total": 0},
         r"kind 'linear': total must be an integer >= 1, got 0"),
        ("linear", {"c_start": 1.0, "c_end": 0.1, "total": 2.5},
         r"kind 'linear': total must be an integer >= 1, got 2.5"),
        ("exp", {"c_start": 1.0, "factor": 1.5, "every": 2},
         r"kind 'exp': factor must be a number in \(0, 1\], got 1.5"),
        ("exp", {"c_start": 1.0, "factor": 0.0, "every": 2},
         r"kind 'exp': factor must be a number in \(0, 1\], got 0.0"),
        ("exp", {"c_start": 1.0, "factor": 0.5, "every": -1},
         r"kind 'exp': every must be an integer >= 1, got -1"),
    ],
)
def test_schedule_errors(kind, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        c_schedule(kind, **kwargs)


def test_schedule_negative_step():
    s = c_schedule("exp", c_start=1.0, factor=0.5, every=2)
    with pytest.raises(
        ValueError, match=r"CSchedule\(kind='exp'.*\): step must be an integer >= 0, got -1"
    ):
        s(-1)


def test_schedule_non_integer_step():
    s = c_schedule("constant", c_start=1.0)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got 1.5 of type float"):
        s(1.5)
