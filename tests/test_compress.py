"""compress(): the four-step flow end to end, rank recovery, MAC budgets, configs and errors."""

import importlib
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fxtucker
from fxtucker import regularizers, tucker
from fxtucker.compress import CompressConfig, compress, threshold_for_budget
from fxtucker.passes import cost_model, decompose_conv, insert_gates, predict_macs


@pytest.fixture
def one_thread():
    # Bitwise-reproducible training needs a fixed summation order.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.fc = nn.Linear(24 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _toy_problem(seed=0):
    """A conv of Tucker rank (4, 6) and data labelled by the model itself."""
    torch.manual_seed(seed)
    model = Toy()
    core = torch.randn(6, 4, 3, 3)
    u_out, u_in = torch.linalg.qr(torch.randn(24, 6))[0], torch.linalg.qr(torch.randn(16, 4))[0]
    with torch.no_grad():
        model.conv.weight.copy_(0.5 * tucker.reconstruct_tucker2(core, u_out, u_in))
        x = torch.randn(2048, 16, 4, 4)
        y = model(x).argmax(1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=256)
    return model, train, test, x[:1]


def test_funnel_flow_recovers_a_known_tucker_rank(one_thread):
    model, train, test, x = _toy_problem()
    config = CompressConfig(train_epochs=0, reg_epochs=12, finetune_epochs=0, reg_weight=0.05, reg_lr=0.01,
                            weight_decay=0.0, c_start=1.0, c_end=0.01, threshold=0.01)
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    (layer,) = [l for l in result.report["layers"] if l["name"] == "conv"]
    assert layer["ranks"] == [4, 6] and layer["decision"] == "decomposed"
    assert result.report["accuracy_after"] > 0.95


def test_svd_method_recovers_the_matrix_rank(one_thread):
    # The toy kernel's output mode has rank 6, so its (24, 16*3*3) reshaping has matrix rank 6.
    model, train, test, x = _toy_problem()
    config = CompressConfig(method="svd", train_epochs=0, reg_epochs=12, finetune_epochs=0, reg_weight=0.05,
                            reg_lr=0.01, weight_decay=0.0, c_start=1.0, c_end=0.01, threshold=0.01)
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    (layer,) = [l for l in result.report["layers"] if l["name"] == "conv"]
    assert layer["kind"] == "svd" and layer["ranks"] == [6] and layer["decision"] == "decomposed"
    assert result.report["accuracy_after"] > 0.95


def test_compress_end_to_end_report_history_and_files(one_thread, tmp_path):
    model, train, test, x = _toy_problem(1)
    config = CompressConfig(train_epochs=1, reg_epochs=2, finetune_epochs=1, reg_weight=0.05, target_speedup=2.0)
    result = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path, progress=False)
    rep = result.report
    for key in ("macs_before", "macs_after", "params_before", "params_after", "accuracy_before", "accuracy_after",
                "layers", "stages", "threshold"):
        assert key in rep
    assert rep["macs_after"] == fxtucker.count_macs(result.model, x) < rep["macs_before"] == fxtucker.count_macs(model, x)
    assert list(rep["stages"]) == ["decomposed", "trained", "regularized", "pruned", "finetuned"]
    assert [(h["stage"], h["epoch"]) for h in result.history] == [("decomposed", 0), ("regularize", 0), ("regularize", 1), ("finetune", 0)]
    assert all("macs_if_stripped" in h for h in result.history if h["stage"] == "regularize")
    assert {p.name for p in tmp_path.iterdir()} >= {"decomposed.jsonl", "regularize.jsonl", "finetune.jsonl",
                                                    "decomposed.ckpt", "regularize.ckpt", "finetune.ckpt"}
    standard = {m.__class__.__module__.split(".")[0] for m in result.model.modules() if m is not result.model}
    assert standard == {"torch"}
    assert rep["accuracy_after"] == fxtucker.train.evaluate(result.model, test)
    # the input model is untouched
    assert isinstance(model.conv, nn.Conv2d)
    # resuming a finished run trains nothing and gives the same model
    again = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(again.model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_mac_budget_is_met_with_the_smallest_threshold(one_thread, speedup):
    model, train, test, x = _toy_problem(2)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, reg_weight=0.01, target_speedup=speedup)
    result = compress(model, train, x, config=config, progress=False)
    target = int(result.report["macs_before"] / speedup)
    assert result.report["target_macs"] == target
    assert result.report["macs_after"] <= target


def test_threshold_for_budget_is_the_smallest_that_fits():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(1, 8, 12, 12)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for g in layer.values():
                g.copy_(torch.rand(g.shape))
    full = predict_macs(gated, 0.0)
    for target in (full, int(full * 0.6), int(full * 0.3)):
        th = threshold_for_budget(gated, target)
        assert predict_macs(gated, th) <= target
        if th > 0:  # any smaller threshold keeps one more component and breaks the budget
            assert predict_macs(gated, math.nextafter(th, 0)) > target
    with pytest.raises(ValueError, match=r"the MAC budget 10 cannot be met: pruning every gate still leaves"):
        threshold_for_budget(gated, 10)


def test_config_from_toml_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[compress]\nreg = 'l1'\nreg_weight = 0.001\nreg_epochs = 3\nc_schedule = 'exp'\nc_factor = 0.5\nc_every = 1\n")
    cfg = CompressConfig.from_toml(path)
    assert (cfg.reg, cfg.reg_weight, cfg.reg_epochs, cfg.c_schedule_fn()(2)) == ("l1", 0.001, 3, 0.25)
    path.write_text("lamda = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lamda'\]; valid keys: \["):
        CompressConfig.from_toml(path)
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.toml' does not exist"):
        CompressConfig.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match=r"reg 'l3' is not known; valid: \['funnel', 'funnel_scaled', 'l1', 'l2'\]"):
        CompressConfig(reg="l3")
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0"):
        CompressConfig(threshold=-1.0)
    with pytest.raises(ValueError, match=r"give CompressConfig.target_macs or target_speedup, not both"):
        CompressConfig(target_macs=10, target_speedup=2.0)
    with pytest.raises(ValueError, match=r"target_speedup must be a number >= 1"):
        CompressConfig(target_speedup=0.5)
    with pytest.raises(ValueError, match=r"reg_epochs must be >= 1"):
        CompressConfig(reg_epochs=0)
    with pytest.raises(ValueError, match=r"CompressConfig.method must be one of \['tucker2', 'svd'\].*got 'cp'"):
        CompressConfig(method="cp")
    model, train, _, x = _toy_problem()
    with pytest.raises(ValueError, match=r"resume=True needs out_dir"):
        compress(model, train, x, resume=True)
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of tensors"):
        compress(model, train, [1, 2])


def test_killed_run_resumes_to_the_same_result(one_thread, tmp_path, monkeypatch):
    model, train, test, x = _toy_problem(4)
    config = CompressConfig(train_epochs=1, reg_epochs=3, finetune_epochs=1, reg_weight=0.05, target_speedup=2.0)
    straight = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path / "a", progress=False)

    flow = importlib.import_module("fxtucker.compress")  # fxtucker.compress is the function

    real = flow._gate_stats

    def dies_after_first_regularized_epoch(*args):
        stats, calls = real(*args), []

        def wrapped(model):
            calls.append(1)
            if len(calls) == 2:  # end of epoch 1, before its checkpoint: epoch 0's is on disk
                raise KeyboardInterrupt
            return stats(model)
        return wrapped

    monkeypatch.setattr(flow, "_gate_stats", dies_after_first_regularized_epoch)
    with pytest.raises(KeyboardInterrupt):
        compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(flow, "_gate_stats", real)
    assert len((tmp_path / "b" / "regularize.jsonl").read_text().splitlines()) == 1
    resumed = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path / "b", resume=True,
                       progress=False)
    assert resumed.report["macs_after"] == straight.report["macs_after"]
    assert resumed.report["threshold"] == straight.report["threshold"]
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    # lambda was steered in epoch 0, so the resumed run only matches because its value was restored
    reg = [r for r in straight.history if r["stage"] == "regularize"]
    assert reg[0]["reg_weight"] != config.reg_weight


def _gated_toy():
    model, train, test, x = _toy_problem()
    gm = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    return gm, train, x


@pytest.mark.parametrize("ahead", [False, True])
def test_gate_penalty_steers_lambda_along_the_mac_path(ahead):
    # The zeroed gates' MACs should run from the full model to the budget by epoch 2 of 3. With no
    # gate at 0 a quarter of the way there, they are behind: lambda goes up (by at most
    # MAX_CHANGE). With the budget met by zeros already, they are ahead: lambda goes down.
    flow = importlib.import_module("fxtucker.compress")
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
    pen = flow.GatePenalty(gm, "funnel", 0.1, lambda e: 1.0, target_macs=target, threshold=0.01, epochs=3, every=1,
                           steps_per_epoch=2, reach=2.0)
    assert pen.zeros_macs == (target if ahead else full)
    assert pen.path(0, 1) == full - (full - target) / 4
    pen(gm, 0, 0)  # step 0: no steering yet
    assert pen.weight == 0.1
    pen(gm, 0, 1)
    assert (pen.weight < 0.1) == ahead and pen.weight != 0.1
    assert 0.1 / pen.MAX_CHANGE <= pen.weight <= 0.1 * pen.MAX_CHANGE


def test_gate_penalty_value_gradient_and_state():
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    gs = [g for layer in fxtucker.gates(gm).values() for g in layer.values()]
    pen = flow.GatePenalty(gm, "funnel", 0.5, lambda e: 0.1 * (e + 1), relative=False, proximal=False,
                           mac_weighted=False)
    value = pen(gm, 1, 7)  # no budget: lambda stays, c comes from the schedule at epoch 1
    expected = 0.5 * sum((g.abs() / (g.abs() + 0.2)).sum() for g in gs)
    assert torch.allclose(value, expected)
    value.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gs)
    assert pen.weight == 0.5
    other = flow.GatePenalty(gm, "funnel", 1.0, lambda e: 1.0)
    other.load_state_dict(pen.state_dict())
    assert other.weight == 0.5


def test_steering_can_be_switched_off(one_thread):
    model, train, test, x = _toy_problem()
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, reg_weight=0.01, target_speedup=1.5,
                            steer=False)
    result = compress(model, train, x, config=config, progress=False)
    assert [r["reg_weight"] for r in result.history if r["stage"] == "regularize"] == [0.01]
    with pytest.raises(ValueError, match=r"steer_every must be an integer >= 1"):
        CompressConfig(steer_every=0)


def test_relative_penalty_ignores_the_scale_of_a_gate_vector():
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    pen = flow.GatePenalty(gm, "funnel", 1.0, lambda e: 0.1, proximal=False)
    before = pen(gm, 0, 0)
    with torch.no_grad():
        for layer in fxtucker.gates(gm).values():
            layer["gate_in"].mul_(7.0)
    assert torch.allclose(pen(gm, 0, 0), before)


def test_proximal_step_stops_at_zero_and_shrinks_by_lr_times_slope():
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    g = fxtucker.gates(gm)["conv"]["gate_in"]
    with torch.no_grad():
        g.copy_(torch.linspace(-1.0, 1.0, g.numel()))
    before = g.detach().clone()
    pen = flow.GatePenalty(gm, "l1", 0.5, lambda e: 1.0, relative=False, proximal=True, mac_weighted=False)
    value = pen(gm, 0, 0)
    assert not value.requires_grad  # the penalty acts through after_step only
    with torch.no_grad():
        pen.after_step(gm, 0, 0, lr=0.4)  # l1's slope is 1: shrink every gate by 0.2, stop at 0
    expected = before.sign() * (before.abs() - 0.2).clamp_min(0)
    assert torch.allclose(g.detach(), expected)
    assert (g.detach() == 0).sum() == (before.abs() <= 0.2).sum() > 0


def test_mac_weights_are_the_macs_per_component_and_average_to_one():
    flow = importlib.import_module("fxtucker.compress")
    gm, _, x = _gated_toy()
    costs = flow.component_macs(gm)["conv"]
    roles = {n.meta["fxtucker"].role: n for n in gm.graph.nodes if "fxtucker" in n.meta}
    macs = {r: roles[r].meta["macs"] for r in ("first", "core", "last")}
    assert costs["gate_in"] * 16 == pytest.approx(macs["first"] + macs["core"])
    assert costs["gate_core"] * 24 == costs["gate_out"] * 24 == pytest.approx(macs["core"] + macs["last"])
    pen = flow.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, relative=False, proximal=False)
    sizes = [g.numel() for layer in fxtucker.gates(gm).values() for g in layer.values()]
    assert sum(k * n for k, n in zip(pen.scales, sizes)) / sum(sizes) == pytest.approx(1.0)
    assert pen.scales[0] != pen.scales[1]  # input and output components cost differently here


def test_proximal_steps_never_zero_gates_past_the_budget():
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    full = predict_macs(gm, 0.0)
    tiny = math.nextafter(0.0, 1.0)
    target = predict_macs(gm, 0.01, relative=True)  # what the rank-(4, 6) structure leaves
    pen = flow.GatePenalty(gm, "l1", 50.0, lambda e: 1.0, target_macs=target, epochs=2, proximal=True)
    for step in range(20):  # a huge lambda: unchecked, it would zero every gate at once
        pen.after_step(gm, 0, step, lr=0.1)
        assert predict_macs(gm, tiny, relative=True) >= target
    assert predict_macs(gm, 0.0) == full  # threshold 0 keeps everything, zeros too
    unbounded = flow.GatePenalty(gm, "l1", 50.0, lambda e: 1.0, proximal=True)
    unbounded.after_step(gm, 0, 0, lr=0.1)
    assert predict_macs(gm, tiny, relative=True) < target


def test_an_impossible_budget_fails_before_any_training(monkeypatch):
    flow = importlib.import_module("fxtucker.compress")
    model, train, _, x = _toy_problem()
    monkeypatch.setattr(flow, "train", lambda *a, **k: pytest.fail("trained before checking the budget"))
    with pytest.raises(ValueError, match=r"the MAC budget 10 cannot be met"):
        compress(model, train, x, config=CompressConfig(target_macs=10), progress=False)


def test_relative_proximal_step_keeps_each_vector_mean_and_zeroes_the_small_gates():
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    g = fxtucker.gates(gm)["conv"]["gate_in"]
    with torch.no_grad():
        g.copy_(torch.linspace(0.05, 2.0, g.numel()))
    mean = g.detach().abs().mean()
    pen = flow.GatePenalty(gm, "l1", 1.0, lambda e: 1.0, relative=True, proximal=True, mac_weighted=False)
    pen.after_step(gm, 0, 0, lr=0.2)
    assert torch.allclose(g.detach().abs().mean(), mean)
    assert (g.detach() == 0).any() and (g.detach() > 0).any()
    assert torch.all(g.detach()[1:] >= g.detach()[:-1])  # the order of the gates is kept


def test_gates_the_optimizer_moved_off_zero_are_zeroed_again_at_the_budget():
    # Regression: the budget guard took every gate that the optimizer step had moved off 0 for a
    # new zero, and once the zeros were at the budget it gave them all their values back.
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    tiny = math.nextafter(0.0, 1.0)
    target = predict_macs(gm, 0.5, relative=True)
    pen = flow.GatePenalty(gm, "l1", 50.0, lambda e: 1.0, target_macs=target, epochs=2, proximal=True)
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
    flow = importlib.import_module("fxtucker.compress")
    gm, _, _ = _gated_toy()
    target = predict_macs(gm, 0.5, relative=True)
    schedule = regularizers.c_schedule("linear", c_start=1.0, c_end=0.01, total=2)
    pen = flow.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target, c_follows_budget=True)
    assert pen.c(0) == max(pen.budget_threshold(), 0.01) != schedule(0)
    plain = flow.GatePenalty(gm, "funnel", 1.0, schedule, target_macs=target)
    assert plain.c(1) == schedule(1)
    assert CompressConfig(c_follows_budget=True).c_follows_budget


def test_auto_reg_weight_is_calibrated_from_the_learning_rate_and_the_steps():
    flow = importlib.import_module("fxtucker.compress")
    config = CompressConfig(reg_epochs=2, reg_lr=0.01)
    assert config.reg_weight == "auto"
    lam = flow.auto_reg_weight(config, 100)
    assert lam * (0.01 / 2) * 100 * 2 == pytest.approx(flow.AUTO_SHRINK)  # cosine: the mean lr is half
    assert flow.auto_reg_weight(config, 400) == pytest.approx(lam / 4)  # 4x the steps: a quarter of lambda
    constant = CompressConfig(reg_epochs=2, reg_lr=0.01, schedule="constant")
    assert flow.auto_reg_weight(constant, 100) == pytest.approx(lam / 2)
    assert flow.auto_reg_weight(CompressConfig(reg_weight=0.3), None) == 0.3
    with pytest.raises(ValueError, match=r"reg_weight='auto' needs train_data with a len\(\)"):
        flow.auto_reg_weight(config, None)
    with pytest.raises(ValueError, match=r"reg_weight \(lambda\) must be 'auto' or a finite number >= 0, got 'big'"):
        CompressConfig(reg_weight="big")


def test_a_plain_threshold_prunes_with_the_defaults(one_thread):
    # The paper's own mode: no budget, a threshold. With the default lambda (calibrated to the
    # steps of step 3), the funnel pulls part of the gates of a full-rank conv to 0 and the
    # threshold removes them; with lambda 0 nothing is removed.
    torch.manual_seed(0)
    model = Toy()  # random weights: full Tucker rank, no gate starts at 0
    with torch.no_grad():
        x = torch.randn(1024, 16, 4, 4)
        y = model(x).argmax(1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    macs = {}
    for lam in ("auto", 0.0):
        config = CompressConfig(train_epochs=0, reg_epochs=2, finetune_epochs=0, reg_weight=lam)
        result = compress(model, train, x[:1], config=config, progress=False)
        macs[lam] = result.report["macs_after"]
        zeros = result.report["stages"]["regularized"]["gate_histogram"]["zeros"]
        assert (zeros > 0) == (lam == "auto")
    assert macs[0.0] == result.report["macs_before"] > macs["auto"]
