"""QuantizedActivation's thresholds: ordering checked pairwise, shown by repr."""

import pytest

from pyro_bqn.nn import QuantizedActivation


def test_thresholds_out_of_order_anywhere_are_refused():
    # [0, 2, 1] is above its first entry everywhere: only the pairwise check sees 2 > 1.
    with pytest.raises(ValueError, match="strictly increasing"):
        QuantizedActivation(values=[-1.0, 0.0, 1.0, 2.0], thresholds=[0.0, 2.0, 1.0])


def test_repr_shows_given_thresholds_rounded_and_nothing_for_the_midpoints():
    given = QuantizedActivation(values=[-1.0, 0.0, 1.0], thresholds=[-0.123456, 0.5])
    assert "thresholds=[-0.1235, 0.5]" in repr(given)
    assert "thresholds" not in repr(QuantizedActivation(values=[-1.0, 0.0, 1.0]))
    assert QuantizedActivation(values=[-1.0, 1.0]).extra_repr() == ""
