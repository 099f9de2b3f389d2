"""The house rules of ARCHITECTURE.md, checked on the code itself.

* each module imports only the modules it may (the table in ARCHITECTURE.md);
* ``ingest`` never pulls in torch, MONAI or highdicom, even indirectly (checked in a fresh interpreter);
* only ``report`` imports highdicom;
* nothing reads the environment at import time (no module-level ``os.environ`` / ``os.getenv``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "dicomnode"

#: module -> dicomnode modules it may import (besides itself, errors and the package root).
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "domain": set(),
    # ingest may use imaging.headers only (pydicom), checked below
    "ingest": {"config", "domain", "store", "imaging", "netutil", "tls"},
    "store": {"config", "domain"},
    "routing": {"domain"},
    "imaging": {"domain"},
    "bmd": {"domain", "imaging", "ml"},
    "ml": {"domain", "imaging", "bmd", "phantom", "config", "labs"},
    "labs": {"domain"},
    "report": {"domain", "imaging"},
    "delivery": {"config", "domain", "netutil", "tls"},
    "phantom": {"domain", "imaging"},
    "netutil": set(),
    "tls": {"config"},  # SSL contexts from settings (stdlib ssl only; typing import of config)
    "vocab": {"domain"},
    "pipeline": {
        "config", "domain", "store", "routing", "imaging", "bmd", "ml", "report", "delivery", "ingest",
        "phantom", "netutil", "labs",
    },
    "web": {
        "config", "domain", "store", "routing", "pipeline", "delivery", "ingest", "netutil", "tls", "labs",
    },
    "cli": {
        "config", "domain", "store", "routing", "imaging", "bmd", "ml", "report", "delivery", "ingest",
        "phantom", "netutil", "pipeline", "web", "tls", "labs",
    },
}  # fmt: skip
#: Every module may use these: the error hierarchy, the package root and the one vocabulary.
COMMON = {"errors", "__init__", "", "vocab"}


def _top_module(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pytest.fail(f"{path}: relative import at line {node.lineno}; use absolute dicomnode imports")
    return out


def _py_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "migrations" not in p.parts)


def test_module_import_table() -> None:
    problems: list[str] = []
    for path in _py_files():
        top = _top_module(path)
        if top not in ALLOWED:
            continue
        for name, line in _imports(path):
            if not name.startswith("dicomnode"):
                continue
            parts = name.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target == top or target in COMMON:
                continue
            if target not in ALLOWED[top]:
                problems.append(
                    f"{path.relative_to(PKG.parent)}:{line}: {top} may not import dicomnode.{target}"
                )
            if (
                top == "ingest"
                and target == "imaging"
                and name
                not in (
                    "dicomnode.imaging.headers",
                    "dicomnode.imaging",
                )
            ):
                problems.append(f"{path.relative_to(PKG.parent)}:{line}: ingest may use imaging.headers only")
    assert not problems, "\n".join(problems)


def test_only_report_imports_highdicom() -> None:
    offenders = [
        f"{p.relative_to(PKG.parent)}:{line}"
        for p in _py_files()
        if _top_module(p) != "report"
        for name, line in _imports(p)
        if name == "highdicom" or name.startswith("highdicom.")
    ]
    assert not offenders, f"highdicom imported outside dicomnode.report: {offenders}"


def test_no_environment_read_at_import_time() -> None:
    offenders: list[str] = []
    for path in _py_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for stmt in tree.body:  # module level only; functions and classes are run later
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                    offenders.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not offenders, f"environment read at import time: {offenders}"


def test_ingest_stays_light() -> None:
    """Importing the receiver must not load torch, MONAI or highdicom (fresh interpreter, transitive)."""
    if not (PKG / "ingest").is_dir():
        pytest.skip("dicomnode.ingest not present")
    imports = (
        "import importlib, pkgutil, dicomnode.ingest as m\n"
        "for info in pkgutil.walk_packages(m.__path__, 'dicomnode.ingest.'):\n"
        "    importlib.import_module(info.name)\n"
    )
    loaded = _loaded_after(imports, ("torch", "monai", "highdicom"))
    assert loaded == "", f"dicomnode.ingest pulls in: {loaded}"


def test_analyze_command_stays_off_the_database() -> None:
    """``dicomnode analyze`` loads neither the store (SQLAlchemy, Alembic) nor the delivery code: importing
    them took about half a second of its cold start (issue 9). Fresh interpreter, transitive."""
    imports = (
        "import dicomnode.cli, dicomnode.cli.analyze, dicomnode.cli.knee\n"
        "import dicomnode.pipeline.analyze, dicomnode.pipeline.knee\n"
    )
    loaded = _loaded_after(imports, ("sqlalchemy", "alembic", "dicomnode.store", "dicomnode.delivery"))
    assert loaded == "", f"dicomnode analyze pulls in: {loaded}"


def _loaded_after(imports: str, names: tuple[str, ...]) -> str:
    """Which of ``names`` a fresh interpreter has loaded after running ``imports`` (comma-separated)."""
    code = imports + f"import sys\nprint(','.join(sorted(n for n in {names!r} if n in sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _runtime_imports(path: Path) -> list[tuple[str, int]]:
    """Imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, node.lineno))
    return out


def test_web_and_pipeline_use_store_methods_only() -> None:
    """No SQL outside the store: web and pipeline call store methods, never SQLAlchemy or the table models."""
    offenders = [
        f"{p.relative_to(PKG.parent)}:{line}: {name}"
        for p in _py_files()
        if _top_module(p) in ("web", "pipeline")
        for name, line in _runtime_imports(p)
        if name == "sqlalchemy"
        or name.startswith("sqlalchemy.")
        or name in ("dicomnode.store.models", "dicomnode.store.engine", "dicomnode.store.base")
    ]
    assert not offenders, offenders
