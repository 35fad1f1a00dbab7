"""WebRTC signalling for the demo: Pipecat's SmallWebRTC offer/answer routes (for the page at ``/`` and
for Pipecat's prebuilt client at ``/client/``), and the aioice patch that lets a loopback-bound server
offer 127.0.0.1.

(No ``from __future__ import annotations`` here: FastAPI must see the real types of the route
parameters, which are imported inside :func:`add_signalling_routes`.)
"""

import ipaddress
import uuid
from collections.abc import Awaitable, Callable
from typing import Any


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def offer_loopback_candidates() -> None:
    """aioice never offers 127.0.0.1; a server bound to loopback needs it (and it is harmless)."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if getattr(original, "_misotts_loopback", False):
        return

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = original(use_ipv4, use_ipv6)
        return ["127.0.0.1", *found] if use_ipv4 else found

    with_loopback._misotts_loopback = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = with_loopback


def add_signalling_routes(app: Any, run_bot: Callable[[Any], Awaitable[None]], *, loopback: bool) -> Any:
    """Add ``/api/offer`` (POST offer, PATCH ICE candidates), the prebuilt client's ``/start`` and
    ``/sessions/<id>/api/offer``, and mount the prebuilt client at ``/client``. ``run_bot`` runs one
    conversation on a new connection (as a background task of the offer's response). Returns the
    SmallWebRTC request handler; close it when the app shuts down."""
    from fastapi import BackgroundTasks, Request
    from fastapi.responses import JSONResponse, RedirectResponse
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.request_handler import (
        IceCandidate,
        SmallWebRTCPatchRequest,
        SmallWebRTCRequest,
        SmallWebRTCRequestHandler,
    )

    if loopback:
        offer_loopback_candidates()
    handler = SmallWebRTCRequestHandler()  # no ICE servers: host candidates only (local use)

    @app.post("/api/offer")
    async def offer(request: SmallWebRTCRequest, background_tasks: BackgroundTasks) -> Any:
        async def on_connection(connection: SmallWebRTCConnection) -> None:
            background_tasks.add_task(run_bot, connection)

        return await handler.handle_web_request(request=request, webrtc_connection_callback=on_connection)

    @app.patch("/api/offer")
    async def ice_candidate(request: SmallWebRTCPatchRequest) -> dict[str, str]:
        await handler.handle_patch_request(request)
        return {"status": "success"}

    # Pipecat's prebuilt client (/client/) starts with POST /start, then signals through /sessions/<id>/.
    sessions: set[str] = set()

    @app.post("/start")
    async def start() -> dict[str, str]:
        session_id = str(uuid.uuid4())
        sessions.add(session_id)
        return {"sessionId": session_id}

    @app.api_route("/sessions/{session_id}/api/offer", methods=["POST", "PATCH"])
    async def session_offer(session_id: str, request: Request, background_tasks: BackgroundTasks) -> Any:
        if session_id not in sessions:
            return JSONResponse({"error": "unknown session"}, status_code=404)
        data = await request.json()
        if request.method == "POST":
            rtc = SmallWebRTCRequest(
                sdp=data["sdp"], type=data["type"], pc_id=data.get("pc_id"), restart_pc=data.get("restart_pc")
            )
            return await offer(rtc, background_tasks)
        patch = SmallWebRTCPatchRequest(
            pc_id=data["pc_id"], candidates=[IceCandidate(**c) for c in data.get("candidates", [])]
        )
        return await ice_candidate(patch)

    try:
        from pipecat_ai_prebuilt.frontend import PipecatPrebuiltUI

        app.mount("/client", PipecatPrebuiltUI)
    except ImportError:  # the runner extra is optional for the page at /

        @app.get("/client", include_in_schema=False)
        async def no_client() -> RedirectResponse:
            return RedirectResponse("/")

    return handler
