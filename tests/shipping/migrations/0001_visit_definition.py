# clinic/migrations/0001_visit_definition.py
from django.db import migrations

from django_encounters.shipping import retire_definition, ship_definition

VISIT = {
    "code": "CLINIC_VISIT",
    "name": "Clinic visit",
    "states": ["scheduled", "checked_in", "in_progress", "completed", "cancelled"],
    "initial_state": "scheduled",
    "final_states": ["completed", "cancelled"],
    "transitions": {
        "scheduled": ["checked_in", "cancelled"],
        "checked_in": ["in_progress", "cancelled"],
        "in_progress": ["completed", "cancelled"],
    },
    "validators": ["django_encounters.validators.FinalStateValidator"],
}


def forwards(apps, schema_editor):
    ship_definition(apps, schema_editor, **VISIT)


def backwards(apps, schema_editor):
    retire_definition(apps, schema_editor, code=VISIT["code"])


class Migration(migrations.Migration):
    dependencies = [("django_encounters", "0003_seals")]

    operations = [migrations.RunPython(forwards, backwards)]
