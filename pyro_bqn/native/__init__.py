"""Small C kernels, compiled on first use with the system C compiler and loaded with
:mod:`ctypes`.

The kernels need no Python or torch headers, so a build takes a fraction of a second. The
shared library is cached under ``$PYRO_BQN_CACHE`` (default ``~/.cache/pyro_bqn``), keyed
by the source (with the shared ``*.h`` headers), the compiler flags and the CPU (the code
is built for the machine it runs on). Without a working compiler, or with
``PYRO_BQN_NATIVE=0``, :func:`load` returns ``None`` and callers use their torch
implementation, which computes the same values.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["load", "enabled", "kernel", "kernel_names", "ranges", "run_in_ranges", "SUFFIXES"]

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


#: The kernels' name suffix for each element type they are built for.
SUFFIXES = {torch.float32: "f", torch.float64: "d"}

# Below this many entries per range, handing out ranges to threads costs more than it saves.
MIN_RANGE = 1 << 15


def enabled() -> bool:
    """Whether native kernels may be used (``PYRO_BQN_NATIVE=0`` turns them off)."""
    return os.environ.get("PYRO_BQN_NATIVE", "1") != "0"


@functools.cache
def _private_temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pyro_bqn-"))


def _cache_dir() -> Path:
    root = os.environ.get("PYRO_BQN_CACHE")
    if root:
        return Path(root)
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyro_bqn"
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except (OSError, RuntimeError, KeyError):  # no home (a container user without passwd)
        pass
    # A read-only home (some CI and cluster setups): a private folder for this process. A
    # fixed path in the shared temporary folder would let another user plant a library.
    return _private_temp_dir()


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _run(command: list[str]) -> bool:
    try:
        result = subprocess.run(command, capture_output=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _build(
    source: Path, target: Path, compiler: list[str], flags: tuple[list[str], list[str]]
) -> bool:
    compile_flags, link_flags = flags
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never see a partial file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            objects, partial = Path(scratch) / "kernel.o", Path(scratch) / target.name
            if not (
                _run([*compiler, "-c", "-fPIC", *compile_flags, str(source), "-o", str(objects)])
                and _run([*compiler, "-shared", str(objects), "-o", str(partial), *link_flags])
            ):
                return False
            os.replace(partial, target)
    except OSError:
        return False
    return True


def _open(target: Path, symbols: tuple[str, ...]) -> ctypes.CDLL | None:
    """The library at ``target`` if it loads and defines ``symbols``, else ``None``."""
    try:
        library = ctypes.CDLL(str(target))
    except OSError:
        return None
    return library if all(hasattr(library, symbol) for symbol in symbols) else None


@functools.cache
def load(name: str, symbols: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled ``pyro_bqn/native/<name>.c`` as a :class:`ctypes.CDLL`, or ``None``
    (with a warning, once) when native kernels are disabled or cannot be built.

    :param symbols: functions the library must define; a cached file without them (left by
        an interrupted or foreign build) is rebuilt.
    """
    if not enabled():
        return None
    source = _SOURCE_DIR / f"{name}.c"
    compiler_command = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler_command is None:
        warnings.warn(
            f"pyro_bqn: no C compiler found; using the slower torch implementation of {name}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    compiler = shlex.split(compiler_command)  # CC may carry arguments, e.g. "ccache gcc"
    # The shared headers are part of every kernel's code: a change to one rebuilds them all.
    code = b"\0".join(path.read_bytes() for path in [source, *sorted(_SOURCE_DIR.glob("*.h"))])
    for flags in _FLAG_SETS:
        recipe = f"{flags} {compiler} {_cpu_signature()}".encode()
        key = hashlib.sha256(code + b"\0" + recipe).hexdigest()[:16]
        target = _cache_dir() / f"{name}-{key}.so"
        library = _open(target, symbols) if target.exists() else None
        if library is None and _build(source, target, compiler, flags):
            library = _open(target, symbols)
        if library is not None:
            return library
    warnings.warn(
        f"pyro_bqn: could not compile {source} with {compiler_command}; using the slower "
        f"torch implementation of {name}",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


@functools.cache
def _executor() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


# A forked child inherits the pool but not its threads, so work handed to it would wait
# forever; the child builds its own pool instead.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_executor.cache_clear)


def ranges(n: int) -> list[tuple[int, int]]:
    """``[begin, end)`` ranges covering ``0..n``: one per torch thread, none shorter than
    :data:`MIN_RANGE` (so small inputs get one range)."""
    count = max(1, min(torch.get_num_threads(), n // MIN_RANGE))
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def run_in_ranges(kernel_call: Callable[[int, int], int], n: int) -> bool:
    """Call ``kernel_call(begin, end)`` on the :func:`ranges` of ``0..n``, in parallel
    threads when there are several (a ctypes call releases the GIL). Returns whether any
    call returned non-zero (the kernels' way to refuse their input)."""
    parts = ranges(n)
    if len(parts) == 1:
        return kernel_call(*parts[0]) != 0
    futures = [_executor().submit(kernel_call, *part) for part in parts]
    # Every range must finish before this returns, whatever the first one says: the caller
    # may free the buffers the kernels are still writing as soon as it has an answer.
    concurrent.futures.wait(futures)
    return any([future.result() != 0 for future in futures])


def kernel_names(prefix: str) -> tuple[str, ...]:
    """The functions a kernel pair defines: ``<prefix>_<forward|backward>_<suffix>`` for
    every element type in :data:`SUFFIXES` (pass them to :func:`load` as ``symbols``)."""
    directions = ("forward", "backward")
    return tuple(f"{prefix}_{d}_{suffix}" for d in directions for suffix in SUFFIXES.values())


@functools.cache
def kernel(
    library: ctypes.CDLL, prefix: str, direction: str, dtype: torch.dtype, argtypes: tuple
) -> Callable[..., int]:
    """``<prefix>_<direction>_<suffix>`` of ``library``, declared once to take ``argtypes``
    and return an ``int64`` status: ctypes then converts plain integers (addresses) and
    ``None`` itself, which is cheaper than building ctypes objects on every call."""
    function = getattr(library, f"{prefix}_{direction}_{SUFFIXES[dtype]}")
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int64
    return function
