"""The engine server (``misotts-agents serve``) and its client, :class:`RemoteEngine`.

FastAPI and websockets are imported only when this package is used.
"""

from typing import TYPE_CHECKING

from misotts_agents.errors import RemoteError
from misotts_agents.server.client import RemoteConnectionError, RemoteEngine, WebSocketSpeechStream
from misotts_agents.server.protocol import Limits

if TYPE_CHECKING:  # for editors and type checkers; loaded on first use (FastAPI is heavy)
    from misotts_agents.server.app import create_app

__all__ = ["Limits", "RemoteConnectionError", "RemoteEngine", "RemoteError", "WebSocketSpeechStream", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from misotts_agents.server.app import create_app

        return create_app
    raise AttributeError(name)
