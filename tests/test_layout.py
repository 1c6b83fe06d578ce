"""The package's layout: no import circle, every module imports on its own, only runtime.py touches
Runtime's private attributes, and every subpackage is installed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"localmoe": ROOT / "localmoe", "localmoe.tui": ROOT / "tui"}  # as pyproject.toml maps them


def _modules() -> list[str]:
    """Every module of the package by its installed name (localmoe.tui lives in tui/)."""
    out = []
    for top, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__main__":
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out.append(".".join((top, *rel)))
    return out


def _source(module: str) -> Path:
    top = "localmoe.tui" if module.startswith("localmoe.tui") else "localmoe"
    rel = module[len(top) :].lstrip(".").split(".") if module != top else []
    folder = PACKAGE_DIRS[top].joinpath(*rel)
    return folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")


def _imports(module: str, modules: set[str]) -> set[str]:
    """The package's modules `module` imports anywhere in its file: at the top, under TYPE_CHECKING
    or inside a function (a lazy import is still an arrow between the two)."""
    path = _source(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != module}
    return out


def test_no_import_circle():
    modules = set(_modules())
    graph = {m: _imports(m, modules) for m in modules}
    assert "localmoe.fallback.miss_policies" in graph["localmoe.residency.scheduler"]  # the walk sees arrows
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " → ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)


def test_only_runtime_touches_runtime_private_attributes():
    """The private names Runtime defines (self._x attributes and _methods) are read on another
    object (rt._lock, self.runtime._stats, ...) nowhere in the package but runtime.py."""
    tree = ast.parse((ROOT / "localmoe" / "runtime.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runtime")
    private = {
        n.name
        for n in cls.body
        if isinstance(n, ast.FunctionDef) and n.name.startswith("_") and not n.name.endswith("__")
    }
    private |= {
        n.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
        and n.attr.startswith("_")
        and not n.attr.endswith("__")
    }
    assert {"_lock", "_clock", "_stats"} <= private
    found = []
    for module in _modules():
        path = _source(module)
        if path == ROOT / "localmoe" / "runtime.py":
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(n, ast.Attribute)
                and n.attr in private
                and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
            ):
                found.append(f"{path.relative_to(ROOT)}:{n.lineno}: .{n.attr}")
    assert not found, "Runtime's private attributes used outside runtime.py:\n" + "\n".join(found)


def test_every_module_imports_alone():
    """Each module imported first, with no other module of the package loaded (third-party ones stay
    cached, so this runs in one process): an import circle between modules fails here."""
    code = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "localmoe" or m.startswith("localmoe.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    modules = _modules()
    assert "localmoe.residency.scheduler" in modules and "localmoe.tui.launch" in modules
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT / "tests",
    )
    assert r.returncode == 0, r.stderr
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())


def test_the_gguf_subpackage_does_not_shadow_the_gguf_library():
    """localmoe/gguf/ reads files with the third-party `gguf` package, imported absolutely."""
    import gguf

    import localmoe.gguf.file

    assert Path(gguf.__file__).resolve().parent != (ROOT / "localmoe" / "gguf")
    assert localmoe.gguf.file.GGUFReader is gguf.GGUFReader


def test_every_subpackage_is_installed():
    """A non-editable install ships the packages pyproject.toml lists: each folder of localmoe/ with
    an __init__.py must be one of them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"localmoe.tui"} | {
        ".".join(("localmoe", *p.parent.relative_to(ROOT / "localmoe").parts))
        for p in (ROOT / "localmoe").rglob("__init__.py")
    }
    assert found == listed, (
        f"pyproject.toml [tool.setuptools] packages: missing {sorted(found - listed)}, stale {sorted(listed - found)}"
    )
    assert config["package-dir"] == {"localmoe.tui": "tui"}
