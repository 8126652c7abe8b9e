"""The configuration of a run, stored beside its checkpoints so that a resume continues the same run.

:func:`record_run` writes ``<out_dir>/<name>`` (JSON) when a run starts and, on resume,
compares what is stored with the configuration of the resuming call: a run resumed with another
regularizer, budget, data subset, batch size, model or seed would mix two runs while its report
claimed one, so every differing key is named and the resume refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from fxtucker.io import write_text

__all__ = ["record_run", "RUN_FILE", "RunMismatch"]

RUN_FILE = "run.json"
_MAX_BYTES = 1 << 20


class RunMismatch(ValueError):
    """A resume whose configuration differs from the stored one; ``.keys`` names the differences."""

    def __init__(self, message: str, keys: tuple[str, ...]):
        super().__init__(message)
        self.keys = keys


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
        return out
    return {prefix.rstrip("."): value}


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_BYTES + 1)
        if len(raw) > _MAX_BYTES:
            raise ValueError(f"larger than {_MAX_BYTES:,} bytes")
        stored = json.loads(raw.decode("utf-8"))
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
        return stored
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: the stored run configuration cannot be read ({exc}); start a new run without "
                         f"--resume / resume=True, or in another output directory") from None


def record_run(out_dir: Union[str, os.PathLike], run: dict, *, resume: bool, name: str = RUN_FILE,
               require: bool = False, defaults: Optional[dict[str, Any]] = None) -> None:
    """Store ``run`` (a JSON-ready dict) as ``out_dir/name``, or on ``resume`` check it against the stored one.

    Args:
        out_dir: the run's directory.
        run: the configuration; nested dicts are compared key by key (``config.reg_weight``).
        resume: compare instead of writing.
        name: the file name.
        require: on resume, refuse when nothing is stored (an empty or mistyped output directory);
            without it, a missing file is written and the resume goes on.
        defaults: flat keys (``config.distill_reg``) with their defaults: a key the stored run
            lacks and that the resuming call has at its default is no difference (an option added
            since the run started, left at its default).

    Raises:
        RunMismatch: a resume whose configuration differs, naming each key with both values.
        ValueError: ``require`` and nothing stored, or a stored file that cannot be read.
    """
    out_dir = Path(out_dir)
    path = out_dir / name
    now = json.loads(json.dumps(run))  # tuples as lists, as stored
    if resume and path.is_file():
        was = _read(path)
        a, b = _flat(was), _flat(now)
        old = json.loads(json.dumps(defaults or {}))
        keys = tuple(sorted(k for k in set(a) | set(b) if a.get(k, "(absent)") != b.get(k, "(absent)")
                            and not (k not in a and k in old and b.get(k) == old[k])))
        if keys:
            diffs = "; ".join(f"{k}: {a.get(k, '(absent)')!r} then, {b.get(k, '(absent)')!r} now" for k in keys)
            raise RunMismatch(f"cannot resume the run in {str(out_dir)!r}: its configuration differs from the stored "
                              f"one ({path.name}) in {len(keys)} key(s): {diffs}. Resume with the settings the run "
                              f"started with, or start a new run (without --resume, or in another output directory)",
                              keys)
        return
    if resume and require:
        what = "does not exist" if not out_dir.exists() else f"holds no run to continue ({name} is missing)"
        raise ValueError(f"--resume: the output directory {str(out_dir)!r} {what}; check --out (the directory of "
                         f"the run to continue), or drop --resume to start a new run")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(now, indent=2, sort_keys=True) + "\n")
