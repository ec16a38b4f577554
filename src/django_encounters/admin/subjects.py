"""Subjects in the encounter admin: searched by their own fields, named by their ``str()``.

A subject is any model (a generic foreign key with a text id). Its searchable fields are those of
``ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS`` when the setting names its model, else the
``search_fields`` of the model's own admin when it is registered in the same admin site. A
search asks each subject model once for the ids that match, then filters encounters by
(content type, subject id), which the encounters' index covers."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Q, QuerySet
from django.http import HttpRequest

from .. import conf
from ..models import Encounter


def search_fields_of(site: admin.AdminSite, model: Any) -> list[str]:
    """The fields a subject model is searched by ([] when none are known)."""
    configured = conf.admin_subject_search_fields().get(model)
    if configured:
        return list(configured)
    model_admin = site._registry.get(model)
    return list(getattr(model_admin, "search_fields", None) or [])


def _searcher(site: admin.AdminSite, model: Any) -> admin.ModelAdmin | None:
    """The model admin whose ``get_search_results`` searches ``model``: its own when it is
    registered and not overridden by the setting, else one made for the setting's fields."""
    configured = conf.admin_subject_search_fields().get(model)
    registered = site._registry.get(model)
    if not configured and registered is not None and registered.search_fields:
        return registered
    if not configured:
        return None
    searcher = type(
        f"{model.__name__}SubjectSearch", (admin.ModelAdmin,), {"search_fields": configured}
    )
    return searcher(model, site)


def matching_subjects(
    request: HttpRequest, site: admin.AdminSite, model: Any, term: str
) -> QuerySet | None:
    """The subjects of ``model`` whose search fields match ``term`` (None: not searchable)."""
    searcher = _searcher(site, model)
    if searcher is None:
        return None
    queryset, _ = searcher.get_search_results(request, model._default_manager.all(), term)
    return queryset


def subject_ids(
    request: HttpRequest, site: admin.AdminSite, content_type_id: int, term: str
) -> list[str] | None:
    """The ids (as encounters store them, text) of the subjects of one content type that match
    ``term``, in one query; None when the type is not searchable by its fields."""
    model = ContentType.objects.get_for_id(content_type_id).model_class()
    if model is None:
        return None
    found = matching_subjects(request, site, model, term)
    if found is None:
        return None
    return [str(pk) for pk in found.order_by().values_list("pk", flat=True).distinct()]


def subject_types(request: HttpRequest) -> list[int]:
    """The content types encounters have subjects of (one query, kept for the request)."""
    cached = getattr(request, "_encounter_subject_types", None)
    if cached is None:
        cached = sorted(
            Encounter.all_objects.order_by()
            .values_list("subject_content_type_id", flat=True)
            .distinct()
        )
        request._encounter_subject_types = cached  # type: ignore[attr-defined]
    return cached


def subject_match(request: HttpRequest, site: admin.AdminSite, term: str) -> Q:
    """Encounters whose subject's own fields match ``term`` (Q(pk__in=[]) when none do)."""
    found = Q(pk__in=[])
    for content_type_id in subject_types(request):
        ids = subject_ids(request, site, content_type_id, term)
        if ids:
            found |= Q(subject_content_type_id=content_type_id, subject_id__in=ids)
    return found


def subject_of(encounter: Encounter) -> Any:
    """The encounter's subject (prefetched on lists), or None when it is gone or its id does
    not fit its model's key."""
    try:
        return encounter.subject
    except (ValueError, DjangoValidationError):
        return None


def subject_name(encounter: Encounter) -> str:
    """The subject as a person names it: its ``str()``; "missing patient #3" when gone."""
    subject = subject_of(encounter)
    if subject is not None:
        return str(subject)
    return f"missing {encounter.subject_content_type.name} #{encounter.subject_id}"


def encounter_title(encounter: Encounter) -> str:
    """ "Patient Visit for Ada Okafor": the definition and the subject."""
    return f"{encounter.definition.name} for {subject_name(encounter)}"
