"""A guard, no schema change: unapplying the package's migrations on a database that holds
transitions is refused unless ``ENCOUNTERS_ALLOW_DROPPING_LOG = True``.

Going back past this migration drops the log's seals (0003), its append-only triggers (0002)
and, at ``zero``, the log itself (0001): ``manage.py migrate django_encounters zero`` would
otherwise destroy the tamper-evident log without a word. Backwards, this runs first (it is the
last migration), counts the transitions with the historical model — a plain ``count()``, which
works on SQLite, PostgreSQL and Citus's distributed tables alike — and raises
``LogDropRefusedError`` before anything is dropped. Forwards it does nothing.

A later migration whose reverse destroys recorded data should run the same guard
(``refuse_unless_allowed``) as its own reverse step.
"""

from django.db import migrations


def refuse_unless_allowed(apps, schema_editor):
    from django_encounters.conf import allow_dropping_log
    from django_encounters.exceptions import LogDropRefusedError

    if allow_dropping_log():
        return
    alias = schema_editor.connection.alias
    transitions = apps.get_model("django_encounters", "EncounterTransition")
    count = transitions._base_manager.using(alias).count()
    if count:
        raise LogDropRefusedError(alias, count)


class Migration(migrations.Migration):
    dependencies = [
        ("django_encounters", "0003_seals"),
    ]

    operations = [
        migrations.RunPython(migrations.RunPython.noop, refuse_unless_allowed, elidable=False),
    ]
