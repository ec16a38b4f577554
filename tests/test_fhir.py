"""FHIR export: the business-time timeline as R4 ``Encounter.statusHistory`` and as R5
``EncounterHistory`` resources, checked against the published R4 example
``encounter-example-emerg`` (recorded out of order here: the triage entered late) and parsed
through fhir.resources' R4B and R5 models; ``status_map``, refused states, the open last
interval, an encounter with no rows, a soft-deleted one, ``known_at``, time zones."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from fhir.resources.encounterhistory import EncounterHistory
from fhir.resources.R4B.encounter import Encounter as R4BEncounter

from django_encounters import EncounterNotFoundError, create_encounter, transition
from django_encounters.models import EncounterDefinition, EncounterTransition
from django_encounters.projections.audit import iter_audit
from django_encounters.projections.fhir import (
    R4_ENCOUNTER_STATUSES,
    R5_ENCOUNTER_STATUSES,
    UNKNOWN_CLASS,
    FhirStatusError,
    fhir_datetime,
    to_fhir_encounter_history,
    to_fhir_r4_status_history,
)

BRISBANE = dt_timezone(timedelta(hours=10))

# encounter-example-emerg.json of FHIR R4 ("Emergency visit that escalated into inpatient
# patient @example"): its Encounter.statusHistory, verbatim.
PUBLISHED_STATUS_HISTORY = [
    {
        "status": "arrived",
        "period": {"start": "2017-02-01T07:15:00+10:00", "end": "2017-02-01T07:35:00+10:00"},
    },
    {
        "status": "triaged",
        "period": {"start": "2017-02-01T07:35:00+10:00", "end": "2017-02-01T08:45:00+10:00"},
    },
    {
        "status": "in-progress",
        "period": {"start": "2017-02-01T08:45:00+10:00", "end": "2017-02-01T12:15:00+10:00"},
    },
    {
        "status": "onleave",
        "period": {"start": "2017-02-01T12:15:00+10:00", "end": "2017-02-01T12:45:00+10:00"},
    },
    {"status": "in-progress", "period": {"start": "2017-02-01T12:45:00+10:00"}},
]
# The same example's class, subject and status (what an R4B Encounter needs beside the history).
EMERGENCY_CLASS = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
    "code": "EMER",
    "display": "emergency",
}
EMERG_STATES = [
    "planned",
    "arrived",
    "triaged",
    "in-progress",
    "onleave",
    "finished",
    "cancelled",
]
EMERG_TRANSITIONS = {
    "planned": ["arrived", "cancelled"],
    "arrived": ["triaged", "in-progress", "cancelled"],
    "triaged": ["in-progress", "cancelled"],
    "in-progress": ["onleave", "finished"],
    "onleave": ["in-progress", "finished"],
}


def at(hhmm: str) -> datetime:
    hours, minutes = (int(part) for part in hhmm.split(":"))
    return datetime(2017, 2, 1, hours, minutes, tzinfo=BRISBANE)


@pytest.fixture
def emergency_definition(db: Any) -> EncounterDefinition:
    """A definition whose state names are R4's encounter-status codes."""
    return EncounterDefinition.objects.create(
        name="Emergency",
        code="EMERG",
        states=list(EMERG_STATES),
        initial_state="planned",
        final_states=["finished", "cancelled"],
        transitions={k: list(v) for k, v in EMERG_TRANSITIONS.items()},
    )


@pytest.fixture
def emerg(emergency_definition: EncounterDefinition, patient: Any) -> Any:
    """The example's encounter, recorded out of order: the triage is entered last, backdated
    to 07:35 (between the arrival and the start of treatment)."""
    encounter = create_encounter(emergency_definition, patient)
    transition(encounter, "arrived", effective_at=at("07:15"))
    transition(encounter, "in-progress", effective_at=at("08:45"))
    transition(encounter, "onleave", effective_at=at("12:15"))
    transition(encounter, "in-progress", effective_at=at("12:45"))
    transition(encounter, "triaged", effective_at=at("07:35"), reason="entered late")
    return encounter


def _r4b_encounter(status_history: list[dict[str, Any]]) -> R4BEncounter:
    return R4BEncounter.model_validate(
        {
            "resourceType": "Encounter",
            "id": "emerg",
            "status": "in-progress",
            "class": EMERGENCY_CLASS,
            "subject": {"reference": "Patient/example"},
            "statusHistory": status_history,
        }
    )


# -- R4 ---------------------------------------------------------------------------------------


def test_the_emergency_example_recorded_out_of_order_exports_its_published_status_history(
    emerg: Any,
):
    # The triage really was recorded last and backdated (the audit's mark).
    (audit,) = list(iter_audit(encounters=[emerg.pk]))
    assert [(row.sequence, row.to_state, row.backdated) for row in audit.timeline] == [
        (1, "arrived", False),
        (5, "triaged", True),
        (2, "in-progress", False),
        (3, "onleave", False),
        (4, "in-progress", False),
    ]

    history = to_fhir_r4_status_history(emerg, tz=BRISBANE)

    assert history == PUBLISHED_STATUS_HISTORY
    assert json.loads(json.dumps(history)) == PUBLISHED_STATUS_HISTORY  # JSON-ready
    parsed = _r4b_encounter(history)
    assert [item.status for item in parsed.statusHistory] == [
        "arrived",
        "triaged",
        "in-progress",
        "onleave",
        "in-progress",
    ]
    assert parsed.statusHistory[0].period.start == at("07:15")
    assert parsed.statusHistory[-1].period.end is None
    assert _r4b_encounter(PUBLISHED_STATUS_HISTORY).model_dump(mode="json") == parsed.model_dump(
        mode="json"
    )


def test_times_are_written_in_the_current_time_zone_by_default(emerg: Any):
    history = to_fhir_r4_status_history(emerg)
    assert history[0] == {
        "status": "arrived",
        "period": {"start": "2017-01-31T21:15:00+00:00", "end": "2017-01-31T21:35:00+00:00"},
    }
    with timezone.override("Australia/Brisbane"):
        assert to_fhir_r4_status_history(emerg) == PUBLISHED_STATUS_HISTORY


def test_fhir_datetime_keeps_fractions_of_a_second_only_when_there_are_some():
    assert fhir_datetime(at("07:15"), BRISBANE) == "2017-02-01T07:15:00+10:00"
    ms = at("07:15").replace(microsecond=250_000)
    assert fhir_datetime(ms, dt_timezone.utc) == "2017-01-31T21:15:00.250+00:00"
    us = at("07:15").replace(microsecond=7)
    assert fhir_datetime(us, BRISBANE) == "2017-02-01T07:15:00.000007+10:00"


def test_status_map_maps_our_states_to_fhir_codes(encounter: Any):
    """The SPEC visit: none of its state names but ``cancelled`` is an R4 code."""
    created = encounter.created_at
    transition(encounter, "checked_in", effective_at=created + timedelta(seconds=10))
    transition(encounter, "in_progress", effective_at=created + timedelta(seconds=25))
    transition(encounter, "completed", effective_at=created + timedelta(seconds=55))
    status_map = {
        "scheduled": "planned",
        "checked_in": "arrived",
        "in_progress": "in-progress",
        "completed": "finished",
    }

    history = to_fhir_r4_status_history(encounter, status_map, tz=dt_timezone.utc)

    def utc(seconds: int) -> str:
        return fhir_datetime(created + timedelta(seconds=seconds), dt_timezone.utc)

    # The origin state counts from created_at, which precedes the first row.
    assert history == [
        {"status": "planned", "period": {"start": utc(0), "end": utc(10)}},
        {"status": "arrived", "period": {"start": utc(10), "end": utc(25)}},
        {"status": "in-progress", "period": {"start": utc(25), "end": utc(55)}},
        {"status": "finished", "period": {"start": utc(55)}},
    ]
    _r4b_encounter(history)


def test_consecutive_states_mapped_to_one_code_are_one_interval(emerg: Any):
    history = to_fhir_r4_status_history(
        emerg, {"arrived": "in-progress", "triaged": "in-progress"}, tz=BRISBANE
    )
    assert history == [
        {
            "status": "in-progress",
            "period": {"start": "2017-02-01T07:15:00+10:00", "end": "2017-02-01T12:15:00+10:00"},
        },
        PUBLISHED_STATUS_HISTORY[3],
        PUBLISHED_STATUS_HISTORY[4],
    ]


def test_a_state_with_no_r4_code_is_refused_naming_the_encounter_and_the_state(encounter: Any):
    transition(encounter, "checked_in")
    with pytest.raises(FhirStatusError) as caught:
        to_fhir_r4_status_history(encounter, {"scheduled": "planned"})
    error = caught.value
    assert (error.encounter_id, error.state, error.code, error.fhir_version) == (
        encounter.pk,
        "checked_in",
        "checked_in",
        "R4",
    )
    assert error.valid_codes == R4_ENCOUNTER_STATUSES
    assert str(error) == (
        f"Encounter {encounter.pk}: state 'checked_in' has no FHIR R4 encounter-status code "
        "(status_map does not map it; valid codes: planned, arrived, triaged, in-progress, "
        "onleave, finished, cancelled, entered-in-error, unknown)"
    )
    assert isinstance(error, ValueError)


def test_a_status_map_value_that_is_no_code_is_refused_even_for_a_state_never_entered(
    encounter: Any,
):
    with pytest.raises(FhirStatusError) as caught:
        to_fhir_r4_status_history(
            encounter,
            {"scheduled": "planned", "completed": "completed"},  # R5's, not R4's
        )
    assert (caught.value.state, caught.value.code) == ("completed", "completed")
    assert "status_map maps it to 'completed'" in str(caught.value)


def test_r4_and_r5_have_their_own_codes(emerg: Any):
    # "arrived", "triaged" and "onleave" are R4 codes only.
    with pytest.raises(FhirStatusError) as caught:
        to_fhir_encounter_history(emerg)
    assert (caught.value.state, caught.value.fhir_version) == ("arrived", "R5")
    assert caught.value.valid_codes == R5_ENCOUNTER_STATUSES
    with pytest.raises(FhirStatusError):
        to_fhir_r4_status_history(emerg, {"onleave": "on-hold"})


@pytest.mark.parametrize(
    "status_map, error",
    [
        (["planned"], TypeError),
        ({"scheduled": 1}, TypeError),
        ({1: "planned"}, TypeError),
    ],
)
def test_a_status_map_of_the_wrong_type_is_refused(encounter: Any, status_map: Any, error: Any):
    with pytest.raises(error):
        to_fhir_r4_status_history(encounter, status_map)


def test_an_encounter_with_no_rows_is_one_open_interval_in_its_origin_state(encounter: Any):
    assert encounter.version == 0
    start = fhir_datetime(encounter.created_at, dt_timezone.utc)
    assert to_fhir_r4_status_history(encounter, {"scheduled": "planned"}, tz=dt_timezone.utc) == [
        {"status": "planned", "period": {"start": start}}
    ]
    assert to_fhir_encounter_history(encounter, {"scheduled": "planned"}, tz=dt_timezone.utc) == [
        {
            "resourceType": "EncounterHistory",
            "status": "planned",
            "class": UNKNOWN_CLASS,
            "encounter": {"reference": f"Encounter/{encounter.pk}"},
            "actualPeriod": {"start": start},
        }
    ]


def test_a_soft_deleted_encounter_is_not_found(emerg: Any):
    emerg.delete()
    with pytest.raises(EncounterNotFoundError) as caught:
        to_fhir_r4_status_history(emerg)
    assert caught.value.encounter_id == emerg.pk
    with pytest.raises(EncounterNotFoundError):
        to_fhir_encounter_history(emerg, encounter_class=EMERGENCY_CLASS)


def test_a_stale_instance_of_a_soft_deleted_encounter_is_not_found(emerg: Any):
    from django_encounters.models import Encounter

    Encounter.objects.get(pk=emerg.pk).delete()
    assert emerg.deleted_at is None  # this copy does not know
    with pytest.raises(EncounterNotFoundError):
        to_fhir_r4_status_history(emerg)


def test_known_at_exports_what_the_system_said_then(emerg: Any):
    """Before the late triage was recorded, the history went straight from arrival to
    treatment."""
    triage = EncounterTransition.objects.get(encounter=emerg, sequence=5)
    before = triage.transitioned_at - timedelta(milliseconds=1)
    history = to_fhir_r4_status_history(emerg, tz=BRISBANE, known_at=before)
    assert history == [
        {
            "status": "arrived",
            "period": {"start": "2017-02-01T07:15:00+10:00", "end": "2017-02-01T08:45:00+10:00"},
        },
        *PUBLISHED_STATUS_HISTORY[2:],
    ]
    with pytest.raises(ValueError):
        to_fhir_r4_status_history(emerg, known_at=datetime(2017, 2, 1))  # naive


def test_known_at_before_the_encounter_existed_exports_nothing(emerg: Any):
    before = emerg.created_at - timedelta(days=1)
    assert to_fhir_r4_status_history(emerg, known_at=before) == []
    assert to_fhir_encounter_history(emerg, R5_MAP, known_at=before) == []


def test_editing_one_export_changes_no_other(emerg: Any):
    from django_encounters.projections.fhir import UNKNOWN_CLASS

    pristine = copy.deepcopy(UNKNOWN_CLASS)
    first = to_fhir_encounter_history(emerg, R5_MAP, subject={"reference": "Patient/example"})
    first[0]["class"]["coding"][0]["code"] = "EMER"
    first[0]["subject"]["reference"] = "Patient/other"
    assert UNKNOWN_CLASS == pristine
    again = to_fhir_encounter_history(emerg, R5_MAP, subject={"reference": "Patient/example"})
    assert again[0]["class"] == pristine
    assert [r["subject"] for r in again] == [{"reference": "Patient/example"}] * len(again)
    assert again[1]["class"] is not again[0]["class"]


def test_an_upgrade_row_does_not_split_an_interval(emergency_definition: Any, patient: Any):
    from django_encounters import upgrade_encounter

    encounter = create_encounter(emergency_definition, patient)
    transition(encounter, "arrived", effective_at=at("07:15"))
    emergency_definition.transitions = {**EMERG_TRANSITIONS, "arrived": ["cancelled"]}
    emergency_definition.save()
    upgrade_encounter(encounter, reason="new machine")
    assert encounter.version == 2
    history = to_fhir_r4_status_history(encounter, tz=BRISBANE)
    assert [item["status"] for item in history] == ["arrived"]
    assert history[0]["period"]["start"] == "2017-02-01T07:15:00+10:00"
    assert "end" not in history[0]["period"]


# -- R5 ---------------------------------------------------------------------------------------

# R5 has no "arrived", "triaged" or "onleave" status (an arrived patient's encounter is in
# progress; leave is "on-hold").
R5_MAP = {"arrived": "in-progress", "triaged": "in-progress", "onleave": "on-hold"}


def test_the_emergency_example_as_r5_encounter_history_resources(emerg: Any):
    resources = to_fhir_encounter_history(
        emerg,
        R5_MAP,
        encounter_class={"coding": [EMERGENCY_CLASS]},
        subject={"reference": "Patient/example"},
        tz=BRISBANE,
    )

    def resource(status: str, start: str, end: str | None = None) -> dict[str, Any]:
        period = {"start": f"2017-02-01T{start}:00+10:00"}
        if end is not None:
            period["end"] = f"2017-02-01T{end}:00+10:00"
        return {
            "resourceType": "EncounterHistory",
            "status": status,
            "class": {"coding": [EMERGENCY_CLASS]},
            "encounter": {"reference": f"Encounter/{emerg.pk}"},
            "subject": {"reference": "Patient/example"},
            "actualPeriod": period,
        }

    assert resources == [
        resource("in-progress", "07:15", "12:15"),  # arrived, triaged, treated: one status
        resource("on-hold", "12:15", "12:45"),
        resource("in-progress", "12:45"),
    ]
    for item in resources:
        parsed = EncounterHistory.model_validate(item)
        assert parsed.status == item["status"]
        assert parsed.class_fhir.coding[0].code == "EMER"
        assert parsed.encounter.reference == f"Encounter/{emerg.pk}"
    assert EncounterHistory.model_validate(resources[-1]).actualPeriod.end is None


def test_class_and_subject_may_be_functions_of_the_encounter(emerg: Any):
    resources = to_fhir_encounter_history(
        emerg,
        R5_MAP,
        encounter_class=lambda e: {"text": e.definition.name},
        subject=lambda e: {"reference": f"Patient/{e.subject_id}"},
    )
    assert {json.dumps(r["class"]) for r in resources} == {'{"text": "Emergency"}'}
    assert {r["subject"]["reference"] for r in resources} == {f"Patient/{emerg.subject_id}"}
    for item in resources:
        EncounterHistory.model_validate(item)


def test_the_default_class_is_unknown_and_there_is_no_default_subject(emerg: Any):
    resources = to_fhir_encounter_history(emerg, R5_MAP)
    assert all(r["class"] == UNKNOWN_CLASS for r in resources)
    assert all("subject" not in r for r in resources)
    for item in resources:
        assert EncounterHistory.model_validate(item).class_fhir.coding[0].code == "UNK"


@pytest.mark.parametrize("bad", ["EMER", lambda e: None, lambda e: ["EMER"]])
def test_a_class_that_is_no_codeable_concept_is_refused(emerg: Any, bad: Any):
    with pytest.raises(TypeError):
        to_fhir_encounter_history(emerg, R5_MAP, encounter_class=bad)


def test_fhir_resources_rejects_what_r5_requires_and_we_fill(emerg: Any):
    """The R5 model really checks the required ``class``: without it a resource is invalid."""
    (first, *_) = to_fhir_encounter_history(emerg, R5_MAP)
    without_class = {key: value for key, value in first.items() if key != "class"}
    with pytest.raises(ValueError):
        EncounterHistory.model_validate(without_class)


def test_the_export_reads_only_and_writes_nothing(emerg: Any, django_assert_max_num_queries):
    rows = EncounterTransition.objects.filter(encounter=emerg).count()
    with django_assert_max_num_queries(2):  # the not-deleted check, the stream
        to_fhir_r4_status_history(emerg)
    assert EncounterTransition.objects.filter(encounter=emerg).count() == rows


def test_the_export_needs_no_fhir_library():
    """In a fresh interpreter, the export module and the package load no ``fhir`` module."""
    script = (
        "import sys, django; django.setup()\n"
        "import django_encounters.projections.fhir, django_encounters\n"
        "print(sorted(m for m in sys.modules if m == 'fhir' or m.startswith(('fhir.', "
        "'fhir_core', 'pydantic'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        check=True,
    )
    assert done.stdout.strip() == "[]"


# -- whole resources -----------------------------------------------------------------------------


def test_the_whole_r4_resource_of_the_example_validates_and_holds_its_history(emerg: Any):
    from django_encounters.projections.fhir import encounter_resource

    resource = encounter_resource(emerg, "R4", tz=BRISBANE)

    assert resource["resourceType"] == "Encounter"
    assert resource["id"] == str(emerg.pk)
    assert resource["identifier"] == [
        {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{emerg.pk}"}
    ]
    assert resource["status"] == "in-progress"
    assert resource["statusHistory"] == PUBLISHED_STATUS_HISTORY
    assert resource["period"] == {"start": "2017-02-01T07:15:00+10:00"}
    assert resource["subject"] == {"reference": f"Patient/{emerg.subject_id}"}
    assert resource["class"] == UNKNOWN_CLASS["coding"][0]  # the store does not know it
    recorded = EncounterTransition.objects.filter(encounter=emerg).order_by("-sequence")[0]
    assert resource["meta"] == {"lastUpdated": fhir_datetime(recorded.transitioned_at, BRISBANE)}
    parsed = R4BEncounter.model_validate(resource)
    assert parsed.identifier[0].value == f"urn:uuid:{emerg.pk}"


def test_the_whole_r5_resource_has_no_history_and_its_own_codes(emerg: Any):
    from fhir.resources.encounter import Encounter as R5Encounter

    from django_encounters.projections.fhir import encounter_resource

    r5_map = {"arrived": "in-progress", "triaged": "in-progress", "onleave": "on-hold"}
    resource = encounter_resource(emerg, "R5", r5_map, tz=BRISBANE)

    assert "statusHistory" not in resource and "subjectStatus" not in resource  # no map for it
    assert resource["actualPeriod"] == {"start": "2017-02-01T07:15:00+10:00"}
    assert resource["class"] == [UNKNOWN_CLASS]
    R5Encounter.model_validate(resource)


def test_the_whole_resource_refuses_what_the_status_history_refuses(emerg: Any):
    from django_encounters.projections.fhir import encounter_resource

    with pytest.raises(FhirStatusError) as refused:
        encounter_resource(emerg, "R5")  # "arrived" is no R5 code
    assert (refused.value.state, refused.value.fhir_version) == ("arrived", "R5")
    with pytest.raises(ValueError, match="fhir_version must be one of"):
        encounter_resource(emerg, "R3")
    emerg.delete()
    with pytest.raises(EncounterNotFoundError):
        encounter_resource(emerg, "R4")


def test_the_whole_resource_as_known_at_a_time(emerg: Any):
    from django_encounters.projections.fhir import encounter_resource

    rows = EncounterTransition.objects.filter(encounter=emerg).order_by("sequence")
    before_triage = rows[3].transitioned_at  # the triage (sequence 5) was recorded after

    resource = encounter_resource(emerg, "R4", tz=BRISBANE, known_at=before_triage)

    assert [h["status"] for h in resource["statusHistory"]] == [
        "arrived",
        "in-progress",
        "onleave",
        "in-progress",
    ]
    assert resource["meta"]["lastUpdated"] == fhir_datetime(before_triage, BRISBANE)
