"""Encounters as HL7 FHIR resources, as plain JSON-ready dicts (no FHIR library needed: the
core package gains no dependency); the import of FHIR encounters is in :mod:`.importing`.

* :func:`encounter_resource` — a whole ``Encounter`` (R4 or R5) a FHIR server accepts: ``id``,
  ``meta``, a stable ``identifier``, ``status``, ``class``, ``subject``, the period, R4's
  ``statusHistory``, R5's ``subjectStatus``; :func:`encounter_history_resources` — R5's
  ``EncounterHistory`` resources of one encounter; :func:`encounter_bundle` — a transaction
  ``Bundle`` of many, each entry a conditional update on its identifier, so that sending it
  twice changes nothing the second time. How states are written (status codes per FHIR version,
  R5 ``subjectStatus``, the class, the subject's resource type) is set per definition in
  ``ENCOUNTERS_FHIR_STATUS_MAPS``.

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
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone
from typing import Any
from urllib.parse import quote
from uuid import UUID, uuid5

from asgiref.sync import sync_to_async

from ... import arguments, conf, store
from ...engine.intervals import intervals
from ...exceptions import EncounterNotFoundError, FhirStatusError
from ...models import Encounter
from ...services import _db_for_read
from ..output import in_zone, utc_iso

__all__ = [
    "FHIR_VERSIONS",
    "SUBJECT_STATUS_SYSTEM",
    "aencounter_bundle",
    "aencounter_resource",
    "encounter_bundle",
    "encounter_history_resources",
    "encounter_identifier",
    "encounter_resource",
    "status_map_for",
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
    arguments.require_aware(known_at, "known_at", optional=True)
    codes = _status_codes(encounter, status_map, _check_version(fhir_version))
    merged: list[tuple[str, datetime, datetime | None]] = []
    for state, start, end in _state_intervals(encounter, known_at, using):
        code = codes(state)
        if merged and merged[-1][0] == code and merged[-1][2] == start:
            merged[-1] = (code, merged[-1][1], end)
        else:
            merged.append((code, start, end))
    return merged


def _check_version(fhir_version: str) -> str:
    if fhir_version not in _STATUSES:
        raise ValueError(f"fhir_version must be one of {sorted(_STATUSES)}, not {fhir_version!r}")
    return fhir_version


def _state_intervals(
    encounter: Encounter, known_at: datetime | None, using: str | None
) -> list[tuple[str, datetime, datetime | None]]:
    """``(state, start, end or None)`` for each interval of the business-time timeline (as
    known at ``known_at``), unmerged; refused for a missing or soft-deleted encounter."""
    arguments.require_instance(encounter, Encounter, "encounter")
    arguments.require_aware(known_at, "known_at", optional=True)
    alias = _db_for_read(encounter, using)
    if (
        encounter.deleted_at is not None
        or not Encounter.objects.using(alias).filter(pk=encounter.pk).exists()
    ):
        raise EncounterNotFoundError(encounter.pk)
    if known_at is not None and known_at < encounter.created_at:
        return []  # not created yet at that time: nothing was known of it
    timeline = store.load_timeline(encounter, alias, known_at=known_at)
    return [
        (state, start, None if end == _OPEN else end)
        for state, start, end in intervals(
            encounter.origin_state, encounter.created_at, timeline.entries or [], _OPEN
        )
    ]


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


# ---------------------------------------------------------------------------------------------
# Whole resources, a transaction Bundle
# ---------------------------------------------------------------------------------------------

#: The FHIR versions :func:`encounter_resource` writes.
FHIR_VERSIONS = ("R4", "R5")
#: R5 ``subjectStatus`` codes (value set ``encounter-subject-status``) are from this system.
SUBJECT_STATUS_SYSTEM = "http://terminology.hl7.org/CodeSystem/encounter-subject-status"
#: Codes that mean the encounter has not begun (no ``period`` start yet) or never happened.
_NOT_BEGUN = {"planned", "cancelled", "entered-in-error"}


def status_map_for(encounter: Encounter, fhir_version: str) -> dict[str, str]:
    """The ``state -> code`` map ``ENCOUNTERS_FHIR_STATUS_MAPS`` gives for the encounter's
    definition in ``fhir_version`` (``{}`` when it names none: states are then codes)."""
    entry = conf.fhir_status_maps().get(encounter.definition.code, {})
    return dict(entry.get(_check_version(fhir_version), {}))


def encounter_identifier(encounter_id: Any) -> dict[str, str]:
    """The stable ``identifier`` of an encounter (or of anything keyed by a UUID): system
    ``ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM``, value the id (``urn:uuid:<id>`` under the default
    system ``urn:ietf:rfc:3986``, whose values are URIs)."""
    system = conf.fhir_identifier_system()
    value = str(encounter_id)
    if system == conf.DEFAULT_FHIR_IDENTIFIER_SYSTEM:
        value = f"urn:uuid:{value}"
    return {"system": system, "value": value}


def _search(resource_type: str, identifier: Mapping[str, str]) -> str:
    """The conditional URL matching ``identifier``: ``Encounter?identifier=system|value``."""
    token = f"{identifier['system']}|{identifier['value']}"
    return f"{resource_type}?identifier={quote(token, safe=':/|')}"


def _mapping(encounter: Encounter) -> dict[str, Any]:
    return dict(conf.fhir_status_maps().get(encounter.definition.code, {}))


def _imported(encounter: Encounter) -> dict[str, Any]:
    """What the FHIR import kept of the resource an encounter came from (``{}`` for others)."""
    metadata = encounter.metadata if isinstance(encounter.metadata, dict) else {}
    found = metadata.get("fhir")
    return found if isinstance(found, dict) else {}


def _class_coding(encounter: Encounter) -> dict[str, Any]:
    """The class as a Coding: the imported resource's, else the definition's (settings), else
    HL7 v3 NullFlavor ``UNK`` (the store does not know it)."""
    coding = _imported(encounter).get("class") or _mapping(encounter).get("class")
    return dict(coding) if coding else dict(UNKNOWN_CLASS["coding"][0])


def _subject(encounter: Encounter) -> dict[str, Any]:
    """The subject Reference: the imported resource's, else ``<subject_type>/<subject id>``
    with the definition's ``subject_type`` (default: the subject model's class name)."""
    imported = _imported(encounter).get("subject")
    if isinstance(imported, dict) and imported:
        return dict(imported)
    resource_type = _mapping(encounter).get("subject_type")
    if resource_type is None:
        model = encounter.subject_content_type.model_class()
        resource_type = model.__name__ if model is not None else "Resource"
    return {"reference": f"{resource_type}/{encounter.subject_id}"}


def _identifiers(encounter: Encounter) -> list[dict[str, Any]]:
    ours = encounter_identifier(encounter.pk)
    found = [ours]
    for kept in _imported(encounter).get("identifier", []):
        if isinstance(kept, dict) and kept not in found:
            found.append(dict(kept))
    return found


def _subject_status(code: str) -> dict[str, Any]:
    return {"coding": [{"system": SUBJECT_STATUS_SYSTEM, "code": code}]}


def _periods(
    encounter: Encounter,
    fhir_version: str,
    status_map: Mapping[str, str] | None,
    known_at: datetime | None,
    using: str | None,
) -> tuple[list[tuple[str, str | None, datetime, datetime | None]], str]:
    """``(status code, subjectStatus code or None, start, end or None)`` per interval, merged
    while both codes stay the same; and the state the timeline ends in."""
    codes = _status_codes(
        encounter,
        status_map_for(encounter, fhir_version) if status_map is None else status_map,
        fhir_version,
    )
    subject_codes = _mapping(encounter).get("subjectStatus", {}) if fhir_version == "R5" else {}
    merged: list[tuple[str, str | None, datetime, datetime | None]] = []
    last = encounter.origin_state
    for state, start, end in _state_intervals(encounter, known_at, using):
        key = (codes(state), subject_codes.get(state))
        if merged and merged[-1][:2] == key and merged[-1][3] == start:
            merged[-1] = (*key, merged[-1][2], end)
        else:
            merged.append((*key, start, end))
        last = state
    return merged, last


def encounter_resource(
    encounter: Encounter,
    version: str = "R4",
    status_map: Mapping[str, str] | None = None,
    *,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> dict[str, Any]:
    """The encounter as a whole FHIR ``Encounter`` resource (a plain, JSON-ready dict) that a
    FHIR server accepts::

        {"resourceType": "Encounter", "id": "<id>",
         "meta": {"lastUpdated": "<last recorded change>"},
         "identifier": [{"system": "<ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM>", "value": "<id>"}],
         "status": "<current code>",
         "statusHistory": [...],                     # R4 only: one entry per interval
         "class": {...},                             # R4: a Coding; R5: [CodeableConcept]
         "subject": {"reference": "Patient/42"},
         "subjectStatus": {...},                     # R5, when the map names one
         "period": {"start": ..., "end": ...}}       # R5: "actualPeriod"

    The period starts with the first interval whose status is not ``planned``/``cancelled``/
    ``entered-in-error`` (when the encounter really began) and ends where the last interval
    starts when the encounter's state is a final state of its definition. The codes come from
    ``status_map`` (default: the definition's map for ``version`` in
    ``ENCOUNTERS_FHIR_STATUS_MAPS``); the class, the subject's resource type and R5's
    ``subjectStatus`` from that setting too — for an encounter imported from FHIR, the class,
    subject and identifiers of the resource it came from. R5 keeps the history in separate
    ``EncounterHistory`` resources: :func:`encounter_history_resources`.

    Raises:
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        FhirStatusError: a state with no valid code in ``version``.
        ValueError / TypeError: an unknown ``version``, a naive ``known_at``, a bad map.
        EncounterConfigurationError: an unusable ``ENCOUNTERS_FHIR_*`` setting.
    """
    arguments.require_instance(encounter, Encounter, "encounter")
    _check_version(version)
    periods, last_state = _periods(encounter, version, status_map, known_at, using)
    resource: dict[str, Any] = {"resourceType": "Encounter", "id": str(encounter.pk)}
    recorded = encounter.last_transitioned_at or encounter.created_at
    if known_at is not None and recorded > known_at:
        recorded = known_at
    resource["meta"] = {"lastUpdated": fhir_datetime(recorded, tz)}
    resource["identifier"] = _identifiers(encounter)
    resource["status"] = periods[-1][0] if periods else "unknown"
    if version == "R4":
        resource["statusHistory"] = [
            {"status": code, "period": _period(start, end, tz)} for code, _, start, end in periods
        ]
        resource["class"] = _class_coding(encounter)
    else:
        resource["class"] = [{"coding": [_class_coding(encounter)]}]
    resource["subject"] = _subject(encounter)
    if version == "R5" and periods and periods[-1][1] is not None:
        resource["subjectStatus"] = _subject_status(periods[-1][1])
    begun = [p for p in periods if p[0] not in _NOT_BEGUN]
    if begun:
        period = {"start": fhir_datetime(begun[0][2], tz)}
        if periods[-1][3] is None and last_state in (encounter.machine.final_states or []):
            period["end"] = fhir_datetime(periods[-1][2], tz)
        resource["period" if version == "R4" else "actualPeriod"] = period
    return resource


def encounter_history_resources(
    encounter: Encounter,
    status_map: Mapping[str, str] | None = None,
    *,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> list[dict[str, Any]]:
    """The encounter's R5 ``EncounterHistory`` resources, one per interval (oldest first), as
    the R5 specification models the history of an encounter: each with its own stable
    ``identifier`` (an id derived from the encounter's and the interval's start), ``status``,
    ``class``, ``subject``, ``subjectStatus`` (when the map names one), ``actualPeriod`` and a
    reference to the ``Encounter`` (``Encounter/<id>``). Codes, class and subject as
    :func:`encounter_resource`; raises as it does."""
    arguments.require_instance(encounter, Encounter, "encounter")
    periods, _ = _periods(encounter, "R5", status_map, known_at, using)
    class_ = [{"coding": [_class_coding(encounter)]}]
    subject = _subject(encounter)
    resources = []
    for code, subject_code, start, end in periods:
        resource: dict[str, Any] = {
            "resourceType": "EncounterHistory",
            "identifier": [encounter_identifier(_history_id(encounter.pk, start))],
            "encounter": {"reference": f"Encounter/{encounter.pk}"},
            "status": code,
            "class": copy.deepcopy(class_[0]),
            "subject": dict(subject),
        }
        if subject_code is not None:
            resource["subjectStatus"] = _subject_status(subject_code)
        resource["actualPeriod"] = _period(start, end, tz)
        resources.append(resource)
    return resources


def _history_id(encounter_id: Any, start: datetime) -> UUID:
    """A stable id of one interval: the same encounter and start give the same id in every
    export (a later row cut into the interval leaves its start, and so its id, as it was)."""
    return uuid5(UUID(str(encounter_id)), utc_iso(start, "microseconds"))


def encounter_bundle(
    encounters: Iterable[Encounter],
    version: str = "R4",
    status_map: Mapping[str, str] | None = None,
    *,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> dict[str, Any]:
    """A FHIR ``transaction`` Bundle of the encounters (R4 or R5), for ``POST [base]``: each
    ``Encounter`` — and in R5 each of its ``EncounterHistory`` resources — is an entry with a
    conditional update on its identifier (``request: {"method": "PUT", "url":
    "Encounter?identifier=<system>|<value>"}``), so that the server creates it the first time
    and updates it in place afterwards: sending the bundle again creates no duplicate. The
    resources carry no ``id`` (the server keeps its own); entries refer to each other by their
    ``fullUrl`` (``urn:uuid:<id>``). Arguments as :func:`encounter_resource`'s; raises as it does.
    """
    _check_version(version)
    entries: list[dict[str, Any]] = []
    for encounter in encounters:
        resource = encounter_resource(
            encounter, version, status_map, tz=tz, known_at=known_at, using=using
        )
        del resource["id"]
        full_url = f"urn:uuid:{encounter.pk}"
        entries.append(_entry(full_url, resource))
        if version == "R5":
            for history in encounter_history_resources(
                encounter, status_map, tz=tz, known_at=known_at, using=using
            ):
                history["encounter"] = {"reference": full_url}
                key = history["identifier"][0]["value"].removeprefix("urn:uuid:")
                entries.append(_entry(f"urn:uuid:{key}", history))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _entry(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "PUT",
            "url": _search(resource["resourceType"], resource["identifier"][0]),
        },
    }


async def aencounter_resource(
    encounter: Encounter,
    version: str = "R4",
    status_map: Mapping[str, str] | None = None,
    *,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> dict[str, Any]:
    """:func:`encounter_resource` for async code (same arguments, result and errors), run in
    one thread-sensitive call."""
    return await sync_to_async(encounter_resource, thread_sensitive=True)(
        encounter, version, status_map, tz=tz, known_at=known_at, using=using
    )


async def aencounter_bundle(
    encounters: Iterable[Encounter],
    version: str = "R4",
    status_map: Mapping[str, str] | None = None,
    *,
    tz: tzinfo | None = None,
    known_at: datetime | None = None,
    using: str | None = None,
) -> dict[str, Any]:
    """:func:`encounter_bundle` for async code (same arguments, result and errors); a
    queryset of encounters is evaluated in the same thread-sensitive call."""
    return await sync_to_async(encounter_bundle, thread_sensitive=True)(
        encounters, version, status_map, tz=tz, known_at=known_at, using=using
    )
