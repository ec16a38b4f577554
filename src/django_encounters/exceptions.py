"""Every error raised on purpose by django-encounters is an ``EncounterError``, and every one
of them is importable from here: this module is the list.

The domain's errors live in :mod:`django_encounters.engine.errors` (no Django import) and are
re-exported here; the others are defined below (some of them also subclass a Django exception
so that Django's own handling of those applies to them).

Two errors concern validation, and their names say which: ``ValidationError`` (the engine's) is
a *transition* a ``StateValidator`` refused, and is not Django's; ``DefinitionError`` is a
*definition* that is not a valid state machine, and is both an ``EncounterError`` and Django's
``ValidationError`` (forms and the admin show it on the fields it names).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import django
from django.core.exceptions import ImproperlyConfigured
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models.deletion import ProtectedError

from .engine import errors as _engine_errors
from .engine.errors import *  # noqa: F403 - the domain's errors, re-exported
from .engine.errors import ConcurrentTransitionError, EncounterError

__all__ = [
    *_engine_errors.__all__,
    "AnomalyNotReportedError",
    "CheckpointError",
    "DatabaseLockedError",
    "DefinitionError",
    "DefinitionNotFoundError",
    "DefinitionVersionError",
    "DefinitionVersionNotFoundError",
    "DistributionError",
    "EncounterConfigurationError",
    "EventLogError",
    "EventLogWriteError",
    "FhirImportError",
    "FhirStatusError",
    "GraphvizError",
    "GraphvizNotFoundError",
    "HardDeleteRefusedError",
    "InputLimitError",
    "LogDropRefusedError",
    "RebuildWorkerError",
    "SealingRefusedError",
    "SubjectProtectedError",
    "UnknownFormatError",
    "ValidatorConfigurationError",
]


class EncounterConfigurationError(EncounterError, ImproperlyConfigured):
    """A setting of django-encounters has a value it cannot use (also an
    ``ImproperlyConfigured``)."""


class DatabaseLockedError(ConcurrentTransitionError):
    """SQLite refused the write lock to ``transition()`` (or ``upgrade_encounter()``, or the
    low-level append) of encounter ``encounter_id``: another connection was writing the database
    file (``database`` names its alias). The encounter itself was not changed by anyone, and
    nothing was written; the same call may succeed once the other writer is done.

    ``transaction_mode`` is the alias's mode (``"DEFERRED"`` when unset). In Django's default
    deferred mode a transaction that read first cannot wait for the write lock (SQLite would
    deadlock, so it refuses at once, whatever the ``timeout``): the message names the fix,
    ``OPTIONS["transaction_mode"] = "IMMEDIATE"`` (Django 5.1+), or on older Django a backend
    whose transactions begin with ``BEGIN IMMEDIATE`` (docs: "SQLite or PostgreSQL"). In
    ``IMMEDIATE`` mode it means the writer waited its whole ``OPTIONS["timeout"]`` (``timeout``,
    seconds) for the lock.

    A subclass of ``ConcurrentTransitionError`` (another writer got in the way; retrying is
    safe), which code written for earlier releases, that caught the lock under that name, still
    catches."""

    def __init__(
        self,
        encounter_id: Any,
        *,
        database: str,
        transaction_mode: str,
        timeout: float | None,
        django_version: tuple[Any, ...] = django.VERSION,
        detail: str = "database is locked",
    ) -> None:
        self.database = database
        self.transaction_mode = transaction_mode
        self.timeout = timeout
        super().__init__(encounter_id, detail=detail)
        waited = "the default 5" if timeout is None else f"{timeout:g}"
        if transaction_mode.upper() == "IMMEDIATE":
            fix = (
                f"it waited {waited} seconds for the write lock (DATABASES[{database!r}]"
                '["OPTIONS"]["timeout"]) while another connection held it: raise the timeout, '
                "keep transactions that write short, or use PostgreSQL for many concurrent "
                "writers"
            )
        elif django_version >= (5, 1):
            fix = (
                f"in SQLite's {transaction_mode} transaction mode a writer that read first cannot "
                "wait for the lock (a larger timeout does not help): set "
                f'DATABASES[{database!r}]["OPTIONS"]["transaction_mode"] = "IMMEDIATE" so that '
                "writers wait their turn"
            )
        else:
            fix = (
                f"in SQLite's {transaction_mode} transaction mode a writer that read first cannot "
                "wait for the lock (a larger timeout does not help). Django "
                f"{'.'.join(map(str, django_version[:2]))} has no "
                'OPTIONS["transaction_mode"] (Django 5.1+ has): use a database backend whose '
                "transactions begin with BEGIN IMMEDIATE (the recipe is in the docs' "
                '"SQLite or PostgreSQL" guide), or upgrade Django'
            )
        EncounterError.__init__(
            self,
            f"Encounter {encounter_id}: nothing was written, the SQLite database {database!r} "
            f"is locked by another writer ({detail}; not necessarily one of this encounter). "
            f"{fix[0].upper()}{fix[1:]}.",
        )


class ValidatorConfigurationError(EncounterConfigurationError):
    """Raised when a validator entry cannot be used: unimportable, not allowed by
    ``ENCOUNTERS_VALIDATOR_MODULES``, not a ``StateValidator`` subclass, or bad params."""

    def __init__(self, validator_path: Any, reason: str) -> None:
        self.validator_path = validator_path
        self.reason = reason
        super().__init__(f"Validator {validator_path!r} cannot be used: {reason}")


class HardDeleteRefusedError(EncounterError, ProtectedError):
    """A hard delete refused because other rows still point at the ones being deleted through
    ``PROTECT`` foreign keys (e.g. an encounter's append-only transitions). Nothing was deleted.

    Both an ``EncounterError`` and Django's ``ProtectedError`` (``protected_objects`` is kept).
    """

    def __init__(self, model: Any, error: ProtectedError) -> None:
        counts = Counter(type(obj)._meta.verbose_name for obj in error.protected_objects)
        referrers = ", ".join(f"{n} {name}(s)" for name, n in sorted(counts.items()))
        message = (
            f"{model._meta.verbose_name_plural} cannot be hard-deleted: still referenced through "
            f"protected foreign keys by {referrers}. "
        )
        if "encounter transition" in counts:
            message += "Transitions are the append-only audit trail and are never deleted; "
        message += "soft-delete with delete() instead."
        ProtectedError.__init__(self, message, error.protected_objects)

    def __str__(self) -> str:
        return str(self.args[0])


class SubjectProtectedError(EncounterError, ProtectedError):
    """Subjects (the objects encounters are about) were not deleted: their model is guarded by
    ``protect_subjects()`` (or ``ENCOUNTERS_SUBJECT_MODELS``) and encounters that are not
    soft-deleted are about them. Raised while Django collects what to delete: nothing was
    deleted, and no transaction was touched.

    Both an ``EncounterError`` and Django's ``ProtectedError`` (the admin's delete page lists
    ``protected_objects``). ``model`` is the subjects' model, ``subjects`` the instances held,
    ``count`` how many encounters are about them, ``protected_objects`` the first of those (at
    most ``SHOWN``, oldest first), which the message names with their definition and state.
    """

    #: How many encounters the message names (all are counted).
    SHOWN = 10

    def __init__(self, model: Any, subjects: list[Any], encounters: list[Any], count: int):
        self.model = model
        self.subjects = subjects
        self.count = count
        meta = model._meta
        listed = ", ".join(
            f"{encounter.pk} ({encounter.definition.code}, {encounter.state!r})"
            for encounter in encounters
        )
        if count > len(encounters):
            listed += f" and {count - len(encounters)} more"
        if len(subjects) == 1:
            what = f"{meta.label} {subjects[0].pk!r} cannot be deleted"
        else:
            pks = ", ".join(repr(subject.pk) for subject in subjects[: SubjectProtectedError.SHOWN])
            what = f"{len(subjects)} {meta.label} ({pks}) cannot be deleted"
        message = (
            f"{what}: {count} encounter(s) are about it: {listed}. Their logs are kept for "
            "good and would lose their subject. Soft-delete the encounters first "
            "(encounter.delete(): they stay in the audit, and the subject may then go), or "
            f"register the model with protect_subjects({meta.object_name}, "
            'on_delete="soft_delete") to do that on every delete. Nothing was deleted.'
        )
        # In the message's order (Django's own stubs say a set; any iterable of models works).
        ProtectedError.__init__(self, message, encounters)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return str(self.args[0])


class DefinitionError(EncounterError, DjangoValidationError):
    """An encounter definition is not a valid state machine (a state named nowhere, a
    malformed or unloadable validator entry, an unusable name or code, …): raised by
    ``EncounterDefinition.clean()``, ``full_clean()`` and ``save()``; nothing was saved.

    Both an ``EncounterError`` and Django's ``ValidationError``: ``message_dict`` maps each
    offending field to its messages, so model forms and the admin show them on the fields.
    (The library's ``ValidationError`` is another error: a validator refusing a transition.)
    """

    def __init__(self, errors: Any, *, definition_code: Any = None) -> None:
        self.definition_code = definition_code
        DjangoValidationError.__init__(self, errors)


# ---------------------------------------------------------------------------------------------
# Selections, reports and exports
# ---------------------------------------------------------------------------------------------


class DefinitionNotFoundError(EncounterError, LookupError):
    """No encounter definition (soft-deleted ones included) has the code ``code``."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(f"no encounter definition has the code {code!r}")


class DefinitionVersionNotFoundError(EncounterError, LookupError):
    """The definition ``code`` has no version ``version`` (``versions``: those it has)."""

    def __init__(self, code: str, version: int, versions: list[int]) -> None:
        self.code = code
        self.version = version
        self.versions = versions
        known = f"{versions[0]}..{versions[-1]}" if versions else "none"
        super().__init__(f"definition {code!r} has no version {version} (its versions: {known})")


class DefinitionVersionError(EncounterError):
    """The definition ``code``'s ``version`` pointer (``pointer``) does not name its last
    version (``latest``; None: it has none): it was moved back, or to a version that does not
    exist, behind the library's back. New encounters are not pinned to it; run
    ``manage.py audit_encounters`` and ``manage.py seal_encounters`` (which checks the chain of
    versions) to see what happened."""

    def __init__(self, code: str, pointer: int, latest: int | None) -> None:
        self.code = code
        self.pointer = pointer
        self.latest = latest
        last = "has no version" if latest is None else f"its last version is {latest}"
        super().__init__(
            f"definition {code!r} points to version {pointer} but {last}: its version pointer "
            "was moved behind the library's back; no encounter is pinned to it (new versions "
            "are recorded by saving the definition)"
        )


class SealingRefusedError(EncounterError):
    """``seal_encounters`` refused: anomalies nobody acknowledged stand (``anomalies``, each
    as text). Nothing was sealed: a seal vouches for a record that was verified."""

    def __init__(self, anomalies: list[str]) -> None:
        self.anomalies = anomalies
        count = len(anomalies)
        super().__init__(
            f"{count} unacknowledged anomal{'y stands' if count == 1 else 'ies stand'} "
            f"(first: {anomalies[0]}); nothing was sealed. See them with `manage.py "
            "audit_encounters` (all of them, definition versions included: `manage.py "
            "seal_encounters -v 2`); acknowledge what was examined with `manage.py "
            "acknowledge_anomaly`"
        )


class UnknownFormatError(EncounterError, ValueError):
    """``format`` is not one of the formats the ``report`` is written in (``choices``)."""

    def __init__(self, report: str, format: str, choices: tuple[str, ...]) -> None:
        self.report = report
        self.format = format
        self.choices = choices
        super().__init__(
            f"unknown {report} format {format!r} (choose one of: {', '.join(choices)})"
        )


class AnomalyNotReportedError(EncounterError, ValueError):
    """An acknowledgement refused: the audit does not report that anomaly now (``reported``
    lists what it does report for the encounter)."""

    def __init__(self, encounter_id: Any, sequence: int, kind: str, reported: list[Any]):
        self.encounter_id = encounter_id
        self.sequence = sequence
        self.kind = kind
        self.reported = reported
        listed = "; ".join(f"sequence {a.sequence}: {a.kind}" for a in reported) or "none"
        super().__init__(
            f"encounter {encounter_id} has no {kind!r} anomaly at sequence {sequence} to "
            f"acknowledge (its audit reports: {listed})"
        )


class CheckpointError(EncounterError, ValueError):
    """A checkpoint that cannot be used or written: unreadable, not JSON, another format, an
    entry out of order, a root that does not match its entries (``path`` names the file,
    ``reason`` says what is wrong)."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"checkpoint {path}: {reason}")


class RebuildWorkerError(EncounterError, RuntimeError):
    """A worker process failed; the message carries its error. The other workers were
    stopped; every batch either committed or rolled back, so a re-run finishes the job."""


class EventLogError(EncounterError):
    """An event log could not be exported (see the subclasses)."""


class EventLogWriteError(EventLogError, OSError):
    """The file ``path`` could not be written (``detail``: why); nothing was left at ``path``
    (an earlier file there is kept unchanged)."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"cannot write the event log to {path}: {detail}")


class FhirStatusError(EncounterError, ValueError):
    """A state of the encounter has no valid FHIR ``encounter-status`` code in ``fhir_version``
    (``"R4"`` or ``"R5"``): ``status_map`` does not map it, or maps it to ``code``, which is not
    one of ``valid_codes``. Also a ``ValueError``."""

    def __init__(
        self,
        encounter_id: Any,
        state: str,
        code: Any,
        fhir_version: str,
        *,
        mapped: bool,
        valid_codes: tuple[str, ...],
    ) -> None:
        self.encounter_id = encounter_id
        self.state = state
        self.code = code
        self.fhir_version = fhir_version
        self.valid_codes = valid_codes
        how = f"status_map maps it to {code!r}" if mapped else "status_map does not map it"
        super().__init__(
            f"Encounter {encounter_id}: state {state!r} has no FHIR {fhir_version} "
            f"encounter-status code ({how}; valid codes: {', '.join(self.valid_codes)})"
        )


class FhirImportError(EncounterError, ValueError):
    """A FHIR resource could not be imported (``resource``: what it is, e.g. ``Encounter/emerg``
    in ``visits.json``; ``reason``: why; ``from_state``/``to_state``: the transition refused,
    when one was). Nothing of the file was written. Also a ``ValueError``."""

    def __init__(
        self,
        resource: str,
        reason: str,
        *,
        from_state: str | None = None,
        to_state: str | None = None,
    ) -> None:
        self.resource = resource
        self.reason = reason
        self.from_state = from_state
        self.to_state = to_state
        move = f" ({from_state!r} -> {to_state!r})" if to_state is not None else ""
        super().__init__(f"cannot import {resource}{move}: {reason}; nothing was imported")


class InputLimitError(EncounterError, ValueError):
    """An argument exceeds a size limit of the store (also a ``ValueError``): ``argument``
    (``"reason"``, ``"context"``, ``"metadata"``) is ``actual`` where ``limit`` allows at most
    ``maximum`` (``limit``: ``"length"`` in characters, ``"size"`` in UTF-8 JSON bytes,
    ``"depth"`` of nesting), set by the setting ``setting``. Nothing was written."""

    UNITS = {"length": "characters", "size": "bytes of JSON", "depth": "levels of nesting"}

    def __init__(self, argument: str, limit: str, actual: int, maximum: int, setting: str) -> None:
        self.argument = argument
        self.limit = limit
        self.actual = actual
        self.maximum = maximum
        self.setting = setting
        units = self.UNITS.get(limit, "")
        shown = f"more than {maximum}" if limit == "depth" else str(actual)
        super().__init__(
            f"{argument} is too large: {shown} {units}, at most {maximum} allowed ({setting}); "
            f"shorten it (or raise {setting}). Nothing was written."
        )


class DistributionError(EncounterError):
    """The database cannot be distributed as asked (no Citus, a foreign key from elsewhere into
    a table that must be distributed, a table already distributed differently)."""


class GraphvizNotFoundError(EncounterError):
    """Graphviz's ``dot`` program, needed for SVG, is not installed (not on ``PATH``)."""

    def __init__(self, program: str) -> None:
        self.program = program
        super().__init__(
            f"SVG needs Graphviz: the program {program!r} was not found on PATH (install "
            f"Graphviz, e.g. Debian's 'graphviz' package, or write Mermaid or DOT text)"
        )


class GraphvizError(EncounterError):
    """Graphviz could not draw the graph (``returncode``: its exit status, None when it did not
    finish; ``detail``: what it said)."""

    def __init__(self, program: str, returncode: int | None, detail: str) -> None:
        self.program = program
        self.returncode = returncode
        self.detail = detail
        status = "did not finish" if returncode is None else f"exited with status {returncode}"
        super().__init__(f"Graphviz ({program}) {status}: {detail or 'no message'}")


class LogDropRefusedError(EncounterError):
    """A backwards migration of ``django_encounters`` refused: the database ``database`` holds
    ``transitions`` rows of the append-only, tamper-evident log, and unapplying the package's
    migrations drops its protections (the seals of ``0003``, the triggers of ``0002``) and, at
    ``zero``, the log itself. Nothing was changed. Set ``ENCOUNTERS_ALLOW_DROPPING_LOG = True``
    for the one run that must do it (after a backup)."""

    def __init__(self, database: str, transitions: int) -> None:
        self.database = database
        self.transitions = transitions
        rows = f"{transitions} transition{'' if transitions == 1 else 's'}"
        super().__init__(
            f"refusing to unapply django_encounters' migrations on database {database!r}: it "
            f"holds {rows} of the append-only, tamper-evident log, and going back drops the "
            "log's seals (0003), its append-only triggers (0002) and, at zero, the log itself "
            "(0001) — destroyed, with no way for an audit to tell what was there. Nothing was "
            "changed. If that is really meant (a backup taken: docs' Operations, 'Backups'), "
            "set ENCOUNTERS_ALLOW_DROPPING_LOG = True in the settings for this one run"
        )
