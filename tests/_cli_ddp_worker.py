"""Started by torchrun from tests/test_distributed.py: `fxtucker compress` on several CPU processes.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/_cli_ddp_worker.py RESULT_DIR KILL_AT fxtucker-args...

It runs ``fxtucker.cli.main`` with the given arguments, as ``torchrun -m fxtucker`` does, and records
per rank what fxtucker writes only on rank 0: the gate values and threshold each rank strips at,
its lambda at the end of step 3 and its final compressed state_dict (RESULT_DIR/rank<r>.pt).
KILL_AT ``STAGE:EPOCHS`` (or ``-``) SIGKILLs every rank once the checkpoint of that stage after
that many epochs is written, as a killed job would be.
"""

import importlib
import os
import signal
import sys

import torch

from fxtucker.cli import main

# The modules, not the functions that fxtucker/__init__ exports under the same names.
compress_module = importlib.import_module("fxtucker.compress")
pipeline_module = importlib.import_module("fxtucker.pipeline")
checkpoint_module = importlib.import_module("fxtucker.checkpoint")


def run(result_dir: str, kill_at: str, argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    record: dict = {}

    strip_gates = pipeline_module.strip_gates

    def recording_strip_gates(gated, threshold, *args, **kwargs):
        record["gates"] = {k: v.detach().clone() for k, v in gated.state_dict().items() if "gate" in k}
        record["threshold"] = threshold
        return strip_gates(gated, threshold, *args, **kwargs)

    compress = compress_module.compress

    def recording_compress(*args, **kwargs):
        result = compress(*args, **kwargs)
        record["model"] = result.model.state_dict()
        record["report"] = {k: result.report[k] for k in ("macs_after", "threshold", "accuracy_after")}
        record["reg_weight"] = [r.get("reg_weight") for r in result.history if r["stage"] == "regularize"]
        torch.save(record, os.path.join(result_dir, f"rank{rank}.pt"))
        return result

    pipeline_module.strip_gates = recording_strip_gates
    compress_module.compress = recording_compress

    if kill_at != "-":
        stage, epochs = kill_at.split(":")
        save_epoch = checkpoint_module.CheckpointFiles.save_epoch

        def killing_save_epoch(files, what, progress, ctx):
            save_epoch(files, what, progress, ctx)
            if files.stage == stage and progress.epoch == int(epochs):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint_module.CheckpointFiles.save_epoch = killing_save_epoch
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
