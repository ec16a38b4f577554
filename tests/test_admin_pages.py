"""The admin pages of every model render for a superuser (through Django's test client), and
the facts — transitions, definition versions, acknowledgements — cannot be changed there."""

from __future__ import annotations

import pytest
from django.urls import reverse

from django_encounters.models import (
    AnomalyAcknowledgement,
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.projections.acknowledgements import acknowledge_anomaly
from django_encounters.services import transition

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_with_data(client, django_user_model, encounter, visit_definition):
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    transition(encounter, "checked_in", transitioned_by=admin)
    visit_definition.transitions = {**visit_definition.transitions, "scheduled": ["checked_in"]}
    visit_definition.save()
    acknowledge_anomaly(encounter.pk, 1, "hash", "reviewed", acknowledged_by=admin)
    return client


MODELS = [
    EncounterDefinition,
    EncounterDefinitionVersion,
    Encounter,
    EncounterTransition,
    AnomalyAcknowledgement,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_changelist_and_change_pages_render(admin_client_with_data, model):
    meta = model._meta
    listing = admin_client_with_data.get(
        reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist")
    )
    assert listing.status_code == 200
    obj = model._base_manager.first()
    page = admin_client_with_data.get(
        reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    )
    assert page.status_code == 200


def test_definition_page_lists_every_version(admin_client_with_data, visit_definition):
    page = admin_client_with_data.get(
        reverse("admin:django_encounters_encounterdefinition_change", args=[visit_definition.pk])
    )
    text = page.content.decode()
    assert "encounter definition versions" in text.lower()
    assert visit_definition.versions.count() == 2


@pytest.mark.parametrize(
    "model", [EncounterTransition, EncounterDefinitionVersion, AnomalyAcknowledgement]
)
def test_facts_cannot_be_added_or_deleted_in_the_admin(admin_client_with_data, model):
    meta = model._meta
    add = admin_client_with_data.get(reverse(f"admin:{meta.app_label}_{meta.model_name}_add"))
    assert add.status_code == 403
    obj = model._base_manager.first()
    delete = admin_client_with_data.post(
        reverse(f"admin:{meta.app_label}_{meta.model_name}_delete", args=[obj.pk]),
        {"post": "yes"},
    )
    assert delete.status_code == 403
    assert model._base_manager.filter(pk=obj.pk).exists()
