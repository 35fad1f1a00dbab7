"""Who gets a slot: waiting requests in turn across tenants and clients (or first come, first
served), and a bounded wait: a request that gets no slot in time is refused as busy, not kept."""

import time

import pytest
from engines import load_tiny
from signals import wait_until

from misotts_agents.engine.admission import WaitingQueue
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.errors import EngineBusy, to_wire


def test_tenants_take_turns_then_their_clients_then_their_requests():
    queue: WaitingQueue[str] = WaitingQueue()
    for i in range(3):
        queue.push(f"a{i}", tenant="A", client="a-conn")
    for i in range(2):
        queue.push(f"a'{i}", tenant="A", client="a-other-conn")
    queue.push("b0", tenant="B", client="b-conn")
    queue.push("c0", tenant="C")  # a client of its own
    assert len(queue) == 7
    order = [queue.pop() for _ in range(7)]
    assert order == ["a0", "b0", "c0", "a'0", "a1", "a'1", "a2"]
    assert queue.pop() is None
    assert len(queue) == 0


def test_without_keys_each_request_is_its_own_tenant_and_fifo_mode_is_one_line():
    fair: WaitingQueue[int] = WaitingQueue()
    fifo: WaitingQueue[int] = WaitingQueue(fair=False)
    for i, tenant in enumerate(["A", "A", "A", "B"]):
        fair.push(i, tenant=tenant)
        fifo.push(i, tenant=tenant)
    assert [fair.pop() for _ in range(4)] == [0, 3, 1, 2]
    assert [fifo.pop() for _ in range(4)] == [0, 1, 2, 3]
    anonymous: WaitingQueue[int] = WaitingQueue()
    for i in range(3):
        anonymous.push(i)
    assert [anonymous.pop() for _ in range(3)] == [0, 1, 2]


def test_removing_keeps_the_turns_and_the_count():
    queue: WaitingQueue[str] = WaitingQueue()
    for item, tenant in [("a0", "A"), ("a1", "A"), ("b0", "B"), ("b1", "B")]:
        queue.push(item, tenant=tenant)
    assert queue.remove_if(lambda item: item.endswith("0")) == ["a0", "b0"]
    assert len(queue) == 2
    assert sorted(queue) == ["a1", "b1"]
    assert queue.drain() == ["a1", "b1"]
    assert len(queue) == 0


@pytest.fixture(scope="module", params=[True, False], ids=["fair", "fifo"])
def one_slot(request, tiny_dir):
    with load_tiny(tiny_dir, max_batch=1, max_queue=16, fair=request.param) as engine:
        yield engine


def test_a_burst_of_one_tenant_does_not_delay_another_tenants_request(one_slot):
    """One slot: tenant A has five requests waiting, then tenant B sends one. Fair: B's runs second
    (after one of A's); first come, first served: last."""
    holder = one_slot.stream(SynthesisRequest("Holding the slot.", max_audio_ms=80 * 500))
    next(holder)
    streams = [
        (f"a{i}", one_slot.stream(SynthesisRequest("Tenant A.", max_audio_ms=160), tenant="A")) for i in range(5)
    ]
    assert wait_until(lambda: one_slot._scheduler.load()[1] == 5, 10)  # prepared and waiting: the order is set
    streams.append(("b0", one_slot.stream(SynthesisRequest("Tenant B.", max_audio_ms=160), tenant="B")))
    assert wait_until(lambda: one_slot._scheduler.load()[1] == 6, 10)
    holder.cancel()
    for _, stream in streams:
        assert sum(c.frames for c in stream) == 2
    admitted = sorted(streams, key=lambda item: item[1].submitted_at + (item[1].stats.queued_s or 0.0))
    done = [name for name, _ in admitted]
    assert sorted(done) == ["a0", "a1", "a2", "a3", "a4", "b0"]
    # (A's requests are prepared on two threads, so their own order may vary)
    assert done.index("b0") == (1 if one_slot._scheduler.waiting.fair else 5)


def test_a_request_that_gets_no_slot_in_time_is_refused_as_busy(tiny_dir):
    with load_tiny(tiny_dir, max_batch=1, max_queue=4, max_wait_s=0.5) as engine:
        holder = engine.stream(SynthesisRequest("Holding the slot.", max_audio_ms=80 * 500))
        next(holder)
        began = time.perf_counter()
        waiting = engine.stream(SynthesisRequest("I wait.", max_audio_ms=160))
        with pytest.raises(EngineBusy, match=r"no slot free within 0\.5 s") as caught:
            list(waiting)
        waited = time.perf_counter() - began
        assert waited >= 0.5
        assert to_wire(caught.value)[::2] == ("busy", True)  # retryable, HTTP 503 over the server
        assert waiting.stats.stop_reason == "error"
        holder.cancel()
        assert engine.synthesize(SynthesisRequest("Room again.", max_audio_ms=160)).stats.frames == 2
        assert engine.metrics().failed == 1


def test_a_bad_wait_bound_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="max_wait_s"):
        load_tiny(tiny_dir, max_wait_s=0)
