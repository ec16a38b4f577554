# clinic/migrations/0002_visit_triage.py
from django.db import migrations

from django_encounters.shipping import ship_definition

#: The machine as of this migration: a triage step between check-in and the consultation.
VISIT = {
    "code": "CLINIC_VISIT",
    "name": "Clinic visit",
    "states": ["scheduled", "checked_in", "triage", "in_progress", "completed", "cancelled"],
    "initial_state": "scheduled",
    "final_states": ["completed", "cancelled"],
    "transitions": {
        "scheduled": ["checked_in", "cancelled"],
        "checked_in": ["triage", "cancelled"],
        "triage": ["in_progress", "cancelled"],
        "in_progress": ["completed", "cancelled"],
    },
    "validators": ["django_encounters.validators.FinalStateValidator"],
}

#: The machine 0001 shipped: backwards ships it again (a newer version with the old rules).
PREVIOUS = {
    **VISIT,
    "states": ["scheduled", "checked_in", "in_progress", "completed", "cancelled"],
    "transitions": {
        "scheduled": ["checked_in", "cancelled"],
        "checked_in": ["in_progress", "cancelled"],
        "in_progress": ["completed", "cancelled"],
    },
}


def forwards(apps, schema_editor):
    ship_definition(apps, schema_editor, **VISIT)


def backwards(apps, schema_editor):
    ship_definition(apps, schema_editor, **PREVIOUS)


class Migration(migrations.Migration):
    dependencies = [("clinic", "0001_visit_definition")]

    operations = [migrations.RunPython(forwards, backwards)]
