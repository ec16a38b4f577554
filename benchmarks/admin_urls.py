"""URLs of the admin benchmark (benchmarks/admin_pages.py): the admin alone."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
