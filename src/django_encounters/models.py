"""Models: the definition (data), the encounter (projection) and the transition log (truth)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, cast

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connections, models, router, transaction
from django.db.models.fields.related_descriptors import ForwardManyToOneDescriptor
from django.db.models.query_utils import DeferredAttribute
from django.utils import timezone

from . import conf
from .arguments import require_aware
from .basemodels import BaseModel, SoftDeleteManager, SoftDeleteQuerySet, UUIDModel
from .engine import (
    ROW_FIELDS,
    TIMELINE_ORDER,
    EncounterTimeline,
    Genesis,
    Rules,
    StreamRow,
    definition_version_hash,
    genesis_hash,
    row_hash,
    stored_precision,
)
from .exceptions import (
    DefinitionError,
    DefinitionVersionError,
    EncounterConfigurationError,
    EncounterError,
    InvalidStateError,
    ValidatorConfigurationError,
)
from .validators import get_validator_instance, parse_validator_entry

STATE_MAX_LENGTH = 50
#: The permission (besides ``change_encounter``) needed to move an encounter on from the admin
#: or the REST API.
TRANSITION_PERMISSION = "django_encounters.transition_encounter"
#: Room for a hash's format prefix ("v2:") and digest, and for longer formats later.
HASH_MAX_LENGTH = 100
#: A seal as stored: ``"<key id>:<64 hex digits>"`` (key ids are at most 32 characters).
SEAL_MAX_LENGTH = 100
#: A user's name as recorded with what they did (the user row may be renamed later).
NAME_MAX_LENGTH = 255


#: The encounter's columns derived purely from the log, and the timeline attribute of each.
PROJECTION = {
    "state": "state",
    "version": "version",
    "timeline_end_at": "end_at",
    "head_hash": "head_hash",
    "definition_version": "definition_version",
    "last_transitioned_at": "recorded_until",
}

#: The transition table's column (attname) for each of the engine's ``ROW_FIELDS``.
ROW_COLUMNS = tuple(
    "transitioned_by_id" if name == "transitioned_by" else name for name in ROW_FIELDS
)


def seal_of(tag: str, record_hash: str) -> str:
    """The seal of a record's hash (``tag``: what the record is, ``engine.seals``) under the
    current key of ``ENCOUNTERS_SEAL_KEYS`` ("" without keys: the record stays unsealed)."""
    sealer = conf.sealer()
    return "" if sealer is None else sealer.seal(tag, record_hash)


def recorded_name(user: Any) -> str:
    """What a row records of ``user`` (None: nobody, ""): the value of its ``USERNAME_FIELD``
    now, as text (cut to the column's length), so that a later rename of the user row does not
    change whom the history names."""
    if user is None:
        return ""
    get_username = getattr(user, "get_username", None)
    name = get_username() if get_username is not None else getattr(user, user.USERNAME_FIELD)
    return str(name)[:NAME_MAX_LENGTH]


def row_of_record(record: Any) -> StreamRow:
    """The content of an ``EncounterTransition`` instance as the engine's row."""
    return StreamRow(*(getattr(record, column) for column in ROW_COLUMNS))


class StoreOperations(NamedTuple):
    """The two operations of the store that the models run: the low-level append behind
    ``EncounterTransition.save()`` and the state-at annotation behind
    ``Encounter.objects.as_of()``.

    The store builds its statements from the models (it imports this module), so this module
    does not import the store: the store hands these over with :func:`install_store` when it is
    imported, which the app's ``ready()`` does. They are the only way in from here."""

    #: ``(record, using)``: number, chain and insert an unsaved transition row, inside its own
    #: transaction, and move the projection to the replay of the stream.
    append: Callable[[Any, str], None]
    #: ``(encounters, timestamp, known_at)``: the queryset annotated with ``state_at``.
    annotate_state_at: Callable[[Any, datetime, datetime | None], Any]


_installed: StoreOperations | None = None


def install_store(operations: StoreOperations) -> None:
    """Hand the models the store's operations (the store does, when imported)."""
    global _installed
    _installed = operations


def store_operations() -> StoreOperations:
    """The store's operations; ``EncounterConfigurationError`` before the store is installed
    (the app is not in ``INSTALLED_APPS``, or Django is not set up yet)."""
    if _installed is None:
        raise EncounterConfigurationError(
            "the encounter store is not installed: add 'django_encounters' to INSTALLED_APPS "
            "and call django.setup() (the app's ready() installs it)"
        )
    return _installed


#: The fields that make a definition's state machine (versioned together).
MACHINE_FIELDS = ("states", "initial_state", "final_states", "transitions", "validators")


class StateMachine(models.Model):
    """The state machine of a definition, as stored JSON, and every question asked of it
    (answered by the engine's :class:`~django_encounters.engine.Rules`)."""

    states = models.JSONField(default=list, help_text="List of allowed state names")
    initial_state = models.CharField(max_length=STATE_MAX_LENGTH)
    final_states = models.JSONField(default=list, help_text="List of terminal state names")
    transitions = models.JSONField(
        default=dict, help_text="Dict mapping state to list of allowed next states"
    )
    validators = models.JSONField(default=list, help_text="List of validator class paths")

    class Meta:
        abstract = True

    def _code(self) -> str:
        raise NotImplementedError

    def _number(self) -> int:
        raise NotImplementedError

    def rules(self, *, code: str | None = None) -> Rules:
        """The state machine as plain data: every question below is answered by it
        (``code``: the definition's, when the caller knows it without a query)."""
        return Rules.from_config(
            self._code() if code is None else code,
            self.states,
            self.transitions,
            self.final_states,
            self.initial_state,
            self._number(),
            getattr(self, "content_hash", ""),
        )

    def machine(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in MACHINE_FIELDS}

    def is_valid_state(self, state: str) -> bool:
        """Check if a state is defined for this encounter type."""
        return self.rules().is_state(state)

    def is_final_state(self, state: str) -> bool:
        """Check if a state is a final/terminal state."""
        return self.rules().is_final(state)

    def is_valid_transition(self, from_state: str, to_state: str) -> bool:
        """Check if a transition between two states is allowed."""
        return self.rules().is_allowed(from_state, to_state)

    def get_allowed_transitions(self, from_state: str) -> list:
        """Get list of states that can be transitioned to from ``from_state``."""
        return self.rules().allowed(from_state)

    def get_warnings(self) -> list[str]:
        """Structural smells that are legal, each naming the states concerned: states
        unreachable from the initial state, exits from final states, non-final dead ends."""
        return self.rules().warnings()


class EncounterDefinition(UUIDModel, BaseModel, StateMachine):
    """Defines an encounter type: its states, transitions and validators (data, not code).

    The machine is versioned: every saved change to it creates a new immutable
    :class:`EncounterDefinitionVersion` (``version`` is the latest). Encounters are pinned to
    the version they were created under and keep its rules until ``upgrade_encounter()``.
    """

    name = models.CharField(max_length=100, unique=True)
    code = models.CharField(max_length=50, unique=True)
    description = models.TextField(blank=True, default="")
    version = models.PositiveIntegerField(default=0, editable=False)

    # Metadata
    metadata = models.JSONField(default=dict, blank=True)

    class Meta:
        app_label = "django_encounters"
        verbose_name = "encounter definition"
        verbose_name_plural = "encounter definitions"
        ordering = ["name"]

    def _code(self) -> str:
        return self.code

    def _number(self) -> int:
        return self.version

    # -- validation -------------------------------------------------------------------------

    def clean(self) -> None:
        """Check the state machine and validators; raise ``DefinitionError`` (also Django's
        ``ValidationError``) naming every offending entry. Also run by :meth:`save`."""
        errors: dict[str, list[str]] = {}
        for name in ("name", "code"):
            _check_label(self, name, errors)
        known = _check_states(self.states, errors)
        if self.initial_state not in known:
            errors.setdefault("initial_state", []).append(
                f"initial state {self.initial_state!r} is not in states {self.states}"
            )
        _check_final_states(self.final_states, known, errors)
        _check_transitions(self.transitions, known, errors)
        _check_validators(self.validators, errors)
        if errors:
            raise DefinitionError(errors, definition_code=self.code)

    def full_clean(self, *args: Any, **kwargs: Any) -> None:
        """Django's ``full_clean()`` (fields, :meth:`clean`, uniqueness), raising
        ``DefinitionError`` (also Django's ``ValidationError``) with every message it found."""
        try:
            super().full_clean(*args, **kwargs)
        except DefinitionError:
            raise
        except DjangoValidationError as exc:
            errors = exc.error_dict if hasattr(exc, "error_dict") else exc.error_list
            raise DefinitionError(errors, definition_code=self.code) from exc

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Validate, save, and record the machine as a new version when it changed."""
        self.clean()
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        with transaction.atomic(using=using):
            latest = None
            if not self._state.adding:
                latest = (
                    EncounterDefinitionVersion.objects.using(using)
                    .filter(definition_id=self.pk)
                    .order_by("-number")
                    .first()
                )
            changed = latest is None or latest.machine() != self.machine()
            if changed:
                self.version = (latest.number if latest is not None else 0) + 1
                update_fields = kwargs.get("update_fields")
                if update_fields is not None:  # the versioned machine is stored whole
                    kwargs["update_fields"] = {*update_fields, "version", *MACHINE_FIELDS}
            super().save(*args, **kwargs)
            if changed:
                content_hash, seal = version_content_hash(self, latest)
                EncounterDefinitionVersion.objects.using(using).create(
                    definition=self,
                    number=self.version,
                    content_hash=content_hash,
                    seal=seal,
                    **self.machine(),
                )

    def latest_version(self) -> EncounterDefinitionVersion:
        """The version new encounters are pinned to: the last one of the chain, which the
        ``version`` pointer must name.

        Raises:
            DefinitionVersionError: the pointer names another version than the last one
                (moved back, or to a version that does not exist): new encounters would be
                pinned to a machine nobody chose.
        """
        found = (
            self.versions.annotate(pointer=models.F("definition__version"))
            .order_by("-number")
            .first()
        )
        if found is None or found.pointer != found.number:
            raise DefinitionVersionError(
                self.code,
                found.pointer if found is not None else self.version,
                found.number if found is not None else None,
            )
        return found

    def __str__(self) -> str:
        return self.name


def version_content_hash(
    definition: EncounterDefinition, previous: EncounterDefinitionVersion | None
) -> tuple[str, str]:
    """``(content hash, seal)`` of the version ``definition`` (the model, or a migration's
    historical one) is about to record (its machine, number ``definition.version``), chained
    to ``previous`` (its latest version, None for the
    first). Both "" while ``previous`` has no content hash (written before versions were
    hashed: ``seal_encounters`` hashes the chain in order); the seal "" without seal keys."""
    previous_hash = "" if previous is None else previous.content_hash
    if previous is not None and not previous_hash:
        return "", ""
    # The machine read field by field: a migration's historical model has no machine().
    machine = {name: getattr(definition, name) for name in MACHINE_FIELDS}
    content_hash = definition_version_hash(
        definition.pk, definition.version, machine, previous_hash
    )
    return content_hash, seal_of("version", content_hash)


#: An encounter's creation facts as stored (attnames), in the order ``genesis_from`` reads.
GENESIS_FACTS = (
    "id",
    "definition_id",
    "origin_version",
    "subject_content_type_id",
    "subject_id",
    "origin_state",
    "created_at",
)


def genesis_from(values: Any, using: str, *, subject_type: str | None = None) -> Genesis:
    """The :class:`Genesis` of ``GENESIS_FACTS`` values (the subject's type named by its
    ``app_label.model``, which a restored database keeps, not by its content-type id;
    ``subject_type``: that name when the caller already looked it up)."""
    pk, definition_id, version, content_type_id, subject_id, origin, created_at = values
    if subject_type is None:
        subject_type = subject_type_name(content_type_id, using)
    return Genesis(
        encounter_id=pk,
        definition_id=definition_id,
        definition_version=version,
        subject_type=subject_type,
        subject_id=str(subject_id),
        origin_state=origin,
        created_at=created_at,
    )


def subject_type_name(content_type_id: Any, using: str) -> str:
    """``app_label.model`` of a content type (through the content types' own cache)."""
    found = ContentType.objects.db_manager(using).get_for_id(content_type_id)
    return f"{found.app_label}.{found.model}"


_PENDING = "_pending_projection"
#: The projection columns a timeline snapshot takes besides ``version``: (column, attribute).
_SNAPSHOT_COLUMNS = tuple(
    (column, attribute) for column, attribute in PROJECTION.items() if column != "version"
)
#: An encounter's definition and subject: its genesis facts an instance may change (a move).
_FACTS = ("definition_id", "subject_content_type_id", "subject_id")
_UNLOADED = object()
#: Where the store's write path leaves, on an encounter it locked, what builds that encounter's
#: definition and pinned version when something first asks for them (``store.writes``): an
#: object whose ``materialize(instance)`` caches both on the instance, as the lock used to.
LAZY_LOCK = "_lazy_lock"


def materialize_lock(instance: Any) -> None:
    """Build the definition and pinned version a locked encounter read with its lock, if not
    done yet (see ``LAZY_LOCK``)."""
    lazy = instance.__dict__.get(LAZY_LOCK)
    if lazy is not None:
        lazy.materialize(instance)


class DefinitionAttribute(ForwardManyToOneDescriptor):
    """``Encounter.definition``: Django's, except that on an encounter the write path locked,
    the definition read with the lock is built on first access (no query, as before)."""

    def __get__(self, instance: Any, cls: Any = None) -> Any:
        if instance is not None and LAZY_LOCK in instance.__dict__:
            instance.__dict__[LAZY_LOCK].materialize(instance)
        return super().__get__(instance, cls)


class _PendingProjection:
    """Projection values shown on a caller's instance before their transaction committed."""

    def __init__(self, connection: Any, before: dict[str, Any]) -> None:
        self.connection = connection
        self.before = before
        self.confirmed = False

    def confirm(self) -> None:
        self.confirmed = True

    def rolled_back(self) -> bool:
        """Neither committed nor still waiting to commit: the transaction or savepoint it was
        written in rolled back (Django drops their ``on_commit`` callbacks then)."""
        if self.confirmed:
            return False
        return not any(entry[1] == self.confirm for entry in self.connection.run_on_commit)

    def settled(self) -> bool:
        return self.confirmed or self.rolled_back()

    def restore(self, instance: Any) -> None:
        data = instance.__dict__
        for name, value in self.before.items():
            if value is _UNLOADED:
                data.pop(name, None)
            else:
                data[name] = value
        data.pop(_PENDING, None)


class ProjectedAttribute(DeferredAttribute):
    """The attribute of a projection column on an ``Encounter``: a value ``transition()``
    showed on the caller's instance is taken back when its transaction rolls back."""

    def __get__(self, instance: Any, cls: Any = None) -> Any:
        if instance is not None:
            pending = instance.__dict__.get(_PENDING)
            if pending is not None and pending.rolled_back():
                pending.restore(instance)
        return super().__get__(instance, cls)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.field.attname] = value


class AppendOnlyQuerySet(models.QuerySet):
    """Rows that are facts: querysets refuse to update or delete them."""

    def _refuse(self, what: str) -> EncounterError:
        return EncounterError(
            f"{self.model._meta.verbose_name_plural} are append-only: {what}() is not allowed"
        )

    def update(self, **kwargs: Any) -> int:
        raise self._refuse("update")

    def delete(self) -> tuple[int, dict[str, int]]:  # type: ignore[override]
        raise self._refuse("delete")

    def bulk_update(self, objs: Any, fields: Any, batch_size: Any = None) -> int:
        raise self._refuse("bulk_update")

    def update_or_create(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("update_or_create")

    def bulk_create(self, *args: Any, **kwargs: Any) -> Any:
        raise EncounterError(
            f"{self.model._meta.verbose_name_plural} cannot be bulk-created: bulk_create() "
            "skips their numbering, hashing and checks; create them one at a time"
        )


class AppendOnlyModel(UUIDModel):
    """Rows that are facts: saved once, never changed or deleted (the database's triggers
    refuse it too)."""

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        abstract = True

    def refuse_change(self) -> None:
        """Refuse to save a row that is already stored (``_state.adding``, not the pk: a UUID
        pk is set before the first save)."""
        if not self._state.adding:
            raise EncounterError(
                f"{self._meta.verbose_name_plural} are immutable: {self} cannot be changed"
            )

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.refuse_change()
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise EncounterError(
            f"{self._meta.verbose_name} {self} cannot be deleted: "
            f"{self._meta.verbose_name_plural} are append-only and kept"
        )


class EncounterDefinitionVersion(AppendOnlyModel, StateMachine):
    """One immutable version of a definition's machine (``number`` 1, 2, …)."""

    # No index of its own: the unique (definition, number) index leads with it (a second one
    # would only cost writes and the planner's time).
    definition = models.ForeignKey(
        EncounterDefinition, on_delete=models.PROTECT, related_name="versions", db_index=False
    )
    number = models.PositiveIntegerField()
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    #: The version's content hash, chained per definition (it covers version n-1's); "" on a
    #: version written before it existed, until ``seal_encounters`` fills it in.
    content_hash = models.CharField(
        max_length=HASH_MAX_LENGTH, default="", blank=True, editable=False
    )
    #: HMAC seal of ``content_hash`` under ``ENCOUNTERS_SEAL_KEYS`` ("" when unsealed).
    seal = models.CharField(max_length=SEAL_MAX_LENGTH, default="", blank=True, editable=False)

    class Meta:
        app_label = "django_encounters"
        verbose_name = "encounter definition version"
        verbose_name_plural = "encounter definition versions"
        ordering = ["definition", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["definition", "number"], name="encounters_definition_unique_version"
            )
        ]

    def _code(self) -> str:
        return str(self.definition.code)

    def _number(self) -> int:
        return self.number

    def __str__(self) -> str:
        return f"{self.definition} v{self.number}"


def _check_label(definition: EncounterDefinition, name: str, errors: dict[str, list[str]]) -> None:
    """``name`` and ``code``: non-empty printable text that fits its column."""
    value = getattr(definition, name)
    limit = getattr(definition._meta.get_field(name), "max_length", None)
    if not isinstance(value, str) or not value.strip():
        message = f"{name} must be non-empty text, not {value!r}"
    elif not value.isprintable():
        message = f"{name} must be printable text (no NUL, control characters or line breaks)"
    elif limit is not None and len(value) > limit:
        message = f"{name} is {len(value)} characters long; at most {limit} fit"
    else:
        return
    errors.setdefault(name, []).append(message)


def _check_states(states: Any, errors: dict[str, list[str]]) -> set[str]:
    """Record what is wrong with ``states``; return the well-formed state names."""
    found = errors.setdefault("states", [])
    if not isinstance(states, list) or not states:
        found.append(f"states must be a non-empty list of state names, not {states!r}")
        states = []
    else:
        bad = [s for s in states if not isinstance(s, str) or not s.strip()]
        if bad:
            found.append(f"state names must be non-empty strings: {bad!r}")
        unprintable = [s for s in states if isinstance(s, str) and s and not s.isprintable()]
        if unprintable:
            found.append(
                "state names must be printable text (no NUL, control characters or line "
                f"breaks): {unprintable!r}"
            )
        long = [s for s in states if isinstance(s, str) and len(s) > STATE_MAX_LENGTH]
        if long:
            found.append(f"state names longer than {STATE_MAX_LENGTH} characters: {long!r}")
        duplicates = sorted({s for s in states if isinstance(s, str) and states.count(s) > 1})
        if duplicates:
            found.append(f"duplicate states: {duplicates}")
    if not found:
        del errors["states"]
    return {s for s in states if isinstance(s, str)}


def _check_final_states(finals: Any, known: set[str], errors: dict[str, list[str]]) -> None:
    if not isinstance(finals, list):
        errors.setdefault("final_states", []).append(f"final_states must be a list, not {finals!r}")
        return
    unknown = [s for s in finals if s not in known]
    if unknown:
        errors.setdefault("final_states", []).append(f"final states not in states: {unknown!r}")


def _check_transitions(transitions: Any, known: set[str], errors: dict[str, list[str]]) -> None:
    found: list[str] = []
    if not isinstance(transitions, dict):
        found.append(f"transitions must be a dict of state -> [states], not {transitions!r}")
    else:
        unknown_keys = [k for k in transitions if k not in known]
        if unknown_keys:
            found.append(f"transition sources not in states: {unknown_keys!r}")
        for source, targets in transitions.items():
            if not isinstance(targets, list):
                found.append(f"targets of {source!r} must be a list, not {targets!r}")
                continue
            unknown_targets = [t for t in targets if t not in known]
            if unknown_targets:
                found.append(f"targets of {source!r} not in states: {unknown_targets!r}")
    if found:
        errors.setdefault("transitions", []).extend(found)


def _check_validators(validators: Any, errors: dict[str, list[str]]) -> None:
    if not isinstance(validators, list):
        errors.setdefault("validators", []).append(f"validators must be a list, not {validators!r}")
        return
    for index, entry in enumerate(validators):
        try:
            get_validator_instance(*parse_validator_entry(entry))
        except ValidatorConfigurationError as exc:
            errors.setdefault("validators", []).append(f"entry {index}: {exc}")


class EncounterQuerySet(SoftDeleteQuerySet):
    def as_of(self, timestamp: datetime, known_at: datetime | None = None) -> EncounterQuerySet:
        """Annotate each encounter with ``state_at``: its state at ``timestamp`` (as known at
        ``known_at``, if given), in one SQL statement. Filter and order on it freely::

            Encounter.objects.as_of(quarter_end).filter(state_at="in_progress")
        """
        require_aware(timestamp, "timestamp")
        require_aware(known_at, "known_at", optional=True)
        return store_operations().annotate_state_at(self, timestamp, known_at)

    def update(self, **kwargs: Any) -> int:
        """As Django's, but the projection and the creation facts are refused: only the log
        moves them."""
        _refuse_log_derived(kwargs)
        return super().update(**kwargs)

    def bulk_update(self, objs: Any, fields: Any, batch_size: Any = None) -> int:
        _refuse_log_derived(fields)
        return super().bulk_update(objs, fields, batch_size=batch_size)

    def bulk_create(self, *args: Any, **kwargs: Any) -> Any:
        raise EncounterError(
            "Encounter.objects.bulk_create() would skip the genesis hash and the definition "
            "version pin; create encounters with create_encounter() (or Encounter.objects."
            "create()), one at a time"
        )


def _refuse_log_derived(fields: Any) -> None:
    names = {str(name).removesuffix("_id") for name in fields}
    touched = sorted(names & set(Encounter.LOG_DERIVED_FIELDS))
    if touched:
        raise EncounterError(
            f"Encounter columns {touched} are derived from the transition log and its genesis; "
            "they cannot be updated (run `manage.py rebuild_encounter_projections` to recompute "
            "the projection)"
        )


class EncounterManager(SoftDeleteManager.from_queryset(EncounterQuerySet)):  # type: ignore[misc]
    """Hides soft-deleted encounters; ``as_of`` for bulk temporal queries."""


class AllEncountersManager(models.Manager.from_queryset(EncounterQuerySet)):  # type: ignore[misc]
    """Every encounter, soft-deleted ones included."""


class Encounter(UUIDModel, BaseModel):
    """An encounter of one subject moving through one definition.

    The projection columns (``state``, ``version``, ``timeline_end_at``, ``head_hash``,
    ``definition_version``, ``last_transitioned_at``) are derived from the transition log: only
    ``transition()``, ``upgrade_encounter()`` and the rebuild write them, and ``save()`` of an
    existing row never does. The creation facts (definition and ``origin_version``, subject,
    ``origin_state``, ``created_at``) are hashed into ``genesis_hash``, which row 1 chains to.
    """

    #: Columns derived purely from the log.
    PROJECTION_FIELDS = tuple(PROJECTION)
    #: Creation facts covered by the genesis hash (besides the definition and subject).
    GENESIS_FIELDS = (
        "origin_state",
        "origin_version",
        "created_at",
        "genesis_hash",
        "genesis_seal",
    )
    LOG_DERIVED_FIELDS = (*PROJECTION_FIELDS, *GENESIS_FIELDS)

    definition = models.ForeignKey(
        EncounterDefinition, on_delete=models.PROTECT, related_name="encounters"
    )

    # Subject via GenericFK (what/who this encounter is about); text id: int and UUID keys work.
    # (Indexed by the (subject_content_type, subject_id) index, which leads with it.)
    subject_content_type = models.ForeignKey(
        ContentType, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    subject_id = models.CharField(max_length=255)
    subject = GenericForeignKey("subject_content_type", "subject_id")

    # The creation facts, and the projection of the log.
    origin_state = models.CharField(max_length=STATE_MAX_LENGTH, editable=False)
    origin_version = models.PositiveIntegerField(default=0, editable=False)
    genesis_hash = models.CharField(max_length=HASH_MAX_LENGTH, default="", editable=False)
    #: HMAC seal of ``genesis_hash`` under ``ENCOUNTERS_SEAL_KEYS`` ("" when unsealed).
    genesis_seal = models.CharField(
        max_length=SEAL_MAX_LENGTH, default="", blank=True, editable=False
    )
    state = models.CharField(max_length=STATE_MAX_LENGTH)
    version = models.PositiveIntegerField(default=0, editable=False)
    timeline_end_at = models.DateTimeField(null=True, blank=True, editable=False)
    head_hash = models.CharField(max_length=HASH_MAX_LENGTH, blank=True, default="", editable=False)
    definition_version = models.PositiveIntegerField(default=0, editable=False)
    last_transitioned_at = models.DateTimeField(null=True, blank=True, editable=False)

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
        permissions = [("transition_encounter", "Can transition encounter")]
        indexes = [
            models.Index(fields=["subject_content_type", "subject_id"]),
            models.Index(fields=["state"]),
            models.Index(fields=["scheduled_at"]),
        ]

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.subject_id is not None:
            self.subject_id = str(self.subject_id)
        if self._state.adding:
            self._pin(self.state or None)
        else:
            kwargs["update_fields"] = self._update_fields(kwargs.get("update_fields"))
            if not kwargs["update_fields"]:
                return
        super().save(*args, **kwargs)
        self._loaded_facts = {name: self.__dict__[name] for name in _FACTS}

    def _moved_from(self) -> dict[str, Any] | None:
        """The stored definition and subject when this instance names others (a move), else
        None. Facts not loaded with the instance (``only()``/``defer()``) and not set since are
        not a move; facts set without having been loaded are compared with the database."""
        loaded = dict(getattr(self, "_loaded_facts", {}))
        data = self.__dict__
        if any(name in data and name not in loaded for name in _FACTS):
            stored = (
                Encounter.all_objects.using(self._state.db)
                .filter(pk=self.pk)
                .values(*_FACTS)
                .first()
            )
            loaded = {**(stored or {}), **loaded}
        moved = any(name in data and data[name] != loaded.get(name) for name in _FACTS)
        return loaded if moved else None

    def refresh_from_db(  # type: ignore[override]  # Django 4.2 has no from_queryset
        self, using: Any = None, fields: Any = None, **kwargs: Any
    ) -> None:
        super().refresh_from_db(using=using, fields=fields, **kwargs)
        loaded = getattr(self, "_loaded_facts", {})
        for name in _FACTS:  # what was just read from the database is the stored fact
            if name in self.__dict__ and (
                fields is None or name in fields or name.removesuffix("_id") in fields
            ):
                loaded[name] = self.__dict__[name]
        self._loaded_facts = loaded

    def _pin(self, state: str | None) -> None:
        """Set the creation facts of a new encounter (or one without rows moved to another
        definition or subject): pinned to its definition's latest version, in ``state`` (the
        initial state by default), created at the stored precision, its genesis hashed, and
        its projection the origin."""
        conf.require_use_tz()  # the genesis hash needs an aware created_at
        machine = self.definition.latest_version()
        state = machine.initial_state if state is None else state
        if not machine.is_valid_state(state):
            raise InvalidStateError(state, self.definition.code, list(machine.states or []))
        self._machine = machine
        self.created_at = stored_precision(self.created_at)
        self.origin_state = self.state = state
        self.origin_version = self.definition_version = machine.number
        self.genesis_hash = self.head_hash = genesis_hash(self.genesis(), machine.content_hash)
        self.genesis_seal = seal_of("genesis", self.genesis_hash)
        self.version = 0
        self.timeline_end_at = self.last_transitioned_at = None

    def _update_fields(self, update_fields: Any) -> list[str]:
        """What ``save()`` of an existing encounter may write: never the projection or the
        creation facts (a stale instance must not overwrite a state that moved on), never
        ``deleted_at`` unless named (a stale instance must not undelete). The definition or
        subject may change only while the log is empty, and the encounter is then pinned
        anew."""
        protected = set(self.LOG_DERIVED_FIELDS)
        moved_from = self._moved_from()
        if moved_from is not None:
            if EncounterTransition.objects.filter(encounter_id=self.pk).exists():
                raise EncounterError(
                    f"Encounter {self.pk} has transitions recorded under definition "
                    f"{moved_from.get('definition_id')} for subject "
                    f"{moved_from.get('subject_content_type_id')}:{moved_from.get('subject_id')};"
                    " its definition and subject cannot change (its log would be replayed "
                    "against the wrong rules and its genesis no longer hold)"
                )
            moved_definition = self.definition_id != moved_from.get("definition_id")
            self._pin(None if moved_definition else self.origin_state)
            protected = set()  # moved as a whole, while nothing depends on it
            if update_fields is not None:  # the move is written whole, whatever was named
                update_fields = [*update_fields, "state", *self.LOG_DERIVED_FIELDS]
        if update_fields is None:
            return [
                f.name
                for f in self._meta.concrete_fields
                if not f.primary_key and f.name not in protected and f.name != "deleted_at"
            ]
        return list(
            dict.fromkeys(
                name
                for name in update_fields
                if name not in protected and name.removesuffix("_id") not in protected
            )
        )

    @classmethod
    def from_db(cls, db: Any, field_names: Any, values: Any, **kwargs: Any) -> Any:
        instance = super().from_db(db, field_names, values, **kwargs)
        instance.remember_loaded_facts()
        return instance

    def remember_loaded_facts(self) -> None:
        """What ``from_db`` adds to the loaded instance: its definition and subject as loaded,
        so that ``save()`` can refuse moving an encounter with history to another definition or
        subject without a query (only what was loaded: see ``_moved_from``)."""
        data = self.__dict__
        self._loaded_facts = {name: data[name] for name in _FACTS if name in data}

    def compute_genesis_hash(self) -> str:
        """The genesis hash of this encounter's creation facts (and of the stored content hash
        of the version it was created under, looked up)."""
        version_hash = (
            EncounterDefinitionVersion.objects.using(self._state.db or "default")
            .filter(definition_id=self.definition_id, number=self.origin_version)
            .values_list("content_hash", flat=True)
            .first()
        )
        return genesis_hash(self.genesis(), version_hash)

    def genesis(self) -> Genesis:
        """The creation facts the genesis hash covers."""
        values = [getattr(self, name) for name in GENESIS_FACTS]
        return genesis_from(values, self._state.db or "default")

    @property
    def machine(self) -> EncounterDefinitionVersion:
        """The definition version this encounter is pinned to (its rules and validators)."""
        if LAZY_LOCK in self.__dict__:
            self.__dict__[LAZY_LOCK].materialize(self)
        cached = getattr(self, "_machine", None)
        if cached is None or (cached.definition_id, cached.number) != (
            self.definition_id,
            self.definition_version,
        ):
            cached = self._machine = EncounterDefinitionVersion.objects.get(
                definition_id=self.definition_id, number=self.definition_version
            )
        return cached

    def machine_rules(self) -> Rules:
        """``self.machine.rules()``: on the encounter the write path locked, the rules it read
        with the lock (no model instance built for them), else the pinned version's."""
        lazy = self.__dict__.get(LAZY_LOCK)
        if lazy is not None and lazy.current(self):
            return cast(Rules, lazy.rules)
        return self.machine.rules()

    def refresh_projection(self) -> None:
        """Reload the projection columns from the database."""
        self.refresh_from_db(fields=list(self.PROJECTION_FIELDS))

    def set_projection(
        self, values: dict[str, Any], *, using: str | None = None, connection: Any = None
    ) -> None:
        """Show projection values just written (by ``transition()``) on this instance. With
        ``using``, the values are held as uncommitted: should the transaction (or the savepoint)
        they were written in roll back, the instance shows what it showed before again.
        ``connection``: ``connections[using]``, when the caller holds it."""
        pending = self.__dict__.get(_PENDING)
        if pending is not None and pending.rolled_back():
            pending.restore(self)
            pending = None
        if using is None:
            self.__dict__.update(values)
            return
        if pending is not None and not pending.confirmed:
            before = pending.before  # an earlier uncommitted change: roll back to before it
        else:
            before = {name: self.__dict__.get(name, _UNLOADED) for name in values}
        self.__dict__.update(values)
        if connection is None:
            connection = connections[using]
        pending = _PendingProjection(connection, before)
        self.__dict__[_PENDING] = pending
        connection.on_commit(pending.confirm)  # transaction.on_commit(…, using=using)

    def __getstate__(self) -> dict[str, Any]:
        materialize_lock(self)  # a copy or a pickle holds what the lock read, built
        state = super().__getstate__()
        state.pop(_PENDING, None)  # holds a database connection
        state.pop(LAZY_LOCK, None)
        return state

    def timeline_snapshot(self) -> EncounterTimeline:
        """The timeline aggregate restored from this row's projection, which doubles as its
        snapshot (no query): enough to decide a transition at or after the timeline's end."""
        data = self.__dict__
        if _PENDING not in data:
            # Nothing shown on it that a rollback could take back: what the attributes' own
            # descriptors return is what its ``__dict__`` holds, when it holds every column
            # (the write path's locked instance does; issue 23: no descriptor call per column).
            try:
                return EncounterTimeline.from_snapshot(
                    self.pk,
                    created_at=data["created_at"],
                    version=data["version"],
                    origin_state=data["origin_state"],
                    **{attribute: data[column] for column, attribute in _SNAPSHOT_COLUMNS},
                )
            except KeyError:  # a deferred column: loaded by its descriptor
                pass
        return EncounterTimeline.from_snapshot(
            self.pk,
            created_at=self.created_at,
            version=self.version,
            origin_state=self.origin_state,
            **{attribute: getattr(self, column) for column, attribute in _SNAPSHOT_COLUMNS},
        )

    @property
    def is_final(self) -> bool:
        """Check if encounter is in a final state (of its pinned definition version)."""
        return self.machine.is_final_state(self.state)

    @property
    def allowed_transitions(self) -> list:
        """Get list of states that can be transitioned to."""
        return self.machine.get_allowed_transitions(self.state)

    def __str__(self) -> str:
        return f"{self.definition.name} - {self.state}"


Encounter.definition = DefinitionAttribute(  # type: ignore[assignment]
    cast(models.ForeignKey, Encounter._meta.get_field("definition"))
)

for _name in (*Encounter.PROJECTION_FIELDS, "ended_at", "updated_at"):
    setattr(
        Encounter, _name, ProjectedAttribute(cast(models.Field, Encounter._meta.get_field(_name)))
    )


class EncounterTransition(AppendOnlyModel):
    """One state change of one encounter: an append-only fact.

    ``sequence`` numbers an encounter's rows 1, 2, 3… in recording order (unique per
    encounter: the optimistic-concurrency guard); ``hash`` chains each row to the previous one
    of its stream (tamper evidence).
    """

    # No index of its own: the unique (encounter, sequence) and the timeline index lead with it.
    # A third one cost every INSERT its upkeep and every statement joining the table planning
    # time (on PostgreSQL about 100 of the lock statement's 570 µs per transition).
    encounter = models.ForeignKey(
        Encounter, on_delete=models.PROTECT, related_name="transitions", db_index=False
    )
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
    #: The user's name (``USERNAME_FIELD``) when the row was recorded: what the chain covers.
    transitioned_by_name = models.CharField(
        max_length=NAME_MAX_LENGTH, default="", blank=True, editable=False
    )
    # System time. default (not auto_now_add) so the recorded value is the one hashed.
    transitioned_at = models.DateTimeField(default=timezone.now, editable=False)
    effective_at = models.DateTimeField(
        default=timezone.now, help_text="When transition actually occurred (for backdating)"
    )

    # Context
    reason = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)

    # The definition version it was decided under (the encounter's pin at the time).
    definition_version = models.PositiveIntegerField(default=0, editable=False)
    hash = models.CharField(max_length=HASH_MAX_LENGTH, editable=False, default="")
    #: HMAC seal of ``hash`` under ``ENCOUNTERS_SEAL_KEYS`` ("" when unsealed).
    seal = models.CharField(max_length=SEAL_MAX_LENGTH, default="", blank=True, editable=False)

    class Meta:
        app_label = "django_encounters"
        verbose_name = "encounter transition"
        verbose_name_plural = "encounter transitions"
        ordering = ["-transitioned_at"]
        # loaddata of a stored row: look before writing (an INSERT when it is not there)
        # instead of an UPDATE first, which sets every column — the distribution column too,
        # which Citus refuses even when no row matches.
        select_on_save = True
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
        self.refuse_change()
        conf.require_use_tz()
        # The low-level append (transition() does not come through here): the row is numbered,
        # chained and inserted by the store, and the projection follows the log. No
        # state-machine checks: that is transition()'s job; the audit reports what this lets
        # through.
        using = kwargs.get("using") or router.db_for_write(EncounterTransition, instance=self)
        store_operations().append(self, using)

    #: Whether the caller chose the system time (an import; a row loaded from the database);
    #: otherwise the low-level append stamps it under the row lock, as transition() does.
    _system_time_given = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not args and "transitioned_at" not in kwargs:
            self._system_time_given = False

    def compute_hash(self, previous_hash: str) -> str:
        """This row's hash given the previous row's hash (and the stored content hash of the
        definition version it names, looked up)."""
        version_hash = (
            EncounterDefinitionVersion.objects.using(self._state.db or "default")
            .filter(definition__encounters=self.encounter_id, number=self.definition_version)
            .values_list("content_hash", flat=True)
            .first()
        )
        return row_hash(self.encounter_id, row_of_record(self), previous_hash, version_hash)

    def __str__(self) -> str:
        return f"{self.from_state} → {self.to_state}"


class AnomalyAcknowledgement(AppendOnlyModel):
    """A reviewer's record that an anomaly of an encounter's stream was examined: who, when,
    why. Append-only. An acknowledged anomaly is still reported, marked, but no longer fails the
    audit's or the rebuild check's exit status, so monitoring signals only what is new.

    ``encounter_id`` is the bare id (not a foreign key): an anomaly may be that the encounter
    itself is gone (``missing`` against a checkpoint)."""

    encounter_id = models.UUIDField(db_index=True)
    sequence = models.PositiveIntegerField()
    kind = models.CharField(max_length=20)
    reason = models.TextField()
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="anomalies_acknowledged",
    )
    acknowledged_at = models.DateTimeField(default=timezone.now, editable=False)
    #: The reviewer's name (``USERNAME_FIELD``) when it was recorded.
    acknowledged_by_name = models.CharField(
        max_length=NAME_MAX_LENGTH, default="", blank=True, editable=False
    )
    #: What was examined: the stored hash the anomaly was found on, or the root of the
    #: checkpoint it was found against. A finding with other evidence is not covered.
    evidence = models.CharField(max_length=255, default="", blank=True, editable=False)
    #: The acknowledgement's own hash, chained to the previous acknowledgement's.
    hash = models.CharField(max_length=HASH_MAX_LENGTH, default="", blank=True, editable=False)
    #: HMAC seal of ``hash`` under ``ENCOUNTERS_SEAL_KEYS`` ("" when unsealed).
    seal = models.CharField(max_length=SEAL_MAX_LENGTH, default="", blank=True, editable=False)

    class Meta:
        app_label = "django_encounters"
        verbose_name = "anomaly acknowledgement"
        verbose_name_plural = "anomaly acknowledgements"
        ordering = ["acknowledged_at"]
        # loaddata of a stored row: look before writing (an INSERT when it is not there)
        # instead of an UPDATE first, which sets every column — the distribution column too,
        # which Citus refuses even when no row matches.
        select_on_save = True

    def __str__(self) -> str:
        return f"{self.kind} at sequence {self.sequence} of encounter {self.encounter_id}"
