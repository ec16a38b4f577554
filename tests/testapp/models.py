"""Subject models for the tests: one integer-keyed, one UUID-keyed."""

from __future__ import annotations

import uuid

from django.db import models


class Patient(models.Model):
    """Integer primary key (BigAutoField)."""

    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Device(models.Model):
    """UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    serial = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.serial
