"""What one process keeps for the devices it serves, in one bounded cache.

A Ray actor or a SuperNode process serves many simulated devices one message at a time; building a
device's bottom, its partition views or its anchor tables each time would cost seconds, and keeping
all of them would grow memory with the number of devices. So each kind of resource gets a shelf with
its own bound, least recently used first out, and anything evicted is simply built again.

Only rebuildable things live here. A device's noise key and its release ledgers are state, not a
cache (``client_app`` keeps them beside their files), and are never evicted.

``RESOURCES`` is the process's cache; tests call ``RESOURCES.clear()`` (or make their own
:class:`ResourceCache`) to stand for a fresh process.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any

# kind -> the most entries a process keeps (and what one entry is)
LIMITS: dict[str, int] = {
    "split": 4,            # a frozen bottom, per model configuration (hundreds of MB each)
    "node": 256,           # one device's partition views and defended bottom
    "rows": 256,           # one device's clean rows, between the federation map's statistics and its audit
    "anchors": 8,          # the PGD anchor tables, per bottom and graph options
    "dataset": 32,         # a loaded and cut dataset
    "partitioner": 32,     # a flwr-datasets partitioner over one dataset
    "offsite": 4,          # an offsite emulator and adapter, per configuration
    "offsite-node": 256,   # one offsite device's train and test rows
}


class ResourceCache:
    """Shelves of rebuildable resources, one per kind, each bounded (least recently used out)."""

    def __init__(self, limits: Mapping[str, int] | None = None):
        limits = dict(LIMITS if limits is None else limits)
        for kind, limit in limits.items():
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise ValueError(f"resource limit {kind}={limit!r} is outside the accepted range: an integer >= 1")
        self._limits = limits
        self._shelves: dict[str, collections.OrderedDict] = {kind: collections.OrderedDict() for kind in limits}
        self._lock = threading.RLock()

    def _shelf(self, kind: str) -> collections.OrderedDict:
        try:
            return self._shelves[kind]
        except KeyError:
            raise KeyError(f"unknown resource kind {kind!r}; known: {', '.join(sorted(self._shelves))}") from None

    def get(self, kind: str, key: Hashable, build: Callable[[], Any] | None = None) -> Any:
        """The ``kind`` resource for ``key``: kept, else ``build()`` kept and returned (``None``
        when it is not kept and there is no ``build``)."""
        with self._lock:
            shelf = self._shelf(kind)
            if key in shelf:
                shelf.move_to_end(key)
                return shelf[key]
            if build is None:
                return None
            # Built under the lock: a build may ask for another kind (a node for its bottom), and two
            # threads of one actor never build the same bottom twice.
            value = build()
            self.put(kind, key, value)
            return value

    def put(self, kind: str, key: Hashable, value: Any) -> None:
        with self._lock:
            shelf = self._shelf(kind)
            shelf[key] = value
            shelf.move_to_end(key)
            while len(shelf) > self._limits[kind]:
                shelf.popitem(last=False)

    def pop(self, kind: str, key: Hashable) -> Any:
        with self._lock:
            return self._shelf(kind).pop(key, None)

    def keys(self, kind: str) -> list:
        """The keys kept for ``kind``, least recently used first."""
        with self._lock:
            return list(self._shelf(kind))

    def limit(self, kind: str) -> int:
        self._shelf(kind)
        return self._limits[kind]

    def set_limit(self, kind: str, limit: int) -> None:
        """A new bound for ``kind`` (entries over it go at once)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"resource limit {kind}={limit!r} is outside the accepted range: an integer >= 1")
        with self._lock:
            self._shelf(kind)
            self._limits[kind] = limit
            shelf = self._shelves[kind]
            while len(shelf) > limit:
                shelf.popitem(last=False)

    def clear(self, kind: str | None = None) -> None:
        """Forget every resource (or those of one kind): what a fresh process would hold."""
        with self._lock:
            for shelf in ([self._shelf(kind)] if kind is not None else self._shelves.values()):
                shelf.clear()

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {kind: len(shelf) for kind, shelf in self._shelves.items()}


RESOURCES = ResourceCache()
