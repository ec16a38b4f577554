"""Which encounters a rebuild or an audit covers, and the definitions' rules they replay
against."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import router
from django.db.models import Exists, OuterRef, QuerySet

from ..engine import Genesis, Rules
from ..exceptions import EncounterError
from ..models import (
    GENESIS_FACTS,
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
    genesis_from,
    subject_type_name,
)


def read_alias(using: str | None) -> str:
    """The database a report reads from: ``using`` when given, else the project's router's
    choice for reading encounters (a replica, say), else ``default``."""
    return using if using is not None else router.db_for_read(Encounter)


def write_alias(using: str | None) -> str:
    """The database a rebuild or an acknowledgement writes to: ``using`` when given, else the
    router's choice for writing encounters, else ``default``."""
    return using if using is not None else router.db_for_write(Encounter)


def effective_between(
    selected: QuerySet, since: datetime | None, until: datetime | None, using: str
) -> QuerySet:
    """``selected`` narrowed to the encounters with at least one row *effective* in
    ``[since, until)`` (either bound may be None: unbounded; both None: ``selected``)."""
    if since is None and until is None:
        return selected
    period = EncounterTransition.objects.using(using).filter(encounter=OuterRef("pk"))
    if since is not None:
        period = period.filter(effective_at__gte=since)
    if until is not None:
        period = period.filter(effective_at__lt=until)
    return selected.filter(Exists(period))


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
    """The rules of every definition version (``definition_id -> version -> Rules``) and every
    definition's code, loaded once — soft-deleted definitions included — and filled in lazily
    for definitions and versions created while a long run is going."""

    def __init__(self, using: str) -> None:
        self._using = using
        self._codes: dict[Any, str] = dict(
            EncounterDefinition.all_objects.using(using).values_list("pk", "code")
        )
        self._versions: dict[Any, dict[int, Rules]] = {}
        self._load(EncounterDefinitionVersion.objects.using(using))

    def _load(self, versions: Any) -> None:
        for machine in versions:
            rules = machine.rules(code=self.code(machine.definition_id))
            self._versions.setdefault(machine.definition_id, {})[machine.number] = rules

    def rules_of(self, definition_id: Any) -> Callable[[int], Rules | None]:
        """``version -> Rules`` (None for a version that does not exist) of a definition."""

        def lookup(number: int) -> Rules | None:
            known = self._versions.get(definition_id, {})
            if number not in known:  # created since this cache was filled: look once more
                self._load(
                    EncounterDefinitionVersion.objects.using(self._using).filter(
                        definition_id=definition_id, number=number
                    )
                )
                known = self._versions.get(definition_id, {})
            return known.get(number)

        return lookup

    def code(self, definition_id: Any) -> str:
        if definition_id not in self._codes:
            self._codes[definition_id] = (
                EncounterDefinition.all_objects.using(self._using)
                .values_list("code", flat=True)
                .get(pk=definition_id)
            )
        return self._codes[definition_id]

    def ids_for_code(self, code: str) -> list[Any]:
        return [pk for pk, known in self._codes.items() if known == code]


#: The encounter columns :func:`genesis_of` reads, in its order.
GENESIS_COLUMNS = (*GENESIS_FACTS, "genesis_hash")
_CONTENT_TYPE = GENESIS_FACTS.index("subject_content_type_id")


def genesis_of(
    values: Sequence[Any], using: str, subject_types: dict[Any, str] | None = None
) -> tuple[Genesis, str]:
    """``(Genesis, stored genesis hash)`` from ``GENESIS_COLUMNS`` values; ``subject_types``
    (content type id -> ``app_label.model``, filled as it goes) spares a long run the content
    types' manager per encounter."""
    if subject_types is None:
        return genesis_from(values[:-1], using), values[-1]
    content_type_id = values[_CONTENT_TYPE]
    name = subject_types.get(content_type_id)
    if name is None:
        name = subject_types[content_type_id] = subject_type_name(content_type_id, using)
    return genesis_from(values[:-1], using, subject_type=name), values[-1]


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
