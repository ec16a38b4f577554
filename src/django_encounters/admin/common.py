"""What every admin page of django-encounters shares: read-only and soft-delete admins, times,
subjects and diagrams."""

from __future__ import annotations

import base64
from datetime import datetime
from functools import lru_cache
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.admin.templatetags.admin_urls import add_preserved_filters
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.widgets import AdminSplitDateTime
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Max, Min, Q, QuerySet
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from .. import conf
from ..engine.graphs import Graph
from ..exceptions import EncounterConfigurationError
from ..models import Encounter
from ..projections.diagrams import (
    GraphvizError,
    GraphvizNotFoundError,
    graphviz_program,
    render,
    render_svg,
)
from ..projections.output import in_zone


class ReadOnlyMixin:
    """Facts: shown, never added, changed or deleted from the admin."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


def short_id(pk: Any) -> str:
    """The first 8 hex digits of a UUID: enough to tell encounters apart on a page."""
    return str(pk)[:8]


def local_time(value: datetime | None) -> str:
    """``value`` in the admin's time zone, to the second, with the zone's abbreviation:
    ``2024-03-31 23:59:59 AEST`` ("" for None). (``strftime("%Y")`` would write year 1 as
    "1" on some platforms.)"""
    if value is None:
        return ""
    local = in_zone(value)
    return f"{local.replace(tzinfo=None).isoformat(' ', 'seconds')} {local.tzname()}"


def two_line_time(value: datetime | None, *, seconds: bool = True) -> Any:
    """:func:`local_time` as a date over the time and zone (a narrow list column; without
    ``seconds``, to the minute); "-" for None."""
    if value is None:
        return "-"
    day, _, rest = local_time(value).partition(" ")
    if not seconds:
        clock, _, zone = rest.partition(" ")
        rest = f"{clock[:5]} {zone}".strip()
    return format_html(
        '<span class="nowrap">{}</span><br><span class="nowrap">{}</span>', day, rest
    )


class LabelledSplitDateTime(AdminSplitDateTime):
    """The admin's date and time boxes, each named for assistive technology ("Scheduled at:
    date"): Django's label points at neither box of a split widget (axe-core: label)."""

    def __init__(self, label: str, attrs: Any = None) -> None:
        super().__init__(attrs)
        self.widgets[0].attrs["aria-label"] = f"{label}: date"
        self.widgets[1].attrs["aria-label"] = f"{label}: time"


class ZoneSafeDateHierarchyMixin:
    """Django's date hierarchy turns the first and last times of its field into the current
    time zone: a stored time that zone cannot express (year 1 west of UTC, the end of year 9999
    east of it) would fail the whole list. The hierarchy is left out of such a list instead."""

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)  # type: ignore[misc]
        name = changelist.date_hierarchy
        # Drilled down to a year, month or day, the list holds only times of that period.
        if name and not any(key.startswith(f"{name}__") for key in changelist.params):
            bounds = changelist.queryset.aggregate(first=Min(name), last=Max(name))
            if not all(_expressible(value) for value in bounds.values()):
                changelist.date_hierarchy = None
        return changelist


def _expressible(value: datetime | None) -> bool:
    """Whether the current time zone can express ``value``."""
    if value is None or timezone.is_naive(value):
        return True
    try:
        timezone.localtime(value)
    except OverflowError:
        return False
    return True


def subject_html(
    site: admin.AdminSite, content_type_id: Any, subject_id: Any, label: Any = None
) -> Any:
    """The subject as a link to its admin page when its model is registered, else as text;
    ``label`` defaults to "<model> #<id>" (no query for the subject itself)."""
    content_type = ContentType.objects.get_for_id(content_type_id)
    model = content_type.model_class()
    if label is None:
        label = f"{content_type.name} #{subject_id}"
    if model is not None and site.is_registered(model):
        url = reverse(
            f"{site.name}:{content_type.app_label}_{content_type.model}_change",
            args=[quote(subject_id)],
        )
        return format_html('<a href="{}">{}</a>', url, label)
    return label


# ---------------------------------------------------------------------------------------------
# Subjects: searched by their own fields, named by their str()
# ---------------------------------------------------------------------------------------------
#
# A subject is any model (a generic foreign key with a text id). Its searchable fields are
# those ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS gives its model, else the search_fields of the
# model's own admin when it is registered in the same admin site. A search asks each subject
# model once for the ids that match, then filters encounters by (content type, subject id),
# which the encounters' index covers.


def configured_subject_search() -> dict[Any, list[str]]:
    """``ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS`` as ``model class -> search fields``, checked:
    every key names an installed model, every entry a field path of it (as
    ``ModelAdmin.search_fields`` writes one).

    Raises:
        EncounterConfigurationError: naming the setting, the key and what is wrong.
    """
    from django.apps import apps

    name = "ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS"
    found: dict[Any, list[str]] = {}
    for label, fields in conf.admin_subject_search_fields().items():
        try:
            model = apps.get_model(label)
        except (LookupError, ValueError):
            raise EncounterConfigurationError(
                f"{name}: {label!r} is not an installed model ('app_label.model', e.g. "
                "'clinic.patient')"
            ) from None
        for entry in fields:
            opts = model._meta
            try:
                for part in entry.lstrip("^=@").split(LOOKUP_SEP):
                    field = opts.get_field(part)
                    if field.is_relation and field.related_model is not None:
                        opts = field.related_model._meta
            except FieldDoesNotExist:
                raise EncounterConfigurationError(
                    f"{name}[{label!r}]: {entry!r} does not name a field of "
                    f"{model._meta.label} (write it as in ModelAdmin.search_fields)"
                ) from None
        found[model] = fields
    return found


def search_fields_of(site: admin.AdminSite, model: Any) -> list[str]:
    """The fields a subject model is searched by ([] when none are known)."""
    configured = configured_subject_search().get(model)
    if configured:
        return list(configured)
    model_admin = site._registry.get(model)
    return list(getattr(model_admin, "search_fields", None) or [])


def _searcher(site: admin.AdminSite, model: Any) -> admin.ModelAdmin | None:
    """The model admin whose ``get_search_results`` searches ``model``: its own when it is
    registered and not overridden by the setting, else one made for the setting's fields."""
    configured = configured_subject_search().get(model)
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


#: How a diagram's image is shown: Graphviz draws black on transparent, so it gets a white
#: ground of its own, readable in the admin's dark mode (``prefers-color-scheme: dark``) too.
DIAGRAM_STYLE = (
    "max-width: 100%; background: #fff; color-scheme: light; padding: 8px; border-radius: 4px"
)


@lru_cache(maxsize=64)
def _svg(program: str, dot_source: str) -> str:
    """``dot_source`` laid out by Graphviz (``program``, the ``dot`` found on ``PATH``: part
    of the key, so a server without it never shows a remembered picture), remembered: a page
    opened again (a definition's machine changes only with a new version) does not run
    ``dot`` again."""
    return render_svg(dot_source)


def diagram_html(graph: Graph, element_id: str) -> Any:
    """``graph`` as a picture: an SVG laid out by Graphviz, shown as an image (so nothing in it
    runs on the page) on a white ground (:data:`DIAGRAM_STYLE`, readable in dark mode too);
    without Graphviz, its Mermaid source with a copy button."""
    try:
        svg = _svg(graphviz_program(), render(graph, "dot"))
    except (GraphvizNotFoundError, GraphvizError) as exc:
        return format_html(
            '<div class="encounter-diagram" id="{}"><p>{} {}</p><pre id="{}-source">{}</pre>'
            '<button type="button" class="button" id="{}-copy" onclick="navigator.clipboard'
            ".writeText(document.getElementById('{}-source').textContent)\">Copy the Mermaid"
            " source</button></div>",
            element_id,
            exc,
            "Here is its Mermaid source instead (mermaid.live, GitHub and most Markdown sites "
            "draw it).",
            element_id,
            render(graph, "mermaid"),
            element_id,
            element_id,
        )
    image = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return format_html(
        '<div class="encounter-diagram" id="{}"><img src="data:image/svg+xml;base64,{}" '
        'alt="{}" style="{}"><p class="help">{}</p></div>',
        element_id,
        image,
        graph.summary,
        DIAGRAM_STYLE,
        graph.summary,
    )


# ---------------------------------------------------------------------------------------------
# Soft delete, the same for definitions and encounters
# ---------------------------------------------------------------------------------------------


class DeletedFilter(admin.SimpleListFilter):
    """Soft-deleted rows are hidden unless asked for."""

    title = "deleted"
    parameter_name = "deleted"
    CHOICES = ((None, "Not deleted"), ("yes", "Deleted"), ("all", "All"))

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return [(value, label) for value, label in self.CHOICES if value is not None]

    def choices(self, changelist: Any) -> Any:
        for value, label in self.CHOICES:
            yield {
                "selected": self.value() == value,
                "query_string": changelist.get_query_string(
                    {self.parameter_name: value} if value else {}, [self.parameter_name]
                ),
                "display": label,
            }

    def queryset(self, request: Any, queryset: QuerySet) -> QuerySet:
        if self.value() == "yes":
            return queryset.filter(deleted_at__isnull=False)
        if self.value() == "all":
            return queryset
        return queryset.filter(deleted_at__isnull=True)


class SoftDeleteAdmin(admin.ModelAdmin):
    """ "Delete" is the model's soft delete, said so on honest confirmation pages (Django's own
    would list the rows a *hard* delete would take with it, or refuse over ``PROTECT`` foreign
    keys); soft-deleted rows stay reachable (a filter, their own page) and can be restored (an
    action and a button). Subclasses name their objects (``_label``) and say what a soft delete
    of one means (``soft_delete_effects``)."""

    actions = ["delete_selected", "restore_selected"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        """Every row, soft-deleted ones included (the list hides them by default, see
        :class:`DeletedFilter`), so that a link to a deleted one still opens it."""
        queryset = self.model.all_objects.get_queryset()  # type: ignore[attr-defined]
        ordering = self.get_ordering(request)
        return queryset.order_by(*ordering) if ordering else queryset

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None and obj.is_deleted:
            return False
        return super().has_delete_permission(request, obj)

    @admin.display(description="deleted", ordering="deleted_at")
    def deleted(self, obj: Any) -> Any:
        return two_line_time(obj.deleted_at) if obj.deleted_at is not None else ""

    def _label(self, obj: Any) -> str:
        raise NotImplementedError

    def soft_delete_effects(self, objs: list[Any]) -> list[str]:
        """What soft-deleting ``objs`` does and does not do, one sentence each."""
        raise NotImplementedError

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        """A soft delete removes nothing: only the objects themselves are listed, and no
        permission on what they own (which is kept) is needed."""
        return [str(self._label(obj)) for obj in objs], {}, set(), []

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        obj.delete()

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for obj in queryset:
            obj.delete()

    def delete_view(self, request: Any, object_id: str, extra_context: Any = None) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is not None:
            extra_context = {
                **(extra_context or {}),
                "object_label": self._label(obj),
                "soft_delete_effects": self.soft_delete_effects([obj]),
            }
        return super().delete_view(request, object_id, extra_context)

    @admin.action(description="Delete selected %(verbose_name_plural)s", permissions=["delete"])
    def delete_selected(self, request: HttpRequest, queryset: QuerySet) -> Any:
        """Django's bulk delete, with this admin's confirmation page saying what a soft delete
        of the selection does."""
        from django.contrib.admin.actions import delete_selected

        response = delete_selected(self, request, queryset)
        if isinstance(response, TemplateResponse) and response.context_data is not None:
            response.context_data["soft_delete_effects"] = self.soft_delete_effects(list(queryset))
        return response

    def response_delete(self, request: HttpRequest, obj_display: str, obj_id: Any) -> Any:
        if IS_POPUP_VAR in request.POST:
            return super().response_delete(request, obj_display, obj_id)
        noun = self.opts.verbose_name
        self.message_user(
            request,
            f"The {noun} {self._deleted_label(obj_id, obj_display)} was soft-deleted: it is "
            f"hidden from the list and can be restored (filter 'deleted' → 'Deleted', then the "
            "'Restore' action, or the button on its page).",
            messages.SUCCESS,
        )
        url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist")
        preserved: dict[str, Any] = {
            "preserved_filters": self.get_preserved_filters(request),
            "opts": self.opts,
        }
        return HttpResponseRedirect(add_preserved_filters(preserved, url))

    def _deleted_label(self, obj_id: Any, obj_display: str) -> str:
        return obj_display

    @admin.action(
        description="Restore selected soft-deleted %(verbose_name_plural)s", permissions=["change"]
    )
    def restore_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        restored = 0
        for obj in queryset:
            if obj.is_deleted:
                obj.restore()
                self.log_change(request, obj, "Restored (soft delete undone).")
                restored += 1
        messages.success(request, f"Restored {restored} {self.opts.verbose_name}(s).")

    def restore_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._missing(request, object_id)
        if request.method != "POST" or not self.has_change_permission(request, obj):
            raise PermissionDenied
        if obj.is_deleted:
            obj.restore()
            self.log_change(request, obj, "Restored (soft delete undone).")
            messages.success(
                request, f"The {self.opts.verbose_name} {self._label(obj)} was restored."
            )
        return HttpResponseRedirect(self._change_url(obj))

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/restore/",
                self.admin_site.admin_view(self.restore_view),
                name="{}_{}_restore".format(*info),
            ),
            *super().get_urls(),
        ]

    def _restore_url(self, obj: Any) -> str:
        info = self.opts.app_label, self.opts.model_name
        return reverse("admin:{}_{}_restore".format(*info), args=[quote(obj.pk)])

    def _missing(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """As Django's change page does for an id that names nothing: say so, go home."""
        messages.warning(
            request,
            f"{self.opts.verbose_name} with ID “{object_id}” doesn’t exist. Perhaps it was "
            "deleted?",
        )
        return HttpResponseRedirect(reverse("admin:index", current_app=self.admin_site.name))

    def _change_url(self, obj: Any) -> str:
        info = self.opts.app_label, self.opts.model_name
        return reverse("admin:{}_{}_change".format(*info), args=[quote(obj.pk)])
