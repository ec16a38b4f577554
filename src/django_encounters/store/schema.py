"""The tables the store reads and writes: the models (imported — the store knows them; the models
do not know the store) and what the store derives from them once."""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from django.db.models import Field, Model

from ..engine import EncounterTimeline
from ..models import PROJECTION, ROW_COLUMNS, Encounter

__all__ = [
    "APP_LABEL",
    "PROJECTION",
    "PROJECTION_FIELDS",
    "ROW_COLUMNS",
    "field",
    "projection_of",
    "projection_values",
]

APP_LABEL = Encounter._meta.app_label

PROJECTION_FIELDS = Encounter.PROJECTION_FIELDS


def field(model: type[Model], name: str) -> Any:
    """A concrete field by name (``_meta.get_field`` may also return reverse relations)."""
    found = model._meta.get_field(name)
    assert isinstance(found, Field)
    return found


def projection_of(timeline: EncounterTimeline) -> dict[str, Any]:
    """The projection columns' values for a replayed (or decided) timeline."""
    return {column: getattr(timeline, attribute) for column, attribute in PROJECTION.items()}


_PROJECTION_VALUES = attrgetter(*PROJECTION.values())


def projection_values(timeline: EncounterTimeline) -> tuple[Any, ...]:
    """:func:`projection_of` as a tuple in ``PROJECTION_FIELDS`` order."""
    return _PROJECTION_VALUES(timeline)  # type: ignore[no-any-return]
