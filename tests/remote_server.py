"""A loopback engine server for tests: ``create_app`` under uvicorn in a thread, on a free 127.0.0.1 port.

    from remote_server import LoopbackServer, mode_fixture, server_fixture

    my_server = server_fixture("my_engine")            # module-scoped: one server for the file
    mode = mode_fixture("my_engine", "my_server")       # parametrized: "local" and "remote"

    def test_x(mode):
        service = Service(**mode.kwargs)                # engine=... or url=..., token=...
        spy_on(mode.engine)                             # the engine doing the work in both modes

The remote server serves the very engine the local mode uses, so a test can spy on (monkeypatch)
``engine.stream`` and read ``engine.free_slots`` / ``engine.metrics()`` the same way in both modes.
The server starts only when a remote test first asks for it.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from signals import wait_until

MODES = ["local", "remote"]
TOKEN = "test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """``misotts-agents serve`` for ``engine`` (the caller owns and closes it), in a daemon thread."""

    def __init__(
        self,
        engine: Any,
        *,
        token: str | None = TOKEN,
        limits: Any = None,
        model_name: str = "tiny",
        **app_options: Any,
    ):
        import uvicorn

        from misotts_agents.server import Limits
        from misotts_agents.server.app import create_app
        from misotts_agents.server.lifecycle import uvicorn_config

        limits = limits or Limits()
        self.engine = engine
        self.token = token
        self.port = free_port()
        self.app = app = create_app(engine, token=token, limits=limits, model_name=model_name, **app_options)
        config = uvicorn_config(app, "127.0.0.1", self.port, limits, log_level="warning")  # as `serve` runs it
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"loopback-server-{self.port}", daemon=True)
        self._thread.start()
        if not wait_until(lambda: self._server.started or not self._thread.is_alive(), timeout=20):
            raise RuntimeError("the loopback server did not start in 20 s")
        if not self._server.started:
            raise RuntimeError("the loopback server failed to start")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def client_kwargs(self) -> dict[str, Any]:
        """What an integration needs to use this server: ``url`` and ``token``."""
        return {"url": self.url, "token": self.token}

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_fixture(engine_fixture: str, *, scope: str = "module", **options: Any):
    """A pytest fixture (assign it to a module-level name) serving the engine of ``engine_fixture``."""

    @pytest.fixture(scope=scope)
    def fixture(request: pytest.FixtureRequest):
        with LoopbackServer(request.getfixturevalue(engine_fixture), **options) as server:
            yield server

    return fixture


@dataclass
class Mode:
    """One way of reaching the engine: in process, or through the loopback server."""

    name: str
    engine: Any  # the engine doing the work (the server's engine in remote mode)
    kwargs: dict[str, Any] = field(default_factory=dict)  # for the integration: engine= or url=/token=
    server: LoopbackServer | None = None

    @property
    def remote(self) -> bool:
        return self.server is not None

    def __str__(self) -> str:
        return self.name


def mode_fixture(engine_fixture: str, server_fixture_name: str):
    """A fixture parametrized over :data:`MODES` (override with ``indirect=["mode"]``) giving a :class:`Mode`."""

    @pytest.fixture(params=MODES)
    def fixture(request: pytest.FixtureRequest) -> Mode:
        engine = request.getfixturevalue(engine_fixture)
        if request.param == "local":
            return Mode("local", engine, {"engine": engine})
        server = request.getfixturevalue(server_fixture_name)
        return Mode("remote", engine, server.client_kwargs, server)

    return fixture
