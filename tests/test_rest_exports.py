"""Exports over HTTP: ``GET event-log/?format=…`` streamed (every format of the ``event-log``
report, the selection of ``export_encounter_log``, ``exclude_deleted``; read back by pm4py;
memory flat from 2,000 to 20,000 encounters) and ``GET encounters/{id}/fhir/`` (validated with
fhir.resources), both behind the export permissions; ``export_encounter_log
--exclude-deleted``."""

from __future__ import annotations

import io
import json
import os
import threading
import tracemalloc

import pytest
from django.contrib.auth.models import Permission, User
from rest_framework.test import APIClient

from django_encounters.contrib.rest_framework.exports import stream_report
from django_encounters.contrib.rest_framework.views import EncounterViewSet
from django_encounters.projections.event_log import export_event_log
from django_encounters.projections.fhir import encounter_resource, to_fhir_r4_status_history
from django_encounters.projections.output import formats, get_format
from django_encounters.services import create_encounter, transition
from tests.helpers import run_command
from tests.test_rest_api import assert_problem, url

pytestmark = pytest.mark.django_db

pm4py = pytest.importorskip("pm4py")

LOG = "/api/event-log/"
#: The VISIT states as FHIR R4 encounter-status codes.
R4_MAP = {
    "scheduled": "planned",
    "checked_in": "arrived",
    "in_progress": "in-progress",
    "completed": "finished",
    "cancelled": "cancelled",
}
R5_MAP = {**R4_MAP, "checked_in": "planned", "completed": "completed"}


def client_with(username, *codenames):
    user = User.objects.create_user(username=username)
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_encounters", codename__in=codenames
        )
    )
    client = APIClient()
    client.force_authenticate(User.objects.get(pk=user.pk))
    return client


@pytest.fixture
def exporter():
    return client_with("exporter", "view_encounter", "view_encountertransition")


@pytest.fixture
def visits(visit_definition, patient, device, user):
    made = []
    for path in (["checked_in", "in_progress", "completed"], ["checked_in", "cancelled"], []):
        visit = create_encounter(visit_definition, patient)
        for state in path:
            transition(visit, state, transitioned_by=user, reason=f"to {state}")
        made.append(visit)
    gone = create_encounter(visit_definition, device)
    transition(gone, "cancelled")
    gone.delete()
    return {"kept": made, "gone": gone}


def body_of(response) -> str:
    assert response.streaming
    return b"".join(response.streaming_content).decode("utf-8")


def exported(fmt: str, **selection) -> str:
    out = io.StringIO(newline="")
    export_event_log(fmt, out, **selection)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# The event log
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", formats("event-log"))
def test_every_registered_format_is_served_as_the_command_writes_it(exporter, visits, fmt):
    response = exporter.get(LOG, {"format": fmt, "definition": "VISIT"})
    assert response.status_code == 200
    assert response["Content-Type"] == f"{get_format('event-log', fmt).content_type}; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="encounters-VISIT.{fmt}"'
    assert body_of(response) == exported(fmt, definition="VISIT")


def test_the_xes_over_http_is_read_by_pm4py(exporter, visits, tmp_path):
    path = tmp_path / "log.xes"
    path.write_text(body_of(exporter.get(LOG, {"format": "xes"})), encoding="utf-8")
    log = pm4py.read_xes(str(path))
    assert log["case:concept:name"].nunique() == 4  # the soft-deleted one included, marked
    dfg, _start, _end = pm4py.discover_dfg(log)
    assert dfg[("scheduled", "checked_in")] == 2
    assert dfg[("in_progress", "completed")] == 1


def test_exclude_deleted_leaves_soft_deleted_encounters_out(exporter, visits):
    everything = body_of(exporter.get(LOG, {"format": "csv"}))
    kept = body_of(exporter.get(LOG, {"format": "csv", "exclude_deleted": "true"}))
    gone = str(visits["gone"].pk)
    assert gone in everything and gone not in kept
    assert all(str(visit.pk) in kept for visit in visits["kept"])
    assert kept == exported("csv", exclude_deleted=True)
    assert everything == exported("csv")


def test_the_command_has_exclude_deleted_too(visits):
    code, out, _err = run_command("export_encounter_log", "--format", "xes", "--exclude-deleted")
    assert code == 0
    assert str(visits["gone"].pk) not in out
    assert all(str(visit.pk) in out for visit in visits["kept"])
    code, out, _err = run_command("export_encounter_log", "--format", "xes")
    assert str(visits["gone"].pk) in out


@pytest.mark.parametrize(
    "query, field, message",
    [
        ({}, "format", "This field is required."),
        ({"format": "pdf"}, "format", '"pdf" is not a valid choice.'),
        (
            {"format": "xes", "definition": "NOPE"},
            "definition",
            "No definition has the code 'NOPE'.",
        ),
        (
            {"format": "xes", "since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"},
            "until",
            "until must be later than since.",
        ),
        (
            {"format": "xes", "known_at": "2024-05-01T09:30:00"},
            "known_at",
            "known_at must include a UTC offset (e.g. 2024-05-01T09:30:00+02:00 or "
            "2024-05-01T07:30:00Z), got '2024-05-01T09:30:00'.",
        ),
    ],
)
def test_a_bad_selection_is_a_400_problem_before_any_byte(exporter, visits, query, field, message):
    response = exporter.get(LOG, query)
    assert not response.streaming
    body = assert_problem(response, 400, "urn:django-encounters:problem:invalid-input")
    assert body["errors"] == {field: [message]}


@pytest.mark.parametrize(
    "codenames", [(), ("view_encounter",), ("view_encountertransition",)], ids=["none", "enc", "tr"]
)
def test_the_exports_need_both_view_permissions(visits, codenames):
    client = client_with("someone", *codenames)
    assert_problem(client.get(LOG, {"format": "xes"}), 403, "about:blank")
    assert_problem(client.get(url(visits["kept"][0], "fhir")), 403, "about:blank")
    assert_problem(APIClient().get(LOG, {"format": "xes"}), 403, "about:blank")


def test_stream_report_raises_the_writers_error_and_stops_the_writer_when_closed():
    def failing(items, out, **kwargs):
        for item in items:
            out.write(f"{item}\n")
            if item == 2:
                raise RuntimeError("disk on fire")

    chunks = stream_report(failing, range(5), chunk_size=1)
    assert next(chunks) == b"0\n"
    with pytest.raises(RuntimeError, match="disk on fire"):
        list(chunks)

    before = threading.active_count()
    endless = stream_report(
        lambda items, out: [out.write(f"{i}\n") for i in items], iter(int, 1), chunk_size=1
    )
    assert next(endless) == b"0\n"
    endless.close()  # the client went away: the writer's thread ends
    assert threading.active_count() == before


# ---------------------------------------------------------------------------------------------
# FHIR
# ---------------------------------------------------------------------------------------------


def test_fhir_r4_is_an_encounter_with_its_status_history(exporter, visits, monkeypatch):
    from fhir.resources.R4B.encounter import Encounter as R4BEncounter

    monkeypatch.setattr(EncounterViewSet, "fhir_status_map", R4_MAP)
    visit = visits["kept"][0]
    response = exporter.get(url(visit, "fhir"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/fhir+json; fhirVersion=4.0"
    assert response["ETag"] == '"3"'
    body = json.loads(response.content)
    assert body["resourceType"] == "Encounter"
    assert (body["id"], body["status"]) == (str(visit.pk), "finished")
    assert body["statusHistory"] == to_fhir_r4_status_history(visit, R4_MAP)
    assert body == encounter_resource(visit, "R4", R4_MAP)  # the whole resource, identifier too
    assert body["identifier"][0]["value"].endswith(str(visit.pk))
    R4BEncounter.model_validate(body)


def test_fhir_r5_is_a_bundle_of_the_encounter_and_its_histories(exporter, visits, monkeypatch):
    from fhir.resources.bundle import Bundle
    from fhir.resources.encounter import Encounter as R5Encounter
    from fhir.resources.encounterhistory import EncounterHistory

    monkeypatch.setattr(EncounterViewSet, "fhir_status_map", R5_MAP)
    visit = visits["kept"][1]
    response = exporter.get(url(visit, "fhir"), {"version": "R5"})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/fhir+json; fhirVersion=5.0"
    body = json.loads(response.content)
    Bundle.model_validate(body)
    resources = [entry["resource"] for entry in body["entry"]]
    assert [(r["resourceType"], r["status"]) for r in resources] == [
        ("Encounter", "cancelled"),
        ("EncounterHistory", "planned"),
        ("EncounterHistory", "cancelled"),
    ]
    assert resources[0] == encounter_resource(visit, "R5", R5_MAP)
    R5Encounter.model_validate(resources[0])  # the Bundle's model does not check its entries
    for history in resources[1:]:
        EncounterHistory.model_validate(history)


def test_fhir_of_states_without_a_code_is_a_409_problem(exporter, visits):
    visit = visits["kept"][0]
    problem = assert_problem(
        exporter.get(url(visit, "fhir")),
        409,
        "urn:django-encounters:problem:no-fhir-status",
        state="scheduled",
        fhir_version="R4",
    )
    assert "status_map does not map it" in problem["detail"]
    assert_problem(
        exporter.get(url(visit, "fhir"), {"version": "R6"}),
        400,
        "urn:django-encounters:problem:invalid-input",
    )
    assert_problem(exporter.get(url(visits["gone"], "fhir")), 404, "about:blank")


# ---------------------------------------------------------------------------------------------
# Constant memory
# ---------------------------------------------------------------------------------------------


def _load(count: int, start: int) -> None:
    """``count`` more ping-pong encounters with 3 rows each, with the benchmarks' bulk loader
    (hash-chained rows, correct projections, raw SQL)."""
    from benchmarks import run as bench

    schema = bench.Schema()
    bench.generate(schema, bench.make_definition(), start, count, 3)


def _peak_while_streaming(client, fmt: str) -> tuple[int, int]:
    response = client.get(LOG, {"format": fmt, "definition": "BENCH"})
    tracemalloc.start()
    try:
        size = sum(len(chunk) for chunk in response.streaming_content)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return size, peak


#: The memory test (~90 s) runs in `make test`'s SQLite and PostgreSQL passes; CI's other
#: passes (Django matrix, prepared statements, Citus) change nothing it measures.
MAIN_PASS = not (
    os.environ.get("ENCOUNTERS_TEST_MATRIX")
    or os.environ.get("ENCOUNTERS_TEST_PG_PREPARED")
    or os.environ.get("ENCOUNTERS_TEST_DB") == "citus"
)


@pytest.mark.slow
@pytest.mark.skipif(not MAIN_PASS, reason="measured in make test's SQLite and PostgreSQL passes")
@pytest.mark.django_db(transaction=True)
def test_the_streamed_log_keeps_memory_flat_from_2k_to_20k_encounters():
    admin = User.objects.create_superuser("bulk", "b@example.com", "pw")
    client = APIClient()
    client.force_authenticate(admin)
    _load(2_000, 0)
    small = {fmt: _peak_while_streaming(client, fmt) for fmt in ("xes", "csv")}
    _load(18_000, 2_000)
    for fmt in ("xes", "csv"):
        (small_size, small_peak), (large_size, large_peak) = (
            small[fmt],
            _peak_while_streaming(client, fmt),
        )
        assert large_size > 9 * small_size  # ten times the log…
        # …in about the same memory: one batch of encounters and one chunk, not the whole log.
        assert large_peak < small_peak * 1.25 + 1_000_000, (fmt, small_peak, large_peak)
        assert large_peak < large_size / 2, (fmt, large_peak, large_size)


# ---------------------------------------------------------------------------------------------
# Under ASGI: streamed by the event loop, chunk by chunk
# ---------------------------------------------------------------------------------------------


def _asgi_get(path: str, query: str, user: str, password: str, seen=lambda: None) -> list[dict]:
    """What an ASGI server receives from Django's ``ASGIHandler`` for ``GET path?query`` (HTTP
    Basic authentication): the ``http.response.*`` messages, in order, each with ``"seen"``:
    what ``seen()`` said when it was sent."""
    import asyncio
    import base64

    from asgiref.sync import async_to_sync
    from django.core.handlers.asgi import ASGIHandler

    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Basic {credentials}".encode())],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }
    incoming = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append({**message, "seen": seen()})

    async_to_sync(ASGIHandler())(scope, receive, send)
    return sent


@pytest.mark.django_db(transaction=True)
def test_under_asgi_the_log_is_sent_chunk_by_chunk_not_read_whole_first(
    visit_definition, patient, recwarn, monkeypatch
):
    """Django under ASGI reads a synchronous streaming body whole before sending it (and warns
    "StreamingHttpResponse must consume synchronous iterators"): the export is served as an
    asynchronous iterator there, so the server gets one message per chunk, as it is produced,
    and the bytes are the command's."""
    from django_encounters.contrib.rest_framework import exports, views

    for _ in range(30):
        visit = create_encounter(visit_definition, patient)
        transition(visit, "checked_in", reason="x" * 200)
    user = User.objects.create_user(username="exporter", password="pw")
    user.user_permissions.set(
        Permission.objects.filter(
            content_type__app_label="django_encounters",
            codename__in=["view_encounter", "view_encountertransition"],
        )
    )
    monkeypatch.setattr(exports, "CHUNK_SIZE", 1024)  # several chunks from a small log
    read = [0]  # traces read from the database so far
    every = views.iter_traces

    def counted(**selection):
        for trace in every(**selection):
            read[0] += 1
            yield trace

    monkeypatch.setattr(views, "iter_traces", counted)

    sent = _asgi_get(LOG, "format=csv&definition=VISIT", "exporter", "pw", lambda: read[0])

    start, *bodies = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert all(m["type"] == "http.response.body" for m in bodies)
    chunks = [m["body"] for m in bodies if m.get("body")]
    assert len(chunks) > 3, len(chunks)  # one message per chunk, not one for the whole log
    assert all(m.get("more_body") for m in bodies[:-1]) and not bodies[-1].get("more_body")
    assert bodies[0]["seen"] < 30 == read[0]  # the first chunk left before the log was read
    assert b"".join(chunks).decode("utf-8") == exported("csv", definition="VISIT")
    assert not [w for w in recwarn if "synchronous iterators" in str(w.message)]
