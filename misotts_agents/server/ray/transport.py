"""What crosses between the Ray ingress and the engine replicas when something goes wrong.

A replica answers an error as plain data (an item of :func:`error_item`) instead of raising it: Ray
would wrap a raised exception in its own. The ingress turns the item back into the exception with
the same wire code (the one table in ``misotts_agents.errors``), and a failed handle call (Serve
full, replica gone) into what it means for the client (:func:`transport_error`).
"""

from __future__ import annotations

from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from misotts_agents.errors import EngineBusy, MisoError, from_wire, to_wire

#: The item a replica sends once its engine gave the request a slot (before any audio).
ADMITTED = ("admitted",)


class ReplicaLost(EngineBusy):
    """The engine replica serving a request or session went away (it died or was stopped mid-call).

    A subclass of EngineBusy (protocol code ``busy``): retrying is right, and the retry runs on a live
    replica, but a session that lived on the lost replica starts there afresh (no voice, no turns).
    """


def error_item(exc: BaseException) -> tuple[str, str, str]:
    """``exc`` as the plain-data item a replica answers with: ``("error", code, message)``."""
    code, message, _ = to_wire(exc)
    return ("error", code, message)


def error_from_item(item: tuple[Any, ...]) -> MisoError:
    """The exception an :func:`error_item` stands for."""
    _, code, message = item
    return from_wire(code, message)


def transport_error(exc: BaseException) -> BaseException:
    """What a failed handle call means for the client."""
    if isinstance(exc, BackPressureError):
        return EngineBusy(f"all engine replicas are busy and the queue for them is full; retry later ({exc})")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)):
        return ReplicaLost(f"the engine replica serving this request was lost; retry ({type(exc).__name__})")
    return exc
