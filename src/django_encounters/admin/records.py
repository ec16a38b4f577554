"""The read-only facts: the transition log, definition versions, acknowledgements."""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils.html import format_html

from ..engine import READABLE_FIELDS
from ..models import (
    AnomalyAcknowledgement,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from .common import (
    ReadOnlyMixin,
    ZoneSafeDateHierarchyMixin,
    local_time,
    short_id,
    subject_html,
)

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
