"""Shared fixtures: users, subjects (integer- and UUID-keyed), definitions, encounters."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from tests.helpers import IS_CITUS, IS_POSTGRES, SCREENSHOTS

# The definition of the original specification's usage example.
VISIT_STATES = ["scheduled", "checked_in", "in_progress", "completed", "cancelled"]
VISIT_TRANSITIONS = {
    "scheduled": ["checked_in", "cancelled"],
    "checked_in": ["in_progress", "cancelled"],
    "in_progress": ["completed", "cancelled"],
}
VISIT_FINAL_STATES = ["completed", "cancelled"]
VISIT_VALIDATORS = [
    "django_encounters.validators.FinalStateValidator",
    {
        "path": "django_encounters.validators.RequiredFieldsValidator",
        "params": {
            "state_requirements": {
                "completed": ["ended_at"],
                "in_progress": ["started_at"],
            }
        },
    },
]

# A definition with a cycle (working <-> onleave), used for backdating: inserting a row into
# the middle of a timeline is only interesting when the states can come back.
EMPLOYMENT_STATES = ["hired", "working", "onleave", "finished"]
EMPLOYMENT_TRANSITIONS = {
    "hired": ["working"],
    "working": ["onleave", "finished"],
    "onleave": ["working", "finished"],
}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``postgres_only`` are skipped on SQLite (it ignores row locks)."""
    if IS_POSTGRES:
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL (ENCOUNTERS_TEST_DB=postgres)")
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say where the browser tests saved the screenshots of the pages they visited."""
    directory = terminalreporter.config.stash.get(SCREENSHOTS, None)
    if directory is not None:
        terminalreporter.write_line(f"admin screenshots: {directory}")


@pytest.fixture(scope="session")
def django_db_keepdb(request: Any) -> bool:
    """On Citus the test database is made beforehand on every node, the extension created and
    the workers added (scripts/citus_cluster.sh): it is kept, never dropped and re-created."""
    return IS_CITUS or bool(request.config.getvalue("reuse_db"))


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: Any, django_db_blocker: Any) -> Any:
    """On Citus: once migrated, the tables are distributed the supported way."""
    if IS_CITUS:
        from django.core.management import call_command

        with django_db_blocker.unblock():
            call_command("distribute_encounters", verbosity=0)
    return django_db_setup


def visit_definition_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "name": "Patient Visit",
        "code": "VISIT",
        "description": "An outpatient visit",
        "states": list(VISIT_STATES),
        "initial_state": "scheduled",
        "final_states": list(VISIT_FINAL_STATES),
        "transitions": {k: list(v) for k, v in VISIT_TRANSITIONS.items()},
    }
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def is_postgres() -> bool:
    return connection.vendor == "postgresql"


@pytest.fixture
def user(db: Any) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user(username="reception", password=None)


@pytest.fixture
def other_user(db: Any) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user(username="doctor", password=None)


@pytest.fixture
def patient(db: Any) -> Any:
    from tests.testapp.models import Patient

    return Patient.objects.create(name="Ada Lovelace")


@pytest.fixture
def device(db: Any) -> Any:
    from tests.testapp.models import Device

    return Device.objects.create(serial="SN-0001")


@pytest.fixture
def make_definition(db: Any) -> Any:
    """Factory: a saved visit-like definition with a unique name/code; overrides apply."""
    from django_encounters.models import EncounterDefinition

    counter = itertools.count(1)

    def make(**overrides: Any) -> Any:
        n = next(counter)
        kwargs = visit_definition_kwargs(name=f"Definition {n}", code=f"DEF{n}")
        kwargs.update(overrides)
        return EncounterDefinition.objects.create(**kwargs)

    return make


@pytest.fixture
def visit_definition(db: Any) -> Any:
    """The specification's visit definition, without validators."""
    from django_encounters.models import EncounterDefinition

    return EncounterDefinition.objects.create(**visit_definition_kwargs())


@pytest.fixture
def visit_definition_with_validators(db: Any) -> Any:
    """The specification's visit definition with its two validators."""
    from django_encounters.models import EncounterDefinition

    return EncounterDefinition.objects.create(
        **visit_definition_kwargs(
            name="Validated Visit", code="VVISIT", validators=list(VISIT_VALIDATORS)
        )
    )


@pytest.fixture
def employment_definition(db: Any) -> Any:
    from django_encounters.models import EncounterDefinition

    return EncounterDefinition.objects.create(
        name="Employment",
        code="EMPLOYMENT",
        states=list(EMPLOYMENT_STATES),
        initial_state="hired",
        final_states=["finished"],
        transitions={k: list(v) for k, v in EMPLOYMENT_TRANSITIONS.items()},
    )


@pytest.fixture
def counter_definition(db: Any) -> Any:
    """A definition with a self-loop, so any number of writers can append rows."""
    from django_encounters.models import EncounterDefinition

    return EncounterDefinition.objects.create(
        name="Counter",
        code="COUNTER",
        states=["open", "closed"],
        initial_state="open",
        final_states=["closed"],
        transitions={"open": ["open", "closed"]},
    )


@pytest.fixture
def encounter(visit_definition: Any, patient: Any) -> Any:
    """A fresh visit for the patient, in its initial state."""
    from django_encounters.services import create_encounter

    return create_encounter(visit_definition, patient)


@pytest.fixture
def validated_encounter(visit_definition_with_validators: Any, patient: Any) -> Any:
    from django_encounters.services import create_encounter

    return create_encounter(visit_definition_with_validators, patient)


@pytest.fixture
def employment(employment_definition: Any, patient: Any) -> Any:
    from django_encounters.services import create_encounter

    return create_encounter(employment_definition, patient)


@pytest.fixture
def past() -> Any:
    """Factory: an aware datetime ``hours`` hours before now (a valid backdated time)."""
    base = timezone.now()

    def at(hours: float) -> Any:
        return base - timedelta(hours=hours)

    return at


@pytest.fixture
def tampered(visit_definition, patient, user):
    """A visit (3 rows) whose row 2 was edited behind the triggers: a `hash` anomaly at 2."""
    from django_encounters.services import create_encounter, transition
    from tests.helpers import rewrite_row

    visit = create_encounter(visit_definition, patient)
    for state in ("checked_in", "in_progress", "completed"):
        transition(visit, state, transitioned_by=user, reason=f"to {state}")
    rewrite_row(visit, 2, reason="edited")
    return visit
