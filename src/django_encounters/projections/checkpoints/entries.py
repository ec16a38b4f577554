"""What a checkpoint holds — its format name, one entry per encounter, the root digest over the
entries — and the description of a checkpoint read back (:class:`CheckpointCheck`)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from ...engine import Anomaly
from ..output import utc_iso

CHECKPOINT_FORMAT = "django-encounters-checkpoint/1"
DEFAULT_BATCH_SIZE = 1000
#: A stored hash: printable ASCII without spaces (it is one word of a root line).
HASH_TEXT = re.compile(r"[!-~]{1,200}")


@dataclass(frozen=True)
class CheckpointEntry:
    """One encounter's checkpointed head: its stream ``version`` and the hash at it (the
    genesis hash at version 0)."""

    id: UUID
    version: int
    head_hash: str

    def line(self) -> str:
        """The entry's line of the root text."""
        return f"{self.id} {self.version} {self.head_hash}\n"

    def as_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "version": self.version, "head_hash": self.head_hash}


class RootDigest:
    """The root digest, fed one entry at a time."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256(f"{CHECKPOINT_FORMAT}\n".encode())
        self.count = 0

    def add(self, entry: CheckpointEntry) -> None:
        self._sha.update(entry.line().encode("utf-8"))
        self.count += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def root_digest(entries: Iterable[CheckpointEntry]) -> str:
    """The root of ``entries`` (which must be in ascending id order, as in a file)."""
    root = RootDigest()
    for entry in entries:
        root.add(entry)
    return root.hexdigest()


@dataclass
class CheckpointCheck:
    """A checkpoint (its file, time, scope and root) and what comparing it with the log found."""

    path: str | None
    created_at: datetime
    definition: str | None
    root: str
    count: int  # entries in the checkpoint
    checked: int = 0  # entries compared with the log (the selected encounters that exist)
    anomalies: list[Anomaly] = field(default_factory=list)  # rewritten, truncated, missing

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint's description in the audit's JSON."""
        return {
            "file": self.path,
            "format": CHECKPOINT_FORMAT,
            "created_at": utc_iso(self.created_at),
            "definition": self.definition,
            "root": self.root,
            "entries": self.count,
            "checked": self.checked,
        }
