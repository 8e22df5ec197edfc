import pyro
import pytest
import torch

from pyro_bqn import levels
from pyro_bqn.infer import AutoQuantizedGuide, most_probable_sparsity, zero_share
from pyro_bqn.models import QuantizedMLP


def _guide(level_set):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = QuantizedMLP((3, 4, 2), levels=level_set)
    guide = AutoQuantizedGuide(model)
    guide(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    return guide


def test_sparsity_counts_weights_whose_most_probable_level_is_zero():
    guide = _guide(levels.ternary())  # weights body.1 (4, 3) and body.4 (2, 4): 20 in all
    zero_first = torch.tensor([0.0, 5.0, 0.0])  # logits over (-1, 0, 1): mode 0
    minus_first = torch.tensor([5.0, 0.0, 0.0])  # mode -1
    hidden = torch.stack([zero_first] * 12).reshape(4, 3, 3)
    hidden[0, 0] = minus_first
    out = torch.stack([minus_first] * 8).reshape(2, 4, 3)
    out[1, 3] = zero_first
    getattr(guide.logits.body, "1").weight = hidden.movedim(-1, 0)
    getattr(guide.logits.body, "4").weight = out.movedim(-1, 0)
    assert most_probable_sparsity(guide) == pytest.approx(12 / 20)


def test_sparsity_of_levels_without_zero_is_none_and_an_unrun_guide_is_refused():
    assert most_probable_sparsity(_guide(levels.binary())) is None
    with pytest.raises(ValueError, match="run it once"):
        most_probable_sparsity(AutoQuantizedGuide(QuantizedMLP((3, 2))))


def test_zero_share_of_tensors():
    assert zero_share([torch.tensor([0.0, 2.0]), torch.zeros(3)]) == pytest.approx(4 / 5)
    assert zero_share([]) is None


def test_sparsity_of_a_spike_and_slab_posterior_counts_its_mode():
    from pyro_bqn import priors

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    prior = priors.parse_prior("spike-and-slab:slab_prob=0.05")
    model = QuantizedMLP((3, 4, 2), levels=levels.ternary(), prior=prior)
    guide = AutoQuantizedGuide(model, posterior="spike-and-slab")
    guide(torch.randn(5, 3), torch.randint(0, 2, (5,)))
    modes = guide.median()
    weights = [modes[name] for name in guide.quantized_sites]
    assert most_probable_sparsity(guide) == pytest.approx(zero_share(weights))
