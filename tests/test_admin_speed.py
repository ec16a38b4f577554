"""The admin's pages read a bounded number of queries, whatever the size of the log (issue 21):
the definition page does not mine the process map (it is loaded apart, for a window), the
encounter page reads the same queries for 5 rows as for 500, the list the same for 40
encounters as for 400. The times are measured in ``benchmarks/admin_pages.py`` (``make
bench``), at 15,000 and 20,000 encounters; here the data is bulk-loaded
(``benchmarks/loading.py``), valid and hash-chained, and the counts are compared across
sizes."""

from __future__ import annotations

from datetime import timedelta

import django
import pytest
from benchmarks.loading import load_encounters
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_encounters.projections.audit import audit_encounters

pytestmark = pytest.mark.django_db

#: Issue 21's bound for the definition page.
DEFINITION_PAGE_QUERIES = 15

#: How often the encounter's own row is read for its page: once; Django 4.2's change form
#: reads the object a second time itself (a query the library does not make).
ENCOUNTER_READS = 1 if django.VERSION >= (5, 0) else 2


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client


@pytest.fixture
def load(visit_definition, patient):
    """``load(count, path, definition=visit, **options)``: bulk-load encounters about the
    patient."""
    patient_type = ContentType.objects.get_for_model(patient)
    created = [0]

    def loaded(count, path, definition=visit_definition, **options):
        options.setdefault("first_created", timezone.now() - timedelta(days=5))
        options.setdefault("spacing", timedelta(minutes=1))
        ids = load_encounters(
            definition,
            count,
            path,
            subject_type=patient_type,
            subject_ids=[patient.pk],
            seed=created[0],
            **options,
        )
        created[0] += 1
        return ids

    return loaded


def queries_of(client, url):
    client.get(url)  # caches warmed (content types, the session)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries), response


def test_the_bulk_loaded_log_is_valid(load, visit_definition):
    load(20, ["checked_in", "in_progress", "completed"])
    report = audit_encounters(definition=visit_definition.code)
    assert len(report.encounters) == 20
    assert report.anomaly_count == 0
    assert {e.current_state for e in report.encounters} == {"completed"}


def test_definition_page_reads_a_bounded_number_of_queries_whatever_the_log(
    admin_client, load, visit_definition
):
    url = reverse("admin:django_encounters_encounterdefinition_change", args=[visit_definition.pk])
    load(30, ["checked_in", "in_progress", "completed"])
    few, _ = queries_of(admin_client, url)
    load(600, ["checked_in", "cancelled"])
    many, response = queries_of(admin_client, url)
    assert many == few
    assert many <= DEFINITION_PAGE_QUERIES
    # The process map is not on the page: it is loaded from its own URL.
    text = response.content.decode()
    assert 'id="process-map-panel"' in text
    assert (
        reverse(
            "admin:django_encounters_encounterdefinition_process_map", args=[visit_definition.pk]
        )
        in text
    )


@pytest.mark.skipif(not __import__("shutil").which("dot"), reason="Graphviz is not installed")
def test_the_process_map_is_loaded_apart_for_a_window(admin_client, load, visit_definition):
    now = timezone.now()
    load(3, ["checked_in", "cancelled"], first_created=now - timedelta(days=200))
    load(2, ["checked_in", "in_progress", "completed"], first_created=now - timedelta(days=2))
    url = reverse(
        "admin:django_encounters_encounterdefinition_process_map", args=[visit_definition.pk]
    )
    recent = admin_client.get(url).content.decode()
    assert "6 transitions of 2 encounters effective from" in recent
    assert 'class="process-map-window current" href="' in recent
    everything = admin_client.get(url, {"window": "all"}).content.decode()
    assert "12 transitions of 5 encounters, compared with" in everything


def test_the_process_map_needs_the_view_permission(client, django_user_model, visit_definition):
    staff = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(staff)
    url = reverse(
        "admin:django_encounters_encounterdefinition_process_map", args=[visit_definition.pk]
    )
    assert client.get(url).status_code == 403


def test_encounter_page_reads_the_same_queries_for_5_rows_as_for_500(
    admin_client, load, counter_definition
):
    (short,) = load(1, ["open"] * 5, definition=counter_definition)
    (long,) = load(1, ["open"] * 500, definition=counter_definition, step=timedelta(seconds=1))
    for name in ("change", "history"):
        few, _ = queries_of(
            admin_client, reverse(f"admin:django_encounters_encounter_{name}", args=[short])
        )
        many, response = queries_of(
            admin_client, reverse(f"admin:django_encounters_encounter_{name}", args=[long])
        )
        assert many == few, name
        assert len(response.context["timeline"]) == 50
        assert response.context["timeline_page"].total == 500


#: The encounter page's queries (session and user included) for a user who may transition it;
#: Django 4.2's change form makes two of its own more (the second read of the object above).
ENCOUNTER_PAGE_QUERIES = 13 if django.VERSION >= (5, 0) else 15


def test_encounter_page_reads_the_encounter_and_its_definition_once(
    admin_client, load, counter_definition
):
    """The status panel and Django's change form share the encounter read for the page, and
    the pinned version's definition is the encounter's own: each row is read once (the
    timeline's verifying replay reads the encounter's genesis and projection columns apart)."""
    (long,) = load(1, ["open"] * 500, definition=counter_definition, step=timedelta(seconds=1))
    url = reverse("admin:django_encounters_encounter_change", args=[long])
    admin_client.get(url)
    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(url)
    assert response.status_code == 200
    encounter_rows = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('SELECT "django_encounters_encounter"."id", ')
    ]
    definition_rows = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('SELECT "django_encounters_encounterdefinition"."id", ')
        and '"django_encounters_encounterdefinition"."created_at"' in q["sql"]
    ]
    assert len(encounter_rows) == ENCOUNTER_READS, encounter_rows
    assert len(definition_rows) == 1, definition_rows
    assert len(queries) <= ENCOUNTER_PAGE_QUERIES, [q["sql"][:120] for q in queries]
    assert [row.sequence for row in response.context["timeline"]][:2] == [500, 499]


def test_encounter_history_reads_the_encounter_once(admin_client, load, counter_definition):
    (long,) = load(1, ["open"] * 50, definition=counter_definition, step=timedelta(seconds=1))
    url = reverse("admin:django_encounters_encounter_history", args=[long])
    admin_client.get(url)
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.get(url).status_code == 200
    encounter_rows = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('SELECT "django_encounters_encounter"."id", ')
    ]
    assert len(encounter_rows) == ENCOUNTER_READS, encounter_rows


def test_a_saved_edit_reads_the_encounter_again_under_its_lock(
    admin_client, load, counter_definition
):
    """The shared read is for a page that is only shown: a save is compared with the row read
    under the edit form's lock (``SELECT … FOR UPDATE`` where the database has it)."""
    (pk,) = load(1, ["open"] * 3, definition=counter_definition)
    url = reverse("admin:django_encounters_encounter_change", args=[pk])
    admin_client.get(url)
    with CaptureQueriesContext(connection) as queries:
        assert admin_client.post(url, {"notes": "x"}).status_code in (200, 302)
    encounter_rows = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].startswith('SELECT "django_encounters_encounter"."id", ')
    ]
    assert len(encounter_rows) >= 2, encounter_rows


def test_encounter_list_reads_the_same_queries_for_40_encounters_as_for_400(admin_client, load):
    url = reverse("admin:django_encounters_encounter_changelist")
    load(40, ["checked_in"])
    few, _ = queries_of(admin_client, url)
    load(360, ["checked_in", "cancelled"])
    many, response = queries_of(admin_client, url)
    assert many == few
    assert response.context["cl"].result_count == 400


def test_the_lists_years_are_the_years_with_encounters(admin_client, load):
    """The date hierarchy's years, probed one by one (not one truncated time per row): a
    year in between with no encounter is not offered."""
    now = timezone.now()
    load(3, ["checked_in"], first_created=now - timedelta(days=3 * 366), spacing=timedelta(0))
    load(3, ["checked_in"], first_created=now - timedelta(days=1), spacing=timedelta(0))
    page = admin_client.get(reverse("admin:django_encounters_encounter_changelist"))
    text = page.content.decode()
    first, last = (now - timedelta(days=3 * 366)).year, (now - timedelta(days=1)).year
    for year in (first, last):
        assert f"created_at__year={year}" in text
    for year in range(first + 1, last):
        assert f"created_at__year={year}" not in text
    drilled = admin_client.get(
        reverse("admin:django_encounters_encounter_changelist"), {"created_at__year": last}
    )
    assert drilled.status_code == 200 and drilled.context["cl"].result_count == 3
