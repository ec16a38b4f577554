"""Acknowledgements: a reviewer records that an anomaly was examined (who, when, why); the
audit and the rebuild still list it, marked, and no longer fail on it — so monitoring signals
only what is new. Only anomalies the audit reports now can be acknowledged, and the records
are append-only. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import uuid
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction

from django_encounters.exceptions import EncounterError, EncounterNotFoundError
from django_encounters.models import AnomalyAcknowledgement, Encounter
from django_encounters.projections.acknowledgements import acknowledge_anomaly
from django_encounters.projections.audit import (
    AnomalyNotReportedError,
    acknowledge_reported_anomaly,
    audit_encounters,
)
from django_encounters.projections.checkpoints import write_checkpoint
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import create_encounter, transition
from tests.helpers import (
    delete_encounter,
    delete_rows,
    forge_projection,
    rehash_from,
    rewrite_row,
    run_command,
)

pytestmark = pytest.mark.django_db

ACKS = AnomalyAcknowledgement._meta.db_table


def audit(*args: str) -> tuple[int, str, str]:
    return run_command("audit_encounters", *args)


def acknowledge(*args: str) -> tuple[int, str, str]:
    return run_command("acknowledge_anomaly", *args)


def test_acknowledging_turns_exit_1_into_0_and_the_anomaly_stays_listed(tampered, user):
    assert audit()[0] == 1
    assert run_command("rebuild_encounter_projections", "--check")[0] == 1

    code, out, err = acknowledge(
        str(tampered.pk),
        "2",
        "hash",
        "--reason",
        "restored from backup, matches",
        "--user",
        "reception",
    )

    assert (code, err) == (0, "")
    assert out.startswith(f"acknowledged: encounter {tampered.pk} sequence 2: hash:")
    assert "(by reception at " in out and ": restored from backup, matches)" in out
    (ack,) = AnomalyAcknowledgement.objects.all()
    assert (ack.encounter_id, ack.sequence, ack.kind, ack.acknowledged_by) == (
        tampered.pk,
        2,
        "hash",
        user,
    )

    # JSON: still there, marked; counted apart.
    code, out, err = audit("--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    (anomaly,) = data["encounters"][0]["anomalies"]
    assert (anomaly["sequence"], anomaly["kind"]) == (2, "hash")
    assert anomaly["acknowledged"] == {
        "by": "reception",
        "at": anomaly["acknowledged"]["at"],
        "reason": "restored from backup, matches",
    }
    assert (data["anomaly_count"], data["acknowledged_count"]) == (0, 1)
    # Table.
    code, out, _ = audit()
    assert code == 0
    assert "ANOMALIES (1, 1 acknowledged):" in out
    assert "    sequence 2: hash: content or chain does not match the stored hash\n" in out
    assert "      acknowledged by reception at " in out
    assert out.splitlines()[-1].startswith("1 encounter(s), 3 row(s), 0 anomalies, 1 acknowledged")
    # CSV.
    code, out, _ = audit("--format", "csv")
    assert code == 0
    (flagged,) = [line for line in list(csv.reader(io.StringIO(out)))[1:] if line[-1]]
    assert flagged[3] == "2"
    assert flagged[-1].startswith("hash: content or chain does not match the stored hash")
    assert "(acknowledged by reception at " in flagged[-1]
    # Python API.
    (encounter_audit,) = audit_encounters().encounters
    (found,) = encounter_audit.anomalies
    assert encounter_audit.acknowledgement(found).by == "reception"
    assert (encounter_audit.anomaly_count, encounter_audit.acknowledged_count) == (0, 1)
    # The rebuild: exit 0, the anomaly listed as acknowledged.
    result = rebuild_projections(check=True)
    assert result.ok
    assert (result.anomaly_count, result.acknowledged_count, result.anomalies) == (0, 1, [])
    assert [(a.anomaly.sequence, a.anomaly.kind) for a in result.acknowledged] == [(2, "hash")]
    assert result.acknowledged[0].acknowledged.reason == "restored from backup, matches"
    code, out, _ = run_command("rebuild_encounter_projections", "--check")
    assert code == 0
    assert f"acknowledged: encounter {tampered.pk} sequence 2: hash:" in out
    assert "0 anomalies (1 acknowledged)" in out


def test_an_acknowledgement_covers_only_its_anomaly(tampered):
    acknowledge(str(tampered.pk), "2", "hash", "--reason", "examined")
    rewrite_row(tampered, 3, reason="edited as well")  # a new anomaly, at row 3

    code, out, err = audit("--format", "json")

    assert code == 1
    assert "1 anomaly found in the audited streams (1 acknowledged anomaly not counted)" in err
    data = json.loads(out)
    marks = [(a["sequence"], "acknowledged" in a) for a in data["encounters"][0]["anomalies"]]
    assert marks == [(2, True), (3, False)]
    assert (data["anomaly_count"], data["acknowledged_count"]) == (1, 1)
    result = rebuild_projections()
    assert not result.ok
    assert (result.anomaly_count, result.acknowledged_count) == (1, 1)
    code, _, err = run_command("rebuild_encounter_projections")
    assert code == 1 and "1 acknowledged anomaly not counted" in err


def test_only_a_reported_anomaly_can_be_acknowledged(visit_definition, patient):
    """Nobody acknowledges in advance: an anomaly the audit does not report is refused and
    nothing is recorded; when it appears later it counts."""
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in")
    transition(visit, "in_progress")

    code, out, err = acknowledge(str(visit.pk), "2", "hash", "--reason", "pre-approved")

    assert code == 2 and out == ""
    assert f"encounter {visit.pk} has no 'hash' anomaly at sequence 2 to acknowledge" in err
    assert "(its audit reports: none)" in err
    assert AnomalyAcknowledgement.objects.count() == 0
    with pytest.raises(AnomalyNotReportedError):
        acknowledge_reported_anomaly(visit.pk, 2, "hash", "pre-approved")
    rewrite_row(visit, 2, reason="edited")
    assert audit()[0] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope", "2", "hash"], "not an encounter id (a UUID): 'nope'"),
        (["{pk}", "two", "hash"], "SEQUENCE: not an integer: 'two'"),
        (["{pk}", "-1", "hash"], "sequence must be a non-negative integer, not -1"),
        (["{pk}", "2", "sabotage"], "unknown anomaly kind 'sabotage'"),
        (["{pk}", "2", "hash", "--user", "nobody"], "--user: no user has the username 'nobody'"),
        (["{pk}", "2", "hash", "--reason", "   "], "an acknowledgement needs a reason"),
        (["{pk}", "2", "hash", "--reason", "a\x00b"], "NUL"),
        (["{missing}", "2", "hash"], "no encounter has the id {missing}"),
        (["{pk}", "2", "hash", "--root", "ab"], "--root is the published root of a checkpoint"),
        (
            ["{pk}", "2", "hash", "--against", "/no/such/file"],
            "checkpoint /no/such/file: cannot read",
        ),
        (["{pk}", "3", "hash"], "has no 'hash' anomaly at sequence 3"),
    ],
)
def test_bad_acknowledgements_record_nothing(tampered, args, message):
    missing = uuid.uuid4()
    values = [a.format(pk=tampered.pk, missing=missing) for a in args]
    if "--reason" not in values:
        values += ["--reason", "examined"]

    code, out, err = acknowledge(*values)

    assert code == 2 and out == ""
    assert message.format(missing=missing) in err
    assert AnomalyAcknowledgement.objects.count() == 0


def test_acknowledgements_are_append_only(tampered):
    acknowledge(str(tampered.pk), "2", "hash", "--reason", "examined")
    ack = AnomalyAcknowledgement.objects.get()

    with pytest.raises(EncounterError):
        AnomalyAcknowledgement.objects.filter(pk=ack.pk).update(reason="nothing")
    with pytest.raises(EncounterError):
        AnomalyAcknowledgement.objects.filter(pk=ack.pk).delete()
    with pytest.raises(EncounterError):
        ack.save()
    for sql in (f"UPDATE {ACKS} SET reason = 'x'", f"DELETE FROM {ACKS}"):
        with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql)
    assert AnomalyAcknowledgement.objects.get().reason == "examined"


def test_a_second_acknowledgement_is_kept_and_the_first_is_shown(tampered, user):
    acknowledge(str(tampered.pk), "2", "hash", "--reason", "first look")
    acknowledge(str(tampered.pk), "2", "hash", "--reason", "second look", "--user", "reception")

    assert AnomalyAcknowledgement.objects.count() == 2
    (encounter_audit,) = audit_encounters().encounters
    mark = encounter_audit.acknowledgement(encounter_audit.anomalies[0])
    assert (mark.by, mark.reason) == (None, "first look")
    data = json.loads(audit("--format", "json")[1])
    assert data["encounters"][0]["anomalies"][0]["acknowledged"]["by"] is None


def test_a_truncation_acknowledged_is_still_left_untouched_by_the_rebuild(tampered):
    """Acknowledging evidence changes the exit status, never the evidence: the projection
    still says version 3."""
    delete_rows(tampered, 3)
    assert rebuild_projections().anomaly_count >= 1
    code, out, _ = acknowledge(
        str(tampered.pk), "3", "truncated", "--reason", "row 3 lost in an incident"
    )
    assert code == 0
    result = rebuild_projections()
    assert result.anomaly_count == 1  # the hash anomaly at row 2 is still open
    acknowledge(str(tampered.pk), "2", "hash", "--reason", "examined")

    assert run_command("rebuild_encounter_projections")[0] == 0
    assert Encounter.objects.get(pk=tampered.pk).version == 3
    assert run_command("audit_encounters")[0] == 0


def test_checkpoint_anomalies_can_be_acknowledged(visit_definition, patient, tmp_path):
    """``rewritten`` and ``missing`` exist only against a checkpoint: acknowledging them needs
    it (and checks them against it)."""
    visit = create_encounter(visit_definition, patient)
    transition(visit, "checked_in")
    transition(visit, "in_progress")
    doomed = create_encounter(visit_definition, patient)
    path = tmp_path / "cp.json"
    write_checkpoint(path)
    rewrite_row(visit, 1, reason="forged")
    rehash_from(visit, 1)
    forge_projection(visit)
    delete_encounter(doomed)
    assert audit()[0] == 0  # clean to the chain
    assert audit("--against", str(path))[0] == 1

    code, out, err = acknowledge(str(visit.pk), "2", "rewritten", "--reason", "known")
    assert code == 2
    assert "an anomaly found against a checkpoint needs --against FILE" in err
    code, out, err = acknowledge(str(doomed.pk), "0", "missing", "--reason", "known")
    assert code == 2
    assert "to acknowledge it is missing from a checkpoint, give --against FILE" in err
    assert AnomalyAcknowledgement.objects.count() == 0

    code, out, err = acknowledge(
        str(visit.pk), "2", "rewritten", "--reason", "forensics done", "--against", str(path)
    )
    assert (code, err) == (0, "")
    assert audit("--against", str(path))[0] == 1  # the missing encounter still counts
    code, out, err = acknowledge(
        str(doomed.pk), "0", "missing", "--reason", "deleted on request", "--against", str(path)
    )
    assert (code, err) == (0, "")

    code, out, err = audit("--against", str(path), "--format", "json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    marks = {
        (e["id"], a["kind"]): a["acknowledged"]["reason"]
        for e in data["encounters"]
        for a in e["anomalies"]
    }
    assert marks == {
        (str(visit.pk), "rewritten"): "forensics done",
        (str(doomed.pk), "missing"): "deleted on request",
    }
    assert (data["anomaly_count"], data["acknowledged_count"]) == (0, 2)


def test_the_api_checks_its_arguments_before_anything_is_read(tampered, user):
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"encounter_id": "x"}, ValueError),
        ({"sequence": True}, ValueError),
        ({"kind": "nope"}, ValueError),
        ({"reason": 5}, TypeError),
        ({"reason": ""}, ValueError),
        ({"acknowledged_by": "reception"}, TypeError),
    ]
    for change, error in cases:
        arguments: dict[str, Any] = {
            "encounter_id": tampered.pk,
            "sequence": 2,
            "kind": "hash",
            "reason": "examined",
            "acknowledged_by": user,
            **change,
        }
        with pytest.raises(error):
            acknowledge_anomaly(**arguments)
        with pytest.raises(error):
            acknowledge_reported_anomaly(**arguments)
    with pytest.raises(EncounterNotFoundError):
        acknowledge_reported_anomaly(uuid.uuid4(), 0, "missing", "gone")
    assert AnomalyAcknowledgement.objects.count() == 0
    recorded, anomaly = acknowledge_reported_anomaly(tampered.pk, 2, "hash", "examined", user)
    assert (anomaly.kind, recorded.acknowledged_by) == ("hash", user)


def test_unrelated_encounters_are_not_covered(tampered, visit_definition, patient):
    """An acknowledgement names its encounter: the same anomaly elsewhere still counts."""
    acknowledge(str(tampered.pk), "2", "hash", "--reason", "examined")
    other = create_encounter(visit_definition, patient)
    transition(other, "checked_in")
    transition(other, "in_progress")
    rewrite_row(other, 2, reason="edited")

    code, _, err = audit()

    assert code == 1 and "1 anomaly found" in err
    ids = {a.encounter_id for a in rebuild_projections().anomalies}
    assert ids == {other.pk}


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_worker_processes_count_acknowledgements_as_one_process_does(visit_definition, patient):
    visits = []
    for _ in range(6):
        visit = create_encounter(visit_definition, patient)
        transition(visit, "checked_in")
        transition(visit, "in_progress")
        visits.append(visit)
    for visit in visits[::2]:
        rewrite_row(visit, 2, reason="edited")
    for visit in visits[:3:2]:
        acknowledge_reported_anomaly(visit.pk, 2, "hash", "examined")

    one = rebuild_projections(check=True, batch_size=2)
    many = rebuild_projections(check=True, batch_size=2, jobs=3)

    assert (one.anomaly_count, one.anomalous_encounters, one.acknowledged_count) == (1, 1, 2)
    for name in (
        "anomaly_count",
        "anomalous_encounters",
        "acknowledged_count",
        "anomalies",
        "acknowledged",
    ):
        assert getattr(many, name) == getattr(one, name), name
    assert not many.ok
