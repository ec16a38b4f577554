"""Exports over HTTP: the event log streamed in any format of the ``event-log`` report, and an
encounter as FHIR.

:func:`stream_report` turns one of the output layer's writers — which *push* text into a stream
(``write(traces, out, name=…)``) — into an iterator of byte chunks that a
``StreamingHttpResponse`` *pulls*, in constant memory: the writer runs in a helper thread that
only formats (it reads nothing from the database), and asks for each trace in turn; the traces
are read here, in the thread that serves the response (its database connection, its
transaction), one keyset batch at a time. Between two traces the writer's output is at most one
trace long; it is sent in chunks of about :data:`CHUNK_SIZE` characters.

:func:`fhir_document` is the body of ``GET encounters/{id}/fhir/``: the one place the endpoint
builds its FHIR JSON from :mod:`django_encounters.projections.fhir`.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections

from ...models import Encounter
from ...projections import fhir

#: About how many characters each chunk of a streamed export holds.
CHUNK_SIZE = 64 * 1024

_NEED = object()  # the writer asks for the next trace
_DONE = object()  # the writer returned
_END = object()  # no more traces
_STOP = object()  # the response was closed early: stop the writer


class _Sink:
    """The text stream the writer writes to: each piece goes to the serving thread."""

    def __init__(self, pieces: queue.Queue[Any]) -> None:
        self._pieces = pieces

    def write(self, text: str) -> int:
        self._pieces.put(text)
        return len(text)


def stream_report(
    write: Callable[..., Any],
    items: Iterable[Any],
    *,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> Iterator[bytes]:
    """The UTF-8 output of ``write(items, out, **kwargs)`` as byte chunks, produced as they are
    pulled: ``items`` is read in the caller's thread, one item each time the writer asks for
    the next. An exception of the writer (or of ``items``) is raised to the caller; closing the
    iterator early stops the writer. ``chunk_size``: about how many characters per chunk
    (default :data:`CHUNK_SIZE`)."""
    if chunk_size is None:
        chunk_size = CHUNK_SIZE
    source = iter(items)
    requests: queue.Queue[Any] = queue.Queue(maxsize=1)
    pieces: queue.Queue[Any] = queue.Queue()

    def pulled() -> Iterator[Any]:
        while True:
            pieces.put(_NEED)
            item = requests.get()
            if item is _END or item is _STOP:  # stopped: the writer ends, nobody reads it
                return
            yield item

    def run() -> None:
        try:
            write(pulled(), _Sink(pieces), **kwargs)
        except BaseException as exc:  # handed to the serving thread, raised there
            pieces.put(exc)
            return
        finally:
            # A writer that reads the database itself would have opened this thread's own
            # connections: closed with the thread, never left behind.
            connections.close_all()
        pieces.put(_DONE)

    thread = threading.Thread(target=run, name="django-encounters-export", daemon=True)
    thread.start()
    buffered: list[str] = []
    size = 0
    try:
        while True:
            piece = pieces.get()
            if piece is _NEED:
                if size >= chunk_size:
                    yield "".join(buffered).encode("utf-8")
                    buffered, size = [], 0
                requests.put(next(source, _END))
            elif piece is _DONE:
                break
            elif isinstance(piece, BaseException):
                raise piece
            else:
                buffered.append(piece)
                size += len(piece)
        if buffered:
            yield "".join(buffered).encode("utf-8")
    finally:
        if thread.is_alive():
            try:
                requests.put_nowait(_STOP)
            except queue.Full:  # pragma: no cover - the writer holds no request then
                pass
        thread.join()


async def served_asynchronously(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` (from :func:`stream_report`) for a server running Django under ASGI: each
    chunk is pulled in Django's thread for synchronous code (``thread_sensitive``: the thread
    whose database connection the view used) and sent before the next is read. Given a
    synchronous iterator, Django under ASGI would read the whole export into memory first (and
    warn); closing this early (the client went away) closes ``chunks``, which stops the
    writer."""

    def pull() -> bytes | None:
        return next(chunks, None)

    pull_in_thread = sync_to_async(pull, thread_sensitive=True)
    try:
        while True:
            chunk = await pull_in_thread()
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await sync_to_async(close, thread_sensitive=True)()


def fhir_document(
    encounter: Encounter, version: str, status_map: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The JSON of ``GET encounters/{id}/fhir/?version=``: for ``R4`` the whole ``Encounter``
    resource (:func:`~django_encounters.projections.fhir.encounter_resource`, its
    ``statusHistory`` included); for ``R5`` a ``collection`` ``Bundle`` of the ``Encounter``
    followed by its ``EncounterHistory`` resources
    (:func:`~django_encounters.projections.fhir.encounter_history_resources`), R5 keeping the
    history apart. ``status_map`` as those functions take it (default: the definition's map in
    ``ENCOUNTERS_FHIR_STATUS_MAPS``).

    Raises:
        FhirStatusError: a state with no FHIR code in ``version`` (``status_map`` names it).
        EncounterNotFoundError: the encounter is gone.
    """
    resource = fhir.encounter_resource(encounter, version, status_map)
    if version == "R4":
        return resource
    resources = [resource, *fhir.encounter_history_resources(encounter, status_map)]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid5(encounter.pk, str(n))}", "resource": resource}
            for n, resource in enumerate(resources)
        ],
    }
