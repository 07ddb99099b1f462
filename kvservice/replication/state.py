"""A node's replication identity, persisted under the data dir.

`<data-dir>/replication.json` holds the node id (random, made once), the
replication id of the history the node is in, its epoch, and the previous
replication id with the revision where that history ended (PSYNC2-like;
promotion fills it), and the role and primary that Promote or ReplicaOf set
at run time. The last applied revision is the node's own WAL's: a
replica writes the primary's entries with the same revisions, so recovery
restores it. An empty data dir has epoch 0 and no replication id yet: a
primary makes one at its first start; a replica adopts its primary's.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kvservice.errors import StorageError
from kvservice.storage.files import create_atomically

STATE_FILE = "replication.json"


def new_id() -> str:
    """40 hex digits, as Redis replication ids."""
    return secrets.token_hex(20)


@dataclass(frozen=True)
class ReplicationState:
    node_id: str
    replication_id: str = ""
    epoch: int = 0
    prev_replication_id: str = ""
    prev_end_revision: int = 0
    # Set by Admin/Promote and Admin/ReplicaOf; wins over the configured role and
    # primary_url at the next start, so a demoted primary never comes back as one.
    role: str = ""
    primary_url: str = ""
    # Set when this primary met a higher epoch: it stays fenced across restarts
    # until Promote or ReplicaOf.
    fenced: str = ""

    def with_history(self, replication_id: str, epoch: int) -> ReplicationState:
        return replace(self, replication_id=replication_id, epoch=epoch)


def load_state(data_dir: Path) -> ReplicationState:
    """Read the state, or make (and persist) a fresh one for a new data dir."""
    path = data_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ReplicationState(**raw)
    except FileNotFoundError:
        state = ReplicationState(node_id=new_id())
        save_state(data_dir, state)
        return state
    except (OSError, ValueError, TypeError) as exc:
        raise StorageError(f"{path}: unreadable replication state ({exc})") from exc


def save_state(data_dir: Path, state: ReplicationState) -> None:
    """Persist durably (tmp -> fsync -> rename -> fsync dir) before acting on it."""
    data = json.dumps(asdict(state), indent=2, sort_keys=True).encode() + b"\n"
    create_atomically(data_dir / STATE_FILE, [data])
