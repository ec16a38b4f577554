"""Audit replay: the ``audit_encounters`` command and its Python API — timelines
with backdated/overtaken rows, state as of / as known at, selection, table/CSV/JSON output,
exit codes — and tamper evidence: rows altered behind the triggers are named by
(encounter, sequence)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_encounters.engine import Genesis, StreamRow, genesis_hash, row_hash
from django_encounters.exceptions import EncounterError
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.audit import AuditReport, audit_encounters, iter_audit
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.projections.rendering import CSV_HEADER
from django_encounters.services import create_encounter, get_state_at, transition
from tests.helpers import (
    delete_rows,
    recording_moment,
    reference_genesis_hash,
    reference_row_hash,
    rewrite_row,
    run_command,
    version_hash_of,
)

TABLE = EncounterTransition._meta.db_table
PLUS10 = dt_timezone(timedelta(hours=10))

pytestmark = pytest.mark.django_db


def t(month: int, day: int, hour: int = 9) -> datetime:
    return datetime(2017, month, day, hour, tzinfo=PLUS10)


def run(*args: str) -> tuple[int, str, str]:
    return run_command("audit_encounters", *args)


@pytest.fixture
def office(employment_definition, visit_definition, patient, device, user, other_user):
    """An employment whose history was entered late (row 3 backdated, overtaking row 2), a
    visit seen through, and a visit that never moved."""
    job = create_encounter(employment_definition, patient)
    transition(job, "working", transitioned_by=user, reason="first day", effective_at=t(1, 2))
    transition(
        job, "finished", transitioned_by=other_user, reason="contract ended", effective_at=t(3, 1)
    )
    # Recorded after row 2, before row 3 (issue 8: system time is stored at millisecond
    # precision and strictly increases per stream, so not a bare timezone.now()).
    between = recording_moment()
    transition(
        job, "onleave", transitioned_by=user, reason="late entry:\nsick leave", effective_at=t(2, 1)
    )
    visit = create_encounter(visit_definition, device)
    for state in ("checked_in", "in_progress", "completed"):
        transition(visit, state, transitioned_by=other_user)
    idle = create_encounter(visit_definition, patient)
    return {"job": job, "visit": visit, "idle": idle, "between": between}


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


def test_timeline_in_business_time_with_backdated_and_overtaken_rows(office):
    job = office["job"]

    (audit,) = audit_encounters(encounters=[job.pk]).encounters

    assert audit.id == job.pk and audit.definition == "EMPLOYMENT"
    assert [row.sequence for row in audit.timeline] == [1, 3, 2]
    first, backdated, overtaken = audit.timeline
    assert (first.from_state, first.to_state) == ("hired", "working")
    assert (first.transitioned_by, first.reason) == ("reception", "first day")
    assert first.effective_at == t(1, 2)
    assert (backdated.backdated, backdated.overtaken) == (True, False)
    assert (overtaken.backdated, overtaken.overtaken, overtaken.overtaken_by) == (False, True, 3)
    assert overtaken.transitioned_by == "doctor"
    # Overtaken, not anomalous: row 2 kept the from_state it was recorded with.
    assert overtaken.from_state == "working"
    assert audit.anomalies == []
    assert audit.state_as_of == "finished"


def test_state_as_of_and_as_known_at(office):
    job, between = office["job"], office["between"]

    def state(**kwargs):
        (audit,) = audit_encounters(encounters=[job.pk], **kwargs).encounters
        return audit.state_as_of

    assert state(as_of=t(1, 1)) == "hired"  # before the first row: the origin state
    assert state(as_of=t(1, 2)) == "working"
    assert state(as_of=t(2, 15)) == "onleave"  # the backdated row, known now
    assert state(as_of=t(2, 15), known_at=between) == "working"  # not known yet then
    assert state(as_of=t(3, 2), known_at=between) == "finished"
    for as_of in (t(1, 1), t(2, 1), t(2, 15), t(3, 1), timezone.now()):
        for known_at in (None, between, timezone.now()):
            assert state(as_of=as_of, known_at=known_at) == get_state_at(
                job, as_of, known_at=known_at
            )


def test_every_selected_encounter_is_reported_in_creation_order(office):
    report = audit_encounters()

    assert isinstance(report, AuditReport)
    assert [a.id for a in report.encounters] == [
        office["job"].pk,
        office["visit"].pk,
        office["idle"].pk,
    ]
    idle = report.encounters[2]
    assert (idle.timeline, idle.anomalies, idle.state_as_of) == ([], [], "scheduled")
    assert report.anomaly_count == 0
    assert [r.transitioned_by for r in report.encounters[1].timeline] == ["doctor"] * 3


@pytest.mark.parametrize("batch_size", [1, 2, 500])
def test_batches_do_not_change_the_report(office, batch_size):
    as_of = timezone.now()
    reference = [a.as_dict() for a in iter_audit(as_of=as_of)]

    assert [a.as_dict() for a in iter_audit(as_of=as_of, batch_size=batch_size)] == reference


def test_selection_by_definition_encounter_and_subject(office, patient, device):
    def ids(**kwargs):
        return [a.id for a in iter_audit(**kwargs)]

    assert ids(definition="EMPLOYMENT") == [office["job"].pk]
    assert ids(definition="VISIT") == [office["visit"].pk, office["idle"].pk]
    assert ids(encounters=[str(office["idle"].pk), office["job"].pk.hex]) == [
        office["job"].pk,
        office["idle"].pk,
    ]
    assert ids(subject=patient) == [office["job"].pk, office["idle"].pk]
    assert ids(subject=device) == [office["visit"].pk]
    assert ids(subject=device, definition="EMPLOYMENT") == []


def test_since_until_select_by_effective_time_half_open(office):
    job = office["job"]

    def ids(**kwargs):
        return [a.id for a in iter_audit(**kwargs)]

    assert ids(since=t(2, 1), until=t(2, 1) + timedelta(microseconds=1)) == [job.pk]  # [since
    assert ids(since=t(1, 3), until=t(2, 1)) == []  # until) is exclusive
    assert ids(until=t(1, 3)) == [job.pk]
    assert ids(since=t(3, 2)) == [office["visit"].pk]  # rows effective now
    # Selected encounters are reported whole, not only their rows in the period.
    (audit,) = iter_audit(since=t(2, 1), until=t(2, 2))
    assert len(audit.timeline) == 3


def test_soft_deleted_encounters_are_audited(office):
    office["visit"].delete()

    audits = {a.id: a for a in iter_audit()}

    assert audits[office["visit"].pk].deleted
    assert len(audits[office["visit"].pk].timeline) == 3
    code, out, _ = run("--encounter", str(office["visit"].pk))
    assert code == 0 and "(soft-deleted)" in out


def test_api_refuses_bad_arguments(office):
    with pytest.raises(ValueError, match="naive"):
        list(iter_audit(as_of=datetime(2017, 1, 1)))
    with pytest.raises(ValueError, match="must be before"):
        list(iter_audit(since=t(2, 1), until=t(1, 1)))
    with pytest.raises(EncounterError, match="no encounter definition"):
        list(iter_audit(definition="NOPE"))
    with pytest.raises(ValueError, match="not an encounter id"):
        list(iter_audit(encounters=["nope"]))


# ---------------------------------------------------------------------------------------------
# The command: formats, options, exit codes
# ---------------------------------------------------------------------------------------------


def test_json_output_has_the_pinned_shape(office):
    code, out, _ = run("--format", "json", "--as-of", "2017-02-15T00:00:00Z")

    assert code == 0
    data = json.loads(out)
    # Issue 8: anomalies can be acknowledged; the report counts those apart. Issue 19: the
    # first key says whether seals were checked.
    assert set(data) == {"seals", "encounters", "anomaly_count", "acknowledged_count"}
    assert list(data)[0] == "seals"
    assert data["seals"] == "not checked (ENCOUNTERS_SEAL_KEYS is not set)"
    assert data["anomaly_count"] == 0
    assert data["acknowledged_count"] == 0
    job = data["encounters"][0]
    assert set(job) == {"id", "definition", "state_as_of", "timeline", "anomalies"}
    assert (job["id"], job["definition"], job["state_as_of"]) == (
        str(office["job"].pk),
        "EMPLOYMENT",
        "onleave",
    )
    assert [set(row) for row in job["timeline"]] == [
        {
            "sequence",
            "from_state",
            "to_state",
            "effective_at",
            "transitioned_at",
            "transitioned_by",
            "reason",
            "backdated",
            "overtaken",
        }
    ] * 3
    backdated = job["timeline"][1]
    assert backdated == {
        "sequence": 3,
        "from_state": "working",
        "to_state": "onleave",
        "effective_at": "2017-01-31T23:00:00+00:00",
        "transitioned_at": backdated["transitioned_at"],
        "transitioned_by": "reception",
        "reason": "late entry:\nsick leave",
        "backdated": True,
        "overtaken": False,
    }
    assert datetime.fromisoformat(backdated["transitioned_at"]).tzinfo is not None
    assert job["timeline"][2]["overtaken"] is True
    assert job["anomalies"] == []
    assert data["encounters"][2]["timeline"] == []  # the idle visit
    assert data["encounters"][2]["state_as_of"] == "scheduled"


def test_csv_output_has_one_line_per_timeline_row(office):
    code, out, _ = run("--format", "csv")

    assert code == 0
    lines = list(csv.reader(io.StringIO(out)))
    assert lines[0] == CSV_HEADER
    assert len(lines) == 1 + 3 + 3  # header, the job's rows, the visit's rows
    records = [dict(zip(CSV_HEADER, line, strict=True)) for line in lines[1:]]
    by_sequence = {(r["encounter_id"], r["sequence"]): r for r in records}
    row = by_sequence[(str(office["job"].pk), "3")]
    assert row["reason"] == "late entry:\nsick leave"  # quoted, not split
    assert (row["backdated"], row["overtaken"], row["anomalies"]) == ("true", "false", "")
    assert row["effective_at"] == "2017-01-31T23:00:00+00:00"


def test_table_output_is_readable(office):
    code, out, _ = run("--as-of", "2017-02-15T10:00:00+10:00", "--definition", "EMPLOYMENT")

    assert code == 0
    assert f"Encounter {office['job'].pk}  [EMPLOYMENT]" in out
    assert "state as of 2017-02-15T00:00:00+00:00: onleave" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("seq"))
    assert header.split() == [
        "seq",
        "effective_at",
        "recorded_at",
        "from",
        "->",
        "to",
        "by",
        "reason",
        "notes",
    ]
    rows = [line.split() for line in lines if line.startswith("  ") and line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "3", "2"]
    assert "backdated" in rows[1]
    assert rows[2][-3:] == ["overtaken", "by", "3"]
    assert "late entry: sick leave" in out  # one line per row
    assert lines[-1] == (
        "1 encounter(s), 3 row(s), 0 anomalies (states as of 2017-02-15T00:00:00+00:00)"
    )


def test_known_at_option(office):
    between = office["between"].isoformat()
    code, out, _ = run(
        "--as-of",
        "2017-02-15T00:00:00Z",
        "--known-at",
        between,
        "--encounter",
        str(office["job"].pk),
        "--format",
        "json",
    )

    assert code == 0
    assert json.loads(out)["encounters"][0]["state_as_of"] == "working"


def test_output_file(office, tmp_path):
    for fmt in ("table", "csv", "json"):
        target = tmp_path / f"audit.{fmt}"
        code, out, err = run(
            "--format", fmt, "--output", str(target), "--as-of", "2017-06-01T00:00:00Z"
        )
        assert code == 0
        assert out == ""
        assert f"audit written to {target}" in err
        with open(target, encoding="utf-8", newline="") as written:  # CSV keeps its \r\n
            assert run("--format", fmt, "--as-of", "2017-06-01T00:00:00Z")[1] == written.read()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--as-of", "2017-02-15T00:00:00"], "--as-of: '2017-02-15T00:00:00' has no UTC offset"),
        (["--since", "2017-02-15"], "--since: '2017-02-15' has no UTC offset"),
        (["--known-at", "yesterday"], "--known-at: not an ISO-8601 date-time: 'yesterday'"),
        (["--until", "2017-13-45T00:00:00Z"], "--until: not an ISO-8601 date-time"),
        (
            ["--since", "2017-02-02T00:00Z", "--until", "2017-02-01T00:00Z"],
            "--since must be before --until",
        ),
        (["--definition", "NOPE"], "no encounter definition has the code 'NOPE'"),
        (["--encounter", "12"], "not an encounter id (a UUID): '12'"),
        (["--subject", "testapp.Patient"], "expected app_label.ModelName:pk"),
        (["--subject", "testapp.Nope:1"], "--subject:"),
        (["--subject", "testapp.Patient:999999"], "no testapp.Patient with pk '999999'"),
        (["--output", "/nonexistent/dir/audit.txt"], "--output: cannot write"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(office, args, message):
    for fmt in ("table", "json"):
        code, out, err = run(*args, "--format", fmt)

        assert code == 2
        assert message in err
        assert out == ""  # refused before anything is written


def test_times_accept_z_and_offsets(office):
    for value in (
        "2017-02-15T00:00:00Z",
        "2017-02-15T10:00:00+10:00",
        "2017-02-15T00:00Z",
        "2017-02-14T19:00:00.000000-05:00",
    ):
        code, out, _ = run("--as-of", value, "--definition", "EMPLOYMENT", "--format", "json")
        assert code == 0
        assert json.loads(out)["encounters"][0]["state_as_of"] == "onleave"


def test_subject_option(office, device):
    code, out, _ = run("--subject", f"testapp.Device:{device.pk}", "--format", "json")

    assert code == 0
    assert [e["id"] for e in json.loads(out)["encounters"]] == [str(office["visit"].pk)]


# ---------------------------------------------------------------------------------------------
# Tamper evidence: rows altered behind the triggers' back
# ---------------------------------------------------------------------------------------------


def _row(encounter, sequence):
    return EncounterTransition.objects.get(encounter=encounter, sequence=sequence)


def _anomalies(encounter):
    (audit,) = iter_audit(encounters=[encounter.pk])
    return [(a.sequence, a.kind) for a in audit.anomalies]


def test_the_triggers_really_are_in_the_way(office):
    with pytest.raises(IntegrityError, match="append-only"):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"UPDATE {TABLE} SET reason = 'x'")


def test_altered_row_is_named_by_encounter_and_sequence(office):
    job = office["job"]
    rewrite_row(job, 2, reason="resigned")  # was "contract ended"

    assert _anomalies(job) == [(2, "hash")]
    assert _anomalies(office["visit"]) == []

    code, out, err = run("--format", "json")
    assert code == 1
    assert "1 anomaly found" in err
    data = json.loads(out)
    assert data["anomaly_count"] == 1
    (tampered,) = [e for e in data["encounters"] if e["anomalies"]]
    assert tampered["id"] == str(job.pk)
    # Issue 19: each anomaly names its evidence — the stored hash, then what the content
    # hashes to now.
    stored = EncounterTransition.objects.get(encounter=job, sequence=2).hash
    (found,) = tampered["anomalies"]
    assert found == {
        "sequence": 2,
        "kind": "hash",
        "detail": "content or chain does not match the stored hash",
        "evidence": found["evidence"],
    }
    assert found["evidence"].startswith(f"{stored} v") and len(found["evidence"]) > len(stored) + 5
    code, out, _ = run()
    assert code == 1
    assert "ANOMALIES (1):\n    sequence 2: hash:" in out
    code, out, _ = run("--format", "csv")
    assert code == 1
    flagged = [line for line in list(csv.reader(io.StringIO(out)))[1:] if line[-1]]
    assert [(line[0], line[3]) for line in flagged] == [(str(job.pk), "2")]
    # The rebuild verifies the same way (and cannot repair it).
    result = rebuild_projections()
    assert [(a.encounter_id, a.sequence, a.kind) for a in result.anomalies] == [(job.pk, 2, "hash")]


def test_rehashed_row_breaks_the_chain_at_the_next_row(office):
    """An attacker who also recomputes the altered row's own hash is caught by the next row,
    whose hash covers the previous row's hash."""
    visit = office["visit"]
    row, previous = _row(visit, 2), _row(visit, 1)
    forged_row = StreamRow(
        sequence=2,
        from_state=row.from_state,
        to_state=row.to_state,
        effective_at=row.effective_at,
        transitioned_at=row.transitioned_at,
        transitioned_by=None,
        reason="nobody did this",
        metadata=row.metadata,
        definition_version=row.definition_version,  # issue 8: hashed too
        hash="",
    )
    forged = row_hash(visit.pk, forged_row, previous.hash, version_hash_of(visit))
    rewrite_row(
        visit,
        2,
        transitioned_by=None,
        transitioned_by_name="",
        reason="nobody did this",
        hash=forged,
    )

    assert _anomalies(visit) == [(3, "hash")]


def test_deleted_row_leaves_a_gap(office):
    visit = office["visit"]
    delete_rows(visit, 2)

    found = _anomalies(visit)
    assert (3, "gap") in found
    assert (3, "hash") in found  # chained to the missing row
    assert (3, "from_state") in found  # 'checked_in' was never reached in what is left
    assert run()[0] == 1


def test_changed_state_is_caught_by_hash_and_by_the_state_machine(office):
    visit = office["visit"]
    rewrite_row(visit, 2, to_state="cancelled")

    found = _anomalies(visit)
    assert found[0] == (2, "hash")
    assert (3, "from_state") in found and (3, "edge") not in found  # row 3 says in_progress
    # Projections are left as they are by the audit: it reads, it never writes.
    assert Encounter.objects.get(pk=visit.pk).state == "completed"


def test_clean_store_exits_0(office):
    code, out, err = run()

    assert code == 0
    assert "0 anomalies" in out
    assert err == ""


# ---------------------------------------------------------------------------------------------
# row_hash is the documented v2 layout (an independent re-implementation in tests.helpers)
# ---------------------------------------------------------------------------------------------


def _reference_hash(**kw) -> str:
    """The formula, as documented (format v2), in ``tests.helpers.reference_row_hash``."""
    return reference_row_hash(**kw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
_aware = st.datetimes(
    min_value=datetime(1900, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [dt_timezone.utc, PLUS10, dt_timezone(timedelta(hours=-5, minutes=-30))]
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encounter_id=st.uuids() | st.text(max_size=40),
    sequence=st.integers(min_value=1, max_value=10**9),
    from_state=st.text(max_size=20),
    to_state=st.text(max_size=20),
    effective_at=_aware,
    transitioned_at=_aware,
    transitioned_by=st.none() | st.integers(min_value=1) | st.text(max_size=10),
    reason=st.none() | st.text(max_size=50),
    metadata=st.none() | st.dictionaries(st.text(max_size=8), _json, max_size=4) | _json,
    definition_version=st.integers(min_value=0, max_value=2**31 - 1),
    previous_hash=st.none()
    | st.text(alphabet="0123456789abcdef", min_size=0, max_size=64)
    | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map("v2:".__add__),
)
def test_row_hash_matches_the_reference_payload(**kw):
    content = {k: v for k, v in kw.items() if k not in ("encounter_id", "previous_hash")}
    row = StreamRow(**content, hash="")
    assert row_hash(kw["encounter_id"], row, kw["previous_hash"]) == _reference_hash(**kw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encounter_id=st.uuids(),
    definition_id=st.uuids() | st.integers(min_value=1),
    definition_version=st.integers(min_value=1, max_value=2**31 - 1),
    subject_type=st.text(max_size=30),
    subject_id=st.text(max_size=30),
    origin_state=st.text(max_size=20),
    created_at=_aware,
)
def test_genesis_hash_matches_the_reference_payload(**kw):
    assert genesis_hash(Genesis(**kw)) == reference_genesis_hash(**kw)


def test_transition_refuses_to_backdate_into_a_stream_with_a_gap(visit_definition, patient):
    """A deleted row (triggers disabled) leaves a gap: a backdated transition, which must
    replay the stream, refuses with a typed error naming the encounter; nothing written."""
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", effective_at=timezone.now() - timedelta(hours=3))
    transition(encounter, "cancelled", effective_at=timezone.now() - timedelta(hours=1))
    delete_rows(encounter, 1)
    before = list(EncounterTransition.objects.filter(encounter=encounter).values_list("sequence"))

    with pytest.raises(EncounterError, match="sequence gap") as excinfo:
        transition(encounter, "cancelled", effective_at=timezone.now() - timedelta(hours=2))

    assert str(encounter.pk) in str(excinfo.value)
    after = list(EncounterTransition.objects.filter(encounter=encounter).values_list("sequence"))
    assert before == after == [(2,)]
