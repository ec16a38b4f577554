"""Abstract base models shipped with the package.

``UUIDModel`` gives a UUID primary key; ``BaseModel`` gives timestamps and soft delete. They are
separate so that ``class X(UUIDModel, BaseModel)`` has a clean MRO. (PyPI's
``django-basemodels`` is an unrelated package and is not used.)
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.db.models.deletion import ProtectedError
from django.utils import timezone

from .exceptions import HardDeleteRefusedError

__all__ = ["UUIDModel", "BaseModel", "HardDeleteRefusedError"]


def _hard_delete(model: type[models.Model], delete: Any) -> tuple[int, dict[str, int]]:
    try:
        return delete()
    except HardDeleteRefusedError:
        raise
    except ProtectedError as exc:
        raise HardDeleteRefusedError(model, exc) from exc


class UUIDModel(models.Model):
    """Abstract model with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)

    class Meta:
        abstract = True


class SoftDeleteQuerySet(models.QuerySet):
    """A queryset whose ``delete()`` soft-deletes; ``hard_delete()`` removes rows."""

    def delete(self) -> tuple[int, dict[str, int]]:  # type: ignore[override]
        count = self.update(deleted_at=timezone.now(), updated_at=timezone.now())
        return count, {self.model._meta.label: count}

    delete.alters_data = True  # type: ignore[attr-defined]

    def hard_delete(self) -> tuple[int, dict[str, int]]:
        """Delete the rows for real; ``HardDeleteRefusedError`` (nothing deleted) while rows
        still point at them through ``PROTECT`` foreign keys."""
        return _hard_delete(self.model, super().delete)

    hard_delete.alters_data = True  # type: ignore[attr-defined]


class SoftDeleteManager(models.Manager.from_queryset(SoftDeleteQuerySet)):  # type: ignore[misc]
    """Default manager: hides soft-deleted rows."""

    def get_queryset(self) -> SoftDeleteQuerySet:
        return super().get_queryset().filter(deleted_at__isnull=True)


class AllObjectsManager(models.Manager.from_queryset(SoftDeleteQuerySet)):  # type: ignore[misc]
    """Shows every row, soft-deleted ones included."""


class BaseModel(models.Model):
    """Abstract model with ``created_at``/``updated_at`` and soft delete."""

    created_at = models.DateTimeField(default=timezone.now, editable=False, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = SoftDeleteManager()
    all_objects = AllObjectsManager()

    class Meta:
        abstract = True

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None

    def delete(self, using: Any = None, keep_parents: bool = False) -> tuple[int, dict[str, int]]:
        """Soft delete: set ``deleted_at``; the row stays (and so does everything it owns)."""
        self.deleted_at = timezone.now()
        self.save(update_fields=["deleted_at", "updated_at"])
        return 1, {self._meta.label: 1}

    def hard_delete(
        self, using: Any = None, keep_parents: bool = False
    ) -> tuple[int, dict[str, int]]:
        """Really delete the row; ``HardDeleteRefusedError`` (nothing deleted) while rows still
        point at it through ``PROTECT`` foreign keys."""
        return _hard_delete(
            type(self),
            lambda: super(BaseModel, self).delete(using=using, keep_parents=keep_parents),
        )

    def restore(self) -> None:
        """Undo a soft delete."""
        self.deleted_at = None
        self.save(update_fields=["deleted_at", "updated_at"])
