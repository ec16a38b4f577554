"""The bad-input catalogue.

One table-driven test: every hostile input must raise a *typed* error whose message says what is
wrong, and must leave the database exactly as it was — no transition row written, no projection
column (state, version, timeline end, head hash, ended_at, updated_at) changed, no encounter or
definition created. The checks compare a fingerprint of every row the store owns, read fresh from
the database, before and after the call.

Decisions recorded here:

* a huge ``reason`` is fine (``TextField``): accepted and stored intact (``test_huge_reason_…``);
* state names longer than 50 characters are refused when the *definition* is saved (Django
  ``ValidationError``); a ``to_state`` that long is just "not a state of the definition";
* a validator that raises anything but an ``EncounterError`` surfaces as
  ``django_encounters.exceptions.ValidationError`` naming the validator, the original exception
  chained as ``__cause__``;
* a validator class whose constructor raises surfaces as ``ValidatorConfigurationError``;
* text PostgreSQL cannot store (NUL characters, lone surrogates) and JSON that is not strict
  JSON (NaN, Infinity) or that the row hash cannot serialise (mixed key types) are refused up
  front on both databases with the same typed error, instead of a raw database error on
  PostgreSQL and silent acceptance on SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.utils import timezone

from django_encounters.exceptions import (
    ConcurrentTransitionError,
    EncounterNotFoundError,
    InvalidStateError,
    InvalidTransitionError,
    ValidationError,
    ValidatorConfigurationError,
)
from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.services import (
    create_encounter,
    get_state_at,
    time_in_states,
    transition,
)
from django_encounters.validators import StateValidator
from tests.conftest import visit_definition_kwargs
from tests.encounter_validators import CALLS
from tests.helpers import write_machine_raw
from tests.testapp.models import Patient

pytestmark = pytest.mark.django_db


# --- validators used by the catalogue (importable as tests.test_bad_input.X) -----------------


class KeyErrorValidator(StateValidator):
    """A buggy validator: a dict lookup that fails."""

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        return {}["missing"]


class ConstructorBombValidator(StateValidator):
    """A validator whose constructor fails with something other than TypeError/ValueError."""

    def __init__(self) -> None:
        raise RuntimeError("cannot connect to the rules service")

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        return None  # pragma: no cover


class Unserialisable:
    def __repr__(self) -> str:
        return "<Unserialisable>"


NOT_A_VALIDATOR_MODULE = "tests.encounter_validators"


# --- the environment each case runs in ----------------------------------------------------


@dataclass
class Env:
    enc: Encounter  # visit, one row: scheduled -> checked_in
    emp: Encounter  # employment, rows: working (10h ago), onleave (5h ago)
    done: Encounter  # visit in a final state (completed)
    user: Any
    patient: Any
    definition: EncounterDefinition
    settings: Any

    def with_validators(self, entries: list) -> Encounter:
        """Give the visit definition these validator entries, bypassing ``clean()`` (as a
        migration, a fixture load or a raw UPDATE could). Issue 8: validators are read from
        the encounter's pinned definition version, so the raw write covers that row too."""
        write_machine_raw(self.definition, validators=entries)
        return self.enc


def ago(hours: float) -> datetime:
    return timezone.now() - timedelta(hours=hours)


NAIVE = datetime(2024, 1, 1, 12, 0)

Act = Callable[[], Any]


@dataclass(frozen=True)
class Case:
    id: str
    arrange: Callable[[Env], Act]  # sets up (before the fingerprint), returns the call to make
    error: type[BaseException] | tuple[type[BaseException], ...]
    fragment: str  # must appear in str(error)


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[Env], Act]:
    """A case whose arguments are computed from the environment: args may be callables of Env."""

    def arrange(env: Env) -> Act:
        real = [a(env) if callable(a) and getattr(a, "_env", False) else a for a in args]
        kw = {
            k: (v(env) if callable(v) and getattr(v, "_env", False) else v)
            for k, v in kwargs.items()
        }
        return lambda: fn(*real, **kw)

    return arrange


def env(fn: Callable[[Env], Any]) -> Callable[[Env], Any]:
    fn._env = True  # type: ignore[attr-defined]
    return fn


ENC = env(lambda e: e.enc)
EMP = env(lambda e: e.emp)
DONE = env(lambda e: e.done)


def _soft_deleted(e: Env) -> Act:
    e.enc.delete()
    return lambda: transition(e.enc, "in_progress")


def _missing(e: Env) -> Act:
    ghost = Encounter(definition=e.definition, subject=e.patient, state="scheduled")
    ghost.pk = uuid.uuid4()
    return lambda: transition(ghost, "checked_in")


def _validators(
    entries: list, to_state: str = "in_progress", **kwargs: Any
) -> Callable[[Env], Act]:
    def arrange(e: Env) -> Act:
        enc = e.with_validators(entries)
        return lambda: transition(enc, to_state, **kwargs)

    return arrange


def _allow_list(prefixes: list[str], entry: str) -> Callable[[Env], Act]:
    def arrange(e: Env) -> Act:
        e.settings.ENCOUNTERS_VALIDATOR_MODULES = prefixes
        enc = e.with_validators([entry])
        return lambda: transition(enc, "in_progress")

    return arrange


def _ghost_target(e: Env) -> Act:
    """A definition whose transitions name a state missing from ``states`` (saved around
    ``clean()``): the engine must still refuse it."""
    # Issue 8: decisions use the pinned definition version, so it is written too.
    write_machine_raw(
        e.definition,
        transitions={"scheduled": ["checked_in"], "checked_in": ["in_progress", "ghost"]},
    )
    return lambda: transition(e.enc, "ghost")


def _unsaved_user(e: Env) -> Act:
    return lambda: transition(e.enc, "in_progress", transitioned_by=User(username="nobody"))


def _definition(**overrides: Any) -> Callable[[Env], Act]:
    def arrange(e: Env) -> Act:
        kwargs = visit_definition_kwargs(name="Hostile", code="HOSTILE")
        kwargs.update(overrides)
        return lambda: EncounterDefinition.objects.create(**kwargs)

    return arrange


def _soft_deleted_definition(e: Env) -> Act:
    e.definition.delete()
    return lambda: create_encounter(e.definition, e.patient)


LONG = "s" * 51

CASES: list[Case] = [
    # -- time -------------------------------------------------------------------------------
    Case(
        "naive effective_at",
        _call(transition, ENC, "in_progress", effective_at=NAIVE),
        ValueError,
        "effective_at must be timezone-aware",
    ),
    Case(
        "future effective_at",
        _call(
            transition,
            ENC,
            "in_progress",
            effective_at=env(lambda e: timezone.now() + timedelta(hours=1)),
        ),
        InvalidTransitionError,
        "lies in the future beyond the allowed tolerance",
    ),
    Case(
        "far-future effective_at",
        _call(
            transition,
            ENC,
            "in_progress",
            effective_at=datetime(9999, 1, 1, tzinfo=dt_timezone.utc),
        ),
        InvalidTransitionError,
        "in the future",
    ),
    Case(
        "effective_at is a string",
        _call(transition, ENC, "in_progress", effective_at="2024-01-01T00:00:00Z"),
        TypeError,
        "effective_at must be a datetime",
    ),
    Case(
        "effective_at is a date-like number",
        _call(transition, ENC, "in_progress", effective_at=1700000000),
        TypeError,
        "effective_at must be a datetime",
    ),
    Case(
        "backdate that breaks the next row",
        _call(transition, EMP, "finished", effective_at=env(lambda e: ago(7))),
        InvalidTransitionError,
        "would be followed by 'onleave' (sequence 2",
    ),
    Case(
        "naive get_state_at timestamp",
        _call(get_state_at, ENC, NAIVE),
        ValueError,
        "timestamp must be timezone-aware",
    ),
    Case(
        "naive get_state_at known_at",
        _call(get_state_at, ENC, env(lambda e: timezone.now()), known_at=NAIVE),
        ValueError,
        "known_at must be timezone-aware",
    ),
    Case(
        "get_state_at with a string",
        _call(get_state_at, ENC, "yesterday"),
        TypeError,
        "timestamp must be a datetime",
    ),
    Case(
        "naive as_of",
        _call(lambda t: list(Encounter.objects.as_of(t)), NAIVE),
        ValueError,
        "timestamp must be timezone-aware",
    ),
    Case(
        "naive as_of known_at",
        _call(
            lambda t, k: list(Encounter.objects.as_of(t, known_at=k)),
            env(lambda e: timezone.now()),
            NAIVE,
        ),
        ValueError,
        "known_at must be timezone-aware",
    ),
    Case(
        "naive time_in_states until",
        _call(time_in_states, ENC, until=NAIVE),
        ValueError,
        "until must be timezone-aware",
    ),
    # -- states -----------------------------------------------------------------------------
    Case(
        "unknown state",
        _call(transition, ENC, "nonexistent"),
        InvalidTransitionError,
        "'nonexistent' is not a state of definition 'VISIT'",
    ),
    Case(
        "empty state name",
        _call(transition, ENC, ""),
        InvalidTransitionError,
        "'' is not a state of definition",
    ),
    Case(
        "state name longer than the column",
        _call(transition, ENC, LONG),
        InvalidTransitionError,
        "is not a state of definition",
    ),
    Case(
        "edge not allowed",
        _call(transition, ENC, "completed"),
        InvalidTransitionError,
        "Allowed transitions: ['in_progress', 'cancelled']",
    ),
    Case(
        "transition into a state not in states",
        _ghost_target,
        InvalidTransitionError,
        "'ghost' is not a state of definition 'VISIT'",
    ),
    Case(
        "out of a final state",
        _call(transition, DONE, "cancelled"),
        InvalidTransitionError,
        "Cannot transition from 'completed' to 'cancelled'",
    ),
    Case(
        "stale expected_version",
        _call(transition, ENC, "in_progress", expected_version=0),
        ConcurrentTransitionError,
        "expected version 0, found 1",
    ),
    Case(
        "stale expected_version wins over a bad edge",
        _call(transition, ENC, "completed", expected_version=7),
        ConcurrentTransitionError,
        "expected version 7, found 1",
    ),
    Case(
        "negative expected_version",
        _call(transition, ENC, "in_progress", expected_version=-1),
        ConcurrentTransitionError,
        "expected version -1",
    ),
    # -- argument types ---------------------------------------------------------------------
    Case(
        "encounter is None",
        _call(transition, None, "checked_in"),
        TypeError,
        "encounter must be an Encounter, not NoneType",
    ),
    Case(
        "encounter is its pk",
        _call(transition, env(lambda e: str(e.enc.pk)), "in_progress"),
        TypeError,
        "encounter must be an Encounter, not str",
    ),
    Case(
        "encounter is a definition",
        _call(transition, env(lambda e: e.definition), "in_progress"),
        TypeError,
        "encounter must be an Encounter, not EncounterDefinition",
    ),
    Case("to_state is None", _call(transition, ENC, None), TypeError, "to_state must be a str"),
    Case(
        "to_state is a list",
        _call(transition, ENC, ["in_progress"]),
        TypeError,
        "to_state must be a str",
    ),
    Case(
        "user is a username",
        _call(transition, ENC, "in_progress", transitioned_by="admin"),
        TypeError,
        "transitioned_by must be a User instance or None, not str",
    ),
    Case(
        "user is another model",
        _call(transition, ENC, "in_progress", transitioned_by=env(lambda e: e.patient)),
        TypeError,
        "not Patient",
    ),
    Case(
        "user is its pk",
        _call(transition, ENC, "in_progress", transitioned_by=env(lambda e: e.user.pk)),
        TypeError,
        "transitioned_by must be a User instance",
    ),
    Case("unsaved user", _unsaved_user, ValueError, "is not saved (it has no primary key)"),
    Case(
        "reason is None",
        _call(transition, ENC, "in_progress", reason=None),
        TypeError,
        "reason must be a str, not NoneType",
    ),
    Case(
        "reason is bytes",
        _call(transition, ENC, "in_progress", reason=b"why"),
        TypeError,
        "reason must be a str, not bytes",
    ),
    Case(
        "context is a list",
        _call(transition, ENC, "in_progress", context=["a"]),
        TypeError,
        "context must be a dict, not list",
    ),
    Case(
        "context holds an object",
        _call(transition, ENC, "in_progress", context={"who": Unserialisable()}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context holds a set",
        _call(transition, ENC, "in_progress", context={"s": {1, 2}}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context holds a datetime",
        _call(transition, ENC, "in_progress", context={"at": env(lambda e: timezone.now())}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context holds a Decimal",
        _call(transition, ENC, "in_progress", context={"fee": Decimal("1.10")}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context holds NaN (not JSON)",
        _call(transition, ENC, "in_progress", context={"x": float("nan")}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context with mixed key types",
        _call(transition, ENC, "in_progress", context={1: "a", "b": 2}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context holds Infinity",
        _call(transition, ENC, "in_progress", context={"x": float("inf")}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context with a lone surrogate key",
        _call(transition, ENC, "in_progress", context={"\ud800": 1}),
        TypeError,
        "context is not JSON-serialisable",
    ),
    Case(
        "context holds a NUL character",
        _call(transition, ENC, "in_progress", context={"note": ["a\x00b"]}),
        ValueError,
        "context contains a NUL character",
    ),
    Case(
        "reason holds a NUL character",
        _call(transition, ENC, "in_progress", reason="a\x00b"),
        ValueError,
        "reason contains a NUL character",
    ),
    Case(
        "reason holds a lone surrogate",
        _call(transition, ENC, "in_progress", reason="\udc80"),
        ValueError,
        "reason is not valid Unicode text",
    ),
    Case(
        "expected_version is a string",
        _call(transition, ENC, "in_progress", expected_version="1"),
        TypeError,
        "expected_version must be an int",
    ),
    Case(
        "expected_version is a bool",
        _call(transition, ENC, "in_progress", expected_version=True),
        TypeError,
        "expected_version must be an int",
    ),
    Case(
        "expected_version is a float",
        _call(transition, ENC, "in_progress", expected_version=1.0),
        TypeError,
        "expected_version must be an int",
    ),
    # -- encounters that are not there ------------------------------------------------------
    Case("soft-deleted encounter", _soft_deleted, EncounterNotFoundError, "not found"),
    Case("missing encounter", _missing, EncounterNotFoundError, "not found"),
    # -- validator entries (stored around clean()) ------------------------------------------
    Case(
        "validator entry is a number",
        _validators([42]),
        ValidatorConfigurationError,
        "an entry must be a dotted path or a dict",
    ),
    Case(
        "validator entry is a list",
        _validators([["a.B"]]),
        ValidatorConfigurationError,
        "an entry must be a dotted path or a dict",
    ),
    Case(
        "validator dict without path",
        _validators([{"params": {}}]),
        ValidatorConfigurationError,
        "a dict entry needs a 'path'",
    ),
    Case(
        "validator params not a dict",
        _validators([{"path": "django_encounters.validators.FinalStateValidator", "params": [1]}]),
        ValidatorConfigurationError,
        "'params' must be a dict",
    ),
    Case(
        "validator dict with unknown keys",
        _validators([{"path": "django_encounters.validators.FinalStateValidator", "run": "x"}]),
        ValidatorConfigurationError,
        "unknown keys ['run']",
    ),
    Case(
        "validator path without a dot",
        _validators(["FinalStateValidator"]),
        ValidatorConfigurationError,
        "expected a dotted path",
    ),
    Case(
        "validator path is empty",
        _validators([""]),
        ValidatorConfigurationError,
        "the path must be a non-empty string",
    ),
    Case(
        "os.system as a validator",
        _validators(["os.system"]),
        ValidatorConfigurationError,
        "is not a subclass of django_encounters.validators.StateValidator",
    ),
    Case(
        "subprocess.Popen as a validator",
        _validators(["subprocess.Popen"]),
        ValidatorConfigurationError,
        "is not a subclass of",
    ),
    Case(
        "builtins.eval as a validator",
        _validators(["builtins.eval"]),
        ValidatorConfigurationError,
        "is not a subclass of",
    ),
    Case(
        "a function as a validator",
        _validators([f"{NOT_A_VALIDATOR_MODULE}.not_a_validator_function"]),
        ValidatorConfigurationError,
        "is not a subclass of",
    ),
    Case(
        "a duck-typed class as a validator",
        _validators([f"{NOT_A_VALIDATOR_MODULE}.NotAValidator"]),
        ValidatorConfigurationError,
        "is not a subclass of",
    ),
    Case(
        "the abstract base as a validator",
        _validators(["django_encounters.validators.StateValidator"]),
        ValidatorConfigurationError,
        "is abstract",
    ),
    Case(
        "unimportable validator module",
        _validators(["no_such_package.rules.Validator"]),
        ValidatorConfigurationError,
        "module 'no_such_package.rules' cannot be imported",
    ),
    Case(
        "validator class missing from its module",
        _validators(["django_encounters.validators.NoSuchValidator"]),
        ValidatorConfigurationError,
        "has no attribute 'NoSuchValidator'",
    ),
    Case(
        "validator params the constructor refuses",
        _validators(
            [
                {
                    "path": "django_encounters.validators.RequiredFieldsValidator",
                    "params": {"state_requirements": ["ended_at"]},
                }
            ]
        ),
        ValidatorConfigurationError,
        "cannot be instantiated with params",
    ),
    Case(
        "validator params with an unknown keyword",
        _validators(
            [
                {
                    "path": "django_encounters.validators.FinalStateValidator",
                    "params": {"strict": True},
                }
            ]
        ),
        ValidatorConfigurationError,
        "cannot be instantiated with params",
    ),
    Case(
        "validator constructor raises RuntimeError",
        _validators(["tests.test_bad_input.ConstructorBombValidator"]),
        ValidatorConfigurationError,
        "cannot connect to the rules service",
    ),
    Case(
        "ENCOUNTERS_VALIDATOR_MODULES refuses a look-alike module",
        _allow_list(
            ["tests.encounter_validators"], "tests.encounter_validatorsx.LookalikeValidator"
        ),
        ValidatorConfigurationError,
        "module 'tests.encounter_validatorsx' is not in ENCOUNTERS_VALIDATOR_MODULES",
    ),
    Case(
        "ENCOUNTERS_VALIDATOR_MODULES refuses os.system before importing",
        _allow_list(["tests.encounter_validators"], "os.system"),
        ValidatorConfigurationError,
        "module 'os' is not in ENCOUNTERS_VALIDATOR_MODULES",
    ),
    Case(
        "validator raises KeyError",
        _validators(["tests.test_bad_input.KeyErrorValidator"]),
        ValidationError,
        "Validation failed (KeyErrorValidator): validator raised KeyError",
    ),
    Case(
        "validator raises ZeroDivisionError",
        _validators([f"{NOT_A_VALIDATOR_MODULE}.ExplodingValidator"]),
        ValidationError,
        "validator raised ZeroDivisionError: validator bug",
    ),
    Case(
        "validator refuses",
        _validators(
            [
                {
                    "path": f"{NOT_A_VALIDATOR_MODULE}.RefuseStateValidator",
                    "params": {"state": "in_progress"},
                }
            ]
        ),
        ValidationError,
        "'in_progress' needs approval",
    ),
    Case(
        "required field missing",
        _validators(
            [
                {
                    "path": "django_encounters.validators.RequiredFieldsValidator",
                    "params": {"state_requirements": {"in_progress": ["started_at"]}},
                }
            ]
        ),
        ValidationError,
        "Field 'started_at' is required for state 'in_progress'",
    ),
    # -- creating encounters and definitions ------------------------------------------------
    Case(
        "create_encounter with a definition code",
        _call(create_encounter, "VISIT", env(lambda e: e.patient)),
        TypeError,
        "definition must be an EncounterDefinition, not str",
    ),
    Case(
        "create_encounter with an unsaved subject",
        _call(create_encounter, env(lambda e: e.definition), Patient(name="unsaved")),
        ValueError,
        "is not saved",
    ),
    Case(
        "create_encounter with a subject that is not a model",
        _call(create_encounter, env(lambda e: e.definition), {"id": 1}),
        TypeError,
        "subject must be a saved model instance, not dict",
    ),
    Case(
        "create_encounter with a soft-deleted definition",
        _soft_deleted_definition,
        ValueError,
        "is soft-deleted",
    ),
    Case(
        "create_encounter with naive scheduled_at",
        _call(
            create_encounter,
            env(lambda e: e.definition),
            env(lambda e: e.patient),
            scheduled_at=NAIVE,
        ),
        ValueError,
        "scheduled_at must be timezone-aware",
    ),
    Case(
        "create_encounter with unserialisable metadata",
        _call(
            create_encounter,
            env(lambda e: e.definition),
            env(lambda e: e.patient),
            metadata={"o": Unserialisable()},
        ),
        TypeError,
        "metadata is not JSON-serialisable",
    ),
    Case(
        "encounter created in a state not in states",
        _call(
            lambda d, p: Encounter.objects.create(definition=d, subject=p, state="ghost"),
            env(lambda e: e.definition),
            env(lambda e: e.patient),
        ),
        InvalidStateError,
        "'ghost' is not a state of definition 'VISIT'",
    ),
    Case(
        "definition with a state name longer than 50 characters",
        _definition(states=["scheduled", LONG], transitions={"scheduled": [LONG]}),
        DjangoValidationError,
        "state names longer than 50 characters",
    ),
    Case(
        "definition whose initial state is not a state",
        _definition(initial_state="nowhere"),
        DjangoValidationError,
        "initial state 'nowhere' is not in states",
    ),
    Case(
        "definition with a transition to an unknown state",
        _definition(transitions={"scheduled": ["ghost"]}),
        DjangoValidationError,
        "targets of 'scheduled' not in states: ['ghost']",
    ),
    Case(
        "definition naming os.system as a validator",
        _definition(validators=["os.system"]),
        DjangoValidationError,
        "is not a subclass of",
    ),
    Case(
        "definition with states as a string",
        _definition(states="scheduled,done"),
        DjangoValidationError,
        "states must be a non-empty list",
    ),
]


def fingerprint() -> tuple:
    """Every row the store owns, as the database has it."""
    encounters = tuple(
        Encounter.all_objects.order_by("pk").values_list(
            "pk",
            "state",
            "version",
            "origin_state",
            "timeline_end_at",
            "head_hash",
            "ended_at",
            "updated_at",
            "deleted_at",
        )
    )
    transitions = tuple(
        EncounterTransition.objects.order_by("encounter_id", "sequence").values_list(
            "encounter_id", "sequence", "to_state", "hash"
        )
    )
    definitions = tuple(EncounterDefinition.all_objects.order_by("pk").values_list("pk", "code"))
    return encounters, transitions, definitions


@pytest.fixture
def catalogue_env(visit_definition, employment_definition, patient, user, settings) -> Env:
    enc = create_encounter(visit_definition, patient)
    transition(enc, "checked_in")
    emp = create_encounter(employment_definition, patient)
    transition(emp, "working", effective_at=ago(10))
    transition(emp, "onleave", effective_at=ago(5))
    done = create_encounter(visit_definition, patient)
    for state in ("checked_in", "in_progress", "completed"):
        transition(done, state)
    settings.ENCOUNTERS_VALIDATOR_MODULES = None
    return Env(enc, emp, done, user, patient, visit_definition, settings)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_a_typed_error_and_changes_nothing(case: Case, catalogue_env):
    act = case.arrange(catalogue_env)
    calls_before = len(CALLS)
    before = fingerprint()

    with pytest.raises(case.error) as info:
        act()

    assert type(info.value) is not Exception
    assert case.fragment in str(info.value), f"{type(info.value).__name__}: {info.value}"
    assert fingerprint() == before
    # Nothing a hostile entry names was called (a function or duck-typed class would record).
    assert len(CALLS) == calls_before
    # The caller's instance was not moved either.
    enc = catalogue_env.enc
    assert (enc.state, enc.version) == ("checked_in", 1)


def test_a_validator_bug_keeps_its_cause(catalogue_env):
    enc = catalogue_env.with_validators(["tests.test_bad_input.KeyErrorValidator"])
    with pytest.raises(ValidationError) as info:
        transition(enc, "in_progress")
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.validator == "KeyErrorValidator"


def test_huge_reason_is_accepted_and_stored_intact(catalogue_env, settings):
    """``reason`` is a TextField: a megabyte of it is stored intact where the limit allows it
    (``ENCOUNTERS_MAX_REASON_LENGTH``, 10,000 characters by default: issue 22)."""
    settings.ENCOUNTERS_MAX_REASON_LENGTH = 1_000_000
    reason = "why? " * 200_000
    record = transition(catalogue_env.enc, "in_progress", reason=reason)
    stored = EncounterTransition.objects.get(pk=record.pk)
    assert stored.reason == reason
    assert Encounter.objects.get(pk=catalogue_env.enc.pk).version == 2


def test_the_store_still_works_after_every_refusal(catalogue_env):
    """After a refusal the same encounter takes a valid transition normally."""
    for case in CASES[:20]:
        act = case.arrange(catalogue_env)
        with pytest.raises(case.error):
            act()
    record = transition(catalogue_env.enc, "in_progress", expected_version=1)
    assert record.sequence == 2
    assert Encounter.objects.get(pk=catalogue_env.enc.pk).state == "in_progress"
