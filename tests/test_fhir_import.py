"""FHIR import (``import_fhir_encounters``) and the round trip with the export: the published
HL7 example ``encounter-example-emerg`` (R4, and its R5 counterpart, in ``tests/data/fhir``)
imported through ``create_encounter`` + backdated ``transition`` calls, exported again as whole
``Encounter`` resources and transaction Bundles, everything validated with fhir.resources (R4B
models for R4, the default R5 models for R5). A second import creates nothing; a move the
definition forbids is refused naming the resource and the move, with nothing written."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from fhir.resources.bundle import Bundle as R5Bundle
from fhir.resources.encounter import Encounter as R5Encounter
from fhir.resources.encounterhistory import EncounterHistory
from fhir.resources.R4B.bundle import Bundle as R4BBundle
from fhir.resources.R4B.encounter import Encounter as R4BEncounter

from django_encounters.exceptions import FhirImportError
from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.projections.fhir import (
    R4_ENCOUNTER_STATUSES,
    R5_ENCOUNTER_STATUSES,
    encounter_bundle,
    encounter_history_resources,
    encounter_resource,
)
from django_encounters.projections.fhir.importing import import_fhir_encounters
from tests.helpers import run_command
from tests.testapp.models import Patient

DATA = Path(__file__).resolve().parent / "data" / "fhir"
R4_EXAMPLE = DATA / "encounter-example-emerg.r4.json"
R5_EXAMPLE = DATA / "encounter-example-emerg.r5.json"
BRISBANE = dt_timezone(timedelta(hours=10))

ED_STATES = ["booked", "waiting", "triage", "treatment", "away", "discharged", "cancelled"]
ED_TRANSITIONS = {
    "booked": ["waiting", "cancelled"],
    "waiting": ["triage", "treatment", "cancelled"],
    "triage": ["treatment", "cancelled"],
    "treatment": ["away", "discharged"],
    "away": ["treatment", "discharged"],
}
STATUS_MAPS = {
    "ED": {
        "R4": {
            "booked": "planned",
            "waiting": "arrived",
            "triage": "triaged",
            "treatment": "in-progress",
            "away": "onleave",
            "discharged": "finished",
        },
        "R5": {
            "booked": "planned",
            "waiting": "in-progress",
            "triage": "in-progress",
            "treatment": "in-progress",
            "away": "on-hold",
            "discharged": "completed",
        },
        "subjectStatus": {
            "waiting": "arrived",
            "triage": "triaged",
            "treatment": "receiving-care",
            "away": "on-leave",
            "discharged": "departed",
        },
        "subject_type": "Patient",
    }
}


def patient_for(reference: dict[str, Any], definition: Any) -> Patient:
    """The subject resolver of these tests: ``Patient/<name>`` is the patient of that name."""
    kind, _, name = reference["reference"].partition("/")
    assert kind == "Patient"
    return Patient.objects.get_or_create(name=name)[0]


RESOLVER = f"{__name__}.patient_for"


@pytest.fixture
def ed(db: Any, settings: Any) -> EncounterDefinition:
    settings.ENCOUNTERS_FHIR_STATUS_MAPS = STATUS_MAPS
    settings.ENCOUNTERS_FHIR_SUBJECT_RESOLVER = RESOLVER
    return EncounterDefinition.objects.create(
        name="Emergency department visit",
        code="ED",
        states=list(ED_STATES),
        initial_state="booked",
        final_states=["discharged", "cancelled"],
        transitions={k: list(v) for k, v in ED_TRANSITIONS.items()},
    )


def _example(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_the_hl7_examples_are_valid_fhir():
    r4 = R4BEncounter.model_validate(_example(R4_EXAMPLE))
    r5 = R5Encounter.model_validate(_example(R5_EXAMPLE))
    assert [s.status for s in r4.statusHistory] == [
        "arrived",
        "triaged",
        "in-progress",
        "onleave",
        "in-progress",
    ]
    assert (r5.status, r5.class_fhir[0].coding[0].code) == ("in-progress", "IMP")


def test_import_then_export_reproduces_the_r4_example(ed: EncounterDefinition):
    result = import_fhir_encounters(R4_EXAMPLE, definition="ED")

    (encounter,) = result.created
    assert result.skipped == []
    # Created through the API with backdated transitions, the definition deciding each.
    rows = EncounterTransition.objects.filter(encounter=encounter).order_by("sequence")
    assert [(r.from_state, r.to_state, r.effective_at) for r in rows] == [
        ("booked", "waiting", datetime(2017, 2, 1, 7, 15, tzinfo=BRISBANE)),
        ("waiting", "triage", datetime(2017, 2, 1, 7, 35, tzinfo=BRISBANE)),
        ("triage", "treatment", datetime(2017, 2, 1, 8, 45, tzinfo=BRISBANE)),
        ("treatment", "away", datetime(2017, 2, 1, 12, 15, tzinfo=BRISBANE)),
        ("away", "treatment", datetime(2017, 2, 1, 12, 45, tzinfo=BRISBANE)),
    ]
    assert encounter.state == "treatment"
    assert encounter.subject == Patient.objects.get(name="example")

    exported = encounter_resource(encounter, "R4", tz=BRISBANE)

    example = _example(R4_EXAMPLE)
    for element in ("status", "statusHistory", "period", "class", "subject"):
        assert exported[element] == example[element], element
    assert R4BEncounter.model_validate(exported).statusHistory[1].status == "triaged"


def test_a_second_import_creates_nothing(ed: EncounterDefinition):
    import_fhir_encounters(R4_EXAMPLE, definition="ED")
    rows = EncounterTransition.objects.count()

    again = import_fhir_encounters(R4_EXAMPLE, definition="ED")

    assert again.created == []
    assert again.skipped == [f"Encounter/emerg in {R4_EXAMPLE}"]
    assert (Encounter.objects.count(), EncounterTransition.objects.count()) == (1, rows)


def test_the_r5_example_imports_and_exports_as_r5(ed: EncounterDefinition):
    (encounter,) = import_fhir_encounters(R5_EXAMPLE, definition="ED").created
    # in-progress is waiting, triage or treatment: the one the definition lets it move to first.
    assert encounter.state == "waiting"

    exported = encounter_resource(encounter, "R5", tz=BRISBANE)

    example = _example(R5_EXAMPLE)
    for element in ("status", "class", "subject", "actualPeriod"):
        assert exported[element] == example[element], element
    assert exported["subjectStatus"]["coding"][0]["code"] == "arrived"
    R5Encounter.model_validate(exported)
    for history in encounter_history_resources(encounter, tz=BRISBANE):
        EncounterHistory.model_validate(history)


def test_an_exported_r5_bundle_imports_with_its_history(ed: EncounterDefinition, patient: Any):
    (source,) = import_fhir_encounters(R4_EXAMPLE, definition="ED").created
    bundle = encounter_bundle([source], "R5", tz=BRISBANE)
    R5Bundle.model_validate(bundle)
    models = {"Encounter": R5Encounter, "EncounterHistory": EncounterHistory}
    for entry in bundle["entry"]:  # the Bundle model does not check its entries' resources
        models[entry["resource"]["resourceType"]].model_validate(entry["resource"])
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == [
        "Encounter",
        *["EncounterHistory"] * 5,
    ]
    # As another installation would receive it: its own identifier system.
    foreign = json.loads(json.dumps(bundle).replace("urn:ietf:rfc:3986", "https://a.example/e"))
    for entry in foreign["entry"]:
        entry["resource"]["subject"] = {"reference": "Patient/Grace"}

    (copy_,) = import_fhir_encounters(foreign, definition="ED").created

    # subjectStatus told waiting, triage and treatment (all R5 in-progress) apart.
    history = EncounterTransition.objects.filter(encounter=copy_).order_by("sequence")
    assert [row.to_state for row in history] == [
        "waiting",
        "triage",
        "treatment",
        "away",
        "treatment",
    ]
    assert (
        encounter_resource(copy_, "R4", tz=BRISBANE)["statusHistory"]
        == _example(R4_EXAMPLE)["statusHistory"]
    )
    assert import_fhir_encounters(foreign, definition="ED").created == []


def test_a_move_the_definition_forbids_is_refused_and_nothing_is_written(
    ed: EncounterDefinition,
):
    example = _example(R4_EXAMPLE)
    example["statusHistory"].append(
        {"status": "arrived", "period": {"start": "2017-02-01T13:00:00+10:00"}}
    )
    example["status"] = "arrived"
    first = copy.deepcopy(_example(R4_EXAMPLE))
    first["id"] = "fine"
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": first}, {"resource": example}],
    }

    with pytest.raises(FhirImportError) as refused:
        import_fhir_encounters(bundle, definition="ED")

    error = refused.value
    assert (error.resource, error.from_state, error.to_state) == (
        "Encounter/emerg in the resource given",
        "treatment",
        "waiting",
    )
    assert "Cannot transition from 'treatment' to 'waiting'" in str(error)
    assert str(error).endswith("nothing was imported")
    assert (Encounter.all_objects.count(), EncounterTransition.objects.count()) == (0, 0)


def test_a_status_no_state_has_is_refused(ed: EncounterDefinition):
    example = _example(R4_EXAMPLE)
    example["statusHistory"][0]["status"] = "unknown"
    with pytest.raises(FhirImportError, match="no state of definition 'ED' has the status"):
        import_fhir_encounters(example, definition="ED")
    assert Encounter.all_objects.count() == 0


def test_without_a_subject_resolver_the_import_says_what_to_set(ed: EncounterDefinition, settings):
    del settings.ENCOUNTERS_FHIR_SUBJECT_RESOLVER
    with pytest.raises(FhirImportError, match="ENCOUNTERS_FHIR_SUBJECT_RESOLVER"):
        import_fhir_encounters(R4_EXAMPLE, definition="ED")


def test_the_command_imports_once_and_refuses_with_exit_status_1(ed: EncounterDefinition, tmp_path):
    out: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            out.append(text)

        def flush(self) -> None:
            pass

    call_command("import_fhir_encounters", str(R4_EXAMPLE), "--definition", "ED", stdout=Out())
    call_command("import_fhir_encounters", str(R4_EXAMPLE), "--definition", "ED", stdout=Out())
    assert out[0].startswith("1 encounter imported, 0 resources skipped")
    assert out[1].startswith("0 encounters imported, 1 resource skipped")
    assert Encounter.objects.count() == 1

    bad = _example(R4_EXAMPLE)
    bad["id"] = "other"
    bad["statusHistory"][1]["status"] = "finished"  # waiting -> discharged is not allowed
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CommandError) as refused:
        call_command("import_fhir_encounters", str(path), "--definition", "ED")
    assert refused.value.returncode == 1
    assert "Encounter/other" in str(refused.value)
    assert Encounter.objects.count() == 1

    with pytest.raises(CommandError) as unknown:
        call_command("import_fhir_encounters", str(path), "--definition", "NOPE")
    assert unknown.value.returncode == 2


# -- the export: whole resources, bundles ------------------------------------------------------


def test_the_r4_bundle_is_a_transaction_of_conditional_updates(ed: EncounterDefinition):
    (encounter,) = import_fhir_encounters(R4_EXAMPLE, definition="ED").created

    bundle = encounter_bundle([encounter], "R4", tz=BRISBANE)

    R4BBundle.model_validate(bundle)
    (entry,) = bundle["entry"]
    assert bundle["type"] == "transaction"
    assert entry["fullUrl"] == f"urn:uuid:{encounter.pk}"
    assert entry["request"] == {
        "method": "PUT",
        "url": f"Encounter?identifier=urn:ietf:rfc:3986|urn:uuid:{encounter.pk}",
    }
    assert "id" not in entry["resource"]  # the server keeps its own id
    R4BEncounter.model_validate(entry["resource"])
    assert encounter_bundle([encounter], "R4", tz=BRISBANE) == bundle  # the same every time


def test_the_identifier_system_is_a_setting(ed: EncounterDefinition, settings: Any):
    settings.ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM = "https://hospital.example/encounter-id"
    (encounter,) = import_fhir_encounters(R4_EXAMPLE, definition="ED").created

    resource = encounter_resource(encounter, "R4")
    bundle = encounter_bundle([encounter], "R5")

    assert resource["identifier"][0] == {
        "system": "https://hospital.example/encounter-id",
        "value": str(encounter.pk),
    }
    urls = [entry["request"]["url"] for entry in bundle["entry"]]
    assert urls[0] == f"Encounter?identifier=https://hospital.example/encounter-id|{encounter.pk}"
    assert all(url.startswith("EncounterHistory?identifier=https://") for url in urls[1:])
    assert len(set(urls)) == len(urls) == 6  # one Encounter, five EncounterHistory


def test_every_exported_code_is_in_its_value_set(ed: EncounterDefinition):
    (encounter,) = import_fhir_encounters(R4_EXAMPLE, definition="ED").created
    r4 = encounter_resource(encounter, "R4")
    r5 = encounter_bundle([encounter], "R5")
    assert {h["status"] for h in r4["statusHistory"]} <= set(R4_ENCOUNTER_STATUSES)
    assert {e["resource"]["status"] for e in r5["entry"]} <= set(R5_ENCOUNTER_STATUSES)


def test_an_ended_encounter_has_a_closed_period(ed: EncounterDefinition):
    (encounter,) = import_fhir_encounters(R4_EXAMPLE, definition="ED").created
    from django_encounters import transition

    transition(encounter, "discharged", effective_at=datetime(2017, 2, 2, 9, tzinfo=BRISBANE))

    resource = encounter_resource(encounter, "R4", tz=BRISBANE)

    assert resource["status"] == "finished"
    assert resource["period"] == {
        "start": "2017-02-01T07:15:00+10:00",
        "end": "2017-02-02T09:00:00+10:00",
    }


@pytest.mark.parametrize(
    "value, message",
    [
        ([], "must be a dict"),
        ({"ED": {"R3": {}}}, "unknown keys"),
        ({"ED": {"R4": {"booked": 3}}}, "must map state names to codes"),
        ({"ED": {"class": "EMER"}}, "must be a Coding"),
        ({"ED": {"subject_type": "Patient/1"}}, "FHIR resource type"),
    ],
)
def test_a_malformed_status_map_setting_is_refused(settings: Any, value: Any, message: str):
    from django_encounters import conf
    from django_encounters.exceptions import EncounterConfigurationError

    settings.ENCOUNTERS_FHIR_STATUS_MAPS = value
    with pytest.raises(EncounterConfigurationError, match=message):
        conf.fhir_status_maps()


def test_what_cannot_be_read_or_resolved_is_refused_typed(ed: EncounterDefinition, tmp_path):
    def failing(reference: dict[str, Any], definition: Any) -> Any:
        return Patient.objects.get(name="nobody")

    with pytest.raises(FhirImportError, match="the subject resolver failed") as failed:
        import_fhir_encounters(R4_EXAMPLE, definition="ED", resolve_subject=failing)
    assert isinstance(failed.value.__cause__, Patient.DoesNotExist)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run_command("import_fhir_encounters", str(broken), "--definition", "ED")
    assert code == 1 and "not JSON" in err
    code, _, err = run_command(
        "import_fhir_encounters", str(tmp_path / "missing.json"), "--definition", "ED"
    )
    assert code == 1 and "cannot read it" in err

    ed.delete()  # soft-deleted: no new encounters follow it
    code, _, err = run_command("import_fhir_encounters", str(R4_EXAMPLE), "--definition", "ED")
    assert code == 2 and "no encounter definition has the code 'ED'" in err
    assert Encounter.all_objects.count() == 0


def test_a_malformed_fhir_setting_is_a_system_check_error(settings: Any):
    from django_encounters.checks import check_settings

    settings.ENCOUNTERS_FHIR_STATUS_MAPS = {"ED": {"R4": ["planned"]}}
    settings.ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM = "not a uri"
    errors = check_settings(None)
    assert sorted((e.id, e.obj) for e in errors) == [
        ("django_encounters.E007", "ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM"),
        ("django_encounters.E007", "ENCOUNTERS_FHIR_STATUS_MAPS"),
    ]
    settings.ENCOUNTERS_FHIR_STATUS_MAPS = STATUS_MAPS
    settings.ENCOUNTERS_FHIR_IDENTIFIER_SYSTEM = "https://hospital.example/encounter-id"
    settings.ENCOUNTERS_FHIR_SUBJECT_RESOLVER = RESOLVER
    assert check_settings(None) == []
