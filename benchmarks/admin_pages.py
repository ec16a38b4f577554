"""The admin's pages at a front desk's scale, timed (issue 21): the definition page with 15,000
encounters of its definition, the encounter list with 20,000 encounters, an encounter page and
its History with a 500-row history, and the process map the definition page loads apart.

    python -m benchmarks.admin_pages --backend sqlite [--json PATH]
    python -m benchmarks.admin_pages --backend postgres     # PGHOST etc. (make bench sets them)

``python -m benchmarks.run`` (``make bench``) runs it for each backend it measures and prints
its table. Each page is fetched through Django's test client as a logged-in superuser, once to
warm up, then ``--repeats`` times (default 10): the median and the best time, and the number
of queries (which the suite asserts, tests/test_admin_speed.py), and the median of the
process's CPU time per request (steadier than the wall time on a shared machine). The data is
bulk-loaded (benchmarks/loading.py), valid and hash-chained; the subjects are users. The visit
definition is the example clinic's, validators included (benchmarks/definitions.py); the
database comes from ``benchmarks.run.bench_database``, as the other benchmarks' do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from pathlib import Path
from typing import Any

from benchmarks.definitions import VISIT

#: Issue 21's targets: seconds (median) and queries.
TARGETS = {
    "definition page": (0.300, 15),
    "encounter page (500-row history)": (0.100, None),
    "encounter list": (0.300, None),
}
LOOP = {
    "name": "Ward round",
    "code": "ROUND",
    "states": ["waiting", "seen"],
    "initial_state": "waiting",
    "final_states": [],
    "transitions": {"waiting": ["seen"], "seen": ["waiting"]},
}


def configure(database: dict) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY="admin-bench",
        DEBUG=False,
        USE_TZ=True,
        TIME_ZONE="UTC",
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django.contrib.admin",
            "django_encounters",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        ROOT_URLCONF="benchmarks.admin_urls",
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {
                    "context_processors": [
                        "django.template.context_processors.request",
                        "django.contrib.auth.context_processors.auth",
                        "django.contrib.messages.context_processors.messages",
                    ]
                },
            }
        ],
        STATIC_URL="/static/",
        ALLOWED_HOSTS=["testserver"],
        DATABASES={"default": database},
    )
    django.setup()


def build(visits: int, others: int, history: int) -> dict[str, Any]:
    """The data: ``visits`` encounters of VISIT (spread over the last year), ``others`` of a
    second definition, one of which has a ``history``-row history; their subjects are users."""
    from django.contrib.auth.models import User
    from django.contrib.contenttypes.models import ContentType
    from django.db import connection

    from benchmarks.loading import load_encounters
    from django_encounters.models import EncounterDefinition

    admin = User.objects.create_superuser("bench-admin", "admin@example.com", "pw")
    total = visits + others
    User.objects.bulk_create(
        User(id=10_000 + i, username=f"patient-{i:05d}", password="!") for i in range(total)
    )
    ids = list(range(10_000, 10_000 + total))
    user_type = ContentType.objects.get_for_model(User)
    visit = EncounterDefinition.objects.create(**VISIT)
    loop = EncounterDefinition.objects.create(**LOOP)
    now = datetime.now(dt_timezone.utc).replace(microsecond=0)
    year = timedelta(days=365)
    paths = (["checked_in", "in_progress", "completed"], ["checked_in", "cancelled"])
    for n, path in enumerate(paths):
        share = visits // 2 if n == 0 else visits - visits // 2
        load_encounters(
            visit,
            share,
            path,
            subject_type=user_type,
            subject_ids=ids[n * (visits // 2) :],
            first_created=now - year + timedelta(minutes=n),
            spacing=year / max(share, 1),
            seed=n,
        )
    load_encounters(
        loop,
        others - 1,
        ["seen"],
        subject_type=user_type,
        subject_ids=ids[visits:],
        first_created=now - year,
        spacing=year / max(others, 1),
        seed=7,
    )
    (long,) = load_encounters(
        loop,
        1,
        ["seen", "waiting"] * (history // 2),
        subject_type=user_type,
        subject_ids=ids[-1:],
        first_created=now - timedelta(days=10),
        spacing=timedelta(0),
        step=timedelta(minutes=1),
        seed=8,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return {"admin": admin, "visit": visit, "long": long}


def measure(client: Any, url: str, repeats: int) -> dict[str, Any]:
    from django.db import connection

    response = client.get(url)
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}")
    queries = []

    def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        client.get(url)
    times = []
    cpu = []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        client.get(url)
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return {
        "median_s": statistics.median(times),
        "best_s": min(times),
        # this process's CPU time (Django, and SQLite's own work; not PostgreSQL's server):
        # less swayed than the wall time by the other processes of a shared machine
        "cpu_median_s": statistics.median(cpu),
        "queries": len(queries),
        "bytes": len(response.content),
    }


def run(
    backend: str, sizes: dict[str, int], repeats: int, only: str | None = None
) -> dict[str, Any]:
    from benchmarks.run import bench_database

    with bench_database(backend, "encounters_admin_bench", setup=configure):
        from django.db import connection
        from django.test import Client
        from django.urls import reverse

        from benchmarks.run import _server_version

        started = time.perf_counter()
        data = build(sizes["visits"], sizes["others"], sizes["history"])
        loaded = time.perf_counter() - started
        client = Client()
        client.force_login(data["admin"])
        visit, long = data["visit"], data["long"]
        pages = {
            "definition page": reverse(
                "admin:django_encounters_encounterdefinition_change", args=[visit.pk]
            ),
            "encounter page (500-row history)": reverse(
                "admin:django_encounters_encounter_change", args=[long]
            ),
            "encounter History (500-row history)": reverse(
                "admin:django_encounters_encounter_history", args=[long]
            ),
            "encounter list": reverse("admin:django_encounters_encounter_changelist"),
        }
        try:
            base = reverse(
                "admin:django_encounters_encounterdefinition_process_map", args=[visit.pk]
            )
        except Exception:  # noqa: BLE001 - before the lazy process map existed
            base = None
        if base is not None:
            pages["process map, default window (loaded apart)"] = base
            pages["process map, all time (loaded apart)"] = base + "?window=all"
        if only:
            pages = {name: url for name, url in pages.items() if only in name}
        figures = []
        for name, url in pages.items():
            print(f"[admin {backend}] {name}", file=sys.stderr, flush=True)
            found = measure(client, url, repeats)
            target = TARGETS.get(name)
            if target is not None:
                found["target_s"], found["target_queries"] = target
            figures.append({"name": name, **found})
        return {
            "backend": backend,
            "server": _server_version(connection),
            "sizes": sizes,
            "load_s": loaded,
            "figures": figures,
        }


def table(results: list[dict]) -> str:
    lines = [
        "| backend | page | median | best | CPU (median) | queries | size | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for result in results:
        for f in result["figures"]:
            target = ""
            met = ""
            cpu = f"{f['cpu_median_s'] * 1000:.0f} ms" if "cpu_median_s" in f else ""
            if "target_s" in f:
                target = f"< {f['target_s'] * 1000:.0f} ms"
                ok = f["median_s"] < f["target_s"]
                if f.get("target_queries") is not None:
                    target += f", ≤ {f['target_queries']} q"
                    ok = ok and f["queries"] <= f["target_queries"]
                met = "yes" if ok else "**no**"
            lines.append(
                f"| {result['backend']} | {f['name']} | {f['median_s'] * 1000:.0f} ms | "
                f"{f['best_s'] * 1000:.0f} ms | {cpu} | {f['queries']} | "
                f"{f['bytes'] / 1024:.0f} KiB | "
                f"{target} | {met} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.admin_pages")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--visits", type=int, default=15_000)
    parser.add_argument("--others", type=int, default=5_000)
    parser.add_argument("--history", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument(
        "--pages", metavar="TEXT", help="only the pages whose name contains TEXT (e.g. encounter)"
    )
    args = parser.parse_args(argv)
    sizes = {"visits": args.visits, "others": args.others, "history": args.history}
    result = run(args.backend, sizes, args.repeats, args.pages)
    print(table([result]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
