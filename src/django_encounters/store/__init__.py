"""Persistence: every hand-written SQL statement, the row ↔ record mapping, the column
converters and the translation of database errors. Statements are built once per connection
(:mod:`.statements`) from the models, which the store imports; nothing here decides anything —
that is the engine's job.

Importing the store hands the models the two operations they run through it
(``models.StoreOperations``: the low-level append behind ``EncounterTransition.save()``, the
annotation behind ``Encounter.objects.as_of()``); the app's ``ready()`` imports it."""

from ..models import StoreOperations, install_store
from .mapping import record_from_row, row_of_record
from .reads import (
    annotate_state_at,
    history,
    iter_streams,
    last_state_at,
    load_stream,
    load_timeline,
    values_rows,
)
from .schema import PROJECTION_FIELDS, projection_of, projection_values
from .writes import (
    append_record,
    insert_row,
    lock_encounter,
    locked_machine,
    save_record,
    update_projection,
    write_projections,
    writer_errors,
)

__all__ = [
    "PROJECTION_FIELDS",
    "annotate_state_at",
    "append_record",
    "history",
    "insert_row",
    "iter_streams",
    "last_state_at",
    "load_stream",
    "load_timeline",
    "lock_encounter",
    "locked_machine",
    "projection_of",
    "projection_values",
    "record_from_row",
    "row_of_record",
    "save_record",
    "update_projection",
    "values_rows",
    "write_projections",
    "writer_errors",
]

install_store(StoreOperations(append=save_record, annotate_state_at=annotate_state_at))
