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
