"""``rebuild_encounter_projections`` and ``rebuild_projections()``: drift found and
fixed, idempotence, selection options, stream verification, exit codes, batching, and a rebuild
killed with SIGKILL half-way and re-run."""

from __future__ import annotations

import gc
import io
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path

import django
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_encounters import store
from django_encounters.exceptions import EncounterError
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.rebuild import (
    PROJECTION,
    RebuildResult,
    _split,
    rebuild_projections,
)
from django_encounters.services import create_encounter, transition
from tests.helpers import (
    IS_POSTGRES,
    child_env,
    insert_row_raw,
    raw_update,
    run_command,
    work_queries,
)

ROOT = Path(__file__).resolve().parent.parent
ENCOUNTER_TABLE = Encounter._meta.db_table

pytestmark = pytest.mark.django_db


def t(month: int, day: int, hour: int = 9) -> datetime:
    return datetime(2017, month, day, hour, tzinfo=dt_timezone(timedelta(hours=10)))


def run(*args: str) -> tuple[int, str, str]:
    return run_command("rebuild_encounter_projections", *args)


def projection(pk) -> tuple:
    return tuple(Encounter.all_objects.filter(pk=pk).values_list(*PROJECTION).get())


def replayed(pk) -> tuple:
    """The projection the log derives, in ``PROJECTION`` order (all six columns since issue 8)."""
    timeline = store.load_timeline(Encounter.all_objects.get(pk=pk), "default")
    return store.projection_values(timeline)


@pytest.fixture
def clinic(visit_definition, employment_definition, patient, user):
    """A few encounters of two definitions: fresh, moved on, finished, backdated."""
    fresh = create_encounter(visit_definition, patient)
    moving = create_encounter(visit_definition, patient)
    transition(moving, "checked_in", transitioned_by=user, reason="arrived")
    transition(moving, "in_progress")
    done = create_encounter(visit_definition, patient)
    for state in ("checked_in", "in_progress", "completed"):
        transition(done, state)
    job = create_encounter(employment_definition, patient)
    transition(job, "working", effective_at=t(1, 2))
    transition(job, "finished", effective_at=t(3, 1))
    transition(job, "onleave", effective_at=t(2, 1))  # backdated
    return {"fresh": fresh, "moving": moving, "done": done, "job": job}


# ---------------------------------------------------------------------------------------------
# Drift: reported by --check, fixed by a rebuild, and a second rebuild changes nothing
# ---------------------------------------------------------------------------------------------


def test_consistent_store_needs_nothing(clinic):
    code, out, _ = run("--check")
    assert code == 0
    assert "4 encounters scanned, 8 rows replayed, 0 projections drifted" in out

    code, out, _ = run()
    assert code == 0
    assert "rebuild: 4 encounters scanned, 8 rows replayed, 0 projections fixed, 0 anomalies" in out


def test_raw_sql_drift_is_reported_by_check_and_fixed_by_rebuild(clinic):
    moving = clinic["moving"]
    raw_update(Encounter, moving.pk, state="cancelled")
    before_check = projection(moving.pk)

    code, out, err = run("--check")
    assert code == 1
    assert f"drift: encounter {moving.pk}: state 'cancelled' -> 'in_progress'" in out
    assert "1 projections drifted (nothing written)" in out
    assert "1 projection drifted" in err
    assert projection(moving.pk) == before_check  # --check wrote nothing

    code, out, _ = run()
    assert code == 0
    assert f"fixed: encounter {moving.pk}: state 'cancelled' -> 'in_progress'" in out
    assert "1 projections fixed, 0 anomalies" in out
    assert projection(moving.pk) == replayed(moving.pk)
    assert Encounter.objects.get(pk=moving.pk).state == "in_progress"

    code, out, _ = run()  # idempotent
    assert code == 0
    assert "0 projections fixed" in out
    assert run("--check")[0] == 0


def test_every_projection_column_is_rebuilt(clinic):
    """Every projection column the log derives is recomputed. Issue 8 changed which tampering
    is *drift*: a version behind the log whose head is that row's hash moves forward, but a
    version ahead of the log or a head hash that is no row's hash is evidence, reported and
    left alone (see test_head_evidence_is_reported_and_left_untouched)."""
    done, job, fresh = clinic["done"], clinic["job"], clinic["fresh"]
    expected = {pk: replayed(pk) for pk in (done.pk, job.pk, fresh.pk)}
    first = EncounterTransition.objects.get(encounter=done, sequence=1)
    # done: the projection one row behind its log (a consistent, older head).
    raw_update(
        Encounter,
        done.pk,
        version=1,
        head_hash=first.hash,
        last_transitioned_at=first.transitioned_at,
    )
    # job: the last *recorded* row's timeline end and state.
    raw_update(Encounter, job.pk, timeline_end_at=t(2, 1), state="onleave")
    raw_update(
        Encounter,
        fresh.pk,
        state="completed",
        timeline_end_at=t(1, 1),
        definition_version=7,
        last_transitioned_at=t(1, 1),
    )

    result = rebuild_projections()

    assert result.projections_fixed == result.projections_drifted == 3
    assert result.anomaly_count == 0
    drifts = {d.encounter_id: d for d in result.drift}
    assert drifts[done.pk].stored == {
        "version": 1,
        "head_hash": first.hash,
        "last_transitioned_at": first.transitioned_at,
    }
    last = EncounterTransition.objects.get(encounter=done, sequence=3)
    assert drifts[done.pk].replayed == {
        "version": 3,
        "head_hash": last.hash,
        "last_transitioned_at": last.transitioned_at,
    }
    assert drifts[job.pk].replayed == {"state": "finished", "timeline_end_at": t(3, 1)}
    assert drifts[fresh.pk].stored == {
        "state": "completed",
        "timeline_end_at": t(1, 1),
        "definition_version": 7,
        "last_transitioned_at": t(1, 1),
    }
    for pk, values in expected.items():
        assert projection(pk) == values
    # A fresh encounter's projection is its origin, its head its genesis hash (issue 8).
    origin = Encounter.objects.get(pk=fresh.pk)
    assert projection(fresh.pk) == (
        "scheduled",
        0,
        None,
        origin.genesis_hash,
        origin.origin_version,
        None,
    )
    # The backdated row does not end the timeline: replay is by business time.
    assert Encounter.objects.get(pk=job.pk).state == "finished"
    assert rebuild_projections(check=True).ok


def test_head_evidence_is_reported_and_left_untouched(clinic):
    """Issue 8: what a rebuild used to "fix" by rewriting the head is evidence now. A stored
    version ahead of the log (rows deleted) is a ``truncated`` anomaly, a head hash that is not
    the hash of the row it names a ``head`` anomaly; such a projection is left exactly as it is
    (a rebuild never lowers a version or replaces a head hash) and the command exits 1, while
    derivable drift of other encounters is still fixed."""
    done, fresh, moving = clinic["done"], clinic["fresh"], clinic["moving"]
    raw_update(Encounter, done.pk, version=1, head_hash="0" * 64)
    raw_update(
        Encounter, fresh.pk, state="completed", version=7, timeline_end_at=t(1, 1), head_hash="x"
    )
    raw_update(Encounter, moving.pk, state="cancelled")
    evidence = {pk: projection(pk) for pk in (done.pk, fresh.pk)}
    expected_kinds = {(done.pk, 1, "head"), (fresh.pk, 7, "truncated")}

    code, out, err = run("--check")
    assert code == 1
    assert f"anomaly: encounter {done.pk} sequence 1: head: " in out
    assert f"anomaly: encounter {fresh.pk} sequence 7: truncated: " in out
    assert f"drift: encounter {moving.pk}: state 'cancelled' -> 'in_progress'" in out
    assert "1 projections drifted (nothing written), 2 anomalies" in out
    assert "1 projection drifted" in err and "2 anomalies in 2 streams" in err

    code, out, err = run()
    assert code == 1
    assert f"fixed: encounter {moving.pk}: state 'cancelled' -> 'in_progress'" in out
    assert f"fixed: encounter {done.pk}" not in out
    assert f"fixed: encounter {fresh.pk}" not in out
    assert "1 projections fixed, 2 anomalies" in out
    assert "2 anomalies in 2 streams" in err
    for pk, stored in evidence.items():
        assert projection(pk) == stored  # never "fixed"
    assert projection(moving.pk) == replayed(moving.pk)

    result = rebuild_projections()  # a re-run still reports them and still leaves them
    assert {(a.encounter_id, a.sequence, a.kind) for a in result.anomalies} == expected_kinds
    assert (result.projections_fixed, result.anomalous_encounters) == (0, 2)
    for pk, stored in evidence.items():
        assert projection(pk) == stored


def test_rebuild_leaves_ordinary_fields_alone_and_stamps_updated_at(clinic):
    moving, done = clinic["moving"], clinic["done"]
    started, ended = t(1, 1), t(1, 2)
    Encounter.objects.filter(pk=moving.pk).update(started_at=started, ended_at=ended, notes="n")
    raw_update(Encounter, moving.pk, state="scheduled")
    untouched = Encounter.objects.get(pk=done.pk).updated_at
    before = timezone.now()

    rebuild_projections()

    fresh = Encounter.objects.get(pk=moving.pk)
    assert (fresh.started_at, fresh.ended_at, fresh.notes) == (started, ended, "n")
    assert fresh.updated_at >= before
    assert Encounter.objects.get(pk=done.pk).updated_at == untouched


def test_soft_deleted_encounters_are_rebuilt_too(clinic):
    moving = clinic["moving"]
    moving.delete()
    raw_update(Encounter, moving.pk, state="scheduled")

    result = rebuild_projections()

    assert result.encounters_scanned == 4
    assert projection(moving.pk)[0] == "in_progress"
    assert Encounter.all_objects.get(pk=moving.pk).is_deleted


# ---------------------------------------------------------------------------------------------
# Selection and batches
# ---------------------------------------------------------------------------------------------


def test_definition_option_selects_encounters(clinic):
    raw_update(Encounter, clinic["moving"].pk, state="scheduled")
    raw_update(Encounter, clinic["job"].pk, state="hired")

    code, out, _ = run("--definition", "EMPLOYMENT")

    assert code == 0
    assert "1 encounters scanned, 3 rows replayed, 1 projections fixed" in out
    assert projection(clinic["job"].pk)[0] == "finished"
    assert projection(clinic["moving"].pk)[0] == "scheduled"  # not selected


def test_encounter_option_selects_encounters(clinic):
    moving, done = clinic["moving"], clinic["done"]
    raw_update(Encounter, moving.pk, state="scheduled")
    raw_update(Encounter, done.pk, state="scheduled")

    code, out, _ = run("--encounter", str(moving.pk), "--encounter", done.pk.hex, "--check")
    assert code == 1
    assert "2 encounters scanned, 5 rows replayed, 2 projections drifted" in out

    code, out, _ = run("--encounter", str(moving.pk))
    assert code == 0
    assert "1 encounters scanned, 2 rows replayed, 1 projections fixed" in out
    assert projection(done.pk)[0] == "scheduled"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--definition", "NOPE"], "no encounter definition has the code 'NOPE'"),
        (["--encounter", "not-a-uuid"], "not an encounter id (a UUID): 'not-a-uuid'"),
    ],
)
def test_bad_selection_exits_2(clinic, args, message):
    code, _, err = run(*args)

    assert code == 2
    assert message in err


@pytest.mark.parametrize("size", ["0", "-1", "x"])
def test_batch_size_must_be_positive(size):
    with pytest.raises(CommandError, match="batch-size"):
        call_command("rebuild_encounter_projections", "--batch-size", size, stdout=io.StringIO())
    with pytest.raises(ValueError, match="batch_size"):
        rebuild_projections(batch_size=0)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 1000])
def test_results_do_not_depend_on_batch_size(visit_definition, patient, batch_size):
    encounters = [create_encounter(visit_definition, patient) for _ in range(7)]
    for index, encounter in enumerate(encounters):
        for state in ["checked_in", "in_progress", "completed"][: index % 4]:
            transition(encounter, state)
        raw_update(Encounter, encounter.pk, state="cancelled")

    result = rebuild_projections(batch_size=batch_size)

    assert result.encounters_scanned == 7
    assert result.rows_replayed == sum(i % 4 for i in range(7))
    assert result.projections_fixed == 7
    for encounter in encounters:
        assert projection(encounter.pk) == replayed(encounter.pk)


@pytest.mark.parametrize("text", ["plain", 'a,b {c} "d" \\e', "it's NULL", "ünï cödé", "", "NULL"])
def test_batch_write_stores_the_values_it_is_given(visit_definition, patient, text):
    """The rebuild's batch write (values prepared directly on SQLite, array literals on
    PostgreSQL) stores exactly what the ORM would: any text, times in any zone, with and
    without microseconds, and NULL."""
    first, second = (create_encounter(visit_definition, patient) for _ in range(2))
    utc = dt_timezone.utc
    fixes = [
        (first.pk, text, 7, datetime(2020, 1, 2, 3, 4, 5, tzinfo=utc), text, 1, t(3, 4)),
        (
            second.pk,
            "NULL",
            0,
            None,
            'v2:"' + text,
            2,
            datetime(2021, 5, 6, 7, 8, 9, 123456, tzinfo=utc),
        ),
    ]
    with transaction.atomic():
        store.write_projections("default", fixes, timezone.now())
    for pk, *values in fixes:
        assert projection(pk) == tuple(values)


def test_streams_are_read_once_per_batch_not_per_encounter(visit_definition, patient):
    for _ in range(10):
        encounter = create_encounter(visit_definition, patient)
        transition(encounter, "checked_in")

    with CaptureQueriesContext(connection) as captured:
        result = rebuild_projections(batch_size=4, check=True)

    assert result.encounters_scanned == 10
    row_reads = [
        sql
        for sql in work_queries(captured)
        if EncounterTransition._meta.db_table in sql
        and sql.lstrip().upper().startswith(("SELECT", "DECLARE"))
    ]
    assert len(row_reads) == 3  # ceil(10 / 4) batches
    locks = [sql for sql in work_queries(captured) if "FOR UPDATE" in sql.upper()]
    if connection.features.has_select_for_update:
        assert len(locks) == 3


def test_progress_callback_sees_each_batch(visit_definition, patient):
    for _ in range(5):
        create_encounter(visit_definition, patient)
    seen: list[tuple[int, int | None]] = []

    rebuild_projections(
        batch_size=2, progress=lambda r: seen.append((r.encounters_scanned, r.encounters_total))
    )

    assert seen == [(2, 5), (4, 5), (5, 5)]


class _Cycle:
    """An object in a reference cycle: only the cyclic garbage collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_garbage_collector_paused_during_a_rebuild_and_run_after_each_batch(
    visit_definition, patient, monkeypatch
):
    for _ in range(5):
        encounter = create_encounter(visit_definition, patient)
        transition(encounter, "checked_in")
        raw_update(Encounter, encounter.pk, state="cancelled")
    write = store.write_projections
    cycles: list[weakref.ref] = []

    def write_leaving_a_cycle(using, fixes, now):
        cycles.append(weakref.ref(_Cycle()))
        write(using, fixes, now)

    monkeypatch.setattr(store, "write_projections", write_leaving_a_cycle)
    seen: list[tuple[bool, list[bool]]] = []
    assert gc.isenabled()

    result = rebuild_projections(
        batch_size=2,
        progress=lambda r: seen.append((gc.isenabled(), [ref() is None for ref in cycles])),
    )

    assert result.projections_fixed == 5
    # Paused while batches run; each batch's cycle collected before the next batch.
    assert seen == [(False, [True]), (False, [True, True]), (False, [True, True, True])]
    assert gc.isenabled()


def test_garbage_collector_turned_back_on_after_a_failed_rebuild(
    visit_definition, patient, monkeypatch
):
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    raw_update(Encounter, encounter.pk, state="cancelled")

    def failing_write(using, fixes, now):
        assert not gc.isenabled()
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "write_projections", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        rebuild_projections()
    assert gc.isenabled()


def test_garbage_collector_left_off_when_it_was_off(visit_definition, patient, monkeypatch):
    create_encounter(visit_definition, patient)
    collections: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation))
    gc.disable()
    try:
        result = rebuild_projections(batch_size=1)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert result.encounters_scanned == 1
    assert collections == []  # nothing run in its place either


def test_progress_display_only_on_a_terminal(clinic):
    from django_encounters.management.commands.rebuild_encounter_projections import Progress

    code, out, err = run()  # StringIO is not a terminal: no progress line
    assert code == 0 and "\r" not in out + err

    class Terminal(io.StringIO):
        def write(self, text, style_func=None, ending=None):  # OutputWrapper's signature
            return super().write(text)

    screen = Terminal()
    progress = Progress(screen)
    progress(
        RebuildResult(
            encounters_total=10,
            encounters_scanned=4,
            rows_replayed=12,
            projections_fixed=1,
            seconds=2.0,
        ),
        final=True,
    )
    progress.clear()
    assert screen.getvalue().startswith("\r4/10 encounters  40.0%  12 rows  1 fixed")
    assert "6 rows/s" in screen.getvalue()
    assert screen.getvalue().endswith("\r")


def test_result_object(clinic):
    raw_update(Encounter, clinic["done"].pk, state="scheduled")

    result = rebuild_projections(check=True)

    assert isinstance(result, RebuildResult)
    assert (result.encounters_scanned, result.rows_replayed) == (4, 8)
    assert (result.projections_drifted, result.projections_fixed, result.anomaly_count) == (1, 0, 0)
    assert not result.ok  # a check with drift
    assert result.seconds > 0
    assert result.summary().startswith("check: 4 encounters scanned, 8 rows replayed")
    with pytest.raises(EncounterError):
        rebuild_projections(definition="MISSING")


# ---------------------------------------------------------------------------------------------
# Stream verification: anomalies are reported (exit 1), never repaired
# ---------------------------------------------------------------------------------------------


def _append_raw(encounter, **fields) -> EncounterTransition:
    """A row appended through the low-level ``save()`` (no decision: the state machine is not
    consulted; the projection follows the log)."""
    row = EncounterTransition(encounter=encounter, **fields)
    row.save()
    return row


def test_anomalies_are_reported_and_exit_1(clinic):
    moving = clinic["moving"]
    # A row whose from_state is not the timeline's state and whose edge is not allowed.
    _append_raw(moving, from_state="scheduled", to_state="completed")
    rows_before = list(EncounterTransition.objects.order_by("pk").values_list("pk", "hash"))

    code, out, err = run()

    assert code == 1
    assert f"anomaly: encounter {moving.pk} sequence 3: from_state:" in out
    assert f"anomaly: encounter {moving.pk} sequence 3: edge: 'scheduled' -> 'completed'" in out
    assert "2 anomalies in 1 stream (a rebuild cannot repair them" in err
    # The projection is still the replay of the log (the row is a fact) ...
    assert projection(moving.pk)[:2] == ("completed", 3)
    # ... and no row was touched.
    assert list(EncounterTransition.objects.order_by("pk").values_list("pk", "hash")) == rows_before
    # Still non-zero on the next run: anomalies cannot be fixed by a rebuild.
    code, out, _ = run()
    assert code == 1 and "0 projections fixed, 2 anomalies" in out
    assert run("--check")[0] == 1


def test_gap_in_the_stream_is_an_anomaly(clinic):
    done = clinic["done"]
    insert_row_raw(done, sequence=5, from_state="completed", to_state="completed")

    result = rebuild_projections()

    kinds = {(a.encounter_id, a.sequence, a.kind) for a in result.anomalies}
    assert (done.pk, 5, "gap") in kinds
    assert result.anomalous_encounters == 1
    assert projection(done.pk)[1] == 5


def test_anomaly_details_are_capped_but_counted(visit_definition, patient):
    for _ in range(3):
        encounter = create_encounter(visit_definition, patient)
        _append_raw(encounter, from_state="in_progress", to_state="scheduled")

    result = rebuild_projections(max_reported=2)

    assert result.anomaly_count == 6  # from_state + edge, three times
    assert len(result.anomalies) == 2


# ---------------------------------------------------------------------------------------------
# Killed half-way (SIGKILL) and re-run: every projection ends correct
# ---------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import django
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    django.setup()
    from django_encounters import store

    write = store.write_projections
    batches = 0

    def write_then_pause(using, fixes, now):
        global batches
        write(using, fixes, now)  # executed, not committed
        batches += 1
        if batches == 3:
            print("PAUSED", flush=True)
            time.sleep(600)  # killed here, inside the third batch's transaction

    store.write_projections = write_then_pause
    from django.core.management import execute_from_command_line
    execute_from_command_line(["manage.py", "rebuild_encounter_projections", *sys.argv[1:]])
    """
)


def _stored_projections(db_file: Path | None) -> dict[str, tuple]:
    if IS_POSTGRES:
        return {
            pk.hex: (state, version, head)
            for pk, state, version, head in Encounter.all_objects.values_list(
                "pk", "state", "version", "head_hash"
            )
        }
    with sqlite3.connect(db_file) as db:
        rows = db.execute(f"SELECT id, state, version, head_hash FROM {ENCOUNTER_TABLE}")
        return {pk: (state, version, head) for pk, state, version, head in rows}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_rebuild_killed_with_sigkill_then_rerun(visit_definition, patient, tmp_path):
    batch_size = 4
    encounters = [create_encounter(visit_definition, patient) for _ in range(6 * batch_size)]
    for index, encounter in enumerate(encounters):
        for state in ["checked_in", "in_progress", "completed"][: 1 + index % 3]:
            transition(encounter, state)
    expected = {e.pk.hex: projection(e.pk)[:2] + (projection(e.pk)[3],) for e in encounters}
    with connection.cursor() as cursor:  # every projection drifts back to its origin
        # (Issue 8: with the genesis hash as head, version 0 is a head *behind* the log, which
        # a rebuild derives; an empty head would be a `head` anomaly, left untouched.)
        cursor.execute(
            f"UPDATE {ENCOUNTER_TABLE} SET state = 'scheduled', version = 0, "
            "head_hash = genesis_hash, timeline_end_at = NULL, last_transitioned_at = NULL"
        )

    db_file = None
    if not IS_POSTGRES:  # the test database is in memory: give the children a file copy
        db_file = tmp_path / "rebuild.sqlite3"
        target = sqlite3.connect(db_file)
        connection.ensure_connection()
        connection.connection.backup(target)
        target.close()
    env = child_env(db_file)
    args = ["--batch-size", str(batch_size), "--no-progress"]

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "PAUSED" not in line:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the child never reached its third batch"
            ready, _, _ = select.select([child.stdout], [], [], remaining)
            if ready:
                line = child.stdout.readline()
                assert line or child.poll() is None, f"child exited: {child.stderr.read()}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    # Two batches committed, the third rolled back with the killed process.
    deadline = time.monotonic() + 30
    while True:
        stored = _stored_projections(db_file)
        correct = sum(stored[pk] == values for pk, values in expected.items())
        if correct == 2 * batch_size or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # PostgreSQL may take a moment to notice the dead client
    assert correct == 2 * batch_size

    rerun = subprocess.run(
        [sys.executable, "-m", "django", "rebuild_encounter_projections", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{4 * batch_size} projections fixed, 0 anomalies" in rerun.stdout

    assert _stored_projections(db_file) == expected
    check = subprocess.run(
        [sys.executable, "-m", "django", "rebuild_encounter_projections", "--check", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "0 projections drifted" in check.stdout


# ---------------------------------------------------------------------------------------------
# --jobs N: primary-key ranges over worker processes, results identical to one process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5])
def test_jobs_must_be_a_positive_integer(jobs):
    with pytest.raises(ValueError, match="jobs"):
        rebuild_projections(jobs=jobs)


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_jobs_option_must_be_a_positive_integer(jobs):
    with pytest.raises(CommandError, match="jobs"):
        call_command("rebuild_encounter_projections", "--jobs", jobs, stdout=io.StringIO())


@pytest.mark.skipif(IS_POSTGRES, reason="the in-memory SQLite test database")
def test_jobs_refused_on_an_in_memory_sqlite_database(clinic):
    with pytest.raises(ValueError, match="in-memory SQLite"):
        rebuild_projections(jobs=2)
    code, _, err = run("--jobs", "2")
    assert code == 2 and "in-memory SQLite database cannot be shared" in err


@pytest.mark.skipif(IS_POSTGRES, reason="SQLite's deferred transactions")
def test_jobs_refused_on_sqlite_without_immediate_transactions(clinic, monkeypatch):
    """Workers on deferred SQLite transactions would fail with "database is locked" instead of
    waiting for each other: refused up front, nothing written."""
    from django.db import connection

    monkeypatch.setattr(connection, "is_in_memory_db", lambda: False)
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", {})
    with pytest.raises(ValueError, match="transaction_mode"):
        rebuild_projections(jobs=2)


@pytest.mark.postgres_only
def test_jobs_refused_inside_a_transaction(clinic):
    with pytest.raises(ValueError, match="inside a transaction"):
        rebuild_projections(jobs=2)


@pytest.mark.parametrize(
    ("jobs", "batch_size", "sizes"),
    [(3, 2, [10, 10, 10]), (2, 4, [16, 14]), (4, 10, [10, 10, 10]), (8, 1000, [30])],
)
def test_jobs_split_whole_batches_evenly(visit_definition, patient, jobs, batch_size, sizes):
    for _ in range(30):
        create_encounter(visit_definition, patient)
    selected = Encounter.all_objects.all()

    ranges = _split(selected, 30, jobs, batch_size)

    counts = []
    for after, upto in ranges:
        part = selected if after is None else selected.filter(pk__gt=after)
        counts.append((part if upto is None else part.filter(pk__lte=upto)).count())
    assert counts == sizes
    assert ranges[0][0] is None and ranges[-1][1] is None


def _shared_database(tmp_path: Path) -> Path | None:
    """A database the child processes can open: the PostgreSQL test database itself (``None``),
    or on SQLite a file copy of the in-memory test database."""
    if IS_POSTGRES:
        return None
    db_file = tmp_path / "shared.sqlite3"
    target = sqlite3.connect(db_file)
    connection.ensure_connection()
    connection.connection.backup(target)
    target.close()
    return db_file


def _mixed_store(visit_definition, employment_definition, patient, count: int = 30) -> list:
    """``count`` encounters of two definitions; every third one's projection drifted, two
    streams (one early, one late in pk order) with anomalies."""
    encounters = []
    for index in range(count):
        if index % 5 == 4:
            encounter = create_encounter(employment_definition, patient)
            transition(encounter, "working", effective_at=t(1, 2))
            transition(encounter, "finished", effective_at=t(3, 1))
            transition(encounter, "onleave", effective_at=t(2, 1))  # backdated
        else:
            encounter = create_encounter(visit_definition, patient)
            for state in ["checked_in", "in_progress", "completed"][: index % 4]:
                transition(encounter, state)
        encounters.append(encounter)
    ordered = sorted(encounters, key=lambda e: e.pk)
    for encounter in ordered[::3]:
        # Derivable drift: back to version 0 with the genesis head, in another state. (Issue 8:
        # a raised version would be a `truncated` anomaly, not drift.)
        raw_update(
            Encounter,
            encounter.pk,
            state="cancelled",
            version=0,
            head_hash=encounter.genesis_hash,
            timeline_end_at=None,
            last_transitioned_at=None,
        )
    for encounter in (ordered[1], ordered[-2]):
        _append_raw(encounter, from_state="in_progress", to_state="scheduled")
    return ordered


def _command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "django", "rebuild_encounter_projections", "--no-progress", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _without_seconds(output: str) -> list[str]:
    """The output's lines, the summary's timing cut off."""
    return [line.rsplit(", ", 1)[0] if " seconds" in line else line for line in output.splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(
    not IS_POSTGRES and django.VERSION < (5, 1),
    reason="jobs > 1 on SQLite needs Django >= 5.1's transaction_mode=IMMEDIATE",
)
@pytest.mark.django_db(transaction=True)
def test_jobs_give_the_same_results_as_one_process(
    visit_definition, employment_definition, patient, tmp_path
):
    _mixed_store(visit_definition, employment_definition, patient)
    env = child_env(_shared_database(tmp_path))
    args = ["-v", "2", "--batch-size", "2"]

    one = _command(env, "--check", *args, "--jobs", "1")
    assert one.returncode == 1, one.stderr
    drifted = [line for line in one.stdout.splitlines() if line.startswith("drift: ")]
    anomalies = [line for line in one.stdout.splitlines() if line.startswith("anomaly: ")]
    assert len(drifted) >= 10 and len(anomalies) >= 2
    assert f"{len(drifted)} projections drifted" in one.stdout
    for jobs in ("2", "3"):
        many = _command(env, "--check", *args, "--jobs", jobs)
        # The same drift and the same anomalies, listed in the same order; nothing written.
        assert _without_seconds(many.stdout) == _without_seconds(one.stdout), many.stderr
        assert many.returncode == 1 and many.stderr.endswith(one.stderr.split(": ", 1)[1])

    fix = _command(env, *args, "--jobs", "2")
    assert fix.returncode == 1, fix.stderr  # the anomalies remain: rows are facts
    fixed = [line for line in fix.stdout.splitlines() if line.startswith("fixed: ")]
    assert [line[7:] for line in fixed] == [line[7:] for line in drifted]
    assert [line for line in fix.stdout.splitlines() if line.startswith("anomaly: ")] == anomalies
    assert f"{len(drifted)} projections fixed, {len(anomalies)} anomalies" in fix.stdout

    after = _command(env, "--check", *args, "--jobs", "1")
    assert "0 projections drifted" in after.stdout
    assert f"{len(anomalies)} anomalies" in after.stdout
    assert _command(env, *args, "--jobs", "2").stdout.count("fixed: ") == 0


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_jobs_api_merges_results_and_progress(visit_definition, employment_definition, patient):
    ordered = _mixed_store(visit_definition, employment_definition, patient)

    one = rebuild_projections(check=True, batch_size=3)
    calls: list[tuple[int, int | None]] = []
    many = rebuild_projections(
        check=True,
        batch_size=3,
        jobs=3,
        progress=lambda r: calls.append((r.encounters_scanned, r.encounters_total)),
    )

    for name in (
        "encounters_scanned",
        "rows_replayed",
        "projections_drifted",
        "projections_fixed",
        "anomaly_count",
        "anomalous_encounters",
        "drift",
        "anomalies",
    ):
        assert getattr(many, name) == getattr(one, name), name
    assert many.projections_drifted >= 10 and many.projections_fixed == 0
    assert calls and calls[-1] == (30, 30)
    assert [scanned for scanned, _ in calls] == sorted(scanned for scanned, _ in calls)
    assert projection(ordered[0].pk)[:2] == ("cancelled", 0)  # --check wrote nothing

    fixed = rebuild_projections(batch_size=3, jobs=2, max_reported=3)
    assert fixed.projections_fixed == one.projections_drifted and fixed.drift == one.drift[:3]
    assert fixed.anomalies == one.anomalies[:3] and fixed.anomaly_count == one.anomaly_count
    assert rebuild_projections(check=True, batch_size=3, jobs=2).projections_drifted == 0


FAILING_WORKER = textwrap.dedent(
    """
    import os, sys
    import django
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    django.setup()
    from django_encounters.projections import rebuild

    # Module level: a spawned worker re-runs this file (as __mp_main__), so the patch is theirs.
    compare = rebuild._compare

    def failing_compare(batch, *args):
        if any(verified.id.hex == os.environ["FAIL_ON"] for verified in batch):
            raise RuntimeError("boom in the worker of " + os.environ["FAIL_ON"])
        return compare(batch, *args)

    rebuild._compare = failing_compare

    if __name__ == "__main__":
        from django.core.management import execute_from_command_line
        execute_from_command_line(["manage.py", "rebuild_encounter_projections", *sys.argv[1:]])
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    not IS_POSTGRES and django.VERSION < (5, 1),
    reason="jobs > 1 on SQLite needs Django >= 5.1's transaction_mode=IMMEDIATE",
)
@pytest.mark.django_db(transaction=True)
def test_a_failing_worker_fails_the_run(visit_definition, employment_definition, patient, tmp_path):
    ordered = _mixed_store(visit_definition, employment_definition, patient)
    script = tmp_path / "failing_rebuild.py"
    script.write_text(FAILING_WORKER)
    env = child_env(_shared_database(tmp_path))
    env["FAIL_ON"] = ordered[-1].pk.hex  # in the last worker's range

    proc = subprocess.run(
        [sys.executable, str(script), "--no-progress", "--batch-size", "2", "--jobs", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        f"rebuild worker 2 of 2 failed: RuntimeError: boom in the worker of {ordered[-1].pk.hex}"
        in proc.stderr
    )
    assert "encounters scanned" not in proc.stdout  # no summary of a run that did not finish


# ---------------------------------------------------------------------------------------------
# PostgreSQL: batches overlapped in one process (each in its own thread and transaction)
# ---------------------------------------------------------------------------------------------


def _rebuild_with(monkeypatch, overlap: int, threads: set[str] | None = None, **options):
    """``rebuild_projections(**options)`` with ``overlap`` batches in flight; the names of the
    threads that replayed batches go to ``threads``."""
    from django_encounters.projections import rebuild as rebuild_module
    from django_encounters.projections.replay import Replays

    monkeypatch.setattr(rebuild_module, "OVERLAP", overlap)
    fold = Replays.fold

    def recording_fold(self, batch):
        if threads is not None:
            threads.add(threading.current_thread().name)
            time.sleep(0.02)  # long enough for the other threads to claim the next batches
        return fold(self, batch)

    monkeypatch.setattr(Replays, "fold", recording_fold)
    try:
        return rebuild_projections(**options)
    finally:
        monkeypatch.setattr(Replays, "fold", fold)


def _outcome(result) -> tuple:
    return (
        result.encounters_scanned,
        result.rows_replayed,
        result.projections_drifted,
        result.projections_fixed,
        result.anomaly_count,
        result.anomalous_encounters,
        [str(d) for d in result.drift],
        [str(a) for a in result.anomalies],
    )


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_overlapped_batches_give_exactly_the_sequential_result(
    visit_definition, employment_definition, patient, monkeypatch
):
    ordered = _mixed_store(visit_definition, employment_definition, patient)
    sequential = _rebuild_with(monkeypatch, 1, check=True, batch_size=2)
    threads: set[str] = set()
    calls: list[int] = []
    overlapped = _rebuild_with(
        monkeypatch,
        3,
        threads,
        check=True,
        batch_size=2,
        progress=lambda r: calls.append(r.encounters_scanned),
    )
    assert len(threads) > 1  # batches were really replayed by several threads
    assert _outcome(overlapped) == _outcome(sequential)
    assert sequential.projections_drifted >= 10 and sequential.anomaly_count >= 2
    assert calls == list(range(2, len(ordered) + 1, 2))  # progress after each batch, in order
    # Capped lists are the first ones, as one at a time keeps them.
    capped = _rebuild_with(monkeypatch, 2, set(), check=True, batch_size=2, max_reported=3)
    assert [str(d) for d in capped.drift] == [str(d) for d in sequential.drift[:3]]

    fixed = _rebuild_with(monkeypatch, 2, set(), batch_size=2)
    assert fixed.projections_fixed == sequential.projections_drifted
    assert [str(d) for d in fixed.drift] == [str(d) for d in sequential.drift]
    for encounter in ordered:
        assert projection(encounter.pk) == replayed(encounter.pk)
    assert _rebuild_with(monkeypatch, 2, set(), batch_size=2).projections_fixed == 0


def _encounters_in_pk_order(definition, subject, count):
    """``count`` new encounters in primary-key order: the order the rebuild's batches take."""
    return sorted((create_encounter(definition, subject) for _ in range(count)), key=lambda e: e.pk)


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_overlapped_rebuild_failure_leaves_a_prefix_committed(
    visit_definition, patient, monkeypatch
):
    encounters = _encounters_in_pk_order(visit_definition, patient, 12)
    for encounter in encounters:
        transition(encounter, "checked_in")
        raw_update(Encounter, encounter.pk, state="cancelled")
    write = store.write_projections
    written: list[int] = []

    def failing_write(using, fixes, now):
        written.append(len(fixes))
        if len(written) == 3:
            raise RuntimeError("disk full")
        write(using, fixes, now)

    monkeypatch.setattr(store, "write_projections", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        _rebuild_with(monkeypatch, 3, set(), batch_size=2)
    # Batches 1 and 2 committed; the third failed; none after it was written.
    states = [Encounter.all_objects.get(pk=e.pk).state for e in encounters]
    assert states == ["checked_in"] * 4 + ["cancelled"] * 8
    assert written == [2, 2, 2]


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_transition_during_an_overlapped_rebuild_is_not_overwritten(
    visit_definition, patient, monkeypatch
):
    encounters = _encounters_in_pk_order(visit_definition, patient, 8)
    for encounter in encounters:
        raw_update(Encounter, encounter.pk, state="cancelled")  # every projection drifted
    target = encounters[5]  # in the third batch of two
    from django_encounters.projections.replay import Replays

    fold = Replays.fold
    moved: list[object] = []
    errors: list[BaseException] = []

    def move_target() -> None:
        try:
            moved.append(transition(Encounter.objects.get(pk=target.pk), "checked_in"))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
        finally:
            connection.close()

    mover = threading.Thread(target=move_target)

    def fold_then_race(self, batch):
        if mover.ident is None and any(values[0] == target.pk for values in batch):
            # The batch holds the target's lock: the transition started now waits for it,
            # and must not be overwritten by the projection replayed before it.
            mover.start()
            time.sleep(0.3)
            assert not moved  # still waiting for the rebuild's lock
        return fold(self, batch)

    monkeypatch.setattr(Replays, "fold", fold_then_race)
    monkeypatch.setattr(
        __import__("django_encounters.projections.rebuild", fromlist=["x"]), "OVERLAP", 2
    )
    result = rebuild_projections(batch_size=2)
    mover.join(timeout=30)
    assert not errors and moved
    assert result.projections_fixed == 8
    stored = Encounter.all_objects.get(pk=target.pk)
    assert (stored.state, stored.version) == ("checked_in", 1)
    assert projection(target.pk) == replayed(target.pk)
    assert rebuild_projections(check=True).projections_drifted == 0
