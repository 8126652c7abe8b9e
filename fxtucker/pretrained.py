"""Trained starting points shipped with fxtucker: weights that `fxtucker compress` starts from when
it is given no ``--checkpoint``, so that the main job compresses a trained model without training
one first.

Each was trained by fxtucker's own ``fxtucker train`` command (recorded here, to reproduce it) and
is checked against its SHA-256 before it is loaded (with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fxtucker.io import sha256_file

__all__ = ["Shipped", "SHIPPED", "shipped", "verified_path"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Shipped:
    """One shipped state_dict: which model and dataset, the file, its hash, how it was made."""

    model: str
    dataset: str
    file: str  # under fxtucker/weights/
    sha256: str
    test_accuracy: float  # on the dataset's whole test set, as train.json recorded it
    epochs: int
    command: str  # the `fxtucker train` command that reproduces it

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


#: Each file's training log (loss and test accuracy after every epoch) is beside it as ``<file stem>.train.json``.
SHIPPED: tuple[Shipped, ...] = (
    Shipped("resnet20", "fashion-mnist", "resnet20-fashion-mnist.pt",
            "32ff249d7939ac5ed06e49f9dd002680d836d52cb0fc737751910b150594e86e", 0.9347, 15,
            "fxtucker train --model resnet20 --dataset fashion-mnist --epochs 15 --threads 1 --seed 0"),
)


def shipped(model: str, dataset: str) -> Optional[Shipped]:
    """The shipped weights for ``model`` on ``dataset`` (names as the CLI takes them), or None."""
    return next((s for s in SHIPPED if s.model == model.lower() and s.dataset == dataset), None)


def verified_path(entry: Shipped) -> Path:
    """The file of ``entry`` after checking that it exists and that its SHA-256 is the recorded one."""
    path = entry.path
    if not path.is_file() or path.is_symlink():
        raise FileNotFoundError(f"the shipped weights {entry.file!r} for {entry.model} on {entry.dataset} are missing "
                                f"from {WEIGHTS_DIR}; reinstall fxtucker, or pass --checkpoint, or --baseline-epochs "
                                f"to train the baseline here")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ValueError(f"the shipped weights {str(path)!r} have SHA-256 {digest}, not the recorded {entry.sha256}: "
                         f"the file was changed; reinstall fxtucker, or pass --checkpoint or --baseline-epochs")
    return path
