"""Definitions are validated on save (``clean()``, also run by ``save()``) and report legal
structural smells through ``get_warnings()``."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError

from django_encounters.models import EncounterDefinition
from tests.conftest import VISIT_VALIDATORS, visit_definition_kwargs

pytestmark = pytest.mark.django_db


def error_text(error: DjangoValidationError) -> str:
    return " | ".join(error.messages)


def assert_refused(naming: list[str], **overrides) -> DjangoValidationError:
    """Both ``clean()`` and ``save()`` refuse the definition, naming every entry in ``naming``,
    and nothing is saved."""
    kwargs = visit_definition_kwargs(name="Broken", code="BROKEN")
    kwargs.update(overrides)

    with pytest.raises(DjangoValidationError) as cleaned:
        EncounterDefinition(**kwargs).clean()
    with pytest.raises(DjangoValidationError) as saved:
        EncounterDefinition(**kwargs).save()
    with pytest.raises(DjangoValidationError):
        EncounterDefinition.objects.create(**kwargs)

    for error in (cleaned.value, saved.value):
        text = error_text(error)
        for name in naming:
            assert name in text, f"{name!r} not named in: {text}"
    assert not EncounterDefinition.all_objects.filter(code="BROKEN").exists()
    return saved.value


# ---------------------------------------------------------------------------------------------
# clean() / save()
# ---------------------------------------------------------------------------------------------


def test_valid_definition_cleans_and_saves():
    definition = EncounterDefinition(**visit_definition_kwargs(validators=list(VISIT_VALIDATORS)))
    definition.clean()  # no error
    definition.full_clean()
    definition.save()
    assert EncounterDefinition.objects.get(code="VISIT").validators == VISIT_VALIDATORS


def test_initial_state_not_in_states_refused():
    error = assert_refused(["'nowhere'"], initial_state="nowhere")
    assert "initial_state" in error.message_dict


def test_final_state_not_in_states_refused():
    error = assert_refused(["'archived'"], final_states=["completed", "archived"])
    assert "final_states" in error.message_dict


def test_transition_key_not_in_states_refused():
    transitions = {
        "scheduled": ["checked_in"],
        "checked_in": ["completed"],
        "ghost": ["completed"],
    }
    error = assert_refused(["'ghost'"], transitions=transitions)
    assert "transitions" in error.message_dict


def test_transition_target_not_in_states_refused():
    transitions = {"scheduled": ["checked_in", "phantom"], "checked_in": ["completed"]}
    error = assert_refused(["'phantom'"], transitions=transitions)
    assert "transitions" in error.message_dict


def test_every_offending_entry_is_named():
    assert_refused(
        ["'nowhere'", "'archived'", "'ghost'", "'phantom'"],
        initial_state="nowhere",
        final_states=["archived"],
        transitions={"ghost": ["scheduled"], "scheduled": ["phantom"]},
    )


@pytest.mark.parametrize(
    "entry, naming",
    [
        (42, ["42"]),  # neither a path nor a dict
        (["django_encounters.validators.FinalStateValidator"], ["FinalStateValidator"]),
        ({"params": {"state_order": ["a"]}}, ["path"]),  # dict without 'path'
        (
            {
                "path": "django_encounters.validators.RequiredFieldsValidator",
                "params": ["completed", "ended_at"],  # params not a dict
            },
            ["params"],
        ),
    ],
)
def test_malformed_validator_entry_refused(entry, naming):
    error = assert_refused(
        naming, validators=["django_encounters.validators.FinalStateValidator", entry]
    )
    assert "validators" in error.message_dict
    assert "entry 1" in error_text(error) or repr(entry) in error_text(error)


@pytest.mark.parametrize(
    "path",
    [
        "tests.no_such_module.Validator",
        "django_encounters.validators.NoSuchValidator",
    ],
)
def test_unimportable_validator_refused(path):
    error = assert_refused([path], validators=[path])
    assert "validators" in error.message_dict


@pytest.mark.parametrize(
    "entry",
    [
        "subprocess.Popen",
        "tests.encounter_validators.not_a_validator_function",
        {"path": "tests.encounter_validators.NotAValidator", "params": {}},
    ],
)
def test_non_validator_class_refused(entry):
    path = entry if isinstance(entry, str) else entry["path"]
    assert_refused([path], validators=[entry])


def test_validator_params_not_accepted_by_constructor_refused():
    entry = {
        "path": "django_encounters.validators.RequiredFieldsValidator",
        "params": {"no_such_argument": True},
    }
    assert_refused(["RequiredFieldsValidator"], validators=[entry])


def test_refused_edit_of_saved_definition_leaves_row_unchanged(visit_definition):
    visit_definition.initial_state = "nowhere"

    with pytest.raises(DjangoValidationError, match="nowhere"):
        visit_definition.save()

    assert EncounterDefinition.objects.get(pk=visit_definition.pk).initial_state == "scheduled"


# ---------------------------------------------------------------------------------------------
# get_warnings()
# ---------------------------------------------------------------------------------------------


def test_clean_definition_has_no_warnings(visit_definition):
    assert visit_definition.get_warnings() == []


def test_warning_unreachable_state(make_definition):
    definition = make_definition(
        states=["scheduled", "checked_in", "completed", "orphan"],
        final_states=["completed"],
        transitions={
            "scheduled": ["checked_in"],
            "checked_in": ["completed"],
            "orphan": ["completed"],
        },
    )

    warnings = definition.get_warnings()

    assert isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)
    assert len(warnings) == 1
    assert "orphan" in warnings[0]
    assert "unreachable" in warnings[0]


def test_warning_exit_from_final_state(make_definition):
    definition = make_definition(
        states=["scheduled", "completed", "reopened"],
        final_states=["completed"],
        transitions={
            "scheduled": ["completed"],
            "completed": ["reopened"],
            "reopened": ["completed"],
        },
    )

    warnings = definition.get_warnings()

    assert len(warnings) == 1
    assert "completed" in warnings[0]
    assert "final" in warnings[0]


def test_warning_non_final_dead_end(make_definition):
    definition = make_definition(
        states=["scheduled", "waiting", "completed"],
        final_states=["completed"],
        transitions={"scheduled": ["waiting", "completed"]},
    )

    warnings = definition.get_warnings()

    assert len(warnings) == 1
    assert "waiting" in warnings[0]
    assert "completed" not in warnings[0]


def test_warnings_are_not_save_blockers(make_definition):
    definition = make_definition(
        states=["a", "b", "c", "d", "z"],
        initial_state="a",
        final_states=["z"],
        transitions={"a": ["b"], "z": ["a"], "d": ["z"]},
    )

    warnings = " || ".join(definition.get_warnings())

    assert EncounterDefinition.objects.filter(pk=definition.pk).exists()
    assert "'c'" in warnings and "'d'" in warnings  # unreachable
    assert "'z'" in warnings  # final with exits (and unreachable)
    assert "'b'" in warnings  # dead end
    assert len(definition.get_warnings()) == 3
