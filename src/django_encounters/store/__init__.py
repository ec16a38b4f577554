"""Persistence: every hand-written SQL statement, the row ↔ record mapping, the column
converters and the translation of database errors. Statements are built once per connection
(:mod:`.statements`); nothing here decides anything — that is the engine's job."""

from .mapping import record_from_row, row_of_record
from .reads import (
    count_rows,
    history,
    iter_streams,
    last_state_at,
    load_stream,
    load_timeline,
    values_rows,
)
from .schema import PROJECTION_FIELDS, projection_of, projection_values, snapshot_state
from .writes import (
    append_record,
    insert_row,
    lock_encounter,
    update_projection,
    write_projections,
    writer_errors,
)

__all__ = [
    "PROJECTION_FIELDS",
    "append_record",
    "count_rows",
    "history",
    "insert_row",
    "iter_streams",
    "last_state_at",
    "load_stream",
    "load_timeline",
    "lock_encounter",
    "projection_of",
    "projection_values",
    "record_from_row",
    "row_of_record",
    "snapshot_state",
    "update_projection",
    "values_rows",
    "write_projections",
    "writer_errors",
]
