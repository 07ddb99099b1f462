"""Running a node under uvicorn, with kvservice's shutdown rules."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from kvservice.app import create_app
from kvservice.config import Settings
from kvservice.metrics import Metrics
from kvservice.node import Node
from kvservice.security import harden
from kvservice.storage.recovery import Recovery

log = logging.getLogger("kvservice.server")


class CannotServe(Exception):
    """The server could not start listening; uvicorn has logged why."""


class Server(uvicorn.Server):
    """uvicorn's server, but any second SIGTERM/SIGINT forces exit, and a signal
    that led to a clean shutdown is not re-raised (so the exit status is 0)."""

    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_first_signal = on_first_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            log.warning("second signal: exiting now", extra={"signal": signal.Signals(sig).name})
            self.force_exit = True
        else:
            log.info("shutting down", extra={"signal": signal.Signals(sig).name})
            self.on_first_signal()
            self.should_exit = True


# How long the event loop may hold the GIL while another thread waits for it.
# Python's default is 5 ms; the fsync thread needs the GIL back after every
# fdatasync, and at fsync=always every waiting write waits for that handoff,
# so a busy loop would add up to 5 ms to each group commit.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


def serve(settings: Settings, recovery: Recovery) -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    metrics = Metrics()
    metrics.observe_recovery(recovery)
    node = Node(settings, recovery, metrics)
    config = uvicorn.Config(
        create_app(node),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_seconds)),
    )
    harden(config, settings)  # TLS, slow-client limits, SIGHUP reload
    try:
        Server(config, on_first_signal=node.begin_drain).run()
    except SystemExit as exc:
        # uvicorn exits with its own code 3 when it cannot listen (port in use, no
        # permission); in kvservice 3 means the data dir was refused, so re-raise.
        raise CannotServe(f"cannot listen on {settings.host}:{settings.port}") from exc
    finally:
        # After a forced exit the lifespan shutdown never ran: still fsync and close.
        node.close_sync()
