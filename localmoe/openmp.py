"""How long an idle OpenMP thread spins before it sleeps: localmoe's default, set before torch loads libgomp.

The kernels (compute/csrc/*.c) and PyTorch run their parallel regions on libgomp's threads. A thread
that reaches a barrier first spins, then sleeps; libgomp spins 300,000 times by default (about 3 ms, by
its source's estimate of 100,000 spins a millisecond). On a quiet machine the waits are short (10,000
spins decoded within the default's run-to-run spread). When other processes keep the cores busy, the
spinning thread holds a core while the thread it waits for queues behind it, and every region pays for
it: a 48-layer Q4_0 decode under a 2-process busy loop, 2 threads, ran at 2.3-3.4 tok/s with libgomp's
default and 5.5-6.4 tok/s with 10,000 spins (about 0.1 ms). 1,000 spins was as good under the loop, but
its quiet streams looked slower (10.8-15.2 tok/s against the default's 13.7-20.3, three each): there
every wait longer than ~10 us ends in a futex sleep and a wake-up (docs/speed.md, "Waiting threads").

libgomp reads GOMP_SPINCOUNT once, when it is loaded (by `import torch`, or the first kernel), so this
module sets it on import and `localmoe/__init__.py` imports it first. A value already in the environment
is kept; LOCALMOE_OPENMP_DEFAULTS=0 leaves libgomp's own default (bench runs llama.cpp so, as its users
run it). `describe()` says which applies, for `--verbose`.
"""

from __future__ import annotations

import os
import sys

SPIN_ENV = "GOMP_SPINCOUNT"  # libgomp's variable: spins before a waiting thread sleeps
SPIN_COUNT = 10_000  # localmoe's default (about 0.1 ms)
LIBGOMP_SPIN_COUNT = 300_000  # libgomp's own default, when neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY is set
DEFAULTS_ENV = "LOCALMOE_OPENMP_DEFAULTS"  # "0": leave libgomp's default

# How the spin count was decided in this process: "localmoe", "user", "libgomp" (opted out) or "late"
# (torch, and with it libgomp, was loaded before localmoe: the environment came too late to count).
source = "libgomp"


def apply() -> None:
    """Set GOMP_SPINCOUNT to SPIN_COUNT unless the user set it or opted out; note how it was decided."""
    global source
    if source == "localmoe":  # (set already: this process's value is ours)
        return
    if SPIN_ENV in os.environ:
        source = "user"
    elif os.environ.get(DEFAULTS_ENV) == "0":
        source = "libgomp"
    elif "torch" in sys.modules:
        source = "late"
    else:
        os.environ[SPIN_ENV] = str(SPIN_COUNT)
        source = "localmoe"


def baseline_env() -> dict[str, str]:
    """The environment for a process that should run as its users run it (bench's llama.cpp worker):
    without the spin count localmoe set, and told not to set it again on importing localmoe. A value
    the user set stays."""
    env = dict(os.environ)
    if source == "localmoe":
        env.pop(SPIN_ENV, None)
    env[DEFAULTS_ENV] = "0"
    return env


def describe() -> str:
    """One line for --verbose: the spin count in effect and where it came from."""
    value = os.environ.get(SPIN_ENV)
    if source == "localmoe":
        return f"{value} spins before a waiting thread sleeps (localmoe's default; set {SPIN_ENV} to change)"
    if source == "user":
        return f"{value} spins before a waiting thread sleeps ({SPIN_ENV} from the environment)"
    if source == "late":
        return (
            f"libgomp's default, {LIBGOMP_SPIN_COUNT:,} spins (torch was imported before localmoe; "
            f"set {SPIN_ENV}={SPIN_COUNT} before starting Python to wait less on a busy machine)"
        )
    return f"libgomp's default, {LIBGOMP_SPIN_COUNT:,} spins ({DEFAULTS_ENV}=0)"


apply()
