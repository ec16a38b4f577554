"""Abstract base models shipped with the package.

``UUIDModel`` gives a UUID primary key; ``BaseModel`` gives timestamps and soft delete. They are
separate so that ``class X(UUIDModel, BaseModel)`` has a clean MRO. (PyPI's
``django-basemodels`` is an unrelated package and is not used.)
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from django.db import models
from django.db.models.base import ModelState
from django.db.models.deletion import ProtectedError
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init
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


#: ``__set__`` of the descriptors whose setting of a value on a freshly created instance (nothing
#: cached on it yet) is writing it into ``__dict__``: None (Django's ``DeferredAttribute`` has
#: no ``__set__``), a foreign key's (it drops a cached related object first, when there is
#: one), and those the package's models register (``ProjectedAttribute``).
PLAIN_SETTERS: set[Any] = {None, ForeignKeyDeferredAttribute.__set__}

#: Per model class: its concrete fields' attribute names when a loaded row can be set straight
#: into a new instance's ``__dict__`` (see :meth:`UUIDModel.from_db`), else None.
_PLAIN_ATTNAMES: dict[type, tuple[str, ...] | None] = {}


def _plain_attnames(cls: type[models.Model]) -> tuple[str, ...] | None:
    """The attribute names of ``cls``'s concrete fields, in ``Model.__init__``'s order, when
    every one's class attribute is a ``DeferredAttribute`` whose ``__set__`` is in
    ``PLAIN_SETTERS``; None otherwise (a custom descriptor: loaded the ORM's way)."""
    try:
        return _PLAIN_ATTNAMES[cls]
    except KeyError:
        pass
    names = tuple(f.attname for f in cls._meta.concrete_fields)
    plain = all(
        isinstance(descriptor := inspect.getattr_static(cls, name, None), DeferredAttribute)
        and getattr(type(descriptor), "__set__", None) in PLAIN_SETTERS
        for name in names
    )
    _PLAIN_ATTNAMES[cls] = names if plain else None
    return _PLAIN_ATTNAMES[cls]


class UUIDModel(models.Model):
    """Abstract model with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)

    class Meta:
        abstract = True

    @classmethod
    def from_db(cls, db: Any, field_names: Any, values: Any, **kwargs: Any) -> Any:
        """``Model.from_db``, without ``Model.__init__``'s per-field loop when nothing could tell
        the difference: a full row (no deferred field), no ``pre_init``/``post_init`` receiver
        for the model, plain field descriptors (``_plain_attnames``) and no other argument
        (Django 6's ``fetch_mode``). The instance is then the one ``Model.from_db`` builds —
        the same ``__dict__`` and ``_state`` — at a fraction of the cost (history and the write
        path's lock build several per call)."""
        names = _plain_attnames(cls)
        if (
            kwargs  # Django 6's fetch_mode, or anything newer: the ORM's way
            or names is None
            or len(values) != len(names)
            or pre_init.has_listeners(cls)
            or post_init.has_listeners(cls)
        ):
            return super().from_db(db, field_names, values, **kwargs)
        return _plain_instance(cls, names, values, db)

    @classmethod
    def loader(cls, db: Any, field_names: Sequence[str]) -> Callable[[Sequence[Any]], Any]:
        """``values -> cls.from_db(db, field_names, values)`` for many rows of the same columns,
        with ``from_db``'s questions asked once (``field_names``: every concrete field's
        attname, in order, for the fast way)."""
        names = _plain_attnames(cls)
        if (
            getattr(cls.from_db, "__func__", None) is not _FROM_DB
            or names is None
            or tuple(field_names) != names
            or pre_init.has_listeners(cls)
            or post_init.has_listeners(cls)
        ):
            return partial(cls.from_db, db, field_names)
        return partial(_plain_instance, cls, names, db=db)


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


def _plain_instance(cls: Any, names: tuple[str, ...], values: Sequence[Any], db: Any) -> Any:
    new = cls.__new__(cls)
    new.__dict__.update(zip(names, values, strict=True))
    state = new._state = ModelState()
    state.adding = False
    state.db = db
    return new


_FROM_DB = UUIDModel.from_db.__func__  # type: ignore[attr-defined]
