"""The encounters' admin: created with ``create_encounter()``, moved on with ``transition()``."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.admin.utils import quote, unquote
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.db import models, router
from django.db import transaction as db_transaction
from django.db.models import Exists, OuterRef, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import escape, format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeData, mark_safe
from django.utils.text import capfirst, smart_split, unescape_string_literal

from ..exceptions import (
    ConcurrentTransitionError,
    DatabaseLockedError,
    EncounterError,
    EncounterNotFoundError,
    ValidationError,
)
from ..models import (
    TRANSITION_PERMISSION,
    Encounter,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from ..services import create_encounter, get_state_at, transition
from ..store import writer_errors
from .common import (
    DeletedFilter,
    LabelledSplitDateTime,
    SoftDeleteAdmin,
    ZoneSafeDateHierarchyMixin,
    encounter_title,
    local_time,
    matching_subjects,
    search_fields_of,
    short_id,
    subject_html,
    subject_match,
    subject_name,
    subject_of,
    subject_types,
    two_line_time,
)
from .forms import (
    SEEN_FIELDS,
    SEEN_VERSION,
    EncounterForm,
    StateAtForm,
    TransitionForm,
    required_fields,
)
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


#: What the admin keeps on the form of an existing encounter without letting it be edited: who
#: created it and its metadata are part of its record, not of the visit.
RECORD_FIELDS = ("created_by", "metadata", "created_at", "updated_at", "deleted_at")

#: A search term that is an id: digits (an integer key), "#3", a UUID, or the 8 hex digits of
#: an encounter's short id. It matches ids only, never notes ("3" is not "Room 3").
_DIGITS = re.compile(r"#?\d+")
_SHORT_ID = re.compile(r"#?[0-9a-fA-F]{8}")


class SubjectPickerWidget(forms.TextInput):
    """The subject id box with a search beside it: typing a name lists the matching subjects
    of the chosen content type (the subject search of the encounter list), and choosing one
    fills in its id. The id box still takes an id typed by hand."""

    def __init__(self, search_url: str, attrs: Any = None) -> None:
        super().__init__(attrs)
        self.search_url = search_url

    def render(self, name: str, value: Any, attrs: Any = None, renderer: Any = None) -> Any:
        box = super().render(name, value, attrs, renderer)
        element_id = (attrs or {}).get("id") or f"id_{name}"
        picker = render_to_string(
            "django_encounters/subject_picker.html",
            {"element_id": element_id, "search_url": self.search_url},
        )
        return mark_safe(f'<div class="subject-picker-field">{box}{picker}</div>')


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
    #: Searched by :meth:`get_search_results`: the subject's own fields, ids, notes, reasons.
    search_fields = ("notes",)
    search_help_text = (
        "Search by the subject (its name or the other fields its admin searches), an id (the "
        "subject's, or an encounter's 8-digit short id — ids match exactly, nothing else), "
        "notes or a transition's reason."
    )
    date_hierarchy = "created_at"
    readonly_fields = ("subject_link", *_DERIVED_SHOWN, *RECORD_FIELDS)

    # -- queryset and permissions -----------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        queryset = super().get_queryset(request).prefetch_related("subject")
        if getattr(request, "_encounter_edit_lock", False):
            # The edit form's save: compared with what the page showed, then written, while no
            # transition can move the encounter on in between.
            queryset = queryset.select_for_update()
        return queryset

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """Every word must match: an id word matches the subject's id or the encounter's (short)
        id exactly; any other word the subject's own search fields, the notes or a
        transition's reason. One query per subject model (the ids it matches), none per row."""
        for word in smart_split(search_term):
            if word[:1] in "\"'" and word[-1:] == word[:1] and len(word) > 1:
                try:
                    word = unescape_string_literal(word)
                except ValueError:
                    pass
            if word:
                queryset = queryset.filter(self._word_filter(request, word))
        return queryset, False

    def _word_filter(self, request: HttpRequest, word: str) -> Q:
        types = subject_types(request)
        found = Q(subject_content_type_id__in=types, subject_id=word)
        bare = word.removeprefix("#")
        try:
            uuid = UUID(bare)
        except ValueError:
            uuid = None
        if uuid is not None:
            return found | Q(pk=uuid) | Q(subject_content_type_id__in=types, subject_id=str(uuid))
        is_digits, is_short = _DIGITS.fullmatch(word), _SHORT_ID.fullmatch(word)
        if is_digits or is_short:
            found |= Q(subject_content_type_id__in=types, subject_id=bare)
            if is_short:
                found |= Q(pk__startswith=bare.lower())
            return found
        reasons = EncounterTransition.objects.filter(
            encounter_id=OuterRef("pk"), reason__icontains=word
        )
        return (
            found
            | Q(notes__icontains=word)
            | Q(Exists(reasons))
            | subject_match(request, self.admin_site, word)
        )

    def has_transition_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(TRANSITION_PERMISSION) and self.has_change_permission(
            request, obj
        )

    # -- columns ----------------------------------------------------------------------------

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
        subject = subject_of(obj)
        label = f"{subject} (#{obj.subject_id})" if subject is not None else subject_name(obj)
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
            ("Record", {"fields": RECORD_FIELDS}),
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

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        if db_field.name == "subject_id":
            kwargs["widget"] = SubjectPickerWidget(
                reverse(f"{self.admin_site.name}:django_encounters_encounter_subjects")
            )
        elif isinstance(db_field, models.DateTimeField) and "widget" not in kwargs:
            # The admin's date and time boxes, each with an accessible name.
            kwargs["widget"] = LabelledSplitDateTime(str(capfirst(db_field.verbose_name)))
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        if change:
            # Only the fields the person changed (see EncounterForm); nothing when none did.
            changed = form.changed_model_fields()
            if changed:
                obj.save(update_fields=[*changed, "updated_at"])
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
        found = self._encounter_for_label(obj_id)
        return self._label(found) if found is not None else f"{short_id(obj_id)} ({obj_display})"

    def _encounter_for_label(self, obj_id: Any) -> Encounter | None:
        return (
            Encounter.all_objects.select_related("definition", "subject_content_type")
            .prefetch_related("subject")
            .filter(pk=obj_id)
            .first()
        )

    # -- messages name the subject ------------------------------------------------------------

    @contextmanager
    def _naming(self, request: HttpRequest, obj: Encounter) -> Any:
        """Within it, Django's own messages about ``obj`` ("The encounter “…” was changed")
        name it by its definition and subject instead of ``str(obj)``."""
        request._encounter_names = (str(obj), encounter_title(obj))  # type: ignore[attr-defined]
        try:
            yield
        finally:
            del request._encounter_names  # type: ignore[attr-defined]

    def message_user(self, request: HttpRequest, message: Any, *args: Any, **kwargs: Any) -> None:
        names = getattr(request, "_encounter_names", None)
        if names is not None:
            old, new = names
            if isinstance(message, SafeData):
                message = mark_safe(str(message).replace(escape(old), escape(new)))
            else:
                message = str(message).replace(old, new)
        super().message_user(request, message, *args, **kwargs)

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return self._log(request, obj, ADDITION, message)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return self._log(request, obj, CHANGE, message)

    def _log(self, request: HttpRequest, obj: Encounter, flag: int, message: Any) -> Any:
        """The admin's log entry (History, "Recent actions") naming the encounter by its
        definition and subject."""
        if isinstance(message, list):
            message = json.dumps(message)
        return LogEntry.objects.create(
            user_id=request.user.pk,
            content_type_id=ContentType.objects.get_for_model(obj, for_concrete_model=False).pk,
            object_id=str(obj.pk),
            object_repr=encounter_title(obj)[:200],
            action_flag=flag,
            change_message=message,
        )

    def response_add(self, request: HttpRequest, obj: Any, post_url_continue: Any = None) -> Any:
        with self._naming(request, obj):
            return super().response_add(request, obj, post_url_continue)

    def response_change(self, request: HttpRequest, obj: Any) -> Any:
        with self._naming(request, obj):
            return super().response_change(request, obj)

    # -- the encounter page -----------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/transition/",
                self.admin_site.admin_view(self.transition_view),
                name="{}_{}_transition".format(*info),
            ),
            path(
                "subjects/",
                self.admin_site.admin_view(self.subject_search_view),
                name="{}_{}_subjects".format(*info),
            ),
            *super().get_urls(),
        ]

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        """The encounter, read once per request for a page that is only shown (the change
        view's status panel and Django's change form then share it); a save reads it again,
        under the edit form's lock."""
        shown = getattr(request, "_encounter_shown", None)
        if (
            shown is not None
            and from_field is None
            and shown[0] == object_id
            and not getattr(request, "_encounter_edit_lock", False)
        ):
            return shown[1]
        return super().get_object(request, object_id, from_field)

    def change_view(
        self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is not None and request.method in ("GET", "HEAD"):
            request._encounter_shown = (unquote(object_id), obj)  # type: ignore[attr-defined]
        if obj is not None:
            extra_context = {**(extra_context or {}), **self._page_context(request, obj)}
        if request.method == "POST":
            request._encounter_edit_lock = True  # type: ignore[attr-defined]
        return super().change_view(request, object_id, form_url, extra_context)

    def render_change_form(
        self,
        request: Any,
        context: Any,
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> Any:
        form = context["adminform"].form
        if change and obj is not None and isinstance(form, EncounterForm):
            context["seen"] = {
                "version_name": SEEN_VERSION,
                "version": form.data.get(SEEN_VERSION, form.seen_version())
                if form.is_bound
                else form.seen_version(),
                "fields_name": SEEN_FIELDS,
                "fields": form.data.get(SEEN_FIELDS, form.seen_fields())
                if form.is_bound
                else form.seen_fields(),
            }
        return super().render_change_form(request, context, add, change, form_url, obj)

    def history_view(self, request: Any, object_id: str, extra_context: Any = None) -> Any:
        obj = self.get_object(request, unquote(object_id))
        if obj is not None:
            request._encounter_shown = (unquote(object_id), obj)  # type: ignore[attr-defined]
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
            machine = obj.machine
            if machine.definition_id == obj.definition_id:
                machine.definition = obj.definition  # the same row: read once, not twice
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
            "subtitle": f"{encounter_title(obj)} · encounter {short_id(obj.pk)}",
            "encounter_title": encounter_title(obj),
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
        context, and the fields the target state's validators require; writes those fields and
        calls ``transition()`` (with the user and the version the page showed) in one
        transaction, so a refused transition writes neither. A refusal shows the form again,
        with everything typed kept."""
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._missing(request, object_id)
        if not self.has_transition_permission(request, obj):
            raise PermissionDenied
        if obj.is_deleted:
            return self._deleted(request, obj)
        to_state = request.POST.get("to_state") or request.GET.get("to_state", "")
        options = {
            "needs_context": bool(obj.machine.validators),
            "encounter": obj,
            "fields": required_fields(obj, to_state),
        }
        since: list[EncounterTransition] = []
        if request.method == "POST":
            form = TransitionForm(request.POST, **options)
            if form.is_valid():
                data = form.cleaned_data
                using = router.db_for_write(Encounter, instance=obj)
                try:
                    # The same-step fields are saved before transition() locks the row: SQLite's
                    # "database is locked" there is the same DatabaseLockedError as transition()'s.
                    with writer_errors(obj.pk, using), db_transaction.atomic(using=using):
                        changed = form.changed_fields()
                        for name, value in changed.items():
                            setattr(obj, name, value)
                        if changed:
                            obj.save(update_fields=[*changed, "updated_at"])
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
                    obj.refresh_from_db()
                    messages.error(request, self._refusal(obj, exc, form))
                except ConcurrentTransitionError as exc:
                    obj.refresh_from_db()
                    since = list(
                        EncounterTransition.objects.filter(
                            encounter_id=obj.pk, sequence__gt=exc.expected_version or 0
                        ).order_by("sequence")
                    )
                    posted = form.data.copy()  # type: ignore[attr-defined]  # a QueryDict
                    posted["expected_version"] = str(obj.version)
                    form.data = posted
                    messages.error(request, self._stale_message(obj, data["to_state"], exc))
                except EncounterNotFoundError:
                    obj.refresh_from_db()
                    if obj.is_deleted:
                        return self._deleted(request, obj)
                    raise
                except ValidationError as exc:
                    obj.refresh_from_db()
                    messages.error(request, self._refusal(obj, exc, form))
                except (EncounterError, ValueError, TypeError) as exc:
                    obj.refresh_from_db()
                    messages.error(request, self._refusal(obj, exc, form))
                else:
                    message = (
                        f"Moved from '{row.from_state}' to '{row.to_state}' "
                        f"(sequence {row.sequence})"
                    )
                    if changed:
                        message += ", setting " + ", ".join(
                            f"{form.field_label(name)} to {_shown(value)}"
                            for name, value in changed.items()
                        )
                    if data["reason"]:
                        message += f": {data['reason']}"
                    self.log_change(request, obj, message)
                    messages.success(request, f"{encounter_title(obj)}: {message}.")
                    return HttpResponseRedirect(self._change_url(obj))
        else:
            form = TransitionForm(
                initial={
                    "to_state": to_state,
                    "expected_version": request.GET.get("expected_version", obj.version),
                },
                **options,
            )
        title = encounter_title(obj)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{title}: move to '{to_state}'",
            "subtitle": None,
            "opts": self.opts,
            "original": obj,
            "form": form,
            "to_state": to_state,
            "validators": obj.machine.validators,
            "change_url": self._change_url(obj),
            "encounter_label": self._label(obj),
            "encounter_title": title,
            "since": since,
            "has_view_permission": True,
            "media": self.media + form.media,
        }
        return TemplateResponse(
            request, "admin/django_encounters/encounter/transition_form.html", context
        )

    def _stale_message(self, obj: Encounter, to_state: str, exc: ConcurrentTransitionError) -> str:
        allowed = (
            f"'{to_state}' is still allowed from there: press the button again to move it"
            if to_state in obj.allowed_transitions
            else f"'{to_state}' is not allowed from there"
        )
        return (
            f"Refused, nothing was changed: {encounter_title(obj)} moved on after your page was "
            f"loaded (your page showed version {exc.expected_version}; it is now at version "
            f"{obj.version}, in '{obj.state}'). What was recorded since is listed below, and "
            f"what you typed is kept; {allowed}."
        )

    def _refusal(self, obj: Encounter, exc: Exception, form: TransitionForm) -> str:
        """The library's refusal, readable: the encounter named by its definition and subject
        (not its UUID), the fields a validator names by their labels (and marked on the
        form)."""
        text = str(exc).replace(f" [encounter {obj.pk}]", "").replace(str(obj.pk), "it")
        if isinstance(exc, ValidationError):
            text = f"{exc.validator} says: {exc.message}"
            for name in exc.fields:
                if name in form.same_step:
                    label = form.field_label(name)
                    text = text.replace(f"'{name}'", f"“{label}” ({name})")
                    form.add_error(
                        form.same_step[name], f"Required for '{form.data.get('to_state')}'."
                    )
        return f"Refused, nothing was changed ({encounter_title(obj)}): {text}"

    def _deleted(self, request: HttpRequest, obj: Encounter) -> HttpResponse:
        messages.error(
            request,
            f"{encounter_title(obj)} was deleted (soft-deleted at {local_time(obj.deleted_at)}): "
            "a deleted encounter cannot move on, and nothing was changed. Restore it first "
            "(the Restore button on its page) if it should go on.",
        )
        return HttpResponseRedirect(self._change_url(obj))

    # -- the subject search of the add form ---------------------------------------------------

    def subject_search_view(self, request: HttpRequest) -> JsonResponse:
        """``?content_type=<id>&term=<text>``: up to 20 subjects of that content type whose
        search fields match, as ``{"results": [{"id", "text"}], "searchable": bool}``. Needs
        the permission to add or change encounters, and, for a subject model registered in
        this admin, the permission to view its objects."""
        if not (self.has_add_permission(request) or self.has_change_permission(request)):
            raise PermissionDenied
        try:
            content_type = ContentType.objects.get_for_id(int(request.GET.get("content_type", "")))
        except (ValueError, ContentType.DoesNotExist):
            return JsonResponse({"results": [], "searchable": False})
        model = content_type.model_class()
        registered = self.admin_site._registry.get(model) if model is not None else None
        if registered is not None and not registered.has_view_permission(request):
            raise PermissionDenied
        term = request.GET.get("term", "").strip()
        if model is None or not search_fields_of(self.admin_site, model):
            return JsonResponse({"results": [], "searchable": False})
        found = matching_subjects(request, self.admin_site, model, term) if term else None
        results = [
            {"id": str(subject.pk), "text": f"{subject} (#{subject.pk})"}
            for subject in (found[:20] if found is not None else [])
        ]
        return JsonResponse({"results": results, "searchable": True})

    # -- helpers ----------------------------------------------------------------------------

    def _label(self, obj: Encounter) -> str:
        """How the admin names an encounter: its definition and subject, short id and state."""
        return f"{encounter_title(obj)} ({short_id(obj.pk)}, {obj.state})"


def _shown(value: Any) -> str:
    return local_time(value) if hasattr(value, "tzinfo") and value.tzinfo else repr(value)
