"""The kernel cache loads only what this user built, intact: no library another user could
have planted, no truncated file, and a clear account of where it builds instead."""

import ctypes
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from pyro_bqn import native

pytestmark = pytest.mark.skipif(
    os.environ.get("PYRO_BQN_NATIVE") == "0", reason="native kernels turned off"
)

# The quickest kernel to compile (a fraction of a second; level_statistics takes seconds).
KERNEL = "two_valued_activation"
SYMBOLS = native.kernel_names("two_valued")

# A library whose constructor, run by dlopen before any symbol is looked up, leaves a file
# at $PYRO_BQN_TEST_MARKER: the proof that planted code ran in this process.
PLANTED_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>

__attribute__((constructor)) static void planted(void) {
  const char *marker = getenv("PYRO_BQN_TEST_MARKER");
  FILE *file = marker ? fopen(marker, "w") : NULL;
  if (file) fclose(file);
}
"""

# Run in a separate process (a SIGBUS there cannot kill pytest): the kernel through its
# layer function, against the torch formulas.
CALL_THE_KERNEL = """
import torch
from pyro_bqn.nn import quantized_activation as qa

mean = torch.linspace(-2.0, 2.0, 11)
var = torch.full_like(mean, 0.5)
values, thresholds = torch.tensor([-1.0, 1.0]), torch.tensor([0.0])
assert qa._native_library(mean, var, values, thresholds) is not None
got = qa.quantized_activation_moments(mean, var, values, thresholds)
for g, e in zip(got, qa._two_valued_torch(mean, var, values, thresholds), strict=True):
    torch.testing.assert_close(g, e)
"""

# Makes the cache folder read-only for this process (tests run as root, which chmod does
# not stop), then loads the kernel and prints the folder its library lies in.
LOAD_WITH_A_READ_ONLY_CACHE = """
import os
from pathlib import Path

from pyro_bqn import native

cache, access = Path(os.environ["PYRO_BQN_CACHE"]), os.access
os.access = lambda path, mode, **kw: Path(path) != cache and access(path, mode, **kw)
library = native.load("two_valued_activation")
assert library is not None
print(Path(library._name).parent)
"""


def _run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A valid shared library with a constructor that writes the marker file."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted.c").write_text(PLANTED_SOURCE)
    library = folder / "planted.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", str(folder / "planted.c"), "-o", str(library)],
        check=True,
        timeout=120,
    )
    return library


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A genuine build of the kernel: its file name is the one load() looks for."""
    folder = tmp_path_factory.mktemp("genuine")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRO_BQN_CACHE", str(folder))
        assert native.load.__wrapped__(KERNEL, SYMBOLS) is not None
    (library,) = folder.glob(f"{KERNEL}-*.so")
    return library


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "planted-code-ran"
    monkeypatch.setenv("PYRO_BQN_TEST_MARKER", str(path))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty private cache folder named by PYRO_BQN_CACHE."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("PYRO_BQN_CACHE", str(folder))
    return folder


def _plant(cache: Path, planted: Path, genuine: Path, record: bool) -> Path:
    """Put the planted library at the name load() looks for in ``cache``, with a build
    record that matches it if ``record`` (anyone able to write the folder can write one)."""
    target = cache / genuine.name
    shutil.copy(planted, target)
    if record:
        native._record_path(target).write_text(native._record(target.read_bytes()))
    return target


def _folder_of(library) -> Path:
    return Path(library._name).parent


def _load_and_record_warnings() -> tuple[ctypes.CDLL | None, list[str]]:
    """``load`` of the kernel, and the messages of all the warnings it gave."""
    native._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library = native.load.__wrapped__(KERNEL, SYMBOLS)
    return library, [str(warning.message) for warning in caught]


def test_the_planted_library_runs_its_code_when_loaded(planted, marker):
    # The control for the tests below: their "marker absent" means "not loaded".
    ctypes.CDLL(str(planted))
    assert marker.exists()


@pytest.mark.parametrize("record", ["missing", "of another file"])
def test_a_planted_library_without_its_own_build_record_is_rebuilt_not_loaded(
    cache, planted, genuine, marker, record
):
    target = _plant(cache, planted, genuine, record=False)
    if record == "of another file":
        shutil.copy(native._record_path(genuine), native._record_path(target))
    library = native.load.__wrapped__(KERNEL, SYMBOLS)
    assert library is not None and hasattr(library, SYMBOLS[0])
    assert not marker.exists()
    assert target.read_bytes() == genuine.read_bytes()  # the plant was replaced


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_cache_folder_others_may_write_is_refused(cache, planted, genuine, marker, mode):
    _plant(cache, planted, genuine, record=True)
    cache.chmod(mode)
    with pytest.warns(
        RuntimeWarning, match=re.escape(f"{cache} is writable by other users")
    ) as caught:
        library = native.load.__wrapped__(KERNEL, SYMBOLS)
    assert not marker.exists()
    assert library is not None and _folder_of(library) == native._private_temp_dir()
    assert "removed when this process exits" in str(caught[0].message)


def test_a_cache_folder_owned_by_another_user_is_refused(
    cache, planted, genuine, marker, monkeypatch
):
    _plant(cache, planted, genuine, record=True)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    # As that user this process owns nothing, not even its own new builds: build none.
    monkeypatch.setenv("CC", "false")
    library, messages = _load_and_record_warnings()
    assert library is None and not marker.exists()
    assert [m for m in messages if f"{cache} is owned by user id {os.getuid()}" in m]


def test_a_library_file_others_may_write_is_rebuilt_not_loaded(cache, planted, genuine, marker):
    target = _plant(cache, planted, genuine, record=True)
    target.chmod(0o666)
    library = native.load.__wrapped__(KERNEL, SYMBOLS)
    assert library is not None and _folder_of(library) == cache
    assert not marker.exists()
    assert target.read_bytes() == genuine.read_bytes()
    assert not target.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def test_a_new_cache_folder_is_private(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "cache"
    monkeypatch.setenv("PYRO_BQN_CACHE", str(folder))
    assert native._cache().build_folder() == folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("length", ["4096 bytes", "half"])
def test_a_truncated_library_is_rebuilt_by_the_next_run(tmp_path, cache, length):
    assert native.load.__wrapped__(KERNEL, SYMBOLS) is not None
    (built,) = cache.glob(f"{KERNEL}-*.so")
    data = built.read_bytes()
    size = 4096 if length == "4096 bytes" else len(data) // 2
    # What a crash before the data reached the disk leaves. A new file, not a truncation in
    # place: this process has the library mapped, and shrinking a mapped file kills it.
    partial = tmp_path / "partial"
    partial.write_bytes(data[:size])
    os.replace(partial, built)
    result = _run_python(CALL_THE_KERNEL)
    assert result.returncode == 0, result.stderr
    assert built.read_bytes() == data


def test_a_build_is_on_disk_before_it_is_renamed_into_place(cache, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file an fsync is for")
    synced, renames = set(), []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    def recording_replace(source, destination, **kwargs) -> None:
        renames.append((os.fspath(source), Path(destination), set(synced)))
        replace(source, destination, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    assert native.load.__wrapped__(KERNEL, SYMBOLS) is not None
    (built,) = cache.glob(f"{KERNEL}-*.so")
    (source, synced_before) = next((s, f) for s, d, f in renames if d == built)
    assert source in synced_before


def test_a_read_only_cache_says_so_and_builds_in_a_private_folder(cache, monkeypatch):
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != cache and access(path, mode, **kw)
    )
    library, messages = _load_and_record_warnings()
    private = native._private_temp_dir()
    assert library is not None and _folder_of(library) == private
    assert [m for m in messages if f"{cache} is not writable" in m and str(private) in m]
    assert not [m for m in messages if "could not compile" in m]


def test_a_read_only_cache_still_serves_the_libraries_built_in_it(cache, monkeypatch):
    assert native.load.__wrapped__(KERNEL, SYMBOLS) is not None
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != cache and access(path, mode, **kw)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to build, so nothing to warn about
        library = native.load.__wrapped__(KERNEL, SYMBOLS)
    assert library is not None and _folder_of(library) == cache


def test_the_private_temporary_folder_is_removed_at_exit(tmp_path, cache):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = _run_python(LOAD_WITH_A_READ_ONLY_CACHE, TMPDIR=str(temporary))
    assert result.returncode == 0, result.stderr
    private = Path(result.stdout.strip())
    assert private.parent == temporary and "not writable" in result.stderr
    assert not private.exists()
    assert not list(temporary.glob("pyro_bqn-*"))


def test_a_build_waits_for_the_lock_on_its_library(cache):
    # Two processes building one library at once could leave one's file beside the other's
    # record; a build holds a lock on the library's name, and so waits for the other.
    key = native._library_stem(KERNEL, native._compiler(), native._FLAG_SETS[0])
    loaded = []
    with native._locked(cache, key):
        thread = threading.Thread(target=lambda: loaded.append(native.load.__wrapped__(KERNEL)))
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive() and not list(cache.glob("*.so"))
    thread.join()
    assert loaded[0] is not None and list(cache.glob("*.so"))


def test_a_failed_write_says_so(cache, monkeypatch):
    def full_disk(path, data, mode=0o644):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(native, "write_bytes", full_disk)
    library, messages = _load_and_record_warnings()
    assert library is None
    assert [m for m in messages if "could not write" in m and "No space left" in m]
    assert not [m for m in messages if "could not compile" in m]


def test_a_cached_build_is_loaded_without_retrying_a_rejected_flag_set(cache, monkeypatch):
    # Where the best flags fail (say, no libmvec), the next set's build is in the cache; a
    # later process loads it without first compiling with the failing flags again.
    monkeypatch.setattr(native, "_FLAG_SETS", ((["-no-such-flag"], []), native._FLAG_SETS[1]))
    assert native.load.__wrapped__(KERNEL, SYMBOLS) is not None
    commands = []
    monkeypatch.setattr(native, "_run", lambda command: commands.append(command) or False)
    assert native.load.__wrapped__(KERNEL, SYMBOLS) is not None
    assert commands == []
