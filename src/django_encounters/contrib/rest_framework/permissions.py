"""Permissions of the REST API, through Django REST framework's permission classes."""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import DjangoModelPermissions

from ...models import TRANSITION_PERMISSION


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
        if getattr(view, "action", None) == "transition":
            user = request.user
            return bool(user and user.is_authenticated and user.has_perms(self.transition_perms))
        return bool(super().has_permission(request, view))
