"""measure_latency: median wall time, mode and threads restored, clear errors."""

import pytest
import torch
import torch.nn as nn

from fxtucker.latency import measure_latency


def test_measures_and_restores_state():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5)).train()
    threads = torch.get_num_threads()
    ms = measure_latency(model, torch.randn(1, 3, 16, 16), threads=1, warmup=1, repeats=3)
    assert ms > 0 and model.training and torch.get_num_threads() == threads


def test_slower_model_measures_slower():
    small, big = nn.Conv2d(8, 8, 1), nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)])
    assert measure_latency(big, torch.randn(1, 64, 32, 32), repeats=5) > measure_latency(small, torch.randn(1, 8, 4, 4), repeats=5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="tvm"), r"backend 'tvm' is not supported by measure_latency; valid: \['eager'\]"),
    (dict(device="cuda"), r"device 'cuda' is not supported by measure_latency yet; valid: \['cpu'\]"),
    (dict(repeats=0), r"repeats must be >= 1 and warmup >= 0, got repeats=0, warmup=3"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency(nn.Identity(), torch.randn(1), **kwargs)
