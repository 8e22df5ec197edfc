"""Small C kernels, compiled on first use with the system C compiler and loaded with
:mod:`ctypes`, and :func:`operator`, which exposes each as a torch operator.

Each kernel is reached through a :func:`torch.library.custom_op` (``pyro_bqn::<name>``) whose
implementation runs the kernel where it applies and the same formulas in torch elsewhere
(other devices and dtypes, inputs the kernel refuses). :func:`torch.compile` then sees one
operator, not a Python function it cannot trace, and ``torch.library.opcheck`` can test the
registration.

The kernels need no Python or torch headers, so a build takes a fraction of a second. The
shared library is cached under ``$PYRO_BQN_CACHE`` (default ``$XDG_CACHE_HOME/pyro_bqn``,
else ``~/.cache/pyro_bqn``), keyed by the source (with the shared ``*.h`` headers), the
compiler flags and the CPU (the code is built for the machine it runs on). Without a working
compiler, or with ``PYRO_BQN_NATIVE=0``, :func:`load` returns ``None`` and callers use their
torch implementation, which computes the same values.

Loading a library runs its code, and its name is predictable, so the cache is guarded:

* A cache folder this module creates gets mode ``0700``. A folder (``PYRO_BQN_CACHE`` too)
  that is not owned by this process's user, or that group or others may write, is not used
  at all, with a warning: libraries are then built in a private temporary folder.
* Each library is written with a build record beside it (``<name>-<key>.json``: its size and
  SHA-256), both fsynced before they are renamed into place, under a lock that keeps
  concurrent builds from pairing one's library with the other's record. A library is loaded
  only if it and its record are regular files owned by the user and writable by no one else,
  and its size and hash match the record; otherwise (planted, truncated by a crash, from an
  older version) it is rebuilt, never loaded: a truncated library would crash the process
  with SIGBUS.
* A cache that is safe but not writable still serves the libraries built in it; missing ones
  are built in the private temporary folder, with a warning saying so.

The private temporary folder (``$TMPDIR/pyro_bqn-*``, mode ``0700``) is removed when the
process that made it exits (a loaded library may be unlinked: its mapping stays valid). The
folders above the cache are not checked: if others may write one of them, they could swap
the cache folder for their own between the checks and the load.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import functools
import hashlib
import inspect
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from pyro_bqn.atomic_files import write_bytes, write_text

if os.name == "posix":  # elsewhere native kernels are off (see enabled)
    import fcntl

__all__ = [
    "SUFFIXES",
    "enabled",
    "kernel",
    "kernel_names",
    "library_for",
    "load",
    "operator",
    "ranges",
    "run_in_ranges",
]

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
    """Whether native kernels may be used: ``PYRO_BQN_NATIVE=0`` turns them off, and they
    need a POSIX system, where the cache's ownership and permission checks mean something."""
    return os.name == "posix" and os.environ.get("PYRO_BQN_NATIVE", "1") != "0"


@functools.cache
def _warn_once(message: str) -> None:
    """Warn with ``message`` the first time only: a process loads several kernels, and one
    cause (an unsafe cache folder, say) is worth one warning."""
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _untrusted(info: os.stat_result) -> str | None:
    """Why a file or folder with status ``info`` may hold code put there by another user, or
    ``None`` if it may not: it must be owned by this process's user and writable by no one
    else."""
    user = os.geteuid()
    if info.st_uid != user:
        return f"is owned by user id {info.st_uid}, not by this process's user (id {user})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):#o})"
    return None


def _remove_private_folder(folder: Path, creator: int) -> None:
    # A forked child inherits this exit handler, but the folder is its parent's to remove.
    if os.getpid() == creator:
        shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def _private_temp_dir() -> Path:
    """A folder for this process's builds when no safe, writable cache exists: made by
    :func:`tempfile.mkdtemp` (mode ``0700``, so only this user can put code in it) and
    removed when the process exits, so that processes do not pile up folders of libraries."""
    folder = Path(tempfile.mkdtemp(prefix="pyro_bqn-"))
    atexit.register(_remove_private_folder, folder, os.getpid())
    return folder


def _make_private_folder(folder: Path) -> None:
    """Create ``folder`` with mode ``0700`` (its missing parents as usual) unless it exists;
    whether an existing one may be used is :func:`_untrusted`'s to say."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except OSError:
        if folder.is_dir():
            return
        raise
    os.chmod(folder, 0o700)  # the umask may have taken bits from mkdir's mode; make it exact


class _Cache(NamedTuple):
    """Where :func:`load` looks for libraries and builds missing ones."""

    folder: Path | None
    """The cache folder to look in; ``None`` if there is none that may be used."""
    writable: bool
    """Whether builds go into ``folder`` (else into :func:`_private_temp_dir`)."""
    note: str | None
    """Why they do not, for the warning when the private folder is first used."""

    def build_folder(self) -> Path:
        """The folder new libraries are built in."""
        return self.folder if self.writable and self.folder else _private_temp_dir()


def _cache() -> _Cache:
    """The configured cache folder (created if missing) and whether it may be used."""
    setting = os.environ.get("PYRO_BQN_CACHE")
    try:
        folder = Path(setting or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError):  # no home (a container user without passwd)
        return _Cache(None, False, "there is no home folder for the kernel cache")
    if not setting:
        folder = folder / "pyro_bqn"
    name = f"the kernel cache {'PYRO_BQN_CACHE=' if setting else ''}{folder}"
    try:
        _make_private_folder(folder)
        info = folder.stat()
    except OSError as error:
        return _Cache(None, False, f"{name} could not be made ({error})")
    problem = _untrusted(info) if stat.S_ISDIR(info.st_mode) else "is not a folder"
    if problem is not None:
        return _Cache(None, False, f"{name} {problem}, so it is not used")
    if not os.access(folder, os.W_OK | os.X_OK):
        return _Cache(folder, False, f"{name} is not writable")
    return _Cache(folder, True, None)


@functools.cache
def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> list[str] | None:
    """The C compiler command (``$CC``, which may carry arguments such as ``ccache gcc``,
    else ``cc`` or ``gcc``), or ``None`` if there is none."""
    command = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return None if command is None else shlex.split(command)


def _library_stem(name: str, compiler: list[str], flags: tuple[list[str], list[str]]) -> str:
    """``<name>-<key>``: the file name (less ``.so``) of kernel ``name`` built by ``compiler``
    with ``flags``, the key a hash of everything the build depends on."""
    source = _SOURCE_DIR / f"{name}.c"
    # The shared headers are part of every kernel's code: a change to one rebuilds them all.
    code = b"\0".join(path.read_bytes() for path in [source, *sorted(_SOURCE_DIR.glob("*.h"))])
    recipe = f"{flags} {compiler} {_cpu_signature()}".encode()
    key = hashlib.sha256(code + b"\0" + recipe).hexdigest()[:16]
    return f"{name}-{key}"


def _record_path(library: Path) -> Path:
    """Where the build record of ``library`` lies: beside it, ``<name>-<key>.json``."""
    return library.with_suffix(".json")


def _record(data: bytes) -> str:
    """The build record of a library whose content is ``data``: its size and SHA-256."""
    return json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}) + "\n"


@contextmanager
def _locked(folder: Path, stem: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.<stem>.lock`` for the block, so that one process
    at a time checks, builds and loads library ``stem`` there. Without it, two processes
    building at once could leave one's library beside the other's record, and both would
    find their new build refused.

    :raises OSError: if the lock file cannot be made (``folder`` is not writable).
    """
    descriptor = os.open(
        folder / f".{stem}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _run(command: list[str]) -> bool:
    try:
        result = subprocess.run(command, capture_output=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _build(
    source: Path, library: Path, compiler: list[str], flags: tuple[list[str], list[str]]
) -> bool:
    """Compile ``source`` into ``library`` and write its build record; ``False`` if the
    compiler fails.

    Both files are written by :mod:`pyro_bqn.atomic_files` (a temporary file, fsynced, then
    renamed), so a crash leaves the old file or the new one whole, never a part; the record
    comes second, so a library is never vouched for before it is complete.

    :raises OSError: if a file cannot be written.
    """
    compile_flags, link_flags = flags
    with tempfile.TemporaryDirectory(dir=library.parent, prefix=".build-") as scratch:
        objects, linked = Path(scratch) / "kernel.o", Path(scratch) / "kernel.so"
        if not (
            _run([*compiler, "-c", "-fPIC", *compile_flags, str(source), "-o", str(objects)])
            and _run([*compiler, "-shared", str(objects), "-o", str(linked), *link_flags])
        ):
            return False
        data = linked.read_bytes()
    write_bytes(library, data)
    write_text(_record_path(library), _record(data))
    return True


def _open_verified(library: Path, symbols: tuple[str, ...]) -> ctypes.CDLL | None:
    """The library at ``library`` if it is this user's intact build, else ``None`` (the
    caller then builds it afresh).

    It and its build record must be regular files (not links) owned by this user and writable
    by no one else, its size and SHA-256 must match the record, and it must load and define
    ``symbols``. The checks come before ``dlopen``, which runs the library's code; a library
    cut short (a crash before it reached the disk) would crash the process with SIGBUS.
    """
    record_path = _record_path(library)
    try:
        record_info, library_info = record_path.lstat(), library.lstat()
        for info in (record_info, library_info):
            if not stat.S_ISREG(info.st_mode) or _untrusted(info) is not None:
                return None
        record = json.loads(record_path.read_text())
        if library_info.st_size != record["size"]:
            return None
        if hashlib.sha256(library.read_bytes()).hexdigest() != record["sha256"]:
            return None
        loaded = ctypes.CDLL(str(library))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return loaded if all(hasattr(loaded, symbol) for symbol in symbols) else None


def _build_and_open(
    folder: Path,
    source: Path,
    stem: str,
    compiler: list[str],
    flags: tuple[list[str], list[str]],
    symbols: tuple[str, ...],
) -> ctypes.CDLL | None:
    """Library ``stem`` in ``folder``, built unless another process has just built it
    (it is checked again under the lock), or ``None`` if the compiler fails.

    :raises OSError: if the build's files cannot be written.
    """
    target = folder / f"{stem}.so"
    with _locked(folder, stem):
        library = _open_verified(target, symbols)
        if library is None and _build(source, target, compiler, flags):
            library = _open_verified(target, symbols)
    return library


@functools.cache
def load(name: str, symbols: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled ``pyro_bqn/native/<name>.c`` as a :class:`ctypes.CDLL`, or ``None``
    (with a warning, once) when native kernels are disabled or cannot be built.

    An intact build already in the cache is loaded, for the best flag set that has one,
    before anything is compiled (so a flag set the compiler rejects is not retried by every
    process); else the flag sets are built in turn, best first, in the cache or in a private
    temporary folder (see this module's description for which, and for what "intact" means).

    :param symbols: functions the library must define; a cached file without them (left by
        an interrupted or foreign build) is rebuilt.
    """
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn(
            f"pyro_bqn: no C compiler found; using the slower torch implementation of {name}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    source = _SOURCE_DIR / f"{name}.c"
    stems = [_library_stem(name, compiler, flags) for flags in _FLAG_SETS]
    cache = _cache()
    if cache.folder is not None:
        for stem in stems:
            library = _open_verified(cache.folder / f"{stem}.so", symbols)
            if library is not None:
                return library
    folder = cache.build_folder()
    if cache.note is not None:
        _warn_once(
            f"pyro_bqn: {cache.note}; building native kernels in the private temporary "
            f"folder {folder} instead, which is removed when this process exits"
        )
    for flags, stem in zip(_FLAG_SETS, stems, strict=True):
        try:
            library = _build_and_open(folder, source, stem, compiler, flags, symbols)
        except OSError as error:
            warnings.warn(
                f"pyro_bqn: could not write the native kernel {stem}.so to {folder} "
                f"({error}); using the slower torch implementation of {name}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if library is not None:
            return library
    warnings.warn(
        f"pyro_bqn: could not compile {source} with {shlex.join(compiler)}; using the slower "
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


def library_for(
    name: str, tensors: Iterable[torch.Tensor | None], symbols: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """The kernel library ``name`` (see :func:`load`) if it applies to ``tensors`` (``None``
    entries are skipped): contiguous CPU tensors of one dtype in :data:`SUFFIXES`. Else, or
    when the library cannot be built, ``None``: the caller computes with torch.

    :func:`enabled` is asked at every call (``load`` caches its answer), so that setting
    ``PYRO_BQN_NATIVE=0`` in a running process turns the kernels off from then on."""
    if not enabled():
        return None
    dtype = None
    for tensor in tensors:
        if tensor is None:
            continue
        dtype = tensor.dtype if dtype is None else dtype
        if not (tensor.dtype == dtype and tensor.is_cpu and tensor.is_contiguous()):
            return None
    if dtype not in SUFFIXES:
        return None
    return load(name, symbols)


def operator(
    name: str,
    formulas: Callable[..., object],
    kernel_call: Callable[..., object | None],
    library: Callable[..., ctypes.CDLL | None],
    check: Callable[..., None],
    mutates_args: tuple[str, ...] = (),
) -> torch.library.CustomOpDef:
    """Register ``pyro_bqn::<name>``, a :func:`torch.library.custom_op`, and return it.

    Called, it runs ``check(*args)`` (which raises :class:`ValueError` for arguments the
    operator cannot take, before a kernel could read past a buffer), then returns
    ``kernel_call(lib, *args)`` where ``lib = library(*args)`` is not ``None`` and the
    kernel accepts the input (returns anything but ``None``), else ``formulas(*args)``.

    ``formulas`` is the device-generic torch implementation of the same values. Its
    annotated signature is the operator's schema, and it is also the fake (meta)
    implementation that :func:`torch.compile` traces, so it makes no data-dependent choice.
    The caller attaches the gradient with ``register_autograd``, usually through a second
    operator made here for the backward pass.
    """

    def implementation(*args):
        check(*args)
        lib = library(*args)
        if lib is not None:
            result = kernel_call(lib, *args)
            if result is not None:
                return result
        return formulas(*args)

    def fake(*args):
        check(*args)
        return formulas(*args)

    signature = inspect.signature(formulas, eval_str=True)
    implementation.__signature__ = fake.__signature__ = signature
    op = torch.library.custom_op(f"pyro_bqn::{name}", implementation, mutates_args=mutates_args)
    op.register_fake(fake)
    return op
