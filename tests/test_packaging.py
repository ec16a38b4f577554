"""The package as PyPI and a new user get it.

* The README is the project's page on the package index: every link in it is absolute (a relative
  one is dead there) and leads to a page of the documentation site or a file of the repository
  that exists.
* The classifiers name exactly the Django and Python versions CI tests: the Makefile's MAIN_PAIR
  (the main virtualenv) and every pair of its MATRIX, read by make; and each virtualenv runs the
  pair the Makefile names for it.
* The built sdist and wheel carry the LICENSE, PEP 639 metadata (``License-Expression: MIT``),
  the project URLs and those classifiers, and ``twine check --strict`` accepts them.
* The wheel installs into a fresh virtualenv with its runtime dependencies only, and in a project
  fresh from ``django-admin startproject`` the README's settings, ``migrate`` and its quickstart,
  extracted from README.md and run as written, work — twice, as a user re-running it would.

The build and the fresh project need PyPI (setuptools for the isolated build, Django and
eventsourcing for the install); pip's cache makes the second run quick.
"""

from __future__ import annotations

import ast
import builtins
import email
import email.message
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS_SITE = "https://django-encounters.readthedocs.io/en/latest/"
REPOSITORY = "https://github.com/django-encounters/django-encounters"
PROJECT_URLS = {
    "Documentation": DOCS_SITE,
    "Source": REPOSITORY,
    "Changelog": f"{REPOSITORY}/blob/main/CHANGELOG.md",
    "Issues": f"{REPOSITORY}/issues",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


# --- the README ------------------------------------------------------------------------------


def _readme_sections() -> dict[str, str]:
    """README.md's ``## `` sections by title (fenced blocks kept whole)."""
    sections: dict[str, str] = {}
    title = ""
    for line in README.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
        sections[title] = sections.get(title, "") + line
    return sections


def _python_blocks(section: str) -> list[str]:
    return [
        code
        for language, code in FENCE.findall(_readme_sections()[section])
        if language == "python"
    ]


def _links(text: str) -> list[str]:
    prose = FENCE.sub("", text)
    return re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"<(https?://[^>\s]+)>", prose)


def _where_a_link_leads(url: str) -> Path | None:
    """The file of this repository an absolute link shows, or None when it shows none."""
    address = url.split("#", 1)[0]
    if address.startswith(DOCS_SITE):
        page = address[len(DOCS_SITE) :].strip("/")
        return ROOT / "docs" / (f"{page}.md" if page else "index.md")
    for prefix in (f"{REPOSITORY}/blob/main/", f"{REPOSITORY}/tree/main/"):
        if address.startswith(prefix):
            return ROOT / address[len(prefix) :]
    return None


def test_every_readme_link_is_absolute_and_leads_somewhere():
    links = _links(README.read_text(encoding="utf-8"))
    assert links, "README.md has no links: the test below would check nothing"
    relative = [link for link in links if not link.startswith("https://")]
    assert relative == [], (
        f"README.md is the package index's page, where relative links are dead: {relative}; "
        f"link to the documentation site ({DOCS_SITE}…) or to the repository ({REPOSITORY}/…)"
    )
    dead = []
    for link in links:
        target = _where_a_link_leads(link)
        if link.startswith((DOCS_SITE, REPOSITORY + "/blob/", REPOSITORY + "/tree/")):
            if target is None or not target.exists():
                dead.append(link)
    assert dead == [], f"README.md links to pages or files that do not exist: {dead}"
    contributing = f"{REPOSITORY}/blob/main/CONTRIBUTING.md"
    assert DOCS_SITE in links and contributing in links, links
    # The documentation site is built for the address the README links to.
    mkdocs = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert f"\nsite_url: {DOCS_SITE}\n" in mkdocs and f"\nrepo_url: {REPOSITORY}\n" in mkdocs


def test_the_readme_quickstart_takes_nothing_for_granted():
    """The quickstart defines every name it uses (it runs in a bare `manage.py shell -c`)."""
    code = "\n".join(_python_blocks("Quickstart"))
    assert code, "README.md has no ```python block under '## Quickstart'"
    tree = ast.parse(code)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert sorted(used - defined) == []


# --- the classifiers and the CI matrix --------------------------------------------------------


def _make_variable(name: str) -> str:
    """A variable of the Makefile, as make itself reads it (not the environment's)."""
    env = {k: v for k, v in os.environ.items() if k not in (name, "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "--eval", f"print: ; @: $(info $({name}))", "print"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _pairs() -> dict[str, tuple[str, str]]:
    """What CI tests, by name: the main venv's pair (the Makefile's MAIN_PAIR) and every pair of
    its MATRIX, as (Python, Django feature release)."""
    combos = [_make_variable("MAIN_PAIR"), *_make_variable("MATRIX").split()]
    pairs = {}
    for combo in combos:
        name, python, spec = combo.split(":", 2)
        pairs[name] = (python, _django_release(spec))
    assert len(pairs) >= 2 and "main" in pairs, f"the Makefile's MAIN_PAIR and MATRIX: {combos}"
    return pairs


def _django_release(spec: str) -> str:
    """The one Django feature release ``Django>=X.Y,<…`` installs ("4.2"), or a failure naming
    the spec when it admits more than one (the classifier would then name only one of them)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    specifier = Requirement(spec).specifier
    lower = [s.version for s in specifier if s.operator == ">="]
    assert len(lower) == 1, f"{spec!r}: name the release with one '>=X.Y'"
    major, minor = Version(lower[0]).release[:2]
    release = f"{major}.{minor}"
    # Django's feature releases go X.0, X.1, X.2 (the LTS), then X+1.0.
    following = f"{major}.{minor + 1}" if minor < 2 else f"{major + 1}.0"
    assert Version(f"{release}.99") in specifier and Version(following) not in specifier, (
        f"{spec!r} admits more than Django {release} (also {following}): pin it to one feature "
        f"release, 'Django>={release},<{following}', so that what CI tests is what the "
        "classifiers say"
    )
    return release


def _tested() -> tuple[set[str], set[str]]:
    """The Django and the Python versions CI tests."""
    pairs = _pairs().values()
    return {django for _python, django in pairs}, {python for python, _django in pairs}


def _classifier_problems(classifiers: list[str]) -> list[str]:
    from trove_classifiers import classifiers as known

    djangos, pythons = _tested()
    claimed_djangos = {
        c.rsplit(" :: ", 1)[1] for c in classifiers if c.startswith("Framework :: Django :: ")
    }
    claimed_pythons = {
        c.rsplit(" :: ", 1)[1]
        for c in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    problems = []
    if claimed_djangos != djangos:
        problems.append(
            f"Django classifiers {sorted(claimed_djangos)} but CI tests {sorted(djangos)} (the "
            "main venv and the Makefile's MATRIX): change pyproject.toml's classifiers or MATRIX"
        )
    if claimed_pythons != pythons:
        problems.append(
            f"Python classifiers {sorted(claimed_pythons)} but CI tests {sorted(pythons)} (the "
            "main venv and the Makefile's MATRIX): change pyproject.toml's classifiers or MATRIX"
        )
    unknown = [c for c in classifiers if c not in known]
    if unknown:
        problems.append(f"classifiers PyPI does not know (an upload would be refused): {unknown}")
    if "Development Status :: 4 - Beta" not in classifiers:
        problems.append("no 'Development Status :: 4 - Beta'")
    return problems


def test_this_virtualenv_runs_the_pair_the_makefile_names():
    """The suite runs under the pair the Makefile says it does: MAIN_PAIR in the main virtualenv,
    its own entry of MATRIX in a matrix one (scripts/test_matrix.sh names it)."""
    import django

    name = os.environ.get("ENCOUNTERS_TEST_MATRIX", "main")
    running = ("{}.{}".format(*sys.version_info[:2]), "{}.{}".format(*django.VERSION[:2]))
    expected = _pairs()[name]
    assert running == expected, (
        f"this virtualenv ({name}) runs Python {running[0]} with Django {running[1]}, but the "
        f"Makefile says Python {expected[0]} with Django {expected[1]}: CI would test a pair the "
        "classifiers do not name; correct MAIN_PAIR/MATRIX and pyproject.toml's classifiers"
    )


def test_the_installed_classifiers_equal_the_ci_matrix():
    from importlib.metadata import metadata

    assert _classifier_problems(metadata("django-encounters").get_all("Classifier") or []) == []


def test_a_classifier_missing_or_extra_is_reported():
    from importlib.metadata import metadata

    classifiers = metadata("django-encounters").get_all("Classifier") or []
    fewer = [c for c in classifiers if c != "Programming Language :: Python :: 3.13"]
    (problem,) = _classifier_problems(fewer)
    assert "Python classifiers" in problem and "'3.13'" in problem
    more = [*classifiers, "Framework :: Django :: 5.1"]
    (problem,) = _classifier_problems(more)
    assert "Django classifiers" in problem and "'5.1'" in problem
    assert any("PyPI does not know" in p for p in _classifier_problems([*classifiers, "Nope"]))


def test_a_matrix_spec_admitting_two_django_releases_is_refused():
    assert _django_release("Django>=4.2,<5.0") == "4.2"
    assert _django_release("Django>=6.0,<6.1") == "6.0"
    assert _django_release("Django>=5.2,<6.0") == "5.2"
    for spec, release in [("Django>=6.0,<7.0", "6.0"), ("Django>=4.2", "4.2")]:
        with pytest.raises(AssertionError, match=f"admits more than Django {release}"):
            _django_release(spec)


# --- the built distributions, installed into a fresh project ----------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what pytest and the suite set for themselves."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        and not k.startswith(("ENCOUNTERS_", "PYTEST_"))
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _run(*command: str | Path, cwd: Path, stdout_only: bool = False) -> str:
    """The command's output (stdout and stderr, or stdout alone); a failure shows both."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n{output}"
    )
    return result.stdout if stdout_only else output


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The sdist and the wheel built from it, as `python -m build` makes them for an upload."""
    if os.environ.get("ENCOUNTERS_TEST_DB", "sqlite") != "sqlite":
        pytest.skip("the packaging test uses no database: it runs in the SQLite pass only")
    out = tmp_path_factory.mktemp("dist")
    log = _run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel, log


@pytest.mark.slow
def test_the_build_raises_no_deprecation_warning(dist):
    _sdist, _wheel, log = dist
    # `python -m build` shows the backend's warnings as "WARNING <text>" (setuptools < 77 or the
    # old `license = {text = ...}` table: "`project.license` as a TOML table is deprecated").
    warnings = [
        line
        for line in log.splitlines()
        if line.startswith("WARNING ") or "deprecat" in line.lower()
    ]
    assert warnings == [], log


@pytest.mark.slow
def test_the_distributions_carry_the_license_and_the_metadata(dist):
    sdist, wheel, _log = dist
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 django-encounters developers" in license_text

    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        top = names[0].split("/", 1)[0]
        member = archive.extractfile(f"{top}/LICENSE")
        assert member is not None and member.read().decode() == license_text
    with zipfile.ZipFile(wheel) as archive:
        (dist_info,) = {n.split("/", 1)[0] for n in archive.namelist() if ".dist-info/" in n}
        assert archive.read(f"{dist_info}/licenses/LICENSE").decode() == license_text
        meta: email.message.Message = email.message_from_bytes(
            archive.read(f"{dist_info}/METADATA")
        )

    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None, "the deprecated License field is still written"
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert urls == PROJECT_URLS
    classifiers = meta.get_all("Classifier") or []
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert _classifier_problems(classifiers) == []
    runtime = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert sorted(runtime) == ["Django<6.1,>=4.2", "eventsourcing<9.6,>=9.5"]


@pytest.mark.slow
def test_twine_check_strict_accepts_them(dist):
    sdist, wheel, _log = dist
    output = _run(
        sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=sdist.parent
    )
    assert output.count("PASSED") == 2, output


@pytest.mark.slow
def test_the_wheel_runs_the_readme_quickstart_in_a_fresh_project(dist, tmp_path):
    _sdist, wheel, _log = dist
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    # A virtualenv of the interpreter running the suite, with pip but nothing else.
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    # The wheel and its runtime dependencies from the package index: no test extra.
    _run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
    installed = _run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path)
    assert "django-encounters==0.1.0" in installed.lower().replace("_", "-")
    assert "pytest" not in installed.lower()
    # What a new user gets: the newest Django for this Python, which must be one CI tests.
    (django_version,) = re.findall(r"(?im)^django==(\d+\.\d+)", installed)
    assert django_version in _tested()[0], installed

    project = tmp_path / "project"
    project.mkdir()
    _run(venv / "bin" / "django-admin", "startproject", "mysite", project, cwd=tmp_path)
    settings = project / "mysite" / "settings.py"
    install_blocks = _python_blocks("Install")
    assert len(install_blocks) >= 2, "README.md's Install section shows the settings to add"
    settings.write_text(
        settings.read_text(encoding="utf-8")
        + "\n# --- README.md, section Install, as written ---\n"
        + "\n".join(install_blocks),
        encoding="utf-8",
    )

    manage = (python, project / "manage.py")
    _run(*manage, "migrate", cwd=project)
    checked = _run(*manage, "check", cwd=project)
    assert "no issues" in checked, f"the README's settings leave warnings:\n{checked}"

    quickstart = "\n".join(_python_blocks("Quickstart"))
    for run in (1, 2):
        output = _run(*manage, "shell", "-c", quickstart, cwd=project, stdout_only=True)
        # Django 5.2's shell first says how many models it imported for you.
        lines = [line for line in output.splitlines() if "imported automatically" not in line]
        lines = [line for line in lines if line]
        assert lines[:2] == ["completed", "checked_in"], f"run {run}:\n{output}"
        assert [line.split()[:4] for line in lines[2:5]] == [
            ["1", "scheduled", "->", "checked_in"],
            ["2", "checked_in", "->", "in_progress"],
            ["3", "in_progress", "->", "completed"],
        ], f"run {run}:\n{output}"
        assert "Cannot transition from 'completed' to 'scheduled'" in output, (
            f"run {run}:\n{output}"
        )
