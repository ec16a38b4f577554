"""The output layer (``projections.output``): the registry of formats, the one atomic file
writer, and times as every report writes them."""

from __future__ import annotations

import io
import json
import os
import stat
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.utils import timezone

from django_encounters.exceptions import UnknownFormatError
from django_encounters.projections import output
from django_encounters.projections.output import (
    formats,
    get_format,
    in_zone,
    local_iso,
    register_format,
    unregister_format,
    utc_iso,
    write_atomically,
)
from django_encounters.services import create_encounter, transition
from tests.helpers import forge_projection, insert_row_raw, run_command

# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


def test_every_report_lists_its_formats():
    assert formats("audit") == ("table", "csv", "json")
    assert formats("event-log") == ("xes", "csv", "ocel2-json")
    assert formats("checkpoint") == ("json",)
    assert get_format("event-log", "csv").newline == ""  # csv ends its own lines
    assert get_format("audit", "json").content_type == "application/json"


def test_a_format_is_registered_once():
    existing = get_format("audit", "csv")
    with pytest.raises(ValueError, match="already has a format 'csv'"):
        register_format("audit", "csv", content_type="text/csv")(lambda audits, out, **kw: 0)
    assert get_format("audit", "csv") is existing  # the first registration is kept


def test_an_unknown_format_names_the_ones_there_are():
    with pytest.raises(UnknownFormatError) as excinfo:
        get_format("audit", "yaml")
    assert str(excinfo.value) == "unknown audit format 'yaml' (choose one of: table, csv, json)"
    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.choices == ("table", "csv", "json")


@pytest.mark.django_db
def test_a_registered_format_is_offered_by_the_command(visit_definition, patient, tmp_path):
    """Adding an export format is one registered writer: the command offers and uses it."""

    def write_ids(audits, out, *, as_of, known_at=None, checkpoint=None):
        count = 0
        for audit in audits:
            out.write(f"{audit.id} {audit.state_as_of}\n")
            count += audit.anomaly_count
        return count

    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in")
    register_format("audit", "ids", content_type="text/plain")(write_ids)
    try:
        code, out, err = run_command("audit_encounters", "--format", "ids")
    finally:
        unregister_format("audit", "ids")
    assert (code, err) == (0, "")
    assert out == f"{encounter.pk} checked_in\n"
    assert "ids" not in formats("audit")


# ---------------------------------------------------------------------------------------------
# write_atomically
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def umask_untouched(monkeypatch):
    """Fails a test that changes the process-wide umask (a race with other threads)."""

    def refuse(mask):
        raise AssertionError("write_atomically changed the umask")

    monkeypatch.setattr(os, "umask", refuse)


def _current_umask() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise AssertionError("no umask in /proc/self/status")


def test_a_new_file_gets_what_open_would_give_it(tmp_path, umask_untouched):
    target = tmp_path / "report.txt"
    with write_atomically(target) as out:
        out.write("complete\n")
    assert target.read_text() == "complete\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_current_umask()
    assert os.listdir(tmp_path) == ["report.txt"]


def test_an_existing_file_keeps_its_permissions(tmp_path, umask_untouched):
    target = tmp_path / "report.txt"
    target.write_text("old\n")
    target.chmod(0o600)
    with write_atomically(target) as out:
        out.write("new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_failure_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="went away"):
        with write_atomically(target) as out:
            out.write("half a rep")
            raise RuntimeError("the database went away")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["report.txt"]  # no temporary file left


def test_the_file_and_its_directory_are_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(descriptor):
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    with write_atomically(tmp_path / "report.txt") as out:
        out.write("x")
    assert synced == [False, True]  # the file, then the directory holding its new name


def test_without_overwrite_an_existing_file_is_refused(tmp_path):
    target = tmp_path / "checkpoint.json"
    target.write_text("evidence\n")
    with pytest.raises(FileExistsError):
        with write_atomically(target, overwrite=False) as out:
            out.write("other\n")
    assert target.read_text() == "evidence\n"
    assert os.listdir(tmp_path) == ["checkpoint.json"]


def test_a_file_appearing_while_writing_is_not_replaced_without_overwrite(tmp_path):
    target = tmp_path / "checkpoint.json"
    with pytest.raises(FileExistsError):
        with write_atomically(target, overwrite=False) as out:
            out.write("mine\n")
            target.write_text("theirs\n")  # another writer, meanwhile
    assert target.read_text() == "theirs\n"
    assert os.listdir(tmp_path) == ["checkpoint.json"]


def test_through_a_link_the_linked_file_is_written(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    with write_atomically(link) as out:
        out.write("new\n")
    assert link.is_symlink() and real.read_text() == "new\n"


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        with write_atomically(tmp_path) as out:
            out.write("x")


def test_text_is_utf8_with_the_newline_asked_for(tmp_path):
    target = tmp_path / "log.csv"
    with write_atomically(target, newline="") as out:
        out.write("é\r\n")
    assert target.read_bytes() == "é\r\n".encode()


# ---------------------------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------------------------

YEAR_ONE = datetime(1, 1, 1, 2, 0, tzinfo=dt_timezone.utc)


def test_times_in_the_current_zone_and_in_utc(settings):
    settings.TIME_ZONE = "Australia/Brisbane"
    moment = datetime(2024, 3, 31, 13, 59, 59, 250000, tzinfo=dt_timezone.utc)
    with timezone.override("Australia/Brisbane"):
        assert local_iso(moment) == "2024-03-31T23:59:59.250000+10:00"
    assert utc_iso(moment) == "2024-03-31T13:59:59.250000+00:00"
    assert utc_iso(moment.replace(microsecond=0), "microseconds").endswith(".000000+00:00")
    assert local_iso(None) is None


def test_a_time_the_zone_cannot_express_is_given_in_utc():
    """Year 1 west of UTC (and year 9999 east of it) has no local time: the report says it
    in UTC rather than failing."""
    with timezone.override("America/New_York"):
        assert in_zone(YEAR_ONE) == YEAR_ONE
        assert local_iso(YEAR_ONE) == "0001-01-01T02:00:00+00:00"
    end = datetime(9999, 12, 31, 23, 0, tzinfo=dt_timezone.utc)
    with timezone.override("Australia/Brisbane"):
        assert local_iso(end) == "9999-12-31T23:00:00+00:00"


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_the_audit_writes_a_year_one_row_in_a_zone_west_of_utc(
    fmt, visit_definition, patient, settings
):
    # transition() refuses a time before 1900: the row is written below the library.
    encounter = create_encounter(visit_definition, patient)
    insert_row_raw(
        encounter,
        sequence=1,
        from_state="scheduled",
        to_state="checked_in",
        effective_at=YEAR_ONE + timedelta(hours=1),
        transitioned_at=timezone.now(),
    )
    forge_projection(encounter)
    settings.TIME_ZONE = "America/New_York"
    code, out, err = run_command("audit_encounters", "--format", fmt)
    assert (code, err) == (
        0,
        "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)\n" if fmt == "csv" else "",
    )
    assert "0001-01-01T03:00:00+00:00" in out
    if fmt == "json":
        row = json.loads(out)["encounters"][0]["timeline"][0]
        assert row["effective_at"] == "0001-01-01T03:00:00+00:00"


def test_writers_take_the_registry_signature():
    """Every writer of a report is called the same way (the command does not know which)."""
    for name in formats("audit"):
        written = io.StringIO()
        count = get_format("audit", name).write(
            iter(()), written, as_of=datetime(2024, 1, 1, tzinfo=dt_timezone.utc)
        )
        assert count == 0 and written.getvalue()
    assert output.WRITER_MODULES  # the modules whose writers register themselves
