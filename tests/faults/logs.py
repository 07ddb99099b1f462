"""Read the JSON-lines log a kvservice process wrote."""

from __future__ import annotations

import json
from typing import Any


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` that is a JSON object (the server logs nothing else)."""
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def find(text: str, message: str) -> list[dict[str, Any]]:
    """Log entries whose `message` field equals `message`."""
    return [entry for entry in json_lines(text) if entry.get("message") == message]
