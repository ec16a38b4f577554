"""The tables the store reads and writes, described once.

The models are looked up in Django's app registry rather than imported, so that ``models.py``
can use the store (its low-level ``EncounterTransition.save()`` does) without an import cycle.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.db.models import Field, Model

from ..engine import ROW_FIELDS, EncounterTimeline

APP_LABEL = "django_encounters"

#: The encounter's columns derived purely from the log, and the timeline attribute of each.
PROJECTION = {
    "state": "state",
    "version": "version",
    "timeline_end_at": "end_at",
    "head_hash": "head_hash",
}
PROJECTION_FIELDS = tuple(PROJECTION)

#: The transition table's column (attname) for each of the engine's ``ROW_FIELDS``.
ROW_COLUMNS = tuple(
    "transitioned_by_id" if name == "transitioned_by" else name for name in ROW_FIELDS
)


def encounter_model() -> Any:
    return apps.get_model(APP_LABEL, "Encounter")


def definition_model() -> Any:
    return apps.get_model(APP_LABEL, "EncounterDefinition")


def transition_model() -> Any:
    return apps.get_model(APP_LABEL, "EncounterTransition")


def field(model: type[Model], name: str) -> Any:
    """A concrete field by name (``_meta.get_field`` may also return reverse relations)."""
    found = model._meta.get_field(name)
    assert isinstance(found, Field)
    return found


def projection_of(timeline: EncounterTimeline) -> dict[str, Any]:
    """The projection columns' values for a replayed (or decided) timeline."""
    return {column: getattr(timeline, attribute) for column, attribute in PROJECTION.items()}


def projection_values(timeline: EncounterTimeline) -> tuple[Any, ...]:
    """:func:`projection_of` as a tuple in ``PROJECTION_FIELDS`` order."""
    return tuple(getattr(timeline, attribute) for attribute in PROJECTION.values())
