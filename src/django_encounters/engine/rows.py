"""What the engine knows of an encounter: the facts of its creation (:class:`Genesis`) and the
rows of its log (:class:`StreamRow`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Genesis:
    """The facts an encounter is created with; hashed into the head of its chain (row 1's
    previous hash). ``subject_type`` is ``"app_label.model"`` (not a content type id, which
    differs between databases restored from the same backup)."""

    encounter_id: Any
    definition_id: Any
    definition_version: int
    subject_type: str
    subject_id: str
    origin_state: str
    created_at: datetime


@dataclass(slots=True)
class StreamRow:
    """The content of one row of the log, as the engine knows it (``transitioned_by`` is the
    user's primary key; ``definition_version`` the definition version it was decided under).
    The store maps these fields to the table's columns. ``transitioned_by_name`` is the user's
    name when the row was recorded ("" for nobody, and on rows written before names were
    recorded); ``seal`` the row's seal ("" when unsealed: :mod:`.seals`)."""

    sequence: int
    from_state: str
    to_state: str
    effective_at: datetime
    transitioned_at: datetime
    transitioned_by: Any
    reason: str
    metadata: Any
    definition_version: int
    hash: str
    transitioned_by_name: str = ""
    seal: str = ""


#: The row's fields, in the order the store reads and writes them.
ROW_FIELDS = tuple(f.name for f in fields(StreamRow))
#: The fields shown to a person reading a timeline (all but metadata, version and hash).
READABLE_FIELDS = ROW_FIELDS[: ROW_FIELDS.index("metadata")]


def stored_precision(value: datetime) -> datetime:
    """``value`` cut to whole milliseconds: the precision every time the chain covers is stored
    at, because it is the precision every backup format keeps (Django's JSON serialiser writes
    milliseconds)."""
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)
