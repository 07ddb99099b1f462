"""`kvservice check --primary P --replica R`: are the two states equal?

Both nodes are read at the same revision (the replica is asked to wait for
the primary's revision; under writes the two are asked again until they
meet), their digests compared, and on a difference the bucketed digests
narrow it down to a few buckets whose keys are listed and compared: the
differing keys are printed without transferring the data sets.
Exit 0 equal, 1 different, 2 usage or a node unreachable.
"""

from __future__ import annotations

import sys

from connectrpc.errors import ConnectError

from kvservice.remote import Remote
from kvservice.v1.admin_connect import AdminClientSync
from kvservice.v1.admin_pb2 import DigestRequest, DigestResponse

EQUAL, DIFFERENT, UNUSABLE = 0, 1, 2
BUCKETS = 256
ATTEMPTS = 20


def check_nodes(primary_url: str, replica_url: str, remote: Remote) -> int:
    client = remote.http_client
    try:
        with (
            AdminClientSync(primary_url, timeout_ms=60_000, http_client=client) as primary,
            AdminClientSync(replica_url, timeout_ms=60_000, http_client=client) as replica,
        ):
            call = _Caller(primary, replica, remote.headers)
            pair = call.at_one_revision(DigestRequest(buckets=BUCKETS))
            if pair is None:
                print("kvservice: the nodes never stood at one revision (writes too frequent);"
                      " try again when it is quieter", file=sys.stderr)  # fmt: skip
                return UNUSABLE
            p, r = pair
            if p.digest == r.digest:
                print(f"equal at revision {p.revision} (digest {p.digest:016x})")
                return EQUAL
            differing = [
                i for i, (a, b) in enumerate(zip(p.bucket_digests, r.bucket_digests, strict=True))
                if a != b
            ]  # fmt: skip
            keys = call.at_one_revision(DigestRequest(buckets=BUCKETS, list_buckets=differing))
    except ConnectError as exc:
        print(f"kvservice: check failed: {exc.code.value}: {exc.message}", file=sys.stderr)
        return UNUSABLE
    print(f"DIFFERENT at revision {p.revision}: primary {p.digest:016x}, replica {r.digest:016x}")
    if keys is not None:
        for line in _key_differences(*keys):
            print(line)
    return DIFFERENT


class _Caller:
    def __init__(
        self, primary: AdminClientSync, replica: AdminClientSync, headers: dict[str, str]
    ) -> None:
        self.primary, self.replica, self.headers = primary, replica, headers

    def at_one_revision(
        self, request: DigestRequest
    ) -> tuple[DigestResponse, DigestResponse] | None:
        """Both digests at one revision: the replica waits for the primary's, and
        under writes both are asked again until they meet."""
        p = self.primary.digest(request, headers=self.headers)
        for _ in range(ATTEMPTS):
            ask = DigestRequest()
            ask.CopyFrom(request)
            ask.min_revision = p.revision
            r = self.replica.digest(ask, headers=self.headers)
            if r.revision == p.revision:
                return p, r
            ask.min_revision = r.revision
            p = self.primary.digest(ask, headers=self.headers)
        return None


def _key_differences(p: DigestResponse, r: DigestResponse) -> list[str]:
    mine = {k.key: (k.revision, k.hash) for k in p.keys}
    theirs = {k.key: (k.revision, k.hash) for k in r.keys}
    lines = []
    for key in sorted(mine.keys() | theirs.keys()):
        a, b = mine.get(key), theirs.get(key)
        if a == b:
            continue
        where = (
            "missing on the replica" if b is None
            else "only on the replica" if a is None
            else f"primary revision {a[0]}, replica revision {b[0]}"
            + (" (same revision, different value)" if a[0] == b[0] else "")
        )  # fmt: skip
        lines.append(f"  {key!r}: {where}")
    return lines
