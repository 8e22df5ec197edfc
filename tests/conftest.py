"""Suite-wide test settings."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tensors in tests are tiny: torch's thread pool costs more in synchronisation on a
    # shared 2-core machine than the work it splits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean_param_store():
    """Every test starts from an empty Pyro param store and seeded generators."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
