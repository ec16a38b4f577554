"""Event-log export (XES and CSV) for process-mining tools: ``manage.py export_encounter_log``
and ``projections.event_log``. Both outputs are read back with pm4py, whose directly-follows
graph must be exactly the edges the rows took; the XES is validated against the IEEE 1849-2016
schema (``tests/data/xes-ieee-1849-2016.xsd``). Also: backdated rows in business-time order
with their marks, ``known_at``, ``since``/``until``, escaping (XML and spreadsheet formulas),
the command's file output and every error path (nothing written)."""

from __future__ import annotations

import csv
import io
import os
import stat
from collections import Counter
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path

import pytest
from django.utils import timezone

from django_encounters.exceptions import (
    DefinitionNotFoundError,
    EventLogWriteError,
    UnknownFormatError,
)
from django_encounters.models import EncounterTransition
from django_encounters.projections.event_log import (
    CSV_COLUMNS,
    EventLogCounts,
    export_event_log,
    iter_traces,
    write_csv,
    write_xes,
)
from django_encounters.services import create_encounter, transition
from tests.helpers import recording_moment, run_command

etree = pytest.importorskip("lxml.etree")
pm4py = pytest.importorskip("pm4py")

pytestmark = [
    pytest.mark.django_db,
    # pm4py suggests a faster optional XES reader (r4pm) on every read.
    pytest.mark.filterwarnings("ignore:Install the optional requirement:UserWarning"),
]

XSD = Path(__file__).resolve().parent / "data" / "xes-ieee-1849-2016.xsd"
UTC = dt_timezone.utc
PLUS10 = dt_timezone(timedelta(hours=10))


def t(month: int, day: int, hour: int = 9) -> datetime:
    return datetime(2017, month, day, hour, tzinfo=PLUS10)


def stamp(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def xes_text(**selection) -> str:
    out = io.StringIO()
    write_xes(out, **selection)
    return out.getvalue()


def csv_text(**selection) -> str:
    out = io.StringIO(newline="")
    write_csv(out, **selection)
    return out.getvalue()


def schema_errors(text: str) -> list[str]:
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    document = etree.fromstring(text.encode("utf-8"))
    schema.validate(document)
    return [str(error) for error in schema.error_log]


def parsed(text: str) -> list[dict]:
    """The XES as [{"attributes": {key: (tag, value)}, "events": [{key: (tag, value)}]}]."""

    def attributes(element) -> dict:
        return {
            child.get("key"): (child.tag, child.get("value"))
            for child in element
            if child.tag not in ("event", "trace")
        }

    root = etree.fromstring(text.encode("utf-8"))
    return [
        {"attributes": attributes(trace), "events": [attributes(e) for e in trace.iter("event")]}
        for trace in root.iter("trace")
    ]


def read_xes(text: str, tmp_path: Path):
    path = tmp_path / "log.xes"
    path.write_text(text, encoding="utf-8")
    return pm4py.read_xes(str(path))


def read_csv(text: str):
    import pandas as pd

    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return pm4py.format_dataframe(frame)


def row_edges(encounters) -> Counter:
    """The edges the rows took, counted from the rows (from_state -> to_state)."""
    return Counter(
        EncounterTransition.objects.filter(encounter__in=encounters).values_list(
            "from_state", "to_state"
        )
    )


def dfg_of(frame) -> Counter:
    dfg, _start, _end = pm4py.discover_dfg(frame)
    return Counter(dict(dfg))


@pytest.fixture
def clinic(visit_definition, patient, device, user, other_user):
    """Five visits along every path of the visit definition (one never moved)."""
    paths = [
        ["checked_in", "in_progress", "completed"],
        ["checked_in", "in_progress", "completed"],
        ["checked_in", "cancelled"],
        ["cancelled"],
        [],
    ]
    visits = []
    for index, path in enumerate(paths):
        visit = create_encounter(visit_definition, patient if index % 2 else device)
        for state in path:
            transition(visit, state, transitioned_by=other_user if state != "checked_in" else user)
        visits.append(visit)
    return visits


@pytest.fixture
def office(employment_definition, visit_definition, patient, device, user, other_user):
    """An employment whose history was entered late (row 3 backdated, overtaking row 2), with
    the moment between its rows 2 and 3 being recorded, then a visit created after that."""
    job = create_encounter(employment_definition, patient)
    transition(job, "working", transitioned_by=user, reason="first day", effective_at=t(1, 2))
    transition(job, "finished", transitioned_by=other_user, reason="ended", effective_at=t(3, 1))
    between = recording_moment()
    transition(job, "onleave", transitioned_by=user, reason="late entry", effective_at=t(2, 1))
    visit = create_encounter(visit_definition, device)
    transition(visit, "checked_in", transitioned_by=user)
    return {"job": job, "visit": visit, "between": between}


# ---------------------------------------------------------------------------------------------
# The specification's usage example
# ---------------------------------------------------------------------------------------------


def test_the_specification_visit_as_xes_valid_and_read_by_pm4py(
    visit_definition_with_validators, patient, user, other_user, tmp_path
):
    """SPEC.md's usage example: scheduled -> checked_in -> in_progress -> completed."""
    encounter = create_encounter(visit_definition_with_validators, patient, created_by=user)
    transition(encounter, "checked_in", transitioned_by=user)
    encounter.started_at = timezone.now()
    encounter.save()
    transition(encounter, "in_progress", transitioned_by=other_user)
    encounter.ended_at = timezone.now()
    encounter.save()
    transition(encounter, "completed", transitioned_by=other_user, reason="Visit concluded")
    rows = list(EncounterTransition.objects.filter(encounter=encounter).order_by("sequence"))

    text = xes_text()

    assert schema_errors(text) == []
    (trace,) = parsed(text)
    assert trace["attributes"] == {
        "concept:name": ("string", str(encounter.pk)),
        "definition": ("string", "VVISIT"),
        "subject_type": ("string", "testapp.patient"),
        "subject_id": ("string", str(patient.pk)),
        "deleted": ("boolean", "false"),
    }
    creation, *events = trace["events"]
    assert creation == {
        "concept:name": ("string", "scheduled"),
        "time:timestamp": ("date", stamp(encounter.created_at)),
        "lifecycle:transition": ("string", "complete"),
        "sequence": ("int", "0"),
        "transitioned_at": ("date", stamp(encounter.created_at)),
        "reason": ("string", ""),
        "backdated": ("boolean", "false"),
        "overtaken": ("boolean", "false"),
    }
    assert events == [
        {
            "concept:name": ("string", row.to_state),
            "time:timestamp": ("date", stamp(row.effective_at)),
            "lifecycle:transition": ("string", "complete"),
            "org:resource": ("string", who),
            "sequence": ("int", str(row.sequence)),
            "from_state": ("string", row.from_state),
            "transitioned_at": ("date", stamp(row.transitioned_at)),
            "reason": ("string", row.reason),
            "backdated": ("boolean", "false"),
            "overtaken": ("boolean", "false"),
        }
        for row, who in zip(rows, ["reception", "doctor", "doctor"], strict=True)
    ]
    assert rows[-1].reason == "Visit concluded"

    frame = read_xes(text, tmp_path)
    assert list(frame["concept:name"]) == ["scheduled", "checked_in", "in_progress", "completed"]
    assert list(frame["case:concept:name"]) == [str(encounter.pk)] * 4
    assert list(frame["org:resource"].fillna("")) == ["", "reception", "doctor", "doctor"]
    assert [ts.to_pydatetime() for ts in frame["time:timestamp"]] == [
        encounter.created_at,
        *(row.effective_at for row in rows),
    ]
    dfg, start, end = pm4py.discover_dfg(frame)
    assert dict(dfg) == {
        ("scheduled", "checked_in"): 1,
        ("checked_in", "in_progress"): 1,
        ("in_progress", "completed"): 1,
    }
    assert (dict(start), dict(end)) == ({"scheduled": 1}, {"completed": 1})


# ---------------------------------------------------------------------------------------------
# The directly-follows graph pm4py finds is the rows' edges
# ---------------------------------------------------------------------------------------------


def test_pm4py_dfg_from_xes_is_exactly_the_edges_the_rows_took(clinic, tmp_path):
    text = xes_text(definition="VISIT")

    assert schema_errors(text) == []
    frame = read_xes(text, tmp_path)
    expected = row_edges(clinic)
    assert expected == Counter(
        {
            ("scheduled", "checked_in"): 3,
            ("checked_in", "in_progress"): 2,
            ("in_progress", "completed"): 2,
            ("checked_in", "cancelled"): 1,
            ("scheduled", "cancelled"): 1,
        }
    )
    assert dfg_of(frame) == expected
    _dfg, start, end = pm4py.discover_dfg(frame)
    assert dict(start) == {"scheduled": 5}
    assert dict(end) == {"completed": 2, "cancelled": 2, "scheduled": 1}
    assert frame["case:concept:name"].nunique() == 5
    assert len(frame) == 5 + sum(expected.values())


def test_pm4py_dfg_from_csv_is_exactly_the_edges_the_rows_took(clinic):
    text = csv_text(definition="VISIT")

    frame = read_csv(text)
    assert dfg_of(frame) == row_edges(clinic)
    assert sorted(frame["case:concept:name"].unique()) == sorted(str(v.pk) for v in clinic)
    _dfg, start, _end = pm4py.discover_dfg(frame)
    assert dict(start) == {"scheduled": 5}


def test_xes_and_csv_carry_the_same_events(clinic, tmp_path):
    xes = read_xes(xes_text(), tmp_path)
    table = list(csv.DictReader(io.StringIO(csv_text())))

    assert [(r["case:concept:name"], r["concept:name"], r["sequence"]) for r in table] == [
        (case, activity, str(sequence))
        for case, activity, sequence in zip(
            xes["case:concept:name"], xes["concept:name"], xes["sequence"], strict=True
        )
    ]
    assert [r["time:timestamp"] for r in table] == [
        stamp(ts.to_pydatetime()) for ts in xes["time:timestamp"]
    ]


# ---------------------------------------------------------------------------------------------
# Business-time order, backdated/overtaken marks, known_at
# ---------------------------------------------------------------------------------------------


def test_backdated_rows_in_business_time_order_with_their_marks(office, tmp_path):
    job = office["job"]

    text = xes_text(definition="EMPLOYMENT")

    assert schema_errors(text) == []
    (trace,) = parsed(text)
    events = trace["events"]
    assert [e["concept:name"][1] for e in events] == ["hired", "working", "onleave", "finished"]
    assert [e["sequence"][1] for e in events] == ["0", "1", "3", "2"]
    assert [e["backdated"][1] for e in events] == ["false", "false", "true", "false"]
    assert [e["overtaken"][1] for e in events] == ["false", "false", "false", "true"]
    assert events[3]["overtaken_by"] == ("int", "3")
    assert events[3]["from_state"] == ("string", "working")  # as recorded
    # The rows are effective before the encounter was created (history entered late): the
    # creation keeps the first place, at the first row's time; its system time is created_at.
    assert events[0]["time:timestamp"] == ("date", stamp(t(1, 2)))
    assert events[0]["transitioned_at"] == ("date", stamp(job.created_at))
    frame = read_xes(text, tmp_path)
    assert list(frame["concept:name"]) == ["hired", "working", "onleave", "finished"]
    assert list(frame["backdated"]) == [False, False, True, False]
    # Directly-follows in business time: onleave -> finished, not the recorded working -> ...
    assert dfg_of(frame) == Counter(
        {("hired", "working"): 1, ("working", "onleave"): 1, ("onleave", "finished"): 1}
    )
    table = read_csv(csv_text(definition="EMPLOYMENT"))
    assert list(table["concept:name"]) == ["hired", "working", "onleave", "finished"]
    assert list(table["backdated"]) == ["false", "false", "true", "false"]
    assert dfg_of(table) == dfg_of(frame)


def test_known_at_is_the_log_as_it_was_known_then(office):
    job, between = office["job"], office["between"]

    text = xes_text(known_at=between)

    assert schema_errors(text) == []
    (trace,) = parsed(text)  # the visit was created after `between`: not in the log yet
    assert trace["attributes"]["concept:name"] == ("string", str(job.pk))
    events = trace["events"]
    assert [e["concept:name"][1] for e in events] == ["hired", "working", "finished"]
    assert [e["sequence"][1] for e in events] == ["0", "1", "2"]
    assert {e["overtaken"][1] for e in events} == {"false"}  # row 3 was not known yet
    rows = list(csv.DictReader(io.StringIO(csv_text(known_at=between))))
    assert [(r["concept:name"], r["overtaken"]) for r in rows] == [
        ("hired", "false"),
        ("working", "false"),
        ("finished", "false"),
    ]
    now = [e["sequence"][1] for tr in parsed(xes_text()) for e in tr["events"]]
    assert now == ["0", "1", "3", "2", "0", "1"]


def test_since_until_select_encounters_whose_rows_are_effective_in_the_period(office):
    job, visit = office["job"], office["visit"]

    def cases(**period) -> list[str]:
        return [tr["attributes"]["concept:name"][1] for tr in parsed(xes_text(**period))]

    assert cases(since=t(2, 1), until=t(2, 2)) == [str(job.pk)]
    traces = parsed(xes_text(since=t(2, 1), until=t(2, 2)))
    assert len(traces[0]["events"]) == 4  # the whole trace, not only the row in the period
    assert cases(since=t(3, 2)) == [str(visit.pk)]
    assert cases(until=t(1, 2)) == []  # until is exclusive
    assert cases() == [str(job.pk), str(visit.pk)]


def test_known_at_with_a_period_selects_by_the_rows_known_then(office):
    """Row 3 (effective in February) was recorded after `between`: as known then, the
    employment had no row in February."""
    job, between = office["job"], office["between"]

    def cases(**selection) -> list[str]:
        return [tr["attributes"]["concept:name"][1] for tr in parsed(xes_text(**selection))]

    assert cases(since=t(2, 1), until=t(2, 2)) == [str(job.pk)]
    assert cases(since=t(2, 1), until=t(2, 2), known_at=between) == []
    assert cases(since=t(3, 1), until=t(3, 2), known_at=between) == [str(job.pk)]


def test_batches_change_nothing(clinic):
    assert xes_text(batch_size=2) == xes_text()
    assert csv_text(batch_size=1) == csv_text()


# ---------------------------------------------------------------------------------------------
# Escaping
# ---------------------------------------------------------------------------------------------


def test_xml_special_and_forbidden_characters(visit_definition, patient, tmp_path):
    from django.contrib.auth.models import User

    weird = User.objects.create_user(username='o"brien<&>', password=None)
    encounter = create_encounter(visit_definition, patient)
    reason = "a <b> & \"c\" 'd'\nline two\ttab\x1b[31m red\x01 soh\x0b \x7f"
    transition(encounter, "checked_in", transitioned_by=weird, reason=reason)

    text = xes_text()

    assert schema_errors(text) == []
    (trace,) = parsed(text)
    event = trace["events"][1]
    # Newline and tab survive (as character references); ESC, SOH and VT, which XML 1.0
    # forbids, become U+FFFD; DEL is allowed.
    assert event["reason"] == (
        "string",
        "a <b> & \"c\" 'd'\nline two\ttab\ufffd[31m red\ufffd soh\ufffd \x7f",
    )
    assert event["org:resource"] == ("string", 'o"brien<&>')
    frame = read_xes(text, tmp_path)
    assert list(frame["org:resource"].fillna("")) == ["", 'o"brien<&>']


def test_csv_columns_and_formulas_neutralised(visit_definition, patient):
    from django.contrib.auth.models import User

    plotter = User.objects.create_user(username="@SUM(A1)", password=None)
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", transitioned_by=plotter, reason='=HYPERLINK("x")')
    transition(encounter, "cancelled", reason="-1+2")
    row = EncounterTransition.objects.get(encounter=encounter, sequence=1)

    rows = list(csv.reader(io.StringIO(csv_text())))

    assert rows[0] == list(CSV_COLUMNS)
    assert rows[0][:4] == ["case:concept:name", "concept:name", "time:timestamp", "org:resource"]
    assert rows[2] == [
        str(encounter.pk),
        "checked_in",
        stamp(row.effective_at),
        "'@SUM(A1)",
        "complete",
        "VISIT",
        "testapp.patient",
        str(patient.pk),
        "false",
        "1",
        "scheduled",
        stamp(row.transitioned_at),
        '\'=HYPERLINK("x")',
        "false",
        "false",
        "",
    ]
    assert rows[3][12] == "'-1+2"
    assert rows[1][1:5] == ["scheduled", stamp(encounter.created_at), "", "complete"]
    assert len(rows) == 4


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_command_writes_the_file(clinic, tmp_path):
    path = tmp_path / "visits.xes"

    code, out, err = run_command(
        "export_encounter_log", "--format", "xes", "--definition", "VISIT", "--output", str(path)
    )

    assert (code, out) == (0, "")
    assert err.strip() == f"5 traces, 14 events written to {path}"
    assert path.read_text(encoding="utf-8") == xes_text(definition="VISIT")
    assert sorted(os.listdir(tmp_path)) == ["visits.xes"]  # no temporary file left


def test_command_writes_csv_to_stdout(office):
    code, out, err = run_command(
        "export_encounter_log", "--format", "csv", "--known-at", office["between"].isoformat()
    )

    assert (code, err) == (0, "")
    assert out == csv_text(known_at=office["between"])
    assert len(list(csv.reader(io.StringIO(out)))) == 1 + 3


def test_api_counts_and_file(clinic, tmp_path):
    path = tmp_path / "visits.csv"

    counts = export_event_log("csv", path, definition="VISIT")

    assert counts == EventLogCounts(traces=5, events=14)
    assert path.read_bytes().decode("utf-8") == csv_text(definition="VISIT")
    assert [tr.id for tr in iter_traces()] == [v.pk for v in clinic]


def test_logs_the_audit_would_fail_are_exported_as_they_are_but_counted_and_said(clinic, tmp_path):
    from tests.helpers import rewrite_row

    tampered = next(v for v in clinic if v.version)
    rewrite_row(tampered, 1, reason="rewritten behind the library's back")
    counts = export_event_log("csv", tmp_path / "log.csv")
    assert counts == EventLogCounts(traces=5, events=14, anomalous=1)
    code, out, err = run_command("export_encounter_log", "--format", "xes")
    assert code == 0 and out.startswith("<?xml")
    assert err.strip() == (
        "warning: 1 encounter exported with unacknowledged anomalies in their logs; "
        "`manage.py audit_encounters` says what is wrong"
    )


def test_a_new_file_gets_the_umask_and_a_rewritten_one_keeps_its_mode(clinic, tmp_path):
    """The log holds reasons and names: a file made private stays private when re-exported."""
    fresh = tmp_path / "fresh.csv"
    previous = os.umask(0o027)
    try:
        export_event_log("csv", fresh)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    private = tmp_path / "private.csv"
    private.write_text("old")
    private.chmod(0o600)
    export_event_log("csv", private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().decode("utf-8") == csv_text()


def test_through_a_symbolic_link_the_file_it_points_to_is_rewritten(clinic, tmp_path):
    real, link = tmp_path / "real.xes", tmp_path / "link.xes"
    real.write_text("old")
    link.symlink_to(real)
    export_event_log("xes", link)
    assert link.is_symlink()
    assert real.read_text(encoding="utf-8") == xes_text()
    assert sorted(os.listdir(tmp_path)) == ["link.xes", "real.xes"]


# ---------------------------------------------------------------------------------------------
# Bad input: a typed error, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (("xml",), UnknownFormatError, "unknown event-log format 'xml'"),
        (("xes",), DefinitionNotFoundError, "no encounter definition has the code 'NOPE'"),
        (("csv",), ValueError, "since must be timezone-aware"),
        (("csv",), ValueError, "must be before until"),
    ],
)
def test_bad_input_raises_and_writes_nothing(clinic, tmp_path, arguments, error, message):
    path = tmp_path / "kept.log"
    path.write_text("earlier\n")
    selection = {
        "definition": "NOPE" if error is DefinitionNotFoundError else None,
        "since": datetime(2024, 1, 1) if "aware" in message else None,
    }
    if "before until" in message:
        selection = {"since": t(2, 1), "until": t(1, 1)}

    with pytest.raises(error, match=message):
        export_event_log(*arguments, path, **selection)
    with pytest.raises(error, match=message):
        export_event_log(*arguments, io.StringIO(), **selection)

    assert path.read_text() == "earlier\n"
    assert sorted(os.listdir(tmp_path)) == ["kept.log"]


def test_unwritable_output_is_a_typed_error(clinic, tmp_path):
    missing = tmp_path / "no-such-dir" / "log.xes"

    with pytest.raises(EventLogWriteError, match="cannot write the event log to") as excinfo:
        export_event_log("xes", missing)
    assert excinfo.value.path == str(missing)
    with pytest.raises(EventLogWriteError, match="it is a directory"):
        export_event_log("xes", tmp_path)
    assert os.listdir(tmp_path) == []

    code, out, err = run_command(
        "export_encounter_log", "--format", "xes", "--output", str(missing)
    )
    assert (code, out) == (2, "")
    assert f"cannot write the event log to {missing}" in err
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--definition", "NOPE"], "no encounter definition has the code 'NOPE'"),
        (["--since", "2024-01-01T00:00"], "--since: '2024-01-01T00:00' has no UTC offset"),
        (["--known-at", "yesterday"], "--known-at: not an ISO-8601 date-time"),
        (
            ["--since", "2024-02-01T00:00Z", "--until", "2024-01-01T00:00Z"],
            "--since must be before --until",
        ),
    ],
)
def test_command_refuses_bad_options_and_writes_nothing(clinic, tmp_path, args, message):
    path = tmp_path / "kept.xes"
    path.write_text("earlier\n")

    code, out, err = run_command(
        "export_encounter_log", "--format", "xes", "--output", str(path), *args
    )

    assert (code, out) == (2, "")
    assert message in err
    assert path.read_text() == "earlier\n"
    assert sorted(os.listdir(tmp_path)) == ["kept.xes"]


def test_command_refuses_an_unknown_format(clinic):
    code, out, err = run_command("export_encounter_log", "--format", "xml")

    assert code != 0 and out == ""
    assert "invalid choice: 'xml'" in err
