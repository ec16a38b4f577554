"""The encounters' logs as an object-centric event log, OCEL 2.0 JSON (``ocel2-json``), which
pm4py reads (``pm4py.read_ocel2_json``) and object-centric mining tools take.

* **Objects**: each encounter (type ``encounter``: its definition code, whether it is
  soft-deleted, and its ``state`` as a time-stamped attribute, one value per event); each
  subject (its type is the subject model, ``app_label.model``); each user who made a move
  (type ``user``, by the name recorded); each definition version a row was decided under (type
  ``definition version``, ``CODE v2``).
* **Events**: the creation and every row, as the event log has them (:mod:`.event_log`): the
  type is the state entered, the time its business time (``effective_at``); the recorded time
  (``transitioned_at``), ``sequence``, ``from_state``, ``reason`` and the audit's
  ``backdated``/``overtaken`` marks are attributes. Each event relates to its ``encounter``, the
  encounter's ``subject``, the user who made it (``transitioned by``) and the definition
  version it was decided under (``decided under``).
* **Object-to-object**: an encounter is ``about`` its subject and ``follows`` the definition
  version it was created under.

Memory: events are written as the traces come (one batch of encounters in memory); the
encounter objects go to a temporary file (in memory up to a few megabytes, on disk beyond) and
are copied after the events; only the distinct subjects, users and versions are held, and the
event types seen. The JSON's members are written in the order ``events``, ``objects``,
``objectTypes``, ``eventTypes`` (order does not matter in JSON).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from typing import IO, Any

from .event_log import EventLogCounts, Trace, timestamp
from .output import register_format

#: The object types and their attributes (name, OCEL type).
ENCOUNTER = "encounter"
USER = "user"
DEFINITION_VERSION = "definition version"
ENCOUNTER_ATTRIBUTES = (("definition", "string"), ("deleted", "boolean"), ("state", "string"))
#: Every event type's attributes (name, OCEL type).
EVENT_ATTRIBUTES = (
    ("sequence", "integer"),
    ("from_state", "string"),
    ("transitioned_at", "time"),
    ("reason", "string"),
    ("backdated", "boolean"),
    ("overtaken", "boolean"),
)
#: Spill the encounter objects to disk beyond this many bytes.
SPOOL_BYTES = 4 * 1024 * 1024


def encounter_object_id(trace: Trace) -> str:
    return f"encounter:{trace.id}"


def subject_object_id(trace: Trace) -> str:
    return f"subject:{trace.subject_type}:{trace.subject_id}"


def user_object_id(name: str) -> str:
    return f"user:{name}"


def version_object_id(definition: str, version: int) -> str:
    return f"definition:{definition}:v{version}"


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _flag(value: bool) -> str:
    return "true" if value else "false"


@register_format(
    "event-log",
    "ocel2-json",
    content_type="application/json",
    newline="\n",
    description="OCEL 2.0 JSON: encounters, subjects, users and definition versions as objects",
)
def write_ocel2_json(
    traces: Iterable[Trace], out: IO[str], *, name: str = "django-encounters"
) -> EventLogCounts:
    """Write ``traces`` to ``out`` as one OCEL 2.0 JSON log. (``name`` has no place in OCEL
    2.0 JSON.)"""
    subjects: dict[str, str] = {}  # object id -> type
    users: set[str] = set()
    versions: set[tuple[str, int]] = set()
    event_types: set[str] = set()
    subject_types: set[str] = set()
    count = events = anomalous = 0
    with tempfile.SpooledTemporaryFile(
        max_size=SPOOL_BYTES, mode="w+", encoding="utf-8"
    ) as objects:
        out.write('{"events":[')
        first = True
        for trace in traces:
            encounter = encounter_object_id(trace)
            subject = subject_object_id(trace)
            subjects[subject] = trace.subject_type
            subject_types.add(trace.subject_type)
            states = []
            for event in trace.events:
                relationships = [
                    {"objectId": encounter, "qualifier": "encounter"},
                    {"objectId": subject, "qualifier": "subject"},
                ]
                if event.resource is not None:
                    users.add(event.resource)
                    relationships.append(
                        {"objectId": user_object_id(event.resource), "qualifier": "transitioned by"}
                    )
                if event.definition_version is not None:
                    versions.add((trace.definition, event.definition_version))
                    relationships.append(
                        {
                            "objectId": version_object_id(
                                trace.definition, event.definition_version
                            ),
                            "qualifier": "decided under",
                        }
                    )
                attributes = [
                    {"name": "sequence", "value": event.sequence},
                    {"name": "from_state", "value": event.from_state or ""},
                    {"name": "transitioned_at", "value": timestamp(event.transitioned_at)},
                    {"name": "reason", "value": event.reason},
                    {"name": "backdated", "value": _flag(event.backdated)},
                    {"name": "overtaken", "value": _flag(event.overtaken)},
                ]
                item = {
                    "id": f"{trace.id}:{event.sequence}",
                    "type": event.activity,
                    "time": timestamp(event.timestamp),
                    "attributes": attributes,
                    "relationships": relationships,
                }
                out.write(("" if first else ",") + "\n" + _dump(item))
                first = False
                event_types.add(event.activity)
                states.append(
                    {"name": "state", "value": event.activity, "time": timestamp(event.timestamp)}
                )
            related = [{"objectId": subject, "qualifier": "about"}]
            origin = trace.events[0].definition_version if trace.events else None
            if origin is not None:
                related.append(
                    {
                        "objectId": version_object_id(trace.definition, origin),
                        "qualifier": "follows",
                    }
                )
            objects.write(
                ",\n"
                + _dump(
                    {
                        "id": encounter,
                        "type": ENCOUNTER,
                        "attributes": [
                            {"name": "definition", "value": trace.definition},
                            {"name": "deleted", "value": _flag(trace.deleted)},
                            *states,
                        ],
                        "relationships": related,
                    }
                )
            )
            count += 1
            events += len(trace.events)
            anomalous += trace.anomalies > 0
        out.write('\n],"objects":[')
        others: list[dict[str, Any]] = [
            {"id": oid, "type": kind} for oid, kind in sorted(subjects.items())
        ]
        others += [{"id": user_object_id(u), "type": USER} for u in sorted(users)]
        others += [
            {
                "id": version_object_id(code, number),
                "type": DEFINITION_VERSION,
                "attributes": [
                    {"name": "definition", "value": code},
                    {"name": "version", "value": number},
                ],
            }
            for code, number in sorted(versions)
        ]
        out.write(",".join("\n" + _dump(other) for other in others))
        objects.seek(0)
        if not others:
            objects.read(1)  # the first object's leading comma
        shutil.copyfileobj(objects, out)
    object_types = [
        {
            "name": ENCOUNTER,
            "attributes": [{"name": n, "type": t} for n, t in ENCOUNTER_ATTRIBUTES],
        },
        {"name": USER, "attributes": []},
        {
            "name": DEFINITION_VERSION,
            "attributes": [
                {"name": "definition", "type": "string"},
                {"name": "version", "type": "integer"},
            ],
        },
        *({"name": kind, "attributes": []} for kind in sorted(subject_types)),
    ]
    types = [
        {"name": kind, "attributes": [{"name": n, "type": t} for n, t in EVENT_ATTRIBUTES]}
        for kind in sorted(event_types)
    ]
    out.write('\n],"objectTypes":' + _dump(object_types) + ',"eventTypes":' + _dump(types) + "}\n")
    return EventLogCounts(count, events, anomalous)
