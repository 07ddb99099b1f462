"""A cheap HTTP flooder for rate-limit tests: one keep-alive socket, prebuilt request bytes.

    python -m tests.integration.flooder HOST PORT PATH TOKEN SECONDS

Prints `<200 count> <429 count> <Retry-After values>`. Cheap per request, so
the flooding client does not itself eat the cores the server and others need.
"""

from __future__ import annotations

import socket
import sys
import time

CRLF = b"\r\n"
END = b"\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"


def flood(host: str, port: int, path: str, token: str, seconds: float) -> str:
    body = b'{"key":"k"}'
    request = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    codes: dict[int, int] = {}
    retry_after: set[str] = set()
    buf = b""
    with socket.create_connection((host, port)) as sock:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.sendall(request)
            while END not in buf:
                buf += sock.recv(65536)
            head, _, buf = buf.partition(END)
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.lower().split(": ", 1) for line in lines[1:])
            if "content-length" in fields:
                length = int(fields["content-length"])
                while len(buf) < length:
                    buf += sock.recv(65536)
                buf = buf[length:]
            else:  # chunked; these small replies never hold the terminator in their data
                while CHUNKED_END not in buf:
                    buf += sock.recv(65536)
                buf = buf.partition(CHUNKED_END)[2]
            codes[status] = codes.get(status, 0) + 1
            if "retry-after" in fields:
                retry_after.add(fields["retry-after"])
    return f"{codes.get(200, 0)} {codes.get(429, 0)} {','.join(sorted(retry_after))}"


if __name__ == "__main__":
    host, port, path, token, seconds = sys.argv[1:6]
    print(flood(host, int(port), path, token, float(seconds)))
