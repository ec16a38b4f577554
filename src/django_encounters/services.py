"""The public API: ``create_encounter``, ``transition``, ``run_validators``,
``get_encounter_history``, ``get_state_at``, ``duration_in_state``, ``time_in_states``, and for
async code ``acreate_encounter``, ``atransition``, ``aupgrade_encounter``, ``aget_state_at``,
``aget_encounter_history``, ``atime_in_states``, ``aduration_in_state``, ``aas_of``.

``transition()`` is the only code that decides a new row; it orchestrates the engine (the
decision), the validators and the store (the statements).
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections, router
from django.db import transaction as db_transaction
from django.utils import timezone

from . import arguments, conf, store
from .engine import stored_precision
from .engine import time_in_states as _time_in_states
from .exceptions import (
    ConcurrentTransitionError,
    EncounterError,
    EncounterNotFoundError,
    InvalidTransitionError,
    ValidationError,
)
from .models import (
    Encounter,
    EncounterDefinition,
    EncounterTransition,
    recorded_name,
    seal_of,
)
from .signals import post_transition, pre_transition
from .validators import StateValidator, get_validator_instance, parse_validator_entry

logger = logging.getLogger("django_encounters")

__all__ = [
    "create_encounter",
    "transition",
    "upgrade_encounter",
    "run_validators",
    "get_encounter_history",
    "get_state_at",
    "duration_in_state",
    "time_in_states",
    "acreate_encounter",
    "atransition",
    "aget_state_at",
    "aget_encounter_history",
    "aupgrade_encounter",
    "atime_in_states",
    "aduration_in_state",
    "aas_of",
    # Re-exported for callers that import the exceptions from here.
    "InvalidTransitionError",
    "ValidationError",
    "EncounterNotFoundError",
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
        created_by: the user who creates it, or None
        assigned_to: the user it is assigned to, or None
        scheduled_at: when the encounter is scheduled (timezone-aware)
        notes: free text
        metadata: a JSON-serialisable dict

    Raises:
        TypeError / ValueError: for a definition, subject or datetime of the wrong kind.
        EncounterConfigurationError: ``USE_TZ`` is off (system check E001); nothing written.
        InputLimitError: ``metadata`` is larger or deeper than ``ENCOUNTERS_MAX_CONTEXT_BYTES``
            / ``ENCOUNTERS_MAX_CONTEXT_DEPTH`` allow.
    """
    arguments.require_instance(definition, EncounterDefinition, "definition")
    if definition.deleted_at is not None:
        raise ValueError(f"definition '{definition.code}' is soft-deleted")
    arguments.require_saved_model(subject, "subject")
    arguments.require_user(created_by, "created_by")
    arguments.require_user(assigned_to, "assigned_to")
    arguments.require_aware(scheduled_at, "scheduled_at", optional=True)
    arguments.require_text(notes, "notes")
    if metadata is not None:
        arguments.bounded_json_copy(metadata, "metadata")
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
        encounter: the Encounter (its projection is refreshed in place afterwards)
        to_state: target state
        transitioned_by: the user making the change, or None
        reason: why (free text, stored on the row)
        context: dict passed to validators; its JSON copy, taken now, is stored (and hashed) as
            the row's ``metadata``
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
        EncounterConfigurationError: ``USE_TZ`` is off (system check E001), nothing touched.
        DatabaseLockedError: SQLite refused the write lock (another writer; the message names
            the setting that makes writers wait instead), nothing written.
        InputLimitError: ``reason`` longer than ``ENCOUNTERS_MAX_REASON_LENGTH``, ``context``
            larger or deeper than ``ENCOUNTERS_MAX_CONTEXT_BYTES`` / ``_DEPTH`` (nothing
            touched).
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        ConcurrentTransitionError: ``expected_version`` is stale, or another writer appended
            the same sequence first.
        InvalidTransitionError: unknown state, edge not allowed, effective_at too far in the
            future, or a backdate that would break the following row.
        ProjectionDriftError: the stored projection is ahead of the log.
        ValidationError: a validator refused.
        ValidatorConfigurationError: a validator entry cannot be loaded.
    """
    arguments.require_instance(encounter, Encounter, "encounter")
    conf.require_use_tz()
    stored_context = arguments.transition_arguments(
        to_state, transitioned_by, reason, context, effective_at, expected_version, skip_validation
    )
    using = router.db_for_write(Encounter, instance=encounter)
    # Looked up once and handed down (each ``connections[using]`` goes through asgiref's
    # context-local storage).
    connection = connections[using]
    with store.writer_errors(encounter.pk, using), db_transaction.atomic(using=using):
        # 1. Lock the encounter row, its definition and pinned version joined, and prove the
        #    projection against the log.
        locked = _lock(encounter.pk, using, expected_version, connection)
        timeline = locked.timeline_snapshot()
        # The clock is read only once the row is locked (a writer that waited for the lock
        # must not be stamped or dated before the row it waited for), and system time never
        # decreases along the stream (another server's clock may run ahead).
        clock = timezone.now()
        now = timeline.system_time(clock)
        if effective_at is None:
            # "Now" is the clock, not the system time: rows recorded within one millisecond are
            # stamped a millisecond apart, ahead of the clock, and a change dated there would
            # lie in the future (get_state_at(now) would not see it yet). And "now" means after
            # everything already on the timeline.
            today = stored_precision(clock)
            effective_at = max(today, locked.timeline_end_at or today)

        # 2. Load what the decision needs: the projection row is the snapshot; only a
        #    backdated transition needs the rows.
        # The pinned version's rules as the lock read them (no model instance built for them).
        rules = locked.machine_rules()
        if not timeline.appends_at_end(effective_at):
            timeline = store.load_timeline(locked, using)

        # 3. Decide, then run the validators on the locked, fresh instance.
        row = timeline.decide(
            rules,
            to_state,
            effective_at,
            transitioned_at=now,
            transitioned_by=getattr(transitioned_by, "pk", None),
            reason=reason,
            metadata=stored_context,
            latest_allowed=now + conf.future_tolerance(),
            transitioned_by_name=recorded_name(transitioned_by),
        )
        _seal(row)
        if not skip_validation:
            run_validators(locked, row.from_state, to_state, context)
        record = store.record_from_row(row, encounter=locked, transitioned_by=transitioned_by)
        pre_transition.send(
            sender=Encounter,
            encounter=locked,
            transition=record,
            from_state=row.from_state,
            to_state=to_state,
        )

        # 4.-6. Insert the row, update the projection, show it on the caller's instance.
        _record(
            encounter,
            locked,
            timeline,
            record,
            rules,
            using,
            version_hash=rules.content_hash,
            seen_by_others=pre_transition.has_listeners(Encounter),
            connection=connection,
        )

        # 7. post_transition once committed (``transaction.on_commit(…, using=using)``).
        connection.on_commit(lambda: _announce(encounter, record, row.from_state, to_state))
    return record


def upgrade_encounter(
    encounter: Encounter, transitioned_by: Any = None, reason: str = ""
) -> EncounterTransition:
    """Move an encounter on purpose to its definition's latest version: a row in its log that
    keeps the state and records who, when and why. From then on its transitions are decided
    (and its later rows judged) by the new version's rules and validators.

    Raises:
        EncounterNotFoundError: the encounter does not exist or is soft-deleted.
        InvalidStateError: its current state does not exist in the latest version (nothing is
            written; move it to a state both versions have first).
        EncounterError: it is already at the latest version.
    """
    arguments.require_instance(encounter, Encounter, "encounter")
    conf.require_use_tz()
    arguments.require_user(transitioned_by, "transitioned_by")
    arguments.require_reason(reason, "reason")
    using = router.db_for_write(Encounter, instance=encounter)
    with store.writer_errors(encounter.pk, using), db_transaction.atomic(using=using):
        locked = _lock(encounter.pk, using, None)
        definition = locked.definition
        if locked.definition_version >= definition.version:
            raise EncounterError(
                f"Encounter {locked.pk} is already at the latest version "
                f"(v{definition.version}) of definition '{definition.code}'"
            )
        latest = definition.latest_version()
        rules = latest.rules()
        timeline = locked.timeline_snapshot()
        row = timeline.upgrade(
            rules,
            transitioned_at=timezone.now(),
            transitioned_by=getattr(transitioned_by, "pk", None),
            reason=reason,
            transitioned_by_name=recorded_name(transitioned_by),
        )
        _seal(row)
        record = store.record_from_row(row, encounter=locked, transitioned_by=transitioned_by)
        locked._machine = latest
        _record(encounter, locked, timeline, record, None, using, version_hash=rules.content_hash)
    return record


def _seal(row: Any) -> None:
    """Seal a decided row under the current seal key (none configured: left unsealed)."""
    row.seal = seal_of("row", row.hash)


def _record(
    encounter: Encounter,
    locked: Encounter,
    timeline: Any,
    record: EncounterTransition,
    rules: Any,
    using: str,
    *,
    version_hash: str,
    seen_by_others: bool = True,
    connection: Any = None,
) -> None:
    """Insert the decided row (a sequence clash is a ``ConcurrentTransitionError``), update the
    projection columns that changed (and ``ended_at`` when the timeline ends in a final state
    under ``rules`` and ``ended_at`` is still empty: a time someone set is never rewritten; an
    upgrade, which keeps the state, passes None and leaves it alone;
    ``version_hash``: the content hash of the version it was decided under),
    and show the whole new projection on the caller's instance (its copy may be older than the
    locked row), so that a later ``save()`` is harmless. ``connection``: ``connections[using]``
    when the caller holds it."""
    if connection is None:
        connection = connections[using]
    store.insert_row(
        record,
        using,
        previous_hash=locked.head_hash,
        version_hash=version_hash,
        seen_by_others=seen_by_others,
        connection=connection,
    )
    projection = store.projection_of(timeline)
    if (
        rules is not None
        and timeline.end_at == record.effective_at
        and rules.is_final(timeline.state)
        and locked.ended_at is None
    ):
        projection["ended_at"] = record.effective_at
    projection["updated_at"] = record.transitioned_at
    store.update_projection(locked, projection, using, connection=connection)
    projection.setdefault("ended_at", locked.ended_at)
    locked.set_projection(projection)
    encounter.set_projection(projection, using=using, connection=connection)
    # As Model.save(): the instance now belongs to the database written, so that reads of it
    # right after (get_state_at, history) go there, not to a lagging replica it came from.
    encounter._state.db = using


def _lock(pk: Any, using: str, expected_version: int | None, connection: Any = None) -> Encounter:
    """The locked, freshly read encounter, its definition joined; refused when it does not
    exist (or is soft-deleted) or is not at ``expected_version``."""
    locked = store.lock_encounter(pk, using, connection=connection)
    if locked is None:
        raise EncounterNotFoundError(pk)
    if expected_version is not None and locked.version != expected_version:
        raise ConcurrentTransitionError(locked.pk, expected_version, locked.version)
    return locked


def _announce(
    encounter: Encounter, record: EncounterTransition, from_state: str, to_state: str
) -> None:
    """Send ``post_transition``. The row is committed: a failing receiver must not make the
    caller believe the transition failed (a retry would append it twice). Log it instead."""
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
                "post_transition receiver %r failed for encounter %s (sequence %s, %r -> %r); "
                "the transition is committed",
                receiver,
                record.encounter_id,
                record.sequence,
                from_state,
                to_state,
                exc_info=(type(response), response, response.__traceback__),
            )


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
    # The entries the write path's lock read, when it locked this instance; else the machine's.
    lazy = store.locked_machine(encounter)
    for entry in (lazy.validators() if lazy is not None else encounter.machine.validators) or []:
        validator: StateValidator = get_validator_instance(*parse_validator_entry(entry))
        try:
            validator.validate(encounter, from_state, to_state, context)
        except EncounterError:
            raise
        except Exception as exc:  # a validator bug must not escape as an untyped error
            name = type(validator).__name__
            raise ValidationError(name, f"validator raised {type(exc).__name__}: {exc}") from exc


def get_encounter_history(
    encounter: Encounter, *, using: str | None = None
) -> list[EncounterTransition]:
    """The encounter's rows in recording order (``sequence``); one query (on ``using``, see
    :func:`get_state_at`)."""
    arguments.require_instance(encounter, Encounter, "encounter")
    return store.history(encounter, _db_for_read(encounter, using))


def get_state_at(
    encounter: Encounter,
    timestamp: datetime,
    known_at: datetime | None = None,
    *,
    using: str | None = None,
) -> str:
    """The encounter's state at business time ``timestamp``, in one query.

    With ``known_at``, only rows recorded by then count: "what did the system say, at
    ``known_at``, about the state at ``timestamp``". Before the first row the state is the
    encounter's origin state. Ties on ``effective_at`` are broken by ``sequence``.

    Read from ``using`` when given; else from the database the instance was loaded from or
    last written to by ``transition()`` (read-your-writes: never a lagging replica right after
    a write), else where the project's router sends reads.

    Raises:
        ValueError: naive datetimes.
    """
    arguments.require_instance(encounter, Encounter, "encounter")
    arguments.require_aware(timestamp, "timestamp")
    arguments.require_aware(known_at, "known_at", optional=True)
    last = store.last_state_at(encounter.pk, timestamp, known_at, _db_for_read(encounter, using))
    return last if last is not None else encounter.origin_state


def time_in_states(
    encounter: Encounter, until: datetime | None = None, *, using: str | None = None
) -> dict[str, Decimal]:
    """Hours (``Decimal``) spent in each state over the business-time timeline, up to
    ``until`` (default now). States never entered are absent. ``using``: see
    :func:`get_state_at`."""
    arguments.require_instance(encounter, Encounter, "encounter")
    arguments.require_aware(until, "until", optional=True)
    timeline = store.load_timeline(encounter, _db_for_read(encounter, using))
    return _time_in_states(
        encounter.origin_state,
        encounter.created_at,
        timeline.entries or [],
        timezone.now() if until is None else until,
    )


def duration_in_state(
    encounter: Encounter, state: str, until: datetime | None = None, *, using: str | None = None
) -> Decimal:
    """Hours (``Decimal``) spent in ``state``; several visits add up; ``Decimal('0')`` if never
    entered."""
    return time_in_states(encounter, until, using=using).get(state, Decimal("0"))


def _db_for_read(encounter: Encounter, using: str | None) -> str:
    if using is not None:
        return using
    return encounter._state.db or router.db_for_read(EncounterTransition, instance=encounter)


# -- async ---------------------------------------------------------------------------------
# Each coroutine runs its sync function, whole, through ``sync_to_async(thread_sensitive=True)``
# (the way Django runs the ORM from async code): the transaction opens and commits inside that
# one call, in the thread that owns the connection, never across an ``await``.


async def acreate_encounter(
    definition: EncounterDefinition,
    subject: Any,
    created_by: Any = None,
    assigned_to: Any = None,
    scheduled_at: datetime | None = None,
    notes: str = "",
    metadata: dict | None = None,
) -> Encounter:
    """:func:`create_encounter` for async code (same arguments, result and errors)."""
    return await sync_to_async(create_encounter, thread_sensitive=True)(
        definition, subject, created_by, assigned_to, scheduled_at, notes, metadata
    )


async def atransition(
    encounter: Encounter,
    to_state: str,
    transitioned_by: Any = None,
    reason: str = "",
    context: dict | None = None,
    effective_at: datetime | None = None,
    skip_validation: bool = False,
    expected_version: int | None = None,
) -> EncounterTransition:
    """:func:`transition` for async code: the same arguments, one transaction, the same result
    (``encounter`` shows the new projection afterwards) and the same typed errors."""
    return await sync_to_async(transition, thread_sensitive=True)(
        encounter,
        to_state,
        transitioned_by,
        reason,
        context,
        effective_at,
        skip_validation,
        expected_version,
    )


async def aget_state_at(
    encounter: Encounter,
    timestamp: datetime,
    known_at: datetime | None = None,
    *,
    using: str | None = None,
) -> str:
    """:func:`get_state_at` for async code (same arguments, result and errors)."""
    return await sync_to_async(get_state_at, thread_sensitive=True)(
        encounter, timestamp, known_at, using=using
    )


async def aget_encounter_history(
    encounter: Encounter, *, using: str | None = None
) -> list[EncounterTransition]:
    """:func:`get_encounter_history` for async code (same arguments, result and errors)."""
    return await sync_to_async(get_encounter_history, thread_sensitive=True)(encounter, using=using)


async def aupgrade_encounter(
    encounter: Encounter, transitioned_by: Any = None, reason: str = ""
) -> EncounterTransition:
    """:func:`upgrade_encounter` for async code: the same arguments, one transaction, the same
    result (``encounter`` shows the new projection afterwards) and the same typed errors."""
    return await sync_to_async(upgrade_encounter, thread_sensitive=True)(
        encounter, transitioned_by, reason
    )


async def atime_in_states(
    encounter: Encounter, until: datetime | None = None, *, using: str | None = None
) -> dict[str, Decimal]:
    """:func:`time_in_states` for async code (same arguments, result and errors)."""
    return await sync_to_async(time_in_states, thread_sensitive=True)(encounter, until, using=using)


async def aduration_in_state(
    encounter: Encounter, state: str, until: datetime | None = None, *, using: str | None = None
) -> Decimal:
    """:func:`duration_in_state` for async code (same arguments, result and errors)."""
    return await sync_to_async(duration_in_state, thread_sensitive=True)(
        encounter, state, until, using=using
    )


def _as_of_list(timestamp: datetime, known_at: datetime | None, queryset: Any) -> list[Encounter]:
    base = Encounter.objects.all() if queryset is None else queryset
    if getattr(base, "model", None) is not Encounter or not hasattr(base, "as_of"):
        raise TypeError(f"queryset must be a queryset of Encounter, not {base!r}")
    return list(base.as_of(timestamp, known_at))


async def aas_of(
    timestamp: datetime, known_at: datetime | None = None, *, queryset: Any = None
) -> list[Encounter]:
    """``Encounter.objects.as_of(timestamp, known_at)`` for async code, evaluated: the
    encounters of ``queryset`` (default: every encounter not soft-deleted; filter and order it
    as you like, on ``state_at`` too once annotated by your own ``as_of``) as a list, each with
    its ``state_at`` — one statement, run whole in one thread-sensitive call. (Iterating the
    queryset with ``async for`` works as well: Django runs each chunk through
    ``sync_to_async``.)

    Raises:
        ValueError: naive datetimes.
        TypeError: ``queryset`` is not a queryset of encounters.
    """
    return await sync_to_async(_as_of_list, thread_sensitive=True)(timestamp, known_at, queryset)
