"""SessionAffinityRouter: Ray Serve request routing that keeps each conversation on one engine replica.

A session's voice and turn memory live on one replica (replica.py), so all of a session's calls
must reach it. Serve's stock router learns where a multiplexed id lives only from the replicas'
reports (every 0.1 s, seen by callers later still), and its FIFO matching can hand one session's
replica to another session's call; this router decides at once and gives each replica to the call
it was chosen for. It uses a few private members of Ray 2.60's ``RequestRouter``
(``_pending_requests_to_fulfill`` and the helpers that complete an assignment): re-check them when
upgrading Ray.
"""

from __future__ import annotations

import random
from typing import Any

from cachetools import LRUCache, TTLCache
from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


class SessionAffinityRouter(MultiplexMixin, RequestRouter):
    """Routes each session's calls to the one replica holding the session; new sessions to the
    replica with the fewest sessions; calls without a session by power of two choices.

    Which replica holds a session: first the replica this router itself sent the session to (known
    the moment it chose it, so a conversation's next call follows at once), then the replicas that
    report the session to Serve (``RunningReplica.multiplexed_model_ids``, the sessions registered by
    ``@serve.multiplexed`` on each replica; this view covers sessions started through another
    caller, e.g. another ingress replica, and it wins when the two disagree, so callers converge on
    one replica). A session whose replica is gone is placed anew.

    A session's calls wait for its replica when that replica is full (``max_ongoing_requests``):
    moving them would split the conversation's memory across replicas. The wait is bounded by the
    caller's ``max_queued_requests`` (then BackPressureError, "busy" to the client).

    A replica found for a call goes to that very call (``_fulfill_next_pending_request``): the
    stock matching, by internal request id, cannot tell apart the calls one ingress request makes
    (a WebSocket connection is one request for its whole life, and all its calls share the id), and
    FIFO matching would hand one session's replica to another session's call.

    Runs in each caller of the engine deployment (the ingress replicas), on Serve's router loop.
    ``request_router_kwargs``: ``max_tracked_sessions`` (this router's session table, LRU).
    """

    #: A placement counts towards its replica's load until the replica has reported it (or this long).
    RECENT_S = 2.0

    def initialize_state(self, max_tracked_sessions: int = 100_000, **kwargs: Any) -> None:
        tracked = max(1, int(max_tracked_sessions))
        self._homes: LRUCache[str, ReplicaID] = LRUCache(tracked)
        self._recent: TTLCache[str, ReplicaID] = TTLCache(tracked, ttl=self.RECENT_S)  # sid -> replica

    def _state(self) -> None:
        if not hasattr(self, "_homes"):  # a router built without initialize_state
            self.initialize_state()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self._state()
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [_two(candidate_replicas)]
        # Back off between tries when the chosen replicas are full (else the routing loop spins).
        pending_request.routing_context.should_backoff = True
        sid = pending_request.metadata.multiplexed_model_id
        if not sid:
            return [_two(candidate_replicas)]
        home = self.home(sid, candidate_replicas)
        if home is not None:
            return [[home]]
        # A new session: the replica with the fewest sessions (of those, the shortest queue), noted at
        # once so that sessions starting at the same moment spread; the others if it is full.
        load = self._loads(candidate_replicas)
        fewest = min(load.values())
        target = self._shortest([r for r in candidate_replicas if load[r.replica_id] == fewest])
        self._note(sid, target.replica_id)
        rest = [r for r in candidate_replicas if r is not target]
        return [[target], rest] if rest else [[target]]

    def home(self, sid: str, replicas: list[RunningReplica]) -> RunningReplica | None:
        """The replica holding session ``sid`` among ``replicas``, or None."""
        self._state()
        by_id = {r.replica_id: r for r in replicas}
        mine = self._homes.get(sid)
        if mine is not None and mine not in by_id:  # that replica is gone: the session starts anew
            del self._homes[sid]
            mine = None
        holders = [r for r in replicas if sid in r.multiplexed_model_ids]
        if mine is not None and (not holders or any(r.replica_id == mine for r in holders)):
            return by_id[mine]  # (the lookup above made it the most recently used)
        if holders:  # the same pick in every router: the lowest replica id
            chosen = min(holders, key=lambda r: r.replica_id.unique_id)
            self._place(sid, chosen.replica_id)
            return chosen
        return None

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        """Give ``replica`` to the call it was chosen for; if that call is already served (another
        routing task got there first), to the oldest waiting call it suits: one of the same
        session, or any call without a session when it was chosen for one."""
        if request_metadata is None:
            return
        sid = request_metadata.multiplexed_model_id
        chosen = None
        for pr in self._pending_requests_to_fulfill:
            if pr.future.done():
                continue
            if pr.metadata is request_metadata:
                chosen = pr
                break
            if chosen is None and pr.metadata.multiplexed_model_id == sid:
                chosen = pr
        if chosen is None:
            return
        self._cancel_routing_task_for_pending_request(chosen)
        self._record_queue_wait_time(chosen)
        chosen.future.set_result(replica)
        self._remove_pending_request_from_indices(chosen)
        if sid:
            self._place(sid, replica.replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        sid = pending_request.metadata.multiplexed_model_id
        if sid:
            self._place(sid, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        for sid in [s for s, r in self._homes.items() if r == replica_id]:
            del self._homes[sid]

    def _place(self, sid: str, replica_id: ReplicaID) -> None:
        self._state()
        self._note(sid, replica_id)
        self._homes[sid] = replica_id

    def _note(self, sid: str, replica_id: ReplicaID) -> None:
        """A session just placed (or about to be): it counts towards the replica's load meanwhile."""
        self._recent[sid] = replica_id

    def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Sessions per replica: as reported to Serve, plus this router's placements not reported yet."""
        load = {r.replica_id: len(r.multiplexed_model_ids) for r in replicas}
        reported = {r.replica_id: r.multiplexed_model_ids for r in replicas}
        for sid, rid in self._recent.items():  # the placements younger than RECENT_S
            if rid in load and sid not in reported[rid]:
                load[rid] += 1
        return load

    def _shortest(self, replicas: list[RunningReplica]) -> RunningReplica:
        """The replica with the shortest known queue (unknown counts as empty); random on a tie."""
        cache = self.replica_queue_len_cache
        return min(random.sample(replicas, len(replicas)), key=lambda r: cache.get(r.replica_id) or 0)


def _two(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Two random replicas in random order (Serve takes the one with the shorter queue that accepts,
    the first on a tie)."""
    return random.sample(replicas, min(2, len(replicas)))
