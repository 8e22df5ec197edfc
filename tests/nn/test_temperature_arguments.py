"""Temperature starts at 1 by default and takes an integer initial value as a float."""

import pyro
import torch

from pyro_bqn.moments import Moments
from pyro_bqn.nn import Temperature


def test_the_default_temperature_is_one_and_an_integer_init_is_a_float():
    logits = torch.tensor([[2.0, -4.0]])
    torch.testing.assert_close(Temperature()(logits), logits)
    pyro.clear_param_store()  # both modules would read one stored "temperature"
    halved = Temperature(2)(Moments(logits, torch.ones(1, 2)))
    torch.testing.assert_close(halved.mean, logits / 2)
    torch.testing.assert_close(halved.var, torch.full((1, 2), 0.25))
