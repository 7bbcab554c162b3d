"""Peak memory of one call: the most tensor bytes alive at once beyond what existed before the call.

On CUDA this is ``torch.cuda.max_memory_allocated`` (reset before, read after, minus the bytes allocated at the
start). The CPU allocator keeps no such statistics, so on CPU every storage created during the call is followed
from the dispatcher (a ``TorchDispatchMode``): its bytes count while the storage is alive (a weak reference to the
C++ storage, so views that outlive their base tensor keep it counted, as the allocator would). Weights, and any
cache entries made before the call, are not counted: the number answers "how much more memory does a call
need", which is what a cache changes (its stored features plus the activations of the blocks it runs).

The CPU tracker slows the call down (a Python check per op); use it on a separate, untimed call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created under it while they are alive; remembers the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_call_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Bytes: the peak of tensor memory allocated by ``fn()`` on ``device`` above what was allocated before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    tracker = _LiveBytes()
    with tracker:
        fn()
    return tracker.peak
