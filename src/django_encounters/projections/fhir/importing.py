"""FHIR encounters into the store: the Python API behind ``manage.py import_fhir_encounters``.

A file holds a ``Bundle`` (any type: its entries' resources are read) or one resource, R4 or R5
JSON. Each ``Encounter`` becomes an encounter of the given definition, created with
:func:`~django_encounters.create_encounter` and moved through its history with backdated
:func:`~django_encounters.transition` calls (``effective_at`` = when each status began), so the
definition decides every move as it decides any other: a move it forbids is refused.

* **R4**: ``statusHistory`` in order of ``period.start``, then the current ``status`` if it
  differs from the last entry (effective at that entry's end, or at ``period.end``/``start``).
* **R5**: the bundle's ``EncounterHistory`` resources that refer to the encounter (by its
  ``fullUrl`` or ``Encounter/<id>``), in order of ``actualPeriod.start``; without any, the
  current ``status`` at ``actualPeriod.start``. ``subjectStatus`` tells apart states that share
  a status code when the definition's map names it.
* **States** are found by reading the definition's status map (``ENCOUNTERS_FHIR_STATUS_MAPS``,
  or ``status_map=``) backwards; when several states have the code, the one the encounter is in
  wins, then the first (in the definition's order) it may move to. A status the encounter is
  already in adds no row (the first status, when it is the initial state, is the creation).
* **Idempotent**: the encounter remembers the resource's key in ``metadata["fhir"]["key"]``
  (its first ``identifier`` as ``system|value``, else ``Encounter/<id>``): a resource whose key
  is already stored, or whose identifier is this installation's own
  (``ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM``) naming an existing encounter, is skipped. Importing a
  file twice creates nothing the second time. The resource's identifiers, class and subject are
  kept beside the key, so that the export writes them back.
* **All or nothing**: the whole file is imported in one transaction. A refused resource raises
  :class:`~django_encounters.exceptions.FhirImportError` naming it and the move refused;
  nothing of the file is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import router
from django.db import transaction as db_transaction
from django.utils.module_loading import import_string

from ... import conf
from ...exceptions import DefinitionNotFoundError, EncounterError, FhirImportError
from ...models import Encounter, EncounterDefinition
from ...services import create_encounter, transition
from . import (
    _STATUSES,
    R4_ENCOUNTER_STATUSES,
    R5_ENCOUNTER_STATUSES,
    encounter_identifier,
)

__all__ = ["ImportResult", "import_fhir_encounters", "read_resources"]

#: A function naming the subject of an imported encounter: ``(reference, definition) -> a saved
#: model instance``, or None when there is none.
SubjectResolver = Callable[[Mapping[str, Any], EncounterDefinition], Any]

_R4_ONLY = set(R4_ENCOUNTER_STATUSES) - set(R5_ENCOUNTER_STATUSES)
_R5_ONLY = set(R5_ENCOUNTER_STATUSES) - set(R4_ENCOUNTER_STATUSES)


@dataclass
class ImportResult:
    """What an import did: the encounters ``created`` and the resources ``skipped`` (already
    imported), each named as in errors (``Encounter/emerg in visits.json``)."""

    created: list[Encounter] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Step:
    code: str
    subject_code: str | None
    start: datetime


def read_resources(source: Any) -> tuple[str, list[tuple[str | None, dict[str, Any]]]]:
    """``(name of the source, [(fullUrl or None, resource)])`` from a path, a JSON text or an
    already parsed dict (a Bundle's entries, or the one resource)."""
    if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
        name = os.fspath(source)
        try:
            with open(name, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise FhirImportError(name, f"cannot read it ({exc.strerror or exc})") from exc
        except ValueError as exc:
            raise FhirImportError(name, f"not JSON ({exc})") from exc
    elif isinstance(source, str):
        name = "the JSON given"
        try:
            data = json.loads(source)
        except ValueError as exc:
            raise FhirImportError(name, f"not JSON ({exc})") from exc
    else:
        name, data = "the resource given", source
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        raise FhirImportError(name, "not a FHIR resource (a JSON object with a resourceType)")
    if data["resourceType"] != "Bundle":
        return name, [(None, data)]
    found = []
    for number, entry in enumerate(data.get("entry") or [], 1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise FhirImportError(f"Bundle entry {number} in {name}", "it has no resource")
        full_url = entry.get("fullUrl")
        found.append((full_url if isinstance(full_url, str) else None, resource))
    return name, found


def import_fhir_encounters(
    source: Any,
    *,
    definition: EncounterDefinition | str,
    resolve_subject: SubjectResolver | str | None = None,
    fhir_version: str | None = None,
    status_map: Mapping[str, str] | None = None,
    created_by: Any = None,
) -> ImportResult:
    """Import the FHIR ``Encounter`` resources of ``source`` (a path, JSON text or a parsed
    resource) as encounters of ``definition`` (an instance or its code), in one transaction.

    Args:
        source: a Bundle or a single Encounter, R4 or R5 JSON.
        definition: the definition the encounters follow.
        resolve_subject: the subject of each encounter from its ``subject`` Reference: a
            function, or its dotted path (default: ``ENCOUNTERS_FHIR_SUBJECT_RESOLVER``).
        fhir_version: ``"R4"`` or ``"R5"`` (default: told by each resource's elements).
        status_map: ``state -> code`` (default: the definition's map for that version in
            ``ENCOUNTERS_FHIR_STATUS_MAPS``).
        created_by: the user recorded as creating the encounters and making their moves.

    Returns:
        The encounters created and the resources skipped because they were imported before.

    Raises:
        FhirImportError: a resource that cannot be imported (unreadable, a status no state has,
            no subject, a move the definition forbids or a validator refuses: the message names
            the resource and the move); nothing of the file was written.
        DefinitionNotFoundError: no definition has the code.
    """
    if isinstance(definition, str):
        code = definition
        found = EncounterDefinition.objects.filter(code=code).first()  # not soft-deleted
        if found is None:
            raise DefinitionNotFoundError(code)
        definition = found
    if not isinstance(definition, EncounterDefinition):
        raise TypeError(
            f"definition must be an EncounterDefinition or its code, not {definition!r}"
        )
    name, resources = read_resources(source)
    resolver = _resolver(resolve_subject, name)
    if fhir_version is not None and fhir_version not in _STATUSES:
        raise ValueError(f"fhir_version must be one of {sorted(_STATUSES)}, not {fhir_version!r}")
    histories = [r for _, r in resources if r.get("resourceType") == "EncounterHistory"]
    result = ImportResult()
    seen: set[str] = set()
    using = router.db_for_write(Encounter)
    with db_transaction.atomic(using=using):
        for full_url, resource in resources:
            if resource.get("resourceType") != "Encounter":
                continue
            label = f"Encounter/{resource.get('id', '?')} in {name}"
            key = _key(resource, label)
            if key in seen or _already_imported(resource, key):
                result.skipped.append(label)
                continue
            seen.add(key)
            version = fhir_version or _version_of(resource)
            own = [h for h in histories if _refers_to(h, resource, full_url)]
            steps = _steps(resource, version, own, label)
            result.created.append(
                _import_one(
                    resource,
                    label,
                    key,
                    steps,
                    definition,
                    resolver,
                    version,
                    status_map,
                    created_by,
                )
            )
    return result


def _resolver(given: SubjectResolver | str | None, name: str) -> SubjectResolver:
    path = given if given is not None else conf.fhir_subject_resolver()
    if path is None:
        raise FhirImportError(
            name,
            "no subject resolver: set ENCOUNTERS_FHIR_SUBJECT_RESOLVER (or pass "
            "--subject-resolver) to the dotted path of a function (reference, definition) -> "
            "the subject's model instance",
        )
    if callable(path):
        return path
    try:
        return import_string(path)  # type: ignore[no-any-return]
    except ImportError as exc:
        raise FhirImportError(name, f"cannot import the subject resolver {path!r}: {exc}") from exc


def _key(resource: dict[str, Any], label: str) -> str:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") and identifier.get("value"):
            return f"{identifier['system']}|{identifier['value']}"
    if isinstance(resource.get("id"), str) and resource["id"]:
        return f"Encounter/{resource['id']}"
    raise FhirImportError(label, "it has neither an identifier (system and value) nor an id")


def _already_imported(resource: dict[str, Any], key: str) -> bool:
    """Imported before (its key is stored), or exported by this installation (its identifier
    is ours and names an encounter that exists)."""
    if Encounter.all_objects.filter(metadata__fhir__key=key).exists():
        return True
    ours = encounter_identifier("x")
    for identifier in resource.get("identifier") or []:
        if not isinstance(identifier, dict) or identifier.get("system") != ours["system"]:
            continue
        try:
            pk = UUID(str(identifier.get("value", "")).removeprefix("urn:uuid:"))
        except ValueError:  # not an encounter id: not one of ours
            continue
        if Encounter.all_objects.filter(pk=pk).exists():
            return True
    return False


def _version_of(resource: dict[str, Any]) -> str:
    if isinstance(resource.get("class"), list) or any(
        key in resource for key in ("actualPeriod", "subjectStatus", "admission")
    ):
        return "R5"
    if isinstance(resource.get("class"), dict) or any(
        key in resource for key in ("statusHistory", "period", "classHistory", "hospitalization")
    ):
        return "R4"
    return "R5" if resource.get("status") in _R5_ONLY else "R4"


def _refers_to(history: dict[str, Any], encounter: dict[str, Any], full_url: str | None) -> bool:
    reference = (history.get("encounter") or {}).get("reference")
    return reference is not None and reference in {full_url, f"Encounter/{encounter.get('id')}"}


def _time(value: Any, label: str, what: str) -> datetime:
    if not isinstance(value, str) or "T" not in value:
        raise FhirImportError(label, f"{what} is {value!r}, not a dateTime with a time and offset")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FhirImportError(label, f"{what} {value!r} is not a FHIR dateTime") from None
    if parsed.tzinfo is None:
        raise FhirImportError(label, f"{what} {value!r} has no UTC offset")
    return parsed


def _status(value: Any, label: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise FhirImportError(label, f"{what} has no status")
    return value


def _subject_code(element: Any) -> str | None:
    for coding in (element or {}).get("coding") or []:
        if isinstance(coding, dict) and coding.get("code"):
            return str(coding["code"])
    return None


def _steps(
    resource: dict[str, Any], version: str, histories: list[dict[str, Any]], label: str
) -> list[_Step]:
    """The statuses the encounter went through, oldest first, each with when it began."""
    status = resource.get("status")
    if not isinstance(status, str):
        raise FhirImportError(label, "it has no status")
    steps: list[_Step] = []
    if version == "R4":
        entries = resource.get("statusHistory") or []
        for number, entry in enumerate(entries, 1):
            start = _time(
                (entry.get("period") or {}).get("start"), label, f"statusHistory[{number}]"
            )
            code = _status(entry.get("status"), label, f"statusHistory[{number}]")
            steps.append(_Step(code, None, start))
        period = resource.get("period") or {}
        end_of_last = (entries[-1].get("period") or {}).get("end") if entries else None
        current = _Step(status, None, datetime.min)
        when = end_of_last or period.get("end") or period.get("start")
    else:
        for history in histories:
            start = _time(
                (history.get("actualPeriod") or {}).get("start"),
                label,
                "an EncounterHistory's start",
            )
            code = _status(history.get("status"), label, "an EncounterHistory")
            steps.append(_Step(code, _subject_code(history.get("subjectStatus")), start))
        when = (resource.get("actualPeriod") or {}).get("start")
        current = _Step(status, _subject_code(resource.get("subjectStatus")), datetime.min)
    steps.sort(key=lambda step: step.start)
    if not steps or (steps[-1].code, steps[-1].subject_code) != (
        current.code,
        current.subject_code if version == "R5" else None,
    ):
        if when is None:
            steps.append(current)  # dated when needed: only the creation can take no time
        else:
            steps.append(
                _Step(current.code, current.subject_code, _time(when, label, "the period"))
            )
    return steps


def _import_one(
    resource: dict[str, Any],
    label: str,
    key: str,
    steps: list[_Step],
    definition: EncounterDefinition,
    resolver: SubjectResolver,
    version: str,
    status_map: Mapping[str, str] | None,
    created_by: Any,
) -> Encounter:
    reference = resource.get("subject")
    if not isinstance(reference, dict):
        raise FhirImportError(label, "it has no subject")
    try:
        subject = resolver(reference, definition)
    except Exception as exc:  # the project's code: reported as this resource's refusal
        raise FhirImportError(
            label, f"the subject resolver failed on {reference}: {type(exc).__name__}: {exc}"
        ) from exc
    if subject is None:
        raise FhirImportError(label, f"the subject resolver found no subject for {reference}")
    entry = conf.fhir_status_maps().get(definition.code, {})
    codes = dict(entry.get(version, {})) if status_map is None else dict(status_map)
    subject_codes = dict(entry.get("subjectStatus", {})) if version == "R5" else {}
    class_ = resource.get("class")
    if isinstance(class_, list):  # R5: CodeableConcepts; kept as the first Coding
        class_ = next(iter((class_[0] or {}).get("coding") or []), None) if class_ else None
    kept = {
        "key": key,
        "identifier": [
            {"system": i["system"], "value": i["value"]}
            for i in resource.get("identifier") or []
            if isinstance(i, dict) and i.get("system") and i.get("value")
        ],
        "subject": reference,
    }
    if isinstance(class_, dict):
        kept["class"] = {k: class_[k] for k in ("system", "code", "display") if k in class_}
    try:
        encounter = create_encounter(
            definition, subject, created_by=created_by, metadata={"fhir": kept}
        )
    except (TypeError, ValueError, EncounterError) as exc:
        raise FhirImportError(label, f"cannot create its encounter: {exc}") from exc
    rules = encounter.machine.rules()
    for step in steps:
        state = _state_for(step, encounter.state, definition, codes, subject_codes, rules, label)
        if state == encounter.state:
            continue
        if step.start == datetime.min:
            raise FhirImportError(
                label,
                f"its status {step.code!r} has no time (no period, no status history)",
                from_state=encounter.state,
                to_state=state,
            )
        try:
            transition(
                encounter,
                state,
                transitioned_by=created_by,
                reason=f"imported from FHIR {label}",
                effective_at=step.start,
            )
        except EncounterError as exc:
            raise FhirImportError(
                label, str(exc), from_state=encounter.state, to_state=state
            ) from exc
    return encounter


def _state_for(
    step: _Step,
    current: str,
    definition: EncounterDefinition,
    codes: Mapping[str, str],
    subject_codes: Mapping[str, str],
    rules: Any,
    label: str,
) -> str:
    """The state a status (and subjectStatus) stands for, read off the map backwards: the one
    the encounter is in, else the first the definition lets it move to, else the first."""
    states = [s for s in definition.states if codes.get(s, s) == step.code]
    if step.subject_code is not None and any(s in subject_codes for s in states):
        states = [s for s in states if subject_codes.get(s) == step.subject_code] or states
    if not states:
        raise FhirImportError(
            label,
            f"no state of definition {definition.code!r} has the status {step.code!r} (its "
            "status map in ENCOUNTERS_FHIR_STATUS_MAPS names the codes of its states)",
            from_state=current,
        )
    if current in states:
        return current
    allowed = [s for s in states if rules.is_allowed(current, s)]
    return allowed[0] if allowed else states[0]
