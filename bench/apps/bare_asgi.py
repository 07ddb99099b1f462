"""The ceiling of the stack: a raw ASGI app that answers every request with a fixed body.

It still reads the request body, as any RPC server must, so the comparison
with kvservice is the cost of Connect, protobuf and kvservice themselves.
"""

from __future__ import annotations

from typing import Any

BODY = b'{"found":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
