"""The engine-or-URL choice both integrations make (misotts_agents.connect)."""

from __future__ import annotations

import pytest

from misotts_agents.connect import TOKEN_ENV, server_connection
from misotts_agents.server import RemoteEngine


def test_no_url_means_no_connection():
    assert server_connection(None, None) is None
    assert server_connection(object(), None, token="ignored") is None  # the caller's engine is used


def test_url_makes_the_integrations_own_connection(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    remote = server_connection(None, "http://gpu-box:8700")
    assert isinstance(remote, RemoteEngine)
    assert remote.url == "ws://gpu-box:8700/v1/stream"
    assert remote.token == "from-env"
    assert remote.want_codes is False  # integrations never need the codes
    assert server_connection(None, "ws://gpu-box:8700", token="given").token == "given"
    monkeypatch.setenv(TOKEN_ENV, "")
    assert server_connection(None, "ws://gpu-box:8700").token is None


def test_engine_and_url_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        server_connection(object(), "ws://gpu-box:8700")
