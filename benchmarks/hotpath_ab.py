"""``transition()`` and ``get_state_at()`` against their raw-SQL floors, in one process, in
alternating rounds; wall-clock and CPU time (``time.process_time``) per call, so that a
machine whose CPU speed varies between runs still gives comparable figures.

The transition workload is what a user runs: encounters made by ``create_encounter`` moving
through a visit definition with a validator (``NoBackwardsTransitionValidator``), first and
later transitions, seals on (``ENCOUNTERS_SEAL_KEYS``). The floor is ``benchmarks.run``'s raw
three-statement transaction. To compare two trees (commits), run it under each:

    PYTHONPATH=<tree>/src:<tree> python -m benchmarks.hotpath_ab [--backend postgresql]
        [--transitions N] [--reads N] [--seals off] [--profile]

``--profile`` prints a cProfile of the transitions instead (no floor).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

VISIT = {
    "name": "Bench visit",
    "code": "BENCHVISIT",
    "states": ["scheduled", "checked_in", "in_progress", "completed"],
    "initial_state": "scheduled",
    "final_states": ["completed"],
    "transitions": {
        "scheduled": ["checked_in"],
        "checked_in": ["in_progress"],
        "in_progress": ["completed"],
    },
    "validators": [
        {
            "path": "django_encounters.validators.NoBackwardsTransitionValidator",
            "params": {"state_order": ["scheduled", "checked_in", "in_progress", "completed"]},
        }
    ],
}
NEXT = {"scheduled": "checked_in", "checked_in": "in_progress", "in_progress": "completed"}


def main() -> None:  # noqa: PLR0915 - one measurement, read top to bottom
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="sqlite")
    p.add_argument("--transitions", type=int, default=3000)
    p.add_argument("--reads", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--seals", default="on")
    args = p.parse_args()
    from benchmarks.run import OTHER, Schema, configure, database_for, make_definition, subject

    tmp = tempfile.TemporaryDirectory(prefix="h1-ab-")
    if args.backend == "sqlite":
        database = database_for("sqlite", os.path.join(tmp.name, "ab.sqlite3"))
    else:
        database = database_for("postgresql")
    configure(database)
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    if args.seals == "on":
        settings.ENCOUNTERS_SEAL_KEYS = {"bench": "b" * 48}
        settings.ENCOUNTERS_SEAL_KEY_ID = "bench"
    call_command("migrate", verbosity=0, interactive=False)
    if connection.vendor == "sqlite":
        with connection.cursor() as c:
            c.execute("PRAGMA synchronous=NORMAL")
    import django_encounters
    from django_encounters.models import EncounterDefinition
    from django_encounters.services import create_encounter, get_state_at, transition

    print("package:", django_encounters.__file__, file=sys.stderr)
    visit, _ = EncounterDefinition.objects.get_or_create(code=VISIT["code"], defaults=VISIT)
    pingpong = make_definition()
    who = subject()
    schema = Schema()
    n = args.transitions
    per_round = n // args.rounds
    # ours: fresh encounters through the visit (3 transitions each: first and later)
    encs = [create_encounter(visit, who) for _ in range(n // 3 + 50)]
    order = []
    for i in range(0, len(encs), 50):  # interleave: 50 encounters move one step, then next step
        chunk = encs[i : i + 50]
        for _step in range(3):
            order.extend(chunk)
    floor_ids = [create_encounter(pingpong, who).pk for _ in range(100)]
    e, t, d, ph = schema.e, schema.t, schema.d, schema.ph
    columns = ", ".join(
        [f"e.{e[x]}" for x in schema.enc_fields] + [f"d.{col}" for col in schema.d.values()]
    )
    lock = (
        f"SELECT {columns} FROM {schema.enc} e INNER JOIN {schema.defn} d ON e.{e['definition']} = "
        f"d.{d['id']} WHERE e.{e['id']} = {ph} AND e.{e['deleted_at']} IS NULL"
        + (" FOR UPDATE OF e" if schema.vendor == "postgresql" else "")
    )
    si, vi = schema.enc_fields.index("state"), schema.enc_fields.index("version")
    cols = ", ".join(t[x] for x in schema.tr_fields)
    insert = f"INSERT INTO {schema.tr} ({cols}) VALUES ({', '.join([ph] * len(schema.tr_fields))})"
    update = (
        f"UPDATE {schema.enc} SET {e['state']} = {ph}, {e['version']} = {ph}, "
        f"{e['timeline_end_at']} = {ph}, {e['head_hash']} = {ph}, {e['updated_at']} = {ph} "
        f"WHERE {e['id']} = {ph}"
    )
    begin = "BEGIN" if schema.vendor == "postgresql" else "BEGIN IMMEDIATE"
    connection.ensure_connection()
    raw = connection.connection
    digest = "0" * 64
    counter = {"floor": 0, "ours": 0}

    def floor(k: int) -> None:
        cur = raw.cursor()
        for _ in range(k):
            pk = floor_ids[counter["floor"] % 100]
            counter["floor"] += 1
            now = datetime.now(UTC)
            key = schema.db(pk)
            cur.execute(begin)
            cur.execute(lock, [key])
            row = cur.fetchone()
            state, version = row[si], row[vi]
            to = OTHER[state]
            values = {
                "id": uuid.uuid4(),
                "encounter": pk,
                "sequence": version + 1,
                "from_state": state,
                "to_state": to,
                "transitioned_by": None,
                "transitioned_at": now,
                "effective_at": now,
                "reason": "",
                "metadata": "{}",
                "definition_version": 1,
                "hash": digest,
                "transitioned_by_name": "",
                "seal": "",
            }
            cur.execute(insert, [schema.db(values[x]) for x in schema.tr_fields])
            stamp = schema.db(now)
            cur.execute(update, [to, version + 1, stamp, digest, stamp, key])
            cur.execute("COMMIT")
        cur.close()

    def ours(k: int) -> None:
        for _ in range(k):
            enc = order[counter["ours"]]
            counter["ours"] += 1
            transition(enc, NEXT[enc.state])

    def measure(fn, k):
        gc.collect()
        w, c = time.perf_counter(), time.process_time()
        fn(k)
        return time.perf_counter() - w, time.process_time() - c

    floor(100)
    ours(150)
    counter["ours"] = 150
    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        ours(n - 300)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(35)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
        if os.environ.get("CALLERS"):
            pstats.Stats(pr).sort_stats("tottime").print_callers(os.environ["CALLERS"])
        return
    fw = fc = ow = oc = 0.0
    for r in range(args.rounds):
        pair = [(floor, "f"), (ours, "o")] if r % 2 == 0 else [(ours, "o"), (floor, "f")]
        for fn, tag in pair:
            w, c = measure(fn, per_round)
            if tag == "f":
                fw, fc = fw + w, fc + c
            else:
                ow, oc = ow + w, oc + c
    m = per_round * args.rounds
    print(
        f"transition: floor {fw / m * 1e6:.0f} µs wall {fc / m * 1e6:.0f} µs cpu | "
        f"ours {ow / m * 1e6:.0f} µs wall {oc / m * 1e6:.0f} µs cpu | "
        f"ratio wall {fw / ow:.2f}× cpu {fc / oc:.2f}×"
    )
    # get_state_at
    enc = create_encounter(pingpong, who)
    start = datetime.now(UTC) - timedelta(days=21)
    for i in range(20):
        transition(enc, OTHER[enc.state], effective_at=start + timedelta(days=i))
    tt = schema.t
    sql = (
        f"SELECT {tt['to_state']} FROM {schema.tr} WHERE {tt['encounter']} = {ph} AND "
        f"{tt['effective_at']} <= {ph} ORDER BY {tt['effective_at']} DESC, {tt['sequence']} DESC "
        f"LIMIT 1"
    )
    rng = random.Random(1)
    times = [start + timedelta(hours=rng.uniform(-24, 24 * 22)) for _ in range(1000)]
    key = schema.db(enc.pk)

    def rfloor(k: int) -> None:
        cur = raw.cursor()
        for i in range(k):
            cur.execute(sql, [key, schema.db(times[i % 1000])])
            row = cur.fetchone()
            _ = row[0] if row else "a"
        cur.close()

    def rours(k: int) -> None:
        for i in range(k):
            get_state_at(enc, times[i % 1000])

    rfloor(200)
    rours(200)
    fw = fc = ow = oc = 0.0
    per = args.reads // args.rounds
    for r in range(args.rounds):
        pair = [(rfloor, "f"), (rours, "o")] if r % 2 == 0 else [(rours, "o"), (rfloor, "f")]
        for fn, tag in pair:
            w, c = measure(fn, per)
            if tag == "f":
                fw, fc = fw + w, fc + c
            else:
                ow, oc = ow + w, oc + c
    m = per * args.rounds
    print(
        f"get_state_at: floor {fw / m * 1e6:.1f} µs wall {fc / m * 1e6:.1f} µs cpu | "
        f"ours {ow / m * 1e6:.1f} µs wall {oc / m * 1e6:.1f} µs cpu | "
        f"ratio wall {fw / ow:.2f}× cpu {fc / oc:.2f}×"
    )
    connection.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
