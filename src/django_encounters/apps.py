from __future__ import annotations

import weakref
from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created

#: SQL function the SQLite DELETE trigger of migration 0002 consults (see that migration).
FLUSH_FUNCTION = "encounters_flush_in_progress"


def _install_sqlite_flush_guard(sender: Any, connection: Any, **kwargs: Any) -> None:
    """On every new SQLite connection: register ``encounters_flush_in_progress()``, which
    returns 1 only while this connection runs Django's ``execute_sql_flush`` (``manage.py
    flush``, ``TransactionTestCase`` teardown), so the append-only DELETE trigger lets Django's
    flush empty the transition table and refuses every other DELETE."""
    if connection.vendor != "sqlite":
        return
    ops = connection.ops
    if not getattr(ops, "_encounters_flush_guard", False):
        flush = ops.execute_sql_flush
        ops._encounters_flushing = False

        def execute_sql_flush(sql_list: Any) -> Any:
            ops._encounters_flushing = True
            try:
                return flush(sql_list)
            finally:
                ops._encounters_flushing = False

        ops.execute_sql_flush = execute_sql_flush
        ops._encounters_flush_guard = True

    ops_ref = weakref.ref(ops)

    def flushing() -> int:
        current = ops_ref()
        return 1 if current is not None and current._encounters_flushing else 0

    connection.connection.create_function(FLUSH_FUNCTION, 0, flushing)


class DjangoEncountersConfig(AppConfig):
    name = "django_encounters"
    label = "django_encounters"
    verbose_name = "Encounters"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import (
            checks,  # noqa: F401 - registers the system checks
            store,  # noqa: F401 - hands the models the store's operations
        )
        from .subjects import protect_configured_subjects

        protect_configured_subjects()  # ENCOUNTERS_SUBJECT_MODELS' guards

        connection_created.connect(
            _install_sqlite_flush_guard, dispatch_uid="django_encounters.sqlite_flush_guard"
        )
        # PostgreSQL: times read right whatever zone a statement moves the session to.
        connection_created.connect(
            store.converters.read_times_in_utc, dispatch_uid="django_encounters.pg_times"
        )
