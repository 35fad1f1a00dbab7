"""The engine server (``misotts-agents serve``) and its client, :class:`RemoteEngine`.

FastAPI and websockets are imported only when this package is used.
"""

from .client import RemoteConnectionError, RemoteEngine, RemoteError, RemoteSpeechStream
from .protocol import Limits

__all__ = ["Limits", "RemoteConnectionError", "RemoteEngine", "RemoteError", "RemoteSpeechStream", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
