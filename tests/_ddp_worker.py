"""Started twice by torchrun from tests/test_train.py: a 2-process gloo run of fxtucker.train.

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/_ddp_worker.py RUN_DIR RESULT_DIR [compile]

Each rank builds the tiny model from a different seed (DDP must broadcast rank 0's weights),
trains on a dataset that records which items it served, and writes its final state_dict, its
history and the served indices to RESULT_DIR; train() itself writes only under RUN_DIR. With
``compile``, the training step runs under torch.compile (``TrainConfig(compile=True)``).
"""

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fxtucker.train import TrainConfig, train


class Recording(Dataset):
    """A map-style dataset that remembers the indices it was asked for."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.seen = x, y, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.x[i], self.y[i]


def main(run_dir: str, result_dir: str, compiled: bool = False) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    data = Recording(x, y)
    torch.manual_seed(100 + rank)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4)
    )
    history = train(
        model,
        DataLoader(data, batch_size=8, shuffle=True),
        TrainConfig(epochs=2, lr=0.05, compile=compiled),
        eval_data=DataLoader(TensorDataset(x, y), batch_size=16),
        out_dir=run_dir,
        progress=False,
    )
    torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"history": history, "seen": data.seen}, f)
    # Both ranks reach here before either tears gloo down: otherwise the later rank can abort
    # in its teardown ("terminate called without an active exception") once the other has exited.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:] == ["compile"])
