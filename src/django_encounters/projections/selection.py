"""Which encounters a rebuild or an audit covers, and the definitions' rules they replay
against."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.db.models import QuerySet

from ..engine import Rules
from ..exceptions import EncounterError
from ..models import Encounter, EncounterDefinition, EncounterTransition


def parse_encounter_ids(values: Iterable[Any]) -> list[UUID]:
    """UUIDs from strings (any form ``uuid.UUID`` accepts) or UUIDs; ``ValueError`` naming the
    first value that is not one."""
    result = []
    for value in values:
        if isinstance(value, UUID):
            result.append(value)
            continue
        try:
            result.append(UUID(str(value).strip()))
        except ValueError:
            raise ValueError(f"not an encounter id (a UUID): {value!r}") from None
    return result


class RulesCache:
    """``definition_id -> Rules`` (and code), loaded once — soft-deleted definitions included —
    and filled in lazily for definitions created while a long run is going."""

    def __init__(self, using: str) -> None:
        self._model = EncounterDefinition
        self._using = using
        self._rules: dict[Any, Rules] = {}
        self._codes: dict[Any, str] = {}
        for definition in EncounterDefinition.all_objects.using(using):
            self._add(definition)

    def _add(self, definition: Any) -> None:
        self._rules[definition.pk] = definition.rules()
        self._codes[definition.pk] = definition.code

    def _load(self, definition_id: Any) -> None:
        self._add(self._model.all_objects.using(self._using).get(pk=definition_id))

    def rules(self, definition_id: Any) -> Rules:
        if definition_id not in self._rules:
            self._load(definition_id)
        return self._rules[definition_id]

    def code(self, definition_id: Any) -> str:
        if definition_id not in self._codes:
            self._load(definition_id)
        return self._codes[definition_id]

    def ids_for_code(self, code: str) -> list[Any]:
        return [pk for pk, known in self._codes.items() if known == code]


def select(
    using: str, rules: RulesCache, definition: str | None, encounters: Iterable[Any] | None
) -> tuple[Any, QuerySet]:
    """The encounters selected by definition code and/or ids, and their transitions
    (querysets on ``using``), as rebuild and audit select them.

    Raises:
        EncounterError: no definition has the code ``definition``.
        ValueError: an encounter id that is not a UUID.
    """
    selected = Encounter.all_objects.using(using)
    transitions = EncounterTransition.objects.using(using)
    if definition is not None:
        definition_ids = rules.ids_for_code(definition)
        if not definition_ids:
            raise EncounterError(f"no encounter definition has the code {definition!r}")
        selected = selected.filter(definition_id__in=definition_ids)
        transitions = transitions.filter(encounter__definition_id__in=definition_ids)
    if encounters is not None:
        ids = parse_encounter_ids(encounters)
        selected = selected.filter(pk__in=ids)
        transitions = transitions.filter(encounter_id__in=ids)
    return selected, transitions
