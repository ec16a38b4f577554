"""What a checkpoint holds — its formats, one entry per encounter, the root digest over every
field — and the description of a checkpoint read back (:class:`CheckpointCheck`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from ...engine import Anomaly
from ..output import utc_iso

#: The format new checkpoints are written in: its root covers every field of the file.
CHECKPOINT_FORMAT = "django-encounters-checkpoint/2"
#: The first format, still read: its root covers the entries only (not ``created_at``, not
#: ``definition``).
CHECKPOINT_FORMAT_1 = "django-encounters-checkpoint/1"
CHECKPOINT_FORMATS = (CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_1)
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


def definition_text(definition: str | None) -> str:
    """The ``definition`` field as its root line writes it: its JSON (``null`` or the code
    in double quotes), what ``jq``'s ``tojson`` prints for it too (a code is printable text:
    :func:`check_definition`)."""
    return json.dumps(definition, ensure_ascii=False)


def check_definition(definition: Any) -> str | None:
    """Why ``definition`` cannot be a checkpoint's ``definition`` field, or None."""
    if definition is None:
        return None
    if not isinstance(definition, str) or not definition:
        return f"definition {definition!r} is neither null nor a code"
    if not definition.isprintable():
        return f"definition {definition!r} is not printable text"
    return None


class RootDigest:
    """The root digest, fed the header first, then one entry at a time.

    Format ``/2``: SHA-256 over the format line, ``created_at <text>``, ``definition
    <JSON>``, the entry lines, ``count <n>``. Format ``/1``: over the format line and the entry
    lines only.
    """

    def __init__(
        self,
        fmt: str = CHECKPOINT_FORMAT,
        created_at: str | None = None,
        definition: str | None = None,
    ) -> None:
        self.format = fmt
        self._sha = hashlib.sha256(f"{fmt}\n".encode())
        if fmt == CHECKPOINT_FORMAT:
            if created_at is None:
                raise ValueError("a /2 root covers created_at: give it")
            self._sha.update(f"created_at {created_at}\n".encode())
            self._sha.update(f"definition {definition_text(definition)}\n".encode())
        self.count = 0

    def add(self, entry: CheckpointEntry) -> None:
        self._sha.update(entry.line().encode("utf-8"))
        self.count += 1

    def hexdigest(self) -> str:
        sha = self._sha.copy()
        if self.format == CHECKPOINT_FORMAT:
            sha.update(f"count {self.count}\n".encode())
        return sha.hexdigest()


def root_digest(
    entries: Iterable[CheckpointEntry],
    *,
    created_at: str | None = None,
    definition: str | None = None,
    fmt: str = CHECKPOINT_FORMAT,
) -> str:
    """The root of a checkpoint of ``entries`` (in ascending id order, as in a file): for
    format ``/2`` (the default) with ``created_at`` (the text as in the file) and
    ``definition``; for ``/1`` over the entries only."""
    root = RootDigest(fmt, created_at, definition)
    for entry in entries:
        root.add(entry)
    return root.hexdigest()


@dataclass
class CheckpointCheck:
    """A checkpoint (its file, format, time, scope, root and signature) and what comparing it
    with the log found."""

    path: str | None
    created_at: datetime
    definition: str | None
    root: str
    count: int  # entries in the checkpoint
    format: str = CHECKPOINT_FORMAT
    #: The signing key's fingerprint ("sha256:<hex>"), None for an unsigned file.
    signed_by: str | None = None
    #: Whether the signature was verified with a key the caller gave (``verify_key``).
    signature_verified: bool = False
    checked: int = 0  # entries compared with the log (those whose encounter exists)
    #: What "recorded before the checkpoint" allows for: rows and encounters recorded before
    #: ``created_at - tolerance`` must be in it.
    tolerance: timedelta = timedelta(0)
    #: rewritten, truncated, missing, unrecorded, uncheckpointed
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def covers_created_at(self) -> bool:
        """Whether the root covers ``created_at`` and ``definition`` (format ``/2``)."""
        return self.format == CHECKPOINT_FORMAT

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint's description in the audit's JSON."""
        return {
            "file": self.path,
            "format": self.format,
            "created_at": utc_iso(self.created_at),
            "created_at_covered": self.covers_created_at,
            "definition": self.definition,
            "root": self.root,
            "signature": (
                None
                if self.signed_by is None
                else {"key": self.signed_by, "verified": self.signature_verified}
            ),
            "entries": self.count,
            "checked": self.checked,
            "tolerance_seconds": self.tolerance.total_seconds(),
        }
