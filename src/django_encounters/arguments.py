"""Checks of the arguments of the public API, run before anything is read or written: a wrong
type raises ``TypeError``, a wrong value (a naive datetime, unsavable text) ``ValueError``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any
from uuid import UUID

from django.contrib.auth import get_user_model
from django.db import models
from django.utils import timezone

from . import conf
from .exceptions import InputLimitError


def require_aware(value: Any, name: str, *, optional: bool = False) -> None:
    """``value`` must be a timezone-aware datetime that can be expressed in UTC (None is
    accepted with ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__} {value!r}")
    if value.tzinfo is dt_timezone.utc:  # the usual case, aware and in UTC already
        return
    if timezone.is_naive(value):
        raise ValueError(
            f"{name} must be timezone-aware, got naive datetime {value!r}: use "
            "django.utils.timezone.now() for the current time, or "
            "django.utils.timezone.make_aware(value) for a naive time meant in the current "
            "time zone (value.replace(tzinfo=...) for another one)"
        )
    try:
        value.astimezone(dt_timezone.utc)
    except OverflowError as exc:
        raise ValueError(f"{name} {value!r} cannot be expressed in UTC: {exc}") from exc


def require_instance(value: Any, model: type, name: str) -> None:
    if not isinstance(value, model):
        raise TypeError(f"{name} must be an {model.__name__}, not {type(value).__name__}")


def require_saved_model(value: Any, name: str) -> None:
    """A model instance that is in the database (a UUID primary key is set before the first
    save, so ``_state.adding`` decides, not the pk)."""
    if not isinstance(value, models.Model):
        raise TypeError(f"{name} must be a saved model instance, not {type(value).__name__}")
    if value.pk is None or value._state.adding:
        raise ValueError(f"{name} {value!r} is not saved (save it first)")


def require_user(user: Any, name: str) -> None:
    """None, or a saved instance of the user model."""
    if user is None:
        return
    user_model = get_user_model()
    if not isinstance(user, user_model):
        raise TypeError(
            f"{name} must be a {user_model.__name__} instance or None, not {type(user).__name__}"
        )
    if user.pk is None or user._state.adding:
        raise ValueError(f"{name} {user!r} is not saved (it has no primary key)")


def require_text(value: Any, name: str) -> None:
    """A ``str`` the databases can store: no NUL, valid Unicode."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character (\\x00), which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode text: {exc}") from exc


def require_version(value: Any, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int, not {value!r}")


def require_positive_int(value: Any, name: str) -> None:
    """A positive ``int`` (a batch size, a number of jobs); ``bool`` is refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


def encounter_id(value: Any) -> UUID:
    """An encounter id from a UUID or its text (any form ``uuid.UUID`` accepts, surrounding
    whitespace ignored); ``ValueError`` naming the value otherwise."""
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value).strip())
    except ValueError:
        raise ValueError(f"not an encounter id (a UUID): {value!r}") from None


def encounter_ids(values: Iterable[Any]) -> list[UUID]:
    """:func:`encounter_id` of each value, in order; ``ValueError`` naming the first that is
    not one."""
    return [encounter_id(value) for value in values]


def require_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")


def transition_arguments(
    to_state: Any,
    transitioned_by: Any,
    reason: Any,
    context: Any,
    effective_at: Any,
    expected_version: Any,
    skip_validation: Any,
) -> dict:
    """Check the arguments of ``transition()``; returns the JSON copy of ``context`` that is
    stored and hashed (taken now, so that validators or receivers mutating the caller's dict
    cannot change the row after its hash was computed)."""
    if not isinstance(to_state, str):
        raise TypeError(f"to_state must be a str, not {type(to_state).__name__} {to_state!r}")
    require_user(transitioned_by, "transitioned_by")
    require_reason(reason, "reason")
    if context is not None and not isinstance(context, dict):
        raise TypeError(f"context must be a dict, not {type(context).__name__}")
    stored_context = {} if context is None else bounded_json_copy(context, "context")
    require_version(expected_version, "expected_version")
    require_aware(effective_at, "effective_at", optional=True)
    require_bool(skip_validation, "skip_validation")
    return stored_context


def require_reason(value: Any, name: str) -> None:
    """Storable text (:func:`require_text`) of at most ``ENCOUNTERS_MAX_REASON_LENGTH``
    characters (``InputLimitError`` otherwise)."""
    require_text(value, name)
    maximum = conf.max_reason_length()
    if len(value) > maximum:
        raise InputLimitError(name, "length", len(value), maximum, "ENCOUNTERS_MAX_REASON_LENGTH")


def json_depth_exceeds(value: Any, maximum: int) -> bool:
    """Whether ``value`` nests dicts and lists/tuples deeper than ``maximum`` (``{}`` is depth
    1, a scalar 0). Walked with a stack, not recursion: a value nested thousands deep is
    answered, never a ``RecursionError``; the walk stops at the first container too deep."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > maximum:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def bounded_json_copy(value: Any, name: str) -> Any:
    """:func:`json_copy` of a value that must also fit the store's limits: nesting at most
    ``ENCOUNTERS_MAX_CONTEXT_DEPTH`` deep (checked first, without recursion) and at most
    ``ENCOUNTERS_MAX_CONTEXT_BYTES`` as UTF-8 JSON. ``InputLimitError`` (a ``ValueError``)
    naming the limit and its setting otherwise."""
    depth = conf.max_context_depth()
    if json_depth_exceeds(value, depth):
        raise InputLimitError(name, "depth", depth + 1, depth, "ENCOUNTERS_MAX_CONTEXT_DEPTH")
    text = _json_text(value, name)
    size, maximum = len(text.encode("utf-8")), conf.max_context_bytes()
    if size > maximum:
        raise InputLimitError(name, "size", size, maximum, "ENCOUNTERS_MAX_CONTEXT_BYTES")
    if _contains_nul(value):
        raise ValueError(f"{name} contains a NUL character (\\x00), which cannot be stored")
    return json.loads(text)


def _json_text(value: Any, name: str) -> str:
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from exc
    return text


def json_copy(value: Any, name: str) -> Any:
    """Refuse what the JSON column or the row hash could not take: the hash serialises with
    sorted keys (mixed key types fail), strict JSON has no NaN/Infinity, and text must be
    valid UTF-8 without NUL (PostgreSQL refuses both; SQLite would store them).

    Returns the value's JSON copy (keys as JSON writes them): what is stored and hashed."""
    text = _json_text(value, name)
    if _contains_nul(value):
        raise ValueError(f"{name} contains a NUL character (\\x00), which cannot be stored")
    return json.loads(text)


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_contains_nul(v) for v in value)
    return False
