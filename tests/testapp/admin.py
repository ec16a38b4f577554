"""The subject models in the admin, so that an encounter's subject column links to them."""

from django.contrib import admin

from .models import Device, Patient

admin.site.register(Patient)
admin.site.register(Device)
