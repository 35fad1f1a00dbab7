"""The bounded caches (cachetools): the voice-prefill cache and the LiveKit runner's audio cache."""

from __future__ import annotations

import numpy as np
import pytest

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.voice import VoiceCache


def test_voice_cache_keeps_the_most_recently_used():
    cache = VoiceCache(capacity=2)
    a, b, c, d = object(), object(), object(), object()
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a is now the most recent
    cache.put("c", c)  # b goes
    assert cache.get("b") is None
    assert cache.get("a") is a
    assert cache.get("c") is c
    cache.put("d", d)  # a was used before c: a goes
    assert len(cache) == 2
    assert cache.get("a") is None
    assert cache.get("d") is d


def test_runner_audio_cache_is_bounded_by_seconds():
    from misotts_agents.livekit import MisoInferenceRunner

    runner = MisoInferenceRunner(engine=None, max_cached_s=1.0)
    clip = np.zeros(int(0.6 * SAMPLE_RATE), dtype=np.float32)
    runner._blob("first", clip)
    runner._blob("second", clip + 0.1)  # 1.2 s in all: the first goes
    assert runner._blob("first", None) is None
    assert runner._blob("second", None) is not None
    long = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
    assert runner._blob("long", long) is long  # used once, not kept (it would push out everything)
    assert runner._blob("long", None) is None
    assert runner._blob("second", None) is not None


def test_ray_ingress_tracks_a_bounded_number_of_sessions():
    pytest.importorskip("ray")
    from misotts_agents.server.ray.ingress import RayEngineBackend

    backend = RayEngineBackend(engine=None, max_tracked_sessions=2)
    for sid in ("s1", "s2", "s3"):
        backend.heard({"replica": "a", "closed": False}, sid)
    assert len(backend._homes) == 2
    assert "s1" not in backend._homes  # the oldest is forgotten
    backend.heard({"replica": "b", "closed": False}, "s3")  # s3 answered from another replica
    assert backend.moved_sessions == 1
