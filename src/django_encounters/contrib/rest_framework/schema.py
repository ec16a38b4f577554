"""The REST API's OpenAPI description, for Django REST framework's schema generation
(``manage.py generateschema``, ``get_schema_view``) and for drf-spectacular when it is
installed and configured (``DEFAULT_SCHEMA_CLASS = "drf_spectacular.openapi.AutoSchema"``).

What each operation takes and answers is written once, in :data:`OPERATIONS`: its request
serializer and example, its query parameters (a serializer of the query string), its request
headers (``If-Match``, ``If-None-Match``), and per status code the body (a serializer, the
:class:`ProblemSerializer` as ``application/problem+json``, or the media types of a streamed
export) and the response headers (``ETag``, ``Location``). Two inspectors read it:
:class:`OpenAPIEncounterSchema` (DRF's ``AutoSchema``) and, built only when drf-spectacular is
importable, ``SpectacularEncounterSchema``. The views' ``schema`` attribute
(:class:`EncounterSchema`, :class:`EventLogSchema`) picks the one that matches
``DEFAULT_SCHEMA_CLASS``, so neither library is needed by the other.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db import models
from rest_framework import serializers
from rest_framework.schemas.inspectors import DefaultSchema
from rest_framework.schemas.openapi import AutoSchema

from .problems import CONTENT_TYPE as PROBLEM_TYPE
from .serializers import (
    EncounterCreateSerializer,
    EncounterDetailSerializer,
    EncounterSerializer,
    EventLogQuerySerializer,
    FhirQuerySerializer,
    HistoryQuerySerializer,
    HistorySerializer,
    ListQuerySerializer,
    StateAtQuerySerializer,
    StateAtSerializer,
    TransitionResultSerializer,
    TransitionSerializer,
)


class ProblemSerializer(serializers.Serializer):
    """An error as Problem Details (RFC 9457), ``application/problem+json``; extension members
    name what the problem is about (``encounter``, ``from_state``, ``errors``…)."""

    type = serializers.CharField(help_text="a URI naming the kind of problem, or about:blank")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()
    instance = serializers.CharField(help_text="the path of the request")


# -- what each operation takes and answers ---------------------------------------------------


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    example: str | None = None


@dataclass(frozen=True)
class Reply:
    """One response: ``body`` a serializer class (JSON), ``PROBLEM``, ``None`` (no body) or a
    callable returning ``{media type: JSON schema}`` (an export)."""

    description: str
    body: Any = None
    headers: tuple[Header, ...] = ()
    many: bool = False  # a (paginated) list of ``body``


@dataclass(frozen=True)
class Operation:
    operation_id: str
    summary: str
    replies: dict[int, Reply]
    request: type[serializers.Serializer] | None = None
    request_example: dict[str, Any] | None = None
    query: type[serializers.Serializer] | None = None
    query_examples: dict[str, str] = field(default_factory=dict)
    request_headers: tuple[Header, ...] = ()


PROBLEM = "problem"

ETAG = Header("ETag", 'The encounter\'s stream version as a strong entity tag, e.g. "3".', '"3"')
IF_MATCH = Header(
    "If-Match",
    'The ETag of the encounter the client read (e.g. "2"): the transition is recorded only if '
    "the encounter is still at that version (412 otherwise); * or absent: no check (428 when "
    "ENCOUNTERS_REST_REQUIRE_IF_MATCH is on).",
)
IF_NONE_MATCH = Header(
    "If-None-Match", "An ETag the client holds: 304 Not Modified when it is still current."
)


def _problems(*codes: int) -> dict[int, Reply]:
    meaning = {
        400: "Invalid input (field errors in ``errors``), a malformed body or header, or an "
        "input over a limit of the store (``input-too-large``).",
        403: "Not authenticated, or without the permissions the operation needs.",
        404: "No such encounter (or it is soft-deleted).",
        406: "No acceptable representation.",
        409: "Refused by the encounter's state machine, or another writer was first.",
        412: "If-Match names a version the encounter has left; nothing was written.",
        413: "The body exceeds DATA_UPLOAD_MAX_MEMORY_SIZE.",
        415: "Unsupported media type of the body.",
        422: "Unknown target state, or a validator refused.",
        428: "If-Match is required (ENCOUNTERS_REST_REQUIRE_IF_MATCH).",
        429: "Throttled (Retry-After).",
    }
    return {code: Reply(meaning[code], PROBLEM) for code in codes}


def _event_log_media() -> dict[str, Any]:
    from ...projections.output import formats, get_format

    return {
        f"{get_format('event-log', name).content_type}": {"schema": {"type": "string"}}
        for name in formats("event-log")
    }


def _fhir_media() -> dict[str, Any]:
    return {
        "application/fhir+json": {
            "schema": {
                "type": "object",
                "required": ["resourceType"],
                "properties": {"resourceType": {"type": "string"}},
            }
        }
    }


_READ = (403, 404, 406)

OPERATIONS: dict[str, Operation] = {
    "list": Operation(
        "listEncounters",
        "List encounters (newest first), filtered by state, definition, or the state at a time.",
        {
            200: Reply("A page of encounters.", EncounterSerializer, many=True),
            **_problems(400, 403),
        },
        query=ListQuerySerializer,
    ),
    "create": Operation(
        "createEncounter",
        "Create an encounter in its definition's initial state (create_encounter()).",
        {
            201: Reply(
                "The encounter created.",
                EncounterDetailSerializer,
                (ETAG, Header("Location", "The URL of the new encounter.")),
            ),
            **_problems(400, 403, 413, 415),
        },
        request=EncounterCreateSerializer,
        request_example={
            "definition": "VISIT",
            "subject_type": "clinic.patient",
            "subject_id": "42",
            "scheduled_at": "2030-01-02T09:30:00+01:00",
            "notes": "first visit",
            "metadata": {"room": 4},
        },
    ),
    "retrieve": Operation(
        "retrieveEncounter",
        "One encounter, with where it may go next.",
        {200: Reply("The encounter.", EncounterDetailSerializer, (ETAG,)), **_problems(*_READ)},
    ),
    "history": Operation(
        "encounterHistory",
        "The encounter's timeline in business-time order, with the audit's marks and anomalies.",
        {
            200: Reply("The timeline.", HistorySerializer, (ETAG,)),
            304: Reply("Not modified: the If-None-Match tag is current.", None, (ETAG,)),
            **_problems(400, *_READ),
        },
        query=HistoryQuerySerializer,
        request_headers=(IF_NONE_MATCH,),
    ),
    "state_at": Operation(
        "encounterStateAt",
        "The encounter's state at a business time (as known at a system time): get_state_at().",
        {
            200: Reply("The state then.", StateAtSerializer, (ETAG,)),
            304: Reply("Not modified: the If-None-Match tag is current.", None, (ETAG,)),
            **_problems(400, *_READ),
        },
        query=StateAtQuerySerializer,
        query_examples={"at": "2030-01-02T10:00:00Z"},
        request_headers=(IF_NONE_MATCH,),
    ),
    "transition": Operation(
        "transitionEncounter",
        "Record a transition (transition()); If-Match is its expected_version.",
        {
            200: Reply(
                "The encounter as it is now and the row recorded.",
                TransitionResultSerializer,
                (ETAG,),
            ),
            **_problems(400, 403, 404, 406, 409, 412, 413, 415, 422, 428),
        },
        request=TransitionSerializer,
        request_example={
            "to_state": "checked_in",
            "reason": "arrived at the front desk",
            "context": {"desk": 2},
        },
        request_headers=(IF_MATCH,),
    ),
    "fhir": Operation(
        "encounterFhir",
        "The encounter as HL7 FHIR JSON (R4 Encounter with statusHistory, or an R5 Bundle).",
        {200: Reply("The FHIR JSON.", _fhir_media, (ETAG,)), **_problems(400, *_READ, 409)},
        query=FhirQuerySerializer,
        query_examples={"version": "R4"},
    ),
    "event-log": Operation(
        "exportEventLog",
        "The selected encounters' event log (export_encounter_log), streamed.",
        {
            200: Reply("The event log in the format asked for.", _event_log_media),
            **_problems(400, 403),
        },
        query=EventLogQuerySerializer,
        query_examples={"format": "csv"},
    ),
}


def operation_of(view: Any, method: str) -> Operation:
    """The description of the operation ``view`` answers for ``method``."""
    action = getattr(view, "action", None)
    if action is None:  # the event-log view
        return OPERATIONS["event-log"]
    return OPERATIONS[action]


# -- Django REST framework's generator -------------------------------------------------------


class OpenAPIEncounterSchema(AutoSchema):
    """DRF's ``AutoSchema`` reading :data:`OPERATIONS`; method fields typed from their
    methods' return annotations, read-only user keys typed from the user model."""

    def get_operation(self, path: str, method: str) -> dict[str, Any]:
        op = operation_of(self.view, method)
        parameters = self.get_path_parameters(path, method)
        if op.operation_id == "listEncounters":
            parameters += self.get_pagination_parameters(path, method)
        if op.query is not None:
            parameters += self._query_parameters(op)
        parameters += [
            {
                "name": header.name,
                "in": "header",
                "required": False,
                "description": header.description,
                "schema": {"type": "string"},
                **({"example": header.example} if header.example else {}),
            }
            for header in op.request_headers
        ]
        operation: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "description": self.get_description(path, method),
            "parameters": parameters,
        }
        if op.request is not None:
            media: dict[str, Any] = {"schema": self._ref(op.request)}
            if op.request_example is not None:
                media["example"] = op.request_example
            operation["requestBody"] = {
                "required": True,
                "content": {ct: dict(media) for ct in self.map_parsers(path, method)},
            }
        operation["responses"] = {
            str(code): self._reply(reply, path, method) for code, reply in op.replies.items()
        }
        operation["tags"] = self.get_tags(path, method)
        return operation

    def get_components(self, path: str, method: str) -> dict[str, Any]:
        op = operation_of(self.view, method)
        used: list[type[serializers.Serializer]] = [ProblemSerializer]
        if op.request is not None:
            used.append(op.request)
        used += [r.body for r in op.replies.values() if isinstance(r.body, type)]
        return {self._name(cls): self.map_serializer(cls()) for cls in used}

    def _name(self, cls: type) -> str:
        return cls.__name__.removesuffix("Serializer")

    def _ref(self, cls: type) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{self._name(cls)}"}

    def _query_parameters(self, op: Operation) -> list[dict[str, Any]]:
        assert op.query is not None
        found = []
        for name, field_ in op.query().fields.items():
            parameter: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": field_.required,
                "description": str(field_.help_text or _describe(op.query, name)),
                "schema": self.map_field(field_),
            }
            if name in op.query_examples:
                parameter["example"] = op.query_examples[name]
            found.append(parameter)
        return found

    def _reply(self, reply: Reply, path: str, method: str) -> dict[str, Any]:
        result: dict[str, Any] = {"description": reply.description}
        if reply.headers:
            result["headers"] = {
                h.name: {"description": h.description, "schema": {"type": "string"}}
                for h in reply.headers
            }
        if reply.body == PROBLEM:
            result["content"] = {PROBLEM_TYPE: {"schema": self._ref(ProblemSerializer)}}
        elif isinstance(reply.body, type):
            schema: dict[str, Any] = self._ref(reply.body)
            if reply.many:
                schema = {"type": "array", "items": schema}
                paginator = self.get_paginator()
                if paginator is not None:
                    schema = paginator.get_paginated_response_schema(schema)
            result["content"] = {"application/json": {"schema": schema}}
        elif callable(reply.body):
            result["content"] = reply.body()
        return result

    def map_parsers(self, path: str, method: str) -> list[str]:
        return [parser.media_type for parser in self.view.parser_classes]

    def map_field(self, field_: Any) -> dict[str, Any]:
        if isinstance(field_, serializers.SerializerMethodField):
            return _annotation_schema(field_)
        if isinstance(field_, serializers.PrimaryKeyRelatedField) and field_.queryset is None:
            return {**_user_key_schema(), "nullable": True}
        if isinstance(field_, serializers.JSONField):
            return {"type": "object", "additionalProperties": True}
        return dict(super().map_field(field_))


#: What each query parameter means (times: ISO 8601 with a UTC offset, ``Z`` allowed).
PARAMETER_HELP = {
    "state": "Only encounters in this state (with as_of: in it then). Must be a state of the "
    "definition (or of any definition): 400 otherwise.",
    "definition": "Only encounters of the definition with this code.",
    "as_of": "A business time: each encounter's state then (state_at), filtered by state.",
    "known_at": "A system time: only what had been recorded by then.",
    "at": "The business time the state is asked for.",
    "format": "The event log's format: one registered for the event-log report.",
    "since": "Only encounters with a row effective at or after this time (whole traces).",
    "until": "Only encounters with a row effective before this time (whole traces).",
    "exclude_deleted": "Leave soft-deleted encounters out (by default exported, marked).",
    "version": "The FHIR version: R4 (an Encounter) or R5 (a Bundle of EncounterHistory).",
}


def _describe(query: type, name: str) -> str:
    return PARAMETER_HELP.get(name, "")


def _user_key_schema() -> dict[str, Any]:
    pk = get_user_model()._meta.pk
    integer = isinstance(pk, (models.AutoField, models.BigAutoField, models.IntegerField))
    return {"type": "integer"} if integer else {"type": "string"}


_PLAIN = {str: {"type": "string"}, bool: {"type": "boolean"}, int: {"type": "integer"}}


def _annotation_schema(field_: serializers.SerializerMethodField) -> dict[str, Any]:
    """A ``SerializerMethodField`` typed by its method's return annotation (``str``, ``bool``,
    ``int``, ``list[str]``, ``X | None``); untyped: any value."""
    method = getattr(field_.parent, field_.method_name, None)
    try:
        hint = typing.get_type_hints(method)["return"]
    except Exception:
        return {}
    args = typing.get_args(hint)
    nullable = type(None) in args
    if nullable:
        hint = next(arg for arg in args if arg is not type(None))
    if typing.get_origin(hint) is list:
        schema: dict[str, Any] = {
            "type": "array",
            "items": _PLAIN.get(typing.get_args(hint)[0], {}),
        }
    else:
        schema = dict(_PLAIN.get(hint, {}))
    if nullable:
        schema["nullable"] = True
    return schema


# -- drf-spectacular -------------------------------------------------------------------------


def _spectacular_class() -> type | None:
    """``SpectacularEncounterSchema``, built on first use when drf-spectacular is installed."""
    global _SPECTACULAR
    if _SPECTACULAR is not None:
        return _SPECTACULAR
    try:
        from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
        from drf_spectacular.types import OpenApiTypes
        from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
    except ImportError:
        return None

    class SpectacularEncounterSchema(SpectacularAutoSchema):  # type: ignore[misc,valid-type]
        """drf-spectacular's ``AutoSchema`` reading :data:`OPERATIONS`."""

        def _op(self) -> Operation:
            return operation_of(self.view, self.method)

        def get_operation_id(self) -> str:
            return self._op().operation_id

        def get_summary(self) -> str:
            return self._op().summary

        def get_request_serializer(self) -> Any:
            return self._op().request

        def get_override_parameters(self) -> list[Any]:
            op = self._op()
            found: list[Any] = []
            if op.query is not None:
                for name, field_ in op.query().fields.items():
                    found.append(
                        OpenApiParameter(
                            name,
                            _spectacular_type(field_, OpenApiTypes),
                            OpenApiParameter.QUERY,
                            required=field_.required,
                            enum=list(field_.choices) if hasattr(field_, "choices") else None,
                            description=_describe(op.query, name),
                            examples=[OpenApiExample(name, value=op.query_examples[name])]
                            if name in op.query_examples
                            else [],
                        )
                    )
            for header in op.request_headers:
                found.append(
                    OpenApiParameter(
                        header.name,
                        OpenApiTypes.STR,
                        OpenApiParameter.HEADER,
                        description=header.description,
                    )
                )
            responding: dict[str, tuple[Header, list[int]]] = {}
            for code, reply in op.replies.items():
                for header in reply.headers:
                    responding.setdefault(header.name, (header, []))[1].append(code)
            for header, codes in responding.values():
                found.append(
                    OpenApiParameter(
                        header.name,
                        OpenApiTypes.STR,
                        OpenApiParameter.HEADER,
                        description=header.description,
                        response=codes,
                    )
                )
            return found

        def get_examples(self) -> list[Any]:
            op = self._op()
            if op.request_example is None:
                return []
            return [OpenApiExample("example", value=op.request_example, request_only=True)]

        def get_response_serializers(self) -> Any:
            op = self._op()
            found: dict[Any, Any] = {}
            for code, reply in op.replies.items():
                if reply.body == PROBLEM:
                    found[(code, PROBLEM_TYPE)] = OpenApiResponse(
                        ProblemSerializer, reply.description
                    )
                elif isinstance(reply.body, type):
                    body = reply.body(many=True) if reply.many else reply.body
                    found[(code, "application/json")] = OpenApiResponse(body, reply.description)
                elif callable(reply.body):
                    for media in reply.body():
                        found[(code, media)] = OpenApiResponse(
                            OpenApiTypes.STR if "fhir" not in media else OpenApiTypes.OBJECT,
                            reply.description,
                        )
                else:
                    found[code] = OpenApiResponse(None, reply.description)
            return found

    _SPECTACULAR = SpectacularEncounterSchema
    return _SPECTACULAR


_SPECTACULAR: type | None = None


def _spectacular_type(field_: Any, types: Any) -> Any:
    if isinstance(field_, serializers.BooleanField):
        return types.BOOL
    if isinstance(field_, serializers.DateTimeField):
        return types.DATETIME
    return types.STR


# -- the views' ``schema`` -------------------------------------------------------------------


class EncounterSchema(DefaultSchema):
    """The ``schema`` of this package's views: :class:`OpenAPIEncounterSchema` when
    ``DEFAULT_SCHEMA_CLASS`` is DRF's ``AutoSchema``, drf-spectacular's flavour when it is
    drf-spectacular's, else whatever ``DEFAULT_SCHEMA_CLASS`` gives (e.g. CoreAPI)."""

    def __get__(self, instance: Any, owner: Any) -> Any:
        result = super().__get__(instance, owner)
        if instance is None:
            return result
        if isinstance(result, AutoSchema):
            inspector = OpenAPIEncounterSchema()
        else:
            spectacular = _spectacular_class()
            if spectacular is None or not isinstance(result, spectacular.__mro__[1]):
                return result
            inspector = spectacular()
        inspector.view = instance
        return inspector


#: The event log's view reads the same table (its operation: ``OPERATIONS["event-log"]``).
EventLogSchema = EncounterSchema
