"""Subject models for the tests: one integer-keyed, one UUID-keyed; a bed (in a ward, deleted
with it) with Django's plain ``GenericRelation`` to its encounters, as the subject-guard tests
need."""

from __future__ import annotations

import uuid

from django.contrib.contenttypes.fields import GenericRelation
from django.db import models

from django_encounters.subjects import EncounterRelation


class Patient(models.Model):
    """Integer primary key (BigAutoField)."""

    name = models.CharField(max_length=100)
    #: queries from the patient (``patient.encounters``, ``Encounter.objects.filter(
    #: patient__name=…)``) without cascading a delete into the encounters
    encounters = EncounterRelation(related_query_name="patient")

    def __str__(self) -> str:
        return self.name


class Device(models.Model):
    """UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    serial = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.serial


class Ward(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Bed(models.Model):
    """Deleted with its ward (a cascade); its encounters through a plain ``GenericRelation``
    (which cascades a delete into them: what the docs warn about)."""

    ward = models.ForeignKey(Ward, on_delete=models.CASCADE, related_name="beds")
    label = models.CharField(max_length=100)
    encounters = GenericRelation(
        "django_encounters.Encounter",
        object_id_field="subject_id",
        content_type_field="subject_content_type",
        related_query_name="bed",
    )

    def __str__(self) -> str:
        return self.label
