"""Comparing two nodes' states without moving their data (`kvservice check`).

A node's digest (engine.py) says whether two states at the same revision are
equal; bucketed digests (keys split by a hash of the key) narrow a difference
down to a few buckets, and listing those buckets' keys names the keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from kvservice.engine import pair_hash, revision_of

MAX_BUCKETS = 65536


def bucket_of(key: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") % buckets


@dataclass
class Buckets:
    digests: list[int]
    keys: list[tuple[str, int, int, int]] = field(default_factory=list)  # key, rev, hash, bucket


def bucket_digests(data: dict[str, bytes], buckets: int, listed: set[int]) -> Buckets:
    """Per-bucket digests of a (copied) state, and the keys of the `listed` buckets."""
    out = Buckets([0] * buckets)
    for key, stored in data.items():
        bucket = bucket_of(key, buckets)
        term = pair_hash(key, stored)
        out.digests[bucket] ^= term
        if bucket in listed:
            out.keys.append((key, revision_of(stored), term, bucket))
    return out
