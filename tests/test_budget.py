"""fxtucker.budget: gate magnitudes, component MACs, the threshold that meets a budget, GatePenalty."""

import dataclasses
import math

import torch
import torch.nn as nn
import pytest

import fxtucker
from fxtucker import budget, regularizers
from fxtucker.budget import threshold_for_budget
from fxtucker.compress import CompressConfig, compress
from fxtucker.passes import cost_model, decompose_conv, insert_gates, kept_ranks, predict_macs
from fxtucker.passes.strip_gates import floor_masks

from .toys import toy_problem


def _random_gates(gm, seed, low=0.0):
    """Every gate of ``gm`` drawn uniformly from [low, low + 1) after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in fxtucker.gates(gm).values():
            for g in layer.values():
                g.copy_(torch.rand(g.shape) + low)


def test_threshold_for_budget_is_the_smallest_that_fits():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(1, 8, 12, 12)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    _random_gates(gated, seed=3)
    full = predict_macs(gated, 0.0)
    for target in (full, int(full * 0.6), int(full * 0.3)):
        th = threshold_for_budget(gated, target)
        assert predict_macs(gated, th) <= target
        if th > 0:  # any smaller threshold keeps one more component and breaks the budget
            assert predict_macs(gated, math.nextafter(th, 0)) > target
    with pytest.raises(ValueError, match=r"the MAC budget 10 cannot be met: pruning every gate still leaves"):
        threshold_for_budget(gated, 10)


def _gated_toy():
    model, train, test, x = toy_problem()
    gm = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    return gm, train, x


@pytest.mark.parametrize("ahead", [False, True])
def test_gate_penalty_steers_lambda_along_the_mac_path(ahead):
    # The zeroed gates' MACs should run from the full model to the budget by epoch 2 of 3. With no
    # gate at 0 a quarter of the way there, they are behind: lambda goes up (by at most
    # MAX_CHANGE). With the budget met by zeros already, they are ahead: lambda goes down.
    gm, _, _ = _gated_toy()
    full = predict_macs(gm, 0.0)
    tiny = math.nextafter(0.0, 1.0)
    target = predict_macs(gm, tiny, relative=True)  # the toy's rank-(4, 6) structure: gates at exactly 0
    assert target < full
    if not ahead:  # no gate at 0 yet
        with torch.no_grad():
            for layer in fxtucker.gates(gm).values():
                for g in layer.values():
                    g.add_(1e-3)
    pen = budget.GatePenalty(gm, "funnel", 0.1, lambda e: 1.0, target_macs=target, threshold=0.01, epochs=3, every=1,
                           steps_per_epoch=2, reach=2.0)
    assert pen.zeros_macs == (target if ahead else full)
    assert pen.path(0, 1) == full - (full - target) / 4
    pen(gm, 0, 0)  # step 0: no steering yet
    assert pen.weight == 0.1
    pen(gm, 0, 1)
    assert (pen.weight < 0.1) == ahead and pen.weight != 0.1
    assert 0.1 / pen.MAX_CHANGE <= pen.weight <= 0.1 * pen.MAX_CHANGE


def test_gate_penalty_value_gradient_and_state():
    gm, _, _ = _gated_toy()
    gs = [g for layer in fxtucker.gates(gm).values() for g in layer.values()]
    pen = budget.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1 * (e + 1), relative=False, proximal=False,
                           mac_weighted=False)
    value = pen(gm, 1, 7)  # no budget: lambda stays, c comes from the schedule at epoch 1
    expected = 0.5 * sum((g.abs() / (g.abs() + 0.2)).sum() for g in gs)
    assert torch.allclose(value, expected)
    value.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gs)
    assert pen.weight == 0.5
    other = budget.GatePenalty(gm, "funnel", 1.0, lambda e: 1.0)
    other.load_state_dict(pen.state_dict())
    assert other.weight == 0.5


def test_relative_penalty_ignores_the_scale_of_a_gate_vector():
    gm, _, _ = _gated_toy()
    pen = budget.GatePenalty(gm, "funnel", 1.0, lambda e: 0.1, proximal=False)
    before = pen(gm, 0, 0)
    with torch.no_grad():
        for layer in fxtucker.gates(gm).values():
            layer["gate_in"].mul_(7.0)
    assert torch.allclose(pen(gm, 0, 0), before)


def test_proximal_step_stops_at_zero_and_shrinks_by_lr_times_slope():
    gm, _, _ = _gated_toy()
    g = fxtucker.gates(gm)["conv"]["gate_in"]
    with torch.no_grad():
        g.copy_(torch.linspace(-1.0, 1.0, g.numel()))
    before = g.detach().clone()
    pen = budget.GatePenalty(gm, "l1", 0.5, lambda e: 1.0, relative=False, proximal=True, mac_weighted=False)
    value = pen(gm, 0, 0)
    assert not value.requires_grad  # the penalty acts through after_step only
    with torch.no_grad():
        pen.after_step(gm, 0, 0, lr=0.4)  # l1's slope is 1: shrink every gate by 0.2, stop at 0
    expected = before.sign() * (before.abs() - 0.2).clamp_min(0)
    assert torch.allclose(g.detach(), expected)
    assert (g.detach() == 0).sum() == (before.abs() <= 0.2).sum() > 0


def test_mac_weights_are_the_macs_per_component_and_average_to_one():
    gm, _, x = _gated_toy()
    costs = budget.component_macs(gm)["conv"]
    roles = {n.meta["fxtucker"].role: n for n in gm.graph.nodes if "fxtucker" in n.meta}
    macs = {r: roles[r].meta["macs"] for r in ("first", "core", "last")}
    assert costs["gate_in"] * 16 == pytest.approx(macs["first"] + macs["core"])
    assert costs["gate_core"] * 24 == costs["gate_out"] * 24 == pytest.approx(macs["core"] + macs["last"])
    pen = budget.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, relative=False, proximal=False)
    sizes = [g.numel() for layer in fxtucker.gates(gm).values() for g in layer.values()]
    assert sum(k * n for k, n in zip(pen.scales, sizes)) / sum(sizes) == pytest.approx(1.0)
    assert pen.scales[0] != pen.scales[1]  # input and output components cost differently here


def test_live_mac_weights_are_what_one_more_component_saves():
    """With ``alive``, an input component's cost counts only the live output components' share of
    ``core`` (and the other way round): what predict_macs says its removal saves."""
    gm, _, _ = _gated_toy()
    roles = {n.meta["fxtucker"].role: n for n in gm.graph.nodes if "fxtucker" in n.meta}
    macs = {r: roles[r].meta["macs"] for r in ("first", "core", "last")}
    layer = fxtucker.gates(gm)["conv"]
    with torch.no_grad():  # every gate alive: the full-rank costs
        for g in layer.values():
            g.copy_(torch.rand(g.shape) + 0.5)
    assert budget.component_macs(gm, alive=True) == budget.component_macs(gm)
    pen = budget.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, relative=False, proximal=False, every=5, live_macs=True)
    unit, start = pen.mac_unit, list(pen.scales)
    with torch.no_grad():  # cut 18 of the 24 output components (in the core's gate or the last's)
        layer["gate_out"][:9] = 0
        layer["gate_core"][9:18] = 0
    live = budget.component_macs(gm, alive=True)["conv"]
    assert live["gate_in"] * 16 == pytest.approx(macs["first"] + macs["core"] * 6 / 24)
    assert live["gate_out"] == budget.component_macs(gm)["conv"]["gate_out"]  # all 16 inputs live
    tiny = math.nextafter(0.0, 1.0)
    before = predict_macs(gm, tiny)
    with torch.no_grad():
        layer["gate_in"][0] = 0
    assert before - predict_macs(gm, tiny) == pytest.approx(live["gate_in"], abs=2)  # floor divisions
    live = budget.component_macs(gm, alive=True)["conv"]
    assert live["gate_out"] * 24 == pytest.approx(macs["last"] + macs["core"] * 15 / 16)  # 15 inputs live now
    # the penalty's weights follow every `every` steps, in the full-rank units, in the gates' order
    pen(gm, 0, 3)
    assert pen.scales == start
    pen(gm, 0, 5)
    assert pen.scales == pytest.approx([live[role] / unit for role in layer])
    assert pen.scales[0] < start[0] and pen.scales[1] < start[1]
    # a resumed run gets the weights of the last update back, not those of the gates it starts from
    state = pen.state_dict()
    with torch.no_grad():
        layer["gate_in"][1:8] = 0
    resumed = budget.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, relative=False, proximal=False, every=5, live_macs=True)
    assert resumed.scales != pen.scales
    resumed.load_state_dict(state)
    assert resumed.scales == pen.scales
    unweighted = budget.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, mac_weighted=False, live_macs=True)
    unweighted(gm, 0, 5)
    assert set(unweighted.scales) == {1.0} and "scales" not in unweighted.state_dict()


def test_live_mac_weights_of_a_grouped_layer_count_its_fullest_group():
    """strip_gates keeps the same rank in every group, so zeros in one group alone save no core MACs."""
    x = torch.randn(1, 8, 10, 10)
    gm = cost_model(insert_gates(decompose_conv(fxtucker.trace(nn.Sequential(nn.Conv2d(8, 16, 3, groups=2))))), x)
    layer = fxtucker.gates(gm)["0"]
    with torch.no_grad():
        for g in layer.values():
            g.copy_(torch.rand(g.shape) + 0.5)
    full = budget.component_macs(gm)["0"]
    with torch.no_grad():
        layer["gate_in"][:2] = 0  # group 0 only (gates are group-major)
    assert budget.component_macs(gm, alive=True)["0"] == full
    assert kept_ranks(gm, math.nextafter(0.0, 1.0))["0"][0] == (4, 8)  # per group: both groups keep 4 inputs
    with torch.no_grad():
        layer["gate_in"][4:6] = 0  # and the same number in group 1
    live = budget.component_macs(gm, alive=True)["0"]
    assert live["gate_out"] < full["gate_out"] and live["gate_in"] == full["gate_in"]


def test_proximal_steps_never_zero_gates_past_the_budget():
    gm, _, _ = _gated_toy()
    full = predict_macs(gm, 0.0)
    tiny = math.nextafter(0.0, 1.0)
    target = predict_macs(gm, 0.01, relative=True)  # what the rank-(4, 6) structure leaves
    pen = budget.GatePenalty(gm, "l1", 50.0, lambda e: 1.0, target_macs=target, epochs=2, proximal=True)
    pen.max_shrink = math.inf  # no cap on lambda: the guard alone
    for step in range(20):  # a huge lambda: unchecked, it would zero every gate at once
        pen.after_step(gm, 0, step, lr=0.1)
        assert predict_macs(gm, tiny, relative=True) >= target
    assert predict_macs(gm, 0.0) == full  # threshold 0 keeps everything, zeros too
    unbounded = budget.GatePenalty(gm, "l1", 50.0, lambda e: 1.0, proximal=True)
    unbounded.after_step(gm, 0, 0, lr=0.1)
    assert predict_macs(gm, tiny, relative=True) < target


def test_a_steered_lambda_is_capped_from_the_first_step():
    """lr x lambda <= max_shrink from step 0, not only from the first steering step: "auto" calibrates
    lambda over the whole of step 3, and on a few steps it shrank vectors many times their mean at
    once (mobilenet_v2 on 256 images went to NaN by the third step)."""
    gm, _, _ = _gated_toy()
    target = predict_macs(gm, 0.0) // 2
    pen = budget.GatePenalty(gm, "funnel", 100.0, lambda e: 1.0, target_macs=target, epochs=1)
    before = [g.detach().abs().clone() for layer in fxtucker.gates(gm).values() for g in layer.values()]
    pen.after_step(gm, 0, 0, lr=0.01)
    assert pen.weight == pytest.approx(pen.max_shrink / 0.01)
    after = [g.detach().abs() for layer in fxtucker.gates(gm).values() for g in layer.values()]
    # at most max_shrink x the largest MAC weight of a vector's mean per gate (the funnel's slope is <= 1 / c = 1)
    bound = pen.max_shrink * max(pen.scales)
    for a, b in zip(after, before):
        assert torch.all(b - a <= bound * b.mean() + 1e-6)
    free = budget.GatePenalty(gm, "funnel", 100.0, lambda e: 1.0, epochs=1)  # no budget: lambda is the user's
    free.after_step(gm, 0, 0, lr=0.01)
    assert free.weight == 100.0
    assert pen.max_shrink == budget.MAX_SHRINK == 0.05
    wider = budget.GatePenalty(gm, "funnel", 100.0, lambda e: 1.0, target_macs=target, epochs=1, max_shrink=0.2)
    wider.after_step(gm, 0, 0, lr=0.01)
    assert wider.weight == pytest.approx(0.2 / 0.01)  # CompressConfig.max_shrink sets the cap


def test_compress_mobilenet_v2_on_a_few_steps_does_not_diverge():
    """The regression behind the cap: torchvision's mobilenet_v2 (MAC weights up to ~11x the mean),
    4 steps of step 3 with reg_weight="auto"."""
    from torch.utils.data import DataLoader, TensorDataset

    from fxtucker.models import get_model

    model = get_model("mobilenet_v2", num_classes=10, in_channels=1).eval()
    xs, ys = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    loader = DataLoader(TensorDataset(xs, ys), batch_size=32)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, target_speedup=2.0, seed=0)
    result = compress(model, loader, xs[:1], config=config, progress=False)
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert result.report["macs_after"] <= result.report["macs_before"] / 2


def test_relative_proximal_step_keeps_each_vector_mean_and_zeroes_the_small_gates():
    gm, _, _ = _gated_toy()
    g = fxtucker.gates(gm)["conv"]["gate_in"]
    with torch.no_grad():
        g.copy_(torch.linspace(0.05, 2.0, g.numel()))
    mean = g.detach().abs().mean()
    pen = budget.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, relative=True, proximal=True, mac_weighted=False)
    pen.after_step(gm, 0, 0, lr=0.2)
    assert torch.allclose(g.detach().abs().mean(), mean)
    assert (g.detach() == 0).any() and (g.detach() > 0).any()
    assert torch.all(g.detach()[1:] >= g.detach()[:-1])  # the order of the gates is kept


def test_gates_the_optimizer_moved_off_zero_are_zeroed_again_at_the_budget():
    # Regression: the budget guard took every gate that the optimizer step had moved off 0 for a
    # new zero, and once the zeros were at the budget it gave them all their values back.
    gm, _, _ = _gated_toy()
    tiny = math.nextafter(0.0, 1.0)
    target = predict_macs(gm, 0.5, relative=True)
    pen = budget.GatePenalty(gm, "l1", 50.0, lambda e: 1.0, target_macs=target, epochs=2, proximal=True)
    for step in range(10):
        pen.after_step(gm, 0, step, lr=0.1)
    at_budget = predict_macs(gm, tiny, relative=True)
    assert target <= at_budget < predict_macs(gm, 0.0) and pen.zeros_macs == at_budget
    gs = [g for layer in fxtucker.gates(gm).values() for g in layer.values()]
    zeros = [g.detach() == 0 for g in gs]
    with torch.no_grad():  # what an optimizer step with momentum does to a gate at 0
        for g, z in zip(gs, zeros):
            g.add_(1e-4 * z)
    pen.after_step(gm, 0, 10, lr=0.1)
    assert all(bool((g.detach()[z] == 0).all()) for g, z in zip(gs, zeros))  # every old zero is 0 again
    assert pen.zeros_macs == predict_macs(gm, tiny, relative=True) >= target


def test_c_follows_the_budget_threshold():
    gm, _, _ = _gated_toy()
    target = predict_macs(gm, 0.5, relative=True)
    schedule = regularizers.c_schedule("linear", c_start=1.0, c_end=0.01, total=2)
    pen = budget.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target, c_follows_budget=True)
    assert pen.c(0) == max(pen.budget_threshold(), 0.01) != schedule(0)
    plain = budget.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target)
    assert plain.c(1) == schedule(1)
    assert CompressConfig(c_follows_budget=True).c_follows_budget


def test_c_following_the_budget_is_restored_with_the_checkpoint():
    """c is the budget's cut as of the last steering step, not as of the gates a resumed run starts
    from: a checkpoint written between two steering steps brings it back."""
    gm, _, _ = _gated_toy()
    sizes = budget.gate_magnitudes(gm, relative=True)
    target = predict_macs(gm, float(sizes[sizes > 0].median()), relative=True)  # cuts gates well above c_end
    schedule = regularizers.c_schedule("linear", c_start=1.0, c_end=0.01, total=2)
    pen = budget.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target, c_follows_budget=True)
    pen.steer(0, 10)
    assert pen.c(0) > 0.01
    c = pen.c(0)
    with torch.no_grad():  # the optimizer steps after the last steering step move the gates
        for layer in fxtucker.gates(gm).values():
            for g in layer.values():
                g.mul_(torch.linspace(0.5, 1.5, g.numel()).view_as(g))
    pen.after_step(gm, 0, 11, lr=0.05)
    state = pen.state_dict()
    resumed = budget.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target, c_follows_budget=True)
    assert resumed.c(0) != c  # built on the moved gates
    resumed.load_state_dict(state)
    assert resumed.c(0) == c and resumed.weight == pen.weight
    # the cap on lambda (the last learning rate) and the budget guard's zeros come back too
    assert resumed.lr == 0.05 and torch.equal(resumed.zero_mask, pen.zero_mask)
    older = budget.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target, c_follows_budget=True)
    older.load_state_dict({"weight": 2.0})  # a checkpoint written before these were saved
    assert older.weight == 2.0 and older.lr is None and older.zero_mask is None
    assert older.c(0) == max(older.budget_threshold(), 0.01)


def test_rank_floor_is_kept_by_the_budget_and_left_alone_by_the_penalty():
    gm, _, _ = _gated_toy()  # conv: Tucker-2, ranks (16, 24)
    _random_gates(gm, seed=0, low=0.01)
    tiny = math.nextafter(0.0, 1.0)
    floor = 0.25
    # every gate below the threshold: the floor's ceil(0.25 x rank) of each mode is what is left
    everything = {n: r for n, (r, _) in kept_ranks(gm, 10.0, rank_floor=floor).items()}
    assert everything == {"conv": (4, 6)}
    least = predict_macs(gm, 10.0, rank_floor=floor)
    assert predict_macs(gm, 10.0) < least < predict_macs(gm, 0.0)
    th = threshold_for_budget(gm, least, rank_floor=floor)
    assert predict_macs(gm, th, rank_floor=floor) <= least
    with pytest.raises(ValueError, match=r"cannot be met: .*or rank_floor=0.25 of each mode's rank\); "
                                         r"raise target_macs or lower target_speedup or rank_floor"):
        threshold_for_budget(gm, least - 1, rank_floor=floor)
    # A huge lambda zeroes every gate the floor does not keep, and none that it does.
    pen = budget.GatePenalty(gm, "l1", 1e3, lambda e: 1.0, relative=False, proximal=True, mac_weighted=False,
                             rank_floor=floor)
    before = {n: {role: g.detach().clone() for role, g in layer.items()} for n, layer in fxtucker.gates(gm).items()}
    kept = {n: floor_masks(gm.get_submodule(n), floor) for n in before}
    pen.after_step(gm, 0, 0, lr=0.1)
    for n, layer in fxtucker.gates(gm).items():
        for role, g in layer.items():
            assert torch.equal(g.detach()[kept[n][role]], before[n][role][kept[n][role]])
            assert bool((g.detach()[~kept[n][role]] == 0).all())
    assert predict_macs(gm, tiny, rank_floor=floor) == least
    # Through the gradient (proximal=False), the floor's gates get none.
    with torch.no_grad():
        for n, layer in fxtucker.gates(gm).items():
            for role, g in layer.items():
                g.copy_(before[n][role])
    grad_pen = budget.GatePenalty(gm, "funnel", 1.0, lambda e: 0.1, proximal=False, rank_floor=floor)
    grad_pen(gm, 0, 0).backward()
    for n, layer in fxtucker.gates(gm).items():
        for role, g in layer.items():
            assert bool((g.grad[kept[n][role]] == 0).all()) and bool((g.grad[~kept[n][role]] != 0).all())


def test_floor_for_budget_is_the_largest_floor_that_fits():
    gm, _, _ = _gated_toy()  # conv: Tucker-2, ranks (16, 24)
    _random_gates(gm, seed=0, low=0.01)
    least = predict_macs(gm, 10.0, rank_floor=0.25)  # 4 of 16 and 6 of 24 kept
    assert budget.floor_for_budget(gm, least) == 0.25  # the next step up, 7 / 24, keeps 5 of 16 and 7 of 24
    assert budget.floor_for_budget(gm, least - 1) == 5 / 24  # 4 of 16 and 5 of 24
    three = predict_macs(gm, 10.0, rank_floor=3 / 16)  # 3 of 16 and 5 of 24: a step of the 16-wide mode only
    assert budget.floor_for_budget(gm, three) == 3 / 16 and budget.floor_for_budget(gm, three - 1) == 4 / 24  # 3 and 4
    assert budget.floor_for_budget(gm, 1) == 0.0  # not even one component per mode fits
    assert budget.floor_for_budget(gm, predict_macs(gm, 0.0)) == 23 / 24  # everything fits: the largest share < 1
    with pytest.raises(ValueError, match=r"floor_for_budget: macs must be a finite number > 0, got nan"):
        budget.floor_for_budget(gm, float("nan"))
    with pytest.raises(ValueError, match=r"floor_for_budget found no gates: run insert_gates\(gm\) first"):
        budget.floor_for_budget(fxtucker.trace(nn.Conv2d(3, 4, 3)), 100)


def test_rank_floor_gates_keep_their_ratios_under_the_relative_proximal_step():
    # Three layers (a Tucker-2 conv, a grouped one, an SVD pair): the masks line up with every gate
    # vector, and the default penalty (relative, MAC-weighted) shrinks only the gates outside the
    # floor; restoring each vector's mean scales the floor's gates all by the same factor.
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=2), nn.ReLU(), nn.Conv2d(16, 12, 1))
    x = torch.randn(1, 8, 10, 10)
    gm = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    _random_gates(gm, seed=1, low=0.05)
    floor = 0.3
    before = {n: {role: g.detach().clone() for role, g in layer.items()} for n, layer in fxtucker.gates(gm).items()}
    kept = {n: floor_masks(gm.get_submodule(n), floor) for n in before}
    assert len(kept) == 3 and all(m.any() and not m.all() for k in kept.values() for m in k.values())
    pen = budget.GatePenalty(gm, "funnel", 2.0, lambda e: 0.5, rank_floor=floor)
    pen.after_step(gm, 0, 0, lr=0.1)
    for n, layer in fxtucker.gates(gm).items():
        for role, g in layer.items():
            ratio = g.detach().abs() / before[n][role].abs()
            r_kept, r_pulled = ratio[kept[n][role]], ratio[~kept[n][role]]
            assert torch.allclose(r_kept, r_kept[0].expand_as(r_kept)) and r_kept[0] >= 1
            assert bool((r_pulled < r_kept[0]).all())


def test_c_per_step_indexes_the_schedule_by_optimizer_step():
    gm, _, _ = _gated_toy()
    gs = [g for layer in fxtucker.gates(gm).values() for g in layer.values()]
    schedule = lambda i: 1.0 / (i + 1)  # noqa: E731
    by_epoch = budget.GatePenalty(gm, "funnel", 0.5, schedule, relative=False, proximal=False, mac_weighted=False)
    by_step = budget.GatePenalty(gm, "funnel", 0.5, schedule, relative=False, proximal=False, mac_weighted=False,
                                 c_per_step=True)
    funnel = lambda c: 0.5 * sum((g.abs() / (g.abs() + c)).sum() for g in gs)  # noqa: E731
    assert torch.allclose(by_epoch(gm, 1, 7), funnel(0.5)) and torch.allclose(by_step(gm, 1, 7), funnel(1 / 8))
    assert (by_epoch.c(1, 7), by_step.c(1, 7), by_step.c(1)) == (0.5, 1 / 8, 0.5)


def test_c_per_step_ends_where_the_zeros_meet_the_budget():
    # linear: two epochs of step 3 at 10 steps each, the zeros meeting the budget at the end of the first
    cfg = CompressConfig(reg_epochs=2, c_start=1.0, c_end=0.01, c_per_step=True, target_speedup=2.0)
    c = cfg.c_schedule_fn(10)
    assert (c(0), c(5), c(10), c(19)) == (1.0, pytest.approx(0.505), 0.01, 0.01)
    assert CompressConfig(reg_epochs=2).c_schedule_fn()(0) == 1.0  # by epoch: the start value all through epoch 0
    assert CompressConfig(reg_epochs=4, c_per_step=True, target_speedup=2.0, reach=2.0).c_schedule_fn(10).total == 20
    assert CompressConfig(reg_epochs=4, c_per_step=True).c_schedule_fn(10).total == 30  # no budget: all but the last
    exp = CompressConfig(c_schedule="exp", c_factor=0.5, c_every=2, c_per_step=True).c_schedule_fn(10)
    assert (exp(19), exp(20)) == (1.0, 0.5)
    with pytest.raises(ValueError, match=r"c_per_step needs the steps of an epoch of step 3 \(training data with a "
                                         r"len\(\)\), got None"):
        CompressConfig(c_per_step=True).c_schedule_fn()
    with pytest.raises(ValueError, match="CompressConfig.c_per_step must be true or false"):
        CompressConfig(c_per_step=1)


def test_compress_with_c_per_step_narrows_the_funnel_within_step_3(monkeypatch):
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=2, finetune_epochs=0, target_speedup=1.5, c_end=0.01)
    seen = {}
    for per_step in (False, True):
        calls = []
        original_c = budget.GatePenalty.c

        def spy(self, epoch, step=None):
            value = original_c(self, epoch, step)
            calls.append((epoch, step, value))
            return value

        monkeypatch.setattr(budget.GatePenalty, "c", spy)
        result = compress(model, train, x, config=dataclasses.replace(config, c_per_step=per_step), progress=False)
        monkeypatch.undo()
        seen[per_step] = calls
        assert result.report["macs_after"] <= result.report["macs_before"] / 1.5
    first_epoch = lambda calls: {v for e, s, v in calls if e == 0}  # noqa: E731
    assert first_epoch(seen[False]) == {1.0}  # by epoch: c at its start through the epoch the budget is met in
    steps = len(train)
    assert len(first_epoch(seen[True])) == steps and min(first_epoch(seen[True])) < 0.05
    assert {v for e, s, v in seen[True] if e == 1} == {0.01}


def test_scale_free_moves_every_gate_vector_at_one_rate_in_its_own_units():
    def relative_after_a_step(scale_free, k):
        gm, _, _ = _gated_toy()
        _random_gates(gm, 3, low=0.05)
        layer = next(iter(fxtucker.gates(gm).values()))
        with torch.no_grad():
            layer["gate_in"].mul_(k)  # the same relative gates, k times the scale
        pen = budget.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1, mac_weighted=False, scale_free=scale_free)
        pen.after_step(gm, 0, 0, lr=0.01)
        g = layer["gate_in"].detach().abs()
        return g / g.mean()

    # without it a vector 3x as large moves (3^2 =) 9x slower in units of its mean; with it, as fast
    assert torch.allclose(relative_after_a_step(True, 3.0), relative_after_a_step(True, 1.0), atol=1e-6)
    assert not torch.allclose(relative_after_a_step(False, 3.0), relative_after_a_step(False, 1.0), atol=1e-4)
    # the gradient hook: each gate's gradient times its vector's mean squared, until remove_hooks
    gm, _, _ = _gated_toy()
    pen = budget.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1, scale_free=True)
    g = next(iter(fxtucker.gates(gm).values()))["gate_in"]
    (g * torch.arange(g.numel()).view_as(g)).sum().backward()
    assert torch.allclose(g.grad, torch.arange(g.numel()).view_as(g) * g.detach().abs().mean() ** 2)
    pen.remove_hooks()
    g.grad = None
    (g * 1.0).sum().backward()
    assert torch.equal(g.grad, torch.ones_like(g))
    with pytest.raises(ValueError, match="scale_free needs relative gates"):
        budget.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1, relative=False, scale_free=True)
    with pytest.raises(ValueError, match="scale_free_gates needs relative_gates=True"):
        CompressConfig(scale_free_gates=True, relative_gates=False)


def _record_penalties(monkeypatch) -> list:
    """Every GatePenalty made from now on (compress makes one per run), in order."""
    made = []
    original_init = budget.GatePenalty.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(budget.GatePenalty, "__init__", spy)
    return made


def test_compress_with_scale_free_gates_takes_its_hooks_off_after_step_3(monkeypatch):
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, target_speedup=1.5)
    made = _record_penalties(monkeypatch)
    result = compress(model, train, x, config=dataclasses.replace(config, scale_free_gates=True), progress=False)
    (pen,) = made
    assert pen.scale_free and pen._hooks == [] and all(not g._backward_hooks for g in pen.gate_list)
    assert result.report["macs_after"] <= result.report["macs_before"] / 1.5


def _tucker_and_pair():
    """A Tucker-2 layer (3x3: gate_in, gate_core, gate_out) and an SVD pair (1x1: gate_in, gate_out)."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 12, 1))
    gm = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), torch.randn(1, 8, 10, 10))
    _random_gates(gm, 5, low=0.05)
    return gm


@pytest.mark.parametrize("mac_weighted", [False, True])
def test_per_component_pulls_each_component_once(mac_weighted):
    # By default every gate pays the full penalty, so an output-mode component (gate_core and
    # gate_out) and an SVD pair's component (gate_in and gate_out) pay twice what an input-mode one
    # does; per_component halves each of their gates' share, MAC weights or not.
    roles = [(layer, role) for layer, rs in fxtucker.gates(_tucker_and_pair()).items() for role in rs]
    assert roles == [("0", "gate_in"), ("0", "gate_core"), ("0", "gate_out"), ("2", "gate_in"), ("2", "gate_out")]
    kw = dict(mac_weighted=mac_weighted, relative=False)
    full = budget.GatePenalty(_tucker_and_pair(), "funnel", 0.5, lambda e: 0.1, **kw)
    once = budget.GatePenalty(_tucker_and_pair(), "funnel", 0.5, lambda e: 0.1, per_component=True, **kw)
    assert once.scales == pytest.approx([k * s for k, s in zip(full.scales, [1.0, 0.5, 0.5, 0.5, 0.5])], rel=1e-12)
    # The logged value and the proximal step's shrink follow the scales: at one gate values and
    # lambda, a two-gate component's gates move half as far, gate_in of the Tucker layer as far.
    gm_full, gm_once = full.gated, once.gated
    per_vector = [full._value(g, 0.1).item() * k for g, k in zip(full.gate_list, full.scales)]
    expected = 0.5 * sum(v * s for v, s in zip(per_vector, [1.0, 0.5, 0.5, 0.5, 0.5]))
    assert once(gm_once, 0, 0).item() == pytest.approx(expected, rel=1e-6)
    before = [g.detach().clone() for g in full.gate_list]
    full.after_step(gm_full, 0, 0, lr=0.01)
    once.after_step(gm_once, 0, 0, lr=0.01)
    for b, gf, go, share in zip(before, full.gate_list, once.gate_list, [1.0, 0.5, 0.5, 0.5, 0.5]):
        moved_full, moved_once = (b - gf.detach()).abs(), (b - go.detach()).abs()
        assert (moved_full > 0).all()
        assert torch.allclose(moved_once, share * moved_full, rtol=1e-4, atol=2e-7)  # float32 differences of ~0.5


def test_per_component_under_live_mac_weights_and_from_compress(monkeypatch):
    gm = _tucker_and_pair()
    live = budget.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1, live_macs=True, per_component=True)
    plain = budget.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1, live_macs=True)
    assert live.scales == pytest.approx([k * s for k, s in zip(plain.scales, [1.0, 0.5, 0.5, 0.5, 0.5])])
    live._update_scales()  # the live weights are recomputed every `every` steps: the shares stay
    assert live.scales == pytest.approx([k * s for k, s in zip(plain.scales, [1.0, 0.5, 0.5, 0.5, 0.5])])
    # compress passes CompressConfig.penalty_per_component through (off by default)
    made = _record_penalties(monkeypatch)
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, target_speedup=1.5)
    assert config.penalty_per_component is False
    result = compress(model, train, x, config=dataclasses.replace(config, penalty_per_component=True), progress=False)
    (pen,) = made
    assert pen.shares == budget._gate_shares(pen.gated) and 0.5 in pen.shares
    assert result.report["macs_after"] <= result.report["macs_before"] / 1.5
    with pytest.raises(ValueError, match="CompressConfig.penalty_per_component must be true or false"):
        CompressConfig(penalty_per_component=1)
