"""Graph fuzzing: random small networks through the whole pass chain.

A hypothesis strategy builds random traceable networks over a pool of tensors: Conv1d/2d/3d
(random groups, depthwise included, stride, dilation, padding and padding modes, bias), functional
``F.conv*d`` on a parameter, ConvTranspose, a conv module called twice, tied weights (two convs
sharing one weight Parameter), residual adds, ``torch.cat``, branches (any tensor can feed several
ops), BatchNorm and ReLU, on odd input shapes down to one pixel. Every network goes through
``trace -> cost_model -> decompose_conv -> insert_gates -> strip_gates -> fold_or_restore`` in
float64, with kxk convs decomposed by either method (Tucker-2 or SVD pairs), and must:

- keep its function at full rank with threshold 0 (REL_CHAIN_FLOAT64 per output);
- decompose exactly the convs that can be decomposed (functional convs on their own parameters
  too) and list every other conv (transposed, tied, one input channel per group) with its reason,
  in one summary warning;
- never raise, and never add MACs; fold_bn after the chain keeps the function too;
- after stripping at a random threshold, fold_or_restore keeps the stripped function and
  predict_macs equals the real MACs.

``FUZZ_EXAMPLES`` / ``FUZZ_EXAMPLES_SLOW`` set the example counts (TESTING.md has the figures).
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import DECOMPOSED, RESTORED, SKIPPED
from fxtucker.passes import cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, predict_macs, strip_gates
from fxtucker.passes.decompose_conv import METHODS
from tests.conftest import REL_CHAIN_FLOAT64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning")

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ_EXAMPLES_SLOW = int(os.environ.get("FUZZ_EXAMPLES_SLOW", "3000"))

DTYPE = torch.float64
MAX_OPS = 8
# Why a conv of each kind is skipped: the fragment decompose_conv's record must hold.
REASONS = {
    "transposed": "transposed convs are left as they are",
    "tied": "its weight is shared with another module",
    "depthwise": "one input channel per group",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FuzzNet(nn.Module):
    """A network whose forward replays ``self.ops`` over a growing list of tensors.

    Each op appends one tensor; the output is the tuple of the tensors no op reads (so no op is
    dead, and a conv followed only by a BatchNorm can have it folded). The op list is fixed at
    construction, so symbolic tracing unrolls the loop.
    """

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims
        self.ops: list[tuple] = []
        # module name -> what decompose_conv must do with it ("decompose" or a REASONS key)
        self.expect: dict[str, str] = {}
        self.functional: list[str] = []  # per functional conv, in op order: "decompose" or a REASONS key

    def forward(self, x):
        ts = [x]
        for op in self.ops:
            kind = op[0]
            if kind == "module":
                ts.append(getattr(self, op[1])(ts[op[2]]))
            elif kind == "functional":
                _, w, b, src, kw = op
                conv = getattr(F, f"conv{self.dims}d")
                ts.append(conv(ts[src], getattr(self, w), getattr(self, b) if b else None, **kw))
            elif kind == "add":
                ts.append(ts[op[1]] + ts[op[2]])
            elif kind == "cat":
                ts.append(torch.cat([ts[op[1]], ts[op[2]]], 1))
            elif kind == "relu":
                ts.append(torch.relu(ts[op[1]]))
        return tuple(ts[i] for i in self.leaves())

    def leaves(self) -> list[int]:
        """Indices of the tensors that no op reads (the input excluded)."""
        read = set()
        for op in self.ops:
            if op[0] == "module":
                read.add(op[2])
            elif op[0] == "functional":
                read.add(op[3])
            else:
                read.update(op[1:])
        return [i for i in range(1, len(self.ops) + 1) if i not in read]


def _runs(fn, shape) -> torch.Size | None:
    """The output shape of ``fn`` on zeros of ``shape``, or None if it refuses that input."""
    try:
        with torch.no_grad():
            out = fn(torch.zeros(shape, dtype=DTYPE))
    except (RuntimeError, ValueError):
        return None
    return out.shape if out.numel() else None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _conv_args(draw, dims: int, cin: int, transposed: bool = False) -> dict:
    """Random constructor arguments of a conv taking ``cin`` channels."""
    # Mostly dense convs (the ones that get decomposed); grouped and depthwise ones often enough.
    groups = draw(st.sampled_from([1, 1, 1, *_divisors(cin)]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    if transposed:
        padding = tuple(draw(st.integers(0, 1)) for _ in range(dims))
        mode = "zeros"
    else:
        same = all(s == 1 for s in stride) and draw(st.booleans())
        padding = "same" if same else tuple(draw(st.integers(0, 2)) for _ in range(dims))
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    return dict(in_channels=cin, out_channels=groups * draw(st.integers(1, 3)), kernel_size=kernel,
                stride=stride, padding=padding, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), padding_mode=mode)


def _safe(args: dict) -> dict:
    """The same conv shrunk to 1x1, stride 1, no padding: valid on any input."""
    ones = (1,) * len(args["kernel_size"])
    return {**args, "kernel_size": ones, "stride": ones, "padding": (0,) * len(ones), "dilation": ones,
            "padding_mode": "zeros"}


@st.composite
def networks(draw) -> tuple[FuzzNet, torch.Tensor]:
    """A random FuzzNet (float64, eval mode) and an input it accepts."""
    dims = draw(st.integers(1, 3))
    max_size = {1: 12, 2: 7, 3: 4}[dims]
    # One input channel sometimes (every first conv is then depthwise-like and skipped).
    x_shape = (draw(st.integers(1, 2)), draw(st.sampled_from([3, 2, 4, 5, 1])),
               *(draw(st.integers(1, max_size)) for _ in range(dims)))
    net = FuzzNet(dims)
    shapes = [torch.Size(x_shape)]
    convs: list[str] = []  # names of conv modules, for calling twice and tying
    n_ops = draw(st.integers(1, MAX_OPS))

    def add_module(name: str, module: nn.Module, src: int, expect: str | None) -> bool:
        shape = _runs(module, shapes[src])
        if shape is None:
            return False
        setattr(net, name, module)
        net.ops.append(("module", name, src))
        shapes.append(shape)
        if expect is not None:
            net.expect[name] = expect
            convs.append(name)
        return True

    for i in range(n_ops):
        # The first op is always a conv, so every network has one.
        kind = "conv" if i == 0 else draw(st.sampled_from(
            ["conv", "conv", "conv", "functional", "transposed", "twice", "tied", "add", "cat", "bn", "relu"]))
        src = draw(st.integers(0, len(shapes) - 1))
        cin = shapes[src][1]
        conv_cls = getattr(nn, f"Conv{dims}d")
        if kind == "conv":
            args = draw(_conv_args(dims, cin))
            expect = "depthwise" if cin // args["groups"] == 1 else "decompose"
            if not add_module(f"conv{i}", conv_cls(**args).to(DTYPE), src, expect):
                add_module(f"conv{i}", conv_cls(**_safe(args)).to(DTYPE), src, expect)
        elif kind == "transposed":
            args = draw(_conv_args(dims, cin, transposed=True))
            args.pop("padding_mode")
            add_module(f"convt{i}", getattr(nn, f"ConvTranspose{dims}d")(**args).to(DTYPE), src, "transposed")
        elif kind == "functional":
            args = draw(_conv_args(dims, cin))
            w = nn.Parameter(torch.randn(args["out_channels"], cin // args["groups"], *args["kernel_size"],
                                         dtype=DTYPE) / (cin * len(args["kernel_size"])) ** 0.5)
            kw = {k: args[k] for k in ("stride", "padding", "dilation", "groups")}
            b = f"fb{i}" if args["bias"] else None
            fn = lambda t: getattr(F, f"conv{dims}d")(t, w, None, **kw)  # noqa: E731
            shape = _runs(fn, shapes[src])
            if shape is None:
                continue
            setattr(net, f"fw{i}", w)
            if b:
                setattr(net, b, nn.Parameter(torch.randn(args["out_channels"], dtype=DTYPE)))
            net.ops.append(("functional", f"fw{i}", b, src, kw))
            net.functional.append("depthwise" if cin // args["groups"] == 1 else "decompose")
            shapes.append(shape)
        elif kind == "twice":
            usable = [(n, j) for n in convs for j, s in enumerate(shapes) if s[1] == getattr(net, n).in_channels]
            if usable:
                name, src = draw(st.sampled_from(usable))
                shape = _runs(getattr(net, name), shapes[src])
                if shape is not None:
                    net.ops.append(("module", name, src))
                    shapes.append(shape)
        elif kind == "tied":
            plain = [n for n in convs if not getattr(net, n).transposed]
            if plain:
                other = getattr(net, draw(st.sampled_from(plain)))
                srcs = [j for j, s in enumerate(shapes) if s[1] == other.in_channels]
                src = draw(st.sampled_from(srcs))
                args = draw(_conv_args(dims, other.in_channels))
                args.update(out_channels=other.out_channels, kernel_size=other.kernel_size, groups=other.groups)
                conv = conv_cls(**args).to(DTYPE)
                if _runs(conv, shapes[src]) is None:
                    # stride 1 and 'same' zero padding accept any input size
                    conv = conv_cls(**{**_safe(args), "kernel_size": other.kernel_size, "padding": "same"}).to(DTYPE)
                conv.weight = other.weight
                if add_module(f"tied{i}", conv, src, "tied"):
                    for n in convs:
                        if getattr(net, n).weight is other.weight:
                            net.expect[n] = "tied"
        elif kind in ("add", "cat"):
            pairs = [(a, b) for a in range(len(shapes)) for b in range(len(shapes))
                     if (shapes[a] == shapes[b] if kind == "add" else shapes[a][2:] == shapes[b][2:]
                         and shapes[a][0] == shapes[b][0])]
            a, b = draw(st.sampled_from(pairs))
            net.ops.append((kind, a, b))
            s = shapes[a]
            shapes.append(s if kind == "add" else torch.Size((s[0], s[1] + shapes[b][1], *s[2:])))
        elif kind == "bn":
            bn = getattr(nn, f"BatchNorm{dims}d")(cin).to(DTYPE)
            with torch.no_grad():
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()
            add_module(f"bn{i}", bn, src, None)
        else:
            net.ops.append(("relu", src))
            shapes.append(shapes[src])
    x = torch.randn(x_shape, dtype=DTYPE)
    return net.eval(), x


# --- checks -------------------------------------------------------------------------------------


def _outputs(model, x) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tuple(model(x))


def _assert_same_function(got, want, rel: float, what: str) -> None:
    """Every output within ``rel`` of the reference, relative to its own norm."""
    scale = max(w.norm().item() for w in want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (what, i, g.shape, w.shape)
        # Relative to the output's own norm; an output ~0 by cancellation is compared to the largest.
        denom = max(w.norm().item(), 1e-6 * scale, 1e-300)
        err = (g - w).norm().item() / denom
        assert err < rel, f"{what}: output {i} changed by {err:.3g} (relative), more than {rel}"


def _decompose(gm, method: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decomposed = decompose_conv(gm, method=method)
    return decomposed, [w for w in caught if issubclass(w.category, UserWarning)]


def _check_records(net: FuzzNet, decomposed, caught) -> list[str]:
    """Every conv decomposed or skipped as expected, with its reason; returns the decomposed names."""
    layers = fxtucker.report(decomposed).layers
    modules = {r.name: r for r in layers if r.op != f"conv{net.dims}d"}
    functional = [r for r in layers if r.op == f"conv{net.dims}d"]
    assert set(modules) == set(net.expect), (sorted(modules), sorted(net.expect))
    assert len(functional) == len(net.functional)
    for name, expect in net.expect.items():
        rec = modules[name]
        if expect == "decompose":
            assert rec.decision == DECOMPOSED, (name, rec.reason)
            assert rec.call_sites == sum(1 for op in net.ops if op[:2] == ("module", name))
        else:
            assert rec.decision == SKIPPED and REASONS[expect] in rec.reason, (name, expect, rec.reason)
    for rec, expect in zip(functional, net.functional):  # the report lists layers in graph order
        if expect == "decompose":
            assert rec.decision == DECOMPOSED and rec.functional, (rec.name, rec.reason)
        else:
            assert rec.decision == SKIPPED and REASONS[expect] in rec.reason, (rec.name, expect, rec.reason)
    skipped = [r for r in layers if r.decision == SKIPPED]
    event(f"Conv{net.dims}d network")
    for r in layers:
        event(f"conv {r.decision}" + (f" ({next(k for k, v in REASONS.items() if v in r.reason)})"
                                      if r.decision == SKIPPED else ""))
    summaries = [str(w.message) for w in caught if "decompose_conv left" in str(w.message)]
    if skipped:
        assert len(summaries) == 1 and re.match(rf"decompose_conv left {len(skipped)} layer\(s\)", summaries[0]), summaries
    else:
        assert not summaries
    return [r.name for r in layers if r.decision == DECOMPOSED]


def check_full_rank_chain(net: FuzzNet, x: torch.Tensor, method: str) -> None:
    want = _outputs(net, x)
    gm = cost_model(fxtucker.trace(net), x)
    decomposed, caught = _decompose(gm, method)
    event(f"method {method}")
    decomposed.graph.lint()
    done = _check_records(net, decomposed, caught)
    _assert_same_function(_outputs(decomposed, x), want, REL_CHAIN_FLOAT64, "decompose_conv")
    if not done:  # nothing to decompose: the chain passes the model through unchanged, reasons in the report
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"fold_bn left \d+ BatchNorm", UserWarning)
            final = fold_bn(fold_or_restore(strip_gates(insert_gates(decomposed), 0.0), x))
        final.graph.lint()
        _assert_same_function(_outputs(final, x), want, REL_CHAIN_FLOAT64, "the chain over nothing to decompose")
        assert [r.decision for r in fxtucker.report(final).layers] == [SKIPPED] * len(fxtucker.report(final).layers)
        return
    gated = insert_gates(decomposed)
    _assert_same_function(_outputs(gated, x), want, REL_CHAIN_FLOAT64, "insert_gates")
    final = fold_or_restore(strip_gates(gated, 0.0), x)
    final.graph.lint()
    _assert_same_function(_outputs(final, x), want, REL_CHAIN_FLOAT64, "the whole chain")
    layers = {r.name: r for r in fxtucker.report(final).layers}
    assert all(layers[n].decision in (DECOMPOSED, RESTORED) for n in done)
    for n in done:
        event(f"after fold_or_restore: {layers[n].decision}")
    assert all(r.reason for r in layers.values())
    assert not any(isinstance(m, fxtucker.passes.Gate) for m in final.modules())
    assert fxtucker.count_macs(final, x) <= fxtucker.count_macs(net, x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"fold_bn left \d+ BatchNorm", UserWarning)
        folded = fold_bn(final)
    folded.graph.lint()
    _assert_same_function(_outputs(folded, x), want, REL_CHAIN_FLOAT64, "fold_bn after the chain")
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in final.modules())
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    if bns:
        event(f"fold_bn: {'all' if not left else 'some' if left < bns else 'none'} folded")


def check_pruned_chain(net: FuzzNet, x: torch.Tensor, method: str, scales: list[float], quantile: float) -> None:
    gm = cost_model(fxtucker.trace(net), x)
    decomposed, _ = _decompose(gm, method)
    # nothing to prune: not a case of this check (the full-rank check covers it); Hypothesis draws another
    assume(any(r.decision == DECOMPOSED for r in fxtucker.report(decomposed).layers))
    gated = insert_gates(decomposed)
    # Stand-in for training: scale each gate by a random factor, some to exactly 0.
    with torch.no_grad():
        flat = [g for layer in fxtucker.gates(gated).values() for g in layer.values()]
        for k, g in enumerate(flat):
            g.mul_(torch.tensor([scales[(k * 7 + j) % len(scales)] for j in range(g.numel())], dtype=g.dtype))
    values = torch.cat([g.detach().abs().flatten() for g in flat])
    threshold = float(torch.quantile(values, quantile))
    cost_model(gated, x)
    predicted = predict_macs(gated, threshold)
    stripped = strip_gates(gated, threshold)
    stripped.graph.lint()
    final = fold_or_restore(stripped, x)
    final.graph.lint()
    _assert_same_function(_outputs(final, x), _outputs(stripped, x), REL_CHAIN_FLOAT64, "fold_or_restore after strip")
    assert predicted == fxtucker.count_macs(final, x)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"fold_bn left \d+ BatchNorm", UserWarning)
        folded = fold_bn(final)
    _assert_same_function(_outputs(folded, x), _outputs(stripped, x), REL_CHAIN_FLOAT64, "fold_bn after pruning")
    for r in fxtucker.report(final).layers:
        if r.decision != SKIPPED:
            event(f"pruned: {r.decision}, " + ("some components dropped" if r.ranks != r.full_ranks else "nothing dropped"))


# --- the tests ----------------------------------------------------------------------------------

_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_scales = st.lists(st.sampled_from([0.0, 1e-3, 0.1, 0.5, 1.0, 2.0]), min_size=1, max_size=12)
_methods = st.sampled_from(METHODS)


@given(networks(), _methods)
@settings(max_examples=FUZZ_EXAMPLES, **_SETTINGS)
def test_random_networks_keep_their_function_at_full_rank(case, method):
    check_full_rank_chain(*case, method)


@given(networks(), _methods, _scales, st.floats(0.0, 1.0))
@settings(max_examples=FUZZ_EXAMPLES, **_SETTINGS)
def test_random_networks_pruned_fold_keeps_the_stripped_function(case, method, scales, quantile):
    check_pruned_chain(*case, method, scales, quantile)


@pytest.mark.slow
@given(networks(), _methods)
@settings(max_examples=FUZZ_EXAMPLES_SLOW, **_SETTINGS)
def test_random_networks_keep_their_function_at_full_rank_many(case, method):
    check_full_rank_chain(*case, method)


@pytest.mark.slow
@given(networks(), _methods, _scales, st.floats(0.0, 1.0))
@settings(max_examples=FUZZ_EXAMPLES_SLOW, **_SETTINGS)
def test_random_networks_pruned_fold_keeps_the_stripped_function_many(case, method, scales, quantile):
    check_pruned_chain(*case, method, scales, quantile)


# --- the strategy covers what it claims -----------------------------------------------------------


def test_strategy_reaches_every_kind_of_op():
    """A fixed sample of networks holds every op kind and every skip reason (else the fuzzing is blind)."""
    seen_ops, seen_expect, dims, one_pixel = set(), set(), set(), False
    twice = 0

    @given(networks())
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def collect(case):
        nonlocal one_pixel, twice
        net, x = case
        dims.add(net.dims)
        one_pixel |= all(s == 1 for s in x.shape[2:])
        for op in net.ops:
            seen_ops.add(op[0])
            if op[0] == "module":
                seen_ops.add(type(getattr(net, op[1])).__name__.rstrip("123d"))
        names = [op[1] for op in net.ops if op[0] == "module"]
        twice += any(names.count(n) > 1 for n in set(names))
        seen_expect.update(net.expect.values())

    collect()
    assert {"module", "functional", "add", "cat", "relu", "Conv", "ConvTranspose", "BatchNorm"} <= seen_ops
    assert seen_expect == {"decompose", *REASONS}
    assert dims == {1, 2, 3} and one_pixel and twice > 0
