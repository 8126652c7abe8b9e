"""The benchmark runner's quick profile: rows written at once, a rerun skips them, the plot draws."""

import importlib.util
import json
import shutil
import os
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import fxtucker
from fxtucker import data

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def compare(tmp_path, monkeypatch):
    try:
        data.get_dataset("fashion-mnist", False)
    except (FileNotFoundError, RuntimeError) as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    module = _load("compare")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "CACHE", tmp_path / "cache")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(old)


def test_quick_baselines_write_rows_and_a_rerun_skips_them(compare, tmp_path, capsys):
    compare.main(["--exp", "baselines", "--profile", "quick", "--no-progress", "--methods", "uncompressed", "uniform"])
    rows = json.loads((tmp_path / "results" / "baselines.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"uncompressed", "uniform"}  # --methods: only those runs
    compare.main(["--exp", "baselines", "--profile", "quick", "--no-progress"])  # the rest, into the same file
    rows = json.loads((tmp_path / "results" / "baselines.json").read_text())["rows"]
    final = {r["method"]: r for r in rows if r["stage"] == "final"}
    assert {"uncompressed", "funnel", "vbmf", "musco", "uniform"} <= set(final)
    base = final["uncompressed"]["macs"]
    for method in ("funnel", "musco", "uniform"):  # matched to half the MACs
        assert final[method]["macs"] <= base // 2 and final[method]["target_macs"] == base // 2
    assert final["vbmf"]["target_macs"] is None and final["uncompressed"]["target_macs"] is None  # EVBMF's own ranks
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["params"] > 0 and r["latency_ms"] > 0
        assert {"method", "dataset", "model", "setting", "seed", "stage", "wall_s"} <= set(r)
    funnel = final["funnel"]
    assert 0.0 <= funnel["pruning_ratio"] <= 1.0 and funnel["gate_histogram"]["total"] > 0
    assert funnel["rank_floor"] == 0.0  # no floor asked for: the report's resolved floor
    summary = compare.summary("baselines").splitlines()
    (line,) = [l for l in summary if "| funnel |" in l]
    drop = final["uncompressed"]["accuracy"] - funnel["accuracy"]
    assert f"| {100 * funnel['accuracy']:.2f} | {100 * drop:.2f} |" in line  # one seed: no std
    cut = funnel["val_regularized"] - funnel["val_pruned"]  # the cut alone: regularized against pruned
    recal = final["uncompressed"]["val_accuracy"] - funnel["val_recalibrated"]  # BatchNorm re-estimated after it
    assert line.endswith(f"| {100 * cut:.2f} | {100 * recal:.2f} (1) | "
                         f"{final['uncompressed']['macs'] / funnel['macs']:.2f}x |")
    (line,) = [l for l in summary if "| uniform |" in l]
    assert "| - |" in line  # no regularized stage, no cut of its own
    assert 0 <= final["uniform"]["val_recalibrated"] <= 1  # measured on a copy: the same for every method
    capsys.readouterr()
    compare.main(["--exp", "baselines", "--profile", "quick", "--no-progress"])  # nothing left to run
    assert "[baselines]" not in capsys.readouterr().out
    assert json.loads((tmp_path / "results" / "baselines.json").read_text())["rows"] == rows
    pytest.importorskip("matplotlib")
    compare.main(["--plot"])
    assert (tmp_path / "results" / "pareto.png").stat().st_size > 0


def test_thresholds_cut_the_regularizers_run_s_model_each_under_its_own_configuration(compare, tmp_path):
    compare.main(["--exp", "regularizers", "--profile", "quick", "--no-progress", "--methods", "uncompressed", "funnel"])
    settings = [f"lambda=10.0 threshold={t} no-ft" for t in (0.01, 0.05)]
    compare.main(["--exp", "thresholds", "--profile", "quick", "--no-progress", "--settings", *settings])
    rows = [r for r in json.loads((tmp_path / "results" / "thresholds.json").read_text())["rows"]
            if r["method"] == "funnel"]
    assert sorted(r["setting"] for r in rows) == settings
    seed = tmp_path / "cache" / "quick" / "resnet20-fashion-mnist-s0"
    shared = seed / "regularizers-funnel-lambda=10.0_th=0.01_no-ft"
    for t in (0.01, 0.05):
        own = seed / f"thresholds-funnel-lambda=10.0_threshold={t}_no-ft"
        # step 3 copied, not trained again (a second training would log other timings)
        for name in ("regularize.ckpt", "regularize.jsonl"):
            assert (own / name).read_bytes() == (shared / name).read_bytes()
        assert json.loads((own / "compress.json").read_text())["config"]["threshold"] == t
    assert json.loads((shared / "compress.json").read_text())["config"]["threshold"] == 0.01


def test_the_plot_leaves_out_rows_without_a_test_accuracy(compare, tmp_path):
    pytest.importorskip("matplotlib")
    row = dict(model="resnet20", profile="quick", device="cpu", method="funnel", setting="2x", seed=0, stage="final",
               macs=1_000_000, accuracy=0.9)
    compare.RESULTS.mkdir(parents=True)
    (compare.RESULTS / "quality.json").write_text(json.dumps({"rows": [row]}))
    (compare.RESULTS / "tuning.json").write_text(json.dumps({"rows": [dict(row, accuracy=None, val_accuracy=0.9)]}))
    assert compare.plot() == tmp_path / "results" / "pareto.png" and compare.plot().stat().st_size > 0


def test_every_method_has_its_own_plot_style(compare):
    styles = [tuple(sorted(s.items())) for s in compare.PLOT_STYLES]
    assert len(styles) == len(compare.METHODS) == len(set(styles))


def test_unknown_method_is_refused(compare, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--exp", "baselines", "--profile", "quick", "--methods", "svd-magic"])
    err = capsys.readouterr().err
    assert "svd-magic" in err and "torch-pruning" in err


def test_a_setting_no_run_has_is_refused_and_a_method_that_runs_nothing_is_named(compare, capsys):
    # A typo'd setting would run nothing: refused before any baseline trains (nothing written).
    with pytest.raises(SystemExit):
        compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--settings", "3x kd 3 epoch",
                      "--methods", "uniform"])
    assert ("no run of quality (resnet20) has the setting(s) ['3x kd 3 epoch']; its settings include '2x'"
            in capsys.readouterr().err)
    assert not (compare.RESULTS / "quality.json").exists()
    # A method with no run under the settings given runs nothing, and says so; the others run.
    why, warnings = compare._selection_problems(["quality"], "cpu", ["resnet20"], ["uncompressed", "uniform", "l1"],
                                                ["3x kd 3 epochs"])
    assert why is None and warnings == [
        "the method 'uncompressed' has no run under --settings ['3x kd 3 epochs'] in quality (resnet20): nothing "
        "runs for it (its settings: 'baseline')",
        "quality (resnet20) plans no run of the method 'l1': nothing runs for it"]
    assert compare._selection_problems(["quality", "tuning"], "cpu", ["resnet20", "mobilenet_v2_cifar"],
                                       ["uncompressed", "uniform"], ["baseline", "3x kd 3 epochs"]) == (None, [])
    # the pool's jobs read the same plan, tuning's included (its plan names the model)
    args = types.SimpleNamespace(exp=["tuning"], profile="cpu", dataset="fashion-mnist", device="cpu", threads=1,
                                 retrain_baseline=False, cache_teacher=False, heldout=False, models=["resnet20"],
                                 seeds=[0], settings=["3x kd 3 epochs reg-lr floor 0.4 reach 0.5"], methods=["funnel"])
    (job,) = compare.pool_jobs(args)
    assert job[-4:] == ["--settings", "3x kd 3 epochs reg-lr floor 0.4 reach 0.5", "--methods", "funnel"]
    assert "--heldout" not in job and "--cache-teacher" not in job
    args.heldout = args.cache_teacher = True  # a pool's runners measure as the command asked
    (job,) = compare.pool_jobs(args)
    assert "--heldout" in job and "--cache-teacher" in job


def test_split_gives_disjoint_training_and_validation_indices(compare):
    train, val = compare.split(100, 60, 20, seed=3)
    assert len(train) == 60 and len(val) == 20 and not set(train) & set(val)
    assert (train, val) == compare.split(100, 60, 20, seed=3) != compare.split(100, 60, 20, seed=4)
    everything, _ = compare.split(100, None, 20, seed=3)
    assert len(everything) == 80 and not set(everything) & set(val)
    with pytest.raises(ValueError, match=r"train_subset 90 \+ val_subset 20 > 100"):
        compare.split(100, 90, 20, seed=0)


def test_heldout_images_are_the_ones_a_seed_neither_trains_nor_validates_on(compare):
    train, val = compare.split(100, 60, 20, seed=3)
    held = compare.heldout_split(100, 60, 20, seed=3)
    assert len(held) == 20 and not set(held) & (set(train) | set(val))
    assert sorted(train + val + held) == list(range(100))
    assert held == compare.heldout_split(100, 60, 20, seed=3) != compare.heldout_split(100, 60, 20, seed=4)
    assert compare.heldout_split(100, None, 20, seed=3) == []  # all but the validation split train: none held out
    with pytest.raises(ValueError, match=r"train_subset 90 \+ val_subset 20 > 100"):
        compare.heldout_split(100, 90, 20, seed=0)
    # setup's loader over them; a profile that trains on all the rest has none, and says so before training
    s = compare.setup("resnet20", "fashion-mnist", 0, "quick", progress=False, heldout=True)
    p = compare.PROFILES["quick"]
    assert s.heldout_loader.dataset.indices == compare.heldout_split(60000, p["train_subset"], p["val_subset"], 0)
    assert len(s.heldout_loader.dataset) == 60000 - p["train_subset"] - p["val_subset"]
    assert compare.setup("resnet20", "fashion-mnist", 0, "quick", progress=False).heldout_loader is None
    with pytest.raises(ValueError, match="--heldout: profile 'full' trains or validates on all 60000"):
        compare.setup("resnet20", "fashion-mnist", 0, "full", progress=False, heldout=True)


def test_heldout_rows_from_the_command_line(compare, monkeypatch, capsys):
    real = compare.heldout_split
    monkeypatch.setattr(compare, "heldout_split", lambda *a: real(*a)[:70])  # 70 of the 59,616, to stay quick
    compare.main(["--exp", "baselines", "--profile", "quick", "--no-progress", "--methods", "uncompressed",
                  "--heldout"])
    (row,) = json.loads((compare.RESULTS / "baselines.json").read_text())["rows"]
    assert row["heldout_images"] == 70 and 0 <= row["heldout_accuracy"] <= 1 and row["heldout_s"] >= 0
    held = compare.unpack_correct(row["heldout_correct"], row["heldout_images"])
    assert held.mean() == pytest.approx(row["heldout_accuracy"])
    test = compare.unpack_correct(row["test_correct"], row["test_images"])
    assert row["test_images"] == 128 and test.mean() == pytest.approx(row["accuracy"])  # the images of `accuracy`
    with pytest.raises(ValueError, match="hold 65 to 72 results, not 80"):
        compare.unpack_correct(row["heldout_correct"], 80)
    for bad, why in ((["--profile", "full"], "trains or validates on all 60000"),
                     (["--dataset", "cifar10"], "fashion-mnist only")):
        with pytest.raises(SystemExit):
            compare.main(["--exp", "baselines", "--profile", "quick", "--methods", "uncompressed", "--heldout", *bad])
        assert why in capsys.readouterr().err


def test_measure_with_heldout_images_stores_each_images_result(compare):
    # A model that calls every image class 0: right exactly on the images labelled 0.
    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

        def forward(self, x):
            return x.flatten(1)[:, :3] * 0 + self.w

    def loader(labels):
        y = torch.tensor(labels)
        images = torch.utils.data.TensorDataset(torch.randn(len(y), 1, 4, 4), y)
        return torch.utils.data.DataLoader(images, batch_size=4)

    test_labels, held_labels = [0, 1, 0, 2, 0, 0, 1], [1, 0, 2, 2, 2, 0, 1, 1, 0, 2, 2]
    s = types.SimpleNamespace(device="cpu", eval_loader=loader(test_labels), val_loader=loader([0, 1]),
                              heldout_loader=loader(held_labels), x=torch.randn(1, 1, 4, 4))
    out = compare._measure(s, Zero(), latency=False)
    assert out["accuracy"] == pytest.approx(4 / 7) and out["heldout_accuracy"] == pytest.approx(3 / 11)
    assert (out["test_images"], out["heldout_images"]) == (7, 11)
    assert compare.unpack_correct(out["test_correct"], 7).tolist() == [lab == 0 for lab in test_labels]
    assert compare.unpack_correct(out["heldout_correct"], 11).tolist() == [lab == 0 for lab in held_labels]
    assert "heldout_accuracy" not in compare._measure(s, Zero(), latency=False, test=False)  # tuning rows: no test
    s.heldout_loader = None
    assert "heldout_accuracy" not in compare._measure(s, Zero(), latency=False)
    # --table pairs on it, over the rows that have it
    common = {"model": "resnet20", "dataset": "fashion-mnist", "profile": "cpu", "stage": "final", "macs": 10,
              "macs_baseline": 20, "params": 1, "val_accuracy": 0.9, "wall_s": 1, "setting": "3x kd", "accuracy": 0.9}
    for seed, funnel, uniform in ((0, None, None), (10, 0.91, 0.90), (11, 0.93, 0.90)):
        for method, value in (("funnel", funnel), ("uniform", uniform)):
            held = {} if value is None else {"heldout_accuracy": value}
            compare._append("quality", dict(common, seed=seed, method=method, **held))
    table = compare.paired("quality", metric="heldout_accuracy")
    assert "| resnet20 | cpu | 3x kd | uniform | 2 | +2.00 | 1.41 |" in table  # seed 0's rows lack it


def test_quality_plan_keeps_the_stored_funnel_recipe_beside_funnel_cut(compare):
    """"funnel" rows are the flow with c on its schedule whatever the defaults; "funnel-cut" has c
    follow the budget's cut, "funnel-shrink" a higher cap on lambda; each at every distilled budget,
    with the same epochs."""
    plan = compare._plan("quality", types.SimpleNamespace(macs=3 * 4 * 1000, profile="cpu"))
    runs = {(r["method"], r["setting"]): r for r in plan}
    for k in compare.QUALITY_BUDGETS:
        funnel, cut = runs[("funnel", f"{k}x kd")], runs[("funnel-cut", f"{k}x kd")]
        assert funnel["flow"]["c_follows_budget"] is False and cut["flow"]["c_follows_budget"] is True
        assert {**funnel["flow"], "c_follows_budget": True} == cut["flow"] and funnel["target"] == cut["target"] == 12000 // k
        assert runs[("funnel", f"{k}x")]["flow"]["c_follows_budget"] is False
        shrink = runs[("funnel-shrink", f"{k}x kd")]  # the same flow, lambda's cap raised, nothing else
        assert shrink["flow"] == {**funnel["flow"], **compare.SHRINK_FLOW} and shrink["target"] == funnel["target"]
        assert compare.SHRINK_FLOW["max_shrink"] > fxtucker.CompressConfig().max_shrink
    for k in compare.FLOOR_BY_BUDGET:  # the short flow unweighted: the funnel row's flow, two knobs changed
        setting = f"{k}x kd {compare.SHORT_EPOCHS} epochs"
        funnel, unweighted = runs[("funnel", setting)], runs[("funnel-unweighted", setting)]
        assert unweighted["flow"] == {**funnel["flow"], "mac_weighted": False, "one_schedule": True}
        assert unweighted["target"] == funnel["target"] == 12000 // k
        reg_lr = runs[("funnel-reg-lr", setting)]  # and that flow with step 3 at another rate, nothing else
        assert reg_lr["flow"] == {**unweighted["flow"], "reg_lr": compare.REG_LR_FLOW["reg_lr"]}
        assert reg_lr["flow"]["reg_lr"] != fxtucker.CompressConfig().reg_lr and reg_lr["target"] == funnel["target"]
        floor = runs[("funnel-floor", setting)]  # and that flow with a floor on every mode's rank, nothing else
        assert floor["flow"] == {**reg_lr["flow"], "rank_floor": compare.FLOOR_BY_BUDGET[k]} and floor["target"] == funnel["target"]
        high = runs[("funnel-floor-high", setting)]  # the same flow with a higher floor, nothing else
        assert high["flow"] == {**floor["flow"], "rank_floor": compare.FLOOR_HIGH_BY_BUDGET[k]} and high["target"] == funnel["target"]
        assert compare.FLOOR_HIGH_BY_BUDGET[k] > compare.FLOOR_BY_BUDGET[k]
        assert fxtucker.CompressConfig().mac_weighted and not fxtucker.CompressConfig().one_schedule


def test_quality_rows_are_matched_to_the_budget_and_paired(compare, tmp_path, capsys):
    compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--methods", "funnel-ranks",
                  "--settings", "3x"])
    assert "the funnel row it takes its ranks from is not stored yet" in capsys.readouterr().out
    compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--methods", "uncompressed", "funnel",
                  "uniform", "vbmf", "funnel-ranks", "--settings", "baseline", "3x", "evbmf ranks"])
    rows = json.loads((tmp_path / "results" / "quality.json").read_text())["rows"]
    final = {(r["method"], r["setting"]): r for r in rows if r["stage"] == "final"}
    assert set(final) == {("uncompressed", "baseline"), ("funnel", "3x"), ("uniform", "3x"), ("vbmf", "3x"),
                          ("vbmf", "evbmf ranks"), ("funnel-ranks", "3x")}
    # The funnel's ranks without its training path: the same ranks, hence the same MACs.
    funnel_ranks = final[("funnel-ranks", "3x")]["ranks"]
    assert funnel_ranks == final[("funnel", "3x")]["ranks"]
    assert funnel_ranks.keys() == final[("funnel", "3x")]["ranks"].keys()  # the flow's rows list decomposed layers only
    assert any(len(r) == 1 for r in funnel_ranks.values())  # the 1x1 downsampling convs, as the flow cuts them
    assert final[("funnel-ranks", "3x")]["macs"] == final[("funnel", "3x")]["macs"]
    # A mode at rank 0 (a 4x funnel row): built as strip_gates builds it, one component with its factor
    # zeroed, so the layer outputs its bias and costs what the flow's does.
    s = compare.setup("resnet20", "fashion-mnist", 0, "quick", progress=False)
    dead_in, dead_out = [n for n, r in funnel_ranks.items() if len(r) == 2][:2]
    zeroed = {**final[("funnel", "3x")], "setting": "4x", "ranks": {**funnel_ranks, dead_in: [0, 3], dead_out: [2, 0]}}
    compare.append_row(tmp_path / "results" / "quality.json", zeroed)
    model, extra = compare.method_funnel_ranks(s, None, False, exp="quality", setting="4x")
    assert extra["ranks"][dead_in] == [0, 3] and extra["ranks"][dead_out] == [2, 0]
    first, last = model.get_submodule(dead_in)["first"].weight, model.get_submodule(dead_in)["last"].weight
    assert first.shape[0] == 1 and not first.any() and last.shape[1] == 3 and last.any()
    first, last = model.get_submodule(dead_out)["first"].weight, model.get_submodule(dead_out)["last"].weight
    assert first.shape[0] == 2 and first.any() and last.shape[1] == 1 and not last.any()
    base = final[("uncompressed", "baseline")]["macs"]
    for method in ("funnel", "uniform", "vbmf"):  # within 1% under the budget
        r = final[(method, "3x")]
        assert r["target_macs"] == base // 3 and 0.99 <= r["macs"] / r["target_macs"] <= 1.0, (method, r["macs"])
        assert 0.0 <= r["val_pruned"] <= 1.0 and 0.0 <= r["val_accuracy"] <= 1.0
    assert final[("vbmf", "evbmf ranks")]["target_macs"] is None  # EVBMF's own ranks: a row apart
    funnel, uniform = final[("funnel", "3x")]["ranks"], final[("uniform", "3x")]["ranks"]
    assert uniform.keys() <= funnel.keys()  # the flow's chosen ranks, by the names the baselines use
    assert any(funnel[name] != list(ranks) for name, ranks in uniform.items())
    for r in final.values():
        assert {"commit", "threads", "torch", "torch_pruning", "time", "other_runners", "load_avg_1m"} <= set(r)
    capsys.readouterr()
    compare.main(["--table", "quality"])
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if l.startswith("| resnet20 | quick | 3x | uniform | 1 |")]
    diff = 100 * (final[("funnel", "3x")]["accuracy"] - final[("uniform", "3x")]["accuracy"])
    assert f"| {diff:+.2f} |" in line and line.endswith(f"| {int(diff > 0)} of 1 |")
    compare.main(["--table", "quality", "--reference", "funnel-ranks"])  # differences from another method
    out = capsys.readouterr().out
    assert "| funnel-ranks minus |" in out
    (line,) = [l for l in out.splitlines() if l.startswith("| resnet20 | quick | 3x | funnel | 1 |")]
    diff = 100 * (final[("funnel-ranks", "3x")]["accuracy"] - final[("funnel", "3x")]["accuracy"])
    assert f"| {diff:+.2f} |" in line
    compare.main(["--table", "quality", "--metric", "val_recalibrated"])  # before fine-tuning, BN re-estimated
    out = capsys.readouterr().out
    assert "| funnel minus (val_recalibrated) |" in out
    (line,) = [l for l in out.splitlines() if l.startswith("| resnet20 | quick | 3x | uniform | 1 |")]
    diff = 100 * (final[("funnel", "3x")]["val_recalibrated"] - final[("uniform", "3x")]["val_recalibrated"])
    assert f"| {diff:+.2f} |" in line
    with pytest.raises(ValueError, match=r"unknown metric 'test'; valid: accuracy, val_accuracy"):
        compare.paired("quality", metric="test")
    # A baseline trained again differently is refused before a new row pairs with the stored ones
    stored = json.loads((tmp_path / "results" / "quality.json").read_text())
    (base_row,) = [r for r in stored["rows"] if r["method"] == "uncompressed"]
    base_row["val_accuracy"] -= 0.25
    (tmp_path / "results" / "quality.json").write_text(json.dumps(stored))
    with pytest.raises(compare.BaselineMismatch, match=r"baseline of seed 0 \(quick profile\) gives"):
        compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--methods", "uniform",
                      "--settings", "2x"])
    assert len(json.loads((tmp_path / "results" / "quality.json").read_text())["rows"]) == len(stored["rows"])
    # A seed whose rows exist but whose cached baseline is gone is refused before anything trains...
    weights = tmp_path / "cache" / "quick" / "resnet20-fashion-mnist-s0" / "baseline_state_dict.pt"
    weights.unlink()
    missing = (r"rows of resnet20 seed 0 \(quick profile\) started from a baseline that is not in the cache "
               r"\(.*baseline_state_dict.pt is missing\).*--retrain-baseline")
    with pytest.raises(compare.BaselineMismatch, match=missing):
        compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--methods", "uniform",
                      "--settings", "2x"])
    assert not weights.exists()
    # ...and with --retrain-baseline it trains one, which the validation check then judges (here: refused)
    with pytest.raises(compare.BaselineMismatch, match=r"baseline of seed 0 \(quick profile\) gives"):
        compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--methods", "uniform",
                      "--settings", "2x", "--retrain-baseline"])
    assert weights.exists()
    # a seed without rows trains its baseline as before (nothing to pair with)
    compare.check_baseline_cached(["quality"], "resnet20", "fashion-mnist", 7, "quick")


def test_floor_top_rows_run_the_flow_their_validation_rows_ran():
    # funnel-floor-top went to a test on the strength of the tuning rows "3x kd 3 epochs reg-lr
    # floor_share 1.0": its quality rows must train that flow, field for field.
    import types
    compare = _load("compare")
    s = types.SimpleNamespace(macs=30_000_000, profile="cpu", model_name="resnet20")
    (top,) = [r for r in compare._plan("quality", s) if r["method"] == "funnel-floor-top"]
    (validated,) = [r for r in compare._plan("tuning", s)
                    if r["setting"] == f"3x kd {compare.SHORT_EPOCHS} epochs reg-lr floor_share 1.0"]
    assert top["setting"] == f"3x kd {compare.SHORT_EPOCHS} epochs" and top["target"] == s.macs // 3
    assert top["flow"] == validated["flow"] and top["flow"]["floor_share"] == 1.0
    high = next(r for r in compare._plan("quality", s)
                if r["method"] == "funnel-floor-high" and r["setting"] == top["setting"])
    assert {k: v for k, v in top["flow"].items() if k != "floor_share"} == {
        k: v for k, v in high["flow"].items() if k != "rank_floor"}  # funnel-floor-high's flow but the floor


def test_baseline_rate_runs_are_their_quality_runs_at_another_rate(monkeypatch, tmp_path):
    # Session 38: each baseline's fine-tuning rate at 3x chosen on validation; a tuning run must be its
    # quality run (budget, distillation, epochs) but the rate, and the rate must reach the training loop.
    import types
    compare = _load("compare")
    s = types.SimpleNamespace(macs=30_000_000, profile="cpu", model_name="resnet20")
    setting = f"3x kd {compare.SHORT_EPOCHS} epochs"
    quality = {r["method"]: r for r in compare._plan("quality", s) if r["setting"] == setting and "baseline" in r}
    tuned = [r for r in compare._plan("tuning", s) if " ft-lr " in r["setting"]]
    assert {(r["method"], r["lr"]) for r in tuned} == {
        (m, lr) for m in ("uniform", "torch-pruning", "musco", "vbmf") for lr in compare.BASELINE_LRS}
    for r in tuned:
        assert r["setting"] == f"{setting} ft-lr {r['lr']:g}"
        assert {**r, "setting": setting, "lr": None} == {**quality[r["method"]], "lr": None}
        assert "lr" not in quality[r["method"]]  # the quality rows keep FINETUNE_LR
    assert compare.FINETUNE_LR in compare.BASELINE_LRS  # every rate under the same code, the default's too
    seen = []
    monkeypatch.setattr(compare, "train", lambda model, loader, cfg, **kw: seen.append(cfg) or [])
    run = types.SimpleNamespace(seed=3, train_loader=None, val_loader=None, cache=tmp_path, device="cpu")
    compare._finetune(run, torch.nn.Linear(2, 2), "x", False, epochs=3, lr=0.04)
    compare._finetune(run, torch.nn.Linear(2, 2), "x", False, epochs=3)
    assert [(c.lr, c.epochs, c.seed) for c in seen] == [(0.04, 3, 3), (compare.FINETUNE_LR, 3, 3)]


def test_short_quality_settings_give_every_method_the_same_epochs_after_the_baseline():
    import types
    compare = _load("compare")
    s = types.SimpleNamespace(macs=30_000_000, profile="cpu")
    for k in compare.SHORT_BUDGETS:
        runs = [r for r in compare._plan("quality", s) if r["setting"] == f"{k}x kd {compare.SHORT_EPOCHS} epochs"]
        funnels = {"funnel", "funnel-unweighted", "funnel-reg-lr", "funnel-floor"} if k in compare.FLOOR_BY_BUDGET else set()
        funnels |= {"funnel-floor-high"} if k in compare.FLOOR_HIGH_BY_BUDGET else set()
        funnels |= {"funnel-floor-share"} if k in compare.FLOOR_SHARE_BUDGETS else set()
        funnels |= {"funnel-floor-top"} if k in compare.FLOOR_TOP_BUDGETS else set()
        assert {r["method"] for r in runs} == funnels | {"uniform", "torch-pruning", "musco", "vbmf"}
        assert {r["method"] for r in runs} <= set(compare.METHODS)  # each can be asked for by --methods
        for r in runs:
            assert r["target"] == s.macs // k
            if "flow" in r:  # the funnel: its step 3 and fine-tuning make up the budget, distilled as the kd rows
                f = r["flow"]
                assert f["train_epochs"] + f["reg_epochs"] + f["finetune_epochs"] == compare.SHORT_EPOCHS
                assert f["distill"] and f["distill_reg"] and f["target_macs"] == s.macs // k
            else:
                assert r["epochs"] == compare.SHORT_EPOCHS and r["distill"]


def test_quick_job_reads_the_test_set_for_the_chosen_recipe_only(tmp_path, monkeypatch):
    quick_job = _load("quick_job")
    other = next(n for n in quick_job.SETTINGS if n != quick_job.CHOSEN)
    with pytest.raises(SystemExit, match=r"--test-rows reads the test set, which is for the chosen recipe"):
        quick_job.main(["--test-rows", "--settings", other])
    # the table pairs each test row with its validation row (same setting, stand-in and seed)
    rows = {"quick_job": [{"setting": quick_job.CHOSEN, "start": "stand-in", "stand_in": "abc", "seed": 1,
                           "val_original": 0.93, "val_after": 0.926}],
            "quick_job_test": [{"setting": quick_job.CHOSEN, "stand_in": "abc", "seed": 1, "test_original": 0.929,
                                "test_after": 0.9236, "commit": "0123456789"}]}
    monkeypatch.setattr(quick_job, "_load", lambda name: rows[name])
    line = quick_job.test_table().splitlines()[-1]
    assert line == f"| {quick_job.CHOSEN} | abc | 1 | 0.9300 | 0.9260 | 0.40 | 0.9290 | 0.9236 | 0.54 | 01234567 |"


def test_quick_job_rows_record_the_floor_the_flow_resolved(monkeypatch):
    from types import SimpleNamespace

    quick_job = _load("quick_job")
    name = next(n for n in quick_job.SETTINGS if "floor_share" in quick_job.SETTINGS[n])
    report = {"stages": {"pruned": {"accuracy": 0.9}}, "macs_before": 310, "macs_after": 155, "rank_floor": 0.375}
    stored = []
    monkeypatch.setattr(quick_job, "stand_in", lambda: torch.nn.Identity())
    monkeypatch.setattr(quick_job, "stand_in_id", lambda: "abc")
    monkeypatch.setattr(quick_job, "_stored", lambda *a: False)
    monkeypatch.setattr(quick_job, "loaders", lambda **kw: (None, None))
    monkeypatch.setattr(quick_job, "evaluate", lambda model, loader: 0.93)
    monkeypatch.setattr(quick_job, "compressed", lambda *a: SimpleNamespace(model=torch.nn.Identity(), report=report))
    monkeypatch.setattr(quick_job, "_append", lambda kind, row: stored.append((kind, row)))
    monkeypatch.setattr(quick_job, "_load", lambda kind: [row for k, row in stored if k == kind])
    monkeypatch.setattr(quick_job, "_provenance", lambda: {"commit": "0123456789"})
    quick_job.run([name], progress=False, seed=4)
    [(kind, row)] = stored
    assert kind == "quick_job" and row["setting"] == name and row["seed"] == 4 and row["stand_in"] == "abc"
    assert row["rank_floor"] == 0.375 and row["changes"] == quick_job.SETTINGS[name]


def test_main_job_row_times_the_readme_command_in_a_folder_it_removes(monkeypatch):
    import subprocess
    import tempfile

    quick_job = _load("quick_job")
    seen = {}

    def fake_run(cmd, capture_output, text, env):  # the job: writes its report and logs where --out points
        out = Path(cmd[cmd.index("--out") + 1])
        seen["cmd"], seen["out"], seen["env"] = cmd, out, env
        out.mkdir(parents=True)
        unreliable = {"reliable": False, "speedup": None, "note": "timing unreliable: spread 1.3x"}
        (out / "report.json").write_text(json.dumps({
            "accuracy_before": 0.9347, "accuracy_after": 0.9281, "accuracy_images": 10000, "macs_before": 310,
            "macs_after": 155, "deployed": {"parity": {"max_abs_error": 4e-6}},
            "latency": {"batch_1": unreliable, "batch_64": {"reliable": True, "speedup": 1.6}}}))
        for stage, seconds in (("regularize", [20.0, 21.0]), ("finetune", [15.5])):
            (out / f"{stage}.jsonl").write_text("".join(json.dumps({"seconds": t}) + "\n" for t in seconds))
        return subprocess.CompletedProcess(cmd, 0, stdout="the table\n", stderr="")

    stored = []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: fake_run(cmd, **kw))
    monkeypatch.setattr(quick_job, "_append", lambda name, row: stored.append((name, row)))
    monkeypatch.setattr(quick_job, "_provenance", lambda: {"commit": "0123456789", "other_runners": 0,
                                                          "load_avg_1m": 0.5, "time": "T"})
    row = quick_job.main_job_row()
    assert seen["cmd"][1:] == ["-m", "fxtucker", "compress", "--model", "resnet20", "--dataset", "fashion-mnist",
                               "--quick", "--no-progress", "--out", str(seen["out"])]
    assert not seen["out"].parent.exists()  # the temporary folder is gone
    assert "OMP_NUM_THREADS" not in seen["env"]  # the job runs on torch's default threads, as a user's does
    assert stored == [("main_job", row)] and row["training_s"] == 56.5 and row["printed"] == "the table\n"
    assert row["latency"] == {"batch_1": "timing unreliable: spread 1.3x", "batch_64": "1.60x"}
    # a failing job: no row, its error shown, the folder gone
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "Traceback: boom"))
    with pytest.raises(SystemExit, match=r"the main job failed \(exit 1\):\nTraceback: boom"):
        quick_job.main_job_row()
    assert len(stored) == 1 and not any(Path(tempfile.gettempdir()).glob("fxtucker-main-job-*"))
    monkeypatch.setattr(quick_job, "_load", lambda name: [row])
    assert quick_job.main_job_table().splitlines()[-1] == (
        f"| T | 01234567 | {row['wall_s']:.0f} | 56 | 0.9347 -> 0.9281 (0.66) | 2.00x | unreliable | 1.60x | 0 | 0.5 |")


def test_quick_job_tuning_validates_on_images_the_job_does_not_train_on():
    try:
        data.get_dataset("fashion-mnist", True)
    except (FileNotFoundError, RuntimeError) as e:
        pytest.skip(f"Fashion-MNIST is not installed here: {e}")
    quick_job = _load("quick_job")
    train_loader, val_loader = quick_job.loaders()
    train_idx, val_idx = set(train_loader.dataset.indices), set(val_loader.dataset.indices)
    assert len(train_idx) == 10000 and len(val_idx) == quick_job.VAL_IMAGES and not train_idx & val_idx
    # the stand-in for the shipped model is trained on all the others, the job's 10,000 among them
    args = quick_job.STAND_IN_ARGS
    subset = int(args[args.index("--train-subset") + 1])
    seed = int(args[args.index("--seed") + 1])
    stand_in = set(data.make_loader(data.get_dataset("fashion-mnist", True), 128, True, subset=subset, seed=seed).dataset.indices)
    assert len(stand_in) + len(val_idx) == 60000 and not stand_in & val_idx and train_idx <= stand_in
    from fxtucker.cli import QUICK_CONFIG
    from fxtucker.cli import QUICK
    from fxtucker.compress import CompressConfig
    assert QUICK_CONFIG == quick_job.config(quick_job.CHOSEN)  # the job runs the chosen setting
    # on the chosen setting's images: each epoch as many, drawn afresh from all the model's training images
    # (the stand-in's 55,000; the shipped model's 60,000, train_subset None)
    assert quick_job.train_subset(quick_job.CHOSEN) == len(stand_in) and QUICK["train_subset"] is None
    assert QUICK["epoch_images"] == quick_job.epoch_images(quick_job.CHOSEN)
    for name in quick_job.SETTINGS:  # each name starts with its epochs: "0+2+3 ..."
        cfg = quick_job.config(name)
        split = [int(n) for n in name.split()[0].split("+")]
        assert split == [cfg["train_epochs"], cfg["reg_epochs"], cfg["finetune_epochs"]], name
        assert not set(quick_job.LOADER_KEYS) & set(cfg)  # the images drawn are the loader's, not CompressConfig's
        CompressConfig(**cfg)
    # a setting on more images draws them from the same permutation: the job's among them, none validated on
    more, val = quick_job.loaders(subset=20000)
    assert train_idx < set(more.dataset.indices) and set(val.dataset.indices) == val_idx
    # a setting that draws each epoch afresh draws from the stand-in's images, never the validation ones
    fresh, val = quick_job.loaders(subset=subset, epoch_items=10000)
    assert set(fresh.dataset.indices) == stand_in and len(fresh.sampler) == 10000 and set(val.dataset.indices) == val_idx


def test_provenance_counts_running_runners_only_not_paused_or_finished_ones():
    import signal
    import subprocess
    compare = _load("compare")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "compare.py"])
    where = Path("/proc") / str(proc.pid)

    def settles_for(proc_dir, expected):  # a signal's effect on the state may take a moment
        for _ in range(200):
            if compare._running_runner(proc_dir) == expected:
                return True
            time.sleep(0.01)
        return False

    def settles(expected):
        return settles_for(where, expected)

    try:
        assert settles(True)
        os.kill(proc.pid, signal.SIGSTOP)  # paused for a timing run: no longer a load on the machine
        assert settles(False)
        os.kill(proc.pid, signal.SIGCONT)
        assert settles(True)
    finally:
        proc.kill()
        proc.wait()
    assert not compare._running_runner(where)  # gone
    assert not compare._running_runner(Path("/proc") / str(os.getpid()))  # pytest is not a runner
    # every benchmark script counts (a quick_job.py run shares the cores as a compare.py one does),
    # by its file name, not by a name that merely contains it
    for argv, counts in (([sys.executable, "-c", "import time; time.sleep(60)", "benchmarks/quick_job.py"], True),
                         ([sys.executable, "-c", "import time; time.sleep(60)", "latency.py"], True),
                         ([sys.executable, "-c", "import time; time.sleep(60)", "not_compare.py"], False),
                         # a shell whose arguments name a runner is not one ("; :" keeps bash from
                         # exec'ing sleep, so its command line still names compare.py)
                         (["bash", "-c", "sleep 60; :", "benchmarks/compare.py"], False)):
        script = argv[-1]
        proc = subprocess.Popen(argv)
        proc_dir = Path("/proc") / str(proc.pid)
        try:
            if counts:
                assert settles_for(proc_dir, True), script
            else:  # once its command line is in place, it is never counted
                for _ in range(200):
                    if script.encode() in (proc_dir / "cmdline").read_bytes():
                        break
                    time.sleep(0.01)
                assert script.encode() in (proc_dir / "cmdline").read_bytes(), script
                for _ in range(20):
                    assert not compare._running_runner(proc_dir), script
                    time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()


def test_quick_job_rule_table_counts_the_runs_each_rule_trusts_and_how_far_apart_they_lie(monkeypatch):
    quick_job = _load("quick_job")
    runs = [[1.7, 1.7, 1.7, 1.7, 1.7, 1.7, 1.7],   # steady
            [1.7, 1.2, 1.7, 1.7, 1.8, 1.7, 1.7],   # one slow round among the job's 5
            [1.5, 1.5, 1.5, 1.5, 1.5, 1.0, 2.0]]   # steady for 5 rounds, then both extremes
    rows = [{"setting": "s", "stand_in": "x", "batch": 64, "ratios": r, "other_runners": i} for i, r in enumerate(runs)]
    rows.append({"setting": "s", "stand_in": "x", "batch": 64, "ratios": [1.0] * 5})  # 5 rounds: not counted
    monkeypatch.setattr(quick_job, "_load", lambda exp: rows if exp == "quick_job_latency" else [])
    rows.append({"setting": "s", "stand_in": "x", "batch": 64, "ratios": [1.6] * 7, "interleaved": True})
    lines = quick_job.rule_table().splitlines()[2:]
    table = {line.split(" | ")[4]: line.split(" | ")[5:] for line in lines if " model by model | " in line}
    assert table["5 rounds, max/min"][:3] == ["2 (1)", "1.70, 1.50", "1.13 |"]  # runs 0 and 2
    assert table["7 rounds, max/min"][:3] == ["1 (0)", "1.70", "1.00 |"]
    assert table["7 rounds, middle 5"][:3] == ["3 (2)", "1.70, 1.70, 1.50", "1.13 |"]
    # runs timed in turn are a group of their own, one per turn's length (1 where none was recorded)
    interleaved = [line.split(" | ")[3:6] for line in lines if " in turns of 1 | " in line]
    assert interleaved == [["1 (0)", "5 rounds, max/min", "1 (0)"], ["1 (0)", "7 rounds, max/min", "1 (0)"],
                           ["1 (0)", "7 rounds, middle 5", "1 (0)"]]
    # and runs with onnxruntime's threads not spinning are a group apart
    rows.append({"setting": "s", "stand_in": "x", "batch": 64, "ratios": [1.5] * 7, "interleaved": True, "spinning": False})
    lines = quick_job.rule_table().splitlines()[2:]
    assert [line.split(" | ")[3:7] for line in lines if " in turns of 1, not spinning | " in line][0] == \
        ["1 (0)", "5 rounds, max/min", "1 (0)", "1.50"]
    assert sum(" in turns of 1 | " in line for line in lines) == 3


def test_quick_job_times_every_way_once_per_repeat_the_first_alternating():
    quick_job = _load("quick_job")
    assert quick_job._ways((False,), (None,), 0) == [(False, None)]
    assert quick_job._ways((False, True), (None, False), 0) == [(False, None), (True, None), (False, False), (True, False)]
    assert quick_job._ways((False, True), (None, False), 1) == [(True, False), (False, False), (True, None), (False, None)]


def test_channel_blocks_times_every_count_in_alternating_rounds_and_appends_a_row(tmp_path, capsys):
    blocks = _load("channel_blocks")
    out = tmp_path / "rows.json"
    for _ in range(2):
        assert blocks.main(["--backend", "eager", "--batch", "2", "--size", "6", "--rounds", "2", "--repeats", "1",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2  # appended, not overwritten
    keys = {f"{side} {c}" for side in ("out", "in") for c in blocks.COUNTS}
    for row in rows:
        assert set(row["median_ms"]) == set(row["rounds_ms"]) == keys and row["backend"] == "eager"
        assert all(len(v) == 2 and all(t > 0 for t in v) for v in row["rounds_ms"].values())
        assert all(abs(row["median_ms"][k] - sum(v) / 2) <= 2e-4 for k, v in row["rounds_ms"].items())  # median of 2
    printed = capsys.readouterr().out
    assert "3x3 conv, eager, batch 2, 6x6" in printed and printed.count("\n") >= 2 + len(blocks.COUNTS)


def test_pool_runs_jobs_side_by_side_and_stops_at_the_time_limit(compare, tmp_path, capsys):
    script = ("import sys, time\n"
              "what = sys.argv[1]\n"
              "print('job', what, flush=True)\n"
              "if what == 'fail':\n    print('the cause of the failure'); sys.exit(3)\n"
              "if what == 'sleep':\n    time.sleep(60)\n")
    jobs = [["ok"], ["fail"], ["sleep"], ["sleep"], ["ok"]]
    counts = compare.run_pool(jobs, 2, tmp_path / "logs", stop_after=15, command=[sys.executable, "-c", script], poll=0.1)
    # ok and fail first; both sleeps side by side, stopped at the limit; the last job never starts.
    assert counts == {"finished": 1, "failed": 1, "stopped": 2, "not started": 1}
    out = capsys.readouterr().out
    assert "FAILED (exit 3)" in out and "the cause of the failure" in out
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [f"job-{n}.log" for n in range(4)]
    assert (tmp_path / "logs" / "job-2.log").read_text() == "job sleep\n"


def test_pool_jobs_are_the_planned_runs_setting_by_setting(compare):
    import argparse

    args = argparse.Namespace(exp=["quality"], profile="cpu", dataset="fashion-mnist", device="cuda", threads=None,
                              models=["resnet20"], seeds=[0, 1], settings=["2x kd", "baseline"],
                              methods=["funnel", "uncompressed"], retrain_baseline=False, cache_teacher=False,
                              heldout=False)
    jobs = compare.pool_jobs(args)
    assert not any("--retrain-baseline" in j for j in jobs)
    retrain = argparse.Namespace(**{**vars(args), "retrain_baseline": True})
    assert all("--retrain-baseline" in j for j in compare.pool_jobs(retrain))
    # funnel has no "baseline" run and uncompressed no "2x kd" one: those pairs are not jobs.
    assert [(j[j.index("--settings") + 1], j[j.index("--seeds") + 1], j[j.index("--methods") + 1]) for j in jobs] == [
        ("2x kd", "0", "funnel"), ("2x kd", "1", "funnel"), ("baseline", "0", "uncompressed"),
        ("baseline", "1", "uncompressed")]
    assert all(j[j.index("--device") + 1] == "cuda" and j[j.index("--threads") + 1] == "1" for j in jobs)


def test_pool_and_device_arguments_are_checked(compare, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--exp", "quality", "--workers", "2", "--methods", "funnel"])
    assert "--workers needs --settings and --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--exp", "quality", "--stop-after", "10"])
    assert "--stop-after needs --workers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda needs a CUDA GPU.*valid here: --device cpu"):
            compare.main(["--exp", "quality", "--device", "cuda", "--profile", "quick"])


def test_rows_of_another_device_are_neither_done_nor_paired_with_the_cpus(compare):
    common = {"model": "resnet20", "dataset": "fashion-mnist", "profile": "cpu", "stage": "final", "macs": 10,
              "macs_baseline": 20, "params": 1, "val_accuracy": 0.9, "wall_s": 1}
    rows = [dict(common, seed=0, method="uncompressed", setting="baseline", accuracy=0.90, macs=20),
            dict(common, seed=0, method="funnel", setting="2x kd", accuracy=0.89),
            dict(common, seed=0, method="uncompressed", setting="baseline", accuracy=0.80, macs=20, device="cuda"),
            dict(common, seed=0, method="funnel", setting="2x kd", accuracy=0.70, device="cuda")]
    for r in rows:
        compare._append("quality", r)
    key = {"model": "resnet20", "dataset": "fashion-mnist", "seed": 0, "profile": "cpu", "method": "uniform",
           "setting": "2x kd", "stage": "final"}
    compare._append("quality", dict(common, **{k: v for k, v in key.items()}, accuracy=0.5, device="cuda"))
    assert not compare._done("quality", key)  # the CPU's uniform row is still to run
    assert compare._done("quality", {**key, "device": "cuda"})
    assert compare._done("quality", {**key, "method": "funnel"})
    summary = compare.summary("quality")
    # Each device's drop is measured from its own baseline: 1 point on the CPU, 10 on the GPU.
    assert "| resnet20 | cpu | 2x kd | funnel | 0 | 89.00 | 1.00 |" in summary
    assert "| resnet20 | cpu on cuda | 2x kd | funnel | 0 | 70.00 | 10.00 |" in summary
    assert "| resnet20 | cpu on cuda | 2x kd | uniform | 1 | +20.00 |" in compare.paired("quality")
    assert "| resnet20 | cpu | 2x kd | uniform |" not in compare.paired("quality")


def test_summary_lists_each_methods_seeds_in_order_whatever_order_the_rows_were_written(compare):
    common = {"model": "resnet20", "dataset": "fashion-mnist", "profile": "cpu", "stage": "final", "macs": 10,
              "macs_baseline": 20, "params": 1, "val_accuracy": 0.9, "wall_s": 1}
    for seed, acc in ((3, 0.90), (0, 0.92), (2, 0.91)):  # as two runners may finish them
        compare._append("quality", dict(common, seed=seed, method="uncompressed", setting="baseline", accuracy=acc, macs=20))
        compare._append("quality", dict(common, seed=seed, method="funnel", setting="2x kd", accuracy=acc - 0.01))
    assert "| resnet20 | cpu | 2x kd | funnel | 0,2,3 | 90.00 ± 1.00 | 1.00 ± 0.00 |" in compare.summary("quality")


def test_table_reads_only_the_seeds_it_is_given(compare, capsys):
    # A test fixed in advance on fresh seeds reads theirs alone: seed 0 (funnel 3 points behind) is left out.
    common = {"model": "resnet20", "dataset": "fashion-mnist", "profile": "cpu", "stage": "final", "macs": 10,
              "macs_baseline": 20, "params": 1, "val_accuracy": 0.9, "wall_s": 1, "setting": "3x kd"}
    for seed, funnel, uniform in ((0, 0.87, 0.90), (10, 0.91, 0.90), (11, 0.92, 0.90)):
        compare._append("quality", dict(common, seed=seed, method="funnel", accuracy=funnel))
        compare._append("quality", dict(common, seed=seed, method="uniform", accuracy=uniform))
    assert "| resnet20 | cpu | 3x kd | uniform | 3 | +0.00 | 2.65 |" in compare.paired("quality")
    assert "| resnet20 | cpu | 3x kd | uniform | 2 | +1.50 | 0.71 |" in compare.paired("quality", seeds={10, 11})
    assert "| 3x kd | funnel | 10,11 | 91.50 ± 0.71 |" in compare.summary("quality", seeds={10, 11})
    capsys.readouterr()
    compare.main(["--table", "quality", "--seeds", "10", "11"])
    out = capsys.readouterr().out
    assert "| uniform | 2 | +1.50 |" in out and "| 0 | funnel |" not in out and "| 10 | funnel |" in out


def test_summary_counts_a_seed_stored_twice_once(compare):
    common = {"model": "resnet20", "dataset": "fashion-mnist", "profile": "cpu", "stage": "final", "macs": 20,
              "macs_baseline": 20, "params": 1, "val_accuracy": 0.9, "wall_s": 1, "method": "uncompressed",
              "setting": "baseline"}
    for seed, acc in ((0, 0.90), (1, 0.92), (1, 0.92)):  # seed 1 written by two runners (no key: no check)
        compare._append("quality", dict(common, seed=seed, accuracy=acc))
    assert "| baseline | uncompressed | 0,1 | 91.00 ± 1.41 |" in compare.summary("quality")


def test_a_row_another_runner_stored_meanwhile_is_not_written_twice(compare, tmp_path):
    key = {"model": "resnet20", "dataset": "fashion-mnist", "seed": 9, "profile": "cpu", "method": "uncompressed",
           "setting": "baseline", "stage": "final"}
    first, second = dict(key, accuracy=0.913, wall_s=17.6), dict(key, accuracy=0.913, wall_s=3.1)
    assert compare._append("quality", first, key)  # both runners found it not done, then ran it
    assert not compare._append("quality", second, key)
    assert compare._append("quality", dict(second, seed=8), dict(key, seed=8))  # another seed is another row
    rows = json.loads((tmp_path / "results" / "quality.json").read_text())["rows"]
    assert [(r["seed"], r["wall_s"]) for r in rows] == [(9, 17.6), (8, 3.1)]
    assert compare._append("quality", second)  # without a key: appended as before


def test_tuning_rows_record_their_own_budget_and_never_the_test_set(compare, tmp_path):
    """A tuning row at 4x records the 4x budget it aimed at (not 2x), and the validation split only."""
    compare.main(["--exp", "tuning", "--profile", "quick", "--no-progress", "--methods", "funnel",
                  "--settings", "4x reg2 no-ft c follows budget", "threshold auto reg2 no-ft"])
    rows = {r["setting"]: r for r in json.loads((tmp_path / "results" / "tuning.json").read_text())["rows"]}
    row = rows["4x reg2 no-ft c follows budget"]
    assert row["target_macs"] == row["macs_baseline"] // 4 and 0.99 <= row["macs_vs_target"] <= 1.0
    assert row["config"]["c_follows_budget"] is True and row["accuracy"] is None and row["val_accuracy"] is not None
    plain = rows["threshold auto reg2 no-ft"]  # a plain threshold aims at no budget
    assert plain["target_macs"] is None and "macs_vs_target" not in plain


def test_tuning_reruns_quality_rows_from_their_checkpoints_with_bn_recalibrated(compare, tmp_path):
    """"4x kd BN recalibrated" trains nothing: it resumes the quality runs' finished checkpoints, so its
    final models are the quality rows' (the same validation accuracy and MACs), and adds the accuracy
    before fine-tuning with BatchNorm re-estimated; the summary measures costs from quality's baseline."""
    methods = ["uncompressed", "funnel", "uniform"]
    compare.main(["--exp", "quality", "--profile", "quick", "--no-progress", "--methods", *methods,
                  "--settings", "baseline", "4x kd"])
    compare.main(["--exp", "tuning", "--profile", "quick", "--no-progress", "--methods", *methods,
                  "--settings", "4x kd BN recalibrated"])
    quality = {r["method"]: r for r in json.loads((tmp_path / "results" / "quality.json").read_text())["rows"]}
    tuning = {r["method"]: r for r in json.loads((tmp_path / "results" / "tuning.json").read_text())["rows"]}
    assert set(tuning) == {"funnel", "uniform"}
    for method, row in tuning.items():
        q = quality[method]
        assert (row["val_accuracy"], row["macs"], row["val_pruned"]) == (q["val_accuracy"], q["macs"], q["val_pruned"])
        assert row["accuracy"] is None and 0 <= row["val_recalibrated"] <= 1
    assert tuning["funnel"]["threshold"] == quality["funnel"]["threshold"]
    (line,) = [l for l in compare.summary("tuning").splitlines() if "| funnel |" in l]
    cost = 100 * (quality["uncompressed"]["val_accuracy"] - tuning["funnel"]["val_pruned"])
    recal = 100 * (quality["uncompressed"]["val_accuracy"] - tuning["funnel"]["val_recalibrated"])
    assert f"| {cost:.2f} |" in line and f"| {recal:.2f} (1) |" in line
    assert f"| - | - | {100 * tuning['funnel']['val_accuracy']:.2f} | {cost:.2f} |" in line  # validation only


def test_rank_baselines_rank_the_1x1_convs_of_a_pointwise_model(compare):
    """mobilenet_v2 (its kxk convs depthwise): uniform, MUSCO-style and EVBMF rank its 1x1 convs as SVD
    pairs, the MACs counted for a rank dict are those of the model built from it, and each meets 2x."""
    from fxtucker.models import get_model

    baseline = get_model("mobilenet_v2", num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    s = types.SimpleNamespace(model_name="mobilenet_v2", baseline=baseline, x=x, macs=fxtucker.count_macs(baseline, x))
    cost = compare.RankCost(s)
    assert cost.full and all(len(f) == 1 for f in cost.full.values())  # the 1x1 convs, one rank each
    half = compare._scaled_ranks(cost.full, {n: (1,) for n in cost.full}, 0.5)
    assert cost(half) == fxtucker.count_macs(compare._decomposed(s, half), x) < s.macs
    target = s.macs // 2
    for method in (compare.method_uniform, compare.method_musco, compare.method_vbmf):
        model, extra = method(s, target, False)
        assert 0.99 * target <= fxtucker.count_macs(model, x) <= target, method.__name__
    resnet = get_model("resnet20", num_classes=10, in_channels=1).eval()
    kxk_only = compare._conv_weights(types.SimpleNamespace(model_name="resnet20", baseline=resnet, x=x))
    assert kxk_only and all(w.shape[2:] == (3, 3) for w in kxk_only.values())  # its 1x1 shortcuts stay dense


@pytest.mark.parametrize("status, suffix", [((0, ""), ""), ((0, " M fxtucker/train.py\n"), "+dirty"),
                                            ((128, ""), "+status-unknown")])
def test_a_row_records_its_commit_and_never_looks_clean_when_git_status_failed(compare, monkeypatch, status, suffix):
    import subprocess

    monkeypatch.delenv("COMPARE_COMMIT", raising=False)

    def run(cmd, **kw):
        code, out = (0, "abc123\n") if cmd[1] == "rev-parse" else status
        return subprocess.CompletedProcess(cmd, code, stdout=out, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    assert compare.git_commit() == "abc123" + suffix


def test_profile_latency_sorts_self_time_by_kind_and_counts_each_conv_once():
    prof = _load("profile_latency")
    assert prof.kind("aten::mkldnn_convolution", [[1, 8, 4, 4], [16, 8, 1, 1], [16]]) == "conv 1x1"
    assert prof.kind("aten::convolution", [[1, 8, 4, 4], [8, 1, 3, 3], [8]]) == "conv depthwise"
    assert prof.kind("aten::_slow_conv2d_forward", [[1, 8, 4, 4], [8, 8, 3, 3], []]) == "conv 3x3"
    assert prof.kind("graph_3_cpp_fused_add_convolution_relu_7", []) == "inductor kernel, with a conv"
    assert prof.kind("graph_3_cpp_fused_add_relu_8", []) == "inductor kernel, elementwise"
    assert prof.kind("## Call CompiledFxGraph abc ##", []) == "framework (compiled graph)"
    assert prof.kind("aten::addmm", [[10], [1, 8], [8, 10]]) == "GEMM"
    assert prof.kind("aten::relu", [[1, 8]]) == "other ops"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    out = prof.profile_ready(prof.ready(model, x, "eager"), x, runs=3)
    kinds = out["kinds"]
    # one call per conv and run, though each runs as conv2d -> convolution -> _convolution -> a kernel
    assert {k: kinds[k]["calls"] for k in ("conv 3x3", "conv depthwise", "conv 1x1")} == \
        {"conv 3x3": 1, "conv depthwise": 1, "conv 1x1": 1}
    assert all(v["ms"] > 0 for k, v in kinds.items() if k.startswith("conv")) and out["wall_ms_profiled"] > 0
    row = dict(model="m", input_size=10, batch=2, backend="eager", threads=1, runs=3, macs={"baseline": 10**6},
               profiles={"baseline": out})
    lines = prof.table([row]).splitlines()  # a row stored before MACs by kind: no rates
    assert "| conv depthwise | " in "\n".join(lines) and lines[-1].startswith("| wall ms per run, profiled |")
    # MACs by kind from the cost model (batch 2): conv 3x3 2*8*8*8*3*9, depthwise 2*8*6*6*9, 1x1 2*4*6*6*8
    by_kind = prof.macs_by_kind(model, torch.randn(2, 3, 10, 10))
    assert by_kind == {"conv 1x1": 2304, "conv 3x3": 27648, "conv depthwise": 5184}
    assert prof.macs_by_kind(torch.nn.Linear(6, 5), torch.randn(3, 6)) == {"GEMM": 90}  # traced: F.linear

    class Functional(torch.nn.Module):  # a conv on a parameter: its kind from the weight's recorded shape
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 3, 1, 1))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.w)

    assert prof.macs_by_kind(Functional(), torch.randn(1, 3, 5, 5)) == {"conv 1x1": 4 * 25 * 3}
    row["macs_by_kind"] = {"baseline": {**by_kind, "GEMM": 1000}}
    row["profiles"]["baseline"]["kinds"] = {"conv 3x3": {"ms": 2.0, "calls": 1}, "conv 1x1": {"ms": 0.5, "calls": 1},
                                            "GEMM": {"ms": 0.5, "calls": 1}}
    rates = prof.rates(row, "baseline")  # depthwise has MACs but no time of its own here
    assert rates == {"conv 3x3": 27648 / 2.0 / 1e6, "pointwise (conv 1x1 and GEMM)": 3304 / 1.0 / 1e6,
                     "conv depthwise": None}
    text = prof.table([row])
    assert "| conv 3x3: GMAC/s, profiled | 0.0 (0M MACs) |" in text and "| conv depthwise: GMAC/s, profiled | no time |" in text
    assert "conv 7x7: GMAC/s" not in text


def test_profile_latency_profiles_the_models_in_turn_and_keeps_each_kinds_median(monkeypatch):
    prof = _load("profile_latency")
    order, wall = [], iter([5.0, 7.0, 1.0, 3.0, 2.0, 9.0])  # a, b, then b, a, then a, b
    def fake(model, x, runs):
        order.append(model.tag)
        w = next(wall)
        return {"wall_ms_profiled": w, "kinds": {"conv 3x3": {"ms": w, "calls": 2.0}}}
    monkeypatch.setattr(prof, "profile_ready", fake)
    models = {}
    for tag in ("a", "b"):
        models[tag] = torch.nn.Conv2d(1, 1, 3)
        models[tag].tag = tag
    out = prof.profile_in_turn(models, torch.randn(1, 1, 5, 5), "eager", runs=1, passes=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert out["a"]["wall_ms_passes"] == [5.0, 3.0, 2.0] and out["a"]["wall_ms_profiled"] == 3.0
    assert out["b"]["kinds"] == {"conv 3x3": {"ms": 7.0, "calls": 2.0}}  # median of 7, 1, 9


def test_tuning_funnel_ranks_take_the_quality_rows_ranks(compare, tmp_path, capsys):
    """The short flow's "funnel ranks" tuning row decomposes the baseline at the ranks of the quality
    row it names (`2x kd 3 epochs`), not of a tuning row of its own setting; without that row it is
    skipped, and it never reads the test set."""
    setting = f"2x kd {compare.SHORT_EPOCHS} epochs"
    tune = ["--exp", "tuning", "--profile", "quick", "--no-progress", "--methods", "funnel-ranks",
            "--settings", f"{setting} funnel ranks"]
    compare.main(tune)
    assert "the funnel row it takes its ranks from is not stored yet" in capsys.readouterr().out
    assert not (tmp_path / "results" / "tuning.json").exists()
    s = compare.setup("resnet20", "fashion-mnist", 0, "quick", progress=False)
    ranks = {n: [max(1, k // 3) for k in compare._full_ranks(w)] for n, w in compare._conv_weights(s).items()}
    macs = compare.count_macs(compare._decomposed(s, ranks), s.x)
    compare.append_row(tmp_path / "results" / "quality.json",
                       {**s.key, "method": "funnel", "setting": setting, "stage": "final", "ranks": ranks, "macs": macs})
    compare.main(tune)
    (row,) = json.loads((tmp_path / "results" / "tuning.json").read_text())["rows"]
    assert row["ranks"] == ranks and row["macs"] == row["funnel_macs"] == macs < s.macs
    assert row["accuracy"] is None and row["val_accuracy"] is not None and row["distill"] is True
    # "unweighted funnel ranks" takes the funnel-unweighted row's ranks, not the funnel row's
    other = {n: [max(1, k // 2) for k in r] for n, r in ranks.items()}
    compare.append_row(tmp_path / "results" / "quality.json",
                       {**s.key, "method": "funnel-unweighted", "setting": setting, "stage": "final", "ranks": other,
                        "macs": compare.count_macs(compare._decomposed(s, other), s.x)})
    compare.main([*tune[:-1], f"{setting} unweighted funnel ranks"])
    rows = json.loads((tmp_path / "results" / "tuning.json").read_text())["rows"]
    assert [r["ranks"] for r in rows] == [ranks, other] and rows[1]["macs"] < macs  # half of those ranks


@pytest.mark.parametrize("methods", [("uniform",), pytest.param(("uniform", "funnel-floor-high"), marks=pytest.mark.slow)])
def test_cache_teacher_gives_the_rows_of_a_run_without_it(compare, tmp_path, monkeypatch, methods):
    """--cache-teacher shares one TeacherCache among a seed's methods: the same rows (the quick profile's
    batches are full, so each image's teacher output does not depend on its batch), marked as cached; a
    baseline's fine-tuning, and with -m slow the funnel flow after it on the same cache."""
    run = ["--exp", "quality", "--profile", "quick", "--no-progress", "--settings", "2x kd 3 epochs",
           "--methods", *methods]
    compare.main(run)
    plain = json.loads((tmp_path / "results" / "quality.json").read_text())["rows"]
    baseline = compare._cache_dir("resnet20", "fashion-mnist", 0, "quick") / "baseline_state_dict.pt"
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "cached")
    monkeypatch.setattr(compare, "CACHE", tmp_path / "cache-2")  # no checkpoint of the first run to resume from
    compare._cache_dir("resnet20", "fashion-mnist", 0, "quick").mkdir(parents=True)
    shutil.copy(baseline, compare._cache_dir("resnet20", "fashion-mnist", 0, "quick"))  # the same baseline, not retrained
    compare.main([*run, "--cache-teacher"])
    cached = json.loads((tmp_path / "cached" / "quality.json").read_text())["rows"]
    same = ("method", "accuracy", "val_accuracy", "macs")
    final = lambda rows: sorted(tuple(r[k] for k in same) for r in rows if r.get("stage", "final") == "final")  # noqa: E731
    assert final(plain) == final(cached) and len(final(cached)) == len(methods)
    assert all(r.get("teacher_cache") is True for r in cached) and not any("teacher_cache" in r for r in plain)
    assert "--cache-teacher" in compare.pool_jobs(compare.argparse.Namespace(
        exp=["quality"], profile="quick", dataset="fashion-mnist", device="cpu", threads=1, retrain_baseline=False,
        cache_teacher=True, heldout=False, models=["resnet20"], seeds=[0], settings=["2x kd 3 epochs"],
        methods=["uniform"]))[0]


def test_the_example_config_is_the_funnel_floor_high_flow_at_2x():
    """examples/funnel-floor-high-2x.toml, which the README offers as the recipe confirmed at 2x, is the
    flow compare.py runs as funnel-floor-high at 2x on the cpu profile, field for field (the budget as
    a speed-up instead of the model's MACs / 2)."""
    import dataclasses

    from fxtucker import CompressConfig
    compare = _load("compare")
    example = CompressConfig.from_toml(ROOT / "examples" / "funnel-floor-high-2x.toml")
    macs = 31_021_952  # ResNet-20 on 28x28 inputs; any even count does
    bench = CompressConfig(**{**compare.PROFILES["cpu"]["flow"], **compare._floor_high_flow(macs // 2, 2)})
    assert example.target_speedup == 2.0 and int(macs / example.target_speedup) == bench.target_macs
    assert dataclasses.replace(example, target_speedup=None, target_macs=bench.target_macs) == bench
    assert example != CompressConfig(target_speedup=2.0)  # not the defaults under another name
