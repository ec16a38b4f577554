"""Admin: definitions are editable (with their structural warnings shown); encounters' projection
columns and the transition log are read-only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages

from .engine import READABLE_FIELDS
from .models import Encounter, EncounterDefinition, EncounterTransition


@admin.register(EncounterDefinition)
class EncounterDefinitionAdmin(admin.ModelAdmin):
    list_display = ("name", "code", "initial_state", "created_at")
    search_fields = ("name", "code")

    def change_view(
        self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        definition = self.get_object(request, object_id)
        if definition is not None and request.method == "GET":
            for warning in definition.get_warnings():
                messages.warning(request, warning)
        return super().change_view(request, object_id, form_url, extra_context)


class TransitionInline(admin.TabularInline):
    model = EncounterTransition
    fields = READABLE_FIELDS
    readonly_fields = fields
    ordering = ("sequence",)
    extra = 0
    can_delete = False

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Encounter)
class EncounterAdmin(admin.ModelAdmin):
    list_display = ("id", "definition", "state", "version", "scheduled_at", "created_at")
    list_filter = ("definition", "state")
    readonly_fields = ("state", "origin_state", "version", "timeline_end_at", "head_hash")
    inlines = [TransitionInline]


@admin.register(EncounterTransition)
class EncounterTransitionAdmin(admin.ModelAdmin):
    list_display = ("encounter", *READABLE_FIELDS[: READABLE_FIELDS.index("reason")])
    list_filter = ("to_state",)

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False
