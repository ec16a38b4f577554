"""The REST API's URLs: ``path("api/", include("django_encounters.contrib.rest_framework.urls"))``
serves ``api/encounters/`` and the rest (names in the ``encounters_api`` namespace, e.g.
``encounters_api:encounter-detail``)."""

from __future__ import annotations

from rest_framework.routers import DefaultRouter

from .views import EncounterViewSet

app_name = "encounters_api"

router = DefaultRouter()
router.register("encounters", EncounterViewSet, basename="encounter")

urlpatterns = router.urls
