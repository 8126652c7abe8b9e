"""One compress() run on the quick main job's data, printing every regularized epoch: how the
flow's design was tuned (see RESULTS.md, "How the defaults were chosen").

    .venv/bin/python benchmarks/design_runs.py LAMBDA REG_EPOCHS ['{"config": "overrides"}'] [BASELINE]

BASELINE is the baseline state_dict the quick main job writes (default
runs/resnet20-fashion-mnist-quick/baseline_state_dict.pt): run the main job first.
"""
import sys, time, json, torch
torch.set_num_threads(1)
from fxtucker import data, models
from fxtucker.compress import CompressConfig, compress
lam0 = float(sys.argv[1]); reg_epochs = int(sys.argv[2]); extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
tr = data.make_loader(data.get_dataset("fashion-mnist", True), 128, True, subset=10000, seed=0)
ev = data.make_loader(data.get_dataset("fashion-mnist", False), 256, False, subset=2000, seed=0)
m = models.get_model("resnet20", 10, 1)
m.load_state_dict(torch.load(sys.argv[4] if len(sys.argv) > 4 else "runs/resnet20-fashion-mnist-quick/baseline_state_dict.pt", weights_only=True))
cfg = CompressConfig(**{**dict(train_epochs=0, reg_epochs=reg_epochs, finetune_epochs=0, reg_weight=lam0, target_speedup=2.0), **extra})
t0 = time.time()
r = compress(m, tr, torch.randn(1, 1, 28, 28), eval_data=ev, config=cfg, progress=False)
for h in r.history:
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items() if k in ("stage", "epoch", "ce", "penalty", "accuracy", "reg_weight", "threshold", "macs_if_stripped", "gates_below_threshold")}))
print({k: v.get("accuracy") for k, v in r.report["stages"].items()}, "threshold", r.report["threshold"], "macs", r.report["macs_before"], r.report["macs_after"], "time", round(time.time() - t0))
print("hist regularized", r.report["stages"]["regularized"]["gate_histogram"]["counts"])
