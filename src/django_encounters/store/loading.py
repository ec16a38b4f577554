"""Model instances from the rows the store reads (the write path's lock, history), without
``Model.__init__``'s per-field loop when nothing could tell the difference: a full row (every
concrete field, in order), no ``pre_init``/``post_init`` receiver for the model, and plain field
descriptors. The instance is then the one ``Model.from_db`` builds — the same ``__dict__`` and
``_state`` — at a fraction of the cost; otherwise it is built by the model's own ``from_db``.
The questions are asked once per query (:func:`loader`), not once per row."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from django.db import models
from django.db.models.base import ModelState
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init

from ..models import Encounter, EncounterTransition, ProjectedAttribute

__all__ = ["load", "loader"]

#: ``__set__`` of the descriptors whose setting of a value on a freshly created instance
#: (nothing cached on it yet) is writing it into ``__dict__``: None (Django's
#: ``DeferredAttribute`` has no ``__set__``), a foreign key's (it drops a cached related object
#: first, when there is one), and the encounter's projection columns' (``ProjectedAttribute``).
PLAIN_SETTERS: frozenset[Any] = frozenset(
    {None, ForeignKeyDeferredAttribute.__set__, ProjectedAttribute.__set__}
)

#: Per ``from_db`` a model may have (the function), what it adds to ``Model.from_db``'s
#: instance: nothing for Django's own, the loaded facts for the encounter's. A model with any
#: other ``from_db`` is loaded by it.
_FROM_DB_ADDS: dict[Any, Callable[[Any], None] | None] = {
    models.Model.from_db.__func__: None,  # type: ignore[attr-defined]
    Encounter.from_db.__func__: Encounter.remember_loaded_facts,  # type: ignore[attr-defined]
}

#: ``__init__`` methods that, given every concrete field's value positionally, only set them:
#: Django's, and ``EncounterTransition``'s (which notes a system time not given by keyword).
_PLAIN_INITS = frozenset({models.Model.__init__, EncounterTransition.__init__})

#: Per model class: its concrete fields' attribute names when a loaded row can be set straight
#: into a new instance's ``__dict__``, else None.
_PLAIN_ATTNAMES: dict[type, tuple[str, ...] | None] = {}


def _plain_attnames(cls: type[models.Model]) -> tuple[str, ...] | None:
    """The attribute names of ``cls``'s concrete fields, in ``Model.__init__``'s order, when
    every one's class attribute is a ``DeferredAttribute`` whose ``__set__`` is in
    ``PLAIN_SETTERS``; None otherwise (a custom descriptor: loaded the ORM's way)."""
    try:
        return _PLAIN_ATTNAMES[cls]
    except KeyError:
        pass
    names = tuple(f.attname for f in cls._meta.concrete_fields)
    plain = all(
        isinstance(descriptor := inspect.getattr_static(cls, name, None), DeferredAttribute)
        and getattr(type(descriptor), "__set__", None) in PLAIN_SETTERS
        for name in names
    )
    _PLAIN_ATTNAMES[cls] = names if plain else None
    return _PLAIN_ATTNAMES[cls]


def _plain_instance(cls: Any, names: tuple[str, ...], values: Sequence[Any], db: Any) -> Any:
    new = cls.__new__(cls)
    new.__dict__.update(zip(names, values, strict=True))
    state = new._state = ModelState()
    state.adding = False
    state.db = db
    return new


def _plain_then(
    cls: Any, names: tuple[str, ...], db: Any, adds: Callable[[Any], None], values: Sequence[Any]
) -> Any:
    instance = _plain_instance(cls, names, values, db)
    adds(instance)
    return instance


def loader(cls: Any, db: Any, field_names: Sequence[str]) -> Callable[[Sequence[Any]], Any]:
    """``values -> cls.from_db(db, field_names, values)`` for many rows of the same columns,
    with the questions asked once (``field_names``: every concrete field's attname, in order,
    for the fast way)."""
    own = getattr(cls.from_db, "__func__", None)
    names = _plain_attnames(cls)
    if (
        own not in _FROM_DB_ADDS
        or names is None
        or tuple(field_names) != names
        or pre_init.has_listeners(cls)
        or post_init.has_listeners(cls)
    ):
        return partial(cls.from_db, db, field_names)
    adds = _FROM_DB_ADDS[own]
    if adds is None:
        return partial(_plain_instance, cls, names, db=db)
    return partial(_plain_then, cls, names, db, adds)


def new_instance_attnames(cls: Any) -> tuple[str, ...] | None:
    """The attribute names ``cls(*values)`` sets from positional values (every concrete field,
    in order) when a new instance can be made by setting them into its ``__dict__`` with the
    same result — plain descriptors, no ``pre_init``/``post_init`` receiver, and no
    ``__init__`` of its own beyond the one ``EncounterTransition`` has, which does nothing
    for positional values; else None (call ``cls``)."""
    if (
        cls.__init__ not in _PLAIN_INITS
        or pre_init.has_listeners(cls)
        or post_init.has_listeners(cls)
    ):
        return None
    return _plain_attnames(cls)


def load(cls: Any, db: Any, field_names: Sequence[str], values: Sequence[Any]) -> Any:
    """``cls.from_db(db, field_names, values)``: one row (see :func:`loader`)."""
    return loader(cls, db, field_names)(values)
