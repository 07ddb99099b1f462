"""Node-level cost of Set and Get (no HTTP), two checkouts in alternating rounds.

    python -m bench.nodemicro BEFORE_REPO AFTER_REPO [--rounds 5]

What a hot-path change costs without the ~100 µs of HTTP, Connect and asyncio
around it, whose noise on a shared machine hides a few per cent: each round runs
this module's CHILD script in a fresh interpreter per checkout (PYTHONPATH = that
checkout, so its kvservice and tests.nodes are imported), which times N
`await node.set(key, 100 B)` at fsync=no and N Gets as service.py answers them
(the node read plus the GetResponse), and reports the best of 5 passes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.servers import repo_env

# Runs in the checkout under test (cwd and PYTHONPATH), so it may only use what every
# checkout has: kvservice and tests.nodes. Prints one JSON line.
CHILD = """
import asyncio, json, tempfile, time
from pathlib import Path
from kvservice.v1.kv_pb2 import GetResponse, SetRequest
from tests.nodes import open_node

N = 20_000
KEY, VALUE = "user:000001:session", b"v" * 100
REQUEST = SetRequest(key=KEY, value=VALUE)

async def measure():
    with tempfile.TemporaryDirectory() as tmp:
        node = open_node(Path(tmp) / "d", fsync="no")
        node.start()
        data_model = hasattr(node, "item")  # the data-model node (TTL, CAS)
        await node.set(KEY, VALUE)
        best_set = best_get = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(N):
                if data_model:  # as service.py calls it
                    if_revision = REQUEST.if_revision if REQUEST.HasField("if_revision") else None
                    await node.set(REQUEST.key, REQUEST.value, REQUEST.ttl_ms, if_revision)
                else:
                    await node.set(REQUEST.key, REQUEST.value)
            best_set = min(best_set, time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(N):
                if data_model:
                    item = node.item(KEY)
                    if item.expires_at_ms:
                        GetResponse(found=True, value=item.value, revision=item.revision,
                                    expires_at_ms=item.expires_at_ms)
                    GetResponse(found=True, value=item.value, revision=item.revision)
                else:
                    value, revision = node.get(KEY)
                    GetResponse(found=True, value=value, revision=revision)
            best_get = min(best_get, time.perf_counter() - started)
        await node.close()
    return {"set_us": best_set / N * 1e6, "get_us": best_get / N * 1e6}

print(json.dumps(asyncio.run(measure())))
"""


def run_child(repo: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=repo, env=repo_env(repo) or None, capture_output=True, text=True, timeout=300,
        check=True,
    )  # fmt: skip
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    pair = [("before", args.before.resolve()), ("after", args.after.resolve())]
    for round_no in range(args.rounds):
        for label, repo in pair[round_no % 2 :] + pair[: round_no % 2]:
            runs[label].append(run_child(repo))
            print(f"round {round_no + 1} {label}: {runs[label][-1]}", file=sys.stderr)
    print("| path | before µs, median (min-max) | after µs | after - before (µs) |")
    print("|---|---|---|---|")
    paths = (("Node.set, fsync=no", "set_us"), ("Get (node read + GetResponse)", "get_us"))
    for name, field in paths:
        b = [r[field] for r in runs["before"]]
        a = [r[field] for r in runs["after"]]
        mb, ma = statistics.median(b), statistics.median(a)
        print(f"| {name} | {mb:.2f} ({min(b):.2f}-{max(b):.2f}) | {ma:.2f} ({min(a):.2f}-"
              f"{max(a):.2f}) | {ma - mb:+.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
