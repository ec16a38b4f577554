"""The definitions' admin: editable machines with their warnings, versions and diagrams."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from ..models import (
    MACHINE_FIELDS,
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
