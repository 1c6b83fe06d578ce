"""The package's layout: every module imports on its own, and every subpackage is installed."""

from __future__ import annotations

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
    r = subprocess.run([sys.executable, "-c", code, json.dumps(modules)], capture_output=True, text=True, timeout=600, cwd=ROOT / "tests")
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
    found = {"localmoe.tui"} | {".".join(("localmoe", *p.parent.relative_to(ROOT / "localmoe").parts)) for p in (ROOT / "localmoe").rglob("__init__.py")}
    assert found == listed, f"pyproject.toml [tool.setuptools] packages: missing {sorted(found - listed)}, stale {sorted(listed - found)}"
    assert config["package-dir"] == {"localmoe.tui": "tui"}
