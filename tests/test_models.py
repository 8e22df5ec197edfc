import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_bqn import levels as qlevels
from pyro_bqn import nn as qnn
from pyro_bqn.architectures import Architecture
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, MomentMessenger, predict
from pyro_bqn.models import QuantizedClassifier, QuantizedMLP
from pyro_bqn.moments import Moments
from pyro_bqn.nn.quantized_linear import QuantizedLinear


def _weights(model):
    """A fixed ternary assignment of every weight site (and zero biases)."""
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            shape = (module.out_features, module.in_features)
            weights[f"{name}.weight"] = torch.randint(-1, 2, shape, generator=gen).float()
            if module.bias is not None:
                weights[f"{name}.bias"] = torch.zeros(module.out_features)
    return weights


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(), (4,), (4, 0, 2), (4, 3, -1)])
def test_sizes_are_validated(sizes):
    with pytest.raises(ValueError, match=r"sizes must list at least two positive widths, got "):
        QuantizedMLP(sizes)


@pytest.mark.parametrize("activation", ["tanh", "Sign", None])
def test_activation_is_validated(activation):
    expected = rf"activation must be one of \['relu', 'sign', 'sign-lr'\], got {activation!r}"
    with pytest.raises(ValueError, match=expected):
        QuantizedMLP((4, 3), activation=activation)


@pytest.mark.parametrize("activation, cls", [("sign", qnn.Sign), ("relu", qnn.ReLU)])
def test_layer_structure(activation, cls):
    model = QuantizedMLP((10, 8, 6, 3), activation=activation)
    assert model.sizes == (10, 8, 6, 3)
    layers = list(model.body)
    assert isinstance(layers[0], qnn.Flatten)
    linears = [layer for layer in layers if isinstance(layer, QuantizedLinear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 8), (8, 6), (6, 3)]
    # Hidden layers: no bias, then batch norm and the activation; the output layer has a bias.
    assert [m.bias is not None for m in linears] == [False, False, True]
    assert [type(layer) for layer in layers[1:]] == [
        QuantizedLinear,
        qnn.BatchNorm1d,
        cls,
        QuantizedLinear,
        qnn.BatchNorm1d,
        cls,
        QuantizedLinear,
    ]
    assert model.temperature.temperature.item() == pytest.approx(6**0.5)
    assert all(torch.equal(m.levels.values, torch.tensor([-1.0, 0.0, 1.0])) for m in linears)


def test_no_hidden_layer():
    model = QuantizedMLP((4, 3))
    linears = [layer for layer in model.body if isinstance(layer, QuantizedLinear)]
    assert len(linears) == 1 and linears[0].bias is not None
    assert model(torch.randn(5, 4)).shape == (5,)


def test_custom_levels_are_used_by_every_layer():
    model = QuantizedMLP((4, 6, 3), levels=qlevels.binary())
    trace = poutine.trace(model).get_trace(torch.randn(8, 4))
    for name in ("body.1.weight", "body.4.weight"):
        assert torch.isin(trace.nodes[name]["value"], torch.tensor([-1.0, 1.0])).all()


# --- forward --------------------------------------------------------------------------------


def test_forward_under_the_prior_draws_labels():
    model = QuantizedMLP((4, 6, 3))
    trace = poutine.trace(model).get_trace(torch.randn(8, 4))
    assert trace.nodes["body.1.weight"]["value"].shape == (6, 4)
    assert trace.nodes["body.4.weight"]["value"].shape == (3, 6)
    assert trace.nodes["body.4.bias"]["value"].shape == (3,)
    obs = trace.nodes["obs"]
    assert isinstance(obs["fn"], MomentCategorical)
    assert obs["value"].shape == (8,) and not obs["is_observed"]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trace = poutine.trace(model).get_trace(torch.randn(8, 4), y)
    assert trace.nodes["obs"]["is_observed"] and torch.equal(trace.nodes["obs"]["value"], y)


def test_forward_with_fixed_weights_is_a_plain_network():
    model = QuantizedMLP((4, 6, 3))
    model.eval()
    weights = _weights(model)
    x = torch.randn(8, 4)
    logits = poutine.condition(model.logits, weights)(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (8, 3)
    # The same network by hand: fc -> batch norm (running statistics 0, 1) -> sign -> fc / T.
    bn = model.body[2]
    hidden = x @ weights["body.1.weight"].T
    hidden = (hidden - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias
    expected = (torch.sign(hidden) @ weights["body.4.weight"].T) / 6**0.5
    assert torch.allclose(logits, expected, atol=1e-5)
    trace = poutine.trace(poutine.condition(model, weights)).get_trace(x)
    assert torch.allclose(trace.nodes["obs"]["fn"].probs, expected.softmax(-1), atol=1e-6)


def test_forward_in_moment_mode_propagates_moments():
    model = QuantizedMLP((4, 6, 3))
    guide = AutoQuantizedGuide(model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    guide(x, y)  # set up with labels: "obs" is observed, not a latent site
    guide_trace = poutine.trace(MomentMessenger()(guide)).get_trace(x)
    logits = poutine.replay(model.logits, trace=guide_trace)(x)
    assert isinstance(logits, Moments)
    assert logits.mean.shape == (8, 3) and logits.var.shape == (8, 3)
    assert (logits.var > 0).all()
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    fn = trace.nodes["obs"]["fn"]
    assert isinstance(fn, MomentCategorical)
    assert torch.allclose(fn.logit_mean, logits.mean) and torch.allclose(fn.logit_var, logits.var)


# --- num_data -------------------------------------------------------------------------------


def test_num_data_scales_the_likelihood():
    model = QuantizedMLP((4, 6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    trace = poutine.trace(model).get_trace(x, y, num_data=250)
    obs = trace.nodes["obs"]
    assert obs["scale"] == pytest.approx(25.0)  # N / B
    assert obs["fn"].batch_shape == (10,)
    assert trace.nodes["data"]["value"].shape == (10,)
    for num_data in (None, 10):
        trace = poutine.trace(model).get_trace(x, y, num_data=num_data)
        assert trace.nodes["obs"]["scale"] == 1.0
    # Weights are global: their sites are not scaled.
    assert trace.nodes["body.1.weight"]["scale"] == 1.0


def test_num_data_smaller_than_the_batch_is_refused():
    model = QuantizedMLP((4, 3))
    with pytest.raises(ValueError, match=r"num_data=3 is smaller than the batch \(5\)"):
        model(torch.randn(5, 4), num_data=3)


# --- image-shaped input ---------------------------------------------------------------------


def test_image_shaped_input_is_flattened():
    model = QuantizedMLP((64, 8, 10))
    model.eval()
    weights = _weights(model)
    images = torch.randn(5, 1, 8, 8)
    conditioned = poutine.condition(model.logits, weights)
    from_images = conditioned(images)
    assert from_images.shape == (5, 10)
    assert torch.equal(from_images, conditioned(images.reshape(5, 64)))
    assert model(images).shape == (5,)

    guide = AutoQuantizedGuide(model)
    guide(images, torch.arange(5))
    probs = predict(model, guide, images)
    assert probs.shape == (5, 10)
    assert torch.allclose(probs, predict(model, guide, images.reshape(5, 64)))


def test_wrong_input_width_is_refused():
    model = QuantizedMLP((64, 8, 10))
    with pytest.raises(ValueError, match=r"in_features=64, got shape \(5, 49\)"):
        model(torch.randn(5, 1, 7, 7))


def test_a_quantized_cnn_takes_flat_or_image_inputs_and_names_its_weights_by_position():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = QuantizedClassifier(Architecture("cnn", (1, 8, 8), 3, (2, 3, 5)))
    guide = AutoQuantizedGuide(model)
    x, y = torch.randn(6, 64), torch.randint(0, 3, (6,))
    loss = DeterministicELBO().loss(model, guide, x, y)
    assert math.isfinite(loss)
    assert DeterministicELBO().loss(model, guide, x.reshape(6, 1, 8, 8), y) == loss
    # conv1, bn, sign, pool, conv2, bn, sign, pool, flatten, fc1, bn, sign, out
    shapes = {name: tuple(site["value"].shape) for name, site in _weight_sites(model, x)}
    assert shapes == {
        "body.1.weight": (2, 1, 5, 5),
        "body.5.weight": (3, 2, 5, 5),
        "body.10.weight": (5, 12),
        "body.13.weight": (3, 5),
        "body.13.bias": (3,),
    }


def _weight_sites(model, x):
    trace = poutine.trace(model).get_trace(x)
    return [(n, s) for n, s in trace.nodes.items() if s["type"] == "sample" and "body" in n]


def test_each_layer_learns_its_own_copy_of_learnable_levels():
    pyro.clear_param_store()
    model = QuantizedMLP((3, 4, 2), levels=qlevels.learnable([-1.0, -0.2, 0.4, 1.2]))
    guide = AutoQuantizedGuide(model)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    guide(x, y)
    DeterministicELBO().loss(model, guide, x, y)
    names = [name for name in pyro.get_param_store() if "levels" in name]
    assert any(name.startswith("body.1.levels") for name in names)
    assert any(name.startswith("body.4.levels") for name in names)
    first, second = model.body[1].levels, model.body[4].levels
    assert first is not second and torch.equal(first.values, second.values)
