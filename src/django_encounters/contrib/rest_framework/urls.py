"""The REST API's URLs: ``path("api/", include("django_encounters.contrib.rest_framework.urls"))``
serves ``api/encounters/``, ``api/event-log/`` and the rest (names in the ``encounters_api``
namespace, e.g. ``encounters_api:encounter-detail``). Any other path under the prefix answers a
``404`` Problem: give these URLs a prefix of their own."""

from __future__ import annotations

from django.urls import path, re_path
from rest_framework.routers import DefaultRouter

from .problems import not_found_view
from .views import EncounterViewSet, EventLogView

app_name = "encounters_api"

router = DefaultRouter()
router.register("encounters", EncounterViewSet, basename="encounter")

urlpatterns = [
    *router.urls,
    path("event-log/", EventLogView.as_view(), name="event-log"),
    # Last: any other path under the API's prefix is a 404 Problem, not the project's HTML page
    # (include these URLs under a prefix of their own).
    re_path(r"^(?P<unmatched>.*)$", not_found_view, name="not-found"),
]
