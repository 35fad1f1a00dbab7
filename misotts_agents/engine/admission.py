"""Who gets the next free slot: the waiting requests, in turn across tenants and their clients.

First come, first served let one caller's burst (32 long requests on an engine of 8 slots) stand
between every other caller and the engine for the whole burst: a second tenant's short request,
sent two seconds later, waited 49 s. Here the waiting requests are kept per tenant, and per client
within a tenant, and a free slot goes to the next tenant in turn (round robin: every tenant weighs
the same, one slot per turn, so a tenant with one waiting request waits for at most one slot per
other tenant with requests waiting), then to that tenant's next client in turn, then to that
client's oldest request. A tenant's many connections therefore get the tenant's share, not one
share each. A request without a tenant is a tenant of its own; one without a client, a client of
its own (so such requests are first come, first served among themselves).

``fair=False`` keeps one first-come-first-served line (the policy before; benchmarks compare).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class WaitingQueue(Generic[T]):
    """Requests waiting for a slot, taken in turn across ``(tenant, client)`` keys. Thread-safe:
    preparation threads push, the scheduler pops, anyone counts."""

    def __init__(self, fair: bool = True) -> None:
        self.fair = fair
        self._lock = threading.Lock()
        # tenant -> client -> that client's requests, oldest first; both levels in turn order
        self._tenants: OrderedDict[Hashable, OrderedDict[Hashable, deque[T]]] = OrderedDict()
        self._size = 0

    def push(self, item: T, tenant: Hashable | None = None, client: Hashable | None = None) -> None:
        """Queue ``item``; a None key is a key of its own (fifo mode: one key for all)."""
        if not self.fair:
            tenant = client = None
        else:
            client = client if client is not None else object()
            tenant = tenant if tenant is not None else ("client", client)
        with self._lock:
            self._tenants.setdefault(tenant, OrderedDict()).setdefault(client, deque()).append(item)
            self._size += 1

    def pop(self) -> T | None:
        """The next request in turn (None if none waits); its tenant and client go to the back."""
        with self._lock:
            return self._pop()

    def _pop(self) -> T | None:
        if not self._tenants:
            return None
        tenant, clients = next(iter(self._tenants.items()))
        client, items = next(iter(clients.items()))
        item = items.popleft()
        self._size -= 1
        if items:
            clients.move_to_end(client)
        else:
            del clients[client]
        if clients:
            self._tenants.move_to_end(tenant)
        else:
            del self._tenants[tenant]
        return item

    def remove_if(self, drop: Callable[[T], bool]) -> list[T]:
        """Take out (and return) every waiting request for which ``drop`` is true; turns keep their order."""
        with self._lock:
            return self._remove_if(drop)

    def _remove_if(self, drop: Callable[[T], bool]) -> list[T]:
        removed: list[T] = []
        for tenant in list(self._tenants):
            clients = self._tenants[tenant]
            for client, items in list(clients.items()):
                dropped = [drop(item) for item in items]
                if not any(dropped):  # (the scheduler sweeps every iteration: most sweeps change nothing)
                    continue
                removed.extend(item for item, out in zip(items, dropped, strict=True) if out)
                kept = deque(item for item, out in zip(items, dropped, strict=True) if not out)
                if kept:
                    clients[client] = kept
                else:
                    del clients[client]
            if not clients:
                del self._tenants[tenant]
        self._size -= len(removed)
        return removed

    def drain(self) -> list[T]:
        """Everything waiting, emptied."""
        return self.remove_if(lambda _: True)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[T]:
        """The waiting requests now (a copy: safe while others push and pop)."""
        with self._lock:
            items = [item for clients in self._tenants.values() for queue in clients.values() for item in queue]
        return iter(items)
