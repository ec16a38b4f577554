"""The example clinic (``example/``, what ``make admin-demo`` serves): ``seed_clinic`` seeds a
fresh database and adds nothing the second time; a person logs in to the served admin as
admin / admin, finds a patient by name, follows to the visit and moves it on.

The example has its own settings (``example/demo_project/settings.py``: its own SQLite file,
named by ``ENCOUNTERS_DEMO_DB``), not the test settings, so everything runs as the Makefile runs
it: ``manage.py`` in a subprocess, the server a real ``runserver``. The tests read the example's
SQLite file directly; the test database (SQLite or PostgreSQL) is not used, so both runs of the
suite test the same thing.
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_admin_browser import CHROMEDRIVER, CHROMIUM, Person, driver  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "example" / "manage.py"
#: How long the server may take to answer its first request.
SERVER_START_SECONDS = 60

pytestmark = pytest.mark.slow


def manage(database: Path, *args: str) -> str:
    """``example/manage.py *args`` on ``database``, as ``make admin-demo`` runs it; its output
    (the test fails with it when the command fails)."""
    done = subprocess.run(
        [sys.executable, str(MANAGE), *args],
        env=example_env(database),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def example_env(database: Path) -> dict[str, str]:
    # The test run's own DJANGO_SETTINGS_MODULE (tests.settings) would win over manage.py's.
    return {
        **os.environ,
        "ENCOUNTERS_DEMO_DB": str(database),
        "DJANGO_SETTINGS_MODULE": "demo_project.settings",
    }


def query(database: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as db:
        return db.execute(sql, params).fetchall()


def counts(database: Path) -> dict[str, int]:
    tables = {
        "patients": "clinic_patient",
        "definitions": "django_encounters_encounterdefinition",
        "definition versions": "django_encounters_encounterdefinitionversion",
        "encounters": "django_encounters_encounter",
        "transitions": "django_encounters_encountertransition",
        "users": "auth_user",
    }
    return {
        name: query(database, f"SELECT COUNT(*) FROM {table}")[0][0]  # noqa: S608
        for name, table in tables.items()
    }


def encounters_per_patient(database: Path) -> dict[str, int]:
    rows = query(
        database,
        "SELECT p.name, COUNT(e.id) FROM clinic_patient p LEFT JOIN django_encounters_encounter e"
        " ON e.subject_id = CAST(p.id AS TEXT) GROUP BY p.name",
    )
    return dict(rows)


# ---------------------------------------------------------------------------------------------
# seed_clinic
# ---------------------------------------------------------------------------------------------


def test_seed_clinic_seeds_once_and_adds_only_what_is_missing(tmp_path: Path) -> None:
    database = tmp_path / "clinic.sqlite3"
    manage(database, "migrate", "--noinput", "-v", "0")

    first = manage(database, "seed_clinic", "--patients", "12")
    seeded = counts(database)
    assert seeded["patients"] == 12
    assert (seeded["definitions"], seeded["definition versions"]) == (1, 1)
    assert seeded["users"] == 4  # admin and the three staff users
    assert seeded["encounters"] > 12 and seeded["transitions"] > seeded["encounters"]
    assert "Patients: 12 created (12 in total)" in first
    assert "Superuser 'admin' created." in first
    assert "Log in at http://127.0.0.1:8000/admin/ as admin / admin" in first
    names = [name for (name,) in query(database, "SELECT name FROM clinic_patient")]
    assert "Amara Okafor" in names and len(set(names)) == 12
    assert query(
        database, "SELECT is_superuser, is_staff FROM auth_user WHERE username = 'admin'"
    ) == [(1, 1)]
    # Every state of the visit, and visits entered late: effective days before their recording.
    states = {
        state for (state,) in query(database, "SELECT state FROM django_encounters_encounter")
    }
    assert states == {"scheduled", "checked_in", "in_progress", "completed", "cancelled"}
    backdated = query(
        database,
        "SELECT COUNT(*) FROM django_encounters_encountertransition"
        " WHERE julianday(transitioned_at) - julianday(effective_at) > 1",
    )[0][0]
    assert backdated > 0
    # Patient 0, the one the admin walkthrough follows, has a visit still to move on.
    assert query(
        database,
        "SELECT e.state FROM django_encounters_encounter e JOIN clinic_patient p"
        " ON e.subject_id = CAST(p.id AS TEXT) WHERE p.name = 'Amara Okafor'"
        " AND e.state = 'scheduled'",
    ) == [("scheduled",)]

    # Again: nothing added, nothing changed, no crash.
    per_patient = encounters_per_patient(database)
    again = manage(database, "seed_clinic", "--patients", "12", "--url", "http://h:9/admin/")
    assert counts(database) == seeded
    assert encounters_per_patient(database) == per_patient
    assert "Patients: 0 created (12 in total)" in again
    assert f"Visits: 0 created; {seeded['encounters']} in total" in again
    assert "Superuser 'admin' already exists: left as it is." in again
    assert "Log in at http://h:9/admin/ as admin / admin" in again

    # More patients: only the missing ones are added, with their visits.
    more = manage(database, "seed_clinic", "--patients", "15")
    grown = counts(database)
    assert "Patients: 3 created (15 in total)" in more
    assert grown["patients"] == 15 and grown["encounters"] > seeded["encounters"]
    assert (grown["definitions"], grown["users"]) == (1, 4)
    assert {
        name: n for name, n in encounters_per_patient(database).items() if name in per_patient
    } == per_patient

    # What was seeded is a clean log: the library's audit finds nothing.
    audit = subprocess.run(
        [sys.executable, str(MANAGE), "audit_encounters"],
        env=example_env(database),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_seed_clinic_before_migrate_says_to_migrate(tmp_path: Path) -> None:
    database = tmp_path / "empty.sqlite3"
    done = subprocess.run(
        [sys.executable, str(MANAGE), "seed_clinic"],
        env=example_env(database),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1
    assert "run `manage.py migrate` first" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# The served admin, in a browser
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The example clinic served as ``make admin-demo`` serves it (migrate, seed_clinic,
    runserver), on a fresh database: its URL and the database file."""
    tmp_path = tmp_path_factory.mktemp("clinic")
    database = tmp_path / "clinic.sqlite3"
    manage(database, "migrate", "--noinput", "-v", "0")
    manage(database, "seed_clinic", "--patients", "12")
    port = free_port()
    log = (tmp_path / "runserver.log").open("w")
    server = subprocess.Popen(
        [sys.executable, str(MANAGE), "runserver", f"127.0.0.1:{port}", "--noreload"],
        env=example_env(database),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"runserver exited: {(tmp_path / 'runserver.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/admin/login/", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"runserver did not answer within {SERVER_START_SECONDS} s")
            time.sleep(0.2)
        yield url, database
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
)


@needs_chromium
def test_find_a_patient_by_name_and_move_the_visit_on(
    driver: Any,  # noqa: F811 - the browser of tests/test_admin_browser.py
    clinic: tuple[str, Path],
) -> None:
    url, database = clinic
    driver.delete_all_cookies()
    person = Person(driver, url)
    person.log_in("admin", "admin")  # the superuser seed_clinic printed

    person.open("/admin/clinic/patient/", expect="#searchbar")
    person.screenshot("clinic-01-patients")
    person.find("#searchbar").send_keys("Okafor")
    person.find("#changelist-search input[type=submit]").click()
    person.wait_for("#result_list")
    found = [row.text for row in driver.find_elements("css selector", "#result_list th.field-name")]
    assert found == ["Amara Okafor"]
    person.screenshot("clinic-02-search-okafor")

    person.find("#result_list th.field-name a").click()
    person.wait_for("#patient-visits")
    assert person.find("#id_name").get_attribute("value") == "Amara Okafor"
    patient_page = driver.current_url
    person.screenshot("clinic-03-patient")
    person.find('tr.patient-visit[data-state="scheduled"] a.visit-link').click()
    assert person.text("#encounter-state") == "scheduled"
    encounter_id = re.search(r"/encounter/([0-9a-f-]{36})/change/", driver.current_url)
    assert encounter_id is not None, driver.current_url
    assert "Amara Okafor" in person.text(".field-subject_link")
    person.screenshot("clinic-04-visit")

    person.press_transition("checked_in")
    person.submit_transition(reason="Arrived at the front desk")
    assert person.text("#encounter-state") == "checked_in"
    assert "Moved from 'scheduled' to 'checked_in'" in person.text("ul.messagelist")
    person.screenshot("clinic-05-visit-checked-in")

    # In the database: the projection and the new row of the log, by admin, with the reason.
    pk = encounter_id.group(1).replace("-", "")
    assert query(
        database, "SELECT state, version FROM django_encounters_encounter WHERE id = ?", pk
    ) == [("checked_in", 1)]
    assert query(
        database,
        "SELECT t.from_state, t.to_state, t.reason, u.username"
        " FROM django_encounters_encountertransition t JOIN auth_user u"
        " ON u.id = t.transitioned_by_id WHERE t.encounter_id = ?",
        pk,
    ) == [("scheduled", "checked_in", "Arrived at the front desk", "admin")]

    # Back on the patient's page the visit shows its new state; the patient's encounter list
    # holds the patient's visits and nobody else's.
    driver.get(patient_page)
    person.wait_for("#patient-visits")
    visit = person.find(f'tr.patient-visit a[href*="{encounter_id.group(1)}"]')
    row = visit.find_element("xpath", "./ancestor::tr")
    assert row.get_attribute("data-state") == "checked_in"
    person.find("#patient-encounter-list").click()
    person.wait_for("#result_list")
    subjects = {
        cell.text
        for cell in driver.find_elements("css selector", "#result_list td.field-subject_link")
    }
    visits = query(
        database,
        "SELECT COUNT(*) FROM django_encounters_encounter e JOIN clinic_patient p"
        " ON e.subject_id = CAST(p.id AS TEXT) WHERE p.name = 'Amara Okafor'",
    )[0][0]
    assert len(driver.find_elements("css selector", "#result_list tbody tr")) == visits
    assert len(subjects) == 1 and next(iter(subjects)).startswith("Amara Okafor")
    person.screenshot("clinic-06-patient-encounter-list")


@needs_chromium
def test_without_the_encounter_permissions_the_patient_shows_no_visits(
    driver: Any,  # noqa: F811 - the browser of tests/test_admin_browser.py
    clinic: tuple[str, Path],
) -> None:
    """Someone who may see patients but not encounters finds the patient by name but is shown
    neither the visit columns nor the visits, and is told which permission it needs."""
    url, database = clinic
    manage(
        database,
        "shell",
        "-c",
        "from django.contrib.auth.models import Permission, User\n"
        "intern = User.objects.create_user('intern', password='intern-pw', is_staff=True)\n"
        "intern.user_permissions.add(Permission.objects.get(\n"
        "    content_type__app_label='clinic', codename='view_patient'))\n",
    )
    driver.delete_all_cookies()
    person = Person(driver, url)
    person.log_in("intern", "intern-pw")

    person.open("/admin/clinic/patient/?q=Okafor", expect="#result_list")
    names = driver.find_elements("css selector", "#result_list th.field-name")
    assert [cell.text for cell in names] == ["Amara Okafor"]
    assert not driver.find_elements("css selector", "#result_list .field-visits")
    assert not driver.find_elements("css selector", "#result_list .field-latest_visit")
    person.find("#result_list th.field-name a").click()
    assert "Can view encounter" in person.text("#patient-visits-hidden")
    assert not driver.find_elements("css selector", "#patient-visits a")
    person.screenshot("clinic-07-patient-without-encounter-permissions")
