"""Times at the edges: the business times a transition may be recorded at (1900-01-01 UTC to now
plus the future tolerance), reads asked about any time Python holds, and stored times that a
``TIME_ZONE`` — or a PostgreSQL session's zone — cannot express (year 1 west of UTC, the end of
year 9999 east of it), which no report, export, admin page or REST response may crash on."""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from django_encounters.engine import EARLIEST_EFFECTIVE_AT
from django_encounters.exceptions import EffectiveAtOutOfRangeError, InvalidTransitionError
from django_encounters.models import Encounter, EncounterTransition
from django_encounters.projections.fhir import to_fhir_r4_status_history
from django_encounters.services import (
    get_encounter_history,
    get_state_at,
    time_in_states,
    transition,
)
from django_encounters.store.converters import parse_pg_timestamptz
from tests.helpers import IS_POSTGRES, forge_projection, insert_row_raw, run_command, snapshot

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
YEAR_ONE = datetime(1, 1, 1, 2, 0, tzinfo=UTC)  # New York (UTC-4:56 then) has no local time
YEAR_END = datetime(9999, 12, 31, 23, 0, tzinfo=UTC)  # Kiritimati (UTC+14) has none either
WEST, EAST = "America/New_York", "Pacific/Kiritimati"
BOUND = "1900-01-01T00:00:00+00:00"
#: How the reports write the two stored edge times: in the zone, or in UTC where the zone has no
#: local time for them (New York and Kiritimati both ran on local mean time, behind UTC, in year
#: 1; Kiritimati is 14 hours ahead now).
SHOWN = {
    WEST: ("0001-01-01T02:00:00+00:00", "9999-12-31T18:00:00-05:00"),
    EAST: ("0001-01-01T02:00:00+00:00", "9999-12-31T23:00:00+00:00"),
}
ADMIN_SHOWN = {
    WEST: ("0001-01-01 02:00:00 UTC", "9999-12-31 18:00:00 EST"),
    EAST: ("0001-01-01 02:00:00 UTC", "9999-12-31 23:00:00 UTC"),
}


# ---------------------------------------------------------------------------------------------
# The bounds of effective_at
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [
        YEAR_ONE,
        datetime(1899, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
        # 1900-01-01 on the clock of a zone east of UTC is still 1899 in UTC.
        datetime(1900, 1, 1, 0, 30, tzinfo=dt_timezone(timedelta(hours=1))),
    ],
)
def test_an_effective_at_before_1900_is_refused_naming_the_bounds(encounter, when):
    before = snapshot(encounter)
    with pytest.raises(ValueError) as raised:
        transition(encounter, "checked_in", effective_at=when)
    error = raised.value
    assert isinstance(error, InvalidTransitionError)
    assert isinstance(error, EffectiveAtOutOfRangeError)
    assert (error.earliest, error.to_state) == (EARLIEST_EFFECTIVE_AT, "checked_in")
    assert error.latest is not None and error.latest > timezone.now()
    message = str(error)
    assert f"allowed from {BOUND} to {error.latest.isoformat()}" in message
    assert "lies before the earliest allowed business time" in message
    assert str(encounter.pk) in message
    assert snapshot(encounter) == before


def test_the_first_moment_of_1900_is_allowed(encounter):
    row = transition(encounter, "checked_in", effective_at=EARLIEST_EFFECTIVE_AT)
    assert row.effective_at == EARLIEST_EFFECTIVE_AT


def test_an_effective_at_beyond_the_tolerance_is_a_value_error_naming_both_bounds(encounter):
    before = snapshot(encounter)
    with pytest.raises(ValueError) as raised:
        transition(encounter, "checked_in", effective_at=YEAR_END)
    message = str(raised.value)
    assert "lies in the future beyond the allowed tolerance" in message
    assert f"allowed from {BOUND} to " in message
    assert "now plus ENCOUNTERS_FUTURE_TOLERANCE" in message
    assert snapshot(encounter) == before


def test_the_rest_api_refuses_an_effective_at_before_1900(encounter, admin_user):
    api = APIClient()
    api.force_authenticate(admin_user)
    response = api.post(
        f"/api/encounters/{encounter.pk}/transition/",
        {"to_state": "checked_in", "effective_at": "1850-06-01T12:00:00Z"},
    )
    assert response.status_code == 409, response.content
    body = response.json()
    assert body["type"].endswith("invalid-transition")
    assert f"allowed from {BOUND}" in body["detail"]
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 0


def test_the_admin_form_refuses_an_effective_at_before_1900(client, admin_user, encounter):
    client.force_login(admin_user)
    before = snapshot(encounter)
    url = reverse("admin:django_encounters_encounter_transition", args=[encounter.pk])
    page = client.post(
        url,
        {
            "to_state": "checked_in",
            "expected_version": 0,
            "reason": "",
            "effective_at": "1850-06-01 12:00:00",
        },
        follow=True,
    )
    messages = [str(m) for m in page.context["messages"]]
    assert any(f"allowed from {BOUND}" in m for m in messages), messages
    assert snapshot(encounter) == before


def test_a_backdate_refused_by_a_stored_year_9999_row_is_named_in_utc(encounter):
    """The refusal names the following row in the caller's zone — in UTC when that zone
    cannot express it, instead of an OverflowError."""
    base = timezone.now() - timedelta(days=1)
    insert_row_raw(
        encounter,
        sequence=1,
        from_state="scheduled",
        to_state="checked_in",
        effective_at=datetime(2000, 1, 1, tzinfo=UTC),
        transitioned_at=base,
    )
    insert_row_raw(
        encounter,
        sequence=2,
        from_state="checked_in",
        to_state="in_progress",
        effective_at=YEAR_END,
        transitioned_at=base + timedelta(seconds=1),
    )
    forge_projection(encounter)
    plus14 = dt_timezone(timedelta(hours=14))
    with pytest.raises(InvalidTransitionError, match="effective 9999-12-31T23:00:00\\+00:00"):
        transition(encounter, "cancelled", effective_at=datetime(2001, 1, 1, tzinfo=plus14))
    assert EncounterTransition.objects.filter(encounter=encounter).count() == 2


# ---------------------------------------------------------------------------------------------
# Reads asked about any time: answered (before the first row, the origin state)
# ---------------------------------------------------------------------------------------------

FIRST = datetime.min.replace(tzinfo=UTC)
LAST = datetime.max.replace(tzinfo=UTC)


def test_reads_at_the_extremes_are_answered(encounter):
    transition(encounter, "checked_in", effective_at=datetime(2000, 1, 1, tzinfo=UTC))
    assert get_state_at(encounter, FIRST) == "scheduled"
    assert get_state_at(encounter, LAST) == "checked_in"
    assert get_state_at(encounter, LAST, known_at=FIRST) == "scheduled"
    assert get_state_at(encounter, LAST, known_at=LAST) == "checked_in"
    states = {
        (at, known): Encounter.objects.as_of(at, known).get(pk=encounter.pk).state_at
        for at in (FIRST, LAST)
        for known in (None, FIRST, LAST)
    }
    assert states[(FIRST, None)] == states[(LAST, FIRST)] == "scheduled"
    assert states[(LAST, None)] == states[(LAST, LAST)] == "checked_in"


@pytest.mark.parametrize("zone", [WEST, EAST])
def test_the_audit_answers_as_of_and_known_at_at_the_extremes(encounter, settings, zone):
    transition(encounter, "checked_in", effective_at=datetime(2000, 1, 1, tzinfo=UTC))
    settings.TIME_ZONE = zone
    for as_of, known_at, state in [
        ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "scheduled"),
        ("9999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00Z", "scheduled"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59Z", "checked_in"),
    ]:
        code, out, err = run_command(
            "audit_encounters", "--format", "json", "--as-of", as_of, "--known-at", known_at
        )
        assert (code, err) == (0, "")
        assert json.loads(out)["encounters"][0]["state_as_of"] == state


@pytest.mark.parametrize("zone", [WEST, EAST])
def test_the_rest_state_at_answers_at_the_extremes(encounter, admin_user, settings, zone):
    settings.TIME_ZONE = zone
    api = APIClient()
    api.force_authenticate(admin_user)
    for at in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"):
        response = api.get(f"/api/encounters/{encounter.pk}/state-at/", {"at": at})
        assert response.status_code == 200, response.content
        assert response.json()["state"] == "scheduled"
        # In the zone, or in UTC where the zone cannot express it: the same instant.
        shown = datetime.fromisoformat(response.json()["at"].replace("Z", "+00:00"))
        assert shown == datetime.fromisoformat(at.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------
# Stored times at the edges, in zones west and east of UTC (and PostgreSQL sessions there)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def edge_encounter(encounter):
    """An encounter whose log holds a row effective in year 1 and one at the end of year 9999,
    written below the library (raw SQL, hashed as the library would), its projection following
    the log: the audit finds nothing wrong with it."""
    recorded = timezone.now() - timedelta(minutes=1)
    insert_row_raw(
        encounter,
        sequence=1,
        from_state="scheduled",
        to_state="checked_in",
        effective_at=YEAR_ONE,
        transitioned_at=recorded,
    )
    insert_row_raw(
        encounter,
        sequence=2,
        from_state="checked_in",
        to_state="in_progress",
        effective_at=YEAR_END,
        transitioned_at=recorded + timedelta(seconds=1),
    )
    forge_projection(encounter)
    return Encounter.objects.get(pk=encounter.pk)


@contextmanager
def session_zone(zone: str | None):
    """The PostgreSQL session moved to ``zone`` (``SET LOCAL``: until the test's transaction
    ends) — what a statement of the project, a pooler's shared session or ``ALTER ROLE … SET
    timezone`` read after connecting does. Nothing on SQLite."""
    if zone is not None and connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # SET LOCAL TIME ZONE, also with server-side binding (no parameters in SET).
            cursor.execute("SELECT set_config('TimeZone', %s, true)", [zone])
    try:
        yield
    finally:
        if zone is not None and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT set_config('TimeZone', 'UTC', true)")


ZONES = [
    pytest.param(WEST, None, id="west"),
    pytest.param(EAST, None, id="east"),
    pytest.param(
        WEST,
        WEST,
        id="west-session",
        marks=pytest.mark.skipif(not IS_POSTGRES, reason="PostgreSQL sessions"),
    ),
    pytest.param(
        EAST,
        EAST,
        id="east-session",
        marks=pytest.mark.skipif(not IS_POSTGRES, reason="PostgreSQL sessions"),
    ),
]


@pytest.mark.parametrize(("zone", "session"), ZONES)
@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_the_audit_writes_stored_edge_times_in_any_zone(
    edge_encounter, settings, zone, session, fmt
):
    settings.TIME_ZONE = zone
    with session_zone(session):
        code, out, err = run_command("audit_encounters", "--format", fmt)
        check_code, check_out, _ = run_command("rebuild_encounter_projections", "--check")
    # (CSV says on stderr that seals were not checked: its first line is its header)
    assert code == 0 and err in ("", "Seals: not checked (ENCOUNTERS_SEAL_KEYS is not set)\n")
    assert all(shown in out for shown in SHOWN[zone])
    assert check_code == 0 and "0 anomalies" in check_out
    if fmt == "json":
        (report,) = json.loads(out)["encounters"]
        assert report["anomalies"] == []
        assert tuple(row["effective_at"] for row in report["timeline"]) == SHOWN[zone]


@pytest.mark.parametrize(("zone", "session"), ZONES)
@pytest.mark.parametrize("fmt", ["xes", "csv"])
def test_the_event_log_exports_stored_edge_times_in_any_zone(
    edge_encounter, settings, zone, session, fmt
):
    settings.TIME_ZONE = zone
    with session_zone(session):
        code, out, err = run_command("export_encounter_log", "--format", fmt)
    assert (code, err) == (0, "")
    assert "0001-01-01T02:00:00.000000+00:00" in out
    assert "9999-12-31T23:00:00.000000+00:00" in out


@pytest.mark.parametrize(("zone", "session"), ZONES)
def test_fhir_and_the_services_read_stored_edge_times_in_any_zone(
    edge_encounter, settings, zone, session
):
    settings.TIME_ZONE = zone
    status_map = {"scheduled": "planned", "checked_in": "arrived", "in_progress": "in-progress"}
    with session_zone(session):
        history = to_fhir_r4_status_history(edge_encounter, status_map)
        rows = [row.effective_at for row in get_encounter_history(edge_encounter)]
        state = get_state_at(edge_encounter, YEAR_ONE + timedelta(hours=1))
        durations = time_in_states(edge_encounter)
    starts = [entry["period"]["start"] for entry in history]
    assert all(shown in starts for shown in SHOWN[zone]), starts
    assert rows == [YEAR_ONE, YEAR_END]
    assert state == "checked_in"
    assert set(durations) == {"checked_in"}  # (created after year 1: no time "scheduled")


@pytest.mark.parametrize(("zone", "session"), ZONES)
def test_the_admin_shows_stored_edge_times_in_any_zone(
    client, admin_user, edge_encounter, settings, zone, session
):
    settings.TIME_ZONE = zone
    client.force_login(admin_user)
    with session_zone(session):
        pages = {
            name: client.get(url)
            for name, url in [
                (
                    "encounter",
                    reverse("admin:django_encounters_encounter_change", args=[edge_encounter.pk]),
                ),
                ("encounters", reverse("admin:django_encounters_encounter_changelist")),
                ("rows", reverse("admin:django_encounters_encountertransition_changelist")),
            ]
        }
    assert {name: page.status_code for name, page in pages.items()} == dict.fromkeys(pages, 200)
    for name in ("encounter", "rows"):
        assert all(shown in pages[name].content.decode() for shown in ADMIN_SHOWN[zone]), name


@pytest.mark.parametrize(("zone", "session"), ZONES)
def test_the_rest_api_shows_stored_edge_times_in_any_zone(
    admin_user, edge_encounter, settings, zone, session
):
    settings.TIME_ZONE = zone
    api = APIClient()
    api.force_authenticate(admin_user)
    with session_zone(session):
        history = api.get(f"/api/encounters/{edge_encounter.pk}/history/")
        detail = api.get(f"/api/encounters/{edge_encounter.pk}/")
        listed = api.get("/api/encounters/")
    assert (history.status_code, detail.status_code, listed.status_code) == (200, 200, 200)
    rows = history.json()["timeline"]
    in_rest = tuple(shown.replace("+00:00", "Z") for shown in SHOWN[zone])
    assert tuple(row["effective_at"] for row in rows) == in_rest
    assert history.json()["anomalies"] == []
    assert detail.json()["timeline_end_at"] == in_rest[1]


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a session in another zone reads the same instants
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not IS_POSTGRES, reason="PostgreSQL sessions")
@pytest.mark.parametrize("zone", [WEST, EAST, "Asia/Kolkata"])
def test_a_session_in_another_zone_reads_the_instants_stored(encounter, zone):
    """Django's loader labels the session's local times as UTC: in a session moved to New York
    every time read was five hours off (and every row's hash then failed the audit)."""
    when = datetime(2024, 1, 1, 12, 0, 0, 250000, tzinfo=UTC)
    row = transition(encounter, "checked_in", effective_at=when)
    with session_zone(zone):
        read = EncounterTransition.objects.get(pk=row.pk)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT effective_at FROM {EncounterTransition._meta.db_table} WHERE id = %s",
                [row.pk],
            )
            (raw,) = cursor.fetchone()
        code, out, _ = run_command("audit_encounters", "--format", "json")
    assert read.effective_at == raw == when
    assert read.transitioned_at == row.transitioned_at
    assert code == 0 and json.loads(out)["encounters"][0]["anomalies"] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"2024-03-31 15:59:59.25+02", datetime(2024, 3, 31, 13, 59, 59, 250000, tzinfo=UTC)),
        (b"2024-03-31 15:59:59.123456-09:30", datetime(2024, 4, 1, 1, 29, 59, 123456, tzinfo=UTC)),
        (b"0001-12-31 21:03:58-04:56:02 BC", YEAR_ONE),
        (b"10000-01-01 13:00:00+14", YEAR_END),
        (b"1900-01-01 05:30:00+05:30", EARLIEST_EFFECTIVE_AT),
    ],
)
def test_postgres_text_of_a_time_is_read_as_its_instant_in_any_zone(text, expected):
    assert parse_pg_timestamptz(text) == expected


@pytest.mark.parametrize(
    "text", [b"0001-01-01 00:00:00+05", b"10000-01-01 13:00:00+01", b"2024-03-31", b"junk"]
)
def test_postgres_text_of_a_time_python_cannot_hold_is_refused(text):
    with pytest.raises(ValueError):
        parse_pg_timestamptz(text)
