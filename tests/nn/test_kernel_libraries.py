"""The nn modules' C kernels ask for the functions they call: a cached library that is
intact but lacks them (another kernel's, a build of an older version) is rebuilt, not used."""

import functools
import os

import pytest
import torch

import pyro_bqn.nn.batch_norm as bn_module
import pyro_bqn.nn.quantized_activation as activation_module
from pyro_bqn import native


def _activation_uses_its_kernel():
    mean = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64)
    var = torch.linspace(0.1, 1.0, 8, dtype=torch.float64)
    levels = (torch.tensor([-0.7, 1.9], dtype=torch.float64),
              torch.tensor([0.3], dtype=torch.float64))
    out_mean, out_var, by_kernel = torch.ops.pyro_bqn.two_valued_moments(mean, var, *levels)
    assert by_kernel.item()
    expected = activation_module._two_valued_torch(mean, var, *levels)
    torch.testing.assert_close((out_mean, out_var), expected, atol=1e-12, rtol=1e-9)


def _batch_norm_uses_its_kernel():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    var = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    got = torch.ops.pyro_bqn.batch_norm_moments(mean, var, None, None, 1e-5, True)
    expected = bn_module._formulas_forward(mean, var, None, None, 1e-5, True)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


# kernel: (its module, a kernel whose library lacks its functions, a check that it computes)
CASES = {
    "two_valued_activation": (activation_module, "batch_norm_moments", _activation_uses_its_kernel),
    "batch_norm_moments": (bn_module, "two_valued_activation", _batch_norm_uses_its_kernel),
}


@pytest.mark.parametrize("kernel", sorted(CASES))
def test_a_cached_library_without_the_kernels_is_rebuilt(tmp_path, monkeypatch, kernel):
    if not native.enabled():
        pytest.skip("native kernels turned off")
    module, other, uses_its_kernel = CASES[kernel]
    monkeypatch.setenv("PYRO_BQN_CACHE", str(tmp_path / "other"))
    assert native.load.__wrapped__(other) is not None
    (foreign,) = (tmp_path / "other").glob(f"{other}-*.so")
    data = foreign.read_bytes()
    # Plant the other library, with a matching build record, where the best flag set's build
    # of this kernel would be cached. (Not where the build lands after a reject: this
    # process would get the planted library back from dlopen under its old name.)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("PYRO_BQN_CACHE", str(cache))
    stem = native._library_stem(kernel, native._compiler(), native._FLAG_SETS[0])
    planted = cache / f"{stem}.so"
    record = native._record_path(planted)
    for path, content in ((planted, data), (record, native._record(data).encode())):
        path.write_bytes(content)
        os.chmod(path, 0o600)
    # A fresh cache of loaded libraries, so that this kernel is looked up in the new cache.
    monkeypatch.setattr(native, "load", functools.cache(native.load.__wrapped__))
    uses_its_kernel()
    library = native.load(kernel, module._KERNEL_NAMES)
    assert all(hasattr(library, name) for name in module._KERNEL_NAMES)
