"""Settings for the doctests of pyro_bqn's docstrings (``pytest --doctest-modules``).

The suite's own fixtures live in tests/conftest.py; this one gives every doctest what a
reader pasting the example would have: an empty Pyro param store and seeded generators.
"""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _fresh_pyro_state_for_doctests(request: pytest.FixtureRequest):
    if isinstance(request.node, pytest.DoctestItem):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
    yield
