"""The clinic's admin: patients, found by name, each with its visits.

The encounters themselves are the library's admin (``django_encounters.admin``): a visit's page
there shows its state, its timeline and one button per allowed next state. This admin gets a
person from the patient to that page:

* the patient list searches the name (``search_fields``) and shows, per patient, how many
  visits there are (linked to the encounter list filtered by the patient) and the state of the
  latest one;
* the patient's page lists the patient's visits, each linked to its encounter page, with links
  to the filtered encounter list and to "Add encounter" with the patient filled in.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import quote, unquote
from django.contrib.contenttypes.models import ContentType
from django.db.models import CharField, Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Cast
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from clinic.models import Patient
from django_encounters.models import Encounter, EncounterDefinition


def encounters_of(patient: Patient) -> QuerySet[Encounter]:
    """The patient's encounters (not soft-deleted), the latest scheduled first."""
    return (
        Encounter.objects.filter(
            subject_content_type=ContentType.objects.get_for_model(Patient),
            subject_id=str(patient.pk),
        )
        .select_related("definition")
        .order_by("-scheduled_at", "-created_at")
    )


def encounter_list_url(patient_pk: Any) -> str:
    """The library's encounter list, filtered to the patient's encounters."""
    query = urlencode(
        {
            "subject_content_type__id__exact": ContentType.objects.get_for_model(Patient).pk,
            "subject_id": str(patient_pk),
        }
    )
    return f"{reverse('admin:django_encounters_encounter_changelist')}?{query}"


def new_encounter_url(patient: Patient) -> str:
    """The library's "Add encounter" form with the patient filled in (and the definition, when
    there is only one to choose)."""
    initial: dict[str, Any] = {
        "subject_content_type": ContentType.objects.get_for_model(Patient).pk,
        "subject_id": str(patient.pk),
    }
    definitions = list(EncounterDefinition.objects.values_list("pk", flat=True)[:2])
    if len(definitions) == 1:
        initial["definition"] = definitions[0]
    return f"{reverse('admin:django_encounters_encounter_add')}?{urlencode(initial)}"


def _of_each_patient() -> QuerySet[Encounter]:
    """The encounters of the patient of the outer query (for a ``Subquery``)."""
    return Encounter.objects.filter(
        subject_content_type=ContentType.objects.get_for_model(Patient),
        subject_id=Cast(OuterRef("pk"), output_field=CharField()),
    )


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    list_display = ("name", "visits", "latest_visit")
    search_fields = ("name",)
    search_help_text = "Search by the patient's name (any part of it, e.g. “Okafor”)."
    ordering = ("name",)
    fields = ("name",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Patient]:
        # The two columns as subqueries: one query for the whole page, and sortable.
        latest = _of_each_patient().order_by("-scheduled_at", "-created_at")
        return (
            super()
            .get_queryset(request)
            .annotate(
                visit_count=Subquery(
                    _of_each_patient()
                    .order_by()
                    .values("subject_id")
                    .annotate(n=Count("pk"))
                    .values("n"),
                    output_field=IntegerField(),
                ),
                latest_state=Subquery(latest.values("state")[:1]),
            )
        )

    @admin.display(description="visits", ordering="visit_count")
    def visits(self, obj: Patient) -> Any:
        count = getattr(obj, "visit_count", None) or 0
        return format_html('<a href="{}">{}</a>', encounter_list_url(obj.pk), count)

    @admin.display(description="latest visit", ordering="latest_state")
    def latest_visit(self, obj: Patient) -> str:
        return getattr(obj, "latest_state", None) or "—"

    def change_view(
        self, request: Any, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        patient = self.get_object(request, unquote(object_id))
        if patient is not None:
            extra_context = {**(extra_context or {}), **self._visits_context(request, patient)}
        return super().change_view(request, object_id, form_url, extra_context)

    def _encounter_admin(self) -> admin.ModelAdmin | None:
        # (AdminSite.get_model_admin() is Django >= 5.0's name for this lookup.)
        return self.admin_site._registry.get(Encounter)

    def _can_view_encounters(self, request: HttpRequest) -> bool:
        encounter_admin = self._encounter_admin()
        return encounter_admin is not None and encounter_admin.has_view_or_change_permission(
            request
        )

    def get_list_display(self, request: HttpRequest) -> Any:
        """The visit columns only for those who may see encounters."""
        if self._can_view_encounters(request):
            return self.list_display
        return ("name",)

    def _visits_context(self, request: HttpRequest, patient: Patient) -> dict[str, Any]:
        """The "Visits" panel of the patient's page (its template is
        ``clinic/templates/admin/clinic/patient/change_form.html``): each visit linked to its
        encounter page, for those who may see encounters."""
        if not self._can_view_encounters(request):
            return {"can_view_encounters": False}
        encounter_admin = self._encounter_admin()
        assert encounter_admin is not None
        visits = [
            {
                "encounter": encounter,
                "short_id": str(encounter.pk)[:8],
                "url": reverse(
                    "admin:django_encounters_encounter_change", args=[quote(encounter.pk)]
                ),
            }
            for encounter in encounters_of(patient)
        ]
        return {
            "can_view_encounters": True,
            "patient_visits": visits,
            "encounter_list_url": encounter_list_url(patient.pk),
            "new_encounter_url": new_encounter_url(patient)
            if encounter_admin.has_add_permission(request)
            else None,
        }
