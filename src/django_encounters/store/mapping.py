"""The row ↔ record mapping: the engine's :class:`~django_encounters.engine.StreamRow` and an
``EncounterTransition`` model instance, field by field through ``ROW_COLUMNS``. The record →
row direction is the model's own (``models.row_of_record``, which its ``compute_hash`` uses),
re-exported here."""

from __future__ import annotations

from functools import cache
from typing import Any

from django.db.models.base import ModelState

from ..engine import ROW_FIELDS, StreamRow
from ..models import ROW_COLUMNS, EncounterTransition, row_of_record
from .loading import new_instance_attnames
from .schema import field

__all__ = ["record_from_row", "row_of_record"]


@cache
def _record_layout(model: Any) -> tuple[tuple[str | None, ...], Any, Any, Any]:
    """For each of ``model``'s concrete fields, in ``Model.__init__``'s positional order: the
    row's field holding its value, or None for the two that are not row fields (the primary
    key, from its default, and the encounter, the given instance's pk); then the primary key
    and the two foreign keys whose related objects are cached on the record."""
    by_column = dict(zip(ROW_COLUMNS, ROW_FIELDS, strict=True))
    encounter_fk = field(model, "encounter")
    sources: list[str | None] = []
    for f in model._meta.concrete_fields:
        if f is model._meta.pk or f is encounter_fk:
            sources.append(None)
        else:
            sources.append(by_column[f.attname])
    return tuple(sources), model._meta.pk, encounter_fk, field(model, "transitioned_by")


def record_from_row(row: StreamRow, *, encounter: Any, transitioned_by: Any) -> Any:
    """The unsaved ``EncounterTransition`` for a newly decided row (``transitioned_by``: the
    user instance whose pk the row carries, or None), made the way the ORM makes an instance
    from values: positionally, every column given (a new primary key from its default)."""
    model: Any = EncounterTransition  # called positionally, which django-stubs cannot check
    sources, pk, encounter_fk, user_fk = _record_layout(model)
    values = [
        getattr(row, name)
        if name is not None
        else (encounter.pk if f is encounter_fk else pk.get_default())
        for name, f in zip(sources, model._meta.concrete_fields, strict=True)
    ]
    names = new_instance_attnames(model)
    if names is None:
        record = model(*values)
    else:  # what Model.__init__ makes of positional values, without its per-field loop
        record = model.__new__(model)
        record.__dict__.update(zip(names, values, strict=True))
        record._state = ModelState()
    encounter_fk.set_cached_value(record, encounter)
    if transitioned_by is not None:
        user_fk.set_cached_value(record, transitioned_by)
    return record
