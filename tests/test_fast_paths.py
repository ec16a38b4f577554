"""The write and read paths' shortcuts give exactly what the ORM gives, on every backend.

* ``converters.value_adapter``: what a field's ``get_db_prep_save`` would send the driver;
* ``store.loading``: the instance the model's ``from_db`` would build, and the ORM's own way as
  soon as anything could tell the difference (an init signal receiver, a deferred field).
"""

from __future__ import annotations

import uuid
import zoneinfo
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from django.db import connection, connections
from django.db.models import F
from django.db.models.signals import post_init, pre_init

from django_encounters.models import (
    Encounter,
    EncounterDefinition,
    EncounterDefinitionVersion,
    EncounterTransition,
)
from django_encounters.services import get_encounter_history, transition
from django_encounters.store import loading
from django_encounters.store.converters import value_adapter
from django_encounters.store.statements import statements

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc
AWARE = datetime(2026, 3, 29, 1, 59, 59, 999000, tzinfo=UTC)
VALUES = [
    None,
    "",
    "checked_in",
    "ünïcode ✓",
    0,
    7,
    2**40,
    True,
    Decimal("3"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    uuid.uuid4(),
    "12345678-1234-5678-1234-567812345678",
    AWARE,
    AWARE.replace(microsecond=0),
    AWARE.astimezone(zoneinfo.ZoneInfo("Europe/Paris")),
    AWARE.astimezone(dt_timezone(timedelta(hours=-5))),
    AWARE.replace(tzinfo=zoneinfo.ZoneInfo("UTC")),
    F("version"),
]


def _prepared(adapt, value):
    """(result, None) or (None, exception type) of one way of preparing ``value``."""
    try:
        return adapt(value), None
    except Exception as exc:  # noqa: BLE001 - the two ways must fail alike too
        return None, type(exc)


def _both_ways(f, values):
    """``(value, the adapter's (result, error), get_db_prep_save's (result, error))`` for each
    of ``values`` through field ``f``."""
    adapt = value_adapter(connection, f)
    slow = partial(f.get_db_prep_save, connection=connection)
    for value in values:
        yield value, _prepared(adapt, value), _prepared(slow, value)


@pytest.mark.parametrize("model", [Encounter, EncounterTransition], ids=["encounter", "transition"])
def test_value_adapters_send_what_get_db_prep_save_sends(model):
    fields = [f for f in model._meta.concrete_fields if f.get_internal_type() != "JSONField"]
    checked = 0
    for f in fields:
        for value, got, expected in _both_ways(f, VALUES):
            if expected[1] is not None:
                assert got[1] is expected[1], (f.name, value)
                continue
            assert got == expected, (f.name, value)
            assert type(got[0]) is type(expected[0]), (f.name, value)
            checked += 1
    assert checked > 60  # the shortcuts were exercised, not only the fallbacks


JSON_VALUES = [
    None,
    {},
    {"k": [1, "ü"], "n": None, "f": 1.5, "t": True},
    {"nested": {"deep": [{"x": "✓"}]}},
    {1: "int key"},
    {"bad": object()},
    {"nan": float("nan")},
    [],
    [1, 2],
    "text",
    7,
]


@pytest.mark.parametrize("model", [Encounter, EncounterTransition], ids=["encounter", "transition"])
def test_json_adapters_send_what_get_db_prep_save_sends(model):
    """The JSON columns (``metadata``): the same text on SQLite, the same adapted object
    elsewhere, the same error for what JSON cannot hold."""
    fields = [f for f in model._meta.concrete_fields if f.get_internal_type() == "JSONField"]
    assert fields
    for f in fields:
        for value, got, expected in _both_ways(f, JSON_VALUES):
            assert got[1] is expected[1], (f.name, value)
            assert type(got[0]) is type(expected[0]), (f.name, value)
            if isinstance(expected[0], str):
                assert got[0] == expected[0], (f.name, value)
            elif expected[0] is not None:  # psycopg's Jsonb wrapper
                assert repr(got[0].obj) == repr(expected[0].obj), (f.name, value)


def test_the_store_prepares_every_written_column_through_an_adapter():
    st = statements(connections["default"])
    assert len(st.insert_adapters) == len(st.insert_fields)
    assert set(st.encounter_adapters) == {f.attname for f in Encounter._meta.concrete_fields}


def test_a_row_written_by_transition_reads_back_as_the_orm_wrote_it(encounter, user):
    when = AWARE.astimezone(zoneinfo.ZoneInfo("America/New_York"))
    record = transition(encounter, "checked_in", transitioned_by=user, effective_at=when)
    stored = EncounterTransition.objects.get(pk=record.pk)
    for f in EncounterTransition._meta.concrete_fields:
        assert getattr(stored, f.attname) == getattr(record, f.attname), f.name
    assert stored.effective_at == AWARE
    assert Encounter.objects.filter(pk=encounter.pk, timeline_end_at=AWARE).exists()


# -- loading ----------------------------------------------------------------------------------


def _fields_of(instance):
    return {k: v for k, v in instance.__dict__.items() if k != "_state"}


@pytest.mark.parametrize(
    "model", [Encounter, EncounterDefinition, EncounterDefinitionVersion, EncounterTransition]
)
def test_a_loaded_instance_is_the_one_model_init_builds(model, encounter):
    transition(encounter, "checked_in")
    for loaded in model._base_manager.all():
        names = [f.attname for f in model._meta.concrete_fields]
        values = [getattr(loaded, n) for n in names]
        reference = model(*values)  # Model.__init__'s positional way, as Model.from_db does
        reference._state.adding, reference._state.db = False, loaded._state.db
        orm = model.from_db(loaded._state.db, names, values)
        fast = loading.load(model, loaded._state.db, names, values)
        assert type(fast) is model
        assert (fast._state.adding, fast._state.db) == (False, loaded._state.db)
        assert fast._state.fields_cache == {}
        fast_fields, reference_fields = _fields_of(fast), _fields_of(reference)
        for name in names:
            assert fast_fields[name] == reference_fields[name], name
        assert fast == reference
        assert fast.pk == loaded.pk
        assert _fields_of(fast) == _fields_of(orm)  # what from_db adds too (an encounter's facts)


def test_the_store_loads_its_rows_the_fast_way():
    """The lock's and history's columns are every concrete field in order: their rows are
    loaded without ``Model.__init__`` (a loader of the model's own ``from_db`` would still give
    the same instances, only slower — nothing else would notice)."""
    st = statements(connections["default"])
    encounter, definition_fk, version_fk = st.lock_models
    models = (encounter, definition_fk.related_model, version_fk.model)
    loaders = [
        loading.loader(model, "default", names)
        for model, names in zip(models, st.lock_attnames, strict=False)
    ]
    loaders.append(loading.loader(EncounterTransition, "default", st.history_attnames))
    assert [getattr(load, "func", load).__name__ for load in loaders] == [
        "_plain_then",  # an encounter also remembers its loaded definition and subject
        "_plain_instance",
        "_plain_instance",
        "_plain_instance",
    ]


def test_a_model_with_another_from_db_is_loaded_by_it(encounter, monkeypatch):
    calls = []
    plain = EncounterDefinition.from_db

    def from_db(cls, db, field_names, values):
        calls.append(values[0])
        return plain(db, field_names, values)

    monkeypatch.setattr(EncounterDefinition, "from_db", classmethod(from_db))
    names = [f.attname for f in EncounterDefinition._meta.concrete_fields]
    values = EncounterDefinition._base_manager.filter(pk=encounter.definition_id)
    values = list(values.values_list(*names).get())
    loaded = loading.load(EncounterDefinition, "default", names, values)
    assert (loaded.pk, calls) == (encounter.definition_id, [encounter.definition_id])


def test_init_signal_receivers_still_see_every_loaded_instance(encounter):
    transition(encounter, "checked_in")
    seen = []

    def receiver(sender, instance, **kwargs):
        seen.append(instance.pk)

    post_init.connect(receiver, sender=EncounterTransition)
    try:
        rows = get_encounter_history(encounter)
        listed = list(EncounterTransition.objects.filter(encounter=encounter))
    finally:
        post_init.disconnect(receiver, sender=EncounterTransition)
    assert [r.pk for r in rows] == [listed[0].pk]
    assert seen.count(rows[0].pk) == 2


def test_pre_init_receivers_see_loaded_encounters(encounter):
    seen = []

    def receiver(sender, args, kwargs, **extra):
        seen.append(args)

    pre_init.connect(receiver, sender=Encounter)
    try:
        transition(encounter, "checked_in")  # the write path loads the locked encounter
        Encounter.objects.get(pk=encounter.pk)
    finally:
        pre_init.disconnect(receiver, sender=Encounter)
    assert len(seen) == 2
    assert all(encounter.pk in args for args in seen)


def test_deferred_fields_load_the_orms_way(encounter):
    loaded = Encounter.objects.only("state").get(pk=encounter.pk)
    assert loaded.get_deferred_fields() >= {"notes", "metadata"}
    assert loaded.notes == encounter.notes  # loaded on access, as always
    loaded_full = Encounter.objects.get(pk=encounter.pk)
    assert loaded_full.get_deferred_fields() == set()


def test_a_loaded_transition_keeps_its_system_time(encounter):
    transition(encounter, "checked_in")
    loaded = EncounterTransition.objects.get(encounter=encounter)
    assert loaded._system_time_given is True
    assert EncounterTransition(encounter=encounter)._system_time_given is False
    assert EncounterTransition(encounter=encounter, transitioned_at=AWARE)._system_time_given


# -- converters -------------------------------------------------------------------------------


def test_history_reads_the_values_the_orm_reads(employment, user):
    whole_second = AWARE.replace(microsecond=0) - timedelta(days=3)
    transition(employment, "working", transitioned_by=user, effective_at=whole_second)
    transition(employment, "onleave", context={"k": [1, "ü"]}, reason="leave")
    transition(employment, "working")
    history = get_encounter_history(employment)
    orm = list(EncounterTransition.objects.filter(encounter=employment).order_by("sequence"))
    assert len(history) == len(orm) == 3
    for ours, theirs in zip(history, orm, strict=True):
        for f in EncounterTransition._meta.concrete_fields:
            mine, expected = getattr(ours, f.attname), getattr(theirs, f.attname)
            assert (mine, type(mine)) == (expected, type(expected)), f.name
        assert ours.effective_at.tzinfo is UTC
        assert ours.encounter is employment
    assert history[0].effective_at == whole_second


@pytest.mark.parametrize(
    "raw",
    [
        "12345678123456781234567812345678",
        "ABCDEF78123456781234567812345678",
        "a_bcdef8123456781234567812345678",
        " 2345678123456781234567812345678",
        "-2345678123456781234567812345678",
        "{2345678123456781234567812345678",
        "12345678-1234-5678-1234-567812345678",
        "not a uuid",
        "g2345678123456781234567812345678",
    ],
)
def test_a_stored_uuid_converts_as_djangos_converter_does(raw):
    from django_encounters.store.converters import column_converter

    target = connections["default"]
    field = EncounterTransition._meta.get_field("encounter")
    convert = column_converter(target, field)
    if target.vendor != "sqlite":
        pytest.skip("PostgreSQL's driver returns UUID objects")
    expression = field.get_col(EncounterTransition._meta.db_table)
    steps = target.ops.get_db_converters(expression) + expression.get_db_converters(target)

    def django(value):
        for step in steps:
            value = step(value, expression, target)
        return value

    for _ in range(2):  # the second time from the converter's memory of the last value
        try:
            expected = django(raw)
        except ValueError:
            with pytest.raises(ValueError):
                convert(raw)
        else:
            assert convert(raw) == expected
            assert type(convert(raw)) is uuid.UUID


def test_the_packages_settings_are_read_again_when_django_says_they_changed(
    settings: Any,
) -> None:
    """conf remembers what it read (an unset setting costs an exception inside django.conf on
    every read); a change through the settings fixture or override_settings, a setting removed
    included, is seen at once."""
    from django.test import override_settings

    from django_encounters import conf

    assert conf.max_reason_length() == conf.DEFAULT_MAX_REASON_LENGTH
    settings.ENCOUNTERS_MAX_REASON_LENGTH = 5
    assert conf.max_reason_length() == 5
    del settings.ENCOUNTERS_MAX_REASON_LENGTH
    assert conf.max_reason_length() == conf.DEFAULT_MAX_REASON_LENGTH
    with override_settings(ENCOUNTERS_FUTURE_TOLERANCE=0):
        assert conf.future_tolerance() == timedelta(0)
    assert conf.future_tolerance() == conf.DEFAULT_FUTURE_TOLERANCE
    assert conf.sealer() is None
    with override_settings(ENCOUNTERS_SEAL_KEYS={"k1": "s" * 48}):
        assert conf.sealer() is not None
    assert conf.sealer() is None


def test_the_lock_reads_the_values_the_orm_reads(employment, user):
    """The write path's lock (datetimes selected as text on SQLite, issue 23) loads the
    encounter, its definition and its pinned version with the ORM's values and types."""
    from django.db import transaction as db_transaction

    from django_encounters.store import lock_encounter
    from django_encounters.store.writes import locked_machine

    whole_second = AWARE.replace(microsecond=0) - timedelta(days=3)
    transition(employment, "working", transitioned_by=user, effective_at=whole_second)
    transition(employment, "onleave", reason="leave")
    Encounter.objects.filter(pk=employment.pk).update(
        scheduled_at=AWARE, started_at=AWARE.replace(microsecond=0)
    )
    with db_transaction.atomic():
        locked = lock_encounter(employment.pk, "default")
        lazy = locked_machine(locked)
        assert lazy is not None
        definition, machine = locked.definition, locked.machine
    orm = Encounter.objects.select_related("definition").get(pk=employment.pk)
    orm_machine = EncounterDefinitionVersion.objects.get(
        definition=orm.definition, number=orm.definition_version
    )
    for ours, theirs in ((locked, orm), (definition, orm.definition), (machine, orm_machine)):
        for f in type(theirs)._meta.concrete_fields:
            mine, expected = getattr(ours, f.attname), getattr(theirs, f.attname)
            assert (mine, type(mine)) == (expected, type(expected)), f.name
            if isinstance(mine, datetime):
                assert mine.tzinfo is UTC, f.name
    assert locked.scheduled_at == AWARE
    assert locked.timeline_end_at == orm.timeline_end_at is not None


@pytest.mark.parametrize(
    "raw",
    [
        "2026-03-29 01:59:59.999000",
        "2026-03-29 01:59:59",
        "2026-03-29T01:59:59.5",
        "2026-03-29 01:59:59+02:00",
        "2026-03-29 01:59:59.25-05:00",
        "2026-03-29",
        "2026-02-30 01:59:59",
        "not a time",
    ],
)
def test_a_stored_datetime_text_converts_as_djangos_converter_does(raw):
    """A datetime column selected as text (SQLite, UTC: the lock, the history, the streams)
    converts to what the driver's declared-type parsing and Django's converter make of it."""
    from django.utils.dateparse import parse_datetime

    from django_encounters.store.converters import column_converter

    target = connections["default"]
    if target.vendor != "sqlite":
        pytest.skip("SQLite's datetime text")
    field = Encounter._meta.get_field("scheduled_at")
    convert = column_converter(target, field)
    expression = field.get_col(Encounter._meta.db_table)
    steps = target.ops.get_db_converters(expression) + expression.get_db_converters(target)

    def django(value):
        value = parse_datetime(value)  # the driver's converter of a declared column
        for step in steps:
            value = step(value, expression, target)
        return value

    try:
        expected = django(raw)
    except (ValueError, TypeError, AttributeError) as exc:
        with pytest.raises(type(exc)):
            convert(raw)
    else:
        mine = convert(raw)
        assert (mine, type(mine)) == (expected, type(expected))
        if isinstance(mine, datetime):
            assert mine.utcoffset() == expected.utcoffset()
