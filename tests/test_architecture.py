"""The shape of the house (docs/architecture.md), checked on every file's imports.

Each room lists the top-level packages it must never import. Imports inside functions and under
TYPE_CHECKING count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"core", "api", "worker", "models", "results", "jail", "starvation", "cli", "scripts", "migrations", "bench"}

FORBIDDEN: dict[str, set[str]] = {
    "core": OURS - {"core"},  # the ground floor: nothing of ours above it
    "models": OURS - {"models", "core"},
    # The shapes of results, which the API serves and the worker checks: pydantic and the science's registries.
    "results": OURS - {"results", "starvation"},
    "api": {"worker", "cli", "scripts", "bench"},
    "worker": {"api", "cli", "scripts", "bench"},
    "jail": OURS - {"jail", "core", "starvation"},
    "cli": OURS - {"cli", "core"},  # talks to the service over HTTP
    "migrations": OURS - {"migrations", "models", "core"},
    # The science package runs the same in a worker, a notebook and a benchmark.
    "starvation": (OURS - {"starvation"}) | {"fastapi", "starlette", "celery", "kombu", "sqlalchemy", "redis",
                                             "pydantic_settings"},
}


def imported_packages(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level package) for every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def forbidden_imports(root: Path) -> list[str]:
    found = []
    for room, forbidden in FORBIDDEN.items():
        for path in sorted((root / room).rglob("*.py")):
            for line, package in imported_packages(path):
                if package in forbidden:
                    found.append(f"{path.relative_to(root)}:{line} imports {package} ({room}/ must not)")
    return found


def test_no_room_imports_what_the_house_forbids():
    assert forbidden_imports(ROOT) == []


def test_every_room_is_checked():
    for room in FORBIDDEN:
        assert list((ROOT / room).rglob("*.py")), f"{room}/ has no Python files: moved or renamed?"


def test_the_check_finds_a_forbidden_import(tmp_path):
    # The check must be able to fail: a house with one crossing of each kind.
    crossings = {
        "api/routes.py": "from worker.queue import send\n",
        "worker/runner.py": "def later():\n    import api.settings\n",
        "core/queue.py": "from models.db import database\n",
        "models/db.py": "from cli import config\n",
        "results/train.py": "from models.db import database\n",
        "jail/child.py": "import worker\n",
        "starvation/training.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import sqlalchemy\n",
    }
    for name, source in crossings.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    (tmp_path / "api" / "fine.py").write_text("from core.settings import get_settings\nfrom . import routes\n")
    found = forbidden_imports(tmp_path)
    assert sorted(line.split(":")[0] for line in found) == sorted(crossings)


# A comparison of a job's kind with a kind's name: `job.kind == "train"`, `job["kind"] in ("train", "sweep")`,
# `kind != JobKind.AUDIT`, `"repair" == kind`, in Python or in a template.
KIND_BRANCH = re.compile(
    r"""kind["']?\]?\s*(==|!=|\bnot\s+in\b|\bin\b)\s*[("'\[{]|kind["']?\]?\s*(==|!=)\s*JobKind\."""
    r"""|["'][a-z_]+["']\s*(==|!=)\s*[\w.\[\]"']*kind\b|JobKind\.\w+\s*(==|!=)"""
)
# A kind's own modules may say what they are; everything else goes through the registries (api/kinds, worker/kinds).
KIND_MODULES = ("api/kinds/", "results/", "api/dashboard/templates/kinds/")


def kind_branches(root: Path) -> list[str]:
    """path:line of every comparison with a kind's name outside the kind modules."""
    found = []
    for room in ("core", "models", "api", "worker", "jail", "cli"):
        for path in sorted((root / room).rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.suffix not in (".py", ".html") or relative.startswith(KIND_MODULES):
                continue
            if relative.startswith("worker/") and path.name.endswith("_job.py"):  # the worker's kind modules
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if KIND_BRANCH.search(line):
                    found.append(f"{relative}:{number}: {line.strip()}")
    return found


def test_nothing_outside_the_kind_modules_branches_on_a_kind():
    assert kind_branches(ROOT) == []


@pytest.mark.parametrize("line", [
    'if job.kind == "train":',
    "    summary = x if job['kind'] in ('train', 'sweep') else y",
    '{% if job.kind == "audit" and report %}',
    "if kind != JobKind.AUDIT:",
    'if "repair" == job.kind:',
    "steps = spec.get('steps') if kind == 'train' else None",
])
def test_the_kind_check_finds_a_branch(tmp_path, line):
    (tmp_path / "api" / "dashboard" / "templates" / "kinds").mkdir(parents=True)
    (tmp_path / "api" / "service.py").write_text(f"{line}\n")
    (tmp_path / "api" / "kinds").mkdir()
    (tmp_path / "api" / "kinds" / "audit.py").write_text(f"{line}\n")  # allowed: the kind's own module
    (tmp_path / "worker").mkdir()
    (tmp_path / "worker" / "audit_job.py").write_text(f"{line}\n")  # allowed too
    assert kind_branches(tmp_path) == [f"api/service.py:1: {line.strip()}"]
