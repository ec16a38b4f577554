"""Serializers of the REST API: encounters out, creation and transition requests in, the query
parameters of the reads, timeline rows out.

Input is checked here, before anything is read or written: times must carry a UTC offset (a
naive time is refused, never read in the server's zone), text and JSON must be storable (the
library's own argument checks), a subject must exist.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import serializers

from ... import arguments
from ...exceptions import InputLimitError
from ...models import (
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from ...projections.output import formats, in_zone


class ZonedDateTimeField(serializers.DateTimeField):
    """DRF's ``DateTimeField`` in the current time zone, except for a time that zone cannot
    express (the first hours of year 1 west of UTC, the last of year 9999 east of it), which
    stays in UTC instead of failing the response (or the request) with "out of range"."""

    def enforce_timezone(self, value: Any) -> Any:
        if timezone.is_aware(value):
            zone = self.timezone if hasattr(self, "timezone") else self.default_timezone()
            if zone is not None:
                return in_zone(value, zone)
        return super().enforce_timezone(value)


class AwareDateTimeField(ZonedDateTimeField):
    """An ISO-8601 datetime with a UTC offset (``Z`` allowed); a naive one is refused."""

    default_error_messages = {
        "naive": "{name} must include a UTC offset (e.g. 2024-05-01T09:30:00+02:00 or "
        "2024-05-01T07:30:00Z), got {value!r}.",
        "unusable": "{message}",
    }

    def to_internal_value(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parsed = parse_datetime(value.strip())
            except ValueError:  # well formed but no real time (Feb 30, 25:00, +25:00)
                self.fail("invalid", format="YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]")
            if parsed is not None and parsed.utcoffset() is None:
                self.fail("naive", name=self.field_name, value=value)
        result = super().to_internal_value(value)
        try:
            arguments.require_aware(result, self.field_name)
        except (TypeError, ValueError) as exc:
            self.fail("unusable", message=str(exc))
        return result


def _storable_json(value: Any, name: str) -> Any:
    """``value`` as the library stores it (a JSON object), or a field error."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise serializers.ValidationError(
            f"{name} must be a JSON object, not {type(value).__name__} {value!r}"
        )
    try:
        return arguments.bounded_json_copy(value, name)
    except InputLimitError:
        raise  # a typed Problem naming the limit and its setting
    except (TypeError, ValueError) as exc:
        raise serializers.ValidationError(str(exc)) from exc


def subject_type_label(content_type: ContentType) -> str:
    """``"app_label.model"``: how the API names a subject's model."""
    return f"{content_type.app_label}.{content_type.model}"


class EncounterSerializer(serializers.ModelSerializer):
    """An encounter as the API shows it in a list: its definition by code, its subject by
    ``"app_label.model"`` and id; with ``?as_of=``, ``state_at`` too."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.DateTimeField: ZonedDateTimeField,
    }

    definition = serializers.CharField(source="definition.code", read_only=True)
    subject_type = serializers.SerializerMethodField()

    class Meta:
        model = Encounter
        fields: tuple[str, ...] = (
            "id",
            "definition",
            "definition_version",
            "subject_type",
            "subject_id",
            "state",
            "version",
            "origin_state",
            "created_at",
            "updated_at",
            "last_transitioned_at",
            "timeline_end_at",
            "scheduled_at",
            "started_at",
            "ended_at",
            "created_by",
            "assigned_to",
            "notes",
            "metadata",
        )
        read_only_fields: tuple[str, ...] = fields

    def get_subject_type(self, obj: Encounter) -> str:
        return subject_type_label(obj.subject_content_type)

    def to_representation(self, instance: Any) -> Any:
        data = super().to_representation(instance)
        if hasattr(instance, "state_at"):  # annotated by Encounter.objects.as_of()
            data["state_at"] = instance.state_at
        return data


class EncounterDetailSerializer(EncounterSerializer):
    """One encounter: also where it may go next (from its pinned definition version)."""

    allowed_transitions = serializers.SerializerMethodField()
    is_final = serializers.SerializerMethodField()

    class Meta(EncounterSerializer.Meta):
        fields = (*EncounterSerializer.Meta.fields, "allowed_transitions", "is_final")
        read_only_fields = fields

    def get_allowed_transitions(self, obj: Encounter) -> list[str]:
        return list(obj.allowed_transitions)

    def get_is_final(self, obj: Encounter) -> bool:
        return obj.is_final


class EncounterCreateSerializer(serializers.Serializer):
    """``POST …/encounters/``: a definition by code, a subject by ``"app_label.model"`` and
    id (it must exist), and the optional fields of ``create_encounter()``.

    The context's ``subject_types`` (a set of labels, or None for any) narrows which models
    may be subjects.
    """

    definition = serializers.CharField()
    subject_type = serializers.CharField()
    subject_id = serializers.CharField(trim_whitespace=False)
    scheduled_at = AwareDateTimeField(required=False, allow_null=True, default=None)
    notes = serializers.CharField(required=False, allow_blank=True, default="")
    metadata = serializers.JSONField(required=False, default=None)
    assigned_to = serializers.PrimaryKeyRelatedField(
        queryset=get_user_model()._default_manager.all(),
        required=False,
        allow_null=True,
        default=None,
    )

    def validate_definition(self, value: str) -> EncounterDefinition:
        definition = EncounterDefinition.objects.filter(code=value).first()
        if definition is None:
            raise serializers.ValidationError(f"No definition has the code {value!r}.")
        return definition

    def validate_subject_type(self, value: str) -> ContentType:
        app_label, dot, model = value.partition(".")
        content_type = None
        if dot:
            content_type = ContentType.objects.filter(
                app_label=app_label, model=model.lower()
            ).first()
        if content_type is None or content_type.model_class() is None:
            raise serializers.ValidationError(
                f'{value!r} names no installed model (expected "app_label.model", e.g. '
                '"clinic.patient").'
            )
        allowed = self.context.get("subject_types")
        if allowed is not None and subject_type_label(content_type) not in allowed:
            raise serializers.ValidationError(
                f"{value!r} is not a subject type of this API (allowed: {sorted(allowed)})."
            )
        return content_type

    def validate_metadata(self, value: Any) -> Any:
        return _storable_json(value, "metadata")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        content_type = attrs.pop("subject_type")
        subject_id = attrs.pop("subject_id")
        model = content_type.model_class()
        try:
            subject = model._default_manager.filter(pk=subject_id).first()
        except (TypeError, ValueError, DjangoValidationError):  # not a key of that model
            subject = None
        if subject is None:
            raise serializers.ValidationError(
                {"subject_id": f"No {subject_type_label(content_type)} has the id {subject_id!r}."}
            )
        attrs["subject"] = subject
        return attrs


class TransitionSerializer(serializers.Serializer):
    """``POST …/{id}/transition/``: the arguments of ``transition()`` (``expected_version``
    comes from the ``If-Match`` header, the user from the request)."""

    to_state = serializers.CharField(trim_whitespace=False)
    reason = serializers.CharField(
        required=False, allow_blank=True, default="", trim_whitespace=False
    )
    effective_at = AwareDateTimeField(required=False, allow_null=True, default=None)
    context = serializers.JSONField(required=False, default=None)

    def validate_reason(self, value: str) -> str:
        try:
            arguments.require_reason(value, "reason")
        except InputLimitError:
            raise  # a typed Problem naming the limit and its setting
        except (TypeError, ValueError) as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return value

    def validate_context(self, value: Any) -> Any:
        _storable_json(value, "context")
        return value


class ListQuerySerializer(serializers.Serializer):
    """The filters of the list: ``?state=``, ``?definition=CODE``, ``?as_of=`` (with it,
    ``state`` filters the state at that time), ``?known_at=`` (with ``as_of``)."""

    state = serializers.CharField(required=False)
    definition = serializers.CharField(required=False)
    as_of = AwareDateTimeField(required=False)
    known_at = AwareDateTimeField(required=False)

    def validate_definition(self, value: str) -> str:
        if not EncounterDefinition.all_objects.filter(code=value).exists():
            raise serializers.ValidationError(f"No definition has the code {value!r}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if "state" in attrs:
            versions = EncounterDefinitionVersion.objects.all()
            if "definition" in attrs:
                versions = versions.filter(definition__code=attrs["definition"])
            known = sorted(
                {state for states in versions.values_list("states", flat=True) for state in states}
            )
            if attrs["state"] not in known:
                where = (
                    f"definition {attrs['definition']!r}"
                    if "definition" in attrs
                    else "any definition"
                )
                raise serializers.ValidationError(
                    {"state": f"{attrs['state']!r} is not a state of {where} (known: {known})."}
                )
        if "known_at" in attrs and "as_of" not in attrs:
            raise serializers.ValidationError(
                {"known_at": "known_at needs as_of (the business time it is about)."}
            )
        return attrs


class StateAtQuerySerializer(serializers.Serializer):
    """``?at=`` (business time, required) and ``?known_at=`` (as the system knew it then)."""

    at = AwareDateTimeField()
    known_at = AwareDateTimeField(required=False, default=None)


class HistoryQuerySerializer(serializers.Serializer):
    """``?known_at=``: only the rows recorded by then."""

    known_at = AwareDateTimeField(required=False, default=None)


class TimelineRowSerializer(serializers.Serializer):
    """One row of an encounter's timeline (an ``AuditRow`` of the audit, with its context):
    business-time order, the audit's ``backdated``/``overtaken`` marks."""

    sequence = serializers.IntegerField()
    from_state = serializers.CharField()
    to_state = serializers.CharField()
    effective_at = ZonedDateTimeField()
    transitioned_at = ZonedDateTimeField()
    transitioned_by = serializers.CharField(allow_null=True)
    #: the user row's name now, when it is not the one recorded with the row (else null)
    transitioned_by_now = serializers.CharField(allow_null=True)
    reason = serializers.CharField()
    context = serializers.SerializerMethodField()
    backdated = serializers.BooleanField()
    overtaken = serializers.BooleanField()
    overtaken_by = serializers.IntegerField(allow_null=True)

    def get_context(self, row: Any) -> Any:
        return row.context if row.context is not None else {}


class TransitionRowSerializer(serializers.ModelSerializer):
    """The row a transition just recorded."""

    serializer_field_mapping = EncounterSerializer.serializer_field_mapping

    transitioned_by = serializers.SerializerMethodField()
    context = serializers.JSONField(source="metadata")

    class Meta:
        model = EncounterTransition
        fields = (
            "sequence",
            "from_state",
            "to_state",
            "effective_at",
            "transitioned_at",
            "transitioned_by",
            "reason",
            "context",
            "definition_version",
            "hash",
        )
        read_only_fields = fields

    def get_transitioned_by(self, row: EncounterTransition) -> str | None:
        """The name recorded with the row (a row recorded before names were: the user's)."""
        if row.transitioned_by_name:
            return str(row.transitioned_by_name)
        user = row.transitioned_by
        return None if user is None else user.get_username()


class TransitionResultSerializer(serializers.Serializer):
    """The answer to a transition: the encounter as it is now, and the row recorded."""

    encounter = EncounterDetailSerializer()
    transition = TransitionRowSerializer()


class HistorySerializer(serializers.Serializer):
    """``GET …/{id}/history/``: the timeline and the audit's anomalies."""

    encounter = serializers.UUIDField()
    version = serializers.IntegerField()
    known_at = ZonedDateTimeField(allow_null=True)
    timeline = TimelineRowSerializer(many=True)
    anomalies = serializers.ListField(child=serializers.DictField())


class StateAtSerializer(serializers.Serializer):
    """``GET …/{id}/state-at/``: the state at a business time (as known at a system time)."""

    encounter = serializers.UUIDField()
    at = ZonedDateTimeField()
    known_at = ZonedDateTimeField(allow_null=True)
    state = serializers.CharField()


class EventLogQuerySerializer(serializers.Serializer):
    """``GET event-log/``: a format of the event-log report, and the selection of
    ``export_encounter_log``."""

    format = serializers.ChoiceField(choices=())
    definition = serializers.CharField(required=False, default=None)
    since = AwareDateTimeField(required=False, default=None)
    until = AwareDateTimeField(required=False, default=None)
    known_at = AwareDateTimeField(required=False, default=None)
    exclude_deleted = serializers.BooleanField(required=False, default=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The formats registered now (another module may have added one since import).
        self.fields["format"].choices = formats("event-log")

    def validate_definition(self, value: str | None) -> str | None:
        if value is not None and not EncounterDefinition.all_objects.filter(code=value).exists():
            raise serializers.ValidationError(f"No definition has the code {value!r}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        since, until = attrs["since"], attrs["until"]
        if since is not None and until is not None and since >= until:
            raise serializers.ValidationError({"until": "until must be later than since."})
        return attrs


class FhirQuerySerializer(serializers.Serializer):
    """``GET …/{id}/fhir/``: the FHIR version (``R4``, the default, or ``R5``)."""

    version = serializers.ChoiceField(choices=("R4", "R5"), required=False, default="R4")
