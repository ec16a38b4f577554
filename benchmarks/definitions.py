"""The definitions the benchmarks use, from one source.

``VISIT`` is the example clinic's visit (``example/clinic/definitions.py``, what
``manage.py seed_clinic`` creates and the README's usage example shows), with its validators
(``FinalStateValidator``; ``RequiredFieldsValidator``: ``started_at`` to start, ``ended_at`` to
complete). It is loaded from that file by path: importing the ``clinic`` package would need the
example project on ``sys.path`` and its app installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

_SOURCE = Path(__file__).resolve().parent.parent / "example" / "clinic" / "definitions.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("_bench_clinic_definitions", _SOURCE)
    assert spec is not None and spec.loader is not None, _SOURCE
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VISIT: dict[str, Any] = _load().VISIT
#: A visit's steps to completion, the one the transition benchmark walks: the first step leaves
#: the initial state, the later ones run both validators on a started and ended encounter.
VISIT_PATH = ("checked_in", "in_progress", "completed")
