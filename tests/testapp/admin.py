"""The subject models in the admin, so that an encounter's subject column links to them. Patients
are searched by name (the encounter list's search box uses it); devices have no search fields
of their own (a test names them with ENCOUNTERS_ADMIN_SUBJECT_SEARCH_FIELDS)."""

from django.contrib import admin

from .models import Device, Patient


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    search_fields = ("name",)


admin.site.register(Device)
