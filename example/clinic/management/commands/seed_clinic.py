"""``manage.py seed_clinic``: a clinic to look at in the admin (``make admin-demo``).

Creates, each only when missing:

* the ``VISIT`` definition of the README's usage example (scheduled → checked_in →
  in_progress → completed, or cancelled; ``started_at`` required to start, ``ended_at`` to
  complete);
* three staff users who moved the visits on (``reception``, ``dr_grey``, ``nurse_joy``; no
  password: they cannot log in);
* ``--patients`` patients (40 by default) with realistic names — the first is "Amara Okafor" —
  and, for each patient created, a few visits made with ``create_encounter()`` and moved on with
  ``transition()``: past visits completed or cancelled weeks ago (entered now, backdated with
  ``effective_at``), and one visit today — still scheduled, checked in, in progress, completed,
  a no-show — or next week;
* the superuser ``admin`` with password ``admin`` (an existing ``admin`` is left as it is).

Running it again adds nothing that is there (patients are recognised by name), so it can run
before every ``runserver``; a larger ``--patients`` adds the missing ones. Everything is written
in one transaction: a run that fails leaves nothing half-seeded.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta
from math import lcm
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.utils import timezone

from clinic.definitions import VISIT
from clinic.models import Patient
from django_encounters import EncounterDefinition, create_encounter, transition
from django_encounters.models import Encounter

GIVEN_NAMES = (
    "Amara Erik Mei Santiago Priya Tomasz Aisha Kenji Ingrid Mateo Fatima Liam Yuki Olumide "
    "Sofia Rahul Chiara Dmitri Nia Hamid Astrid Diego Leila Jonas Thandiwe Marek Anh Isabel "
    "Kwame Elif Niamh Arjun Lucía Sven Zainab Hiroshi Margit"
).split()
FAMILY_NAMES = (
    "Okafor Lindqvist Tanaka Herrera Raman Kowalski Haddad Sato Johansson Rossi Mensah O'Brien "
    "Nakamura Adeyemi Moreau Iyer Bianchi Volkov Mwangi Karimi Nilsson Alvarez Farah Becker "
    "Ndlovu Novak Nguyen Costa Asante Yilmaz Gallagher Sharma Ortega Eriksson Abubakar "
    "Kobayashi Szabo Dubois Petrov Hansen Quispe"
).split()
#: Patient ``i`` is GIVEN_NAMES[i % 37] FAMILY_NAMES[i % 41]: no two alike for this many.
MAX_PATIENTS = lcm(len(GIVEN_NAMES), len(FAMILY_NAMES))

#: What happens today to patient ``i``'s visit: TODAY[i % len(TODAY)] (patient 0, Amara
#: Okafor, has a visit still scheduled: the one to move on in the admin).
TODAY = (
    "scheduled",
    "checked_in",
    "in_progress",
    "completed",
    "next_week",
    "cancelled",
    "scheduled",
    "checked_in",
)
NOTES = (
    "Annual check-up",
    "Follow-up: blood pressure",
    "Persistent cough",
    "Vaccination",
    "Knee pain after a fall",
    "Repeat prescription",
    "Lab results review",
    "Migraine",
)
STAFF = {
    "reception": ("Rosa", "Delgado"),
    "dr_grey": ("Meredith", "Grey"),
    "nurse_joy": ("Joy", "Ellis"),
}
SUPERUSER = ("admin", "admin")


def patient_name(index: int) -> str:
    return f"{GIVEN_NAMES[index % len(GIVEN_NAMES)]} {FAMILY_NAMES[index % len(FAMILY_NAMES)]}"


class Command(BaseCommand):
    help = (
        "Seed the example clinic: the VISIT definition, patients with realistic names and "
        "visits in every state (some entered late, backdated), and the superuser admin/admin. "
        "Idempotent: what is already there is left alone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--patients",
            type=int,
            default=40,
            metavar="N",
            help=f"How many patients the clinic has (default 40, at most {MAX_PATIENTS}); "
            "missing ones are added with their visits.",
        )
        parser.add_argument(
            "--url",
            default="http://127.0.0.1:8000/admin/",
            help="Where the admin will be served, printed with the login "
            "(default http://127.0.0.1:8000/admin/).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        count = options["patients"]
        if not 0 <= count <= MAX_PATIENTS:
            raise CommandError(f"--patients must be between 0 and {MAX_PATIENTS}, not {count}.")
        missing = {Patient._meta.db_table, Encounter._meta.db_table} - set(
            connection.introspection.table_names()
        )
        if missing:
            raise CommandError(
                f"The database has no table {', '.join(sorted(missing))}: run "
                "`manage.py migrate` first."
            )
        with transaction.atomic():
            definition, made_definition = self.visit_definition()
            staff = self.staff()
            made_patients, states = self.patients(count, definition, staff)
            made_superuser = self.superuser()

        say = self.stdout.write
        say(
            f"Visit definition {definition.code} ({definition.name}): "
            + ("created" if made_definition else "already there")
        )
        total = Patient.objects.count()
        say(f"Patients: {made_patients} created ({total} in total)")
        made = sum(states.values())
        by_state = ", ".join(f"{state} {n}" for state, n in sorted(states.items()))
        say(
            f"Visits: {made} created"
            + (f" ({by_state})" if made else "")
            + f"; {Encounter.objects.count()} in total"
        )
        username, password = SUPERUSER
        if made_superuser:
            say(f"Superuser {username!r} created.")
        else:
            say(f"Superuser {username!r} already exists: left as it is.")
        say(self.style.SUCCESS(f"\nLog in at {options['url']} as {username} / {password}"))
        say(f"Then search the patients for {patient_name(0).split()[-1]!r}, open the patient")
        say("and follow the visit to its page: its buttons move it on.")

    # -- the parts --------------------------------------------------------------------------

    def visit_definition(self) -> tuple[EncounterDefinition, bool]:
        found = EncounterDefinition.all_objects.filter(code=VISIT["code"]).first()
        if found is None:
            return EncounterDefinition.objects.create(**VISIT), True
        if found.deleted_at is not None:
            raise CommandError(
                f"The definition {found.code} ({found.name}) is soft-deleted: restore it "
                "(admin: Encounter definitions, filter 'deleted' → 'Deleted', open it, "
                "'Restore') and run seed_clinic again."
            )
        return found, False

    def staff(self) -> dict[str, Any]:
        User = get_user_model()
        users = {}
        for username, (first, last) in STAFF.items():
            user = User._default_manager.filter(username=username).first()
            if user is None:
                user = User(username=username, first_name=first, last_name=last)
                user.set_unusable_password()
                user.save()
            users[username] = user
        return users

    def superuser(self) -> bool:
        User = get_user_model()
        username, password = SUPERUSER
        if User._default_manager.filter(username=username).exists():
            return False
        User._default_manager.create_superuser(
            username=username, email="admin@example.com", password=password
        )
        return True

    def patients(
        self, count: int, definition: EncounterDefinition, staff: dict[str, Any]
    ) -> tuple[int, Counter[str]]:
        names = [patient_name(index) for index in range(count)]
        existing = set(Patient.objects.filter(name__in=names).values_list("name", flat=True))
        now = timezone.now()
        made, states = 0, Counter[str]()
        for index, name in enumerate(names):
            if name in existing:
                continue
            patient = Patient.objects.create(name=name)
            made += 1
            visits = Visits(definition, patient, staff, random.Random(f"clinic-{index}"), now)
            for _ in range(visits.rng.randint(0, 3)):
                states[visits.past()] += 1
            states[visits.today(TODAY[index % len(TODAY)])] += 1
        return made, states


class Visits:
    """One patient's visits, made through the public API; every time is in the past except a
    scheduled visit's appointment."""

    def __init__(
        self,
        definition: EncounterDefinition,
        patient: Patient,
        staff: dict[str, Any],
        rng: random.Random,
        now: datetime,
    ) -> None:
        self.definition = definition
        self.patient = patient
        self.reception = staff["reception"]
        self.doctor = staff["dr_grey"]
        self.nurse = staff["nurse_joy"]
        self.rng = rng
        self.now = now.replace(second=0, microsecond=0)

    def book(self, scheduled_at: datetime) -> Encounter:
        return create_encounter(
            self.definition,
            self.patient,
            created_by=self.reception,
            assigned_to=self.doctor,
            scheduled_at=scheduled_at,
            notes=self.rng.choice(NOTES),
        )

    def arrive(self, visit: Encounter, at: datetime, late_entry: bool = False) -> None:
        reason = "Arrived at the front desk"
        if late_entry:
            reason += " (entered late)"
        transition(
            visit, "checked_in", transitioned_by=self.reception, reason=reason, effective_at=at
        )

    def start(self, visit: Encounter, at: datetime) -> None:
        visit.started_at = at
        visit.save()
        transition(
            visit,
            "in_progress",
            transitioned_by=self.doctor,
            reason="Called into the consulting room",
            effective_at=at,
        )

    def finish(self, visit: Encounter, at: datetime) -> None:
        visit.ended_at = at
        visit.save()
        transition(
            visit,
            "completed",
            transitioned_by=self.doctor,
            reason="Visit concluded",
            effective_at=at,
        )

    def cancel(self, visit: Encounter, at: datetime, reason: str) -> None:
        transition(
            visit, "cancelled", transitioned_by=self.reception, reason=reason, effective_at=at
        )

    def past(self) -> str:
        """A visit weeks or months ago, completed (or cancelled), all of it entered now."""
        day = self.now - timedelta(days=self.rng.randint(7, 180))
        slot = day.replace(hour=self.rng.randint(8, 16), minute=self.rng.choice((0, 20, 40)))
        visit = self.book(slot)
        if self.rng.random() < 0.2:
            self.cancel(
                visit, slot - timedelta(hours=self.rng.randint(2, 48)), "Cancelled by phone"
            )
            return "cancelled"
        self.arrive(visit, slot - timedelta(minutes=self.rng.randint(0, 15)), late_entry=True)
        self.start(visit, slot + timedelta(minutes=self.rng.randint(0, 25)))
        self.finish(visit, slot + timedelta(minutes=self.rng.randint(35, 60)))
        return "completed"

    def today(self, kind: str) -> str:
        """Today's visit (or next week's), left in the state ``kind`` names."""
        minutes = self.rng.randint(5, 50)
        if kind in ("scheduled", "next_week"):
            ahead = timedelta(days=7) if kind == "next_week" else timedelta(minutes=15 + minutes)
            self.book(self.now + ahead)
            return "scheduled"
        if kind == "checked_in":
            visit = self.book(self.now + timedelta(minutes=minutes // 5))
            self.arrive(visit, self.now - timedelta(minutes=minutes))
            return "checked_in"
        if kind == "in_progress":
            visit = self.book(self.now - timedelta(minutes=minutes + 10))
            self.arrive(visit, self.now - timedelta(minutes=minutes + 15))
            self.start(visit, self.now - timedelta(minutes=minutes))
            return "in_progress"
        if kind == "completed":
            slot = self.now - timedelta(hours=3, minutes=minutes)
            visit = self.book(slot)
            self.arrive(visit, slot - timedelta(minutes=5))
            self.start(visit, slot + timedelta(minutes=10))
            self.finish(visit, slot + timedelta(minutes=40))
            return "completed"
        if kind == "cancelled":
            slot = self.now - timedelta(hours=1, minutes=minutes)
            visit = self.book(slot)
            self.cancel(visit, slot + timedelta(minutes=20), "No-show")
            return "cancelled"
        raise ValueError(f"unknown kind of visit {kind!r}")
