"""Shipping definitions with data migrations.

A definition is data, so a project ships it — and every change to it — in a data migration
(``RunPython``), which runs once per database, in order, with the schema of its point in
history. There the models are the migration state's *historical* models
(``apps.get_model(...)``), which have none of the model's methods: a plain
``update_or_create()`` of ``EncounterDefinition`` would neither check the machine nor record
its version (``latest_version()`` then refuses to pin encounters to it). These functions do
both with the historical models, as ``EncounterDefinition.save()`` does:

* :func:`ship_definition`: create the definition ``code``, or update it; a changed machine is
  recorded as a new version (hashed and chained like every version); the same machine again
  records nothing, so running it twice is running it once.
* :func:`retire_definition`: soft-delete it (what a migration that created it does
  backwards: its versions are append-only, and encounters may point at it).

A change is reversed by shipping the previous machine again: a newer version with the old
rules (versions are never removed). See docs/guides/definitions.md.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from django.utils import timezone

from .models import MACHINE_FIELDS, EncounterDefinition, version_content_hash

__all__ = ["retire_definition", "ship_definition"]

_APP = "django_encounters"


def ship_definition(
    apps: Any,
    schema_editor: Any,
    *,
    code: str,
    name: str,
    states: list[str],
    initial_state: str,
    final_states: list[str],
    transitions: dict[str, list[str]],
    validators: list[Any] | None = None,
    description: str = "",
    metadata: dict[str, Any] | None = None,
) -> int:
    """Create or update the definition ``code`` in a data migration (``apps``,
    ``schema_editor``: what ``RunPython`` passes), on the migration's database; returns the
    version new encounters are now pinned to. A soft-deleted definition is restored.

    Raises:
        DefinitionError: the machine is not valid (as ``EncounterDefinition.clean()`` says;
            also Django's ``ValidationError``). Nothing was written.
    """
    machine = {
        "states": list(states),
        "initial_state": initial_state,
        "final_states": list(final_states),
        "transitions": {source: list(targets) for source, targets in transitions.items()},
        "validators": list(validators or []),
    }
    # The checks of clean(), on an unsaved instance of the model (no database is read).
    EncounterDefinition(name=name, code=code, description=description, **machine).clean()
    definitions = apps.get_model(_APP, "EncounterDefinition")
    versions = apps.get_model(_APP, "EncounterDefinitionVersion")
    using = schema_editor.connection.alias
    with transaction.atomic(using=using):
        definition = (
            definitions._base_manager.using(using).select_for_update().filter(code=code).first()
        )
        latest = None
        if definition is None:
            definition = definitions(id=uuid.uuid4(), code=code, version=0)
        else:
            latest = (
                versions._base_manager.using(using)
                .filter(definition_id=definition.pk)
                .order_by("-number")
                .first()
            )
        changed = latest is None or {f: getattr(latest, f) for f in MACHINE_FIELDS} != machine
        definition.name = name
        definition.description = description
        definition.metadata = dict(metadata or {})
        definition.deleted_at = None
        for field, value in machine.items():
            setattr(definition, field, value)
        if changed:
            definition.version = (latest.number if latest is not None else 0) + 1
        definition.save(using=using)
        if changed:
            content_hash, seal = version_content_hash(definition, latest)
            versions._base_manager.using(using).create(
                id=uuid.uuid4(),
                definition_id=definition.pk,
                number=definition.version,
                content_hash=content_hash,
                seal=seal,
                **machine,
            )
        return int(definition.version)


def retire_definition(apps: Any, schema_editor: Any, *, code: str) -> None:
    """Soft-delete the definition ``code`` in a data migration (nothing when it does not
    exist): no new encounter can be created with it; its versions and encounters stay."""
    definitions = apps.get_model(_APP, "EncounterDefinition")
    now = timezone.now()
    definitions._base_manager.using(schema_editor.connection.alias).filter(
        code=code, deleted_at__isnull=True
    ).update(deleted_at=now, updated_at=now)
