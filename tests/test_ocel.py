"""Object-centric event log (OCEL 2.0 JSON, ``export_encounter_log --format ocel2-json``) read
back by pm4py (``read_ocel2_json``) with an object-centric directly-follows graph discovered from
it; and the XES lifecycle pairs (``--lifecycle``) read back by pm4py, whose service times per
activity are the times spent in the states."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from django_encounters.models import EncounterDefinition
from django_encounters.projections.event_log import export_event_log
from django_encounters.projections.output import formats
from django_encounters.services import create_encounter, transition, upgrade_encounter
from tests.helpers import run_command
from tests.testapp.models import Device, Patient

pm4py = pytest.importorskip("pm4py")

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.filterwarnings("ignore:Install the optional requirement:UserWarning"),
]

UTC = dt_timezone.utc


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def clinic(db: Any) -> dict[str, Any]:
    """Two encounters of one patient (one backdated, one upgraded to v2), one of a device,
    moved by two users."""
    definition = EncounterDefinition.objects.create(
        name="Clinic",
        code="CLINIC",
        states=["booked", "arrived", "seen", "left"],
        initial_state="booked",
        final_states=["seen", "left"],
        transitions={"booked": ["arrived", "left"], "arrived": ["seen", "left"]},
    )
    nurse = User.objects.create(username="nurse")
    doctor = User.objects.create(username="doctor")
    ada = Patient.objects.create(name="Ada")
    pump = Device.objects.create(serial="P-1")
    first = create_encounter(definition, ada)
    transition(first, "arrived", transitioned_by=nurse, effective_at=at(1, 9))
    transition(first, "seen", transitioned_by=doctor, effective_at=at(1, 11))
    second = create_encounter(definition, ada)
    transition(second, "left", transitioned_by=nurse, effective_at=at(2, 9))
    third = create_encounter(definition, pump)
    transition(third, "arrived", transitioned_by=nurse, effective_at=at(3, 8))
    definition.states = [*definition.states, "gone"]
    definition.save()  # version 2
    upgrade_encounter(third, transitioned_by=doctor, reason="new rules")
    return {
        "encounters": [first, second, third],
        "patient": ada,
        "device": pump,
        "definition": definition,
    }


def ocel_text(**selection: Any) -> str:
    out = io.StringIO()
    export_event_log("ocel2-json", out, **selection)
    return out.getvalue()


def read_ocel(text: str, tmp_path: Path) -> Any:
    path = tmp_path / "log.jsonocel"
    path.write_text(text, encoding="utf-8")
    return pm4py.read_ocel2_json(str(path))


def test_ocel2_json_is_a_registered_event_log_format():
    assert "ocel2-json" in formats("event-log")


def test_pm4py_reads_the_objects_events_and_relations(clinic: dict[str, Any], tmp_path: Path):
    ocel = read_ocel(ocel_text(), tmp_path)

    first, second, third = clinic["encounters"]
    objects = dict(zip(ocel.objects["ocel:oid"], ocel.objects["ocel:type"], strict=True))
    assert objects == {
        f"encounter:{first.pk}": "encounter",
        f"encounter:{second.pk}": "encounter",
        f"encounter:{third.pk}": "encounter",
        f"subject:testapp.patient:{clinic['patient'].pk}": "testapp.patient",
        f"subject:testapp.device:{clinic['device'].pk}": "testapp.device",
        "user:nurse": "user",
        "user:doctor": "user",
        "definition:CLINIC:v1": "definition version",
        "definition:CLINIC:v2": "definition version",
    }
    # One event per creation and per row, typed by the state entered, in business time.
    events = ocel.events.sort_values(["ocel:timestamp", "ocel:eid"])
    assert len(events) == 3 + 5
    first_events = events[events["ocel:eid"].str.startswith(str(first.pk))]
    assert list(first_events["ocel:activity"]) == ["booked", "arrived", "seen"]
    assert list(first_events["ocel:timestamp"].dt.tz_convert(UTC))[1:] == [at(1, 9), at(1, 11)]
    assert list(first_events["sequence"].astype(int)) == [0, 1, 2]
    assert first_events["transitioned_at"].notna().all()  # the recorded time, an attribute
    # Event-to-object relations, qualified.
    relations = ocel.relations
    seen = relations[relations["ocel:eid"] == f"{first.pk}:2"]
    assert dict(zip(seen["ocel:oid"], seen["ocel:qualifier"], strict=True)) == {
        f"encounter:{first.pk}": "encounter",
        f"subject:testapp.patient:{clinic['patient'].pk}": "subject",
        "user:doctor": "transitioned by",
        "definition:CLINIC:v1": "decided under",
    }
    upgrade = relations[relations["ocel:eid"] == f"{third.pk}:2"]
    assert "definition:CLINIC:v2" in set(upgrade["ocel:oid"])
    # Object-to-object: the encounter is about its subject and follows its version.
    o2o = ocel.o2o[ocel.o2o["ocel:oid"] == f"encounter:{second.pk}"]
    assert dict(zip(o2o["ocel:oid_2"], o2o["ocel:qualifier"], strict=True)) == {
        f"subject:testapp.patient:{clinic['patient'].pk}": "about",
        "definition:CLINIC:v1": "follows",
    }


def test_the_object_centric_dfg_has_the_edges_the_rows_took(clinic: dict[str, Any], tmp_path: Path):
    ocel = read_ocel(ocel_text(), tmp_path)

    ocdfg = pm4py.discover_ocdfg(ocel)

    assert set(ocdfg["activities"]) == {"booked", "arrived", "seen", "left"}
    encounter_edges = set(ocdfg["edges"]["event_couples"]["encounter"])
    assert encounter_edges == {
        ("booked", "arrived"),
        ("arrived", "seen"),
        ("booked", "left"),
        ("arrived", "arrived"),  # the upgrade row keeps the state
    }
    # The patient's two encounters follow each other on the patient's lifeline.
    assert set(ocdfg["edges"]["event_couples"]["testapp.patient"]) == {
        ("booked", "arrived"),
        ("arrived", "seen"),
        ("seen", "booked"),
        ("booked", "left"),
    }
    assert set(ocdfg["edges"]["event_couples"]["user"]) >= {("arrived", "left")}


def test_the_ocel_state_attribute_changes_at_each_event(clinic: dict[str, Any]):
    document = json.loads(ocel_text())
    first = clinic["encounters"][0]
    (encounter,) = [o for o in document["objects"] if o["id"] == f"encounter:{first.pk}"]
    states = [(a["value"], a.get("time")) for a in encounter["attributes"] if a["name"] == "state"]
    assert [value for value, _ in states] == ["booked", "arrived", "seen"]
    assert states[1][1] == "2024-03-01T09:00:00.000000+00:00"


def test_the_command_writes_ocel_and_refuses_lifecycle_for_it(
    clinic: dict[str, Any], tmp_path: Path
):
    path = tmp_path / "log.jsonocel"
    code, _, err = run_command(
        "export_encounter_log", "--format", "ocel2-json", "--output", str(path)
    )
    assert (code, err) == (0, f"3 traces, 8 events written to {path}\n")
    assert len(pm4py.read_ocel2_json(str(path)).events) == 8

    code, out, err = run_command("export_encounter_log", "--format", "ocel2-json", "--lifecycle")
    assert (code, out) == (2, "")
    assert "lifecycle start/complete pairs are written in xes and csv only" in err


def test_an_empty_log_is_valid_ocel(db: Any, tmp_path: Path):
    document = json.loads(ocel_text())
    assert document["events"] == [] and document["objects"] == []


# -- XES lifecycle pairs -------------------------------------------------------------------


def test_lifecycle_pairs_put_the_time_in_each_state_in_the_log(
    clinic: dict[str, Any], tmp_path: Path
):
    first = clinic["encounters"][0]
    path = tmp_path / "lifecycle.xes"
    export_event_log("xes", path, lifecycle=True)

    frame = pm4py.read_xes(str(path))
    trace = frame[frame["case:concept:name"] == str(first.pk)]
    assert list(zip(trace["concept:name"], trace["lifecycle:transition"], strict=True)) == [
        ("booked", "start"),
        ("booked", "complete"),
        ("arrived", "start"),
        ("arrived", "complete"),
        ("seen", "start"),
    ]
    # pm4py pairs each start with its complete: the time spent in "arrived" is 2 hours.
    from pm4py.objects.log.util import interval_lifecycle

    intervals = interval_lifecycle.to_interval(pm4py.convert_to_event_log(trace))
    (case,) = intervals
    arrived = [e for e in case if e["concept:name"] == "arrived"]
    assert len(arrived) == 1
    assert arrived[0]["time:timestamp"] - arrived[0]["start_timestamp"] == timedelta(hours=2)


def test_without_lifecycle_every_event_is_complete(clinic: dict[str, Any], tmp_path: Path):
    path = tmp_path / "plain.xes"
    export_event_log("xes", path)
    frame = pm4py.read_xes(str(path))
    assert set(frame["lifecycle:transition"]) == {"complete"}
    assert len(frame) == 8


def test_lifecycle_logs_stay_valid_xes_and_csv(clinic: dict[str, Any], tmp_path: Path):
    import csv

    etree = pytest.importorskip("lxml.etree")
    xsd = Path(__file__).resolve().parent / "data" / "xes-ieee-1849-2016.xsd"
    xes = io.StringIO()
    counts = export_event_log("xes", xes, lifecycle=True)
    schema = etree.XMLSchema(etree.parse(str(xsd)))
    assert schema.validate(etree.fromstring(xes.getvalue().encode("utf-8"))), schema.error_log
    # Per encounter: one start per stay, one complete per stay that was left.
    assert (counts.traces, counts.events) == (3, 2 * 8 - 3)

    text = io.StringIO(newline="")
    export_event_log("csv", text, lifecycle=True)
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    second = str(clinic["encounters"][1].pk)
    assert [
        (r["concept:name"], r["lifecycle:transition"], r["org:resource"])
        for r in rows
        if r["case:concept:name"] == second
    ] == [("booked", "start", ""), ("booked", "complete", "nurse"), ("left", "start", "nurse")]
