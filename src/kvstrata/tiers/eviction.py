"""Byte-capacity eviction policies for the tiers that own their capacity.

A policy tracks resident keys and their sizes and, when asked, names a victim.
It never touches the data: the tier holds the data and the lock, and calls

* ``insert(key, size)`` after storing a new key,
* ``touch(key)`` on a read hit,
* ``remove(key)`` when a key is deleted,
* ``victim()`` while over capacity: it removes and returns one resident key.

Two policies:

* ``lru`` -- least recently used.
* ``s3fifo`` -- S3-FIFO (Yang et al., SOSP 2023): new keys enter a small FIFO
  (10% of bytes); keys read again while there move to the main FIFO, the rest
  leave and are remembered in a ghost FIFO (keys only), so a key that comes
  back soon goes straight to main. Scan-resistant: a one-off sweep of cold
  chunks cannot flush the hot working set, which LRU lets it do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol


class EvictionPolicy(Protocol):
    def insert(self, key: Hashable, size: int) -> None: ...
    def touch(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victim(self) -> Hashable: ...


class LRU:
    def __init__(self, capacity_bytes: int):
        self._order: OrderedDict[Hashable, int] = OrderedDict()

    def insert(self, key: Hashable, size: int) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable:
        key, _ = self._order.popitem(last=False)
        return key


class S3FIFO:
    MAX_FREQ = 3

    def __init__(self, capacity_bytes: int, small_fraction: float = 0.1):
        self._small_cap = max(1, int(capacity_bytes * small_fraction))
        self._small: OrderedDict[Hashable, int] = OrderedDict()  # key -> size, oldest first
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._small_bytes = 0

    def insert(self, key: Hashable, size: int) -> None:
        self.remove(key)
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_bytes += size

    def touch(self, key: Hashable) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, self.MAX_FREQ)

    def remove(self, key: Hashable) -> None:
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
        self._main.pop(key, None)
        self._freq.pop(key, None)

    def victim(self) -> Hashable:
        while True:
            if self._small and (self._small_bytes >= self._small_cap or not self._main):
                key, size = self._small.popitem(last=False)
                self._small_bytes -= size
                if self._freq[key] > 0:  # read again while on probation: keep it
                    self._freq[key] = 0
                    self._main[key] = size
                    continue
                self._remember(key)
                del self._freq[key]
                return key
            key, size = self._main.popitem(last=False)
            if self._freq[key] > 0:  # second chance, as in CLOCK
                self._freq[key] -= 1
                self._main[key] = size
                continue
            del self._freq[key]
            return key

    def _remember(self, key: Hashable) -> None:
        self._ghost[key] = None
        # the ghost remembers about as many keys as the cache holds
        while len(self._ghost) > max(len(self._main) + len(self._small), 16):
            self._ghost.popitem(last=False)


POLICIES = {"lru": LRU, "s3fifo": S3FIFO}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    try:
        return POLICIES[name](capacity_bytes)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r} (known: {sorted(POLICIES)})") from None
