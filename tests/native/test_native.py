import ctypes
import os
import shutil
import stat
import time

import pytest
import torch

from pyro_bqn import native

# The quickest kernel to compile (level_statistics takes seconds), for tests of the cache that
# do not depend on which kernel it holds.
KERNEL = "two_valued_activation"


def test_kernel_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    library = native.load.__wrapped__(KERNEL)
    assert isinstance(library, ctypes.CDLL)
    built = sorted(tmp_path.glob(f"{KERNEL}-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert native.load.__wrapped__(KERNEL) is not None
    assert built[0].stat().st_mtime_ns == mtime


def test_failing_compiler_warns_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    monkeypatch.delenv("PYRO_BQN_NATIVE", raising=False)  # a compiler is tried only if enabled
    monkeypatch.setenv("CC", "false")
    with pytest.warns(RuntimeWarning, match="could not compile"):
        assert native.load.__wrapped__(KERNEL) is None
    assert not list(tmp_path.glob("*.so"))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PYRO_BQN_NATIVE", "0")
    assert not native.enabled()
    assert native.load.__wrapped__("level_statistics") is None


def _assert_private_folder(folder):
    assert folder.name.startswith("pyro_bqn-")
    info = folder.stat()
    # Only this user may write there, so nobody can plant a library to be loaded.
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700


def test_unwritable_cache_falls_back_to_a_private_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRO_BQN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native._cache().build_folder() == tmp_path / "pyro_bqn"
    assert stat.S_IMODE((tmp_path / "pyro_bqn").stat().st_mode) == 0o700  # made private
    monkeypatch.setattr(native.os, "access", lambda path, mode: False)
    fallback = native._cache().build_folder()
    assert tmp_path not in fallback.parents
    _assert_private_folder(fallback)


def test_no_home_directory_falls_back_to_a_private_temporary_folder(monkeypatch):
    monkeypatch.delenv("PYRO_BQN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native.Path, "home", staticmethod(no_home))
    _assert_private_folder(native._cache().build_folder())


def test_a_damaged_cached_library_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    symbols = ("two_valued_forward_f",)
    assert native.load.__wrapped__(KERNEL, symbols) is not None
    (built,) = tmp_path.glob(f"{KERNEL}-*.so")
    # Replace the file (a new inode) rather than overwrite it: this process has the first
    # build mapped, and rewriting mapped code in place would crash it.
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"not a shared library")
    os.replace(damaged, built)
    library = native.load.__wrapped__(KERNEL, symbols)
    assert library is not None and hasattr(library, symbols[0])


def test_compiler_command_may_carry_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"env {compiler}")
    assert native.load.__wrapped__(KERNEL) is not None


def test_loading_a_kernel_keeps_subnormal_numbers(tmp_path, monkeypatch):
    # A library linked with -ffast-math would switch the whole process to flush-to-zero.
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    assert native.load.__wrapped__(KERNEL) is not None
    tiny = torch.tensor(1e-38, dtype=torch.float32) / 100
    assert tiny > 0


def test_a_changed_shared_header_rebuilds_the_kernel(tmp_path, monkeypatch):
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    sources, cache = tmp_path / "sources", tmp_path / "cache"
    sources.mkdir()
    for path in native._SOURCE_DIR.glob("*.[ch]"):
        shutil.copy(path, sources)
    monkeypatch.setattr(native, "_SOURCE_DIR", sources)
    monkeypatch.setenv("PYRO_BQN_CACHE", str(cache))
    assert native.load.__wrapped__(KERNEL) is not None
    header = sources / "finite.h"
    header.write_text(header.read_text() + "\n/* changed */\n")
    assert native.load.__wrapped__(KERNEL) is not None
    assert len(list(cache.glob(f"{KERNEL}-*.so"))) == 2


def test_every_kernel_builds():
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    for source in native._SOURCE_DIR.glob("*.c"):
        assert native.load.__wrapped__(source.stem) is not None, source.name


def test_run_in_ranges_waits_for_every_range(monkeypatch):
    # The first range refuses its input at once; the caller must still not get its answer
    # before the other range is done, or it could free buffers that range is writing.
    monkeypatch.setattr(native, "MIN_RANGE", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    finished = []

    def kernel_call(begin: int, end: int) -> int:
        if begin == 0:
            return 1
        time.sleep(0.2)
        finished.append(end)
        return 0

    assert native.run_in_ranges(kernel_call, 8) is True
    assert finished == [8]
