"""What the server tests share: a WebSocket client's view of the protocol, and the engine's state."""

from __future__ import annotations

import asyncio
import json
import socket

from remote_server import LoopbackServer
from signals import wait_until

from misotts_agents.server.protocol import unpack_audio


async def next_json(ws) -> dict:
    async with asyncio.timeout(10):
        while True:
            data = await ws.recv()
            if isinstance(data, str):
                return json.loads(data)


def ws_url(s: LoopbackServer) -> str:
    return f"ws://127.0.0.1:{s.port}/v1/stream"


def http_url(s: LoopbackServer, path: str) -> str:
    return f"http://127.0.0.1:{s.port}{path}"


def start(rid: str, frames: int, seed: int = 7, **kw) -> str:
    return json.dumps(
        {"type": "start", "id": rid, "text": "Hello from Miso.", "seed": seed, "max_audio_ms": 80 * frames, **kw}
    )


async def collect(ws, ids: set[str], timeout: float = 30.0) -> tuple[dict[str, list], dict[str, dict]]:
    """Audio frames and final (end / error) messages per id, until every id in ``ids`` ended."""
    audio: dict[str, list] = {rid: [] for rid in ids}
    ends: dict[str, dict] = {}
    async with asyncio.timeout(timeout):
        while set(ends) != ids:
            data = await ws.recv()
            if isinstance(data, bytes):
                rid, start_frame, frames, final, pcm = unpack_audio(data)
                audio[rid].append((start_frame, frames, final, bytes(pcm)))
            else:
                msg = json.loads(data)
                if msg["type"] in ("end", "error") and msg.get("id") in ids:
                    ends[msg["id"]] = msg
    return audio, ends


def free(engine) -> bool:
    return wait_until(lambda: engine.free_slots == engine.max_batch, timeout=10)


def silent_client(port: int, token: str | None, message: str) -> socket.socket:
    """A WebSocket client that sends one text message and then never reads (its receive window
    kept small, so the server's sends back up quickly). Close the socket when done."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window is set then
    sock.connect(("127.0.0.1", port))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(
        (
            "GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:  # the handshake's answer first, as a client waits for it
        response += sock.recv(1024)
    assert response.startswith(b"HTTP/1.1 101"), response
    data, mask = message.encode(), b"\x01\x02\x03\x04"  # one masked text frame, as clients send
    length = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + len(data).to_bytes(2, "big")
    sock.sendall(b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
    return sock
