"""Small C kernels, compiled on first use with the system C compiler and loaded with
:mod:`ctypes`.

The kernels need no Python or torch headers, so a build takes a fraction of a second. The
shared library is cached under ``$PYRO_BQN_CACHE`` (default ``~/.cache/pyro_bqn``), keyed
by the source, the compiler flags and the CPU (the code is built for the machine it runs
on). Without a working compiler, or with ``PYRO_BQN_NATIVE=0``, :func:`load` returns
``None`` and callers use their torch implementation, which computes the same values.
"""

from __future__ import annotations

import ctypes
import functools
import getpass
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["load", "enabled"]

_SOURCE_DIR = Path(__file__).parent
# (compile flags, link flags), best first. -ffast-math lets gcc vectorise exp/log through
# glibc's vector math library; the kernels detect non-finite inputs themselves so the caller
# can fall back to exact torch code. It is passed to the compile step only: linking with it
# adds crtfastmath.o, which turns on flush-to-zero for the whole process when loaded.
_FLAG_SETS = (
    (["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"], ["-lmvec", "-lm"]),
    (["-O3", "-ffast-math", "-fopenmp-simd"], ["-lm"]),
    (["-O2"], ["-lm"]),
)


def enabled() -> bool:
    """Whether native kernels may be used (``PYRO_BQN_NATIVE=0`` turns them off)."""
    return os.environ.get("PYRO_BQN_NATIVE", "1") != "0"


def _cache_dir() -> Path:
    root = os.environ.get("PYRO_BQN_CACHE")
    if root:
        return Path(root)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro_bqn"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if os.access(base, os.W_OK):
        return base
    # A read-only home (some CI and cluster setups): build in a per-user temporary folder.
    return Path(tempfile.gettempdir()) / f"pyro_bqn-{getpass.getuser()}"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _run(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


def _build(source: Path, target: Path, compiler: str, flags: tuple[list[str], list[str]]) -> bool:
    compile_flags, link_flags = flags
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        objects, partial = Path(scratch) / "kernel.o", Path(scratch) / target.name
        if not (
            _run([compiler, "-c", "-fPIC", *compile_flags, str(source), "-o", str(objects)])
            and _run([compiler, "-shared", str(objects), "-o", str(partial), *link_flags])
        ):
            return False
        os.replace(partial, target)
    return True


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled ``pyro_bqn/native/<name>.c`` as a :class:`ctypes.CDLL`, or ``None``
    (with a warning, once) when native kernels are disabled or cannot be built."""
    if not enabled():
        return None
    source = _SOURCE_DIR / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(
            f"pyro_bqn: no C compiler found; using the slower torch implementation of {name}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    code = source.read_bytes()
    for flags in _FLAG_SETS:
        recipe = f"{flags} {compiler} {_cpu_signature()}".encode()
        key = hashlib.sha256(code + b"\0" + recipe).hexdigest()[:16]
        target = _cache_dir() / f"{name}-{key}.so"
        try:
            if target.exists() or _build(source, target, compiler, flags):
                return ctypes.CDLL(str(target))
        except OSError:
            continue
    warnings.warn(
        f"pyro_bqn: could not compile {source} with {compiler}; using the slower torch "
        f"implementation of {name}",
        RuntimeWarning,
        stacklevel=2,
    )
    return None
