"""A small bounded LRU map with hit/miss counters (text and fingerprint caches)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """An ``OrderedDict`` that forgets the least recently used entry past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: K) -> V | None:
        try:
            value = self._data[key]
        except KeyError:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)
            self.evictions += 1

    def fill(self, items: Iterable[tuple[K, V]]) -> None:
        """Put many entries at once, oldest first; those past the capacity are forgotten."""
        self._data.update(items)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)
            self.evictions += 1

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        self._data.clear()

    def resize(self, capacity: int, keep: Container[K] = ()) -> None:
        """A new capacity; the least recently used entries past it are forgotten now, except
        those in ``keep`` (still in use elsewhere), which may hold the cache above it."""
        self.capacity = max(1, capacity)
        excess = len(self._data) - self.capacity
        if excess <= 0:
            return
        gone = []
        for key in self._data:  # oldest first
            if len(gone) >= excess:
                break
            if key not in keep:
                gone.append(key)
        for key in gone:
            del self._data[key]
        self.evictions += len(gone)

    def retain(self, keys: Container[K]) -> int:
        """Forget every entry whose key is not in ``keys`` (what the source holds no more); how many."""
        gone = [k for k in self._data if k not in keys]
        for k in gone:
            del self._data[k]
        return len(gone)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
