"""Model tests: EncounterDefinition (12), Encounter (14), EncounterTransition (10) from the
specification, plus the base models, the projection columns and the append-only log."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from django.utils import timezone

from django_encounters.engine import stored_precision
from django_encounters.exceptions import EncounterError
from django_encounters.models import Encounter, EncounterDefinition, EncounterTransition
from django_encounters.services import transition
from tests.conftest import VISIT_STATES, VISIT_TRANSITIONS, visit_definition_kwargs
from tests.helpers import reload
from tests.testapp.models import Device, Patient

pytestmark = pytest.mark.django_db


# ---------------------------------------------------------------------------------------------
# EncounterDefinition (12)
# ---------------------------------------------------------------------------------------------


def test_definition_creation():
    definition = EncounterDefinition.objects.create(
        name="Patient Visit",
        code="VISIT",
        states=["scheduled", "done"],
        initial_state="scheduled",
        final_states=["done"],
        transitions={"scheduled": ["done"]},
    )

    fresh = EncounterDefinition.objects.get(code="VISIT")
    assert fresh.pk == definition.pk
    assert fresh.name == "Patient Visit"
    assert fresh.initial_state == "scheduled"
    assert fresh.states == ["scheduled", "done"]
    assert fresh.final_states == ["done"]
    assert fresh.transitions == {"scheduled": ["done"]}
    # Optional fields take their defaults.
    assert fresh.description == ""
    assert fresh.validators == []
    assert fresh.metadata == {}
    assert fresh.created_at is not None and fresh.deleted_at is None
    assert str(fresh) == "Patient Visit"


def test_definition_has_uuid_pk(make_definition):
    first = make_definition()
    second = make_definition()

    assert isinstance(first.pk, uuid.UUID)
    assert first.id == first.pk
    assert EncounterDefinition._meta.pk.name == "id"
    assert first.pk != second.pk
    assert EncounterDefinition.objects.get(pk=str(first.pk)) == first


def test_definition_unique_name(visit_definition):
    with pytest.raises((IntegrityError, DjangoValidationError)):
        with transaction.atomic():
            EncounterDefinition.objects.create(**visit_definition_kwargs(code="OTHER"))

    assert EncounterDefinition._meta.get_field("name").unique
    assert EncounterDefinition.all_objects.filter(name="Patient Visit").count() == 1
    assert not EncounterDefinition.all_objects.filter(code="OTHER").exists()


def test_definition_unique_code(visit_definition):
    with pytest.raises((IntegrityError, DjangoValidationError)):
        with transaction.atomic():
            EncounterDefinition.objects.create(**visit_definition_kwargs(name="Other"))

    assert EncounterDefinition._meta.get_field("code").unique
    assert EncounterDefinition.all_objects.filter(code="VISIT").count() == 1
    assert not EncounterDefinition.all_objects.filter(name="Other").exists()


def test_definition_states_json(make_definition):
    states = ["zeta", "alpha", "mid-state", "état"]  # order and non-ASCII preserved
    definition = make_definition(
        states=states,
        initial_state="zeta",
        final_states=["état"],
        transitions={"zeta": ["alpha"], "alpha": ["mid-state"], "mid-state": ["état"]},
        metadata={"colour": "blue", "nested": {"list": [1, 2.5, None, True]}},
    )

    fresh = reload(definition)
    assert fresh.states == states
    assert isinstance(fresh.states, list)
    assert fresh.final_states == ["état"]
    assert fresh.metadata == {"colour": "blue", "nested": {"list": [1, 2.5, None, True]}}


def test_definition_transitions_json(visit_definition):
    fresh = reload(visit_definition)

    assert fresh.transitions == VISIT_TRANSITIONS
    assert isinstance(fresh.transitions, dict)
    assert fresh.transitions["scheduled"] == ["checked_in", "cancelled"]
    # Queryable as JSON too.
    assert EncounterDefinition.objects.filter(transitions__has_key="in_progress").exists()
    assert not EncounterDefinition.objects.filter(transitions__has_key="completed").exists()


def test_definition_is_valid_state(visit_definition):
    for state in VISIT_STATES:
        assert visit_definition.is_valid_state(state) is True


def test_definition_is_valid_state_false(visit_definition):
    assert visit_definition.is_valid_state("discharged") is False
    assert visit_definition.is_valid_state("") is False
    assert visit_definition.is_valid_state("Scheduled") is False  # case-sensitive


def test_definition_is_final_state(visit_definition):
    assert visit_definition.is_final_state("completed") is True
    assert visit_definition.is_final_state("cancelled") is True
    assert visit_definition.is_final_state("scheduled") is False
    assert visit_definition.is_final_state("in_progress") is False
    assert visit_definition.is_final_state("unknown") is False


def test_definition_is_valid_transition(visit_definition):
    assert visit_definition.is_valid_transition("scheduled", "checked_in") is True
    assert visit_definition.is_valid_transition("scheduled", "cancelled") is True
    assert visit_definition.is_valid_transition("checked_in", "in_progress") is True
    assert visit_definition.is_valid_transition("in_progress", "completed") is True


def test_definition_is_valid_transition_false(visit_definition):
    # Skipping a step, going backwards, leaving a final state, unknown states.
    assert visit_definition.is_valid_transition("scheduled", "completed") is False
    assert visit_definition.is_valid_transition("in_progress", "scheduled") is False
    assert visit_definition.is_valid_transition("completed", "scheduled") is False
    assert visit_definition.is_valid_transition("nowhere", "scheduled") is False
    assert visit_definition.is_valid_transition("scheduled", "nowhere") is False


def test_definition_get_allowed_transitions(visit_definition):
    assert visit_definition.get_allowed_transitions("scheduled") == ["checked_in", "cancelled"]
    assert visit_definition.get_allowed_transitions("in_progress") == ["completed", "cancelled"]
    # A final state (no key in transitions) and an unknown state allow nothing.
    assert visit_definition.get_allowed_transitions("completed") == []
    assert visit_definition.get_allowed_transitions("nowhere") == []


# ---------------------------------------------------------------------------------------------
# Encounter (14)
# ---------------------------------------------------------------------------------------------


def test_encounter_creation(visit_definition, patient):
    encounter = Encounter.objects.create(definition=visit_definition, subject=patient)

    fresh = Encounter.objects.get(pk=encounter.pk)
    assert fresh.definition == visit_definition
    assert fresh.subject == patient
    assert fresh.state == "scheduled"
    assert fresh.notes == ""
    assert fresh.metadata == {}
    assert fresh.created_by is None and fresh.assigned_to is None
    assert fresh.created_at is not None and fresh.updated_at is not None
    assert fresh.deleted_at is None and fresh.is_deleted is False
    # Projection of an empty stream.
    assert fresh.version == 0
    assert fresh.origin_state == "scheduled"
    assert fresh.timeline_end_at is None


def test_encounter_has_uuid_pk(visit_definition, patient):
    first = Encounter.objects.create(definition=visit_definition, subject=patient)
    second = Encounter.objects.create(definition=visit_definition, subject=patient)

    assert isinstance(first.pk, uuid.UUID)
    assert first.id == first.pk
    assert Encounter._meta.pk.name == "id"
    assert first.pk != second.pk


def test_encounter_definition_fk(visit_definition, patient):
    encounter = Encounter.objects.create(definition=visit_definition, subject=patient)

    assert reload(encounter).definition_id == visit_definition.pk
    assert list(visit_definition.encounters.all()) == [encounter]
    # PROTECT: a definition in use cannot be hard-deleted.
    with pytest.raises(ProtectedError):
        with transaction.atomic():
            visit_definition.hard_delete()
    assert EncounterDefinition.all_objects.filter(pk=visit_definition.pk).exists()


def test_encounter_subject_generic_fk(visit_definition, patient, device):
    for_patient = Encounter.objects.create(definition=visit_definition, subject=patient)
    for_device = Encounter.objects.create(definition=visit_definition, subject=device)

    fresh = reload(for_patient)
    assert fresh.subject_content_type == ContentType.objects.get_for_model(Patient)
    assert fresh.subject_id == str(patient.pk)
    assert fresh.subject == patient

    fresh = reload(for_device)
    assert fresh.subject_content_type == ContentType.objects.get_for_model(Device)
    assert fresh.subject_id == str(device.pk)
    assert fresh.subject == device
    # Filterable by subject.
    assert list(
        Encounter.objects.filter(
            subject_content_type=ContentType.objects.get_for_model(Device),
            subject_id=str(device.pk),
        )
    ) == [for_device]


def test_encounter_initial_state_set(visit_definition, patient):
    encounter = Encounter(definition=visit_definition, subject=patient)
    assert not encounter.state
    encounter.save()

    assert encounter.state == "scheduled"
    fresh = reload(encounter)
    assert fresh.state == visit_definition.initial_state == "scheduled"
    assert fresh.origin_state == "scheduled"


def test_encounter_state_can_be_overridden(visit_definition, patient):
    encounter = Encounter.objects.create(
        definition=visit_definition, subject=patient, state="checked_in"
    )

    fresh = reload(encounter)
    assert fresh.state == "checked_in"
    assert fresh.origin_state == "checked_in"
    assert fresh.version == 0


def test_encounter_is_final_property(visit_definition, patient):
    open_one = Encounter.objects.create(definition=visit_definition, subject=patient)
    done = Encounter.objects.create(definition=visit_definition, subject=patient, state="completed")
    cancelled = Encounter.objects.create(
        definition=visit_definition, subject=patient, state="cancelled"
    )

    assert open_one.is_final is False
    assert done.is_final is True
    assert cancelled.is_final is True
    # It follows the state through transition().
    transition(open_one, "cancelled")
    assert open_one.is_final is True
    assert reload(open_one).is_final is True


def test_encounter_allowed_transitions_property(visit_definition, patient):
    encounter = Encounter.objects.create(definition=visit_definition, subject=patient)

    assert encounter.allowed_transitions == ["checked_in", "cancelled"]
    assert isinstance(encounter.allowed_transitions, list)
    transition(encounter, "checked_in")
    assert encounter.allowed_transitions == ["in_progress", "cancelled"]
    transition(encounter, "cancelled")
    assert encounter.allowed_transitions == []


def test_encounter_soft_delete(encounter):
    encounter.delete()

    assert encounter.is_deleted is True
    assert not Encounter.objects.filter(pk=encounter.pk).exists()
    hidden = Encounter.all_objects.get(pk=encounter.pk)
    assert hidden.deleted_at is not None and hidden.is_deleted is True

    hidden.restore()
    assert Encounter.objects.filter(pk=encounter.pk).exists()
    assert reload(encounter).deleted_at is None


def test_encounter_ordering(visit_definition, patient):
    now = timezone.now()
    middle = Encounter.objects.create(
        definition=visit_definition, subject=patient, created_at=now - timedelta(hours=2)
    )
    newest = Encounter.objects.create(
        definition=visit_definition, subject=patient, created_at=now - timedelta(hours=1)
    )
    oldest = Encounter.objects.create(
        definition=visit_definition, subject=patient, created_at=now - timedelta(hours=3)
    )

    assert Encounter._meta.ordering == ["-created_at"]
    assert list(Encounter.objects.all()) == [newest, middle, oldest]


def test_encounter_scheduled_at_optional(visit_definition, patient):
    unscheduled = Encounter.objects.create(definition=visit_definition, subject=patient)
    when = timezone.now() + timedelta(days=3)
    scheduled = Encounter.objects.create(
        definition=visit_definition, subject=patient, scheduled_at=when
    )

    assert reload(unscheduled).scheduled_at is None
    assert reload(scheduled).scheduled_at == when
    assert list(Encounter.objects.filter(scheduled_at__isnull=True)) == [unscheduled]


def test_encounter_timing_fields_optional(visit_definition, patient):
    encounter = Encounter.objects.create(definition=visit_definition, subject=patient)

    fresh = reload(encounter)
    assert (fresh.scheduled_at, fresh.started_at, fresh.ended_at) == (None, None, None)
    for name in ("scheduled_at", "started_at", "ended_at"):
        assert Encounter._meta.get_field(name).null is True

    # They are ordinary fields: the caller may set them and save().
    started = timezone.now() - timedelta(minutes=30)
    ended = timezone.now()
    fresh.started_at = started
    fresh.ended_at = ended
    fresh.save()
    fresh = reload(encounter)
    assert (fresh.started_at, fresh.ended_at) == (started, ended)


def test_encounter_metadata_json(visit_definition, patient):
    metadata = {"room": "3B", "vitals": {"bp": [120, 80], "temp": 36.6}, "flags": [], "ok": True}
    encounter = Encounter.objects.create(
        definition=visit_definition, subject=patient, metadata=metadata
    )

    assert reload(encounter).metadata == metadata
    assert Encounter.objects.filter(metadata__room="3B").get() == encounter
    assert Encounter.objects.create(definition=visit_definition, subject=patient).metadata == {}


def test_encounter_str_representation(encounter):
    assert str(encounter) == "Patient Visit - scheduled"
    transition(encounter, "checked_in")
    assert str(encounter) == "Patient Visit - checked_in"
    assert str(reload(encounter)) == "Patient Visit - checked_in"


# ---------------------------------------------------------------------------------------------
# EncounterTransition (10)
# ---------------------------------------------------------------------------------------------


def test_transition_creation(encounter, user):
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in", transitioned_by=user
    )

    fresh = EncounterTransition.objects.get(pk=row.pk)
    assert fresh.encounter == encounter
    assert (fresh.from_state, fresh.to_state) == ("scheduled", "checked_in")
    assert fresh.transitioned_by == user
    assert fresh.reason == "" and fresh.metadata == {}
    assert fresh.sequence == 1  # numbered automatically
    assert fresh.hash  # chained automatically
    # A low-level insert checks no state machine, but the projection follows the log.
    projection = reload(encounter)
    assert projection.state == "checked_in"
    assert projection.version == 1

    second = EncounterTransition.objects.create(
        encounter=encounter, from_state="checked_in", to_state="in_progress"
    )
    assert second.sequence == 2
    assert second.hash and second.hash != fresh.hash


def test_transition_has_uuid_pk(encounter):
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in"
    )

    assert isinstance(row.pk, uuid.UUID)
    assert row.id == row.pk
    assert EncounterTransition._meta.pk.name == "id"
    assert EncounterTransition.objects.get(pk=str(row.pk)) == row


def test_transition_encounter_fk(encounter, visit_definition, patient):
    other = Encounter.objects.create(definition=visit_definition, subject=patient)
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in"
    )

    assert EncounterTransition.objects.get(pk=row.pk).encounter_id == encounter.pk
    assert list(encounter.transitions.all()) == [row]
    assert list(other.transitions.all()) == []


def test_transition_immutable(encounter):
    row = transition(encounter, "checked_in", reason="arrived")

    row.reason = "rewritten"
    with pytest.raises(EncounterError, match="immutable"):
        row.save()
    fetched = EncounterTransition.objects.get(pk=row.pk)
    fetched.to_state = "cancelled"
    with pytest.raises(EncounterError, match="immutable"):
        fetched.save()

    fresh = EncounterTransition.objects.get(pk=row.pk)
    assert fresh.reason == "arrived"
    assert fresh.to_state == "checked_in"


def test_transition_transitioned_at_auto(encounter):
    before = timezone.now()
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in"
    )
    after = timezone.now()

    stored = EncounterTransition.objects.get(pk=row.pk).transitioned_at
    assert stored is not None
    # Issue 8: system time is stored at millisecond precision.
    assert stored_precision(before) <= stored <= after
    # default=timezone.now, not auto_now_add: an explicit value is kept (imports, tests).
    assert EncounterTransition._meta.get_field("transitioned_at").auto_now_add is False


def test_transition_effective_at_default(encounter):
    before = timezone.now()
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in"
    )
    after = timezone.now()

    stored = EncounterTransition.objects.get(pk=row.pk).effective_at
    # Issue 8: effective_at is stored at millisecond precision.
    assert stored_precision(before) <= stored <= after


def test_transition_effective_at_custom(encounter):
    when = timezone.now() - timedelta(days=2, minutes=17)
    row = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in", effective_at=when
    )

    fresh = EncounterTransition.objects.get(pk=row.pk)
    assert fresh.effective_at == stored_precision(when)  # issue 8: milliseconds
    # Recorded now, effective two days ago.
    assert fresh.transitioned_at > when + timedelta(days=1)


def test_transition_ordering(encounter, visit_definition, patient):
    # Issue 8: transitioned_at never decreases along one encounter's stream (the low-level
    # create refuses an earlier value), so the rows inserted out of transitioned_at order
    # belong to two encounters; within one encounter the newest row still comes first.
    other = Encounter.objects.create(definition=visit_definition, subject=patient)
    now = timezone.now()
    first = EncounterTransition.objects.create(
        encounter=encounter,
        from_state="scheduled",
        to_state="checked_in",
        transitioned_at=now - timedelta(minutes=3),
    )
    third = EncounterTransition.objects.create(
        encounter=encounter,
        from_state="checked_in",
        to_state="in_progress",
        transitioned_at=now - timedelta(minutes=1),
    )
    second = EncounterTransition.objects.create(
        encounter=other,
        from_state="scheduled",
        to_state="checked_in",
        transitioned_at=now - timedelta(minutes=2),
    )

    assert EncounterTransition._meta.ordering == ["-transitioned_at"]
    both = EncounterTransition.objects.filter(encounter__in=[encounter, other])
    assert list(both) == [third, second, first]
    assert list(encounter.transitions.all()) == [third, first]


def test_transition_reason_optional(encounter):
    without = EncounterTransition.objects.create(
        encounter=encounter, from_state="scheduled", to_state="checked_in"
    )
    with_reason = EncounterTransition.objects.create(
        encounter=encounter,
        from_state="checked_in",
        to_state="cancelled",
        reason="Patient left before being seen",
    )

    assert EncounterTransition.objects.get(pk=without.pk).reason == ""
    assert EncounterTransition.objects.get(pk=with_reason.pk).reason == (
        "Patient left before being seen"
    )


def test_transition_str_representation(encounter):
    row = transition(encounter, "checked_in")

    assert str(row) == "scheduled → checked_in"
    assert str(EncounterTransition(from_state="a", to_state="b")) == "a → b"


# ---------------------------------------------------------------------------------------------
# Beyond the specification: base models, projection columns, append-only log.
# ---------------------------------------------------------------------------------------------


def test_basemodels_are_abstract_and_compose():
    from django_encounters.basemodels import BaseModel, UUIDModel

    assert UUIDModel._meta.abstract and BaseModel._meta.abstract
    assert issubclass(Encounter, UUIDModel) and issubclass(Encounter, BaseModel)
    assert issubclass(EncounterDefinition, UUIDModel) and issubclass(EncounterDefinition, BaseModel)
    assert issubclass(EncounterTransition, UUIDModel)
    assert not issubclass(EncounterTransition, BaseModel)  # rows are never soft-deleted


def test_soft_deleted_definition_hidden_and_restorable(make_definition):
    definition = make_definition()
    definition.delete()

    assert not EncounterDefinition.objects.filter(pk=definition.pk).exists()
    assert EncounterDefinition.all_objects.get(pk=definition.pk).is_deleted
    definition.restore()
    assert EncounterDefinition.objects.filter(pk=definition.pk).exists()


def test_hard_delete_removes_encounter_without_transitions(encounter):
    encounter.hard_delete()

    assert not Encounter.all_objects.filter(pk=encounter.pk).exists()


def test_hard_delete_refused_for_encounter_with_transitions(encounter):
    transition(encounter, "checked_in")

    with pytest.raises(Exception):  # noqa: B017 - EncounterError, ProtectedError or DB error
        with transaction.atomic():
            Encounter.all_objects.get(pk=encounter.pk).hard_delete()
    assert Encounter.all_objects.filter(pk=encounter.pk).exists()
    assert EncounterTransition.objects.filter(encounter_id=encounter.pk).count() == 1


def test_queryset_update_and_delete_of_transitions_refused(encounter):
    row = transition(encounter, "checked_in", reason="arrived")

    with pytest.raises(EncounterError):
        with transaction.atomic():
            EncounterTransition.objects.filter(pk=row.pk).update(reason="changed")
    with pytest.raises(EncounterError):
        with transaction.atomic():
            EncounterTransition.objects.filter(pk=row.pk).delete()
    with pytest.raises(EncounterError):
        with transaction.atomic():
            row.delete()

    fresh = EncounterTransition.objects.get(pk=row.pk)
    assert fresh.reason == "arrived"


def test_fresh_encounter_projection_columns(visit_definition, device):
    encounter = Encounter.objects.create(definition=visit_definition, subject=device)

    fresh = reload(encounter)
    assert fresh.version == 0
    assert fresh.origin_state == "scheduled"
    assert fresh.timeline_end_at is None
    # Issue 8: a stream with no rows has its genesis hash as its head (no longer "").
    assert fresh.head_hash == fresh.genesis_hash
    assert fresh.genesis_hash.startswith("v3:")


def test_encounter_save_cannot_write_projection(encounter):
    """save() of an existing row never writes projection columns, even when told to."""
    transition(encounter, "checked_in")
    encounter.state = "completed"
    encounter.version = 99
    encounter.notes = "edited"
    encounter.save()
    encounter.state = "cancelled"
    encounter.save(update_fields=["state", "version"])

    fresh = reload(encounter)
    assert fresh.state == "checked_in"
    assert fresh.version == 1
    assert fresh.notes == "edited"  # ordinary fields are saved


def test_transition_hash_chain_and_head_hash(encounter):
    first = transition(encounter, "checked_in")
    second = transition(encounter, "in_progress")

    assert first.hash and second.hash and first.hash != second.hash
    # Issue 8: every hash names its format: "v3:" + 64 hex digits.
    assert second.hash.startswith("v3:") and len(second.hash) == 67
    fresh = reload(encounter)
    assert fresh.head_hash == second.hash
    assert encounter.head_hash == second.hash


def test_package_exports():
    import django_encounters

    assert django_encounters.__version__
    for name in django_encounters.__all__:
        assert getattr(django_encounters, name) is not None, name
    for name in (
        "EncounterDefinition",
        "Encounter",
        "EncounterTransition",
        "StateValidator",
        "RequiredFieldsValidator",
        "NoBackwardsTransitionValidator",
        "FinalStateValidator",
        "create_encounter",
        "transition",
        "get_encounter_history",
        "get_state_at",
        "EncounterError",
        "InvalidTransitionError",
        "ValidationError",
        "EncounterNotFoundError",
    ):
        assert name in django_encounters.__all__, name
    assert django_encounters.Encounter is Encounter
    assert django_encounters.transition is transition
    with pytest.raises(AttributeError):
        django_encounters.no_such_name  # noqa: B018
