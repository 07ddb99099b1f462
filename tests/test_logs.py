"""kvservice.logs in-process: the JSON and text formatters, and configure()."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import pytest

from kvservice import logs

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def record(
    message: str = "hello %s",
    args: tuple[object, ...] = ("world",),
    level: int = logging.INFO,
    name: str = "kvservice.test",
    exc_info: ExcInfo | None = None,
    **extra: object,
) -> logging.LogRecord:
    """A LogRecord as logger.log(level, message, *args, extra=extra) would make it."""
    return logging.getLogger(name).makeRecord(
        name, level, __file__, 1, message, args, exc_info, extra=extra
    )


def test_json_line_has_time_level_logger_message() -> None:
    """One JSON object per record: time (UTC, ms, Z), lower-case level, logger, message."""
    line = logs.JsonFormatter().format(record())
    assert "\n" not in line
    entry = json.loads(line)
    assert list(entry)[:4] == ["time", "level", "logger", "message"]
    assert entry["level"] == "info"
    assert entry["logger"] == "kvservice.test"
    assert entry["message"] == "hello world"
    stamp = datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.DEBUG, "debug"),
        (logging.WARNING, "warning"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "critical"),
    ],
)
def test_json_levels_are_lower_case(level: int, name: str) -> None:
    """Every level is written in lower case."""
    assert json.loads(logs.JsonFormatter().format(record(level=level)))["level"] == name


def test_json_context_fields_from_extra() -> None:
    """Fields passed with extra= become top-level JSON fields, with their JSON types."""
    entry = json.loads(
        logs.JsonFormatter().format(
            record(
                "recovered",
                (),
                revision=42,
                seconds=0.125,
                torn_tail_truncated=False,
                segment=None,
                data_dir=Path("/var/lib/kv"),
                nested={"a": [1, 2]},
            )
        )
    )
    assert entry["message"] == "recovered"
    assert entry["revision"] == 42
    assert entry["seconds"] == 0.125
    assert entry["torn_tail_truncated"] is False
    assert entry["segment"] is None
    assert entry["data_dir"] == "/var/lib/kv"  # not JSON-native: written with str()
    assert entry["nested"] == {"a": [1, 2]}
    # Nothing of the LogRecord's own bookkeeping leaks into the line.
    for internal in ("args", "msg", "levelno", "pathname", "lineno", "exc_info", "taskName"):
        assert internal not in entry


def test_json_keeps_unicode_and_escapes_newlines() -> None:
    """Non-ASCII text stays readable; a newline in a message cannot split the line."""
    line = logs.JsonFormatter().format(record("ключ %s", ("a\nb",), key="🔑"))
    assert "\n" not in line
    assert "ключ" in line
    assert "🔑" in line
    assert json.loads(line)["message"] == "ключ a\nb"


def test_json_exception_is_a_field_on_the_same_line() -> None:
    """An exception is logged in an `exception` field holding the traceback, still one line."""
    try:
        raise ValueError("disk on fire")
    except ValueError:
        exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(
        record("unexpected error", (), level=logging.ERROR, exc_info=exc_info, method="Set")
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert entry["method"] == "Set"
    assert entry["exception"].startswith("Traceback (most recent call last)")
    assert "ValueError: disk on fire" in entry["exception"]


def test_text_format_for_people() -> None:
    """The text format is `time LEVEL logger: message key=value ...`."""
    line = logs.TextFormatter().format(record("recovered", (), revision=7, seconds=0.5))
    stamp, level, rest = line.split(maxsplit=2)
    datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert level == "INFO"
    assert rest == "kvservice.test: recovered revision=7 seconds=0.5"
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_text_format_exception_follows_the_line() -> None:
    """In text format the traceback follows the message on the next lines."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    text = logs.TextFormatter().format(record("failed", (), logging.ERROR, exc_info=exc_info))
    first, *rest = text.splitlines()
    assert first.endswith("ERROR    kvservice.test: failed")
    assert rest[0].startswith("Traceback")
    assert rest[-1] == "RuntimeError: boom"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() changes process-wide logging: put it back afterwards."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate,
                 logging.getLogger(n).disabled) for n in names}  # fmt: skip
    yield
    root.handlers[:], level = saved_root
    root.setLevel(level)
    for name, (handlers, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled


@pytest.mark.usefixtures("restore_logging")
def test_configure_sends_every_logger_to_stderr_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    """After configure("info", "json") our loggers and uvicorn's print JSON lines on stderr."""
    uvicorn_error = logging.getLogger("uvicorn.error")
    uvicorn_error.addHandler(logging.StreamHandler(sys.stdout))  # as uvicorn's own config would
    logs.configure("info", "json")
    logging.getLogger("kvservice.node").info("node closed", extra={"revision": 3})
    uvicorn_error.info("Started server process [%d]", 123)
    logging.getLogger("kvservice.node").debug("not shown at info")
    logging.getLogger("uvicorn.access").info("uvicorn's access line is replaced by ours")
    out, err = capsys.readouterr()
    assert out == ""
    entries = [json.loads(line) for line in err.splitlines()]
    assert [(e["logger"], e["message"]) for e in entries] == [
        ("kvservice.node", "node closed"),
        ("uvicorn.error", "Started server process [123]"),
    ]
    assert entries[0]["revision"] == 3


@pytest.mark.usefixtures("restore_logging")
def test_configure_text_and_level(capsys: pytest.CaptureFixture[str]) -> None:
    """configure("warning", "text") prints text lines and drops info."""
    logs.configure("warning", "text")
    logging.getLogger("kvservice.x").info("dropped")
    logging.getLogger("kvservice.x").warning("kept %d", 1, extra={"why": "test"})
    err = capsys.readouterr().err
    assert "dropped" not in err
    (line,) = err.splitlines()
    assert line.endswith("WARNING  kvservice.x: kept 1 why=test")
