"""Pluggable transition validators.

A definition names its validators by dotted path (``"pkg.mod.Class"``) or as
``{"path": "pkg.mod.Class", "params": {...}}``. Only subclasses of :class:`StateValidator` are
ever instantiated, and ``ENCOUNTERS_VALIDATOR_MODULES`` can narrow which modules may be named at
all; a path outside that list is refused before anything is imported.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from abc import ABC, abstractmethod
from typing import Any

from . import conf
from .exceptions import ValidationError, ValidatorConfigurationError

#: The package's own validators are always admitted by ENCOUNTERS_VALIDATOR_MODULES.
BUILTIN_MODULE = __name__


class StateValidator(ABC):
    """Base class for transition validators.

    Subclass and implement :meth:`validate`; raise
    :class:`django_encounters.exceptions.ValidationError` to refuse the transition.
    """

    @abstractmethod
    def validate(
        self,
        encounter: Any,
        from_state: str,
        to_state: str,
        context: dict | None = None,
    ) -> None:
        """Validate a transition.

        Args:
            encounter: the (locked, freshly loaded) Encounter instance
            from_state: the state the transition starts from (the timeline's state at the
                transition's ``effective_at``)
            to_state: target state
            context: the caller's context dict

        Raises:
            ValidationError: if the transition must not happen
        """

    def required_fields(self, to_state: str) -> list[str]:
        """The encounter fields this validator needs set before entering ``to_state``: a form
        (the admin's transition form) offers them, to be written in the same step as the
        transition. None by default; override when :meth:`validate` requires fields."""
        return []


class RequiredFieldsValidator(StateValidator):
    """Requires fields to be set before entering certain states.

    ``state_requirements`` maps a state to the encounter fields that must not be ``None``,
    e.g. ``{'completed': ['ended_at'], 'in_progress': ['started_at']}``.
    """

    def __init__(self, state_requirements: dict) -> None:
        if not isinstance(state_requirements, dict):
            raise TypeError(
                f"state_requirements must be a dict of state -> fields, not {state_requirements!r}"
            )
        self.state_requirements = state_requirements

    def required_fields(self, to_state: str) -> list[str]:
        return list(self.state_requirements.get(to_state, []))

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        for field_name in self.required_fields(to_state):
            if getattr(encounter, field_name, None) is None:
                raise ValidationError(
                    self.__class__.__name__,
                    f"Field '{field_name}' is required for state '{to_state}'",
                    fields=(field_name,),
                )


class NoBackwardsTransitionValidator(StateValidator):
    """Refuses transitions to a state earlier in ``state_order`` than the current one.
    States not in ``state_order`` are not restricted."""

    def __init__(self, state_order: list) -> None:
        if isinstance(state_order, str) or not isinstance(state_order, (list, tuple)):
            raise TypeError(f"state_order must be a list of states, not {state_order!r}")
        self.state_order = list(state_order)

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        if from_state in self.state_order and to_state in self.state_order:
            if self.state_order.index(to_state) < self.state_order.index(from_state):
                raise ValidationError(
                    self.__class__.__name__,
                    f"Cannot transition backwards from '{from_state}' to '{to_state}'",
                )


class FinalStateValidator(StateValidator):
    """Refuses transitions out of final states."""

    def validate(self, encounter, from_state, to_state, context=None):  # type: ignore[no-untyped-def]
        # The pinned version's rules (on the locked encounter, without building its version).
        machine_rules = getattr(encounter, "machine_rules", None)
        rules = machine_rules() if machine_rules is not None else encounter.machine.rules()
        if rules.is_final(from_state):
            raise ValidationError(
                self.__class__.__name__,
                f"Cannot transition from final state '{from_state}'",
            )


def _module_admitted(module_path: str) -> bool:
    allowed = conf.validator_modules()
    if allowed is None or module_path == BUILTIN_MODULE:
        return True
    return any(module_path == prefix or module_path.startswith(prefix + ".") for prefix in allowed)


def get_validator_class(validator_path: Any) -> type[StateValidator]:
    """Resolve a dotted path to a :class:`StateValidator` subclass, with the safety checks.

    Raises:
        ValidatorConfigurationError: the path is malformed, outside
            ``ENCOUNTERS_VALIDATOR_MODULES``, unimportable, or not a concrete StateValidator
            subclass. Nothing named by the path is called.
    """
    if not isinstance(validator_path, str) or not validator_path.strip():
        raise ValidatorConfigurationError(validator_path, "the path must be a non-empty string")
    module_path, dot, class_name = validator_path.rpartition(".")
    if not dot or not module_path or not class_name:
        raise ValidatorConfigurationError(
            validator_path, "expected a dotted path 'package.module.ClassName'"
        )
    if not _module_admitted(module_path):
        raise ValidatorConfigurationError(
            validator_path,
            f"module '{module_path}' is not in ENCOUNTERS_VALIDATOR_MODULES "
            f"{conf.validator_modules()}",
        )
    # A path resolved before, whose module still holds that class: the same answer as the
    # checks below would give, without them (the module's attribute is looked at each time, so
    # a class replaced or a module reloaded since is resolved again).
    known = _RESOLVED.get(validator_path)
    if known is not None and _still_resolves(known, module_path, class_name):
        return known
    try:
        module = importlib.import_module(module_path)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        raise ValidatorConfigurationError(
            validator_path,
            f"module '{module_path}' cannot be imported ({type(exc).__name__}: {exc})",
        ) from exc
    try:
        validator_class = getattr(module, class_name)
    except AttributeError as exc:
        raise ValidatorConfigurationError(
            validator_path, f"module '{module_path}' has no attribute '{class_name}'"
        ) from exc
    if not (isinstance(validator_class, type) and issubclass(validator_class, StateValidator)):
        raise ValidatorConfigurationError(
            validator_path,
            f"{validator_class!r} is not a subclass of django_encounters.validators.StateValidator",
        )
    if inspect.isabstract(validator_class):
        raise ValidatorConfigurationError(
            validator_path,
            f"{validator_class.__name__} is abstract (it does not implement validate())",
        )
    if len(_RESOLVED) >= _RESOLVED_LIMIT:
        _RESOLVED.clear()
    _RESOLVED[validator_path] = validator_class
    return validator_class


def _still_resolves(known: type[StateValidator], module_path: str, class_name: str) -> bool:
    """Whether the imported module ``module_path`` still holds ``known`` as ``class_name``
    (and it is not abstract now)."""
    module = sys.modules.get(module_path)
    return (
        module is not None
        and module.__dict__.get(class_name) is known
        and not inspect.isabstract(known)
    )


#: Validator classes by the path they were resolved from (:func:`get_validator_class`).
_RESOLVED: dict[str, type[StateValidator]] = {}
_RESOLVED_LIMIT = 1024


def get_validator_instance(validator_path: str, config: dict | None = None) -> StateValidator:
    """Instantiate a validator from its class path.

    Args:
        validator_path: dotted path to a StateValidator subclass
        config: keyword arguments for its constructor

    Raises:
        ValidatorConfigurationError: see :func:`get_validator_class`, or ``config`` is not a
            dict, or the constructor refuses it.
    """
    validator_class = get_validator_class(validator_path)
    if config is not None and not isinstance(config, dict):
        raise ValidatorConfigurationError(validator_path, f"params must be a dict, not {config!r}")
    try:
        return validator_class(**config) if config else validator_class()
    except Exception as exc:  # a constructor bug must not escape as an untyped error
        raise ValidatorConfigurationError(
            validator_path, f"cannot be instantiated with params {config!r}: {exc}"
        ) from exc


def parse_validator_entry(entry: Any) -> tuple[str, dict | None]:
    """Split a definition's validator entry into ``(path, params)``.

    Raises:
        ValidatorConfigurationError: the entry is neither a path nor ``{"path", "params"}``.
    """
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, dict):
        unknown = set(entry) - {"path", "params"}
        if unknown:
            raise ValidatorConfigurationError(entry, f"unknown keys {sorted(unknown)}")
        if "path" not in entry:
            raise ValidatorConfigurationError(entry, "a dict entry needs a 'path'")
        params = entry.get("params")
        if params is not None and not isinstance(params, dict):
            raise ValidatorConfigurationError(entry, f"'params' must be a dict, not {params!r}")
        return entry["path"], params
    raise ValidatorConfigurationError(
        entry, "an entry must be a dotted path or a dict {'path': ..., 'params': {...}}"
    )
