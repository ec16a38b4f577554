"""The tables the store reads and writes, described once.

The models are looked up in Django's app registry rather than imported, so that ``models.py``
can use the store (its low-level ``EncounterTransition.save()`` does) without an import cycle.
"""

from __future__ import annotations

from operator import attrgetter
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
    "definition_version": "definition_version",
    "last_transitioned_at": "recorded_until",
}
PROJECTION_FIELDS = tuple(PROJECTION)

#: The transition table's column (attname) for each of the engine's ``ROW_FIELDS``.
ROW_COLUMNS = tuple(
    "transitioned_by_id" if name == "transitioned_by" else name for name in ROW_FIELDS
)


def version_model() -> Any:
    return apps.get_model(APP_LABEL, "EncounterDefinitionVersion")


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


def snapshot_state(encounter: Any) -> dict[str, Any]:
    """The timeline attributes an encounter row's projection restores (its snapshot)."""
    state = {
        attribute: getattr(encounter, column)
        for column, attribute in PROJECTION.items()
        if column != "version"
    }
    state["origin_state"] = encounter.origin_state
    return state


_PROJECTION_VALUES = attrgetter(*PROJECTION.values())


def projection_values(timeline: EncounterTimeline) -> tuple[Any, ...]:
    """:func:`projection_of` as a tuple in ``PROJECTION_FIELDS`` order."""
    return _PROJECTION_VALUES(timeline)  # type: ignore[no-any-return]
