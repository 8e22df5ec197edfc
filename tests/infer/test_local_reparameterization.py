"""Roth et al. (2019) networks in the library: a QuantizedClassifier whose sign activations
are RelaxedSign and whose logits are sampled by LocalReparameterization, trained with
DeterministicELBO (whose likelihood term then scores sampled logits) and fit."""

import math

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule

from pyro_bqn.architectures import Architecture
from pyro_bqn.export import export_network
from pyro_bqn.infer import (
    AutoQuantizedGuide,
    DeterministicELBO,
    fit,
    predict,
    predict_by_sampling,
)
from pyro_bqn.models import QuantizedClassifier
from pyro_bqn.nn import Sign
from pyro_bqn.nn.local_reparameterization import LocalReparameterization, RelaxedSign
from tests.infer.models import linear_classes

SIZES = (5, 16, 3)


def _classifier(sizes=SIZES, roth=True, temperature=1.0, arch=None):
    """A QuantizedClassifier (an MLP of ``sizes`` unless ``arch`` is given); with ``roth``,
    its Sign layers become RelaxedSign and its body ends in LocalReparameterization
    (parameter names are unchanged)."""
    arch = arch or Architecture("mlp", (sizes[0],), sizes[-1], tuple(sizes[1:-1]))
    model = QuantizedClassifier(arch)
    if roth:
        children = [RelaxedSign(temperature) if type(m) is Sign else m for m in model.body]
        model.body = PyroModule[torch.nn.Sequential](*children, LocalReparameterization())
    return model


def _data():
    x, y = linear_classes(600, SIZES[0], SIZES[-1], seed=1)
    return x[:400], y[:400], x[400:], y[400:]


def _accuracy(probs, y):
    return (probs.argmax(-1) == y).double().mean().item()


def test_only_the_likelihood_is_sampled_and_gradients_reach_every_guide_logit():
    x, y, _, _ = _data()
    model = _classifier()
    guide = AutoQuantizedGuide(model)
    elbo = DeterministicELBO(kl_weight=1e-2)
    terms = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        for param in pyro.get_param_store().values():
            param.grad = None
        loss = elbo.loss_and_grads(model, guide, x, y)
        assert math.isfinite(loss)
        terms.append(dict(elbo.last_terms))
        logits = [name for name in pyro.get_param_store() if ".logits." in name]
        assert len(logits) == 2  # both quantized layers
        for name in logits:
            grad = pyro.get_param_store().get_param(name).unconstrained().grad
            # The first layer's gradient passes through the relaxed sign.
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # The KL is analytic; the expected log-likelihood is a draw.
    assert terms[0]["kl"] == terms[1]["kl"]
    assert terms[0]["expected_log_likelihood"] != terms[1]["expected_log_likelihood"]


def test_a_roth_cnn_samples_through_convolutions_and_pooling():
    arch = Architecture("cnn", (1, 8, 8), 3, (2, 3, 4))
    model = _classifier(arch=arch)
    x, y = torch.randn(6, 64), torch.randint(0, 3, (6,))
    guide = AutoQuantizedGuide(model)
    loss = DeterministicELBO(kl_weight=1e-2).loss_and_grads(model, guide, x, y)
    assert math.isfinite(loss)
    logits = [name for name in pyro.get_param_store() if ".logits." in name]
    assert len(logits) == 4  # two convolutions, the dense layer and the output layer
    for name in logits:
        grad = pyro.get_param_store().get_param(name).unconstrained().grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    probs = predict(model, guide, x)
    assert probs.shape == (6, 3) and torch.allclose(probs.sum(-1), torch.ones(6))


def test_sampled_logits_estimate_an_expected_log_likelihood_above_the_jensen_bound():
    # One quantized layer, so the logits are the only thing sampled: the average of the
    # one-draw estimates is E_z[log softmax(z)_y], which the Jensen bound of the moment
    # likelihood, mu_y - log sum exp(mu + s^2 / 2), lies below.
    x, y, _, _ = _data()
    sizes = (SIZES[0], SIZES[-1])
    plain, sampled = _classifier(sizes, roth=False), _classifier(sizes)
    guide = AutoQuantizedGuide(plain, init_scale=1.0)
    elbo = DeterministicELBO()
    jensen = elbo.terms(plain, guide, x, y)["expected_log_likelihood"].item()
    draws = []
    for seed in range(200):
        pyro.set_rng_seed(seed)
        draws.append(elbo.terms(sampled, guide, x, y)["expected_log_likelihood"].item())
    draws = torch.tensor(draws, dtype=torch.float64)
    estimate, error = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert estimate - 5 * error > jensen, (estimate, error, jensen)


def test_a_roth_network_trains_with_fit_and_predicts_three_ways():
    x, y, x_test, y_test = _data()
    pyro.set_rng_seed(0)
    model = _classifier()
    guide = AutoQuantizedGuide(model)
    history = fit(
        model, guide, x, y, epochs=15, batch_size=50, lr=0.05, kl_weight=1e-2, progress=False
    )
    assert all(math.isfinite(record["loss"]) for record in history)
    assert history[-1]["loss"] < history[0]["loss"]
    # The paper's network: the most probable weights, with batch-norm statistics of its own.
    network = export_network(model, guide, x[:2], batch_norm_data=x)
    accuracy = {
        "most probable": _accuracy(network.run(model, x_test), y_test),
        "moments": _accuracy(predict(model, guide, x_test), y_test),
        "sampled": _accuracy(predict_by_sampling(model, guide, x_test, num_samples=10), y_test),
    }
    # Measured over pyro seeds 0-3: 0.85-0.90 (most probable), 0.93-0.96 (moments),
    # 0.88-0.94 (sampled); chance is 1/3.
    assert min(accuracy.values()) > 0.7, accuracy


def _run_fixed(model, network, x):
    """Class probabilities of ``network`` run in ``model`` (evaluation mode), with the
    network's batch-norm statistics copied into the model's buffers."""
    model.eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(network.buffers[name])
        trace = poutine.trace(poutine.condition(model, data=network.weights())).get_trace(x)
    return trace.nodes["obs"]["fn"].probs


def test_the_most_probable_network_is_the_plain_sign_network():
    x, y, x_test, _ = _data()
    roth = _classifier()
    guide = AutoQuantizedGuide(roth)
    fit(roth, guide, x, y, epochs=2, batch_size=50, lr=0.05, progress=False)
    network = export_network(roth, guide, x[:2], batch_norm_data=x)
    expected = network.run(roth, x_test)
    # A plain Sign classifier with the same state runs the same fixed network.
    plain = _classifier(roth=False)
    plain.load_state_dict(roth.state_dict())
    assert torch.equal(_run_fixed(plain, network, x_test), expected)
    assert torch.equal(_run_fixed(roth, network, x_test), expected)
    # A fixed network never samples, in training mode either.
    roth.train()
    runs = []
    for seed in (0, 1):
        pyro.set_rng_seed(seed)
        trace = poutine.trace(poutine.condition(roth, data=network.weights())).get_trace(x_test)
        runs.append(trace.nodes["obs"]["fn"].probs)
    assert torch.equal(runs[0], runs[1])


def test_in_evaluation_the_predictive_is_that_of_the_probabilistic_forward_pass():
    x, _, x_test, _ = _data()
    roth = _classifier()
    guide = AutoQuantizedGuide(roth)
    guide(x)
    # predict() runs in evaluation mode: nothing is sampled, and the moments are those of the
    # plain Sign network with the same parameters (DeterministicELBO's forward pass).
    plain = _classifier(roth=False)
    assert torch.equal(predict(roth, guide, x_test), predict(plain, guide, x_test))
