"""`import pyro_bqn` leaves the heavy diagnostics dependencies for their first use."""

import subprocess
import sys

HEAVY = ("matplotlib", "xarray", "arviz", "pyro_bqn.diagnostics")

_PROBE = """
import sys
import pyro_bqn
print(" ".join(sorted(m for m in {heavy!r} if m in sys.modules)))
pyro_bqn.to_inference_data, pyro_bqn.diagnostics.reliability_diagram
print(" ".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def test_import_loads_no_plotting_or_arviz_until_first_use():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = result.stdout.splitlines()
    assert before == ""
    # First use of a diagnostic loads what it needs.
    assert {"matplotlib", "pyro_bqn.diagnostics"} <= set(after.split())


def test_posterior_summary_stays_the_function_after_its_module_is_imported():
    # Importing a submodule sets the package attribute of its name to the module; this
    # function shares its module's name. A fresh interpreter fixes the import order.
    probe = (
        "import pyro_bqn.diagnostics.posterior_summary\n"
        "from pyro_bqn.diagnostics import posterior_summary\n"
        "print(callable(posterior_summary))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True"
