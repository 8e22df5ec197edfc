"""Suite-wide test settings."""

import os

import pyro
import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis derandomized everywhere, with the settings of its own "ci" profile (which it
# loads on CI): a local run draws the same examples as CI, so a failure reproduces.
# HYPOTHESIS_PROFILE=explore draws new examples on every run, to search for rare failures.
settings.register_profile(
    "repository",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", settings.get_profile("repository"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repository"))


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
