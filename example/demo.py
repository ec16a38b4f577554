#!/usr/bin/env python
"""A walk through django-encounters on a fresh SQLite database (``make demo``).

1. A patient visit (the definition of the README's quickstart) goes
   scheduled -> checked_in -> in_progress -> completed; then its timeline and what
   ``get_state_at`` answers at a few moments.
2. Backdated transitions on a second visit, a backdated transition that the history refuses,
   and bitemporal questions ("what did we believe at time K about time T?") via ``known_at``.
3. The log proving itself: a checkpoint (every encounter's head and one root digest to publish
   elsewhere), then someone with write access rewrites a row *and* recomputes the whole hash
   chain and the projection — the plain audit can no longer tell, the audit against the
   checkpoint names the encounter — and a projection edited by SQL that ``transition()``
   refuses to trust.

Every run starts from an empty database in a temporary directory, which is deleted afterwards.
The script checks its own results and exits non-zero if the library behaves otherwise.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # makes `demo_project` and `clinic` importable


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if value else "-"


def print_timeline(title: str, history) -> None:
    print(f"\n{title}")
    header = (
        f"{'seq':>3}  {'effective_at':<26}  {'transitioned_at':<26}  "
        f"{'from -> to':<26}  {'by':<12}  reason"
    )
    print(header)
    print("-" * len(header))
    for row in history:
        by = row.transitioned_by.get_username() if row.transitioned_by else "-"
        edge = f"{row.from_state or '(new)'} -> {row.to_state}"
        print(
            f"{row.sequence:>3}  {fmt_time(row.effective_at):<26}  "
            f"{fmt_time(row.transitioned_at):<26}  {edge:<26}  {by:<12}  {row.reason or ''}"
        )


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"demo: unexpected result: {what}")


def readme_example() -> None:
    from clinic.models import Patient
    from django.contrib.auth import get_user_model
    from django.test import RequestFactory
    from django.utils import timezone

    # The example calls these two but its import list leaves them out.
    from django_encounters import get_encounter_history, get_state_at

    User = get_user_model()
    print("=" * 100)
    print("1. The usage example")
    print("=" * 100)

    # The names the example expects to exist.
    patient = Patient.objects.create(name="Ada Lovelace")
    request = RequestFactory().get("/visits/new")
    request.user = User.objects.create_user("frontdesk")
    receptionist = User.objects.create_user("receptionist")
    doctor = User.objects.create_user("dr_house")
    appointment_time = timezone.now() + timedelta(minutes=2)
    before_everything = timezone.now()
    time.sleep(0.01)

    # ---- the example, as written ----------------------------------------------------------
    # (SPEC's README example verbatim, its layout and unused imports included.)
    # fmt: off
    from django_encounters import (  # noqa: I001, F401
        EncounterDefinition, create_encounter, transition,
        RequiredFieldsValidator, NoBackwardsTransitionValidator
    )
    visit_def = EncounterDefinition.objects.create(
        name='Patient Visit', code='VISIT',
        states=['scheduled', 'checked_in', 'in_progress', 'completed', 'cancelled'],
        initial_state='scheduled', final_states=['completed', 'cancelled'],
        transitions={'scheduled': ['checked_in', 'cancelled'], 'checked_in': ['in_progress', 'cancelled'], 'in_progress': ['completed', 'cancelled']},  # noqa: E501
        validators=['django_encounters.validators.FinalStateValidator',
            {'path': 'django_encounters.validators.RequiredFieldsValidator',
             'params': {'state_requirements': {'completed': ['ended_at'], 'in_progress': ['started_at']}}}])  # noqa: E501
    encounter = create_encounter(definition=visit_def, subject=patient, created_by=request.user, scheduled_at=appointment_time)  # noqa: E501
    transition(encounter, 'checked_in', transitioned_by=receptionist)
    encounter.started_at = timezone.now(); encounter.save()  # noqa: E702
    transition(encounter, 'in_progress', transitioned_by=doctor)
    encounter.ended_at = timezone.now(); encounter.save()  # noqa: E702
    transition(encounter, 'completed', transitioned_by=doctor, reason='Visit concluded')
    history = get_encounter_history(encounter)
    # (the example leaves `some_past_time` to the reader: take the moment between check-in and
    # the start of the consultation)
    checked_in_row = next(r for r in history if r.to_state == "checked_in")
    in_progress_row = next(r for r in history if r.to_state == "in_progress")
    some_past_time = checked_in_row.effective_at + (
        in_progress_row.effective_at - checked_in_row.effective_at
    ) / 2
    past_state = get_state_at(encounter, some_past_time)
    # fmt: on
    # ---- end of the example ---------------------------------------------------------------

    print(
        f"\nEncounter {encounter.pk} of {patient} ({visit_def.code}), "
        f"scheduled for {fmt_time(appointment_time)}"
    )
    print_timeline("Timeline (get_encounter_history):", history)
    check(
        [r.sequence for r in history] == sorted(r.sequence for r in history),
        "history is ordered by sequence",
    )
    check(
        [r.to_state for r in history][-3:] == ["checked_in", "in_progress", "completed"],
        f"history ends checked_in, in_progress, completed: {[r.to_state for r in history]}",
    )
    check(history[-1].reason == "Visit concluded", "the reason is recorded")

    print("\nget_state_at(encounter, t):")
    moments = [("before the first transition", before_everything)]
    for earlier, later in itertools.pairwise(history):
        moments.append(
            (
                f"between '{earlier.to_state}' and '{later.to_state}'",
                earlier.effective_at + (later.effective_at - earlier.effective_at) / 2,
            )
        )
    moments.append(("now", timezone.now()))
    for label, moment in moments:
        print(f"  {label:<40} {fmt_time(moment)}  ->  {get_state_at(encounter, moment)!r}")
    print(f"  {'some_past_time (the example)':<40} {fmt_time(some_past_time)}  ->  {past_state!r}")
    check(past_state == "checked_in", f"past_state is 'checked_in', not {past_state!r}")
    check(get_state_at(encounter, timezone.now()) == "completed", "state now is 'completed'")


def backdating_example() -> None:
    from clinic.models import Patient
    from django.contrib.auth import get_user_model
    from django.utils import timezone

    from django_encounters import (
        EncounterDefinition,
        create_encounter,
        get_encounter_history,
        get_state_at,
        transition,
    )
    from django_encounters.exceptions import InvalidTransitionError

    User = get_user_model()
    print()
    print("=" * 100)
    print("2. Backdating, and what we knew when (bitemporal queries)")
    print("=" * 100)

    nurse = User.objects.create_user("nurse_joy")
    doctor = User.objects.get(username="dr_house")
    visit_def = EncounterDefinition.objects.get(code="VISIT")
    patient = Patient.objects.create(name="Charles Babbage")

    now = timezone.now()
    two_hours_ago = now - timedelta(hours=2)
    ninety_minutes_ago = now - timedelta(minutes=90)
    one_hour_ago = now - timedelta(hours=1)
    half_hour_ago = now - timedelta(minutes=30)

    # The visit happened this morning but is entered into the system only now.
    enc2 = create_encounter(
        definition=visit_def, subject=patient, created_by=nurse, scheduled_at=two_hours_ago
    )
    time.sleep(0.01)
    known_after_create = timezone.now()
    time.sleep(0.01)

    transition(
        enc2,
        "checked_in",
        transitioned_by=nurse,
        effective_at=two_hours_ago,
        reason="Entered late: arrival at the desk",
    )
    time.sleep(0.01)
    known_after_check_in = timezone.now()
    time.sleep(0.01)

    enc2.started_at = one_hour_ago
    enc2.save()
    transition(
        enc2,
        "in_progress",
        transitioned_by=doctor,
        effective_at=one_hour_ago,
        reason="Entered late: consultation began",
    )

    print_timeline(f"Timeline of encounter {enc2.pk} ({patient}):", get_encounter_history(enc2))

    print(
        "\nA backdated 'cancelled', effective 90 minutes ago (between the check-in and the "
        "consultation):"
    )
    try:
        transition(
            enc2,
            "cancelled",
            transitioned_by=nurse,
            effective_at=ninety_minutes_ago,
            reason="Patient left?",
        )
    except InvalidTransitionError as exc:
        print(f"  refused, InvalidTransitionError: {exc}")
    else:
        raise SystemExit("demo: the backdated 'cancelled' should have been refused")

    print("\nWhat was the state 30 minutes ago (t = now - 30 min)?")
    questions = [
        ("as known right after creating the record", known_after_create, "scheduled"),
        ("as known after entering the check-in", known_after_check_in, "checked_in"),
        ("as known now (known_at=None)", None, "in_progress"),
    ]
    for label, known_at, expected in questions:
        answer = get_state_at(enc2, half_hour_ago, known_at=known_at)
        print(f"  {label:<42} known_at={fmt_time(known_at):<26} ->  {answer!r}")
        check(answer == expected, f"{label}: expected {expected!r}, got {answer!r}")

    print(
        "\nWhat was the state 90 minutes ago, as known now?  ->  "
        f"{get_state_at(enc2, ninety_minutes_ago)!r}"
    )
    check(
        get_state_at(enc2, ninety_minutes_ago) == "checked_in",
        "90 minutes ago the patient was checked in",
    )


def _attacker_rewrites_history(encounter) -> None:
    """What someone with write access and knowledge of the format can do on SQLite: drop the
    append-only triggers, change a row, recompute every hash after it and the projection,
    and put the triggers back. Shown here so the checkpoint has something to catch."""
    from django.db import connection

    from django_encounters import store
    from django_encounters.engine import row_hash
    from django_encounters.models import Encounter, EncounterTransition

    table = EncounterTransition._meta.db_table
    rows = store.load_stream(encounter.pk, "default")
    rows[0].reason = "nothing happened here"
    previous = Encounter.objects.get(pk=encounter.pk).genesis_hash
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = %s",
            [table],
        )
        triggers = cursor.fetchall()
        for name, _ in triggers:
            cursor.execute(f"DROP TRIGGER {name}")
        for row in rows:
            row.hash = previous = row_hash(encounter.pk, row, previous)
            cursor.execute(
                f"UPDATE {table} SET reason = %s, hash = %s"
                " WHERE encounter_id = %s AND sequence = %s",
                [row.reason, row.hash, encounter.pk.hex, row.sequence],
            )
        cursor.execute(
            f"UPDATE {Encounter._meta.db_table} SET head_hash = %s WHERE id = %s",
            [previous, encounter.pk.hex],
        )
        for _, sql in triggers:
            cursor.execute(sql)


def integrity_example(workdir: str) -> None:
    import io

    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.db import connection

    from django_encounters import transition
    from django_encounters.exceptions import ProjectionDriftError
    from django_encounters.models import Encounter

    print()
    print("=" * 100)
    print("3. The log proves itself: a checkpoint, a rewritten history, an edited projection")
    print("=" * 100)

    def run(*args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        try:
            call_command(*args, stdout=out, stderr=err)
            return 0, out.getvalue()
        except CommandError as exc:
            return exc.returncode, out.getvalue() + f"CommandError: {exc}\n"

    path = os.path.join(workdir, "checkpoint.json")
    code, out = run("checkpoint_encounters", "--output", path)
    root = out.strip().splitlines()[-1]
    print(f"\n$ manage.py checkpoint_encounters --output checkpoint.json\n  root: {root}")
    print("  (publish the root somewhere the database's writers cannot reach: a ticket, an email)")
    check(code == 0, "the checkpoint was written")
    code, _ = run("audit_encounters", "--against", path, "--root", root)
    print(f"\n$ manage.py audit_encounters --against checkpoint.json --root <root>  -> exit {code}")
    check(code == 0, "the audit against a fresh checkpoint is clean")

    victim = Encounter.objects.order_by("created_at").first()
    _attacker_rewrites_history(victim)
    print(f"\nSomeone with write access rewrites row 1 of encounter {victim.pk},")
    print(
        "recomputes every hash after it and the projection's head hash, and restores the triggers."
    )
    code, _ = run("audit_encounters")
    print(f"\n$ manage.py audit_encounters  -> exit {code}  (the recomputed chain is consistent)")
    check(code == 0, "a fully recomputed chain passes the plain audit")
    code, out = run("audit_encounters", "--against", path, "--root", root)
    lines = [line for line in out.splitlines() if "rewritten" in line]
    print(f"$ manage.py audit_encounters --against checkpoint.json --root <root>  -> exit {code}")
    for line in lines[:3]:
        print(f"  {line.strip()}")
    check(code == 1 and bool(lines), "the checkpoint catches the rewritten history")

    other = Encounter.objects.order_by("created_at").last()
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Encounter._meta.db_table} SET state = 'scheduled' WHERE id = %s",
            [other.pk.hex],
        )
    print(f"\nThe state of encounter {other.pk} is set to 'scheduled' by SQL.")
    try:
        transition(other, "cancelled")
        check(False, "transition() refuses an edited projection")
    except ProjectionDriftError as exc:
        print(f"  transition(..., 'cancelled') refused, ProjectionDriftError: {exc}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="encounters-demo-") as tmp:
        # A new database file for every run (read by demo_project/settings.py).
        os.environ["ENCOUNTERS_DEMO_DB"] = os.path.join(tmp, "demo.sqlite3")
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_project.settings")

        import django

        django.setup()

        from django.core.management import call_command
        from django.db import connections

        print(f"Database: {os.environ['ENCOUNTERS_DEMO_DB']} (fresh, deleted afterwards)")
        call_command("migrate", verbosity=0)
        try:
            readme_example()
            backdating_example()
            integrity_example(tmp)
        finally:
            connections.close_all()
    print("\nDemo finished.")


if __name__ == "__main__":
    main()
