"""Admin: definitions are editable (with their structural warnings and every version of their
machine shown); encounters' projection columns, the transition log, definition versions and
anomaly acknowledgements are read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages

from .engine import READABLE_FIELDS
from .models import (
    MACHINE_FIELDS,
    AnomalyAcknowledgement,
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)


class ReadOnlyMixin:
    """Facts: shown, never added, changed or deleted from the admin."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class VersionInline(ReadOnlyMixin, admin.TabularInline):
    model = EncounterDefinitionVersion
    fields = ("number", *MACHINE_FIELDS, "created_at")
    readonly_fields = fields
    ordering = ("-number",)
    extra = 0


@admin.register(EncounterDefinition)
class EncounterDefinitionAdmin(admin.ModelAdmin):
    list_display = ("name", "code", "version", "initial_state", "created_at")
    search_fields = ("name", "code")
    readonly_fields = ("version",)
    inlines = [VersionInline]

    def change_view(
        self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        definition = self.get_object(request, object_id)
        if definition is not None and request.method == "GET":
            for warning in definition.get_warnings():
                messages.warning(request, warning)
        return super().change_view(request, object_id, form_url, extra_context)


class TransitionInline(ReadOnlyMixin, admin.TabularInline):
    model = EncounterTransition
    fields = readonly_fields = tuple(READABLE_FIELDS) + ("definition_version",)
    ordering = ("sequence",)
    extra = 0


@admin.register(Encounter)
class EncounterAdmin(admin.ModelAdmin):
    list_display = ("id", "definition", "state", "version", "scheduled_at", "created_at")
    list_filter = ("definition", "state")
    readonly_fields = Encounter.LOG_DERIVED_FIELDS
    inlines = [TransitionInline]


@admin.register(EncounterTransition)
class EncounterTransitionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("encounter", *READABLE_FIELDS[: READABLE_FIELDS.index("reason")])
    list_filter = ("to_state",)


@admin.register(EncounterDefinitionVersion)
class EncounterDefinitionVersionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("definition", "number", "initial_state", "created_at")
    list_filter = ("definition",)


@admin.register(AnomalyAcknowledgement)
class AnomalyAcknowledgementAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("encounter_id", "sequence", "kind", "acknowledged_by", "acknowledged_at")
    list_filter = ("kind",)
    search_fields = ("encounter_id", "reason")
