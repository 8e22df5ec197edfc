import ctypes
import os

import pytest
import torch

from pyro_bqn import native


def test_kernel_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    library = native.load.__wrapped__("level_statistics")
    assert isinstance(library, ctypes.CDLL)
    built = sorted(tmp_path.glob("level_statistics-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert native.load.__wrapped__("level_statistics") is not None
    assert built[0].stat().st_mtime_ns == mtime


def test_failing_compiler_warns_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    with pytest.warns(RuntimeWarning, match="could not compile"):
        assert native.load.__wrapped__("level_statistics") is None
    assert not list(tmp_path.glob("*.so"))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PYRO_BQN_NATIVE", "0")
    assert not native.enabled()
    assert native.load.__wrapped__("level_statistics") is None


def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRO_BQN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native._cache_dir() == tmp_path / "pyro_bqn"
    monkeypatch.setattr(native.os, "access", lambda path, mode: False)
    fallback = native._cache_dir()
    assert fallback.name.startswith("pyro_bqn-") and tmp_path not in fallback.parents


def test_loading_a_kernel_keeps_subnormal_numbers(tmp_path, monkeypatch):
    # A library linked with -ffast-math would switch the whole process to flush-to-zero.
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path))
    if os.environ.get("PYRO_BQN_NATIVE") == "0":
        pytest.skip("native kernels turned off with PYRO_BQN_NATIVE=0")
    assert native.load.__wrapped__("level_statistics") is not None
    tiny = torch.tensor(1e-38, dtype=torch.float32) / 100
    assert tiny > 0
