"""The output layer: every format a report or export is written in, and the one way files are
written.

* :class:`Format` — one entry per format: which report it renders (``"audit"``,
  ``"event-log"``, …), its name (``"csv"``), the writer, the content type and the newline its
  text stream must be opened with. Writers register themselves with :func:`register_format`
  (a decorator) in the module that renders them; :func:`get_format` and :func:`formats` find
  them. Adding a format is one decorated function in that module.
* times as every report writes them: :func:`in_zone`, :func:`local_iso` (ISO-8601 in the
  current time zone) and :func:`utc_iso` (ISO-8601 in UTC);
* :func:`write_atomically` — a file written under a temporary name beside its target and moved
  into place only when complete (never half a report at the target), fsynced with its
  directory, with the permissions ``open(path, "w")`` would give it (an existing file keeps
  its own); it never changes the process's umask.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone
from importlib import import_module
from typing import IO, Any

from django.utils import timezone

from ..exceptions import UnknownFormatError

__all__ = [
    "Format",
    "formats",
    "get_format",
    "in_zone",
    "local_iso",
    "register_format",
    "utc_iso",
    "write_atomically",
]

#: The modules whose writers register formats (imported when a format is first looked up).
WRITER_MODULES = (
    "django_encounters.projections.rendering",
    "django_encounters.projections.event_log",
    "django_encounters.projections.ocel",
    "django_encounters.projections.checkpoints.building",
)


@dataclass(frozen=True)
class Format:
    """One output format of one report."""

    report: str  # "audit", "event-log", …
    name: str  # "table", "csv", "json", "xes", …
    write: Callable[..., Any]
    content_type: str
    #: What the text stream is opened with (``open(..., newline=...)``): ``""`` for CSV (the
    #: writer ends its lines itself), ``"\n"`` for text with Unix line ends, None for the
    #: platform's.
    newline: str | None = "\n"
    description: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.report, self.name)


_REGISTRY: dict[tuple[str, str], Format] = {}
_loaded = False


def register_format(
    report: str,
    name: str,
    *,
    content_type: str,
    newline: str | None = "\n",
    description: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the writer of ``report`` in format ``name``.

    Raises:
        ValueError: ``report`` already has a format ``name`` (a format is registered once).
    """

    def register(write: Callable[..., Any]) -> Callable[..., Any]:
        entry = Format(report, name, write, content_type, newline, description)
        if entry.key in _REGISTRY:
            raise ValueError(
                f"the {report} report already has a format {name!r} "
                f"({_REGISTRY[entry.key].write.__module__}); a format is registered once"
            )
        _REGISTRY[entry.key] = entry
        return write

    return register


def unregister_format(report: str, name: str) -> None:
    """Remove a registered format (for tests that register their own)."""
    _REGISTRY.pop((report, name), None)


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in WRITER_MODULES:
            import_module(module)
        _loaded = True


def formats(report: str) -> tuple[str, ...]:
    """The names of ``report``'s formats, in registration order."""
    _load()
    return tuple(name for (kind, name) in _REGISTRY if kind == report)


def get_format(report: str, name: str) -> Format:
    """``report``'s format ``name``.

    Raises:
        UnknownFormatError: ``report`` has no such format (the message lists those it has).
    """
    _load()
    entry = _REGISTRY.get((report, name))
    if entry is None:
        raise UnknownFormatError(report, name, formats(report))
    return entry


# ---------------------------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------------------------


def in_zone(value: datetime, tz: tzinfo | None = None) -> datetime:
    """``value`` (aware) in ``tz`` (default: the current time zone, ``TIME_ZONE`` unless one
    is activated). A time that zone cannot express — the first hours of year 1 west of UTC, the
    last of year 9999 east of it — is given in UTC instead of failing the whole report."""
    try:
        return timezone.localtime(value, tz)
    except OverflowError:
        return value.astimezone(dt_timezone.utc)


def local_iso(value: datetime | None, tz: tzinfo | None = None) -> str | None:
    """ISO-8601 with offset in the current time zone (or ``tz``); None stays None."""
    return None if value is None else in_zone(value, tz).isoformat()


def utc_iso(value: datetime, timespec: str = "auto") -> str:
    """ISO-8601 in UTC (``+00:00``), e.g. ``2024-03-31T13:59:59.250000+00:00`` with
    ``timespec="microseconds"``."""
    return value.astimezone(dt_timezone.utc).isoformat(timespec=timespec)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _create_temporary(directory: str) -> tuple[int, str]:
    """A new file beside the target, created with mode 0666 so that the kernel applies the
    process's umask (``tempfile.mkstemp`` makes 0600, and reading the umask means changing
    it, which races with other threads)."""
    for _ in range(100):
        path = os.path.join(directory, f".{secrets.token_hex(8)}.tmp")
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", directory)


def _fsync_directory(directory: str) -> None:
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories: nothing to sync
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(handle)


def _move_into_place(temporary: str, target: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)  # atomic, and refuses an existing target
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", target) from None
        os.replace(temporary, target)


@contextmanager
def write_atomically(
    path: str | os.PathLike[str], *, newline: str | None = None, overwrite: bool = True
) -> Iterator[IO[str]]:
    """A UTF-8 text stream whose content replaces ``path`` only when the ``with`` block ends
    without an exception (then the file and its directory are fsynced); on an exception the
    temporary file is removed and ``path`` is left as it was.

    Through a symbolic link, the file it points to is the one written. A new file gets the
    permissions ``open(path, "w")`` would give it (0666 less the umask); an existing one keeps
    its own. With ``overwrite=False`` an existing ``path`` is refused (``FileExistsError``),
    also when one appears while writing (the move is a hard link, which never replaces).

    Raises:
        OSError: the file cannot be written (``IsADirectoryError``, ``FileExistsError``,
            ``PermissionError``, …); callers turn it into their own typed error.
    """
    given = os.fspath(path)
    if not overwrite and os.path.lexists(given):
        raise FileExistsError(errno.EEXIST, "File exists", given)
    target = os.path.realpath(given)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "it is a directory", target)
    directory = os.path.dirname(target)
    existing = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else None
    handle, temporary = _create_temporary(directory)
    try:
        if existing is not None:
            os.chmod(temporary, existing)
        with os.fdopen(handle, "w", encoding="utf-8", newline=newline) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        _move_into_place(temporary, target, overwrite)
        _fsync_directory(directory)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
