"""kvservice: an in-memory key-value database served over ConnectRPC."""

from __future__ import annotations

__version__ = "0.1.0"
