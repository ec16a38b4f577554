"""The row ↔ record mapping: the engine's :class:`~django_encounters.engine.StreamRow` and an
``EncounterTransition`` model instance, field by field through ``ROW_COLUMNS``."""

from __future__ import annotations

from typing import Any

from ..engine import ROW_FIELDS, StreamRow
from .schema import ROW_COLUMNS, transition_model

_PAIRS = tuple(zip(ROW_FIELDS, ROW_COLUMNS, strict=True))


def record_from_row(row: StreamRow, *, encounter: Any, transitioned_by: Any) -> Any:
    """The unsaved ``EncounterTransition`` for a newly decided row (``transitioned_by``: the
    user instance whose pk the row carries, or None)."""
    record = transition_model()(encounter=encounter, transitioned_by=transitioned_by)
    for name, column in _PAIRS:
        if column != "transitioned_by_id":
            setattr(record, column, getattr(row, name))
    return record


def row_of_record(record: Any) -> StreamRow:
    """The content of an ``EncounterTransition`` instance as the engine's row."""
    return StreamRow(*(getattr(record, column) for column in ROW_COLUMNS))
