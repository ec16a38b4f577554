"""An encounter's business-time timeline as HL7 FHIR status history, as plain JSON-ready dicts
(no FHIR library needed: the core package gains no dependency).

* :func:`to_fhir_r4_status_history` — the R4 (and R4B) ``Encounter.statusHistory`` list:
  ``[{"status": …, "period": {"start": …, "end": …}}, …]``.
* :func:`to_fhir_encounter_history` — R5 ``EncounterHistory`` resources, one per status
  interval: ``resourceType``, ``status``, ``class`` (required by R5), ``encounter`` (a reference
  to ``Encounter/<id>``), ``subject`` when the caller says what it is, ``actualPeriod``.

The intervals are those of :func:`~django_encounters.services.time_in_states`
(:func:`~django_encounters.engine.intervals.intervals` over the replayed timeline): in business
time, so a row recorded late but effective earlier lands where it happened; the origin state
counts from ``created_at`` when that precedes the first row; the last interval is open (no
``end``); consecutive intervals with the same FHIR status (an upgrade row, a self-loop, two
states mapped to one code) are one interval. See ``docs/guides/fhir.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone
from typing import Any

from .. import arguments, store
from ..engine.intervals import intervals
from ..exceptions import EncounterNotFoundError, FhirStatusError
from ..models import Encounter
from ..services import _db_for_read
from .output import in_zone

__all__ = [
    "R4_ENCOUNTER_STATUSES",
    "R5_ENCOUNTER_STATUSES",
    "UNKNOWN_CLASS",
    "FhirStatusError",
    "fhir_datetime",
    "fhir_status_intervals",
    "to_fhir_encounter_history",
    "to_fhir_r4_status_history",
]

#: The codes of value set ``encounter-status`` in FHIR R4 (and R4B).
R4_ENCOUNTER_STATUSES = (
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
    "entered-in-error",
    "unknown",
)
#: The codes of value set ``encounter-status`` in FHIR R5.
R5_ENCOUNTER_STATUSES = (
    "planned",
    "in-progress",
    "on-hold",
    "discharged",
    "completed",
    "cancelled",
    "discontinued",
    "entered-in-error",
    "unknown",
)
_STATUSES = {"R4": R4_ENCOUNTER_STATUSES, "R5": R5_ENCOUNTER_STATUSES}

#: R5 ``EncounterHistory.class`` (1..1) when the caller gives none: the encounter store does not
#: know whether an encounter is ambulatory, emergency, inpatient…, so it says "unknown"
#: (HL7 v3 NullFlavor ``UNK``).
UNKNOWN_CLASS: dict[str, Any] = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
            "code": "UNK",
            "display": "unknown",
        }
    ]
}

#: A FHIR element given as a value, or as a function of the encounter returning it.
Element = Mapping[str, Any] | Callable[[Encounter], Any] | None

# Past any business time: the end of the open interval while the intervals are cut.
_OPEN = datetime.max.replace(tzinfo=dt_timezone.utc)


def fhir_datetime(value: datetime, tz: tzinfo | None = None) -> str:
    """``value`` as a FHIR ``dateTime`` with seconds and a UTC offset, in ``tz`` (default:
    Django's current time zone): ``2017-02-01T07:15:00+10:00``; fractions of a second only
    when there are any (milliseconds, or microseconds when needed)."""
    local = in_zone(value, tz)
    if not local.microsecond:
        spec = "seconds"
    elif local.microsecond % 1000 == 0:
        spec = "milliseconds"
    else:
        spec = "microseconds"
    return local.isoformat(timespec=spec)


def fhir_status_intervals(
    encounter: Encounter,
    status_map: Mapping[str, str] | None = None,
    *,
    fhir_version: str = "R4",
    known_at: datetime | None = None,
    using: str | None = None,
) -> list[tuple[str, datetime, datetime | None]]:
    """``(status code, start, end or None for the open one)`` for each interval of the
    encounter's business-time timeline, consecutive equal codes merged. The building block of
    both exports; arguments as theirs.

    Raises:
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        FhirStatusError: a state with no valid code in ``fhir_version`` (nothing is returned).
        TypeError / ValueError: a ``status_map`` that is not a mapping of state names to codes,
            an unknown ``fhir_version``, a naive ``known_at``.
    """
    arguments.require_instance(encounter, Encounter, "encounter")
    if fhir_version not in _STATUSES:
        raise ValueError(f"fhir_version must be one of {sorted(_STATUSES)}, not {fhir_version!r}")
    arguments.require_aware(known_at, "known_at", optional=True)
    codes = _status_codes(encounter, status_map, fhir_version)
    alias = _db_for_read(encounter, using)
    if (
        encounter.deleted_at is not None
        or not Encounter.objects.using(alias).filter(pk=encounter.pk).exists()
    ):
        raise EncounterNotFoundError(encounter.pk)
    if known_at is not None and known_at < encounter.created_at:
        return []  # not created yet at that time: nothing was known of it
    timeline = store.load_timeline(encounter, alias, known_at=known_at)
    merged: list[tuple[str, datetime, datetime | None]] = []
    for state, start, end in intervals(
        encounter.origin_state, encounter.created_at, timeline.entries or [], _OPEN
    ):
        code = codes(state)
        closing = None if end == _OPEN else end
        if merged and merged[-1][0] == code and merged[-1][2] == start:
            merged[-1] = (code, merged[-1][1], closing)
        else:
            merged.append((code, start, closing))
    return merged


def to_fhir_r4_status_history(
    encounter: Encounter,
    status_map: Mapping[str, str] | None = None,
    *,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> list[dict[str, Any]]:
    """The encounter's FHIR R4 ``Encounter.statusHistory``: one ``{"status", "period": {"start",
    "end"}}`` per interval of its business-time timeline, oldest first; the last interval is
    open (its period has no ``end``).

    Args:
        encounter: the Encounter.
        status_map: our state name -> R4 ``encounter-status`` code (``planned``, ``arrived``,
            ``triaged``, ``in-progress``, ``onleave``, ``finished``, ``cancelled``,
            ``entered-in-error``, ``unknown``); a state it does not name keeps its own name,
            which must then be such a code (default: identity for every state).
        tz: the time zone the times are written in (default: Django's current time zone).
        known_at: only the rows recorded by then ("what the system said at ``known_at``").
        using: the database to read (default: as :func:`~django_encounters.get_state_at`).

    Raises:
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        FhirStatusError: a state (or a ``status_map`` value) with no valid R4 code.
        StreamGapError: the encounter's stream has a sequence gap.
    """
    return [
        {"status": code, "period": _period(start, end, tz)}
        for code, start, end in fhir_status_intervals(
            encounter, status_map, fhir_version="R4", known_at=known_at, using=using
        )
    ]


def to_fhir_encounter_history(
    encounter: Encounter,
    status_map: Mapping[str, str] | None = None,
    *,
    encounter_class: Element = None,
    subject: Element = None,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> list[dict[str, Any]]:
    """The encounter's FHIR R5 ``EncounterHistory`` resources, one per interval of its
    business-time timeline, oldest first::

        {"resourceType": "EncounterHistory", "status": "in-progress",
         "class": {...}, "encounter": {"reference": "Encounter/<id>"},
         "subject": {...},                      # only when given
         "actualPeriod": {"start": "...", "end": "..."}}   # no "end" for the open interval

    Args:
        encounter: the Encounter.
        status_map: our state name -> R5 ``encounter-status`` code (``planned``,
            ``in-progress``, ``on-hold``, ``discharged``, ``completed``, ``cancelled``,
            ``discontinued``, ``entered-in-error``, ``unknown``); unnamed states keep their
            own name, which must then be such a code.
        encounter_class: the ``class`` CodeableConcept (R5 requires one), e.g. HL7 v3 ActCode
            ``EMER``, or a function of the encounter returning it; default
            :data:`UNKNOWN_CLASS` (the store does not know the class of an encounter).
        subject: the ``subject`` Reference (e.g. ``{"reference": "Patient/example"}``), or a
            function of the encounter returning one or None; default: no ``subject`` (the
            subject is any Django model, whose FHIR resource type only the caller knows).
        tz: the time zone the times are written in (default: Django's current time zone).
        known_at: only the rows recorded by then ("what the system said at ``known_at``").
        using: the database to read (default: as :func:`~django_encounters.get_state_at`).

    Raises:
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        FhirStatusError: a state (or a ``status_map`` value) with no valid R5 code.
        TypeError: ``encounter_class`` or ``subject`` is not a mapping (or does not give one).
        StreamGapError: the encounter's stream has a sequence gap.
    """
    class_ = _element(encounter, UNKNOWN_CLASS if encounter_class is None else encounter_class)
    if class_ is None:
        raise TypeError("encounter_class must give a CodeableConcept (a mapping), not None")
    reference = _element(encounter, subject)
    resources = []
    for code, start, end in fhir_status_intervals(
        encounter, status_map, fhir_version="R5", known_at=known_at, using=using
    ):
        resource: dict[str, Any] = {
            "resourceType": "EncounterHistory",
            "status": code,
            "class": copy.deepcopy(class_),  # each resource its own (callers edit them)
            "encounter": {"reference": f"Encounter/{encounter.pk}"},
        }
        if reference is not None:
            resource["subject"] = copy.deepcopy(reference)
        resource["actualPeriod"] = _period(start, end, tz)
        resources.append(resource)
    return resources


def _status_codes(
    encounter: Encounter, status_map: Mapping[str, str] | None, fhir_version: str
) -> Callable[[str], str]:
    """``state -> code`` for ``fhir_version``; the whole map is checked first (a typo for a
    state this encounter never entered is refused too)."""
    valid = _STATUSES[fhir_version]
    mapping: Mapping[str, str] = {} if status_map is None else status_map
    if not isinstance(mapping, Mapping):
        raise TypeError(f"status_map must be a mapping of state names to codes, not {mapping!r}")
    for state, code in mapping.items():
        if not isinstance(state, str) or not isinstance(code, str):
            raise TypeError(f"status_map must map state names to codes (text), not {state!r}")
        if code not in valid:
            raise FhirStatusError(
                encounter.pk, state, code, fhir_version, mapped=True, valid_codes=valid
            )

    def code_of(state: str) -> str:
        if state in mapping:
            return mapping[state]
        if state not in valid:
            raise FhirStatusError(
                encounter.pk, state, state, fhir_version, mapped=False, valid_codes=valid
            )
        return state

    return code_of


def _element(encounter: Encounter, value: Element) -> Mapping[str, Any] | None:
    given = value(encounter) if callable(value) else value
    if given is not None and not isinstance(given, Mapping):
        raise TypeError(f"a FHIR element must be a mapping (a JSON object), not {given!r}")
    return given


def _period(start: datetime, end: datetime | None, tz: tzinfo | None) -> dict[str, str]:
    period = {"start": fhir_datetime(start, tz)}
    if end is not None:
        period["end"] = fhir_datetime(end, tz)
    return period
