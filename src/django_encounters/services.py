"""The write path and the read API: ``create_encounter``, ``transition``, ``run_validators``,
``get_encounter_history``, ``get_state_at``, ``duration_in_state``, ``time_in_states``.

``transition()`` is the only code that appends to the log and moves the projection.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, OperationalError, models, router
from django.db import transaction as db_transaction
from django.utils import timezone
from eventsourcing.domain import OriginatorVersionError

from . import conf, persistence
from .exceptions import (
    ConcurrentTransitionError,
    EncounterError,
    EncounterNotFoundError,
    InvalidTransitionError,
    ProjectionDriftError,
    ValidationError,
)
from .models import Encounter, EncounterDefinition, EncounterTransition, _require_aware
from .projections import mapper
from .projections.timeline import EncounterTimeline
from .projections.timeline import time_in_states as _time_in_states
from .signals import post_transition, pre_transition
from .validators import StateValidator, get_validator_instance, parse_validator_entry

logger = logging.getLogger("django_encounters")

__all__ = [
    "create_encounter",
    "transition",
    "run_validators",
    "get_encounter_history",
    "get_state_at",
    "duration_in_state",
    "time_in_states",
]


def create_encounter(
    definition: EncounterDefinition,
    subject: Any,
    created_by: Any = None,
    assigned_to: Any = None,
    scheduled_at: datetime | None = None,
    notes: str = "",
    metadata: dict | None = None,
) -> Encounter:
    """Create a new encounter in its definition's initial state.

    Args:
        definition: EncounterDefinition to use
        subject: the saved model instance the encounter is about (any model)
        created_by, assigned_to: users, or None
        scheduled_at: when the encounter is scheduled (timezone-aware)
        notes, metadata: free text and a JSON-serialisable dict

    Raises:
        TypeError / ValueError: for a definition, subject or datetime of the wrong kind.
    """
    if not isinstance(definition, EncounterDefinition):
        raise TypeError(
            f"definition must be an EncounterDefinition, not {type(definition).__name__}"
        )
    if definition.deleted_at is not None:
        raise ValueError(f"definition '{definition.code}' is soft-deleted")
    if not isinstance(subject, models.Model):
        raise TypeError(f"subject must be a saved model instance, not {type(subject).__name__}")
    if subject.pk is None:
        raise ValueError(f"subject {subject!r} is not saved (it has no primary key)")
    for name, user in (("created_by", created_by), ("assigned_to", assigned_to)):
        _check_user(user, name)
    if scheduled_at is not None:
        _require_aware(scheduled_at, "scheduled_at")
    if metadata is not None:
        _check_json(metadata, "metadata")
    return Encounter.objects.create(
        definition=definition,
        subject=subject,
        state=definition.initial_state,
        created_by=created_by,
        assigned_to=assigned_to,
        scheduled_at=scheduled_at,
        notes=notes,
        metadata=metadata or {},
    )


def transition(
    encounter: Encounter,
    to_state: str,
    transitioned_by: Any = None,
    reason: str = "",
    context: dict | None = None,
    effective_at: datetime | None = None,
    skip_validation: bool = False,
    expected_version: int | None = None,
) -> EncounterTransition:
    """Move an encounter to ``to_state``: append one row to its log and update its projection,
    in one transaction.

    Args:
        encounter: the Encounter (its state and version are refreshed in place afterwards)
        to_state: target state
        transitioned_by: the user making the change, or None
        reason: why (free text, stored on the row)
        context: dict passed to validators and stored as the row's ``metadata``
        effective_at: business time of the change (timezone-aware; default now). Earlier than
            the timeline's last row means *backdated*: the row is inserted into the timeline at
            that time, its ``from_state`` is the state then, and the rows after it must still
            chain validly.
        skip_validation: skip the definition's validators (the state machine still applies)
        expected_version: refuse with ConcurrentTransitionError unless the stream is at this
            version (optimistic locking for UIs)

    Returns:
        The new EncounterTransition row.

    Raises:
        ValueError / TypeError: naive datetime, wrong argument types (nothing touched).
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        ConcurrentTransitionError: ``expected_version`` is stale, or another writer appended
            the same sequence first.
        InvalidTransitionError: unknown state, edge not allowed, effective_at too far in the
            future, or a backdate that would break the following row.
        ValidationError: a validator refused.
        ValidatorConfigurationError: a validator entry cannot be loaded.
    """
    # Argument checks first: a bad call touches nothing.
    if not isinstance(encounter, Encounter):
        raise TypeError(f"encounter must be an Encounter, not {type(encounter).__name__}")
    if not isinstance(to_state, str):
        raise TypeError(f"to_state must be a str, not {type(to_state).__name__} {to_state!r}")
    _check_user(transitioned_by, "transitioned_by")
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    _check_text(reason, "reason")
    # What is stored and hashed: a JSON copy of the context (keys as JSON writes them), taken
    # now, so validators or receivers that mutate the caller's dict cannot change the row
    # after its hash was computed.
    stored_context: dict = {}
    if context is not None:
        if not isinstance(context, dict):
            raise TypeError(f"context must be a dict, not {type(context).__name__}")
        stored_context = _check_json(context, "context")
    if expected_version is not None and (
        isinstance(expected_version, bool) or not isinstance(expected_version, int)
    ):
        raise TypeError(f"expected_version must be an int, not {expected_version!r}")
    if effective_at is not None:
        _require_aware(effective_at, "effective_at")

    using = encounter._state.db or router.db_for_write(Encounter, instance=encounter)
    try:
        return _transition(
            encounter,
            to_state,
            transitioned_by,
            reason,
            context,
            stored_context,
            effective_at,
            skip_validation,
            expected_version,
            using,
        )
    except OperationalError as exc:
        # SQLite without transaction_mode="IMMEDIATE" (Django < 5.1): a writer that cannot
        # upgrade its read lock gets "database is locked" — another writer got there first.
        if "database is locked" in str(exc):
            raise ConcurrentTransitionError(
                encounter.pk, detail=f"another writer holds the database ({exc})"
            ) from exc
        raise


def _transition(
    encounter: Encounter,
    to_state: str,
    transitioned_by: Any,
    reason: str,
    context: dict | None,
    stored_context: dict,
    effective_at: datetime | None,
    skip_validation: bool,
    expected_version: int | None,
    using: str,
) -> EncounterTransition:
    """The transaction of :func:`transition`, arguments already checked."""
    with db_transaction.atomic(using=using):
        locked = persistence.lock_encounter(encounter.pk, using)
        if locked is None:
            raise EncounterNotFoundError(encounter.pk)
        if expected_version is not None and locked.version != expected_version:
            raise ConcurrentTransitionError(locked.pk, expected_version, locked.version)
        # Read the clock only once the row is locked: a writer that waited for the lock must
        # not be stamped (transitioned_at) or, by default, dated (effective_at) before the row
        # it waited for, or an ordinary call would land in the past as a backdated row.
        now = timezone.now()
        if effective_at is None:
            # "Now" means after everything already on the timeline, even when another
            # application server's clock ran slightly ahead.
            end_at = locked.timeline_end_at
            effective_at = now if end_at is None or now >= end_at else end_at
        latest_allowed = now + conf.future_tolerance()

        rules = locked.definition.rules()
        timeline = mapper.timeline_from_projection(locked)
        if not timeline.appends_at_end(effective_at):
            # Backdated: the decision needs the rows of the timeline.
            timeline = _load_timeline(locked, using)
        event = timeline.decide(
            rules,
            to_state,
            effective_at,
            transitioned_at=now,
            transitioned_by=getattr(transitioned_by, "pk", None),
            reason=reason,
            metadata=stored_context,
            latest_allowed=latest_allowed,
        )
        from_state = event.from_state

        if not skip_validation:
            run_validators(locked, from_state, to_state, context)

        record = mapper.row_from_event(event, encounter=locked, transitioned_by=transitioned_by)
        pre_transition.send(
            sender=Encounter,
            encounter=locked,
            transition=record,
            from_state=from_state,
            to_state=to_state,
        )
        try:
            persistence.insert_transition(record, using, previous_hash=locked.head_hash)
        except IntegrityError as exc:
            if _is_sequence_clash(exc):
                raise ConcurrentTransitionError(
                    locked.pk,
                    detail=f"sequence {record.sequence} is already in the log: another writer "
                    "appended it (retry), or rows were inserted below the library and the "
                    "projection is behind (run `manage.py rebuild_encounter_projections "
                    f"--encounter {locked.pk}`)",
                ) from exc
            raise

        changes: dict[str, Any] = {}
        for name, value in (
            ("state", timeline.state),
            ("version", timeline.version),
            ("timeline_end_at", timeline.end_at),
            ("head_hash", timeline.head_hash),
        ):
            if getattr(locked, name) != value:
                changes[name] = value
        ends_timeline = timeline.end_at == effective_at and timeline.state == to_state
        if ends_timeline and rules.is_final(to_state):
            changes["ended_at"] = effective_at
        changes["updated_at"] = now
        # The projection doubles as the snapshot the decision used; if its version ran ahead of
        # the log (written behind the library's back), the new row would leave a gap: refuse.
        guard = (locked.pk, record.sequence - 1) if record.sequence > 1 else None
        if not persistence.update_columns(Encounter, locked.pk, changes, using, after_row=guard):
            stream_version = (
                EncounterTransition.objects.using(using).filter(encounter_id=locked.pk).count()
            )
            raise ProjectionDriftError(locked.pk, locked.version, stream_version - 1)

        # The caller's instance now shows the whole new projection (not only what changed
        # against the locked row: the caller's copy may be older); a later save() is harmless.
        current = {
            "state": timeline.state,
            "version": timeline.version,
            "timeline_end_at": timeline.end_at,
            "head_hash": timeline.head_hash,
            "ended_at": changes.get("ended_at", locked.ended_at),
            "updated_at": now,
        }
        for target in (encounter, locked):
            for name, value in current.items():
                setattr(target, name, value)

        def _announce() -> None:
            # The row is committed: a failing receiver must not make the caller believe the
            # transition failed (a retry would append it twice). Log it instead.
            responses = post_transition.send_robust(
                sender=Encounter,
                encounter=encounter,
                transition=record,
                from_state=from_state,
                to_state=to_state,
            )
            for receiver, response in responses:
                if isinstance(response, Exception):
                    logger.error(
                        "post_transition receiver %r failed for encounter %s (sequence %s, "
                        "%r -> %r); the transition is committed",
                        receiver,
                        record.encounter_id,
                        record.sequence,
                        from_state,
                        to_state,
                        exc_info=(type(response), response, response.__traceback__),
                    )

        db_transaction.on_commit(_announce, using=using)
    return record


def run_validators(
    encounter: Encounter,
    from_state: str,
    to_state: str,
    context: dict | None = None,
) -> None:
    """Run the definition's validators, in order, for ``from_state -> to_state``.

    Raises:
        ValidationError: a validator refused. A validator that raises anything other than an
            ``EncounterError`` is reported as a ValidationError naming it (the original
            exception is chained as ``__cause__``).
        ValidatorConfigurationError: an entry cannot be loaded.
    """
    entries = encounter.definition.validators or []
    for entry in entries:
        validator: StateValidator = get_validator_instance(*parse_validator_entry(entry))
        try:
            validator.validate(encounter, from_state, to_state, context)
        except EncounterError:
            raise
        except Exception as exc:  # a validator bug must not escape as an untyped error
            name = type(validator).__name__
            raise ValidationError(name, f"validator raised {type(exc).__name__}: {exc}") from exc


def get_encounter_history(encounter: Encounter) -> list[EncounterTransition]:
    """The encounter's rows in recording order (``sequence``); one query."""
    if not isinstance(encounter, Encounter):
        raise TypeError(f"encounter must be an Encounter, not {type(encounter).__name__}")
    return persistence.history(encounter, _db_for_read(encounter))


def get_state_at(
    encounter: Encounter, timestamp: datetime, known_at: datetime | None = None
) -> str:
    """The encounter's state at business time ``timestamp``, in one query.

    With ``known_at``, only rows recorded by then count: "what did the system say, at
    ``known_at``, about the state at ``timestamp``". Before the first row the state is the
    encounter's origin state. Ties on ``effective_at`` are broken by ``sequence``.

    Raises:
        ValueError: naive datetimes.
    """
    if not isinstance(encounter, Encounter):
        raise TypeError(f"encounter must be an Encounter, not {type(encounter).__name__}")
    _require_aware(timestamp, "timestamp")
    if known_at is not None:
        _require_aware(known_at, "known_at")
    last = persistence.last_state_at(encounter.pk, timestamp, known_at, _db_for_read(encounter))
    return last if last is not None else encounter.origin_state


def time_in_states(encounter: Encounter, until: datetime | None = None) -> dict[str, Decimal]:
    """Hours (``Decimal``) spent in each state over the business-time timeline, up to
    ``until`` (default now). States never entered are absent."""
    if until is None:
        until = timezone.now()
    else:
        _require_aware(until, "until")
    timeline = _load_timeline(encounter, _db_for_read(encounter))
    return _time_in_states(
        encounter.origin_state, encounter.created_at, timeline.entries or [], until
    )


def duration_in_state(encounter: Encounter, state: str, until: datetime | None = None) -> Decimal:
    """Hours (``Decimal``) spent in ``state``; several visits add up; ``Decimal('0')`` if never
    entered."""
    return time_in_states(encounter, until).get(state, Decimal("0"))


# ---------------------------------------------------------------------------------------------


def _load_timeline(encounter: Encounter, using: str) -> EncounterTimeline:
    """Replay the encounter's whole stream; a stream with a sequence gap is refused with a
    typed error naming the encounter (the library's version check finds the gap)."""
    try:
        return mapper.load_timeline(encounter, using=using)
    except OriginatorVersionError as exc:
        raise EncounterError(
            f"Encounter {encounter.pk}: its transition log has a sequence gap ({exc}); refusing "
            f"to replay a damaged stream. Run `manage.py audit_encounters --encounter "
            f"{encounter.pk}`"
        ) from exc


def _db_for_read(encounter: Encounter) -> str:
    return encounter._state.db or router.db_for_read(EncounterTransition, instance=encounter)


def _check_user(user: Any, name: str) -> None:
    if user is None:
        return
    user_model = get_user_model()
    if not isinstance(user, user_model):
        raise TypeError(
            f"{name} must be a {user_model.__name__} instance or None, not {type(user).__name__}"
        )
    if user.pk is None:
        raise ValueError(f"{name} {user!r} is not saved (it has no primary key)")


def _check_json(value: Any, name: str) -> Any:
    """Refuse what the JSON column or the row hash could not take: the hash serialises with
    sorted keys (mixed key types fail), strict JSON has no NaN/Infinity, and text must be
    valid UTF-8 without NUL (PostgreSQL refuses both; SQLite would store them).

    Returns the value's JSON copy (keys as JSON writes them): what is stored and hashed."""
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from exc
    if _contains_nul(value):
        raise ValueError(f"{name} contains a NUL character (\\x00), which cannot be stored")
    return json.loads(text)


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_contains_nul(v) for v in value)
    return False


def _check_text(value: str, name: str) -> None:
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character (\\x00), which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text: {exc}") from exc


def _is_sequence_clash(exc: IntegrityError) -> bool:
    text = str(exc).lower()
    cause = exc.__cause__
    constraint = getattr(getattr(cause, "diag", None), "constraint_name", None)
    if constraint:
        return constraint == "encounters_transition_unique_sequence"
    return "unique" in text and "sequence" in text


# Re-exported for callers that import the exception from here (SPEC's services module did).
__all__ += ["InvalidTransitionError", "ValidationError", "EncounterNotFoundError"]
