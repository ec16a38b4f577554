"""Plain helpers shared by the test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection

IS_POSTGRES = os.environ.get("ENCOUNTERS_TEST_DB", "sqlite") == "postgres"

# Transaction-control statements that CaptureQueriesContext may record and that do not count
# as "work" (Django logs savepoints; SQLite in IMMEDIATE mode also logs its BEGIN).
_CONTROL_PREFIXES = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "START TRANSACTION")


def work_queries(captured: Any) -> list[str]:
    """The SQL of a ``CaptureQueriesContext`` without transaction-control statements."""
    sql = [q["sql"] for q in captured.captured_queries]
    return [s for s in sql if not s.lstrip().upper().startswith(_CONTROL_PREFIXES)]


def table(model: Any) -> str:
    return model._meta.db_table


@dataclass(frozen=True)
class Snapshot:
    """Everything a refused write must leave untouched, read fresh from the database."""

    row_count: int
    sequences: tuple[int, ...]
    state: str
    version: int
    origin_state: str
    timeline_end_at: datetime | None
    head_hash: Any
    ended_at: datetime | None
    updated_at: datetime


def snapshot(encounter: Any) -> Snapshot:
    from django_encounters.models import Encounter, EncounterTransition

    fresh = Encounter.all_objects.get(pk=encounter.pk)
    rows = EncounterTransition.objects.filter(encounter_id=encounter.pk).order_by("sequence")
    return Snapshot(
        row_count=rows.count(),
        sequences=tuple(rows.values_list("sequence", flat=True)),
        state=fresh.state,
        version=fresh.version,
        origin_state=fresh.origin_state,
        timeline_end_at=fresh.timeline_end_at,
        head_hash=fresh.head_hash,
        ended_at=fresh.ended_at,
        updated_at=fresh.updated_at,
    )


def reload(instance: Any) -> Any:
    """A fresh copy of ``instance`` from the database (soft-deleted rows included)."""
    model = type(instance)
    manager = getattr(model, "all_objects", model._default_manager)
    return manager.get(pk=instance.pk)


def vendor() -> str:
    return connection.vendor
