"""Admin: encounters are created with ``create_encounter()`` and moved on with ``transition()``
(one button per allowed next state, refused on a stale page); their timeline is shown in
business-time order with the audit's backdated/overtaken marks; delete is a soft delete with a
restore. Definitions are editable (with their structural warnings and every version of their
machine shown); the transition log, definition versions and anomaly acknowledgements are
read-only facts."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.admin.templatetags.admin_urls import add_preserved_filters
from django.contrib.admin.utils import quote, unquote
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Count, Max, Min, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from .engine import READABLE_FIELDS
from .engine.graphs import Graph
from .exceptions import ConcurrentTransitionError, DatabaseLockedError, EncounterError
from .models import (
    MACHINE_FIELDS,
    TRANSITION_PERMISSION,
    AnomalyAcknowledgement,
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from .projections.audit import encounter_timeline as audited_timeline
from .projections.diagrams import (
    GraphvizError,
    GraphvizNotFoundError,
    definition_diagram,
    process_map,
    render,
)
from .projections.output import in_zone
from .services import create_encounter, get_state_at, transition


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


def diagram_html(graph: Graph, element_id: str) -> Any:
    """``graph`` as a picture: an SVG laid out by Graphviz, shown as an image (so nothing in it
    runs on the page); without Graphviz, its Mermaid source with a copy button."""
    try:
        svg = render(graph, "svg")
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
        'alt="{}" style="max-width: 100%"><p class="help">{}</p></div>',
        element_id,
        image,
        graph.summary,
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
    def deleted(self, obj: Any) -> str:
        return local_time(obj.deleted_at)

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


# ---------------------------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------------------------


class VersionInline(ReadOnlyMixin, admin.TabularInline):
    model = EncounterDefinitionVersion
    fields = ("number", *MACHINE_FIELDS, "created_at")
    readonly_fields = fields
    ordering = ("-number",)
    extra = 0


class DefinitionForm(forms.ModelForm):
    class Meta:
        model = EncounterDefinition
        fields = "__all__"
        widgets = {
            name: forms.Textarea(attrs={"rows": 3, "cols": 80, "style": "font-family: monospace"})
            for name in ("states", "final_states", "transitions", "validators", "metadata")
        }
        help_texts = {
            "states": 'JSON list, e.g. ["scheduled", "checked_in", "completed"]',
            "final_states": 'JSON list, e.g. ["completed"]',
            "transitions": 'JSON object: state -> next states, e.g. {"scheduled": ["checked_in"]}',
            "validators": 'JSON list of dotted paths or {"path": ..., "params": {...}}',
        }


@admin.register(EncounterDefinition)
class EncounterDefinitionAdmin(SoftDeleteAdmin):
    form = DefinitionForm
    list_display = (
        "name",
        "code",
        "version",
        "initial_state",
        "encounter_count",
        "created_at",
        "deleted",
    )
    list_filter = (DeletedFilter,)
    search_fields = ("name", "code")
    readonly_fields = (
        "version",
        "machine_summary",
        "encounter_count",
        "machine_diagram",
        "process_map_diagram",
        "deleted_at",
    )
    inlines = [VersionInline]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        shown_apart = {"machine_summary", "machine_diagram", "process_map_diagram"}
        fields = [name for name in self.get_fields(request, obj) if name not in shown_apart]
        if obj is None:
            return [(None, {"fields": fields})]
        return [
            (None, {"fields": fields}),
            ("Machine", {"fields": ["machine_summary", "machine_diagram"]}),
            (
                "Process map (mined from the transition log)",
                {
                    "fields": ["process_map_diagram"],
                    "description": "What the encounters of this definition really did: each "
                    "edge with how often it was taken and the median time spent in its source "
                    "state before it; edges the machine allows but nobody took are dashed, "
                    "edges it does not allow red. Reads every transition of this definition's "
                    "encounters; for a period use manage.py encounter_graph --from-log "
                    "--since/--until.",
                },
            ),
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(
                live_encounters=Count("encounters", filter=Q(encounters__deleted_at__isnull=True))
            )
        )

    @admin.display(description="encounters", ordering="live_encounters")
    def encounter_count(self, obj: EncounterDefinition) -> Any:
        count = getattr(obj, "live_encounters", None)
        if count is None:
            count = obj.encounters.count() if obj.pk else 0
        url = reverse("admin:django_encounters_encounter_changelist")
        return format_html('<a href="{}?definition__id__exact={}">{}</a>', url, obj.pk, count)

    @admin.display(description="diagram")
    def machine_diagram(self, obj: EncounterDefinition) -> Any:
        if not obj.pk:
            return "-"
        return diagram_html(definition_diagram(obj.code), "definition-diagram")

    @admin.display(description="process map")
    def process_map_diagram(self, obj: EncounterDefinition) -> Any:
        if not obj.pk:
            return "-"
        return diagram_html(process_map(obj.code), "process-map")

    def _label(self, obj: EncounterDefinition) -> str:
        return f"{obj.name} ({obj.code})"

    def soft_delete_effects(self, objs: list[Any]) -> list[str]:
        live = Encounter.objects.filter(definition__in=[obj.pk for obj in objs]).count()
        return [
            "Hidden from the definition list; no new encounter can be created with it.",
            f"Nothing is removed: its versions are kept, and its {live} encounter(s) keep their "
            "history, stay listed and can still move on under the version they are pinned to.",
        ]

    @admin.display(description="machine")
    def machine_summary(self, obj: EncounterDefinition) -> Any:
        """The latest machine as a table: each state, whether it is initial or final, and where
        it may go next."""
        if not obj.pk:
            return "-"
        rows = []
        for state in obj.states or []:
            marks = []
            if state == obj.initial_state:
                marks.append("initial")
            if state in (obj.final_states or []):
                marks.append("final")
            targets = ", ".join((obj.transitions or {}).get(state, [])) or "—"
            rows.append((state, " ".join(marks), targets))
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows)
        return format_html(
            "<table><thead><tr><th>state</th><th></th><th>next states</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            body,
        )

    def change_view(
        self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        definition = self.get_object(request, unquote(object_id))
        if definition is not None:
            extra_context = {**(extra_context or {}), "restore_url": self._restore_url(definition)}
            if request.method == "GET":
                for warning in definition.get_warnings():
                    messages.warning(request, warning)
        return super().change_view(request, object_id, form_url, extra_context)


# ---------------------------------------------------------------------------------------------
# Encounters: forms
# ---------------------------------------------------------------------------------------------


class EncounterForm(forms.ModelForm):
    """The encounter's editable fields; the subject must exist."""

    class Meta:
        model = Encounter
        fields = "__all__"
        help_texts = {
            "definition": "Can change only while no transition is recorded; the encounter then "
            "starts over in that definition's initial state.",
            "subject_id": "The primary key of the subject (an object of the content type).",
        }

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        content_type = cleaned.get("subject_content_type")
        subject_id = cleaned.get("subject_id")
        if content_type is not None and subject_id not in (None, ""):
            model = content_type.model_class()
            subject = None
            if model is not None:
                try:
                    subject = model._default_manager.get(pk=subject_id)
                except (ObjectDoesNotExist, ValueError, DjangoValidationError):
                    subject = None
            if subject is None:
                self.add_error(
                    "subject_id", f"There is no {content_type.name} with id {subject_id!r}."
                )
            cleaned["subject"] = subject
        return cleaned


class TransitionForm(forms.Form):
    """What a person adds to a transition: why, when (for a backdated entry) and the context
    the validators read. The target state and the version the page showed are carried along."""

    to_state = forms.CharField(widget=forms.HiddenInput)
    expected_version = forms.IntegerField(min_value=0, widget=forms.HiddenInput)
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3, "cols": 60}))
    effective_at = forms.DateTimeField(
        required=False,
        help_text="Leave empty for now. A time before the timeline's last row records a "
        "backdated entry. YYYY-MM-DD HH:MM:SS in the admin's time zone, or ISO 8601 with an "
        "offset.",
    )
    context = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60, "style": "font-family: monospace"}),
        help_text='A JSON object passed to the validators, e.g. {"consent": true}.',
    )

    def __init__(self, *args: Any, needs_context: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["effective_at"].label = f"Effective at ({timezone.get_current_timezone_name()})"
        if not needs_context:
            del self.fields["context"]

    def clean_effective_at(self) -> datetime | None:
        value = self.cleaned_data.get("effective_at")
        if value is not None and timezone.is_naive(value):  # USE_TZ off: not supported
            raise forms.ValidationError("Give a time with a time zone.")
        return value

    def clean_context(self) -> dict | None:
        text = self.cleaned_data.get("context", "").strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise forms.ValidationError(f"Context is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise forms.ValidationError(
                f"Context must be a JSON object ({{...}}), not {type(value).__name__}."
            )
        return value


class StateAtForm(forms.Form):
    """The "state at …" box of the encounter page (a GET form)."""

    state_at = forms.DateTimeField(label="State at")
    known_at = forms.DateTimeField(label="as known at", required=False)


# ---------------------------------------------------------------------------------------------
# Encounters: list filters
# ---------------------------------------------------------------------------------------------


class DefinitionStateFilter(admin.SimpleListFilter):
    """One state filter per definition (states of every version of it, in order)."""

    title = "state"
    parameter_name = "state_of"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        found: dict[tuple[Any, str], str] = {}
        versions = (
            EncounterDefinitionVersion.objects.filter(definition__deleted_at__isnull=True)
            .order_by("definition__name", "number")
            .values_list("definition_id", "definition__name", "states")
        )
        for definition_id, name, states in versions:
            for state in states or []:
                found.setdefault((definition_id, state), f"{name}: {state}")
        return [(f"{pk}:{state}", label) for (pk, state), label in found.items()]

    def queryset(self, request: Any, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        pk, _, state = value.partition(":")
        try:
            definition_id = UUID(pk)
        except ValueError:
            return queryset.none()
        return queryset.filter(definition_id=definition_id, state=state)


# ---------------------------------------------------------------------------------------------
# Encounters: the timeline shown on the page and in "History"
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineRow:
    sequence: int
    from_state: str
    to_state: str
    effective_at: str
    transitioned_at: str
    transitioned_by: str
    reason: str
    context: str
    backdated: bool
    overtaken: bool
    overtaken_by: int | None


def encounter_timeline(encounter: Encounter) -> tuple[list[TimelineRow], list[str]]:
    """The encounter's rows as the page shows them (:func:`~.projections.audit.
    encounter_timeline`: business-time order, the audit's marks, each row's context) and the
    anomalies the audit finds in its stream (a damaged log is shown, never hidden)."""
    audit = audited_timeline(encounter)
    rows = [
        TimelineRow(
            sequence=row.sequence,
            from_state=row.from_state,
            to_state=row.to_state,
            effective_at=local_time(row.effective_at),
            transitioned_at=local_time(row.transitioned_at),
            transitioned_by=row.who or "",
            reason=row.reason,
            context=json.dumps(row.context, sort_keys=True) if row.context else "",
            backdated=row.backdated,
            overtaken=row.overtaken,
            overtaken_by=row.overtaken_by,
        )
        for row in audit.timeline
    ]
    anomalies = [
        f"sequence {a.sequence}: {a.kind}: {a.detail}"
        + (" (acknowledged)" if audit.acknowledgement(a) is not None else "")
        for a in audit.anomalies
    ]
    return rows, anomalies


# ---------------------------------------------------------------------------------------------
# Encounters
# ---------------------------------------------------------------------------------------------

#: What ``create_encounter()`` takes from the add form.
ADD_FIELDS = (
    "definition",
    "subject_content_type",
    "subject_id",
    "scheduled_at",
    "assigned_to",
    "notes",
    "metadata",
)
#: An encounter's creation facts that may not change once it has history.
FACT_FIELDS = ("definition", "subject_content_type", "subject_id")


#: The projection's times, shown by :func:`local_time` (Django's display of a time its zone
#: cannot express fails the page).
_DERIVED_TIMES = {"timeline_end_at": "timeline_end", "last_transitioned_at": "last_transitioned"}
_DERIVED_SHOWN = tuple(_DERIVED_TIMES.get(name, name) for name in Encounter.LOG_DERIVED_FIELDS)


@admin.register(Encounter)
class EncounterAdmin(ZoneSafeDateHierarchyMixin, SoftDeleteAdmin):
    form = EncounterForm
    list_display = (
        "short_id",
        "subject_link",
        "definition",
        "state",
        "version",
        "scheduled_at",
        "created_at",
        "deleted",
    )
    list_display_links = ("short_id",)
    list_filter = (DeletedFilter, DefinitionStateFilter, "definition")
    list_select_related = ("definition", "subject_content_type")
    search_fields = ("=subject_id", "notes", "transitions__reason")
    search_help_text = "Search by subject id (exact), notes or a transition's reason."
    date_hierarchy = "created_at"
    readonly_fields = ("subject_link", *_DERIVED_SHOWN, "deleted_at")

    # -- queryset and permissions -----------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).prefetch_related("subject")

    def has_transition_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(TRANSITION_PERMISSION) and self.has_change_permission(
            request, obj
        )

    # -- columns ----------------------------------------------------------------------------

    @admin.display(description="encounter", ordering="id")
    def short_id(self, obj: Encounter) -> str:
        return short_id(obj.pk)

    @admin.display(description="timeline end at")
    def timeline_end(self, obj: Encounter) -> str:
        return local_time(obj.timeline_end_at)

    @admin.display(description="last transitioned at")
    def last_transitioned(self, obj: Encounter) -> str:
        return local_time(obj.last_transitioned_at)

    @admin.display(description="subject")
    def subject_link(self, obj: Encounter) -> Any:
        if not obj.pk:
            return "-"
        try:
            subject = obj.subject
        except (ValueError, DjangoValidationError):  # an id its model's key cannot hold
            subject = None
        label = (
            f"{subject} (#{obj.subject_id})"
            if subject is not None
            else f"missing {obj.subject_content_type.name} #{obj.subject_id}"
        )
        return subject_html(self.admin_site, obj.subject_content_type_id, obj.subject_id, label)

    # -- forms ------------------------------------------------------------------------------

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return [(None, {"fields": ADD_FIELDS})]
        return [
            (
                None,
                {
                    "fields": (
                        "subject_link",
                        *FACT_FIELDS,
                        "assigned_to",
                        "scheduled_at",
                        "started_at",
                        "ended_at",
                        "notes",
                    )
                },
            ),
            ("Record", {"fields": ("created_by", "metadata", "deleted_at")}),
            (
                "Projection and genesis (derived from the transition log)",
                {"fields": _DERIVED_SHOWN, "classes": ("collapse",)},
            ),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return ()
        fields = list(super().get_readonly_fields(request, obj))
        if obj.version > 0 or obj.transitions.exists():
            fields += FACT_FIELDS  # its log is decided and hashed under them
        return fields

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        data = form.cleaned_data
        created = create_encounter(
            data["definition"],
            data["subject"],
            created_by=request.user,
            assigned_to=data.get("assigned_to"),
            scheduled_at=data.get("scheduled_at"),
            notes=data.get("notes") or "",
            metadata=data.get("metadata") or None,
        )
        # The admin goes on with the form's instance (its log entry, the redirect): make it
        # the encounter create_encounter() made.
        obj.__dict__.update(created.__dict__)

    # -- soft delete -------------------------------------------------------------------------

    def soft_delete_effects(self, objs: list[Any]) -> list[str]:
        rows = sum(obj.version for obj in objs)
        return [
            "Hidden from the encounter list; it can no longer move on.",
            f"Nothing is removed: the {rows} transition(s) of its log — the append-only history "
            "— are kept and still audited.",
        ]

    def _deleted_label(self, obj_id: Any, obj_display: str) -> str:
        return f"{short_id(obj_id)} ({obj_display})"

    # -- the encounter page -----------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/transition/",
                self.admin_site.admin_view(self.transition_view),
                name="{}_{}_transition".format(*info),
            ),
            *super().get_urls(),
        ]

    def change_view(
        self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is not None:
            extra_context = {**(extra_context or {}), **self._page_context(request, obj)}
        return super().change_view(request, object_id, form_url, extra_context)

    def history_view(self, request: Any, object_id: str, extra_context: Any = None) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is not None and self.has_view_or_change_permission(request, obj):
            timeline, anomalies = encounter_timeline(obj)
            extra_context = {
                **(extra_context or {}),
                "timeline": timeline,
                "anomalies": anomalies,
                "encounter_label": self._label(obj),
            }
        return super().history_view(request, object_id, extra_context)

    def _page_context(self, request: HttpRequest, obj: Encounter) -> dict[str, Any]:
        """The status panel (state, definition version, transition buttons), the timeline and
        the "state at" box."""
        can_transition = not obj.is_deleted and self.has_transition_permission(request, obj)
        buttons = []
        if can_transition:
            url = reverse("admin:django_encounters_encounter_transition", args=[quote(obj.pk)])
            buttons = [
                (state, f"{url}?{urlencode({'to_state': state, 'expected_version': obj.version})}")
                for state in obj.allowed_transitions
            ]
        timeline, anomalies = encounter_timeline(obj)
        state_at: dict[str, Any] = {"form": StateAtForm()}
        if "state_at" in request.GET:
            form = StateAtForm(request.GET)
            state_at["form"] = form
            if form.is_valid():
                when, known_at = form.cleaned_data["state_at"], form.cleaned_data["known_at"]
                state_at["answer"] = get_state_at(obj, when, known_at)
                state_at["when"] = local_time(when)
                state_at["known_at"] = local_time(known_at)
        return {
            "subtitle": f"Encounter {short_id(obj.pk)} · {obj.definition.name} · "
            f"{obj.subject_content_type.name} #{obj.subject_id}",
            "encounter": obj,
            "latest_definition_version": obj.definition.version,
            "is_final": obj.is_final,
            "transition_buttons": buttons,
            "can_transition": can_transition,
            "timeline": timeline,
            "anomalies": anomalies,
            "encounter_label": self._label(obj),
            "state_at": state_at,
            "restore_url": self._restore_url(obj),
            "time_zone": timezone.get_current_timezone_name(),
        }

    # -- transitions ------------------------------------------------------------------------

    def transition_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The small form behind a transition button: reason, optional ``effective_at``,
        context; calls ``transition()`` with the user and the version the page showed."""
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._missing(request, object_id)
        if not self.has_transition_permission(request, obj):
            raise PermissionDenied
        needs_context = bool(obj.machine.validators)
        if request.method == "POST":
            form = TransitionForm(request.POST, needs_context=needs_context)
            if form.is_valid():
                data = form.cleaned_data
                try:
                    row = transition(
                        obj,
                        data["to_state"],
                        transitioned_by=request.user,
                        reason=data["reason"],
                        context=data.get("context"),
                        effective_at=data["effective_at"],
                        expected_version=data["expected_version"],
                    )
                except DatabaseLockedError as exc:  # the database was busy, the page not stale
                    messages.error(request, f"Refused, nothing was changed: {exc}")
                except ConcurrentTransitionError as exc:
                    obj.refresh_from_db()
                    messages.error(
                        request,
                        f"Refused: the page you acted from was out of date. {exc}. The "
                        f"encounter is now in '{obj.state}' (version {obj.version}); nothing "
                        "was changed. Look at the timeline below and try again.",
                    )
                    return HttpResponseRedirect(self._change_url(obj))
                except (EncounterError, ValueError, TypeError) as exc:
                    messages.error(request, f"Refused, nothing was changed: {exc}")
                else:
                    message = (
                        f"Moved from '{row.from_state}' to '{row.to_state}' "
                        f"(sequence {row.sequence})"
                    )
                    if data["reason"]:
                        message += f": {data['reason']}"
                    self.log_change(request, obj, message)
                    messages.success(request, message + ".")
                    return HttpResponseRedirect(self._change_url(obj))
        else:
            form = TransitionForm(
                initial={
                    "to_state": request.GET.get("to_state", ""),
                    "expected_version": request.GET.get("expected_version", obj.version),
                },
                needs_context=needs_context,
            )
        to_state = form["to_state"].value()
        context = {
            **self.admin_site.each_context(request),
            "title": f"Move encounter {short_id(obj.pk)} to '{to_state}'",
            "subtitle": None,
            "opts": self.opts,
            "original": obj,
            "form": form,
            "to_state": to_state,
            "validators": obj.machine.validators,
            "change_url": self._change_url(obj),
            "encounter_label": self._label(obj),
            "has_view_permission": True,
            "media": self.media + form.media,
        }
        return TemplateResponse(
            request, "admin/django_encounters/encounter/transition_form.html", context
        )

    # -- helpers ----------------------------------------------------------------------------

    def _label(self, obj: Encounter) -> str:
        """How the admin names an encounter: its short id, definition and state."""
        return f"{short_id(obj.pk)} ({obj.definition.name}, {obj.state})"


# ---------------------------------------------------------------------------------------------
# The log and the other facts
# ---------------------------------------------------------------------------------------------


#: The row's times, shown to the second (Django's own display stops at the minute).
_TO_THE_SECOND = {"effective_at": "effective", "transitioned_at": "recorded"}


@admin.register(EncounterTransition)
class EncounterTransitionAdmin(ZoneSafeDateHierarchyMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "encounter_link",
        "subject",
        "sequence",
        "from_state",
        "to_state",
        "effective",
        "recorded",
        "transitioned_by",
    )
    list_select_related = ("encounter__definition", "transitioned_by")
    list_filter = ("encounter__definition", "to_state")
    search_fields = ("reason", "=encounter__subject_id")
    search_help_text = "Search by reason or the encounter's subject id (exact)."
    date_hierarchy = "effective_at"
    fields: ClassVar[tuple[str, ...]] = (
        "encounter_link",
        "subject",
        *(_TO_THE_SECOND.get(name, name) for name in READABLE_FIELDS),
        "metadata",
        "definition_version",
        "hash",
    )
    readonly_fields = fields

    @admin.display(description="encounter", ordering="encounter")
    def encounter_link(self, obj: EncounterTransition) -> Any:
        encounter = obj.encounter
        url = reverse("admin:django_encounters_encounter_change", args=[quote(encounter.pk)])
        return format_html(
            '<a href="{}">{}</a> ({})', url, short_id(encounter.pk), encounter.definition.name
        )

    @admin.display(description="subject")
    def subject(self, obj: EncounterTransition) -> Any:
        encounter = obj.encounter
        return subject_html(
            self.admin_site, encounter.subject_content_type_id, encounter.subject_id
        )

    @admin.display(description="effective at", ordering="effective_at")
    def effective(self, obj: EncounterTransition) -> str:
        return local_time(obj.effective_at)

    @admin.display(description="recorded at", ordering="transitioned_at")
    def recorded(self, obj: EncounterTransition) -> str:
        return local_time(obj.transitioned_at)


@admin.register(EncounterDefinitionVersion)
class EncounterDefinitionVersionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("definition", "number", "initial_state", "created_at")
    list_filter = ("definition",)


@admin.register(AnomalyAcknowledgement)
class AnomalyAcknowledgementAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("encounter_id", "sequence", "kind", "acknowledged_by", "acknowledged_at")
    list_filter = ("kind",)
    search_fields = ("encounter_id", "reason")
