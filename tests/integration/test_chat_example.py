"""The README's chat example (docs/examples/chat.py) runs against a real node and does
what the README says."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, ServerProcess

pytestmark = pytest.mark.integration


def test_chat_example_runs(server: ServerProcess) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "docs" / "examples" / "chat.py"), server.url],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "online: {'alice': True, 'bob': False}",
        "joined: True False",
        "members: ['alice', 'bob']",
        "message 1 bob unread: 1",
        "session created: True again: False",
    ]
