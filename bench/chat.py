"""A chat-like data set: message metadata as JSON, 200-2,000 bytes a value, seeded.

Each message has what a chat backend keeps per message: ids, room, sender,
timestamps, a text snippet, mentions, reactions, attachments, thread and client
fields. Its size is drawn uniformly from 200-2,000 bytes and reached by the
length of the text (attachments and reactions only on messages with room for
them), so the set covers the whole range evenly. One `random.Random(SEED)` draws
the messages in order, so the first n are the same on every run.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from typing import Final

SEED: Final = 20261128
MIN_BYTES: Final = 200
MAX_BYTES: Final = 2000
ROOMS: Final = 5000

WORDS: Final = (  # noqa: SIM905 (a sentence of words reads better than a list)
    "the a to and of in is it you that for on with are this be at have not we can "
    "just so but was what do if my me your all will up about out get like one no "
    "know now there more time how when think good see new today meeting tomorrow "
    "deploy release build test review merge branch ticket bug fix sprint standup "
    "lunch coffee call thanks please sure okay yes maybe later soon done working "
    "looks great nice agreed ship it production staging dashboard alert latency "
    "customer feedback design mockup draft doc link slides budget plan roadmap "
    "weekend holiday flight hotel train office remote team channel thread update"
).split()
EMOJI: Final = ("thumbsup", "heart", "joy", "tada", "eyes", "rocket", "pray", "fire", "ok_hand")
MIME: Final = (
    ("image/png", "png"),
    ("image/jpeg", "jpg"),
    ("application/pdf", "pdf"),
    ("video/mp4", "mp4"),
    ("text/plain", "txt"),
)
PLATFORMS: Final = ("ios", "android", "web", "desktop-macos", "desktop-windows")
_ALPHABET: Final = string.ascii_uppercase + string.digits
_EPOCH_MS: Final = 1_764_000_000_000  # late 2025


def key(i: int) -> str:
    """Message i's key, grouped by room as a chat backend would."""
    return f"room:{i % ROOMS:05d}:msg:{i:08d}"


def _id(rng: random.Random, n: int = 26) -> str:
    return "".join(rng.choices(_ALPHABET, k=n))


def _user(rng: random.Random) -> str:
    return f"u_{rng.randrange(1, 200_000):06d}"


def _attachment(rng: random.Random) -> dict[str, object]:
    mime, ext = rng.choice(MIME)
    found: dict[str, object] = {
        "id": _id(rng),
        "kind": mime.split("/")[0],
        "mime": mime,
        "name": f"{rng.choice(WORDS)}-{rng.randrange(1000)}.{ext}",
        "sizeBytes": rng.randrange(2_000, 20_000_000),
        "url": f"https://files.example.com/a/{_id(rng, 32).lower()}",
    }
    if mime.startswith(("image", "video")):
        found["width"], found["height"] = rng.choice(((1920, 1080), (1080, 1350), (640, 480)))
        found["thumbnailUrl"] = f"https://files.example.com/t/{_id(rng, 32).lower()}"
    return found


def message(i: int, rng: random.Random) -> dict[str, object]:
    """Message i as a dict (see the module docstring), drawn from `rng`."""
    target = rng.randint(MIN_BYTES, MAX_BYTES)
    created = _EPOCH_MS + i * 1_700 + rng.randrange(1_000)
    msg: dict[str, object] = {
        "id": _id(rng),
        "roomId": f"r_{i % ROOMS:05d}",
        "senderId": _user(rng),
        "senderName": f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()}",
        "createdAtMs": created,
        "type": "text",
        "text": "",
    }
    if rng.random() < 0.1:
        msg["editedAtMs"] = created + rng.randrange(1_000, 600_000)
    if rng.random() < 0.3:
        msg["mentions"] = [_user(rng) for _ in range(rng.randint(1, 3))]
    if target > 500 and rng.random() < 0.5:
        msg["reactions"] = [
            {"emoji": e, "count": rng.randint(1, 9), "me": rng.random() < 0.2}
            for e in rng.sample(EMOJI, rng.randint(1, 4))
        ]
    if target > 900 and rng.random() < 0.5:
        msg["attachments"] = [_attachment(rng) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.2:
        msg["thread"] = {"rootId": _id(rng), "replyCount": rng.randint(1, 40)}
    msg["client"] = {"platform": rng.choice(PLATFORMS), "version": f"4.{rng.randrange(30)}.0"}
    msg["readBy"] = rng.randint(0, 50)
    room = max(0, target - len(_encode(msg)))
    text = " ".join(rng.choices(WORDS, k=room // 6 + 1))  # words average ~5 letters
    while len(text) < room:
        text += " " + " ".join(rng.choices(WORDS, k=room // 30 + 1))
    msg["text"] = text[:room].rstrip()
    return msg


def _encode(msg: dict[str, object]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def values(count: int) -> Iterator[tuple[str, bytes]]:
    """The first `count` messages as (key, compact JSON of 200-2,000 bytes)."""
    rng = random.Random(SEED)
    for i in range(count):
        yield key(i), _encode(message(i, rng))


def near(size: int, search: int = 2000) -> bytes:
    """The first message within 2 % of `size` bytes."""
    for _, found in values(search):
        if abs(len(found) - size) <= size // 50:
            return found
    raise ValueError(f"no message of about {size} bytes among the first {search}")
