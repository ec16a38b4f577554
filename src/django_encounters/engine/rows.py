"""A row of the transition log as the engine knows it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass(slots=True)
class StreamRow:
    """The content of one row of the log, as the engine knows it (``transitioned_by`` is the
    user's primary key). The store maps these fields to the table's columns."""

    sequence: int
    from_state: str
    to_state: str
    effective_at: datetime
    transitioned_at: datetime
    transitioned_by: Any
    reason: str
    metadata: Any
    hash: str


#: The row's fields, in the order the store reads and writes them.
ROW_FIELDS = tuple(f.name for f in fields(StreamRow))
#: The fields shown to a person reading a timeline (all but ``metadata`` and ``hash``).
READABLE_FIELDS = ROW_FIELDS[: ROW_FIELDS.index("metadata")]
