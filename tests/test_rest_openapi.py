"""The REST API's OpenAPI schema, generated both ways — Django REST framework's
``manage.py generateschema`` and drf-spectacular's generator — is valid OpenAPI
(``openapi-spec-validator``), describes each action as it is (transition's body and its 200,
create's body, the query parameters, ``If-Match``/``ETag``, 304/412/428 and
``application/problem+json`` responses), and drives a client: :class:`SchemaClient` builds every
operation's request from the schema alone (its paths, parameters, request bodies and documented
examples) and checks each live answer's status and body against the documented responses with
``jsonschema``."""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

import jsonschema
import pytest
from django.contrib.auth.models import User
from django.test import override_settings
from openapi_spec_validator import validate
from rest_framework.test import APIClient

from django_encounters.contrib.rest_framework.views import EncounterViewSet
from tests.helpers import run_command
from tests.test_rest_exports import R4_MAP

pytestmark = pytest.mark.django_db

PROBLEM = "application/problem+json"


def drf_schema() -> dict:
    code, out, err = run_command("generateschema", "--format", "openapi-json")
    assert code == 0, err
    return json.loads(out)


def spectacular_schema() -> dict:
    from django.conf import settings
    from drf_spectacular.generators import SchemaGenerator

    with override_settings(
        REST_FRAMEWORK={
            **settings.REST_FRAMEWORK,
            "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
        }
    ):
        schema = SchemaGenerator(title="encounters", version="1").get_schema(public=True)
    return json.loads(json.dumps(schema, default=str))


GENERATORS = {"drf": drf_schema, "spectacular": spectacular_schema}


_GENERATED: dict[str, dict] = {}


@pytest.fixture(params=sorted(GENERATORS))
def schema(request):
    """The schema of one generator (generated once per run: it depends on no row)."""
    if request.param not in _GENERATED:
        generated = GENERATORS[request.param]()
        validate(generated)  # valid OpenAPI 3.0 (openapi-spec-validator)
        _GENERATED[request.param] = generated
    return copy.deepcopy(_GENERATED[request.param])


# ---------------------------------------------------------------------------------------------
# What the schema says
# ---------------------------------------------------------------------------------------------


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def operation(schema, path, method):
    return schema["paths"][f"/api/{path}"][method]


def test_transition_is_described_as_it_is(schema):
    op = operation(schema, "encounters/{id}/transition/", "post")
    body = resolve(schema, op["requestBody"]["content"]["application/json"]["schema"])
    assert {"to_state", "reason", "effective_at", "context"} <= set(body["properties"])
    assert body["required"] == ["to_state"]
    assert "201" not in op["responses"]
    answer = resolve(schema, op["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(answer["properties"]) == {"encounter", "transition"}
    assert "ETag" in op["responses"]["200"]["headers"]
    headers = {p["name"] for p in op["parameters"] if p["in"] == "header"}
    assert headers == {"If-Match"}
    for code in ("400", "404", "409", "412", "413", "415", "422", "428"):
        content = op["responses"][code]["content"]
        assert list(content) == [PROBLEM], code
        problem = resolve(schema, content[PROBLEM]["schema"])
        assert {"type", "title", "status", "detail", "instance"} <= set(problem["properties"])


def test_create_reads_and_lists_are_described_as_they_are(schema):
    create = operation(schema, "encounters/", "post")
    body = resolve(schema, create["requestBody"]["content"]["application/json"]["schema"])
    assert {"definition", "subject_type", "subject_id", "metadata"} <= set(body["properties"])
    assert sorted(body["required"]) == ["definition", "subject_id", "subject_type"]
    assert set(create["responses"]["201"]["headers"]) == {"ETag", "Location"}
    listing = operation(schema, "encounters/", "get")
    assert {p["name"] for p in listing["parameters"]} >= {
        "state",
        "definition",
        "as_of",
        "known_at",
        "page",
    }
    state_at = operation(schema, "encounters/{id}/state-at/", "get")
    at = next(p for p in state_at["parameters"] if p["name"] == "at")
    assert (at["in"], at["required"]) == ("query", True)
    assert {"200", "304"} <= set(state_at["responses"])
    log = operation(schema, "event-log/", "get")
    fmt = next(p for p in log["parameters"] if p["name"] == "format")
    assert set(fmt["schema"]["enum"]) >= {"xes", "csv"}
    assert set(log["responses"]["200"]["content"]) >= {"application/xml", "text/csv"}


# ---------------------------------------------------------------------------------------------
# A client generated from the schema
# ---------------------------------------------------------------------------------------------


def as_json_schema(node: Any) -> Any:
    """An OpenAPI 3.0 schema object as JSON Schema: ``nullable`` becomes a null alternative."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: as_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable"):
        if "type" in result and "$ref" not in result:
            result["type"] = [result["type"], "null"]
            if "enum" in result:
                result["enum"] = [*result["enum"], None]
        else:
            result = {"anyOf": [result, {"type": "null"}]}
    return result


def example_of(thing: dict) -> Any:
    """The documented example of a parameter or a media type (either generator's form)."""
    if "example" in thing:
        return thing["example"]
    if thing.get("examples"):
        return next(iter(thing["examples"].values()))["value"]
    return None


class SchemaClient:
    """Calls an operation of an OpenAPI schema with DRF's ``APIClient``, knowing nothing of the
    API but the schema: the path's parameters from ``values``, the required query parameters
    and the JSON body from the documented examples (with ``values`` put over them: the ids of
    rows only the database knows), and checks the answer against the documented responses."""

    def __init__(self, schema: dict, client: APIClient) -> None:
        self.schema = schema
        self.client = client
        self.components = as_json_schema(schema.get("components", {}))

    def operations(self):
        for path, item in self.schema["paths"].items():
            for method, op in item.items():
                yield path, method, op

    def call(self, path: str, method: str, values: dict, headers: dict | None = None) -> Any:
        op = self.schema["paths"][path][method]
        query = {}
        for parameter in op.get("parameters", []):
            if parameter["in"] == "path":
                path = path.replace(f"{{{parameter['name']}}}", str(values[parameter["name"]]))
            elif parameter["in"] == "query" and parameter.get("required"):
                query[parameter["name"]] = values.get(parameter["name"], example_of(parameter))
        assert "{" not in path, path
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        extra = {f"HTTP_{k.upper().replace('-', '_')}": v for k, v in (headers or {}).items()}
        if "requestBody" in op:
            body = copy.deepcopy(example_of(op["requestBody"]["content"]["application/json"]))
            assert isinstance(body, dict), f"{method} {path}: no documented example"
            body.update(values.get("body", {}))
            response = getattr(self.client, method)(path, body, format="json", **extra)
        else:
            response = getattr(self.client, method)(path, **extra)
        self.check(op, method, path, response)
        return response

    def check(self, op: dict, method: str, path: str, response: Any) -> None:
        documented = op["responses"].get(str(response.status_code))
        content = b"".join(response.streaming_content) if response.streaming else response.content
        where = f"{method.upper()} {path} -> {response.status_code}"
        assert documented is not None, f"{where} is not documented: {content[:500]!r}"
        for header in documented.get("headers", {}):
            if header != "Location" or response.status_code == 201:
                assert response.has_header(header), f"{where}: no {header} header"
        if not documented.get("content"):
            assert content == b"", where
            return
        media = response["Content-Type"].split(";")[0].strip()
        assert media in documented["content"], (
            f"{where}: {media} not in {list(documented['content'])}"
        )
        body_schema = as_json_schema(documented["content"][media].get("schema", {}))
        if media.endswith("json"):
            instance = json.loads(content)
        else:
            instance = content.decode("utf-8")
        validator = jsonschema.Draft202012Validator({**body_schema, "components": self.components})
        errors = sorted(validator.iter_errors(instance), key=str)
        assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"


@pytest.fixture
def admin_client():
    client = APIClient()
    client.force_authenticate(User.objects.create_superuser("api", "api@example.com", "pw"))
    return client


def test_a_client_generated_from_the_schema_calls_every_operation(
    schema, admin_client, visit_definition, patient, monkeypatch
):
    monkeypatch.setattr(EncounterViewSet, "fhir_status_map", R4_MAP)
    client = SchemaClient(schema, admin_client)
    subject = {"subject_type": "testapp.patient", "subject_id": str(patient.pk)}
    # Create first (from the documented example), then every other operation on that encounter.
    created = client.call("/api/encounters/", "post", {"body": subject})
    assert created.status_code == 201
    values = {"id": created.json()["id"]}
    order = sorted(client.operations(), key=lambda o: (o[1] == "post", "transition" in o[0], o[0]))
    called = {("/api/encounters/", "post"): created.status_code}
    for path, method, _op in order:
        if (path, method) in called:
            continue
        response = client.call(path, method, values)
        called[(path, method)] = response.status_code
        assert 200 <= response.status_code < 300, (path, method, response.status_code)
    assert len(called) == sum(1 for _ in client.operations()) == 8
    transition = client.call("/api/encounters/{id}/transition/", "post", values)
    assert transition.status_code == 409  # scheduled -> checked_in again: now a documented 409


def test_the_documented_errors_are_what_the_api_answers(schema, admin_client, encounter):
    client = SchemaClient(schema, admin_client)
    unknown = {"id": uuid.uuid4()}
    for path, method, _op in client.operations():
        if "{id}" in path:
            assert client.call(path, method, unknown).status_code == 404
    values = {"id": encounter.pk}
    stale = client.call("/api/encounters/{id}/transition/", "post", values, {"If-Match": '"7"'})
    assert stale.status_code == 412
    with override_settings(ENCOUNTERS_REST_REQUIRE_IF_MATCH=True):
        required = client.call("/api/encounters/{id}/transition/", "post", values)
    assert required.status_code == 428
    etag = client.call("/api/encounters/{id}/history/", "get", values)["ETag"]
    unchanged = client.call("/api/encounters/{id}/history/", "get", values, {"If-None-Match": etag})
    assert unchanged.status_code == 304
    bad = client.call(
        "/api/encounters/{id}/transition/", "post", {**values, "body": {"effective_at": "soon"}}
    )
    assert bad.status_code == 400
    assert re.match(r"^urn:django-encounters:problem:", bad.json()["type"])


def test_drf_schema_view_serves_the_same_schema(admin_client):
    from django.urls import path
    from rest_framework.schemas import get_schema_view

    view = get_schema_view(title="encounters", version="1", public=True)
    urlconf = type(
        "urls",
        (),
        {
            "urlpatterns": [
                path("schema/", view),
                *__import__("tests.urls", fromlist=["urlpatterns"]).urlpatterns,
            ]
        },
    )
    with override_settings(ROOT_URLCONF=urlconf):
        response = admin_client.get("/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    served = json.loads(response.content)
    validate(served)
    assert served["paths"] == drf_schema()["paths"]
    transition = served["paths"]["/api/encounters/{id}/transition/"]["post"]
    assert "If-Match" in {p["name"] for p in transition["parameters"]}
