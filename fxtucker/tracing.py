"""trace(): symbolic tracing with leaf modules, and TraceError with hints when it fails."""

from __future__ import annotations

import os
import traceback
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["trace", "TraceError"]

_TORCH_DIR = os.path.dirname(torch.__file__)


class TraceError(RuntimeError):
    """A model could not be symbolically traced; the message names the module and the line."""


class _Tracer(fx.Tracer):
    """An fx.Tracer that treats extra modules as leaves and remembers which module it is in."""

    # Defaults, because unpickling a GraphModule re-creates its tracer class without arguments.
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()):
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names
        self.stack: list[tuple[str, str]] = []
        self.failed_in: Optional[tuple[str, str]] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module on the stack when the error is raised is the culprit.
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame outside torch: the model's line that broke tracing."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "fxtucker"]
    return frames[-1] if frames else None


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[Union[type, str]] = (),
    concrete_args: Optional[dict[str, Any]] = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that every fxtucker pass accepts.

    Args:
        model: the network; a GraphModule is returned as it is.
        leaf_modules: module classes or qualified names to keep as single ``call_module`` nodes
            instead of tracing through them (for modules with data-dependent control flow).
        concrete_args: passed to :func:`torch.fx.symbolic_trace`, to specialise arguments that
            steer control flow.

    Raises:
        TraceError: the message names the module class being traced, the failing line, and
            suggests ``leaf_modules`` or ``concrete_args``.

    Example::

        >>> gm = fxtucker.trace(torchvision.models.resnet18())
        >>> print(gm.graph)  # doctest: +SKIP
    """
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace expects an nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules)
    bad = [m for m in leaf_modules if not (isinstance(m, str) or (isinstance(m, type) and issubclass(m, nn.Module)))]
    if bad:
        raise TypeError(f"leaf_modules holds {bad!r}: valid entries are nn.Module subclasses or qualified module names")
    names = frozenset(m for m in leaf_modules if isinstance(m, str))
    unknown = sorted(names - {n for n, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"leaf_modules names {unknown} that are not submodules of {type(model).__name__}")
    tracer = _Tracer(tuple(m for m in leaf_modules if isinstance(m, type)), names)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as exc:
        where = tracer.failed_in or ("", type(model).__name__)
        module = f"{where[1]} ({where[0]!r})" if where[0] else where[1]
        frame = _user_frame(exc)
        line = f"{frame.filename}:{frame.lineno} ({frame.line!r})" if frame else "<unknown line>"
        hint = (
            f"pass leaf_modules=[{where[1]}] to keep that module as one opaque node"
            if where[0]
            else "pass concrete_args={...} to fix the arguments that steer control flow"
        )
        raise TraceError(
            f"could not trace {type(model).__name__}: inside {module}, at {line}: "
            f"{type(exc).__name__}: {exc}. fxtucker needs a torch.fx graph; {hint}, "
            f"or leaf_modules/concrete_args as documented in fxtucker.trace."
        ) from exc
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)
