"""django-encounters: an event-sourced encounter store for Django.

Everything public is importable from here; imports are lazy so that importing the package does
not need configured settings.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # Models
    "EncounterDefinition": "models",
    "Encounter": "models",
    "EncounterTransition": "models",
    "EncounterDefinitionVersion": "models",
    # Validators
    "StateValidator": "validators",
    "RequiredFieldsValidator": "validators",
    "NoBackwardsTransitionValidator": "validators",
    "FinalStateValidator": "validators",
    "get_validator_instance": "validators",
    # Services
    "create_encounter": "services",
    "transition": "services",
    "upgrade_encounter": "services",
    "run_validators": "services",
    "get_encounter_history": "services",
    "get_state_at": "services",
    "duration_in_state": "services",
    "time_in_states": "services",
    # Async services (each runs its sync counterpart in one thread-sensitive call)
    "acreate_encounter": "services",
    "atransition": "services",
    "aget_state_at": "services",
    "aget_encounter_history": "services",
    "aupgrade_encounter": "services",
    "atime_in_states": "services",
    "aduration_in_state": "services",
    "aas_of": "services",
    # Exceptions
    "EncounterError": "exceptions",
    "InvalidTransitionError": "exceptions",
    "ValidationError": "exceptions",
    "EncounterNotFoundError": "exceptions",
    "ConcurrentTransitionError": "exceptions",
    "ValidatorConfigurationError": "exceptions",
    "InvalidStateError": "exceptions",
    "HardDeleteRefusedError": "exceptions",
    "ProjectionDriftError": "exceptions",
    "DefinitionError": "exceptions",
    "SubjectProtectedError": "exceptions",
    # Subjects (what a subject's delete does to its encounters)
    "protect_subjects": "subjects",
    "EncounterRelation": "subjects",
    # Signals
    "pre_transition": "signals",
    "post_transition": "signals",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
