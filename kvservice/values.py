"""Value compression (settings `compression` and `compression_min_bytes`).

A value at least `compression_min_bytes` long is stored as a zstd frame when
that is smaller; the LogEntry says so (`value_encoding`), and the stored bytes
carry a flag (engine.py), so memory, the WAL, snapshots and replication all
hold the compressed form, and only reads decompress.
"""

from __future__ import annotations

import zstandard

_compressor = zstandard.ZstdCompressor(level=3)
_decompressor = zstandard.ZstdDecompressor()


def compress(value: bytes, min_bytes: int) -> bytes | None:
    """The zstd frame of `value`, or None when it is short or would not shrink."""
    if len(value) < min_bytes:
        return None
    frame = _compressor.compress(value)
    return frame if len(frame) < len(value) else None


def decompress(frame: bytes) -> bytes:
    value: bytes = _decompressor.decompress(frame)
    return value
