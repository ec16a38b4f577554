"""Running one function over several worker processes (``spawn``, each with its own Django
setup and database connection), for ``rebuild --jobs N``: progress messages and results come
back over a queue; a worker that fails stops the others."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any, cast

from django.db import connections

from ..exceptions import RebuildWorkerError


def describe_setup(using: str) -> dict[str, Any]:
    """What a spawned worker needs to set Django up like this process: the settings module (or,
    for ``settings.configure()``, the explicitly configured settings) and the *current*
    connection settings of ``using`` (under a test runner: the test database's name).

    Raises:
        ValueError: the database cannot be shared with worker processes.
    """
    from django.conf import UserSettingsHolder, settings

    connection: Any = connections[using]
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        raise ValueError(
            "jobs > 1 needs a database the worker processes can open: an in-memory SQLite "
            "database cannot be shared between processes (use jobs=1, or a database file)"
        )
    if (
        connection.vendor == "sqlite"
        and str(connection.settings_dict.get("OPTIONS", {}).get("transaction_mode", "")).upper()
        != "IMMEDIATE"
    ):
        # Deferred SQLite transactions cannot upgrade their read lock while another process
        # writes: workers would fail with "database is locked" instead of waiting.
        raise ValueError(
            "jobs > 1 on SQLite needs OPTIONS={'transaction_mode': 'IMMEDIATE'} (Django >= 5.1) "
            "so that the workers wait for each other's write transactions (use jobs=1)"
        )
    if connection.in_atomic_block:
        raise ValueError(
            "jobs > 1 cannot run inside a transaction: the workers use their own connections "
            "and would not see (or would wait for) this one's uncommitted work"
        )
    # Under override_settings (the pytest settings fixture), the settings module is that of
    # the settings being overridden (an override's holder says None).
    base = cast(Any, settings)._wrapped
    while isinstance(base, UserSettingsHolder):
        base = base.default_settings
    module = getattr(base, "SETTINGS_MODULE", None)
    configured: dict[str, Any] = {}
    if not module:
        for name, value in vars(cast(Any, settings)._wrapped).items():
            if name.isupper():
                try:
                    pickle.dumps(value)
                except Exception:  # noqa: BLE001 - a setting a worker cannot be given
                    continue
                configured[name] = value
    return {
        "module": module,
        "settings": configured,
        # Read when used, so overridden (tests, override_settings): given to the workers as
        # they are now, so they check seals as this process would.
        "seal_settings": {
            name: getattr(settings, name, None)
            for name in ("ENCOUNTERS_SEAL_KEYS", "ENCOUNTERS_SEAL_KEY_ID")
        },
        "alias": using,
        "database": dict(connection.settings_dict),
    }


def _setup_django(setup: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        if setup["module"]:
            os.environ["DJANGO_SETTINGS_MODULE"] = setup["module"]
        else:
            settings.configure(**setup["settings"])
    django.setup()
    for name, value in setup.get("seal_settings", {}).items():
        setattr(settings, name, value)
    alias = setup["alias"]
    connections.settings[alias] = setup["database"]
    for connection in connections.all(initialized_only=True):
        if connection.alias == alias:  # opened while setting up: reopen with the new settings
            connection.close()
            del connections[alias]


def _resolve(path: str) -> Any:
    """``"package.module:name"`` -> the object (imported in the worker, once Django is set up:
    the modules that define models cannot be imported before)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(
    index: int,
    setup: dict[str, Any],
    target: str,
    task: dict[str, Any],
    snapshot: str | None,
    messages: Any,
) -> None:
    """Entry point of a worker process: ``target(**task)`` after setting Django up."""
    try:
        _setup_django(setup)
        function = _resolve(target)
        measure = _resolve(snapshot) if snapshot is not None else None

        def report(partial: Any) -> None:
            assert measure is not None
            messages.put(("progress", index, measure(partial)))

        result = function(**task, progress=report if measure is not None else None)
        messages.put(("done", index, result))
    except BaseException as exc:
        traceback.print_exc()
        messages.put(("error", index, "".join(traceback.format_exception_only(exc)).strip()))
        raise SystemExit(1) from None
    finally:
        connections.close_all()


class _Run:
    """The parent's side: start the workers, collect their messages, stop them on failure."""

    def __init__(
        self,
        target: str,
        tasks: list[dict[str, Any]],
        setup: dict[str, Any],
        snapshot: str | None,
        on_progress: Callable[[int, Any], None] | None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.messages = context.Queue()
        self.on_progress = on_progress
        self.results: dict[int, Any] = {}
        self.failure: str | None = None
        self.workers = [
            context.Process(
                target=_worker_main,
                args=(index, setup, target, task, snapshot, self.messages),
                name=f"rebuild-worker-{index + 1}",
                daemon=True,
            )
            for index, task in enumerate(tasks)
        ]

    def receive(self, message: tuple) -> None:
        kind, index, payload = message
        if kind == "progress":
            if self.on_progress is not None:
                self.on_progress(index, payload)
        elif kind == "done":
            self.results[index] = payload
        elif self.failure is None:
            self.failure = f"rebuild worker {index + 1} of {len(self.workers)} failed: {payload}"

    def drain(self) -> None:
        """Whatever a dead worker sent before exiting is in the pipe by now."""
        try:
            while True:
                self.receive(self.messages.get(timeout=0.5))
        except queue.Empty:
            pass

    def wait(self) -> None:
        while len(self.results) < len(self.workers) and self.failure is None:
            try:
                self.receive(self.messages.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            dead = [
                i
                for i, w in enumerate(self.workers)
                if w.exitcode is not None and i not in self.results
            ]
            if dead:
                self.drain()
                for i in dead:
                    if i not in self.results and self.failure is None:
                        self.failure = (
                            f"rebuild worker {i + 1} of {len(self.workers)} failed: it exited "
                            f"with status {self.workers[i].exitcode} without a result"
                        )

    def stop(self) -> None:
        unfinished = self.failure is not None or len(self.results) < len(self.workers)
        for worker in self.workers:
            if worker.is_alive() and unfinished:
                worker.terminate()  # its open transaction rolls back with its connection
        for worker in self.workers:
            if worker.pid is not None:
                worker.join()
        self.messages.close()


def run_in_workers(
    target: str,
    tasks: list[dict[str, Any]],
    setup: dict[str, Any],
    *,
    snapshot: str | None = None,
    on_progress: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``[target(**task, progress=…) for task in tasks]``, each in its own process; results in
    task order. ``target`` and ``snapshot`` are ``"module:function"`` paths. With ``snapshot``,
    a worker's ``progress`` callback sends ``snapshot(partial result)`` and
    ``on_progress(worker index, that)`` is called here.

    Raises:
        RebuildWorkerError: a worker failed (the others were stopped).
    """
    run = _Run(target, tasks, setup, snapshot, on_progress)
    try:
        for worker in run.workers:
            worker.start()
        run.wait()
    finally:
        run.stop()
    if run.failure is not None:
        raise RebuildWorkerError(
            run.failure + " (the other workers were stopped; every batch either committed or "
            "rolled back: a re-run finishes the job)"
        )
    return [run.results[index] for index in range(len(tasks))]
