"""Permissions of the REST API, through Django REST framework's permission classes."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission, DjangoModelPermissions

from ...models import TRANSITION_PERMISSION

#: What the exports need (``GET event-log/``, ``GET encounters/{id}/fhir/``): to view
#: encounters *and* their transitions — an export is every row of the selected logs (reasons,
#: who, when), soft-deleted encounters included unless left out.
EXPORT_PERMISSIONS = (
    "django_encounters.view_encounter",
    "django_encounters.view_encountertransition",
)


class EncounterPermissions(DjangoModelPermissions):
    """Django's model permissions, as ``DjangoModelPermissions`` maps them to methods, with
    reads needing ``view_encounter`` too; the transition action needs ``change_encounter`` and
    ``transition_encounter`` (as in the admin) instead of ``add_encounter``."""

    perms_map = {
        **DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
    }
    #: What ``POST …/{id}/transition/`` needs.
    transition_perms = ("django_encounters.change_encounter", TRANSITION_PERMISSION)

    def has_permission(self, request: Any, view: Any) -> bool:
        action = getattr(view, "action", None)
        if action in ("transition", "fhir"):
            needed = self.transition_perms if action == "transition" else EXPORT_PERMISSIONS
            user = request.user
            return bool(user and user.is_authenticated and user.has_perms(needed))
        return bool(super().has_permission(request, view))


class ExportPermission(BasePermission):
    """The exports: an authenticated user holding :data:`EXPORT_PERMISSIONS`
    (``view_encounter`` and ``view_encountertransition``)."""

    def has_permission(self, request: Any, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.has_perms(EXPORT_PERMISSIONS))
