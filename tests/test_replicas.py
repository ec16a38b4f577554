"""Read replicas: reports that may lag (``as_of``, the audit, checkpoints) read where they are
told (``using=``) or where the project's database router sends reads; the write path and the
reads of an instance right after ``transition()`` stay on the primary.

The ``replica`` alias (tests/settings.py) is a database of its own. Each test copies the
primary's rows into it with ``dumpdata``/``loaddata`` and then writes on the primary only, so
the replica really lags: an answer from the wrong database is a wrong answer, not just a query
counted on another connection.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_encounters.models import Encounter
from django_encounters.projections.audit import iter_audit
from django_encounters.projections.checkpoints import iter_heads
from django_encounters.projections.rebuild import rebuild_projections
from django_encounters.services import (
    create_encounter,
    get_encounter_history,
    get_state_at,
    time_in_states,
    transition,
)

pytestmark = pytest.mark.django_db(databases=["default", "replica"], transaction=True)

# Content types are the replica's own (their ids differ): rows refer to them by natural key.
APPS = ("auth.user", "testapp", "django_encounters")


class ReplicaRouter:
    """Reads of the package's models from ``replica``, writes to ``default``: the usual
    primary/replica router of a Django project."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "replica" if model._meta.app_label == "django_encounters" else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "default"

    def allow_relation(self, *args: Any, **hints: Any) -> bool:
        return True


def _replicate() -> None:
    """Copy the primary's rows into the replica, as streaming replication would have by now."""
    dump = io.StringIO()
    call_command(
        "dumpdata",
        *APPS,
        format="json",
        use_natural_foreign_keys=True,
        stdout=dump,
        database="default",
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "replica.json"
        path.write_text(dump.getvalue())
        call_command("loaddata", str(path), database="replica", verbosity=0)


@pytest.fixture
def lagging(visit_definition: Any, patient: Any) -> Encounter:
    """An encounter the replica knows as 'checked_in' and the primary as 'in_progress'."""
    encounter = create_encounter(visit_definition, patient)
    transition(encounter, "checked_in", reason="arrived")
    _replicate()
    transition(encounter, "in_progress", reason="seen")
    return encounter


def _on(alias: str, action: Any) -> tuple[Any, int, int]:
    """``action()``'s result and how many statements it ran on ``alias`` and on the other."""
    other = "default" if alias == "replica" else "replica"
    with CaptureQueriesContext(connections[alias]) as here:
        with CaptureQueriesContext(connections[other]) as there:
            result = action()
    return result, len(here), len(there)


def test_reads_of_an_encounter_take_using(lagging: Encounter) -> None:
    now = timezone.now()
    assert get_state_at(lagging, now) == "in_progress"
    state, here, there = _on("replica", lambda: get_state_at(lagging, now, using="replica"))
    assert (state, there) == ("checked_in", 0) and here == 1
    history = get_encounter_history(lagging, using="replica")
    assert [row.to_state for row in history] == ["checked_in"]
    assert "in_progress" not in time_in_states(lagging, using="replica")
    assert "in_progress" in time_in_states(lagging)


def test_as_of_reports_read_the_alias_of_their_queryset(lagging: Encounter) -> None:
    now = timezone.now()
    [(primary,)] = Encounter.objects.as_of(now).values_list("state_at")
    [(replica,)] = Encounter.objects.using("replica").as_of(now).values_list("state_at")
    assert (primary, replica) == ("in_progress", "checked_in")


def test_the_audit_and_checkpoints_take_using(lagging: Encounter) -> None:
    [audit] = list(iter_audit(using="replica"))
    assert audit.state_as_of == "checked_in" and not audit.anomalies
    [(entry, anomaly)] = list(iter_heads(using="replica"))
    assert (entry.version, anomaly) == (1, None)
    [(entry, _)] = list(iter_heads())
    assert entry.version == 2


def test_with_a_router_reports_read_the_replica_and_writes_go_to_the_primary(
    lagging: Encounter,
) -> None:
    with override_settings(DATABASE_ROUTERS=[ReplicaRouter()]):
        [audit], here, there = _on("replica", lambda: list(iter_audit()))
        assert audit.state_as_of == "checked_in" and there == 0 and here > 0
        [(state,)] = Encounter.objects.as_of(timezone.now()).values_list("state_at")
        assert state == "checked_in"

        # An instance read through the router comes from the replica...
        stale = Encounter.objects.get(pk=lagging.pk)
        assert stale._state.db == "replica" and stale.state == "checked_in"
        # ...but the write goes to the primary, which decides from its own (current) log,
        # and the instance's reads follow it there: read-your-writes.
        row, here, there = _on("default", lambda: transition(stale, "completed"))
        assert row.sequence == 3 and row.from_state == "in_progress"
        assert there == 0 and here >= 3
        assert stale._state.db == "default"
        state, here, there = _on("default", lambda: get_state_at(stale, timezone.now()))
        assert state == "completed" and (here, there) == (1, 0)

        # The rebuild writes: it works on the primary.
        result = rebuild_projections(check=True)
        assert result.ok and result.rows_replayed == 3
    assert Encounter.objects.using("replica").get(pk=lagging.pk).version == 1
