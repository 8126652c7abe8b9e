"""measure_latency(): median wall time of a model's forward pass on a back end, and a timing cache.

Back ends: ``"eager"`` (the module as it is), ``"compile"`` (``torch.compile``, inductor),
``"compile-freezing"`` (the same with inductor's ``freezing``: weights folded into the graph as
constants, as production torch.compile users run inference) and ``"onnxruntime"`` (exported with ``torch.onnx.export`` and run by an ``onnxruntime.InferenceSession``).
Devices: ``"cpu"`` (wall time, ``time.perf_counter``) and ``"cuda"`` (CUDA events).

Every speed-up fxtucker prints (``fxtucker bench``, ``fxtucker inspect``, the report of
``fxtucker compress``) comes from :func:`compare_latency`: the two models are timed alternately
over several rounds with :func:`measure_latency`, the round with the median speed-up is kept, and
when the rounds' speed-ups disagree by more than :data:`MAX_SPREAD` (max / min) the result is
marked unreliable and no number is printed.

:class:`TimingCache` keeps timings in a JSON file under the user's cache directory
(:func:`cache_dir`), so that back-end-aware passes time each layer shape once per machine.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from fxtucker.io import write_atomic

__all__ = ["measure_latency", "measure_side_by_side", "compare_latency", "LatencyComparison", "MAX_SPREAD", "default_backend",
           "BACKENDS", "DEVICES", "cache_dir", "TimingCache", "check_backend", "check_device"]

BACKENDS = ("eager", "compile", "compile-freezing", "onnxruntime")
#: inductor options of each torch.compile back end
COMPILE_OPTIONS = {"compile": {}, "compile-freezing": {"freezing": True}}
DEVICES = ("cpu", "cuda")
_EXPORT_HINT = "pip install fxtucker[export]"


def check_backend(backend: object, where: str = "measure_latency") -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ValueError naming the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not supported by {where}; valid: {list(BACKENDS)}")
    return backend


def check_device(device: object, where: str = "measure_latency") -> str:
    """``device`` if it is "cpu", "cuda" or "cuda:N" (and CUDA is there), else a ValueError."""
    kind = device.split(":")[0] if isinstance(device, str) else None
    if kind not in DEVICES or (kind == "cpu" and device != "cpu"):
        raise ValueError(f"device {device!r} is not supported by {where}; valid: {list(DEVICES)} (or 'cuda:N')")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch.cuda.is_available() is False on this machine; "
                         f"use device='cpu'")
    return device


def default_backend() -> str:
    """The fastest back end installed here: ``"onnxruntime"`` when onnx, onnxruntime and onnxscript are
    (``pip install fxtucker[export]``), else ``"eager"`` (``"compile"`` needs a compiler and minutes of
    compiling per model, so it is never chosen for the user)."""
    import importlib.util

    if all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript")):
        return "onnxruntime"
    return "eager"


def _onnxruntime():
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError as exc:
        raise ImportError(f"backend='onnxruntime' needs the onnx and onnxruntime packages ({exc.name} is missing): "
                          f"{_EXPORT_HINT}") from exc
    return onnxruntime


def _export_onnx(model: nn.Module, inputs: tuple, path: str) -> None:
    """torch.onnx.export, quietly: the TorchScript exporter (fast) and, where it fails, the dynamo one."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, inputs, path, dynamo=False)
        except Exception:  # noqa: BLE001 - e.g. an op the TorchScript exporter lacks; the dynamo exporter may have it
            try:
                import onnxscript  # noqa: F401
            except ImportError as exc:
                raise ImportError(f"exporting this model to ONNX needs onnxscript: {_EXPORT_HINT}") from exc
            torch.onnx.export(model, inputs, path, dynamo=True)


def _onnx_runner(model: nn.Module, inputs: tuple, threads: Optional[int], device: str,
                 spinning: Optional[bool] = None) -> Callable[[], Any]:
    ort = _onnxruntime()
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"backend='onnxruntime' on device {device!r} needs onnxruntime's CUDAExecutionProvider "
                             f"(pip install onnxruntime-gpu); available: {ort.get_available_providers()}")
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    cpu_model = copy.deepcopy(model).cpu().eval()
    cpu_inputs = tuple(t.detach().cpu() for t in inputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if spinning is not None:  # None: onnxruntime's default (its worker threads spin between tasks)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    with tempfile.TemporaryDirectory(prefix="fxtucker-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        _export_onnx(cpu_model, cpu_inputs, path)
        session = ort.InferenceSession(path, options, providers=providers)  # reads the files; they may go
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(cpu_inputs):
        raise ValueError(f"the exported ONNX graph has {len(names)} inputs {names}, but {len(cpu_inputs)} example "
                         f"inputs were given (an input the model does not use is dropped by the exporter)")
    feed = {n: t.numpy() for n, t in zip(names, cpu_inputs)}
    return lambda: session.run(None, feed)


def _check_inputs(example_inputs: Union[torch.Tensor, Sequence[Any]]) -> tuple:
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"measure_latency: example_inputs must be a tensor or a tuple/list of positional inputs, "
                        f"got {type(example_inputs).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.dim() and t.numel() == 0:
            raise ValueError(f"measure_latency: example input {i} has shape {tuple(t.shape)}: it holds no elements, so "
                             f"there is nothing to time; pass one batch of at least one sample")
    # Copies: a model that changes its input in place must not change the caller's tensors.
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


def measure_latency(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    *,
    backend: str = "eager",
    threads: Optional[int] = None,
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    spinning: Optional[bool] = None,
) -> float:
    """Median forward time in milliseconds, after ``warmup`` untimed runs, in eval mode, no autograd.

    Args:
        model: any module; it is left in its mode (and on its device: other devices get a copy).
        example_inputs: a tensor or a sequence of positional inputs (tensors for ``"onnxruntime"``).
        backend: ``"eager"`` (the module as it is), ``"compile"`` (``torch.compile(model,
            dynamic=False)`` with inductor; compiling happens in one extra untimed call before
            the warm-up), ``"compile-freezing"`` (the same with ``options={"freezing": True}``:
            the weights become constants of the compiled graph, which inductor can fold) or ``"onnxruntime"`` (``torch.onnx.export`` to a temporary directory,
            then an ``onnxruntime.InferenceSession`` with ``intra_op_num_threads = threads``;
            needs ``pip install fxtucker[export]``).
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards) and the
            onnxruntime intra-op threads; None keeps torch's current setting.
        device: ``"cpu"`` (wall time) or ``"cuda"`` / ``"cuda:N"`` (CUDA events around each run;
            onnxruntime on CUDA is timed by wall clock, its outputs come back to the host).
        warmup, repeats: untimed and timed runs.
        spinning: ``"onnxruntime"`` only: whether its worker threads spin while they wait for work
            (the session option ``session.intra_op.allow_spinning``); None keeps onnxruntime's
            default, which spins. Spinning saves a thread's wake-up between operators on a quiet
            machine and takes the cores from everything else on a busy one (measured in
            ``benchmarks/RESULTS.md``, issue 20, session 19).

    Returns:
        The median of ``repeats`` timed runs, in milliseconds.

    Example::

        >>> ms = measure_latency(model, torch.randn(1, 3, 224, 224), backend="compile", threads=2)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure_latency: model must be an nn.Module, got {type(model).__name__}")
    _check_timing(backend, device, warmup, repeats, threads, spinning)
    inputs = _check_inputs(example_inputs)
    with _threads(threads), _runner(model, inputs, backend, threads, device, spinning) as run:
        for _ in range(warmup):
            run()
        return statistics.median(run() for _ in range(repeats))


def _check_timing(backend: object, device: object, warmup: object, repeats: object, threads: object,
                  spinning: object = None) -> None:
    check_backend(backend)
    check_device(device)
    if (isinstance(repeats, bool) or isinstance(warmup, bool) or not isinstance(repeats, int)
            or not isinstance(warmup, int) or repeats < 1 or warmup < 0):
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None (torch's current setting), got {threads!r}")
    if spinning is not None and not isinstance(spinning, bool):
        raise ValueError(f"spinning must be True, False or None (onnxruntime's default), got {spinning!r}")
    if spinning is not None and backend != "onnxruntime":
        raise ValueError(f"spinning={spinning} is an onnxruntime session option; backend {backend!r} has no "
                         f"such setting: pass spinning=None, or backend='onnxruntime'")


@contextlib.contextmanager
def _threads(threads: Optional[int]):
    """torch's intra-op threads set to ``threads`` (None: left as they are), restored after."""
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _runner(model: nn.Module, inputs: tuple, backend: str, threads: Optional[int], device: str,
            spinning: Optional[bool] = None):
    """A callable that runs ``model`` once on ``backend`` and returns the milliseconds it took
    (exported, compiled and compiled-once first: nothing of that is timed); ``model``'s mode is
    restored on exit."""
    cuda = device.startswith("cuda")
    was_training = model.training
    try:
        if backend == "onnxruntime":
            if not all(isinstance(t, torch.Tensor) for t in inputs):
                raise TypeError("backend='onnxruntime' needs tensor inputs only")
            forward = _onnx_runner(model, inputs, threads, device, spinning)
            cuda = False  # the session copies outputs back to the host: wall time is the time
        else:
            target = model
            if cuda or any(p.device.type != "cpu" for p in model.parameters()):
                target = model if _on(model, device) else copy.deepcopy(model).to(device)
                inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
            target.eval()
            compiled = backend in COMPILE_OPTIONS
            fn = (torch.compile(target, dynamic=False, options=COMPILE_OPTIONS[backend] or None) if compiled
                  else target)

            def forward():
                with torch.inference_mode():
                    return fn(*inputs)

            if compiled:
                forward()  # compilation: part of the warm-up, never timed

        def run() -> float:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                forward()
                end.record()
                torch.cuda.synchronize(device)
                return start.elapsed_time(end)
            start = time.perf_counter()
            forward()
            return 1000.0 * (time.perf_counter() - start)

        yield run
    finally:
        model.train(was_training)


#: Runs per turn when models are timed in turn (:func:`compare_latency`'s ``interleave``): a
#: back end's worker threads may spin for a while after a run (onnxruntime's do) and take the
#: cores from the other model's next run; in a block of runs that falls on the first only.
BLOCK = 5


def _interleaved_round(models: Sequence[nn.Module], example_inputs: Union[torch.Tensor, Sequence[Any]], *,
                       backend: str = "eager", threads: Optional[int] = None, device: str = "cpu", warmup: int = 3,
                       repeats: int = 20, block: int = BLOCK, spinning: Optional[bool] = None) -> list[float]:
    """One round of every model prepared as :func:`measure_latency` prepares it, then run in turn,
    ``block`` runs at a time (A A A B B B A A A ...), ``warmup`` untimed and ``repeats`` timed runs
    each: each model's median milliseconds, in the order given. A slow phase of the machine longer
    than a few runs falls on every model alike."""
    _check_timing(backend, device, warmup, repeats, threads, spinning)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1 (runs per turn), got {block!r}")
    inputs = _check_inputs(example_inputs)
    with _threads(threads), contextlib.ExitStack() as stack:
        runs = [stack.enter_context(_runner(m, inputs, backend, threads, device, spinning)) for m in models]
        for run in runs:
            for _ in range(warmup):
                run()
        times: list[list[float]] = [[] for _ in runs]
        for start in range(0, repeats, block):
            for t, run in zip(times, runs):
                t.extend(run() for _ in range(min(block, repeats - start)))
    return [statistics.median(t) for t in times]


def _alternate(models: Sequence[nn.Module], example_inputs: Union[torch.Tensor, Sequence[Any]], rounds: int,
               on_round: Optional[Callable[[int], None]] = None, interleave: bool = False,
               **kwargs: Any) -> list[list[float]]:
    """Per model, its time in each round, the models in reverse order every other round: its
    :func:`measure_latency`, or with ``interleave`` its median in :func:`_interleaved_round`."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    times: list[list[float]] = [[] for _ in models]
    for r in range(rounds):
        order = list(range(len(models)))
        order = order if r % 2 == 0 else order[::-1]
        if interleave:
            for i, ms in zip(order, _interleaved_round([models[i] for i in order], example_inputs, **kwargs)):
                times[i].append(ms)
        else:
            for i in order:
                times[i].append(measure_latency(models[i], example_inputs, **kwargs))
        if on_round is not None:
            on_round(r)
    return times


def measure_side_by_side(models: Sequence[nn.Module], example_inputs: Union[torch.Tensor, Sequence[Any]], *,
                         rounds: int = 3, **kwargs: Any) -> list[float]:
    """Each model's median over ``rounds`` of :func:`measure_latency` (``kwargs`` passed on), the
    models timed alternately, in reverse order every other round (A B, B A, ...), so that a slow
    phase of a shared machine falls on all of them. Milliseconds, in the order of ``models``.

    To compare two models use :func:`compare_latency`, which also says whether the rounds agree."""
    return [statistics.median(t) for t in _alternate(models, example_inputs, rounds, **kwargs)]


# The rounds' speed-ups (baseline ms / candidate ms, one per round) may differ by at most this factor,
# max / min, for a timing to count as reliable: 1.2 means that no counted round saw a speed-up more
# than 20% away from another's. A machine busy with other work makes single rounds fast or slow at
# random; a spread above this says that a rerun could well print another number.
MAX_SPREAD = 1.2
# From this many rounds on, the fastest and the slowest round's speed-ups are left out of the spread:
# a shared VM stalls single rounds even when nothing else runs. Measured (benchmarks/quick_job.py
# --rule-table, benchmarks/RESULTS.md, session 17) on 24 repeated timings of the main job's deployed
# model: with every round counted, 5 rounds gave a number in 14 of 16 runs on a quiet machine and 1
# of 8 beside two training runs; the middle 5 of 7 in 16 of 16 and 2 of 8; the numbers either rule
# gave lay within 1.18x of each other, inside the 1.2x stated.
TRIM_FROM = 7
#: The default number of rounds: enough for the spread to leave out the extreme two.
ROUNDS = 7
# The largest share of the machine's CPU time that other processes may use while two models are
# timed for the timing to count as reliable. On a busy machine the rounds can agree and still give
# another speed-up than a quiet one: measured (benchmarks/RESULTS.md, issue 20, session 19) on a
# model compressed by the main job's recipe, onnxruntime's threads not spinning, timed in turn, the
# reliable timings gave 1.58x-1.62x on a quiet machine and 1.95x-2.08x beside two one-thread
# training runs, which used about half of the CPU time. A quarter is less than one busy core of two;
# the share is of the whole machine, so where it has many more cores than the timing's threads, a
# higher share may leave the timing its cores (raise max_others there).
MAX_OTHERS = 0.25
#: The fewest ticks of the machine's CPU time (all CPUs together; usually 100 a second per CPU)
#: over which the share of other processes is judged.
MIN_TICKS = 100
#: Under this share of the machine's CPU time used by other processes, a timing whose rounds disagree
#: is not blamed on a busy machine: the rounds vary on their own (the main job's batch-1 runs of a
#: third of a millisecond on onnxruntime did so with other processes at 0%, session 23).
QUIET = 0.05


def _cpu_times() -> Optional[tuple[int, int, int]]:
    """(every CPU's jiffies, those not idle, this process's and its descendants') from Linux's
    /proc; None without it. Descendants count as this process (inductor compiles in worker
    processes), and so do the exited children that it or they have waited for (cutime, cstime)."""
    try:
        cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        values = [int(v) for v in cpu[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    parent, used = {}, {}
    for d in Path("/proc").glob("[0-9]*"):
        try:  # fields 4 (ppid), 14-17 (utime, stime, cutime, cstime) of proc(5), after the ")" of the name
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            parent[int(d.name)], used[int(d.name)] = int(f[1]), sum(int(v) for v in f[11:15])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not readable
    if os.getpid() not in used:
        return None
    mine, todo = 0, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        mine += used.get(pid, 0)
        todo += children.get(pid, [])
    total = sum(values)
    return total, total - values[3] - values[4], mine


@contextlib.contextmanager
def _others_cpu():
    """Yields a list that holds, on exit, the share of the machine's CPU time (0 to 1) that other
    processes used meanwhile (time stolen by the hypervisor counts as theirs); empty where /proc
    cannot say, or where less than :data:`MIN_TICKS` of CPU time passed (the machine's counters
    move in whole ticks: a shorter window is mostly rounding)."""
    share: list[float] = []
    start = _cpu_times()
    yield share
    end = _cpu_times()
    if start is not None and end is not None and end[0] - start[0] >= MIN_TICKS:
        share.append(min(1.0, max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))))


def spread_rule(rounds: int, max_spread: float, max_others: Optional[float] = None) -> str:
    """How :class:`LatencyComparison` decides that a timing is unreliable, in words."""
    counted = f"the middle {rounds - 2} of the {rounds} rounds' speed-ups" if rounds >= TRIM_FROM else \
        "the rounds' speed-ups"
    busy = ("" if max_others is None or max_others >= 1 else
            f" or other processes use more than {max_others:.0%} of the CPU time meanwhile")
    return f"unreliable when {counted} differ by more than {max_spread:.2f}x{busy}"


@dataclass(frozen=True)
class LatencyComparison:
    """Two models timed alternately over rounds by :func:`compare_latency`; milliseconds per round.

    The kept round is the one whose speed-up is the median (the lower of the two middle ones for an
    even count), so its two times and its speed-up belong together. ``reliable`` is False when the
    counted rounds' speed-ups differ by more than ``max_spread`` (max / min; with :data:`TRIM_FROM`
    rounds or more the fastest and the slowest are not counted): then :meth:`describe` says so and
    :meth:`to_dict` gives no speed-up. It is unreliable too when other processes used more than
    ``max_others`` of the machine's CPU time meanwhile (``others_cpu``; None where it was not known).
    """

    backend: str
    device: str
    threads: int
    input_shape: tuple[int, ...]
    baseline_rounds_ms: tuple[float, ...]
    candidate_rounds_ms: tuple[float, ...]
    max_spread: float = MAX_SPREAD
    repeats: int = 20
    interleaved: bool = False
    spinning: Optional[bool] = None
    others_cpu: Optional[float] = None
    max_others: float = MAX_OTHERS

    @property
    def batch(self) -> Optional[int]:
        return self.input_shape[0] if self.input_shape else None

    @property
    def rounds(self) -> int:
        return len(self.baseline_rounds_ms)

    @property
    def ratios(self) -> tuple[float, ...]:
        """The speed-up of each round: baseline ms / candidate ms."""
        return tuple(b / c if c > 0 else math.inf for b, c in zip(self.baseline_rounds_ms, self.candidate_rounds_ms))

    @property
    def counted(self) -> tuple[float, ...]:
        """The speed-ups the spread is taken over: every round's, or from :data:`TRIM_FROM` rounds on
        all but the fastest and the slowest."""
        r = sorted(self.ratios)
        return tuple(r[1:-1] if len(r) >= TRIM_FROM else r)

    @property
    def spread(self) -> float:
        """max / min of the counted rounds' speed-ups (1.0: they all agreed)."""
        r = self.counted
        return max(r) / min(r) if min(r) > 0 else math.inf

    @property
    def busy(self) -> bool:
        """Whether other processes used more than ``max_others`` of the CPU time while timing."""
        return self.others_cpu is not None and self.others_cpu > self.max_others

    @property
    def reliable(self) -> bool:
        return self.spread <= self.max_spread and not self.busy

    @property
    def kept_round(self) -> int:
        return self.ratios.index(statistics.median_low(self.ratios))

    @property
    def baseline_ms(self) -> float:
        return self.baseline_rounds_ms[self.kept_round]

    @property
    def candidate_ms(self) -> float:
        return self.candidate_rounds_ms[self.kept_round]

    @property
    def speedup(self) -> float:
        return self.ratios[self.kept_round]

    def setting(self) -> str:
        """What was timed and how, e.g. ``onnxruntime, cpu, batch 64 (64x1x28x28), 2 thread(s), ...``."""
        shape = "x".join(map(str, self.input_shape))
        how = (f"in turn, {BLOCK} runs at a time, {self.repeats} runs each, in {self.rounds} round(s)"
               if self.interleaved else f"over {self.rounds} round(s) of {self.repeats} runs")
        spin = "" if self.spinning is None else f" ({'' if self.spinning else 'not '}spinning)"
        if self.others_cpu is not None:
            others = f"; other processes used {self.others_cpu:.0%} of the CPU time"
        elif self.max_others < 1:  # the rule above names max_others: say that it could not be applied
            others = (f"; the CPU time of other processes was not measured (a timing shorter than "
                      f"{MIN_TICKS} ticks of the machine's CPU time, or no Linux /proc), so only the spread was checked")
        else:
            others = ""
        return (f"{self.backend}, {self.device}, batch {self.batch} ({shape}), {self.threads} thread(s){spin}; timed "
                f"alternately {how}, the median round kept, "
                + spread_rule(self.rounds, self.max_spread, self.max_others) + others)

    def unreliable_reason(self) -> str:
        if self.busy:
            return (f"timing unreliable: other processes used {self.others_cpu:.0%} of the machine's CPU time while the "
                    f"models were timed (more than {self.max_others:.0%} allowed), and a busy machine can give another "
                    f"speed-up than a quiet one even when the rounds agree: rerun when it is quiet")
        r, c = self.ratios, self.counted
        middle = (f", the middle {len(c)} from {min(c):.2f}x to {max(c):.2f}x" if len(c) < len(r) else "")
        runs = self.baseline_rounds_ms + self.candidate_rounds_ms
        if self.others_cpu is not None and self.others_cpu < QUIET:
            # measured quiet: the rounds differ on their own (runs of a fraction of a millisecond, say)
            why = (f"other processes used {self.others_cpu:.0%} of the machine's CPU time meanwhile, so the rounds "
                   f"vary on their own at this size (runs of {min(runs):.3g} to {max(runs):.3g} ms): rerun with "
                   f"more runs per round or more rounds")
        else:
            why = "the machine is probably busy: rerun when it is quiet, or with more rounds"
        return (f"timing unreliable: the {self.rounds} rounds' speed-ups range from {min(r):.2f}x to {max(r):.2f}x"
                f"{middle} (spread {self.spread:.2f}x > {self.max_spread:.2f}x allowed); {why}")

    def describe(self) -> str:
        """``"2.18 -> 1.02 ms, 2.14x"``, or why no number is given."""
        if not self.reliable:
            return self.unreliable_reason()
        return f"{self.baseline_ms:.2f} -> {self.candidate_ms:.2f} ms, {self.speedup:.2f}x"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the setting, every round, the spread; the kept times and speed-up only when reliable."""
        d = {f.name: (list(v) if isinstance(v, tuple) else v)
             for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        d.update(batch=self.batch, ratios=list(self.ratios), counted=list(self.counted), spread=self.spread,
                 reliable=self.reliable, kept_round=self.kept_round)
        kept = dict(baseline_ms=self.baseline_ms, candidate_ms=self.candidate_ms, speedup=self.speedup)
        d.update(kept if self.reliable else {k: None for k in kept})
        if not self.reliable:
            d["note"] = self.unreliable_reason()
        return d


def compare_latency(baseline: nn.Module, candidate: nn.Module, example_inputs: Union[torch.Tensor, Sequence[Any]],
                    *, rounds: int = ROUNDS, max_spread: float = MAX_SPREAD, backend: str = "eager",
                    threads: Optional[int] = None, device: str = "cpu", warmup: int = 3, repeats: int = 20,
                    on_round: Optional[Callable[[int], None]] = None, interleave: bool = False,
                    spinning: Optional[bool] = None, max_others: float = MAX_OTHERS) -> LatencyComparison:
    """Time ``baseline`` and ``candidate`` alternately over ``rounds`` and keep the median round.

    Each round times both models with :func:`measure_latency` (median of ``repeats`` runs after
    ``warmup``), in reverse order every other round, so a slow phase of a shared machine falls on
    both. The round whose speed-up (baseline / candidate) is the median is kept; the result is
    unreliable when the rounds' speed-ups differ by more than ``max_spread`` (max / min; see
    :data:`MAX_SPREAD`), the fastest and the slowest left out from :data:`TRIM_FROM` rounds on.
    With one round there is nothing to compare, so use three or more; the default is 7.

    Args:
        baseline, candidate: the two models (e.g. the BN-folded original and the deployed model).
        example_inputs: one batch at the shape to time.
        rounds: alternating rounds (>= 1).
        max_spread: the largest max / min of the counted rounds' speed-ups still reliable (>= 1).
        max_others: the largest share of the whole machine's CPU time (0 to 1) that other processes
            may use while this function runs (export, compilation and timing; see :data:`MAX_OTHERS`;
            Linux only, and not for runs shorter than :data:`MIN_TICKS`); 1 never calls a timing
            unreliable for it.
        backend, threads, device, warmup, repeats, spinning: as in :func:`measure_latency`.
        on_round: called with the round's index after each round (a progress bar, say).
        interleave: within each round, prepare both models and run them in turn, :data:`BLOCK`
            runs at a time, instead of one model's ``repeats`` runs after the other's. Measured on
            the main job's deployed model (``benchmarks/RESULTS.md``, session 18): beside two
            training runs it left 11 of 11 timings reliable against 2 of 11; on the machine alone
            2 of 14 against 7 of 14, with rounds where the smaller model ran slower than the
            original: onnxruntime's spinning threads of one model take the cores from the other's
            runs. With ``spinning=False`` the timings in turn agreed on a quiet machine (session
            19), but not spinning times a slower deployment at batch 1. So it is not the default.

    Returns:
        A :class:`LatencyComparison`; ``str(result.describe())`` is what to print.

    Example::

        >>> cmp = compare_latency(optimize_for_inference(model, x), deployed, x, backend="onnxruntime")
        >>> print(cmp.describe() if cmp.reliable else cmp.unreliable_reason())
    """
    if (isinstance(max_spread, bool) or not isinstance(max_spread, (int, float)) or not math.isfinite(max_spread)
            or max_spread < 1):
        raise ValueError(f"max_spread must be a finite number >= 1 (the largest max / min of the rounds' speed-ups), "
                         f"got {max_spread!r}")
    if (isinstance(max_others, bool) or not isinstance(max_others, (int, float)) or not 0 <= max_others <= 1):
        raise ValueError(f"max_others must be a number from 0 to 1 (the largest share of the machine's CPU time other "
                         f"processes may use while timing), got {max_others!r}")
    with _others_cpu() as others:
        base, cand = _alternate([baseline, candidate], example_inputs, rounds, on_round, interleave=interleave,
                                backend=backend, threads=threads, device=device, warmup=warmup, repeats=repeats,
                                spinning=spinning)
    first = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    shape = tuple(first[0].shape) if first and isinstance(first[0], torch.Tensor) else ()
    return LatencyComparison(backend=backend, device=device, threads=threads or torch.get_num_threads(),
                             input_shape=shape, baseline_rounds_ms=tuple(base), candidate_rounds_ms=tuple(cand),
                             max_spread=float(max_spread), repeats=repeats, interleaved=interleave,
                             spinning=spinning, others_cpu=others[0] if others else None,
                             max_others=float(max_others))


def _on(model: nn.Module, device: str) -> bool:
    """Whether every parameter and buffer of ``model`` already lives on ``device``."""
    want = torch.device(device)
    tensors = list(model.parameters()) + list(model.buffers())
    return all(t.device.type == want.type and (want.index is None or t.device.index == want.index) for t in tensors)


def cache_dir() -> Path:
    """Where fxtucker caches timings: ``$FXTUCKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxtucker``,
    else ``~/.cache/fxtucker``."""
    if os.environ.get("FXTUCKER_CACHE_DIR"):
        return Path(os.environ["FXTUCKER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxtucker"


class TimingCache:
    """Latencies in milliseconds by key, in ``cache_dir() / "latency.json"``.

    Keys are built by :meth:`key` from the back end, device, thread count, torch version and
    whatever describes the timed module and its input. Every :meth:`put` writes the file at once
    (atomically, merged with what another process may have written meanwhile). A file that cannot
    be read is ignored with a warning and rewritten.
    """

    VERSION = 1

    def __init__(self, path: Optional[Union[str, Path]] = None):
        self.path = Path(path) if path is not None else cache_dir() / "latency.json"
        self._entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != self.VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"unknown layout (version {data.get('version')!r})")
            return {str(k): float(v) for k, v in data["entries"].items()}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
            warnings.warn(f"ignoring the timing cache {self.path}: {exc}; it will be rewritten", stacklevel=3)
            return {}

    @staticmethod
    def key(backend: str, device: str, threads: int, **what: Any) -> str:
        """A JSON string of the back end, device, threads, torch version and ``what`` (sorted)."""
        return json.dumps({"backend": backend, "device": device, "threads": threads, "torch": torch.__version__,
                           **what}, sort_keys=True, default=str)

    def get(self, key: str) -> Optional[float]:
        return self._entries.get(key)

    def put(self, key: str, ms: float) -> None:
        self._entries[key] = float(ms)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(), **self._entries} if self.path.is_file() else dict(self._entries)
        self._entries = merged
        write_atomic(self.path, json.dumps({"version": self.VERSION, "entries": merged}, indent=0, sort_keys=True))

    def __len__(self) -> int:
        return len(self._entries)
