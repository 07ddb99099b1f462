"""Audit trail of refused requests: a log line (never the credential) and a counter.

Counts are plain dicts exported at scrape time, like `metrics.RpcStats`: they
are updated on the event-loop thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("kvservice.audit")

# Reasons of kvservice_auth_failures_total (kept few: they are label values).
AUTH_REASONS = (
    "missing_credential", "unknown_token", "invalid_jwt", "expired_jwt",
    "missing_role", "outside_prefix", "metrics",
)  # fmt: skip
LIMIT_REASONS = ("rate", "concurrency")
# A flood of refusals must not turn into a flood of log lines: at most this many a second.
LOG_LINES_PER_SECOND = 20


class SecurityStats(Collector):
    """kvservice_auth_failures_total{reason} and kvservice_rate_limited_total{reason}."""

    def __init__(self) -> None:
        self.auth_failures = dict.fromkeys(AUTH_REASONS, 0)
        self.rate_limited = dict.fromkeys(LIMIT_REASONS, 0)
        self._window = 0
        self._lines = 0
        self._suppressed = 0

    def collect(self) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "kvservice_auth_failures",
            "Requests refused as unauthenticated or permission_denied, by reason",
            labels=["reason"],
        )
        for reason, count in self.auth_failures.items():
            failures.add_metric([reason], count)
        yield failures
        limited = CounterMetricFamily(
            "kvservice_rate_limited",
            "Requests refused with resource_exhausted by a rate or concurrency limit",
            labels=["reason"],
        )
        for reason, count in self.rate_limited.items():
            limited.add_metric([reason], count)
        yield limited

    def refused(
        self, reason: str, *, identity: str | None, method: str, client: str | None,
        key: str | None = None, message: str = "",
    ) -> None:  # fmt: skip
        """Count an authentication failure or denial and log it (rate-capped)."""
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1
        if not self._may_log():
            return
        extra: dict[str, object] = {
            "reason": reason, "identity": identity, "method": method, "client": client,
            "key_prefix": key_prefix(key) if key is not None else None, "detail": message,
        }  # fmt: skip
        if self._suppressed:
            extra["suppressed_before"] = self._suppressed
            self._suppressed = 0
        log.warning("request refused", extra=extra)

    def limited(self, reason: str) -> None:
        self.rate_limited[reason] += 1

    def _may_log(self) -> bool:
        second = int(time.monotonic())
        if second != self._window:
            self._window, self._lines = second, 0
        self._lines += 1
        if self._lines > LOG_LINES_PER_SECOND:
            self._suppressed += 1
            return False
        return True


def key_prefix(key: str, limit: int = 48) -> str:
    """The part of a key a log may show: up to its last ':' (the id after it may be personal)."""
    cut = key.rfind(":")
    shown = key[: cut + 1] if cut >= 0 else ""
    return shown[:limit]
