"""Subjects: what happens to encounters when the object they are about is deleted.

An encounter's subject is a generic reference (content type and text id), so the database
cannot stop a subject row from going: without a guard, deleting a patient leaves its
encounters pointing at nothing (``encounter.subject`` is then ``None``; the audit reports them
as ``subject_missing``). The guard is registered for the app's subject models with
:func:`protect_subjects` (a call or a class decorator) or the setting
``ENCOUNTERS_SUBJECT_MODELS`` (connected when the app is ready):

* ``on_delete="refuse"`` (the default): a delete of subjects that encounters (not
  soft-deleted) are about raises :class:`~django_encounters.exceptions.SubjectProtectedError`
  (an ``EncounterError`` and Django's ``ProtectedError``) naming them, while Django's delete
  collector gathers what to delete — before anything is written or a transaction is opened, so
  nothing is deleted and a caller's transaction stays usable. Django's admin shows the
  encounters on its delete page as protected objects, as it does for a ``PROTECT`` foreign key.
* ``on_delete="soft_delete"``: a ``pre_delete`` receiver soft-deletes the subject's encounters
  (their logs are kept) inside the delete's transaction, and the subject goes; should the
  delete fail, the soft delete rolls back with it.

Both work for ``instance.delete()``, ``QuerySet.delete()``, a cascade from a parent row and
the admin. ``QuerySet._raw_delete()`` and SQL bypass them.

:class:`EncounterRelation` is the ``GenericRelation`` for a subject model (queries from the
subject, ``related_query_name``) that does not cascade a delete into the encounters, so the
guard decides; a plain ``GenericRelation`` hard-deletes fresh encounters and fails with
Django's raw ``ProtectedError`` on the others.

:func:`absent_subjects`: which of many subject references no longer exist, in one query (the
audit's ``subject_missing`` anomaly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.contrib.contenttypes.fields import GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.db.models import IntegerField, TextField, Value
from django.db.models.functions import Cast
from django.db.models.signals import pre_delete

from . import conf
from .conf import ON_DELETE_CHOICES, REFUSE, SOFT_DELETE
from .exceptions import EncounterConfigurationError, SubjectProtectedError

__all__ = [
    "ON_DELETE_CHOICES",
    "REFUSE",
    "SOFT_DELETE",
    "EncounterRelation",
    "absent_subjects",
    "protect_subjects",
    "protected_subjects",
    "unprotect_subjects",
]

_ENCOUNTER = "django_encounters.Encounter"
#: The name of the guard's (hidden) relation on a guarded model.
GUARD_NAME = "_encounters_subject_guard"
#: concrete subject model -> its ``on_delete``
_registry: dict[type[models.Model], str] = {}

M = TypeVar("M", bound=type[models.Model])


def protect_subjects(*subject_models: Any, on_delete: str = REFUSE) -> Any:
    """Guard the deletes of ``subject_models`` (model classes or ``"app_label.Model"``).

    ``protect_subjects(Patient)``, ``protect_subjects(Patient, Device,
    on_delete="soft_delete")``, or as a class decorator: ``@protect_subjects`` or
    ``@protect_subjects(on_delete="soft_delete")``. Registering a model again replaces its
    ``on_delete``. Returns the model when given one (so it decorates), a decorator when given
    none. What each ``on_delete`` does: see the module.

    Raises:
        EncounterConfigurationError: ``on_delete`` is not one of ``ON_DELETE_CHOICES``, a model
            is not a concrete model, or it declares a plain ``GenericRelation`` to encounters
            (which cascades into them before the guard is asked: use
            :class:`EncounterRelation`).
    """
    if on_delete not in ON_DELETE_CHOICES:
        raise EncounterConfigurationError(
            f"protect_subjects: on_delete must be one of {ON_DELETE_CHOICES}, not {on_delete!r}"
        )
    if not subject_models:

        def decorate(model: M) -> M:
            protect_subjects(model, on_delete=on_delete)
            return model

        return decorate
    for given in subject_models:
        model = _model_of(given)
        _refuse_cascading_relations(model)
        _registry[model] = on_delete
        if not any(f.name == GUARD_NAME for f in model._meta.private_fields):
            model.add_to_class(GUARD_NAME, _SubjectGuard())
        if on_delete == SOFT_DELETE:
            pre_delete.connect(_soft_delete, sender=model, dispatch_uid=_uid(model))
        else:
            pre_delete.disconnect(sender=model, dispatch_uid=_uid(model))
    return subject_models[0] if len(subject_models) == 1 else None


def unprotect_subjects(*subject_models: Any) -> None:
    """Remove the guard of ``subject_models`` (tests; a model no longer a subject)."""
    for given in subject_models:
        model = _model_of(given)
        _registry.pop(model, None)
        pre_delete.disconnect(sender=model, dispatch_uid=_uid(model))
        guards = [f for f in model._meta.private_fields if f.name == GUARD_NAME]
        for guard in guards:
            model._meta.private_fields.remove(guard)
        if guards:
            from django.apps import apps

            delattr(model, GUARD_NAME)
            apps.clear_cache()  # every model's field caches (the encounters' reverse ones too)


def protected_subjects() -> dict[type[models.Model], str]:
    """The guarded models and their ``on_delete``."""
    return dict(_registry)


def protect_configured_subjects() -> None:
    """Guard the models ``ENCOUNTERS_SUBJECT_MODELS`` names (called by the app's ``ready()``)."""
    for label, on_delete in conf.subject_models().items():
        protect_subjects(label, on_delete=on_delete)


def _uid(model: type[models.Model]) -> str:
    return f"django_encounters.subject_guard:{model._meta.label}"


def _model_of(given: Any) -> type[models.Model]:
    if isinstance(given, str):
        from django.apps import apps

        try:
            given = apps.get_model(given)
        except (LookupError, ValueError) as exc:
            raise EncounterConfigurationError(
                f"protect_subjects: {given!r} names no installed model ('app_label.Model'): {exc}"
            ) from exc
    if not (isinstance(given, type) and issubclass(given, models.Model)):
        raise EncounterConfigurationError(
            f"protect_subjects: {given!r} is not a model class (or 'app_label.Model')"
        )
    if given._meta.abstract:
        raise EncounterConfigurationError(
            f"protect_subjects: {given.__name__} is abstract; register the concrete models"
        )
    return given._meta.concrete_model or given


def _refuse_cascading_relations(model: type[models.Model]) -> None:
    for field in model._meta.private_fields:
        if not isinstance(field, GenericRelation) or isinstance(field, EncounterRelation):
            continue
        target = field.remote_field.model
        label = target if isinstance(target, str) else target._meta.label
        if label.lower() == _ENCOUNTER.lower():
            raise EncounterConfigurationError(
                f"{model._meta.label}.{field.name} is a GenericRelation to encounters: deleting "
                "a subject would hard-delete its fresh encounters and fail with Django's "
                "ProtectedError on the others before the subject guard is asked. Declare it as "
                "django_encounters.EncounterRelation(...) instead (the same queries, no "
                "cascade)"
            )


def _about(model: type[models.Model], pks: Iterable[Any], using: str) -> models.QuerySet:
    """The encounters (not soft-deleted) about the ``model`` instances ``pks``."""
    from .models import Encounter

    content_type = ContentType.objects.db_manager(using).get_for_model(model)
    return Encounter.objects.using(using).filter(
        subject_content_type=content_type, subject_id__in=[str(pk) for pk in pks]
    )


def _refuse(model: type[models.Model], objs: list[models.Model], using: str) -> None:
    """``SubjectProtectedError`` when encounters are about any of ``objs`` (one query, two
    when more encounters than the message names)."""
    about = _about(model, (obj.pk for obj in objs), using)
    shown = SubjectProtectedError.SHOWN
    first = list(about.select_related("definition").order_by("created_at", "pk")[: shown + 1])
    if not first:
        return
    count = len(first) if len(first) <= shown else about.count()
    held = {encounter.subject_id for encounter in first}
    subjects = [obj for obj in objs if str(obj.pk) in held] or objs
    raise SubjectProtectedError(model, subjects, first[:shown], count)


def _soft_delete(sender: Any, instance: models.Model, using: str, **kwargs: Any) -> None:
    """``pre_delete`` of a subject guarded with ``on_delete="soft_delete"``: inside the
    delete's transaction, one UPDATE."""
    model = type(instance)._meta.concrete_model or type(instance)
    if _registry.get(model) == SOFT_DELETE:
        _about(model, [instance.pk], using).delete()  # the soft delete: deleted_at set


class EncounterRelation(GenericRelation):
    """The ``GenericRelation`` from a subject model to its encounters, without the cascade.

    ``encounters = EncounterRelation(related_query_name="patient")`` on ``Patient`` gives
    ``patient.encounters.all()`` (soft-deleted ones hidden) and, with ``related_query_name``,
    ``Encounter.objects.filter(patient__name=…)``. Unlike a plain ``GenericRelation``, deleting
    the subject does not delete its encounters: the subject guard (:func:`protect_subjects`)
    decides what happens.
    """

    def __init__(self, to: Any = _ENCOUNTER, **kwargs: Any) -> None:
        kwargs.setdefault("object_id_field", "subject_id")
        kwargs.setdefault("content_type_field", "subject_content_type")
        super().__init__(to, **kwargs)

    def bulk_related_objects(self, objs: Any, using: str = "default") -> Any:
        """Nothing: Django's delete collector does not cascade into the encounters."""
        return []


class _SubjectGuard(EncounterRelation):
    """The hidden relation :func:`protect_subjects` adds to a guarded model: Django's delete
    collector asks it for the related objects of every batch of subjects it is about to
    delete (which also turns its fast path off), and it refuses there when the model's
    ``on_delete`` is ``"refuse"`` and encounters are about them."""

    def __init__(self) -> None:
        super().__init__(editable=False)

    def bulk_related_objects(self, objs: Any, using: str = "default") -> Any:
        objs = list(objs)
        if objs:
            model = type(objs[0])._meta.concrete_model
            if _registry.get(model) == REFUSE:  # type: ignore[arg-type]
                _refuse(model, objs, using)  # type: ignore[arg-type]
        return []


def absent_subjects(
    references: Iterable[tuple[Any, str]], using: str
) -> dict[tuple[Any, str], str]:
    """Which ``(content type id, subject id)`` references name no existing object, each with
    why: ``{reference: reason}``. One query for all of them (a ``UNION`` when they are of
    several models); none when ``references`` is empty. An object a manager hides (its own
    soft delete) still exists; an id its model's primary key cannot hold, or a model that is no
    longer installed, names nothing."""
    wanted: dict[Any, dict[str, Any]] = {}
    absent: dict[tuple[Any, str], str] = {}
    for content_type_id, subject_id in references:
        wanted.setdefault(content_type_id, {})[subject_id] = None
    queries = []
    keys: dict[Any, Callable[[Any], Any]] = {}
    for content_type_id, ids in wanted.items():
        content_type = ContentType.objects.db_manager(using).get_for_id(content_type_id)
        model = content_type.model_class()
        if model is None:
            for subject_id in ids:
                absent[(content_type_id, subject_id)] = (
                    f"its model {content_type.app_label}.{content_type.model} is not installed"
                )
            continue
        to_python = model._meta.pk.to_python
        for subject_id in ids:
            try:
                key = to_python(subject_id)
                if key is None:
                    raise ValueError(subject_id)
                ids[subject_id] = key
            except (DjangoValidationError, TypeError, ValueError):
                absent[(content_type_id, subject_id)] = (
                    f"{subject_id!r} is no {model._meta.label} primary key"
                )
        keys[content_type_id] = to_python
        if not any(key is not None for key in ids.values()):
            continue
        queries.append(
            model._base_manager.db_manager(using)
            .filter(pk__in=[key for key in ids.values() if key is not None])
            .annotate(
                _ct=Value(content_type_id, output_field=IntegerField()),
                _key=Cast("pk", output_field=TextField()),
            )
            .values_list("_ct", "_key")
            .order_by()
        )
    found: set[tuple[Any, Any]] = set()
    if queries:
        query = queries[0].union(*queries[1:], all=True) if len(queries) > 1 else queries[0]
        found = {(ct, keys[ct](key)) for ct, key in query}
    for content_type_id, ids in wanted.items():
        if content_type_id not in keys:
            continue
        label = ContentType.objects.db_manager(using).get_for_id(content_type_id)
        for subject_id, key in ids.items():
            if key is not None and (content_type_id, key) not in found:
                absent[(content_type_id, subject_id)] = (
                    f"no {label.app_label}.{label.model} has the primary key {subject_id!r}"
                )
    return absent
