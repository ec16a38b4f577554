"""StateValidator tests (12 from the specification) and the safety checks of validator
loading: only StateValidator subclasses, ``ENCOUNTERS_VALIDATOR_MODULES`` prefixes."""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from django_encounters.exceptions import (
    EncounterError,
    ValidationError,
    ValidatorConfigurationError,
)
from django_encounters.models import Encounter
from django_encounters.services import create_encounter, transition
from django_encounters.validators import (
    FinalStateValidator,
    NoBackwardsTransitionValidator,
    RequiredFieldsValidator,
    StateValidator,
    get_validator_class,
    get_validator_instance,
)
from tests import encounter_validators
from tests.helpers import snapshot

pytestmark = pytest.mark.django_db

VISIT_ORDER = ["scheduled", "checked_in", "in_progress", "completed"]


@pytest.fixture(autouse=True)
def _clear_calls():
    encounter_validators.CALLS.clear()
    yield
    encounter_validators.CALLS.clear()


# ---------------------------------------------------------------------------------------------
# The specification's 12
# ---------------------------------------------------------------------------------------------


def test_required_fields_validator_passes(encounter):
    validator = RequiredFieldsValidator({"in_progress": ["started_at"]})
    encounter.started_at = timezone.now()

    assert validator.validate(encounter, "checked_in", "in_progress") is None
    # States without requirements pass whatever is set.
    encounter.started_at = None
    assert validator.validate(encounter, "scheduled", "checked_in") is None


def test_required_fields_validator_fails(encounter):
    validator = RequiredFieldsValidator({"in_progress": ["started_at"]})
    assert encounter.started_at is None

    with pytest.raises(ValidationError) as excinfo:
        validator.validate(encounter, "checked_in", "in_progress")

    assert excinfo.value.validator == "RequiredFieldsValidator"
    assert "started_at" in str(excinfo.value)
    assert "in_progress" in str(excinfo.value)
    assert isinstance(excinfo.value, EncounterError)


def test_required_fields_validator_multiple(encounter):
    validator = RequiredFieldsValidator({"completed": ["started_at", "ended_at"]})

    with pytest.raises(ValidationError, match="started_at"):
        validator.validate(encounter, "in_progress", "completed")

    encounter.started_at = timezone.now() - timedelta(hours=1)
    with pytest.raises(ValidationError, match="ended_at"):
        validator.validate(encounter, "in_progress", "completed")

    encounter.ended_at = timezone.now()
    assert validator.validate(encounter, "in_progress", "completed") is None


def test_no_backwards_validator_allows_forward(encounter):
    validator = NoBackwardsTransitionValidator(VISIT_ORDER)

    assert validator.validate(encounter, "scheduled", "checked_in") is None
    assert validator.validate(encounter, "checked_in", "completed") is None  # skipping ahead
    assert validator.validate(encounter, "in_progress", "in_progress") is None  # same place


def test_no_backwards_validator_blocks_backward(encounter):
    validator = NoBackwardsTransitionValidator(VISIT_ORDER)

    with pytest.raises(ValidationError) as excinfo:
        validator.validate(encounter, "in_progress", "checked_in")

    assert excinfo.value.validator == "NoBackwardsTransitionValidator"
    assert "in_progress" in str(excinfo.value) and "checked_in" in str(excinfo.value)
    with pytest.raises(ValidationError):
        validator.validate(encounter, "completed", "scheduled")


def test_no_backwards_validator_unknown_state(encounter):
    validator = NoBackwardsTransitionValidator(VISIT_ORDER)

    # 'cancelled' and 'triage' are not in the order: not restricted, either way.
    assert validator.validate(encounter, "in_progress", "cancelled") is None
    assert validator.validate(encounter, "cancelled", "scheduled") is None
    assert validator.validate(encounter, "triage", "checked_in") is None


def test_final_state_validator_allows(encounter):
    validator = FinalStateValidator()

    assert validator.validate(encounter, "scheduled", "checked_in") is None
    assert validator.validate(encounter, "in_progress", "completed") is None


def test_final_state_validator_blocks(encounter):
    validator = FinalStateValidator()

    for final in ("completed", "cancelled"):
        with pytest.raises(ValidationError) as excinfo:
            validator.validate(encounter, final, "scheduled")
        assert excinfo.value.validator == "FinalStateValidator"
        assert final in str(excinfo.value)


def test_get_validator_instance_simple():
    validator = get_validator_instance("django_encounters.validators.FinalStateValidator")

    assert type(validator) is FinalStateValidator
    assert isinstance(validator, StateValidator)
    # A fresh instance each time.
    assert (
        get_validator_instance("django_encounters.validators.FinalStateValidator") is not validator
    )


def test_get_validator_instance_with_config():
    requirements = {"completed": ["ended_at"], "in_progress": ["started_at"]}
    validator = get_validator_instance(
        "django_encounters.validators.RequiredFieldsValidator",
        {"state_requirements": requirements},
    )

    assert type(validator) is RequiredFieldsValidator
    assert validator.state_requirements == requirements

    ordered = get_validator_instance(
        "django_encounters.validators.NoBackwardsTransitionValidator", {"state_order": VISIT_ORDER}
    )
    assert list(ordered.state_order) == VISIT_ORDER


def test_custom_validator_implementation(make_definition, patient):
    # The base class is abstract: validate() must be implemented.
    with pytest.raises(TypeError):
        StateValidator()  # type: ignore[abstract]

    class Incomplete(StateValidator):
        pass

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]

    # A subclass named by a definition is loaded and consulted by transition().
    definition = make_definition(
        validators=[
            {
                "path": "tests.encounter_validators.RefuseStateValidator",
                "params": {"state": "cancelled"},
            }
        ]
    )
    encounter = create_encounter(definition, patient)
    with pytest.raises(ValidationError, match="needs approval") as excinfo:
        transition(encounter, "cancelled")
    assert excinfo.value.validator == "RefuseStateValidator"
    assert Encounter.objects.get(pk=encounter.pk).state == "scheduled"

    transition(encounter, "cancelled", context={"approved": True})
    assert Encounter.objects.get(pk=encounter.pk).state == "cancelled"


def test_validator_context_passed(make_definition, patient):
    definition = make_definition(validators=["tests.encounter_validators.RecordingValidator"])
    encounter = create_encounter(definition, patient)

    transition(encounter, "checked_in", context={"room": "3B", "priority": 2})
    transition(encounter, "in_progress")

    assert encounter_validators.CALLS == [
        (encounter.pk, "scheduled", "scheduled", "checked_in", {"room": "3B", "priority": 2}),
        (encounter.pk, "checked_in", "checked_in", "in_progress", None),
    ]


# ---------------------------------------------------------------------------------------------
# Loading safety: only StateValidator subclasses, nothing called before the check.
# ---------------------------------------------------------------------------------------------


def test_validator_configuration_error_hierarchy():
    assert issubclass(ValidatorConfigurationError, EncounterError)
    assert issubclass(ValidatorConfigurationError, ImproperlyConfigured)


@pytest.mark.parametrize(
    "path",
    [
        "tests.encounter_validators.not_a_validator_function",  # a function
        "tests.encounter_validators.NotAValidator",  # a class with validate(), wrong base
        "django_encounters.validators.StateValidator",  # the abstract base itself
    ],
)
def test_get_validator_instance_refuses_non_validators(path):
    with pytest.raises(ValidatorConfigurationError) as excinfo:
        get_validator_instance(path)

    assert path in str(excinfo.value)
    assert encounter_validators.CALLS == []  # nothing was called


def test_get_validator_instance_refuses_popen(tmp_path):
    marker = tmp_path / "was-run"

    with pytest.raises(ValidatorConfigurationError, match="subprocess.Popen"):
        get_validator_instance("subprocess.Popen", {"args": ["touch", str(marker)]})
    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance("os.system")

    assert not marker.exists()


@pytest.mark.parametrize(
    "path",
    [
        "tests.no_such_module.SomeValidator",
        "no_such_top_level_package_xyz.Validator",
        "tests.encounter_validators.NoSuchValidator",
        "NoDots",
        "",
    ],
)
def test_get_validator_instance_refuses_missing(path):
    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance(path)


def test_get_validator_instance_refuses_bad_params():
    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance(
            "django_encounters.validators.RequiredFieldsValidator", {"no_such_argument": 1}
        )


# ---------------------------------------------------------------------------------------------
# ENCOUNTERS_VALIDATOR_MODULES
# ---------------------------------------------------------------------------------------------


def test_validator_modules_admits_module_and_submodules(settings):
    settings.ENCOUNTERS_VALIDATOR_MODULES = ["tests.encounter_validators"]

    assert isinstance(
        get_validator_instance("tests.encounter_validators.RecordingValidator"),
        encounter_validators.RecordingValidator,
    )
    sub = get_validator_instance("tests.encounter_validators.clinical.ClinicalValidator")
    assert type(sub).__name__ == "ClinicalValidator"


def test_validator_modules_refuses_lookalike_prefix_before_import(settings):
    settings.ENCOUNTERS_VALIDATOR_MODULES = ["tests.encounter_validators"]
    sys.modules.pop("tests.encounter_validatorsx", None)

    with pytest.raises(ValidatorConfigurationError) as excinfo:
        get_validator_instance("tests.encounter_validatorsx.LookalikeValidator")

    assert "tests.encounter_validatorsx" in str(excinfo.value)
    assert "tests.encounter_validatorsx" not in sys.modules  # refused before import
    # Without the allow-list the same (valid) path loads: the refusal was the prefix's.
    settings.ENCOUNTERS_VALIDATOR_MODULES = None
    assert get_validator_instance("tests.encounter_validatorsx.LookalikeValidator")


def test_validator_modules_refuses_outside_paths(settings):
    settings.ENCOUNTERS_VALIDATOR_MODULES = ["tests.encounter_validators"]

    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance("subprocess.Popen")
    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance("tests.encounter_validators_other.Thing")


def test_validator_modules_always_admits_builtin_validators(settings):
    settings.ENCOUNTERS_VALIDATOR_MODULES = ["tests.encounter_validators"]

    assert isinstance(
        get_validator_instance("django_encounters.validators.FinalStateValidator"),
        FinalStateValidator,
    )
    settings.ENCOUNTERS_VALIDATOR_MODULES = []
    assert isinstance(
        get_validator_instance(
            "django_encounters.validators.RequiredFieldsValidator", {"state_requirements": {}}
        ),
        RequiredFieldsValidator,
    )
    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance("tests.encounter_validators.RecordingValidator")


def test_validator_modules_read_at_call_time(settings):
    path = "tests.encounter_validators.RecordingValidator"

    settings.ENCOUNTERS_VALIDATOR_MODULES = ["myapp.validators"]
    with pytest.raises(ValidatorConfigurationError):
        get_validator_instance(path)

    settings.ENCOUNTERS_VALIDATOR_MODULES = ["myapp.validators", "tests.encounter_validators"]
    assert get_validator_instance(path)

    del settings.ENCOUNTERS_VALIDATOR_MODULES
    assert get_validator_instance(path)


def test_transition_refused_when_validator_leaves_allow_list(settings, make_definition, patient):
    """A definition saved under one allow-list, run under a narrower one: refused, nothing
    written."""
    definition = make_definition(validators=["tests.encounter_validators.RecordingValidator"])
    encounter = create_encounter(definition, patient)
    before = snapshot(encounter)

    settings.ENCOUNTERS_VALIDATOR_MODULES = ["myapp.validators"]
    with pytest.raises(ValidatorConfigurationError):
        transition(encounter, "checked_in")

    assert snapshot(encounter) == before
    assert encounter_validators.CALLS == []
    # skip_validation does not load validators at all.
    transition(encounter, "checked_in", skip_validation=True)
    assert snapshot(encounter).state == "checked_in"


# Resolved paths are remembered, never at the cost of an answer


def test_a_remembered_path_still_meets_the_allow_list_read_at_call_time(settings):
    path = "tests.encounter_validators.clinical.ClinicalValidator"
    assert get_validator_class(path).__name__ == "ClinicalValidator"
    settings.ENCOUNTERS_VALIDATOR_MODULES = ["myapp.validators"]
    with pytest.raises(ValidatorConfigurationError, match="not in ENCOUNTERS_VALIDATOR_MODULES"):
        get_validator_class(path)


def test_a_class_replaced_in_its_module_is_resolved_again(monkeypatch):
    from tests.encounter_validators import clinical

    path = "tests.encounter_validators.clinical.ClinicalValidator"
    original = get_validator_class(path)

    class Replacement(StateValidator):
        def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
            pass

    monkeypatch.setattr(clinical, "ClinicalValidator", Replacement)
    assert get_validator_class(path) is Replacement
    monkeypatch.setattr(clinical, "ClinicalValidator", len)  # not a validator now
    with pytest.raises(ValidatorConfigurationError, match="not a subclass"):
        get_validator_class(path)
    monkeypatch.undo()
    assert get_validator_class(path) is original
