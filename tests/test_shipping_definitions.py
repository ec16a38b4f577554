"""Shipping a definition with data migrations (docs/guides/definitions.md): the guide's two
migrations (tests/shipping/migrations, the same files) applied forwards, again, and
backwards with Django's migration machinery on the migration state's historical models; and
the one story of validation errors (``DefinitionError`` is an ``EncounterError`` and Django's
``ValidationError``; the library's ``ValidationError`` is a validator refusing a transition)."""

from __future__ import annotations

import re
from importlib import import_module
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.forms import modelform_factory

import django_encounters
from django_encounters import create_encounter, transition, upgrade_encounter
from django_encounters.exceptions import (
    DefinitionError,
    DefinitionVersionError,
    EncounterError,
    InvalidTransitionError,
)
from django_encounters.models import Encounter, EncounterDefinition, EncounterDefinitionVersion
from django_encounters.projections.audit import audit_encounters
from django_encounters.projections.rebuild import rebuild_projections
from tests.conftest import visit_definition_kwargs
from tests.testapp.models import Patient

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "tests" / "shipping" / "migrations"
NAMES = ("0001_visit_definition", "0002_visit_triage")


def _migration(name: str):
    module = import_module(f"tests.shipping.migrations.{name}")
    return module.Migration(name, "clinic")


def _state():
    """The project state after every installed app's migrations (what the guide's migrations
    depend on), rendered the way ``migrate`` renders it."""
    return MigrationExecutor(connection).loader.project_state()


def _apply(name: str) -> None:
    with connection.schema_editor(atomic=True) as editor:
        _migration(name).apply(_state(), editor)


def _unapply(name: str) -> None:
    with connection.schema_editor(atomic=True) as editor:
        _migration(name).unapply(_state(), editor)


def _visit() -> EncounterDefinition:
    return EncounterDefinition.all_objects.get(code="CLINIC_VISIT")


def _numbers() -> list[int]:
    return list(
        EncounterDefinitionVersion.objects.filter(definition__code="CLINIC_VISIT")
        .order_by("number")
        .values_list("number", flat=True)
    )


@pytest.mark.django_db(transaction=True)
def test_the_guides_migrations_forwards_again_and_backwards():
    _apply("0001_visit_definition")
    visit = _visit()
    assert (visit.version, _numbers()) == (1, [1])
    assert visit.latest_version().states[-1] == "cancelled"
    _apply("0001_visit_definition")  # idempotent: the same machine records nothing
    assert (_visit().version, _numbers()) == (1, [1])

    patient = Patient.objects.create(name="Ada Lovelace")
    before = create_encounter(_visit(), patient)
    transition(before, "checked_in")

    _apply("0002_visit_triage")
    assert (_visit().version, _numbers()) == (2, [1, 2])
    after = create_encounter(_visit(), patient)
    transition(after, "checked_in")
    transition(after, "triage")
    # The encounter created under version 1 keeps its rules until it is upgraded.
    with pytest.raises(InvalidTransitionError):
        transition(Encounter.objects.get(pk=before.pk), "triage")
    transition(Encounter.objects.get(pk=before.pk), "in_progress")

    _unapply("0002_visit_triage")  # the previous machine again, as version 3
    assert (_visit().version, _numbers()) == (3, [1, 2, 3])
    assert "triage" not in _visit().latest_version().states
    upgrade_encounter(Encounter.objects.get(pk=before.pk))  # in_progress: a state of v3
    assert Encounter.objects.get(pk=before.pk).definition_version == 3
    _unapply("0001_visit_definition")  # retired: soft-deleted, versions and encounters kept
    assert _visit().is_deleted and _numbers() == [1, 2, 3]
    assert not EncounterDefinition.objects.filter(code="CLINIC_VISIT").exists()
    _apply("0001_visit_definition")  # shipped again: restored, the v1 machine is version 3's
    assert not _visit().is_deleted and _visit().version == 3

    # The versions written with the historical models hash and chain like save()'s.
    assert audit_encounters().anomaly_count == 0
    assert rebuild_projections(check=True).ok


@pytest.mark.django_db(transaction=True)
def test_a_plain_update_or_create_on_the_historical_model_records_no_version():
    """Why the guide uses ship_definition(): the historical model has no save() of the
    library's, so the definition it writes has no version to pin encounters to."""
    apps = _state().apps
    historical = apps.get_model("django_encounters", "EncounterDefinition")
    historical.objects.update_or_create(
        code="RAW", defaults={**visit_definition_kwargs(code="RAW", name="Raw")}
    )
    with pytest.raises(DefinitionVersionError, match="'RAW'"):
        EncounterDefinition.objects.get(code="RAW").latest_version()


@pytest.mark.django_db(transaction=True)
def test_an_invalid_machine_is_refused_before_anything_is_written():
    from django_encounters.shipping import ship_definition

    with connection.schema_editor(atomic=True) as editor:
        with pytest.raises(DefinitionError, match="nowhere"):
            ship_definition(
                _state().apps,
                editor,
                code="BROKEN",
                name="Broken",
                states=["a", "b"],
                initial_state="nowhere",
                final_states=["b"],
                transitions={"a": ["b"]},
            )
    assert not EncounterDefinition.all_objects.filter(code="BROKEN").exists()


def test_the_guide_shows_the_migrations_as_they_are():
    guide = (ROOT / "docs" / "guides" / "definitions.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", guide, re.MULTILINE | re.DOTALL)
    for name in NAMES:
        assert (MIGRATIONS / f"{name}.py").read_text() in blocks, name


# ---------------------------------------------------------------------------------------------
# One story of validation errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_definition_errors_are_encounter_errors_and_djangos_validation_errors():
    broken = EncounterDefinition(**visit_definition_kwargs(initial_state="nowhere"))
    for check in (broken.clean, broken.full_clean, broken.save):
        with pytest.raises(DefinitionError) as refused:
            check()
        error = refused.value
        assert isinstance(error, EncounterError) and isinstance(error, DjangoValidationError)
        assert error.definition_code == "VISIT"
        assert "nowhere" in " ".join(error.message_dict["initial_state"])
    # Caught by the library's base error, as every other error of the library.
    with pytest.raises(django_encounters.EncounterError):
        broken.save()
    assert not EncounterDefinition.all_objects.filter(code="VISIT").exists()
    # The library's ValidationError is the validator's refusal of a transition: not Django's.
    assert not issubclass(django_encounters.ValidationError, DjangoValidationError)
    assert django_encounters.DefinitionError is DefinitionError


@pytest.mark.django_db
def test_full_clean_also_reports_field_and_uniqueness_errors_as_a_definition_error():
    EncounterDefinition.objects.create(**visit_definition_kwargs())
    again = EncounterDefinition(**visit_definition_kwargs(name="Another"))
    with pytest.raises(DefinitionError) as refused:
        again.full_clean()
    assert "code" in refused.value.message_dict


@pytest.mark.django_db
def test_a_model_form_shows_a_definition_error_on_its_fields():
    Form = modelform_factory(
        EncounterDefinition,
        fields=["name", "code", "states", "initial_state", "final_states", "transitions"],
    )
    data = visit_definition_kwargs(initial_state="nowhere")
    form = Form(data={k: _form_value(v) for k, v in data.items()})
    assert not form.is_valid()
    assert "nowhere" in " ".join(form.errors["initial_state"])


def _form_value(value):
    import json

    return value if isinstance(value, str) else json.dumps(value)
