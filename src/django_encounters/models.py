"""Models: the definition (data), the encounter (projection) and the transition log (truth)."""

from __future__ import annotations

from collections import deque
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models, router, transaction
from django.db.models import F, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from .basemodels import BaseModel, SoftDeleteManager, SoftDeleteQuerySet, UUIDModel
from .exceptions import EncounterError, InvalidStateError, ValidatorConfigurationError
from .projections.timeline import TIMELINE_ORDER, TIMELINE_ORDER_DESC, Rules, row_hash
from .validators import get_validator_instance, parse_validator_entry

STATE_MAX_LENGTH = 50


def _require_aware(value: datetime, name: str) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__} {value!r}")
    if timezone.is_naive(value):
        raise ValueError(f"{name} must be timezone-aware, got naive datetime {value!r}")
    try:
        value.astimezone(dt_timezone.utc)
    except OverflowError as exc:
        raise ValueError(f"{name} {value!r} cannot be expressed in UTC: {exc}") from exc


class EncounterDefinition(UUIDModel, BaseModel):
    """Defines an encounter type: its states, transitions and validators (data, not code)."""

    name = models.CharField(max_length=100, unique=True)
    code = models.CharField(max_length=50, unique=True)
    description = models.TextField(blank=True, default="")

    # State machine configuration
    states = models.JSONField(default=list, help_text="List of allowed state names")
    initial_state = models.CharField(max_length=STATE_MAX_LENGTH)
    final_states = models.JSONField(default=list, help_text="List of terminal state names")
    transitions = models.JSONField(
        default=dict, help_text="Dict mapping state to list of allowed next states"
    )

    # Validators
    validators = models.JSONField(default=list, help_text="List of validator class paths")

    # Metadata
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        app_label = "django_encounters"
        verbose_name = "encounter definition"
        verbose_name_plural = "encounter definitions"
        ordering = ["name"]

    def is_valid_state(self, state: str) -> bool:
        """Check if a state is defined for this encounter type."""
        return state in self.states

    def is_final_state(self, state: str) -> bool:
        """Check if a state is a final/terminal state."""
        return state in self.final_states

    def is_valid_transition(self, from_state: str, to_state: str) -> bool:
        """Check if a transition between two states is allowed."""
        if from_state not in self.transitions:
            return False
        return to_state in self.transitions.get(from_state, [])

    def get_allowed_transitions(self, from_state: str) -> list:
        """Get list of states that can be transitioned to from ``from_state``."""
        return list(self.transitions.get(from_state, []))

    def rules(self) -> Rules:
        """The state machine as plain data for the timeline engine."""
        return Rules.from_config(self.code, self.states, self.transitions, self.final_states)

    # -- validation -------------------------------------------------------------------------

    def clean(self) -> None:
        """Check the state machine and validators; raise ``ValidationError`` naming every
        offending entry. Also run by :meth:`save`."""
        errors: dict[str, list[str]] = {}

        def err(field: str, message: str) -> None:
            errors.setdefault(field, []).append(message)

        states = self.states
        if not isinstance(states, list) or not states:
            err("states", f"states must be a non-empty list of state names, not {states!r}")
            states = []
        else:
            bad = [s for s in states if not isinstance(s, str) or not s.strip()]
            if bad:
                err("states", f"state names must be non-empty strings: {bad!r}")
            long = [s for s in states if isinstance(s, str) and len(s) > STATE_MAX_LENGTH]
            if long:
                err("states", f"state names longer than {STATE_MAX_LENGTH} characters: {long!r}")
            duplicates = sorted({s for s in states if isinstance(s, str) and states.count(s) > 1})
            if duplicates:
                err("states", f"duplicate states: {duplicates}")
        known = {s for s in states if isinstance(s, str)}

        if self.initial_state not in known:
            err("initial_state", f"initial state {self.initial_state!r} is not in states {states}")

        finals = self.final_states
        if not isinstance(finals, list):
            err("final_states", f"final_states must be a list, not {finals!r}")
        else:
            unknown = [s for s in finals if s not in known]
            if unknown:
                err("final_states", f"final states not in states: {unknown!r}")

        transitions = self.transitions
        if not isinstance(transitions, dict):
            err(
                "transitions",
                f"transitions must be a dict of state -> [states], not {transitions!r}",
            )
        else:
            unknown_keys = [k for k in transitions if k not in known]
            if unknown_keys:
                err("transitions", f"transition sources not in states: {unknown_keys!r}")
            for source, targets in transitions.items():
                if not isinstance(targets, list):
                    err("transitions", f"targets of {source!r} must be a list, not {targets!r}")
                    continue
                unknown_targets = [t for t in targets if t not in known]
                if unknown_targets:
                    err("transitions", f"targets of {source!r} not in states: {unknown_targets!r}")

        validators = self.validators
        if validators in (None, ""):
            validators = []
        if not isinstance(validators, list):
            err("validators", f"validators must be a list, not {validators!r}")
        else:
            for index, entry in enumerate(validators):
                try:
                    get_validator_instance(*parse_validator_entry(entry))
                except ValidatorConfigurationError as exc:
                    err("validators", f"entry {index}: {exc}")

        if errors:
            raise DjangoValidationError(errors)

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.clean()
        super().save(*args, **kwargs)

    def get_warnings(self) -> list[str]:
        """Structural smells that are legal: each warning names the states concerned.

        * states unreachable from the initial state;
        * exits from final states;
        * non-final dead ends (no way out, not final).
        """
        states = [s for s in (self.states or []) if isinstance(s, str)]
        transitions = self.transitions if isinstance(self.transitions, dict) else {}
        finals = set(self.final_states or [])
        warnings: list[str] = []

        reachable = {self.initial_state}
        queue = deque([self.initial_state])
        while queue:
            for target in transitions.get(queue.popleft(), []) or []:
                if target not in reachable:
                    reachable.add(target)
                    queue.append(target)
        unreachable = [s for s in states if s not in reachable]
        if unreachable:
            warnings.append(
                f"states unreachable from initial state '{self.initial_state}': {unreachable}"
            )
        for state in states:
            if state in finals and transitions.get(state):
                warnings.append(f"final state '{state}' has exits: {list(transitions[state])}")
        dead_ends = [s for s in states if s not in finals and not transitions.get(s)]
        if dead_ends:
            warnings.append(f"non-final states with no way out (dead ends): {dead_ends}")
        return warnings

    def __str__(self) -> str:
        return self.name


class EncounterQuerySet(SoftDeleteQuerySet):
    def as_of(self, timestamp: datetime, known_at: datetime | None = None) -> EncounterQuerySet:
        """Annotate each encounter with ``state_at``: its state at ``timestamp`` (as known at
        ``known_at``, if given), in one SQL statement. Filter and order on it freely::

            Encounter.objects.as_of(quarter_end).filter(state_at="in_progress")
        """
        _require_aware(timestamp, "timestamp")
        rows = EncounterTransition.objects.filter(
            encounter=OuterRef("pk"), effective_at__lte=timestamp
        )
        if known_at is not None:
            _require_aware(known_at, "known_at")
            rows = rows.filter(transitioned_at__lte=known_at)
        last = rows.order_by(*TIMELINE_ORDER_DESC).values("to_state")[:1]
        return self.annotate(
            state_at=Coalesce(Subquery(last, output_field=models.CharField()), F("origin_state"))
        )


class EncounterManager(SoftDeleteManager.from_queryset(EncounterQuerySet)):  # type: ignore[misc]
    """Hides soft-deleted encounters; ``as_of`` for bulk temporal queries."""


class AllEncountersManager(models.Manager.from_queryset(EncounterQuerySet)):  # type: ignore[misc]
    """Every encounter, soft-deleted ones included."""


class Encounter(UUIDModel, BaseModel):
    """An encounter of one subject moving through one definition.

    ``state``, ``version``, ``timeline_end_at`` and ``head_hash`` are a projection of the
    transition log: only :func:`django_encounters.services.transition` and the rebuild write
    them, and ``save()`` of an existing row never does. ``origin_state`` is the state the
    encounter was created in.
    """

    #: Columns derived purely from the log.
    PROJECTION_FIELDS = ("state", "version", "timeline_end_at", "head_hash")

    definition = models.ForeignKey(
        EncounterDefinition, on_delete=models.PROTECT, related_name="encounters"
    )

    # Subject via GenericFK (what/who this encounter is about); text id: int and UUID keys work.
    subject_content_type = models.ForeignKey(
        ContentType, on_delete=models.CASCADE, related_name="+"
    )
    subject_id = models.CharField(max_length=255)
    subject = GenericForeignKey("subject_content_type", "subject_id")

    # Current state (projection) and the state it was created in.
    state = models.CharField(max_length=STATE_MAX_LENGTH)
    origin_state = models.CharField(max_length=STATE_MAX_LENGTH, editable=False)
    version = models.PositiveIntegerField(default=0, editable=False)
    timeline_end_at = models.DateTimeField(null=True, blank=True, editable=False)
    head_hash = models.CharField(max_length=64, blank=True, default="", editable=False)

    # Timing
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    # Participants
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="encounters_created",
    )
    assigned_to = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="encounters_assigned",
    )

    # Metadata
    notes = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)

    objects = EncounterManager()  # type: ignore[misc]
    all_objects = AllEncountersManager()  # type: ignore[misc]

    class Meta:
        app_label = "django_encounters"
        verbose_name = "encounter"
        verbose_name_plural = "encounters"
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["subject_content_type", "subject_id"]),
            models.Index(fields=["state"]),
            models.Index(fields=["scheduled_at"]),
        ]

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.subject_id is not None:
            self.subject_id = str(self.subject_id)
        if self._state.adding:
            definition = self.definition
            # Set initial state if not set
            if not self.state:
                self.state = definition.initial_state
            if self.state not in (definition.states or []):
                raise InvalidStateError(self.state, definition.code, list(definition.states or []))
            # A new encounter's projection is its origin: no rows yet.
            self.origin_state = self.state
            self.version = 0
            self.timeline_end_at = None
            self.head_hash = ""
        else:
            # Never write projection columns of an existing row: a stale instance must not
            # overwrite a state that moved on. Only transition() and the rebuild write them.
            protected = set(self.PROJECTION_FIELDS) | {"origin_state"}
            update_fields = kwargs.get("update_fields")
            loaded = getattr(self, "_loaded_definition_id", self.definition_id)
            if self.definition_id != loaded and (
                EncounterTransition.objects.filter(encounter_id=self.pk).exists()
            ):
                raise EncounterError(
                    f"Encounter {self.pk} has transitions recorded under definition "
                    f"{loaded}; it cannot be moved to definition {self.definition_id} "
                    "(its log would be replayed against the wrong rules)"
                )
            if update_fields is None:
                # Soft delete is changed only by delete()/restore() (they name deleted_at):
                # a stale instance's plain save() must not undelete the encounter.
                update_fields = [
                    f.name
                    for f in self._meta.concrete_fields
                    if not f.primary_key and f.name not in protected and f.name != "deleted_at"
                ]
            else:
                update_fields = [
                    name
                    for name in update_fields
                    if name not in protected and name.removesuffix("_id") not in protected
                ]
                if not update_fields:
                    return
            kwargs["update_fields"] = update_fields
        super().save(*args, **kwargs)
        self._loaded_definition_id = self.definition_id

    @classmethod
    def from_db(cls, db: Any, field_names: Any, values: Any, **kwargs: Any) -> Any:
        instance = super().from_db(db, field_names, values, **kwargs)
        # Remembered so that save() can refuse moving an encounter with history to another
        # definition without a query.
        instance._loaded_definition_id = instance.__dict__.get("definition_id")
        return instance

    def refresh_projection(self) -> None:
        """Reload the projection columns from the database."""
        self.refresh_from_db(fields=list(self.PROJECTION_FIELDS))

    @property
    def is_final(self) -> bool:
        """Check if encounter is in a final state."""
        return self.definition.is_final_state(self.state)

    @property
    def allowed_transitions(self) -> list:
        """Get list of states that can be transitioned to."""
        return self.definition.get_allowed_transitions(self.state)

    def __str__(self) -> str:
        return f"{self.definition.name} - {self.state}"


class AppendOnlyQuerySet(models.QuerySet):
    """Transitions are facts: querysets refuse to update or delete them."""

    def _refuse(self, what: str) -> EncounterError:
        return EncounterError(
            f"EncounterTransition rows are append-only: {what}() is not allowed "
            "(record a new transition instead)"
        )

    def update(self, **kwargs: Any) -> int:
        raise self._refuse("update")

    def delete(self) -> tuple[int, dict[str, int]]:  # type: ignore[override]
        raise self._refuse("delete")

    def bulk_update(self, objs: Any, fields: Any, batch_size: Any = None) -> int:
        raise self._refuse("bulk_update")

    def update_or_create(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("update_or_create")


class EncounterTransition(UUIDModel):
    """One state change of one encounter: an append-only fact.

    ``sequence`` numbers an encounter's rows 1, 2, 3… in recording order (unique per
    encounter: the optimistic-concurrency guard); ``hash`` chains each row to the previous one
    of its stream (tamper evidence).
    """

    encounter = models.ForeignKey(Encounter, on_delete=models.PROTECT, related_name="transitions")
    sequence = models.PositiveIntegerField(editable=False)

    # Transition details
    from_state = models.CharField(max_length=STATE_MAX_LENGTH)
    to_state = models.CharField(max_length=STATE_MAX_LENGTH)

    # Who and when
    transitioned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="transitions_made",
    )
    # System time. default (not auto_now_add) so the recorded value is the one hashed.
    transitioned_at = models.DateTimeField(default=timezone.now, editable=False)
    effective_at = models.DateTimeField(
        default=timezone.now, help_text="When transition actually occurred (for backdating)"
    )

    # Context
    reason = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)

    hash = models.CharField(max_length=64, editable=False, default="")

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        app_label = "django_encounters"
        verbose_name = "encounter transition"
        verbose_name_plural = "encounter transitions"
        ordering = ["-transitioned_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["encounter", "sequence"], name="encounters_transition_unique_sequence"
            )
        ]
        indexes = [
            models.Index(
                fields=["encounter", *TIMELINE_ORDER], name="encounters_transition_timeline"
            )
        ]

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Append-only - cannot update existing. (_state.adding, not pk: a UUID pk is set early.)
        if not self._state.adding:
            raise EncounterError("Transitions are immutable")
        # A low-level insert (services.transition() does not come through here): number and
        # chain the row, then move the encounter's projection by replaying its stream — the log
        # is the truth, so the projection follows whatever the log now says. No state-machine
        # checks: that is transition()'s job; the audit reports what this lets through.
        from .projections import mapper

        using = kwargs.get("using") or router.db_for_write(EncounterTransition, instance=self)
        with transaction.atomic(using=using):
            # The same row lock transition() takes: one writer at a time per encounter.
            list(
                Encounter.all_objects.using(using)
                .select_for_update()
                .filter(pk=self.encounter_id)
                .values_list("pk", flat=True)
            )
            rows = EncounterTransition.objects.using(using).filter(encounter_id=self.encounter_id)
            previous = rows.order_by("-sequence").values_list("sequence", "hash").first()
            last = previous[0] if previous else 0
            if self.sequence is None:
                self.sequence = last + 1
            if self.sequence > last + 1:
                raise EncounterError(
                    f"Encounter {self.encounter_id}: sequence {self.sequence} would leave a gap "
                    f"(the log is at version {last})"
                )
            if not self.hash:
                previous_hash = ""
                if previous and previous[0] == self.sequence - 1:
                    previous_hash = previous[1]
                elif self.sequence > 1:
                    previous_hash = (
                        rows.filter(sequence=self.sequence - 1)
                        .values_list("hash", flat=True)
                        .first()
                        or ""
                    )
                self.hash = self.compute_hash(previous_hash)
            super().save(*args, **kwargs)
            encounter = Encounter.all_objects.using(using).get(pk=self.encounter_id)
            timeline = mapper.load_timeline(encounter, using=using)
            Encounter.all_objects.using(using).filter(pk=encounter.pk).update(
                state=timeline.state,
                version=timeline.version,
                timeline_end_at=timeline.end_at,
                head_hash=timeline.head_hash,
                updated_at=timezone.now(),
            )

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise EncounterError(
            f"Transition {self.pk} (encounter {self.encounter_id}, sequence {self.sequence}) "
            "cannot be deleted: the transition log is append-only"
        )

    def compute_hash(self, previous_hash: str) -> str:
        """This row's hash given the previous row's hash."""
        return row_hash(
            encounter_id=self.encounter_id,
            sequence=self.sequence,
            from_state=self.from_state,
            to_state=self.to_state,
            effective_at=self.effective_at,
            transitioned_at=self.transitioned_at,
            transitioned_by=self.transitioned_by_id,
            reason=self.reason,
            metadata=self.metadata,
            previous_hash=previous_hash,
        )

    def __str__(self) -> str:
        return f"{self.from_state} → {self.to_state}"
