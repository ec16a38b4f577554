"""The package's layering holds: the engine imports no Django, nothing imports in a circle (a
lookup in Django's app registry or by a dotted string counts as an import), the store knows the
models and the models know the store only through the operations it hands them, every error
raised on purpose is an ``EncounterError``, SQL is built once per connection and kept off
Django's connection object, and the code map in CONTRIBUTING.md names every module."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.db import connections

import django_encounters
from django_encounters.exceptions import EncounterError
from django_encounters.store.statements import statements

PACKAGE = Path(django_encounters.__file__).resolve().parent
ROOT = PACKAGE.parent.parent
NAME = "django_encounters"


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


#: Calls that load a model from Django's app registry (``apps.get_model(...)``,
#: ``apps.get_app_config(...).get_models()``, ``django.apps.apps.get_model``, ...).
_REGISTRY_LOOKUPS = {"get_model", "get_models"}
#: Calls that import a module named by a string.
_STRING_IMPORTS = {"import_module", "import_string", "__import__"}


def _called_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _another_app(node: ast.Call) -> bool:
    """Whether a registry lookup names, as a literal, an app other than this package (then it
    is no edge to the package's models)."""
    if not node.args:
        return False
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return False  # a name or an expression: it may be this package's label
    label = first.value.split(".", 1)[0] if len(node.args) == 1 else first.value
    return label != NAME


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports — at module level and inside functions alike
    (``if TYPE_CHECKING:`` blocks aside), the parent packages each import runs included unless
    they are ``module``'s own ancestors (Python has run those already). A model looked up in
    Django's app registry is an import of ``models`` (unless the lookup names another app by a
    literal), and a module imported by a literal dotted string (``import_module``,
    ``import_string``, ``__import__``) is an import of that module: both reach the module at run
    time as surely as an ``import`` statement does, only out of sight."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Call):
            called = _called_name(node)
            if called in _REGISTRY_LOOKUPS and not _another_app(node):
                targets.add(f"{NAME}.models")
            elif called in _STRING_IMPORTS and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    targets.add(first.value)
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    edges = set()
    for target in targets:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):  # the root package's __init__ imports lazily
            name = ".".join(parts[:end])
            if name in known and name != module and not module.startswith(name + "."):
                edges.add(name)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    assert _cycles(graph) == []
    # The floors: the engine imports nothing of the package but itself; the store the engine,
    # itself, the models and the list of errors (exceptions.py, which imports only the
    # engine) — never the services, projections or anything else above it.
    assert graph[f"{NAME}.exceptions"] <= {f"{NAME}.engine", f"{NAME}.engine.errors"}
    for name, targets in graph.items():
        allowed = [f"{NAME}.engine"]
        if name.startswith(f"{NAME}.store"):
            allowed += [f"{NAME}.store", f"{NAME}.models", f"{NAME}.exceptions"]
        elif not name.startswith(f"{NAME}.engine"):
            continue
        above = sorted(t for t in targets if not any(t.startswith(a) for a in allowed))
        assert above == [], f"{name} imports {above}"


def test_the_store_knows_the_models_and_not_the_other_way_round():
    graph = _graph()
    assert f"{NAME}.models" in graph[f"{NAME}.store.schema"]
    below_models = {f"{NAME}.models"}  # and everything the models reach, directly or not
    frontier = [f"{NAME}.models"]
    while frontier:
        for target in graph[frontier.pop()]:
            if target not in below_models:
                below_models.add(target)
                frontier.append(target)
    assert sorted(t for t in below_models if t.startswith(f"{NAME}.store")) == []


def test_the_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("source", "edges"),
    [
        # How store/schema.py once reached the models, out of sight of the import statements.
        (
            """
            from django.apps import apps
            APP_LABEL = "django_encounters"
            def encounter_model():
                return apps.get_model(APP_LABEL, "Encounter")
            """,
            {f"{NAME}.models"},
        ),
        (
            'import django.apps\ndjango.apps.apps.get_model("django_encounters.Encounter")',
            {f"{NAME}.models"},
        ),
        (
            "from django.apps import apps\napps.get_app_config(LABEL).get_models()",
            {f"{NAME}.models"},
        ),
        ('def f():\n    from django.apps import apps\n    apps.get_model("auth", "User")', set()),
        ('from django.apps import apps\napps.get_model("auth.User")', set()),
        (
            'from importlib import import_module\nimport_module("django_encounters.store")',
            {f"{NAME}.store"},
        ),
        ("def f():\n    from django_encounters import store", {f"{NAME}.store"}),
    ],
)
def test_a_registry_lookup_or_a_string_import_is_an_import(tmp_path, source, edges):
    path = tmp_path / "lookup.py"
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    known = set(_modules())
    assert _imports(f"{NAME}.projections.lookup", path, known) == edges


def test_the_models_run_the_store_only_through_the_operations_it_hands_them():
    """The one way from the models into the store is ``models.StoreOperations``, installed
    by the app's ``ready()`` — in a fresh interpreter, in a project where nothing else (the
    admin, the services) imports the store."""
    from django_encounters import models, store

    assert tuple(models.store_operations()) == (store.save_record, store.annotate_state_at)
    script = (
        "import sys, django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['django.contrib.contenttypes', "
        "'django.contrib.auth', 'django_encounters'], USE_TZ=True, "
        "DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3', 'NAME': ':memory:'}})\n"
        "django.setup()\n"
        "from django_encounters import models\n"
        "assert 'django_encounters.services' not in sys.modules\n"
        "print(models.store_operations().append.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.stdout.strip() == f"{NAME}.store.writes", done.stderr


def test_the_engine_imports_no_django_module():
    """In a fresh interpreter, as ``python -X importtime -c "import django_encounters.engine"``
    would show: no ``django`` module is loaded."""
    script = (
        "import sys, django_encounters.engine\n"
        "print('\\n'.join(m for m in sys.modules if m == 'django' or m.startswith('django.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert done.stdout.strip() == ""
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "django_encounters.engine.timeline" in imported  # the report is the one expected
    assert [m for m in imported if m == "django" or m.startswith("django.")] == []


def _package_classes() -> list[type]:
    classes = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix=f"{NAME}."):
        if ".migrations." in info.name:
            continue
        module = importlib.import_module(info.name)
        classes.extend(
            value
            for value in vars(module).values()
            if inspect.isclass(value) and value.__module__ == module.__name__
        )
    return classes


def test_every_error_of_the_package_is_an_encounter_error():
    errors = [c for c in _package_classes() if issubclass(c, BaseException)]
    assert len(errors) >= 12
    assert [c.__qualname__ for c in errors if not issubclass(c, EncounterError)] == []


@pytest.mark.django_db
def test_statements_are_built_once_per_connection_and_kept_off_it():
    connection = connections["default"]
    connection.ensure_connection()
    first = statements(connection)
    assert statements(connection) is first
    key = ("state", "version")
    assert first.update_sql(key) is first.update_sql(key)
    assert [name for name in vars(connection) if "encounter" in name.lower()] == []


def test_the_contributing_map_names_every_module():
    guide = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = guide.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    missing = []
    for path in _modules().values():
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" or relative.startswith("migrations/"):
            continue
        shown = relative.rsplit("/", 1)[0] + "/" if "commands/" in relative else relative
        if f"`{shown}`" not in section:
            missing.append(relative)
    assert missing == []
