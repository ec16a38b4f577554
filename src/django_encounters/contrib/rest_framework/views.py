"""``EncounterViewSet``: encounters over HTTP.

=========================================  ==================================================
``GET    encounters/``                     list (``?state=``, ``?definition=CODE``,
                                           ``?as_of=`` [``&known_at=``]), paginated
``POST   encounters/``                     ``create_encounter()`` → 201, ``Location``, ``ETag``
``GET    encounters/{id}/``                one encounter, ``ETag: "<version>"``
``GET    encounters/{id}/history/``        its timeline (business-time order, the audit's
                                           marks), ``?known_at=``
``GET    encounters/{id}/state-at/``       ``get_state_at()``: ``?at=`` [``&known_at=``]
``POST   encounters/{id}/transition/``     ``transition()``; ``If-Match`` → ``expected_version``
``GET    encounters/{id}/fhir/``           the encounter as FHIR (``?version=R4|R5``)
``GET    event-log/``                      the event log, streamed (``?format=xes|csv|…``,
                                           ``&definition=``, ``&since=``, ``&until=``,
                                           ``&known_at=``, ``&exclude_deleted=``)
=========================================  ==================================================

The exports need ``view_encounter`` and ``view_encountertransition``
(:data:`~.permissions.EXPORT_PERMISSIONS`).

The ETag of an encounter is its stream version, strong: ``"3"`` once three rows are recorded.
``If-Match`` on a transition names the version the client read: when the stream has moved on,
``412 Precondition Failed`` and nothing is written. ``If-Match: *`` or no ``If-Match`` means no
check (unless ``ENCOUNTERS_REST_REQUIRE_IF_MATCH``: then a missing one is ``428``). The history
and state-at reads answer ``304 Not Modified`` to an ``If-None-Match`` naming the current
version (they depend on the stream only).
"""

from __future__ import annotations

import re
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import Http404, StreamingHttpResponse
from django.urls import NoReverseMatch
from django.utils.http import parse_etags
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from ... import conf, services
from ...exceptions import ConcurrentTransitionError, EncounterNotFoundError
from ...models import Encounter
from ...projections.audit import encounter_timeline
from ...projections.event_log import iter_traces, log_name
from ...projections.output import get_format
from .exports import fhir_document, served_asynchronously, stream_report
from .parsers import PARSER_CLASSES
from .permissions import EncounterPermissions, ExportPermission
from .problems import Problem, encounter_problem, problem_response
from .schema import EncounterSchema, EventLogSchema
from .serializers import (
    EncounterCreateSerializer,
    EncounterDetailSerializer,
    EncounterSerializer,
    EventLogQuerySerializer,
    FhirQuerySerializer,
    HistoryQuerySerializer,
    ListQuerySerializer,
    StateAtQuerySerializer,
    TimelineRowSerializer,
    TransitionRowSerializer,
    TransitionSerializer,
    ZonedDateTimeField,
)

_TIME = ZonedDateTimeField()


_VERSION_TAG = re.compile(r'"(0|[1-9][0-9]{0,18})"')


def etag_of(encounter: Encounter) -> str:
    """The strong entity tag of an encounter: its stream version, quoted."""
    return f'"{encounter.version}"'


class EncounterViewSet(viewsets.GenericViewSet):
    """Encounters: read, list, create, their timeline and state at a time, transitions.

    Class attributes to override in a subclass:

    * ``permission_classes``: default :class:`~.permissions.EncounterPermissions`;
    * ``subject_types``: the ``"app_label.model"`` labels an encounter may be created for
      (None, the default: any installed model);
    * ``require_if_match``: refuse a transition without ``If-Match`` (None, the default:
      ``ENCOUNTERS_REST_REQUIRE_IF_MATCH``);
    * ``fhir_status_map``: the ``status_map`` of the FHIR export (None: every state must be a
      FHIR ``encounter-status`` code itself).
    """

    serializer_class = EncounterSerializer
    permission_classes = [EncounterPermissions]
    parser_classes = PARSER_CLASSES
    schema = EncounterSchema()
    subject_types: set[str] | None = None
    require_if_match: bool | None = None
    #: our state name -> FHIR ``encounter-status`` code, for ``…/fhir/`` (None: identity)
    fhir_status_map: dict[str, str] | None = None

    def get_queryset(self) -> Any:
        # Soft-deleted encounters are hidden (404); (created_at, id) keeps pages stable.
        return Encounter.objects.select_related("definition", "subject_content_type").order_by(
            "-created_at", "id"
        )

    def get_object(self) -> Any:
        """The encounter of the URL; an unknown or soft-deleted one is
        ``EncounterNotFoundError`` (404, naming it)."""
        try:
            return super().get_object()
        except Http404:
            raise EncounterNotFoundError(self.kwargs[self.lookup_field]) from None

    def get_serializer_class(self) -> Any:
        return EncounterSerializer if self.action == "list" else EncounterDetailSerializer

    def get_exception_handler(self) -> Any:
        return problem_response

    # -- reads ------------------------------------------------------------------------------

    def list(self, request: Request) -> Response:
        query = ListQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        filters = query.validated_data
        queryset = self.get_queryset()
        if "definition" in filters:
            queryset = queryset.filter(definition__code=filters["definition"])
        if "as_of" in filters:
            queryset = queryset.as_of(filters["as_of"], filters.get("known_at"))
            if "state" in filters:  # the state then
                queryset = queryset.filter(state_at=filters["state"])
        elif "state" in filters:
            queryset = queryset.filter(state=filters["state"])
        queryset = self.filter_queryset(queryset)
        page = self.paginate_queryset(queryset)
        if page is not None:
            return self.get_paginated_response(self.get_serializer(page, many=True).data)
        return Response(self.get_serializer(queryset, many=True).data)

    def retrieve(self, request: Request, pk: Any = None) -> Response:
        encounter = self.get_object()
        return Response(self.get_serializer(encounter).data, headers={"ETag": etag_of(encounter)})

    @action(detail=True, methods=["get"])
    def history(self, request: Request, pk: Any = None) -> Response:
        """The timeline in business-time order with the audit's backdated/overtaken marks and
        each row's context, and the anomalies the audit finds in the stream."""
        encounter = self.get_object()
        query = HistoryQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        known_at = query.validated_data["known_at"]
        # The version is read before the rows: a row appended in between makes the body newer
        # than its ETag, never older (an If-None-Match then misses, it never hides a row).
        etag = etag_of(encounter)
        if _not_modified(request, etag):
            return Response(status=304, headers={"ETag": etag})
        audit = encounter_timeline(encounter, known_at)
        body = {
            "encounter": str(encounter.pk),
            "version": encounter.version,
            "known_at": None if known_at is None else _TIME.to_representation(known_at),
            "timeline": TimelineRowSerializer(audit.timeline, many=True).data,
            "anomalies": [audit.anomaly_dict(a) for a in audit.anomalies],
        }
        return Response(body, headers={"ETag": etag})

    @action(detail=True, methods=["get"], url_path="state-at", url_name="state-at")
    def state_at(self, request: Request, pk: Any = None) -> Response:
        """``get_state_at(encounter, at, known_at)``."""
        encounter = self.get_object()
        query = StateAtQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        at, known_at = query.validated_data["at"], query.validated_data["known_at"]
        etag = etag_of(encounter)
        if _not_modified(request, etag):
            return Response(status=304, headers={"ETag": etag})
        body = {
            "encounter": str(encounter.pk),
            "at": _TIME.to_representation(at),
            "known_at": None if known_at is None else _TIME.to_representation(known_at),
            "state": services.get_state_at(encounter, at, known_at),
        }
        return Response(body, headers={"ETag": etag})

    @action(detail=True, methods=["get"])
    def fhir(self, request: Request, pk: Any = None) -> Response:
        """The encounter as FHIR JSON (:func:`.exports.fhir_document`), ``?version=R4`` (the
        default) or ``R5``; needs the export permissions."""
        encounter = self.get_object()
        query = FhirQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        version = query.validated_data["version"]
        body = fhir_document(encounter, version, self.fhir_status_map)
        return Response(
            body,
            headers={"ETag": etag_of(encounter)},
            content_type=f"application/fhir+json; fhirVersion={FHIR_VERSIONS[version]}",
        )

    # -- writes -----------------------------------------------------------------------------

    def create(self, request: Request) -> Response:
        given = EncounterCreateSerializer(
            data=request.data, context={"subject_types": self.subject_types}
        )
        given.is_valid(raise_exception=True)
        data = given.validated_data
        encounter = services.create_encounter(
            data["definition"],
            data["subject"],
            created_by=_user(request),
            assigned_to=data["assigned_to"],
            scheduled_at=data["scheduled_at"],
            notes=data["notes"],
            metadata=data["metadata"],
        )
        headers = {"ETag": etag_of(encounter)}
        try:
            headers["Location"] = self.reverse_action("detail", args=[encounter.pk])
        except NoReverseMatch:  # routed without the detail route
            pass
        body = EncounterDetailSerializer(encounter, context=self.get_serializer_context()).data
        return Response(body, status=201, headers=headers)

    @action(detail=True, methods=["post"])
    def transition(self, request: Request, pk: Any = None) -> Response:
        """``transition()`` with the user of the request; ``If-Match`` is checked first (as
        HTTP evaluates preconditions before the request's content), then under the row lock
        as ``expected_version``."""
        encounter = self.get_object()
        expected_version, refused = self._precondition(request, encounter)
        if refused is not None:
            return refused.response(request)
        given = TransitionSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        data = given.validated_data
        to_state = data["to_state"]
        if not encounter.machine.is_valid_state(to_state):
            states = list(encounter.machine.states)
            return Problem(
                422,
                "unknown-state",
                f"'{to_state}' is not a state of definition '{encounter.definition.code}' "
                f"(states: {states}) [encounter {encounter.pk}]",
                title="Unknown state",
                encounter=str(encounter.pk),
                to_state=to_state,
                states=states,
            ).response(request)
        record = services.transition(
            encounter,
            to_state,
            transitioned_by=_user(request),
            reason=data["reason"],
            context=data["context"],
            effective_at=data["effective_at"],
            expected_version=expected_version,
        )
        body = {  # TransitionResultSerializer
            "encounter": EncounterDetailSerializer(
                encounter, context=self.get_serializer_context()
            ).data,
            "transition": TransitionRowSerializer(record).data,
        }
        return Response(body, headers={"ETag": etag_of(encounter)})

    def _precondition(
        self, request: Request, encounter: Encounter
    ) -> tuple[int | None, Problem | None]:
        """The ``expected_version`` that ``If-Match`` asks for (None: no check), or the
        problem that answers the request now (428, 400, 412)."""
        header = request.headers.get("If-Match")
        if header is None:
            required = self.require_if_match
            if required is None:
                required = conf.rest_require_if_match()
            if required:
                return None, Problem(
                    428,
                    "if-match-required",
                    "A transition must name the version it acts on: send If-Match with the "
                    f"ETag of the encounter you read (now {etag_of(encounter)}).",
                    title="If-Match required",
                    encounter=str(encounter.pk),
                    current_version=encounter.version,
                )
            return None, None
        tags = parse_etags(header)
        if tags == ["*"]:
            return None, None
        if not tags:
            return None, Problem(
                400,
                "malformed-if-match",
                f"If-Match {header!r} is not '*' or a list of entity tags such as \"3\".",
                title="Malformed If-Match",
            )
        # Strong comparison: a weak tag (W/"3") never matches, nor does "03".
        # A version: ASCII digits, no leading zero, at most 19 of them (str.isdigit() would
        # take "³", and int() refuses thousands of digits).
        version = _VERSION_TAG.fullmatch(tags[0]) if len(tags) == 1 else None
        if version is not None:
            expected = int(version.group(1))
            if expected != encounter.version:
                refusal = ConcurrentTransitionError(encounter.pk, expected, encounter.version)
                return None, encounter_problem(refusal)
            return expected, None
        if etag_of(encounter) in tags:
            return encounter.version, None
        return None, Problem(
            412,
            "stale-version",
            f"Encounter {encounter.pk}: If-Match {header} does not match its current ETag "
            f"{etag_of(encounter)}",
            title="The encounter changed since the version named in If-Match",
            headers={"ETag": etag_of(encounter)},
            encounter=str(encounter.pk),
            current_version=encounter.version,
        )


#: The ``fhirVersion`` media-type parameter of each FHIR version the API writes.
FHIR_VERSIONS = {"R4": "4.0", "R5": "5.0"}


class _FirstRenderer(DefaultContentNegotiation):
    """The view's first renderer, whatever ``?format=`` says (for the event log, ``format``
    names the export's format, not a DRF renderer)."""

    def select_renderer(self, request: Any, renderers: Any, format_suffix: Any = None) -> Any:
        return renderers[0], renderers[0].media_type


class EventLogView(APIView):
    """``GET event-log/?format=…``: the selected encounters' event log in a format of the
    ``event-log`` report (``xes``, ``csv`` and any format registered for it), streamed as it
    is read — memory holds one batch of encounters whatever the size of the log. The
    selection is ``export_encounter_log``'s: ``definition``, ``since``, ``until``,
    ``known_at``, ``exclude_deleted``. Checked before the first byte (a bad one is a ``400``
    Problem); an error while streaming cuts the response short (the status is sent already).

    Class attributes: ``permission_classes`` (default :class:`~.permissions.ExportPermission`),
    ``batch_size`` (encounters read per query).
    """

    permission_classes = [ExportPermission]
    renderer_classes = [JSONRenderer]  # for the problems; the log itself is streamed
    content_negotiation_class = _FirstRenderer
    schema = EventLogSchema()
    batch_size: int | None = None

    def get_exception_handler(self) -> Any:
        return problem_response

    def get(self, request: Request) -> StreamingHttpResponse:
        query = EventLogQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        selection = dict(query.validated_data)
        writer = get_format("event-log", selection.pop("format"))
        if self.batch_size is not None:
            selection["batch_size"] = self.batch_size
        traces = iter_traces(**selection)  # the selection is checked here, before streaming
        name = log_name(selection["definition"])
        chunks: Any = stream_report(writer.write, traces, name=name)
        if isinstance(request._request, ASGIRequest):  # streamed by the event loop, chunk by chunk
            chunks = served_asynchronously(chunks)
        response = StreamingHttpResponse(
            chunks, content_type=f"{writer.content_type}; charset=utf-8"
        )
        extension = writer.name.replace("/", "-")
        filename = "encounters" + (f"-{selection['definition']}" if selection["definition"] else "")
        response["Content-Disposition"] = f'attachment; filename="{_safe(filename)}.{extension}"'
        return response


def _safe(name: str) -> str:
    """A file name for ``Content-Disposition``: letters, digits, ``-``, ``_``, ``.``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _user(request: Request) -> Any:
    user = request.user
    return user if user is not None and user.is_authenticated else None


def _not_modified(request: Request, etag: str) -> bool:
    """``If-None-Match`` names ``etag`` (weak comparison, ``*`` matching any)."""
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    tags = parse_etags(header)
    return tags == ["*"] or etag in (tag.removeprefix("W/") for tag in tags)
