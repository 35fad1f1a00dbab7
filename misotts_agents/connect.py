"""Where an integration's requests go: an engine in this process, or a ``misotts-agents serve`` server.

Both integrations (Pipecat's ``MisoTTSService``, LiveKit's ``TTS``) take ``engine=`` or ``url=`` (with
``token=``) and make the choice here, the same way. Light to import: the server's client is loaded only
when a ``url`` is given.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from misotts_agents.engine.audio_stream import AudioSource
    from misotts_agents.server.client import RemoteEngine

TOKEN_ENV = "MISOTTS_TOKEN"
"""The server's bearer token when ``url=`` is given without ``token=``."""


def server_connection(engine: AudioSource | None, url: str | None, token: str | None = None) -> RemoteEngine | None:
    """The integration's own :class:`RemoteEngine` for ``url`` (None without one: the integration uses
    ``engine`` or the process-wide engine). ``token`` defaults to ``$MISOTTS_TOKEN``. The connection
    opens on first use and belongs to the integration, which closes it. ``engine`` and ``url`` together
    are an error."""
    if url is None:
        return None
    if engine is not None:
        raise ValueError("pass either engine= (in process) or url= (a server), not both")
    from misotts_agents.server.client import RemoteEngine

    return RemoteEngine(url, token if token is not None else os.environ.get(TOKEN_ENV) or None, codes=False)
