"""In-process nodes for unit and property tests (integration tests use real processes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvservice.config import Settings
from kvservice.metrics import Metrics
from kvservice.node import Node
from kvservice.server import build_node
from kvservice.storage.recovery import recover


def open_node(data_dir: Path, **overrides: Any) -> Node:
    """Recover `data_dir` and return a node (call node.start() inside a running loop)."""
    settings = Settings(data_dir=data_dir, **overrides)
    return build_node(settings, recover(data_dir), Metrics())


class LoopNode:
    """A node driven from synchronous test code through its own event loop."""

    def __init__(
        self, data_dir: Path, clock: Callable[[], int] | None = None, **overrides: Any
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.data_dir = data_dir
        self.overrides = overrides
        # Simulated time: the store reads this clock, and the test runs expiry
        # cycles itself (Node.expire_cycle) instead of the timed background task.
        self.clock = clock
        self.node = self._open()

    def _open(self) -> Node:
        node = open_node(self.data_dir, **self.overrides)
        if self.clock is not None:
            node.store.clock = self.clock
        self.loop.run_until_complete(_start(node))
        if self.clock is not None and node._expiry_task is not None:
            node._expiry_task.cancel()
        return node

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def restart(self) -> None:
        """Graceful: close (fsync) and recover."""
        self.run(self.node.close())
        self.node = self._open()

    def abandon(self) -> None:
        """Crash: drop the node without closing it; files stay as the OS has them."""
        for task in (self.node.wal._task, self.node._expiry_task):
            if task is not None:
                task.cancel()
        self.node.wal._close_files()
        self.node.wal._executor.shutdown(wait=True)

    def reopen(self) -> None:
        self.node = self._open()

    def close(self) -> None:
        self.run(self.node.close())
        self.loop.close()


async def _start(node: Node) -> None:
    node.start()
