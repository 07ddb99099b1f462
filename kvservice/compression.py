"""Request decompression that cannot be used to exhaust memory.

connect-python's stock gzip inflates the whole body and only then compares it
with `read_max_bytes`, so a 1 MB body of zeros inflating to 1 GiB takes
gigabytes of memory and seconds of event-loop time before it is refused. Here
inflation stops one byte past the limit.
"""

from __future__ import annotations

import gzip
import zlib

from connectrpc.code import Code
from connectrpc.compression import Compression
from connectrpc.errors import ConnectError

GZIP_WBITS = 16 + zlib.MAX_WBITS  # expect a gzip header and trailer


class BoundedGzip(Compression):
    """gzip for Connect, refusing bodies that inflate past `limit` bytes."""

    def __init__(self, limit: int, level: int = 6) -> None:
        self.limit = limit
        self.level = level

    def name(self) -> str:
        return "gzip"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return gzip.compress(data, compresslevel=self.level)

    def decompress(self, data: bytes | bytearray | memoryview) -> bytes:
        inflater = zlib.decompressobj(GZIP_WBITS)
        try:
            out = inflater.decompress(data, self.limit + 1)
        except zlib.error as exc:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"request body is not valid gzip ({exc})"
            ) from None
        if len(out) > self.limit or inflater.unconsumed_tail:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"request body inflates to more than {self.limit} bytes",
            )
        if not inflater.eof or inflater.unused_data:
            raise ConnectError(
                Code.INVALID_ARGUMENT, "request body is not a single complete gzip stream"
            )
        return out
