"""Building the C sources in localmoe/compute/csrc/ on first use, into the cache directory.

Each library is compiled with the system C compiler (`$CC`, else `cc`) into
`~/.cache/localmoe/` (or `$LOCALMOE_CACHE`), named by a hash of its source (with the csrc/ headers
it includes, e.g. common.h), compiler flags, platform and the CPU's flags (a `-march=native` build
is for this CPU). The compiler writes a
temporary file inside the cache directory, which is then renamed into place: the rename never
crosses a filesystem (no EXDEV from a tmpfs build folder), and a concurrent builder never loads a
half-written file. A failed build raises `BuildError` with the compiler's first error line (the
whole output is kept in the exception and in `<stem>-build.log` beside the libraries); callers keep
it and report it (`localmoe info`, `run --verbose`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tempfile

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


class BuildError(RuntimeError):
    """The C compiler failed (or is missing); `str()` is one line, `.stderr` the whole output."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(message)
        self.stderr = stderr


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86: flags; Arm: Features
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> str:
    base = os.environ.get("LOCALMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "localmoe"
    )
    os.makedirs(base, exist_ok=True)
    return base


def source_path(name: str) -> str:
    return os.path.join(CSRC, name)


def _with_local_headers(text: bytes, seen: set[str] | None = None) -> bytes:
    """`text` followed by the content of each csrc/ header it includes with `#include "name"` (and
    theirs, once each): the cache key then changes when a shared header does (csrc/common.h)."""
    seen = set() if seen is None else seen
    out = [text]
    for m in re.finditer(rb'^\s*#\s*include\s*"([^"]+)"', text, re.MULTILINE):
        name = m.group(1).decode()
        if name in seen:
            continue
        seen.add(name)
        try:
            with open(source_path(name), "rb") as f:
                out.append(_with_local_headers(f.read(), seen))
        except OSError:
            pass  # not ours: the compiler reports it
    return b"".join(out)


def _first_error(stderr: str, cc: str) -> str:
    """The line of the compiler's output that says what went wrong (the first `error:` line, else the last line)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else f"{cc} failed"


def build(source: str, stem: str, flags: list[str], libs: list[str] | None = None, key_extra: str = "") -> str:
    """Compile localmoe/compute/csrc/`source` into a shared library in the cache directory (once per source
    version, flags, CPU and `key_extra`, e.g. a hash of headers it includes) and return its path;
    `libs` go after the source on the command line. Raises BuildError with the compiler's message."""
    libs = libs or []
    path = source_path(source)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise BuildError(f"the C source {path} is missing ({exc.strerror}); reinstall localmoe") from None
    cc = os.environ.get("CC", "cc")
    text = _with_local_headers(text)  # the source and the headers of ours it includes
    key = hashlib.sha256(
        text + " ".join([cc, *flags, *libs, key_extra, sys.platform, *sorted(cpu_flags())]).encode()
    ).hexdigest()[:16]
    try:
        folder = cache_dir()
    except OSError as exc:
        raise BuildError(
            f"cannot create the cache directory for the C kernels ({exc}); set LOCALMOE_CACHE to a writable folder"
        ) from None
    so = os.path.join(folder, f"{stem}-{key}.so")
    if os.path.exists(so):
        return so
    fd, tmp = tempfile.mkstemp(
        prefix=f".{stem}-", suffix=".so.tmp", dir=folder
    )  # same folder: the rename below never crosses filesystems
    os.close(fd)
    try:
        cmd = [cc, *flags, "-shared", "-fPIC", path, "-o", tmp, *libs]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            raise BuildError(f"no C compiler: '{cc}' was not found (install gcc or clang, or set CC)") from None
        except subprocess.TimeoutExpired:
            raise BuildError(f"{cc} took more than 300 s to build {source}") from None
        if r.returncode != 0:
            log = os.path.join(folder, f"{stem}-build.log")
            try:  # the whole compiler output, for a bug report
                with open(log, "w") as f:
                    f.write(" ".join(cmd) + "\n" + r.stderr)
                where = f" (full output in {log})"
            except OSError:
                where = ""
            raise BuildError(f"{cc} failed on {source}: {_first_error(r.stderr, cc)}{where}", r.stderr)
        os.replace(tmp, so)  # atomic within one folder
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def load(source: str, stem: str, flags: list[str], libs: list[str] | None = None, key_extra: str = "") -> ctypes.CDLL:
    """build(), then load it with ctypes (calls release the GIL)."""
    so = build(source, stem, flags, libs, key_extra)
    try:
        return ctypes.CDLL(so)
    except OSError as exc:
        raise BuildError(f"could not load the built {source} ({exc})") from None
