"""A least-recently-used map bounded by the bytes of its values (the episode loader's caches)."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class ByteLRU:
    """A least-recently-used map bounded by the bytes of its values (tensors, arrays, tuples)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the evaluator decodes images in threads

    @staticmethod
    def _size(value) -> int:
        if isinstance(value, tuple):
            return sum(ByteLRU._size(v) for v in value)
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return getattr(value, "nbytes", 0)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = make()  # outside the lock: decoding runs in parallel
        size = self._size(value)
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, size)
                self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
        return value

    def __getstate__(self):  # DataLoader workers get a copy; a lock does not pickle
        state = dict(vars(self))
        state.pop("_lock")
        return state

    def __setstate__(self, state):
        vars(self).update(state)
        self._lock = threading.Lock()
