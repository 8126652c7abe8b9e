"""measure_latency(): median wall time of a model's forward pass."""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["measure_latency"]

_BACKENDS = ("eager",)


def measure_latency(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    *,
    backend: str = "eager",
    threads: Optional[int] = None,
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
) -> float:
    """Median forward time in milliseconds, after ``warmup`` untimed runs, in eval mode.

    Args:
        model: any module; it is run under ``torch.inference_mode`` and left in its mode.
        example_inputs: a tensor or a sequence of positional inputs.
        backend: only ``"eager"`` so far.
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards).
        device: only ``"cpu"`` so far.
        warmup, repeats: untimed and timed runs.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported by measure_latency; valid: {list(_BACKENDS)}")
    if device != "cpu":
        raise ValueError(f"device {device!r} is not supported by measure_latency yet; valid: ['cpu']")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    old_threads, was_training = torch.get_num_threads(), model.training
    if threads is not None:
        torch.set_num_threads(threads)
    model.eval()
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(*inputs)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        return 1000.0 * statistics.median(times)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
