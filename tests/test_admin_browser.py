"""The encounter admin in a real browser: headless Chromium driven by Selenium against
pytest-django's ``live_server``. A person logs in, opens an encounter, presses a transition
button, gives a reason and sees the new state and timeline row; a refused transition shows the
validator's message; a stale page in a second tab is refused.

Each page visited is saved as a PNG under ``build/screenshots/`` (or
``$ENCOUNTERS_SCREENSHOT_DIR``) for a person to look at. Skipped when ``chromium`` or
``chromedriver`` is not installed (``apt-get install chromium chromium-driver``; ``.ci/run``
installs them).

The live server runs in another thread and needs committed data, hence
``django_db(transaction=True)``. On SQLite the test database is in memory with a shared
cache; pytest-django's live server shares the test's connection with its thread, so both see
the same database.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from django.contrib.contenttypes.models import ContentType
from django.utils import timezone

from django_encounters.models import Encounter, EncounterTransition
from django_encounters.services import transition
from tests.helpers import SCREENSHOTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
    ),
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
]

SCREENSHOT_DIR = Path(
    os.environ.get("ENCOUNTERS_SCREENSHOT_DIR")
    or Path(__file__).resolve().parents[1] / "build" / "screenshots"
)
#: How long to wait for a page to show what a step expects.
WAIT_SECONDS = 20


def chromium(request, width=1600, height=1200):
    """A headless Debian Chromium ``width`` x ``height`` for a module's tests (a generator for a
    fixture to yield from): its own profile, removed afterwards, screenshots kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="encounters-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # The machine may have no network: without these Chromium waits on connections.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    browser.set_page_load_timeout(60)
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)
    request.config.stash[SCREENSHOTS] = SCREENSHOT_DIR


@pytest.fixture(scope="module")
def driver(request):
    yield from chromium(request)


class Person:
    """What a person does in the browser, with a screenshot of each page seen."""

    def __init__(self, driver, base_url):
        self.driver = driver
        self.base_url = base_url

    def wait_for(self, css):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, WAIT_SECONDS).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, css))
        )

    def find(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css):
        return self.wait_for(css).text

    def open(self, path, expect="#content"):
        self.driver.get(self.base_url + path)
        self.wait_for(expect)

    def screenshot(self, name):
        self.driver.save_screenshot(str(SCREENSHOT_DIR / f"{name}.png"))

    def log_in(self, username, password):
        self.open("/admin/login/?next=/admin/", expect="#id_username")
        self.find("#id_username").send_keys(username)
        self.find("#id_password").send_keys(password)
        self.find("input[type=submit]").click()
        self.wait_for("#user-tools")

    def press_transition(self, state):
        self.find(f'a.transition-button[data-state="{state}"]').click()
        self.wait_for("#transition_form")

    def submit_transition(self, reason="", context=None):
        if reason:
            self.find("#id_reason").send_keys(reason)
        if context is not None:
            self.find("#id_context").send_keys(context)
        self.find("#submit-transition").click()
        self.wait_for("ul.messagelist")


@pytest.fixture
def person(driver, live_server, django_user_model):
    django_user_model.objects.create_superuser("admin", "admin@example.com", "correct horse")
    driver.delete_all_cookies()
    someone = Person(driver, live_server.url)
    someone.log_in("admin", "correct horse")
    return someone


def change_path(encounter):
    return f"/admin/django_encounters/encounter/{encounter.pk}/change/"


def test_transition_from_the_encounter_page(person, encounter):
    person.open("/admin/django_encounters/encounter/")
    person.screenshot("01-encounter-list")
    person.find("th.field-short_id a").click()
    person.wait_for("#encounter-state")
    assert person.text("#encounter-state") == "scheduled"
    person.screenshot("02-encounter-page")

    person.press_transition("checked_in")
    person.screenshot("03-transition-form")
    person.submit_transition(reason="Patient arrived at the front desk")

    assert person.text("#encounter-state") == "checked_in"
    assert "Moved from 'scheduled' to 'checked_in'" in person.text("ul.messagelist")
    row = person.text('#encounter-timeline tr[data-sequence="1"]')
    assert "scheduled → checked_in" in row
    assert "Patient arrived at the front desk" in row
    assert "admin" in row
    recorded = EncounterTransition.objects.get(encounter=encounter)
    assert timezone.localtime(recorded.effective_at).strftime("%Y-%m-%d %H:%M:%S") in row
    person.screenshot("04-after-transition")

    person.find("a.historylink").click()
    person.wait_for("#encounter-timeline")
    assert "Patient arrived at the front desk" in person.text("#encounter-timeline")
    person.screenshot("05-history")


def test_refused_transition_shows_the_validators_message(person, validated_encounter):
    transition(validated_encounter, "checked_in", reason="arrived")
    person.open(change_path(validated_encounter), expect="#encounter-state")
    person.press_transition("in_progress")
    person.submit_transition(reason="doctor is ready", context='{"room": 4}')

    message = person.text("ul.messagelist")
    assert "Refused, nothing was changed" in message
    assert "RequiredFieldsValidator" in message and "started_at" in message
    person.screenshot("06-refused-by-validator")
    stored = Encounter.objects.get(pk=validated_encounter.pk)
    assert (stored.state, stored.version) == ("checked_in", 1)


def test_stale_page_in_a_second_tab_is_refused(person, encounter):
    driver = person.driver
    person.open(change_path(encounter), expect="#encounter-state")
    first = driver.current_window_handle
    driver.switch_to.new_window("tab")
    person.open(change_path(encounter), expect="#encounter-state")
    second = driver.current_window_handle

    driver.switch_to.window(first)
    person.press_transition("checked_in")
    person.submit_transition(reason="arrived")
    assert person.text("#encounter-state") == "checked_in"

    driver.switch_to.window(second)  # still shows 'scheduled', version 0
    assert person.text("#encounter-state") == "scheduled"
    person.screenshot("07-stale-page")
    person.press_transition("cancelled")
    person.submit_transition(reason="no-show")

    message = person.text("ul.messagelist")
    assert "moved on after your page was loaded" in message
    assert "your page showed version 0; it is now at version 1, in 'checked_in'" in message
    assert person.find("#id_reason").get_attribute("value") == "no-show"  # kept
    person.screenshot("08-stale-page-refused")
    stored = Encounter.objects.get(pk=encounter.pk)
    assert (stored.state, stored.version) == ("checked_in", 1)
    driver.close()
    driver.switch_to.window(first)


def test_backdated_row_and_soft_delete_pages(person, employment, past):
    transition(employment, "working", effective_at=past(10), reason="first day")
    transition(employment, "finished", effective_at=past(1), reason="contract over")
    transition(employment, "onleave", effective_at=past(5), reason="leave", context={"days": 3})
    when = timezone.localtime(past(3)).strftime("%Y-%m-%d %H:%M:%S")
    person.open(change_path(employment), expect="#encounter-state")
    person.find("#id_state_at").send_keys(when)
    person.find("#state-at input[type=submit]").click()
    assert "the state was onleave" in person.text("#state-at-answer")
    assert "overtaken by #3" in person.text('#encounter-timeline tr[data-sequence="2"]')
    assert "backdated" in person.text('#encounter-timeline tr[data-sequence="3"]')
    person.screenshot("09-timeline-backdated-and-state-at")

    person.find("a.deletelink").click()
    person.wait_for("input[type=submit]")
    assert "Soft-delete the encounter" in person.text("#content")
    person.screenshot("10-soft-delete-confirmation")
    person.find("input[type=submit]").click()
    assert "soft-deleted" in person.text("ul.messagelist")
    person.open(change_path(employment), expect="#encounter-deleted")
    person.screenshot("11-soft-deleted-encounter")
    person.find("#restore-encounter").click()
    assert "was restored" in person.text("ul.messagelist")
    assert not Encounter.objects.get(pk=employment.pk).is_deleted


def test_add_encounter_form(person, visit_definition, patient):
    person.open("/admin/django_encounters/encounter/add/", expect="#id_subject_id")
    person.screenshot("12-add-encounter")
    from selenium.webdriver.support.ui import Select

    Select(person.find("#id_definition")).select_by_visible_text(visit_definition.name)
    patient_type = ContentType.objects.get_for_model(patient)
    Select(person.find("#id_subject_content_type")).select_by_value(str(patient_type.pk))
    person.find("#id_subject_id").send_keys("424242")
    person.find("input[name=_save]").click()
    assert "There is no patient with id" in person.text(".errorlist")
    person.screenshot("13-add-encounter-missing-subject")
    person.find("#id_subject_id").clear()
    person.find("#id_subject_id").send_keys(str(patient.pk))
    person.find("input[name=_save]").click()
    person.wait_for("ul.messagelist")
    created = Encounter.objects.get()
    assert created.subject == patient and created.state == "scheduled"


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz (dot) is not installed")
def test_definition_page_shows_the_machine_and_the_process_map(person, visit_definition, patient):
    """The pictures are really drawn by the browser: each image has loaded and has a size."""
    from django_encounters.services import create_encounter, transition

    for _ in range(3):
        visit = create_encounter(visit_definition, patient)
        transition(visit, "checked_in")
    transition(visit, "cancelled")
    person.open(
        f"/admin/django_encounters/encounterdefinition/{visit_definition.pk}/change/",
        expect="#definition-diagram",
    )
    for element in ("#definition-diagram img", "#process-map img"):
        image = person.wait_for(element)  # the process map is loaded after the page
        width = person.driver.execute_script(
            "return arguments[0].complete ? arguments[0].naturalWidth : 0;", image
        )
        assert width > 100, f"{element} was not drawn"
    assert "4 transitions of 3 encounters" in person.text("#process-map")
    person.driver.execute_script(
        "document.getElementById('process-map').scrollIntoView({block: 'start'});"
    )
    person.screenshot("14-definition-process-map")
    person.driver.execute_script("window.scrollTo(0, 0);")
