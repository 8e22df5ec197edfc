import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_bqn.moments import Moments
from pyro_bqn.nn import Temperature


def test_temperature_scales_logits_and_their_moments():
    pyro.clear_param_store()  # PyroParams are read from the global param store
    temperature = Temperature(torch.tensor([2.0, 4.0]))
    mean, var = torch.randn(3, 2), torch.rand(3, 2)
    assert torch.allclose(temperature(mean), mean / torch.tensor([2.0, 4.0]))
    out = temperature(Moments(mean, var))
    assert torch.allclose(out.mean, mean / torch.tensor([2.0, 4.0]))
    assert torch.allclose(out.var, var / torch.tensor([4.0, 16.0]))


def test_temperature_is_learned_by_svi_and_stays_positive():
    pyro.clear_param_store()
    temperature = Temperature(1.0)
    logits = torch.full((16,), 3.0)

    def model():
        # Observations far above z / T pull T towards zero.
        pyro.sample("obs", dist.Normal(temperature(logits), 0.1).to_event(1), obs=logits * 100)

    svi = SVI(model, lambda: None, pyro.optim.Adam({"lr": 0.5}), Trace_ELBO())
    for _ in range(20):
        svi.step()
    learned = pyro.get_param_store()["temperature"]
    assert 0 < learned.item() < 0.1
    assert torch.equal(temperature.temperature.detach(), learned.detach())


@pytest.mark.parametrize("init", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_rejects_non_positive_init(init):
    with pytest.raises(ValueError, match="positive and finite"):
        Temperature(init)


@pytest.mark.parametrize(
    "init", [2, torch.tensor(2.0, dtype=torch.float64), torch.tensor([2, 4])],
    ids=["int", "float64-tensor", "int-tensor"],
)
def test_temperature_is_kept_in_the_default_dtype(init):
    # Like a torch module's parameters; the logits then keep their dtype.
    pyro.clear_param_store()
    temperature = Temperature(init)
    assert temperature.temperature.dtype == torch.get_default_dtype()
    logits = torch.randn(3, 2)
    assert temperature(logits).dtype == logits.dtype
