"""The one way fxtucker writes and hashes files, and checks the numbers it reads back.

Every file fxtucker writes (checkpoints, logs rewritten on resume, manifests and their weights,
reports, plots, state_dicts, the timing cache) goes through :func:`write_atomic`: the data goes
to a new temporary file in the same directory (created with ``O_EXCL``, so never through a link
planted there), is flushed and fsynced, and is renamed over the destination. A rename replaces a
symbolic link at the destination instead of writing through it, so a link planted in an output
directory can never make fxtucker overwrite a file elsewhere, and a reader never sees half a file.
:func:`sha256_file` hashes a file's bytes and :func:`digest` a nested structure of tensors and
plain values (a training checkpoint's payload); :func:`is_int` and :func:`is_real` tell numbers
from bools wherever a config or a loaded file is checked.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

__all__ = ["write_atomic", "write_text", "save_torch", "sha256_file", "append_line", "nofollow_opener", "fsync_dir",
           "load_tensors", "load_error", "digest", "is_int", "is_real"]

PathLike = Union[str, os.PathLike]


def fsync_dir(directory: PathLike) -> None:
    """fsync a directory so a rename in it survives a crash (not possible on every OS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_destination(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"cannot write the file {str(path)!r}: a directory of that name exists; remove it "
                                f"or choose another output path")


def write_atomic(path: PathLike, data: Union[bytes, str, Callable[[BinaryIO], Any]], *,
                 keep_prev: bool = False) -> Path:
    """Write ``path`` through a new temporary file in its directory, fsync it, rename it over ``path``.

    ``data``: bytes, a str (written as UTF-8) or a callable that writes into the binary file it is
    given (``torch.save``, ``fig.savefig``). ``keep_prev``: the file being replaced is kept as
    ``<name>.prev`` (by a hard link where possible, so ``path`` exists at every moment). An
    existing symbolic link at ``path`` (or ``<name>.prev``) is replaced, never written through.
    Returns ``path``. On any error the temporary file is removed and ``path`` is as it was.
    """
    path = Path(path)
    _check_destination(path)
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.tmp.{token}")
    prev = path.with_name(path.name + ".prev")
    prev_tmp = prev.with_name(f".{prev.name}.tmp.{token}")
    try:
        # "x": O_CREAT | O_EXCL, which fails on any existing entry, a symbolic link included.
        with open(tmp, "xb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_prev and os.path.lexists(path):
            # A hard link leaves path in place until the final replace; without hard links
            # there is a moment with only .prev, which a reader of .prev handles.
            try:
                os.link(path, prev_tmp, follow_symlinks=False)
            except OSError:
                os.replace(path, prev)
            else:
                os.replace(prev_tmp, prev)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        for leftover in (tmp, prev_tmp):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
    return path


def write_text(path: PathLike, text: str) -> Path:
    """:func:`write_atomic` of a str, as UTF-8."""
    return write_atomic(path, text)


def save_torch(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` into ``path`` through :func:`write_atomic`."""
    import torch

    return write_atomic(path, lambda f: torch.save(obj, f))


def nofollow_opener(file: PathLike, flags: int) -> int:
    """An ``opener`` for :func:`open` that refuses a symbolic link (``O_NOFOLLOW``), for appending."""
    return os.open(file, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def append_line(path: PathLike, line: str) -> None:
    """Append ``line`` to ``path`` and fsync it; a symbolic link at ``path`` is refused (OSError)."""
    with open(path, "a", encoding="utf-8", opener=nofollow_opener) as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: PathLike, *, limit: int | None = None) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks; ValueError past ``limit`` bytes."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += len(block)
            if limit is not None and n > limit:
                raise ValueError(f"{str(path)!r} is larger than {limit:,} bytes; fxtucker does not read it")
            h.update(block)
    return h.hexdigest()


def digest(payload: Any) -> str:
    """SHA-256 of a nested structure's contents (tensor bytes, keys, numbers, strings, in order);
    TypeError for anything else (a module, an arbitrary object)."""
    import torch

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
        elif isinstance(obj, dict):
            h.update(f"D{len(obj)};".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)};".encode())
            for value in obj:
                feed(value)
        elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            text = repr(obj)
            h.update(f"{type(obj).__name__}{len(text)}:{text};".encode())
        else:
            raise TypeError(f"checkpoint payload holds a {type(obj).__name__}, which cannot be hashed")

    h = hashlib.sha256()
    feed(payload)
    return h.hexdigest()


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a finite real number and not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")


def load_error(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused or could not read a file, in one line.

    A refused pickle is named by the global it wanted (``refused to unpickle the global
    'posix.system'``), without torch's advice to retry with ``weights_only=False``, which would run
    whatever code the file holds.
    """
    text = str(exc)
    found = _GLOBAL.search(text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return (f"refused to unpickle the global {found.group(1)!r}: the file holds more than tensors and plain "
                f"containers, and fxtucker never runs code from a file")
    operand = _OPERAND.search(text)
    if operand:
        first = f"pickle opcode {operand.group(1)} is not one torch reads"
    elif isinstance(exc, pickle.UnpicklingError):
        first = "not a pickle of tensors and plain containers"
    else:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")[:200]
    return f"it cannot be read ({type(exc).__name__}: {first}); the file is truncated or not a torch.save file"


def load_tensors(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; ValueError naming ``path`` and
    :func:`load_error`'s reason for a refused, truncated or garbage file."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a torn zip, garbage bytes, a refused global: all mean "unusable"
        raise ValueError(f"{path}: {load_error(exc)}") from None
