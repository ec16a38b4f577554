"""Every error raised on purpose by django-encounters is an ``EncounterError``.

The domain's errors live in :mod:`django_encounters.engine.errors` (no Django import) and are
re-exported here; the two below also subclass a Django exception so that Django's own handling
of those applies to them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.models.deletion import ProtectedError

from .engine import errors as _engine_errors
from .engine.errors import *  # noqa: F403 - the domain's errors, re-exported
from .engine.errors import EncounterError

__all__ = [
    *_engine_errors.__all__,
    "EncounterConfigurationError",
    "HardDeleteRefusedError",
    "ValidatorConfigurationError",
]


class EncounterConfigurationError(EncounterError, ImproperlyConfigured):
    """A setting of django-encounters has a value it cannot use (also an
    ``ImproperlyConfigured``)."""


class ValidatorConfigurationError(EncounterConfigurationError):
    """Raised when a validator entry cannot be used: unimportable, not allowed by
    ``ENCOUNTERS_VALIDATOR_MODULES``, not a ``StateValidator`` subclass, or bad params."""

    def __init__(self, validator_path: Any, reason: str) -> None:
        self.validator_path = validator_path
        self.reason = reason
        super().__init__(f"Validator {validator_path!r} cannot be used: {reason}")


class HardDeleteRefusedError(EncounterError, ProtectedError):
    """A hard delete refused because other rows still point at the ones being deleted through
    ``PROTECT`` foreign keys (e.g. an encounter's append-only transitions). Nothing was deleted.

    Both an ``EncounterError`` and Django's ``ProtectedError`` (``protected_objects`` is kept).
    """

    def __init__(self, model: Any, error: ProtectedError) -> None:
        counts = Counter(type(obj)._meta.verbose_name for obj in error.protected_objects)
        referrers = ", ".join(f"{n} {name}(s)" for name, n in sorted(counts.items()))
        message = (
            f"{model._meta.verbose_name_plural} cannot be hard-deleted: still referenced through "
            f"protected foreign keys by {referrers}. "
        )
        if "encounter transition" in counts:
            message += "Transitions are the append-only audit trail and are never deleted; "
        message += "soft-delete with delete() instead."
        ProtectedError.__init__(self, message, error.protected_objects)

    def __str__(self) -> str:
        return str(self.args[0])
