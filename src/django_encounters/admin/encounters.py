"""The encounters' admin: created with ``create_encounter()``, moved on with ``transition()``."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.text import capfirst

from ..exceptions import ConcurrentTransitionError, EncounterError
from ..models import (
    TRANSITION_PERMISSION,
    Encounter,
    EncounterDefinitionVersion,
)
from ..services import create_encounter, get_state_at, transition
from .common import (
    DeletedFilter,
    LabelledSplitDateTime,
    SoftDeleteAdmin,
    ZoneSafeDateHierarchyMixin,
    local_time,
    short_id,
    subject_html,
    two_line_time,
)
from .forms import EncounterForm, StateAtForm, TransitionForm
from .timeline import (
    ORDER_PARAMETER,
    PAGE_PARAMETER,
    TimelinePage,
    backdate_options,
    encounter_timeline,
    existed_at,
    page_request,
)

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
    # Fits a 1280 px window beside the admin's navigation and the filters: times as a date
    # over a time (to the minute), the version on the encounter's page, a deleted encounter
    # marked under its state.
    list_display = (
        "short_id",
        "subject_link",
        "definition",
        "state_shown",
        "scheduled",
        "created",
    )
    list_display_links = ("short_id",)
    list_per_page = 50
    # A user is picked by id (with the admin's lookup), not from a list of every user.
    raw_id_fields = ("assigned_to", "created_by")
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

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if isinstance(db_field, models.DateTimeField) and "widget" not in kwargs:
            kwargs["widget"] = LabelledSplitDateTime(str(capfirst(db_field.verbose_name)))
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    @admin.display(description="state", ordering="state")
    def state_shown(self, obj: Encounter) -> Any:
        if obj.deleted_at is None:
            return obj.state
        return format_html(
            '{}<br><span class="deleted-mark" title="soft-deleted at {}">deleted {}</span>',
            obj.state,
            local_time(obj.deleted_at),
            local_time(obj.deleted_at).partition(" ")[0],
        )

    @admin.display(description="scheduled at", ordering="scheduled_at")
    def scheduled(self, obj: Encounter) -> Any:
        return two_line_time(obj.scheduled_at, seconds=False)

    @admin.display(description="created at", ordering="created_at")
    def created(self, obj: Encounter) -> Any:
        return two_line_time(obj.created_at, seconds=False)

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
            page = self._timeline_page(request, obj)
            extra_context = {
                **(extra_context or {}),
                **self._timeline_context(request, page),
                "encounter_label": self._label(obj),
            }
        return super().history_view(request, object_id, extra_context)

    def _timeline_page(self, request: HttpRequest, obj: Encounter) -> TimelinePage:
        number, newest_first = page_request(request.GET)
        return encounter_timeline(obj, page=number, newest_first=newest_first)

    def _timeline_context(self, request: HttpRequest, page: TimelinePage) -> dict[str, Any]:
        """The timeline's page and its links (pages, "show all", the order), each keeping the
        page's other query parameters."""

        def link(**changes: Any) -> str:
            query = request.GET.copy()
            for name, value in changes.items():
                query[name] = value
            return "?" + query.urlencode()

        numbers = range(1, page.pages + 1) if page.paginated else range(0)
        return {
            "timeline": page.rows,
            "anomalies": page.anomalies,
            "timeline_page": page,
            "timeline_page_links": [
                (n, link(**{PAGE_PARAMETER: n}), n == page.number) for n in numbers
            ],
            "timeline_all_link": link(**{PAGE_PARAMETER: "all"}) if page.paginated else "",
            "timeline_paged_link": link(**{PAGE_PARAMETER: 1}) if page.show_all else "",
            "timeline_order_link": link(
                **{ORDER_PARAMETER: "oldest" if page.newest_first else "newest", PAGE_PARAMETER: 1}
            ),
        }

    def _page_context(self, request: HttpRequest, obj: Encounter) -> dict[str, Any]:
        """The status panel (state, definition version, transition buttons, the backdates the
        timeline admits), the timeline's page and the "state at" box."""
        can_transition = not obj.is_deleted and self.has_transition_permission(request, obj)
        buttons = []
        backdates = []
        page = self._timeline_page(request, obj)
        if can_transition:
            url = reverse("admin:django_encounters_encounter_transition", args=[quote(obj.pk)])
            buttons = [
                (state, f"{url}?{urlencode({'to_state': state, 'expected_version': obj.version})}")
                for state in obj.allowed_transitions
            ]
            backdates = [
                (
                    option,
                    f"{url}?"
                    + urlencode(
                        {
                            "to_state": option.state,
                            "expected_version": str(obj.version),
                            "backdate": "1",
                        }
                    ),
                )
                for option in (backdate_options(obj, page.audit) if not buttons else [])
            ]
        state_at: dict[str, Any] = {"form": StateAtForm()}
        if "state_at" in request.GET:
            form = StateAtForm(request.GET)
            state_at["form"] = form
            if form.is_valid():
                when, known_at = form.cleaned_data["state_at"], form.cleaned_data["known_at"]
                state_at["when"] = local_time(when)
                state_at["known_at"] = local_time(known_at)
                not_yet = existed_at(page.audit, obj, when, known_at)
                if not_yet is not None:
                    state_at["not_yet"] = not_yet
                else:
                    state_at["answer"] = get_state_at(obj, when, known_at)
        return {
            "subtitle": f"Encounter {short_id(obj.pk)} · {obj.definition.name} · "
            f"{obj.subject_content_type.name} #{obj.subject_id}",
            "encounter": obj,
            "latest_definition_version": obj.definition.version,
            "is_final": obj.is_final,
            "transition_buttons": buttons,
            "backdate_buttons": backdates,
            "can_transition": can_transition,
            **self._timeline_context(request, page),
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
