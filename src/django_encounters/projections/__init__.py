"""Projections: everything read off the log, as one pipeline.

1. :mod:`.selection` — a :class:`~.selection.Selection` (definition, ids, subject, a
   business-time period, ``known_at``, batch size, database), checked once;
2. :mod:`.replay` — :class:`~.replay.Replays`, the one fold: batches, stream reads, the
   engine's verifying replay, the head check, acknowledgements, user names;
3. its consumers — :mod:`.rebuild` (projections rebuilt or checked; :mod:`.workers` for
   ``--jobs``), :mod:`.audit` (the audit, and one encounter's timeline for the admin and the
   REST API), :mod:`.event_log` (XES/CSV for process mining), :mod:`.process_map` and
   :mod:`.diagrams`, :mod:`.checkpoints` (a package: entries, reading, building, verifying);
   :mod:`.acknowledgements` records what reviewers examined; :mod:`.fhir` exports one
   encounter's timeline;
4. :mod:`.output` — the registry of formats (each writer registers itself where it renders:
   :mod:`.rendering` for the audit, :mod:`.event_log`, :mod:`.checkpoints.building`), the one
   atomic file writer, and times as every report writes them.
"""
