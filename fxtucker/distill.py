"""Knowledge distillation for the training loop: the loss, and a cache of the teacher's outputs.

A distilled step runs the teacher (the uncompressed model) forward on every batch. When the same
images come back (every epoch over a fixed training set, every method of a comparison distilled
from one model), those forwards repeat work: :class:`TeacherCache` keeps the teacher's outputs by
the content of each input, so a batch whose every input was seen before costs a lookup instead of a
forward. The key is the input's bytes, not its index, so augmented or freshly drawn images are never
mistaken for others: they miss, and are computed as without the cache.

A cached output is the one the teacher gave the input in the batch it first came in. Convolution
kernels compute each input of a batch on its own, so on the CPU that is the output the teacher
gives it in any other batch of the same kind (``tests/test_distill.py`` trains bit for bit alike
with and without the cache); a kernel that changes its algorithm with the batch's size (some do
for a batch of one) can make the two differ in the last bits of a float.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TeacherCache", "distillation_loss", "teacher_fingerprint"]


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A digest of everything the teacher's outputs depend on that a cache can see: every parameter
    and buffer (name, dtype, shape, memory layout and values) and its training mode."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"train" if teacher.training else b"eval")
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.stride()}".encode())
        h.update(_bytes(t.detach().cpu()))
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    """A tensor's values as bytes, whatever its dtype and shape (bfloat16 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _rows(x: Any) -> Optional[list[torch.Tensor]]:
    """The batch's inputs as a list of tensors with one batch dimension, or None if it is not one."""
    tensors = list(x) if isinstance(x, (tuple, list)) else [x]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors):
        return None
    n = tensors[0].shape[0]
    return tensors if all(t.shape[0] == n for t in tensors) else None


class TeacherCache:
    """The teacher's outputs, kept by each input's content (its bytes, dtype and shape).

    One cache serves one teacher: the first call records its :func:`teacher_fingerprint`, and a call
    with another teacher (other weights, another memory format, train mode) is an error, so a cache
    can be shared between runs distilled from the same model (each run's deep copy of it) and never
    mixes two. Outputs are kept on the CPU in float32 until ``max_bytes`` is used (default 1 GiB);
    past it, new outputs are computed as without the cache and not kept. ``hits`` and ``misses``
    count batches: a batch with any input not kept runs the teacher on the whole batch.

    Example::

        >>> cache = TeacherCache()
        >>> loss = distillation_loss(teacher, cache=cache)   # train(..., extra_loss=loss)
    """

    def __init__(self, max_bytes: int = 1 << 30):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"TeacherCache: max_bytes must be an int >= 0 (bytes of outputs to keep), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.fingerprint: Optional[str] = None
        self._outputs: dict[bytes, torch.Tensor] = {}
        self._checked: weakref.WeakSet = weakref.WeakSet()  # teachers whose fingerprint matched

    def __len__(self) -> int:
        return len(self._outputs)

    def stats(self) -> dict:
        """Batches served from the cache and computed, inputs kept and their bytes."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "bytes": self.bytes}

    def _check_teacher(self, teacher: nn.Module) -> None:
        """Each teacher module is fingerprinted once, the first time this cache serves it (a teacher
        is frozen: its weights do not change while it teaches)."""
        if teacher in self._checked:
            return
        fingerprint = teacher_fingerprint(teacher)
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        elif fingerprint != self.fingerprint:
            raise ValueError("TeacherCache: this cache holds another teacher's outputs (its weights, buffers, memory "
                             "format or training mode differ from the first teacher's); give each teacher a cache "
                             "of its own")
        self._checked.add(teacher)

    @staticmethod
    def _keys(rows: list[torch.Tensor]) -> list[bytes]:
        device = rows[0].device.type
        extra = (f"{device}|{torch.is_autocast_enabled(device)}|"
                 + "|".join(f"{t.dtype}{tuple(t.shape[1:])}" for t in rows)).encode()
        cpu = [t.detach().cpu() for t in rows]
        keys = []
        for i in range(rows[0].shape[0]):
            h = hashlib.blake2b(extra, digest_size=16)
            for t in cpu:
                h.update(_bytes(t[i]))
            keys.append(h.digest())
        return keys

    def outputs(self, teacher: nn.Module, x: Any) -> torch.Tensor:
        """``teacher(x).float()``, from the cache where every input of ``x`` is kept."""
        rows = _rows(x)
        if rows is None:  # not a batch of tensors: nothing to key it by
            return teacher(x).float()
        self._check_teacher(teacher)
        keys = self._keys(rows)
        kept = [self._outputs.get(k) for k in keys]
        if all(o is not None for o in kept):
            self.hits += 1
            return torch.stack(kept).to(rows[0].device)
        self.misses += 1
        out = teacher(x).float()
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0] == len(keys):
            per = out[0].numel() * out.element_size()
            for k, o, row in zip(keys, kept, out.detach().cpu()):
                if o is None and self.bytes + per <= self.max_bytes:
                    self._outputs[k] = row.clone()
                    self.bytes += per
        return out


def distillation_loss(teacher: nn.Module, weight: float = 0.5, temperature: float = 4.0,
                      cache: Optional[TeacherCache] = None) -> Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``train``'s ``extra_loss`` for knowledge distillation from ``teacher`` (an eval-mode model):
    weight * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015). With ``cache``, the
    teacher's outputs for inputs it has seen come from the :class:`TeacherCache`."""
    t, w = temperature, weight

    def loss(x: Any, out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        teacher.to(out.device)
        with torch.no_grad():
            target = teacher(x).float() if cache is None else cache.outputs(teacher, x)
        return w * t * t * F.kl_div(F.log_softmax(out.float() / t, 1), F.softmax(target / t, 1), reduction="batchmean")

    return loss
