"""The weights fxtucker ships (fxtucker/pretrained.py): each file is the one recorded, loads into its
model without missing or unexpected keys, and gives the recorded test accuracy."""

import json

import pytest
import torch

from fxtucker import data, pretrained
from fxtucker.models import get_model
from fxtucker.train import evaluate

SHIPPED = pytest.mark.parametrize("entry", pretrained.SHIPPED, ids=lambda e: f"{e.model}-{e.dataset}")


def test_something_is_shipped():
    assert pretrained.shipped("resnet20", "fashion-mnist") is not None  # the README's main job starts from it


@SHIPPED
def test_shipped_weights_are_the_recorded_file_and_load_strictly(entry):
    path = pretrained.verified_path(entry)  # the SHA-256 checked
    assert path.parent == pretrained.WEIGHTS_DIR and path.stat().st_size < 5 * 2**20  # small enough for the package
    assert entry.command.startswith(f"fxtucker train --model {entry.model} --dataset {entry.dataset}")
    assert f"--epochs {entry.epochs}" in entry.command
    log = json.loads(path.with_name(path.stem + ".train.json").read_text())  # the training run's own record
    assert (log["sha256"], log["test_accuracy"], log["epochs"]) == (entry.sha256, entry.test_accuracy, entry.epochs)
    assert log["command"].startswith(entry.command) and len(log["history"]) == entry.epochs
    in_ch, n_cls, _ = data.dataset_info(entry.dataset)
    model = get_model(entry.model, num_classes=n_cls, in_channels=in_ch)
    model.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, nothing extra


@SHIPPED
def test_shipped_weights_give_their_recorded_test_accuracy(entry):
    try:
        test_set = data.get_dataset(entry.dataset, False)
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"{entry.dataset} is not installed: {e}")
    in_ch, n_cls, _ = data.dataset_info(entry.dataset)
    model = get_model(entry.model, num_classes=n_cls, in_channels=in_ch)
    model.load_state_dict(torch.load(pretrained.verified_path(entry), weights_only=True))
    accuracy = evaluate(model.eval(), data.make_loader(test_set, 256, False))
    # train.json measured it on one thread; another thread count may flip an argmax tie or two
    assert len(test_set) == 10_000 and abs(accuracy - entry.test_accuracy) <= 2 / len(test_set)
