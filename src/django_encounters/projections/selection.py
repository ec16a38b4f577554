"""Which encounters a rebuild, an audit, a checkpoint or an export covers — one
:class:`Selection`, checked once — and the definitions' rules they replay against."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.contrib.contenttypes.models import ContentType
from django.db import router
from django.db.models import Exists, Model, OuterRef, QuerySet

from ..arguments import encounter_ids, require_aware, require_positive_int
from ..engine import Genesis, Rules, definition_version_hash
from ..exceptions import DefinitionNotFoundError
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


class RulesCache:
    """The rules of every definition version (``definition_id -> version -> Rules``) and every
    definition's code, loaded once — soft-deleted definitions included — and filled in lazily
    for definitions and versions created while a long run is going.

    Each version's content hash is recomputed from the versions table, chained per definition
    (:func:`~django_encounters.engine.hashing.version_chain`'s layout, each version chained to
    the stored hash of the one before it): ``Rules.content_hash`` is what a row decided under
    it must commit to, and ``Rules.problem`` says why the stored version is not what its chain
    vouches for (changed, inserted, chain broken)."""

    def __init__(self, using: str) -> None:
        self._using = using
        definitions = EncounterDefinition.all_objects.using(using).values_list(
            "pk", "code", "version"
        )
        self._codes: dict[Any, str] = {}
        self._pointers: dict[Any, int] = {}
        for pk, code, pointer in definitions:
            self._codes[pk] = code
            self._pointers[pk] = pointer
        self._versions: dict[Any, dict[int, Rules]] = {}
        self._load(EncounterDefinitionVersion.objects.using(using).order_by("number"))

    def _load(self, versions: Any) -> None:
        by_definition: dict[Any, list[Any]] = {}
        for machine in versions:
            by_definition.setdefault(machine.definition_id, []).append(machine)
        for definition_id, machines in by_definition.items():
            known = self._versions.setdefault(definition_id, {})
            code = self.code(definition_id)
            for rules in chained_rules(definition_id, code, machines):
                known[rules.version] = rules

    def rules_of(self, definition_id: Any) -> Callable[[int], Rules | None]:
        """``version -> Rules`` (None for a version that does not exist) of a definition."""

        def lookup(number: int) -> Rules | None:
            known = self._versions.get(definition_id, {})
            if number not in known:  # created since this cache was filled: look once more
                self._load(
                    EncounterDefinitionVersion.objects.using(self._using)
                    .filter(definition_id=definition_id)
                    .order_by("number")
                )
                known = self._versions.get(definition_id, {})
            return known.get(number)

        return lookup

    def problems(self) -> list[tuple[Any, int, str]]:
        """What is wrong with the definitions' versions, ``(definition id, version number,
        why)`` each: a version whose stored content is not its chain's, and a definition
        whose ``version`` pointer does not name its last version (number 0 then: the
        definition itself)."""
        found = []
        for definition_id, known in self._versions.items():
            code = self.code(definition_id)
            for number in sorted(known):
                if known[number].problem:
                    found.append(
                        (definition_id, number, f"{known[number].name} {known[number].problem}")
                    )
            last = max(known, default=None)
            pointer = self._pointers.get(definition_id)
            if pointer is not None and pointer != last:
                found.append(
                    (
                        definition_id,
                        0,
                        f"definition '{code}' points to version {pointer} but its last version "
                        f"is {last}: its pointer was moved behind the library's back",
                    )
                )
        return found

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


def chained_rules(definition_id: Any, code: str, machines: Iterable[Any]) -> list[Rules]:
    """The :class:`Rules` of a definition's versions (``EncounterDefinitionVersion``
    instances, in number order), each with its recomputed ``content_hash`` (chained to the
    stored hash of the version before it, or to its recomputed one while that has none) and
    its ``problem``: a stored hash that is not the recomputed one (its machine or number
    changed, or it was inserted with a forged hash), no stored hash after a version that has
    one (inserted behind the library's back), or no version before it (its chain is broken)."""
    found: list[Rules] = []
    previous_number, previous_stored, previous_hash = 0, "", ""
    for machine in machines:
        number, stored = machine.number, machine.content_hash
        chained_to = previous_stored or previous_hash
        expected = definition_version_hash(definition_id, number, machine.machine(), chained_to)
        problem = ""
        if number != previous_number + 1:
            problem = f"follows no version {number - 1}: its chain of versions is broken"
        elif stored and stored != expected:
            problem = (
                "does not hash to its stored content hash: its machine was changed, or it was "
                "inserted with a forged hash, after the fact"
            )
        elif not stored and previous_stored:
            problem = (
                f"has no content hash though version {previous_number} has one: it was "
                "inserted behind the library's back"
            )
        rules = dataclasses.replace(
            machine.rules(code=code), content_hash=expected, problem=problem
        )
        found.append(rules)
        previous_number, previous_stored, previous_hash = number, stored, expected
    return found


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


@dataclass(frozen=True)
class Selection:
    """The encounters a report covers, its times and its batching — checked once, by
    :meth:`of`; every projection takes one.

    ``definition_ids`` are the primary keys of the definition named ``definition`` (a code
    names one definition, but the lookup does not assume it); ``encounters`` the ids asked
    for, parsed; ``subject`` a saved model instance. ``since``/``until`` select encounters with
    at least one row *effective* in ``[since, until)``; ``known_at`` is the system time the
    log is read as of (rows recorded by then).
    """

    using: str
    batch_size: int
    definition: str | None = None
    definition_ids: tuple[Any, ...] | None = None
    encounters: tuple[UUID, ...] | None = None
    subject: Model | None = None
    since: datetime | None = None
    until: datetime | None = None
    known_at: datetime | None = None

    @classmethod
    def of(
        cls,
        *,
        batch_size: int,
        definition: str | None = None,
        encounters: Iterable[Any] | None = None,
        subject: Model | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        known_at: datetime | None = None,
        using: str | None = None,
        for_write: bool = False,
    ) -> Selection:
        """A checked selection (``using`` default: the router's choice for reading
        encounters, or for writing them with ``for_write``).

        Raises:
            TypeError / ValueError: a time that is not an aware datetime, ``since >= until``,
                a bad ``batch_size``, an encounter id that is not a UUID, an unsaved
                ``subject``.
            DefinitionNotFoundError: no definition has the code ``definition``.
        """
        using = write_alias(using) if for_write else read_alias(using)
        for name, value in (("since", since), ("until", until), ("known_at", known_at)):
            require_aware(value, name, optional=True)
        if since is not None and until is not None and since >= until:
            raise ValueError(
                f"since ({since.isoformat()}) must be before until ({until.isoformat()})"
            )
        require_positive_int(batch_size, "batch_size")
        ids = None if encounters is None else tuple(encounter_ids(encounters))
        if subject is not None and subject.pk is None:
            raise ValueError(f"subject {subject!r} is not saved (it has no primary key)")
        definition_ids = None
        if definition is not None:
            definition_ids = tuple(
                EncounterDefinition.all_objects.using(using)
                .filter(code=definition)
                .values_list("pk", flat=True)
            )
            if not definition_ids:
                raise DefinitionNotFoundError(definition)
        return cls(
            using=using,
            batch_size=batch_size,
            definition=definition,
            definition_ids=definition_ids,
            encounters=ids,
            subject=subject,
            since=since,
            until=until,
            known_at=known_at,
        )

    def fields(self) -> dict[str, Any]:
        """The selection as keyword arguments of the class (for a worker process, which
        rebuilds it with ``Selection(**fields)`` once Django is set up)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @property
    def narrowed(self) -> bool:
        """Whether it selects fewer than every encounter."""
        return (
            self.definition_ids is not None
            or self.encounters is not None
            or self.subject is not None
            or self.since is not None
            or self.until is not None
        )

    def queryset(self) -> QuerySet:
        """The selected encounters (soft-deleted ones included: their history is part of the
        record), unordered."""
        selected = Encounter.all_objects.using(self.using)
        if self.definition_ids is not None:
            selected = selected.filter(definition_id__in=self.definition_ids)
        if self.encounters is not None:
            selected = selected.filter(pk__in=self.encounters)
        if self.subject is not None:
            selected = selected.filter(
                subject_content_type=ContentType.objects.db_manager(self.using).get_for_model(
                    self.subject
                ),
                subject_id=str(self.subject.pk),
            )
        return effective_between(selected, self.since, self.until, self.using)

    def transitions(self) -> QuerySet:
        """The rows of the encounters selected by definition and ids (a superset of the
        selection's rows when it is narrowed by subject or period: the reader keeps only the
        streams of the encounters it read)."""
        rows = EncounterTransition.objects.using(self.using)
        if self.definition_ids is not None:
            rows = rows.filter(encounter__definition_id__in=self.definition_ids)
        if self.encounters is not None:
            rows = rows.filter(encounter_id__in=self.encounters)
        return rows

    def absent(self) -> list[UUID]:
        """The ids of ``encounters`` (in their order) that name no encounter, soft-deleted ones
        counting as existing; ``[]`` when the selection names no ids."""
        if not self.encounters:
            return []
        found = set(
            Encounter.all_objects.using(self.using)
            .filter(pk__in=self.encounters)
            .values_list("pk", flat=True)
        )
        return [pk for pk in self.encounters if pk not in found]
