"""Shared tolerances and helpers for fxtucker's tests: every tolerance is named here once."""

from __future__ import annotations

import copy
import os
import signal
import subprocess

import pytest
import torch

# Identity rewrites (gates inserted then stripped at threshold 0 without training, restores of
# untouched layers) must be exact up to float re-association.
EXACT = dict(rtol=0.0, atol=0.0)
# Float64 tensor maths (kernels composed, merged, truncated; factors orthonormal): absolute error.
ATOL_FLOAT64 = 1e-10
ATOL_FLOAT64_TIGHT = 1e-12
# Full-rank decomposition in float64: relative error of the output.
REL_FLOAT64 = 1e-10
# The bounds for the whole chain at full rank: relative error < 1e-5 (float64), < 1e-4 (float32).
REL_CHAIN_FLOAT64 = 1e-5
REL_CHAIN_FLOAT32 = 1e-4
# Folding BatchNorm into a conv (computed in float64, stored in the conv's dtype): relative error.
REL_FOLD_FLOAT32 = 1e-5
# Training in float32 with TrainConfig(compile=True) against compile=False: inductor fuses and
# reorders float sums, so after a few SGD steps losses and weights differ by ~1e-7 relative.
TRAIN_COMPILE = dict(rtol=1e-4, atol=1e-6)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with 0/0 = 0."""
    denom = b.double().norm().item()
    num = (a.double() - b.double()).norm().item()
    return 0.0 if num == 0 else num / max(denom, 1e-300)


# Child processes (torchrun, the CLI) get this long before a test gives up on them: CI machines are
# shared, and a run that takes 30 s on a quiet one can take ten times that there.
CHILD_TIMEOUT_S = float(os.environ.get("FXTUCKER_TEST_CHILD_TIMEOUT", "1800"))


@pytest.fixture
def one_thread():
    """One intra-op thread: bitwise-reproducible training needs a fixed summation order (the thread
    count a test found is put back after it by ``_isolated_state``)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """Every test gets its own timing cache (never the user's ~/.cache/fxtucker: timings taken by
    tests must not steer anyone's form choice, nor theirs a test's), the thread count it found, and
    comparisons that do not read the machine's load."""
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path_factory.mktemp("fxtucker-cache")))
    # Comparisons in tests do not ask how busy the machine is (a test of it scripts the CPU times):
    # whether a scripted timing is reliable must not depend on what else runs beside the tests.
    monkeypatch.setattr("fxtucker.latency._cpu_times", lambda: None)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_child(argv: list[str], timeout: float = CHILD_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` in a session of its own: on a timeout
    the whole process group is killed (torchrun's ranks too), so nothing is left loading the machine."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def factor_roles(gm) -> list[tuple[str, str]]:
    """(node name, factor role) of every factor node a decomposition wrote, in graph order."""
    from fxtucker.meta import FactorRecord

    return [(n.name, n.meta["fxtucker"].role) for n in gm.graph.nodes if isinstance(n.meta.get("fxtucker"), FactorRecord)]


def reference(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode, taken before a pass runs."""
    return copy.deepcopy(model).eval()
