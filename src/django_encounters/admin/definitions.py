"""The definitions' admin: editable machines with their warnings, versions and diagrams."""

from __future__ import annotations

from datetime import timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db import connections, router, transaction
from django.db.models import Count, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from .. import conf
from ..models import (
    MACHINE_FIELDS,
    STATE_MAX_LENGTH,
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
)
from ..projections.diagrams import (
    definition_diagram,
    process_map,
)
from .common import DeletedFilter, ReadOnlyMixin, SoftDeleteAdmin, diagram_html

# ---------------------------------------------------------------------------------------------
# Definitions
# ---------------------------------------------------------------------------------------------

#: On Citus only (a no-op elsewhere on PostgreSQL): the rest of the transaction runs over one
#: connection per node, as Citus requires of a transaction that reads distributed tables in
#: parallel and then writes a table they reference.
CITUS_SEQUENTIAL = (
    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN "
    "SET LOCAL citus.multi_shard_modify_mode TO 'sequential'; END IF; END $$"
)


def _window_words(days: int | None) -> str:
    return "the whole log" if days is None else f"the last {days} days"


class VersionInline(ReadOnlyMixin, admin.TabularInline):
    model = EncounterDefinitionVersion
    fields = ("number", *MACHINE_FIELDS, "created_at")
    readonly_fields = fields
    ordering = ("-number",)
    extra = 0


class StateRowForm(forms.Form):
    """One state of the machine: its name, whether it is the initial state or a final one,
    and the states it may move to next."""

    name = forms.CharField(
        required=False,
        strip=False,
        max_length=STATE_MAX_LENGTH,
        widget=forms.TextInput(attrs={"size": 18, "aria-label": "state name"}),
    )
    is_initial = forms.BooleanField(
        required=False, widget=forms.CheckboxInput(attrs={"aria-label": "initial state"})
    )
    is_final = forms.BooleanField(
        required=False, widget=forms.CheckboxInput(attrs={"aria-label": "final state"})
    )
    next_states = forms.CharField(
        required=False,
        widget=forms.TextInput(
            attrs={"size": 50, "placeholder": "state, state", "aria-label": "next states"}
        ),
    )


#: Empty rows offered for new states: on a new definition, and on an existing one.
ROWS_TO_ADD, ROWS_TO_ADD_MORE = 8, 3

#: The machine's fields the rows edit (the validators keep their JSON box).
ROW_FIELDS = ("states", "initial_state", "final_states", "transitions")


def machine_rows(machine: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The rows showing ``machine`` (a state per row, in order), or None when the rows cannot
    show it exactly (a state name with a comma or outer spaces, or not a list of text): it is
    then edited as JSON only."""
    states, transitions = machine.get("states"), machine.get("transitions")
    finals = machine.get("final_states")
    if not isinstance(states, list) or not all(isinstance(s, str) for s in states):
        return None
    if not isinstance(transitions, dict) or not isinstance(finals, list):
        return None
    if any("," in s or s != s.strip() for s in states):
        return None
    if any(not isinstance(targets, list) for targets in transitions.values()):
        return None
    return [
        {
            "name": state,
            "is_initial": state == machine.get("initial_state"),
            "is_final": state in finals,
            "next_states": ", ".join(str(t) for t in transitions.get(state, [])),
        }
        for state in states
    ]


def _row_key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Rows as compared: the filled ones, each (name, initial, final, next states)."""
    return [
        (
            row.get("name") or "",
            bool(row.get("is_initial")),
            bool(row.get("is_final")),
            tuple(t.strip() for t in (row.get("next_states") or "").split(",") if t.strip()),
        )
        for row in rows
        if (row.get("name") or "").strip()
    ]


def machine_from_rows(
    rows: list[dict[str, Any]], before: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The machine the rows describe, and what is wrong with them. What the rows say the same
    way as ``before`` keeps ``before``'s form (its final states' order, a state's explicit
    empty list of next states), so an unchanged machine is saved unchanged."""
    keyed = _row_key(rows)
    problems = []
    states = [name for name, *_ in keyed]
    initials = [name for name, initial, *_ in keyed if initial]
    if len(initials) != 1:
        problems.append(f"tick exactly one initial state (ticked: {', '.join(initials) or 'none'})")
    finals = [name for name, _, final, _ in keyed if final]
    previous_finals = before.get("final_states")
    if isinstance(previous_finals, list) and sorted(map(str, previous_finals)) == sorted(finals):
        finals = list(previous_finals)
    stored = before.get("transitions")
    previous: dict[str, Any] = stored if isinstance(stored, dict) else {}
    transitions: dict[str, list[str]] = {}
    unknown = []
    for name, _, _, targets in keyed:
        unknown += [t for t in targets if t not in states]
        if targets or previous.get(name) == []:
            transitions[name] = list(targets)
    if unknown:
        problems.append(
            f"next states that are not a state of the rows: {', '.join(sorted(set(unknown)))}"
        )
    machine = {
        "states": states,
        "initial_state": initials[0] if len(initials) == 1 else "",
        "final_states": finals,
        "transitions": transitions,
    }
    return machine, problems


class DefinitionForm(forms.ModelForm):
    """The definition's fields, its machine edited as a row per state (name, initial, final,
    next states). The machine's JSON boxes stay (folded): a save that changed the JSON and not
    the rows takes the JSON; one that changed the rows takes the rows; one that changed both
    is refused. The validators and the metadata are JSON boxes."""

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
            "validators": 'JSON list of dotted paths or {"path": ..., "params": {...}}, e.g. '
            '["django_encounters.validators.FinalStateValidator", {"path": "django_encounters.'
            'validators.RequiredFieldsValidator", "params": {"state_requirements": '
            '{"completed": ["ended_at"]}}}]',
        }

    #: The prefix of the rows' inputs.
    ROWS_PREFIX = "state_rows"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in (*ROW_FIELDS, "validators"):
            if name in self.fields:  # an empty list is a value here ("[]": no validators)
                self.fields[name].required = False
        before = {name: getattr(self.instance, name) for name in ROW_FIELDS}
        self.rows_shown = [] if self.instance._state.adding else machine_rows(before)
        #: The rows editor (None when the machine can be edited as JSON only).
        self.state_rows: Any = None
        if self.rows_shown is not None:
            posted = self.is_bound and f"{self.ROWS_PREFIX}-TOTAL_FORMS" in self.data
            rows = forms.formset_factory(
                StateRowForm,
                extra=ROWS_TO_ADD if self.instance._state.adding else ROWS_TO_ADD_MORE,
            )
            self.state_rows = rows(
                self.data if posted else None,
                prefix=self.ROWS_PREFIX,
                initial=self.rows_shown,
            )

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or self.cleaned_data
        for name, empty in (("final_states", list), ("transitions", dict), ("validators", list)):
            if name in self.fields and cleaned.get(name) is None and name not in self.errors:
                cleaned[name] = empty()
        rows = self.state_rows
        if rows is None or not rows.is_bound:
            return cleaned
        if not rows.is_valid():
            self.add_error(None, "The states' rows are not valid: see the marked rows.")
            return cleaned
        filled = [row for row in rows.cleaned_data if row]
        if _row_key(filled) == _row_key(self.rows_shown or []):
            return cleaned  # the rows as shown: the JSON boxes say what to save
        json_changed = [name for name in ROW_FIELDS if name in self.changed_data]
        if json_changed:
            self.add_error(
                None,
                "The states were changed both in the rows and in the JSON boxes "
                f"({', '.join(json_changed)}): change them in one place, then save.",
            )
            return cleaned
        before = {name: getattr(self.instance, name) for name in ROW_FIELDS}
        machine, problems = machine_from_rows(filled, before)
        for problem in problems:
            self.add_error(None, f"States: {problem}.")
        if not problems:
            cleaned.update(machine)
        return cleaned


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
        main = self._json_fieldsets(fields, obj)
        if obj is None:
            return main
        return [
            *main,
            ("Machine", {"fields": ["machine_summary", "machine_diagram"]}),
            (
                "Process map (mined from the transition log)",
                {
                    "fields": ["process_map_diagram"],
                    "description": "What the encounters of this definition really did: each "
                    "edge with how often it was taken and the median time spent in its source "
                    "state before it; edges the machine allows but nobody took are dashed, "
                    "edges it does not allow red. Loaded once the page is shown, for the rows "
                    "effective in a window (the last ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS days by "
                    "default; the links choose another); for any period use manage.py "
                    "encounter_graph --from-log --since/--until.",
                },
            ),
        ]

    def _json_fieldsets(self, fields: list[Any], obj: Any) -> list[Any]:
        """The definition's fields; with the rows editor (every machine it can show), the
        machine's JSON boxes folded apart, still editable."""
        if obj is not None and machine_rows({n: getattr(obj, n) for n in ROW_FIELDS}) is None:
            return [(None, {"fields": fields})]
        first = [name for name in fields if name in ("name", "code", "description")]
        rest = [name for name in fields if name not in (*first, *ROW_FIELDS)]
        return [
            (None, {"fields": first}),  # the template shows the state rows after it
            (None, {"fields": rest}),
            (
                "States as JSON",
                {
                    "fields": [name for name in fields if name in ROW_FIELDS],
                    "classes": ("collapse",),
                    "description": "The same machine as the rows above, as JSON: change it "
                    "here or in the rows (not both in one save).",
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
        """A panel the process map is loaded into once the page is shown (it mines the log:
        the page itself reads nothing of it), from :meth:`process_map_view`."""
        if not obj.pk:
            return "-"
        url = reverse(
            "admin:django_encounters_encounterdefinition_process_map", args=[quote(obj.pk)]
        )
        return format_html(
            '<div id="process-map-panel" data-url="{}" aria-live="polite">'
            "<p>Loading the process map ({})…</p>"
            '<noscript><a href="{}">Open the process map</a></noscript></div>'
            "<script>(function () {{"
            " var panel = document.getElementById('process-map-panel');"
            " function load(url) {{"
            "  fetch(url, {{credentials: 'same-origin'}}).then(function (response) {{"
            "   return response.text(); }}).then(function (text) {{ panel.innerHTML = text; }});"
            " }}"
            " panel.addEventListener('click', function (event) {{"
            "  var link = event.target.closest('a.process-map-window');"
            "  if (link) {{ event.preventDefault(); load(link.href); }}"
            " }});"
            " load(panel.dataset.url);"
            "}})();</script>",
            url,
            _window_words(conf.admin_process_map_days()),
            url,
        )

    def process_map_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The process map of the definition as an HTML fragment (the diagram and the windows
        it can be drawn for): the rows effective in the last ``window`` days (a query
        parameter; ``all`` for the whole log; default ``ENCOUNTERS_ADMIN_PROCESS_MAP_DAYS``)."""
        definition = self.get_object(request, unquote(object_id))
        if definition is None:
            raise Http404(f"No encounter definition with id {object_id!r}")
        if not self.has_view_or_change_permission(request, definition):
            raise PermissionDenied
        default = conf.admin_process_map_days()
        raw = request.GET.get("window")
        days: int | None
        if raw == "all":
            days = None
        elif raw is None:
            days = default
        else:
            try:
                days = max(1, min(36_500, int(raw)))
            except ValueError:
                days = default
        since = None
        if days is not None:
            # From the start of the day, in UTC: the window's rows do not change every second.
            today = (
                timezone.now()
                .astimezone(dt_timezone.utc)
                .replace(hour=0, minute=0, second=0, microsecond=0)
            )
            since = today - timedelta(days=days)
        graph = process_map(definition.code, since=since)
        choices = [(30, "last 30 days"), (365, "last year"), (None, "all time")]
        if default not in [c[0] for c in choices]:
            choices.insert(0, (default, _window_words(default)))
        links = format_html_join(
            " · ",
            '<a class="process-map-window{}" href="{}?window={}"{}>{}</a>',
            (
                (
                    " current" if value == days else "",
                    request.path,
                    "all" if value is None else value,
                    mark_safe(' aria-current="true"') if value == days else "",
                    label,
                )
                for value, label in choices
            ),
        )
        return HttpResponse(
            format_html(
                '<p class="process-map-windows">Rows effective in: {}</p>{}',
                links,
                diagram_html(graph, "process-map"),
            )
        )

    def get_urls(self) -> list[Any]:
        return [
            path(
                "<path:object_id>/process-map/",
                self.admin_site.admin_view(self.process_map_view),
                name="django_encounters_encounterdefinition_process_map",
            ),
            *super().get_urls(),
        ]

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

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: Any = None,
    ) -> Any:
        if request.method != "POST":
            return super().changeform_view(request, object_id, form_url, extra_context)
        using = router.db_for_write(self.model)
        with transaction.atomic(using=using):
            connection = connections[using]
            if connection.vendor == "postgresql":
                # On Citus the page reads the definition with its encounters counted (a
                # parallel read of a distributed table); the definition's table, which they
                # reference, may then be written in the same transaction only if its
                # statements run over one connection per node.
                with connection.cursor() as cursor:
                    cursor.execute(CITUS_SEQUENTIAL)
            return super().changeform_view(request, object_id, form_url, extra_context)

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
