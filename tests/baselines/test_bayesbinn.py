import math

import pytest
import torch
from torch import nn

from pyro_bqn.architectures import Architecture
from pyro_bqn.baselines import (
    BayesBiNN,
    bayesbinn_mlp,
    bayesbinn_predict_proba,
    continue_bayesbinn,
    predict_proba,
    split_binary_parameters,
    train_bayesbinn,
)
from pyro_bqn.baselines.bayesbinn import bayesbinn_network
from tests.baselines.conftest import accuracy

CNN = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))

LAMDA = torch.tensor([-2.0, -0.3, 0.0, 1.5], dtype=torch.float64)
GRAD = torch.tensor([0.4, -1.0, 0.25, 2.0], dtype=torch.float64)


def _optimizer(lamda: torch.Tensor = LAMDA, **kwargs) -> tuple[nn.Parameter, BayesBiNN]:
    p = nn.Parameter(torch.zeros_like(lamda))
    opt = BayesBiNN([p], **{"train_set_size": 50, "lr": 0.1, **kwargs})
    opt.state[p]["lamda"].copy_(lamda)
    return p, opt


def _linear_closure(p: nn.Parameter, seen: list[torch.Tensor]):
    """Loss ``GRAD · p``: its gradient is ``GRAD`` whatever the sampled weights are."""

    def closure() -> torch.Tensor:
        seen.append(p.detach().clone())
        loss = (GRAD * p).sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("gradient_scale", ["authors", "exact"])
def test_one_step_by_hand(gradient_scale):
    lr, tau, n, prior = 0.1, 0.7, 50, 0.2
    p, opt = _optimizer(
        lr=lr, temperature=tau, train_set_size=n, prior_lamda=prior, gradient_scale=gradient_scale
    )
    seen = []
    torch.manual_seed(3)
    opt.step(_linear_closure(p, seen))
    (w,) = seen

    # The relaxed sample: w = tanh((λ + ½ log(u / (1 − u))) / τ) from the same uniform draw.
    torch.manual_seed(3)
    u = torch.rand_like(LAMDA)
    torch.testing.assert_close(w, torch.tanh((LAMDA + 0.5 * torch.log(u / (1 - u))) / tau))

    # λ ← (1 − α) λ − α (N s g − λ₀) with s = (1 − w²) / (τ (1 − μ²)); away from
    # saturation the authors' ε = 1e-10 changes nothing at this tolerance.
    scale = (1 - w**2) / (tau * (1 - torch.tanh(LAMDA) ** 2))
    expected = (1 - lr) * LAMDA - lr * (n * scale * GRAD - prior)
    torch.testing.assert_close(opt.state[p]["lamda"], expected)
    torch.testing.assert_close(opt.mean(p), torch.tanh(expected))  # mean of the updated λ
    assert torch.equal(p.detach(), torch.where(expected >= 0, 1.0, -1.0).double())


def test_two_steps_with_samples_momentum_and_kl_weight_by_hand():
    lr, tau, n, prior, rho, beta, m = 0.05, 1.0, 30, -0.1, 0.6, 0.5, 3
    p, opt = _optimizer(
        gradient_scale="exact",
        lr=lr,
        temperature=tau,
        train_set_size=n,
        prior_lamda=prior,
        momentum=rho,
        kl_weight=beta,
        num_samples=m,
    )
    lamda, buffer = LAMDA.clone(), torch.zeros_like(LAMDA)
    torch.manual_seed(0)
    for t in (1, 2):
        seen = []
        loss = opt.step(_linear_closure(p, seen))
        assert len(seen) == m
        torch.testing.assert_close(loss, torch.stack([(GRAD * w).sum() for w in seen]).mean())
        mu = torch.tanh(lamda)
        grad_hat = n / m * sum((1 - w**2) / (tau * (1 - mu**2)) * GRAD for w in seen)
        buffer = rho * buffer + (1 - rho) * (grad_hat + beta * (lamda - prior))
        lamda = lamda - lr * buffer / (1 - rho**t)
        torch.testing.assert_close(opt.state[p]["lamda"], lamda)
        assert opt.state[p]["step"] == t


def test_authors_scale_at_the_papers_mnist_setting_by_hand():
    """τ = 1e-10, λ = ±10 in float32: tanh rounds to ±1, so the authors' scale is
    ``(0 + ε) / τ / (0 + ε) = 1/τ = 1e10`` and λ moves by ``−α (N g / τ + β (λ − λ₀))``; the
    exact scale is 0 there and only the prior's pull ``(1 − αβ) λ`` is left."""
    lamda = torch.tensor([10.0, -10.0, 10.0, -10.0])
    grad = torch.tensor([1e-6, 3e-7, -2e-6, -5e-7])
    lr, tau, n, beta = 1e-4, 1e-10, 54_000, 1e-3
    seen = []

    def closure(p):
        def f() -> torch.Tensor:
            seen.append(p.detach().clone())
            loss = (grad * p).sum()
            loss.backward()
            return loss

        return f

    results = {}
    for scale in ("authors", "exact"):
        p = nn.Parameter(torch.zeros(4))
        opt = BayesBiNN(
            [p], train_set_size=n, lr=lr, temperature=tau, kl_weight=beta, gradient_scale=scale
        )
        opt.state[p]["lamda"].copy_(lamda)
        opt.step(closure(p))
        results[scale] = opt.state[p]["lamda"].clone()
    assert torch.equal(seen[0], torch.tensor([1.0, -1.0, 1.0, -1.0]))  # samples are ±1

    s = 1.0 / tau  # (1 - 1 + 1e-10) / 1e-10 / (1 - 1 + 1e-10), by hand
    expected = lamda - lr * (n * s * grad + beta * lamda)  # e.g. 10 - 1e-4 (5.4e-2 · 1e10 + 1e-2)
    torch.testing.assert_close(results["authors"], expected, rtol=1e-5, atol=0)
    # The signs follow the gradients: weights 0 and 3 flip, 1 and 2 get more certain.
    assert torch.equal(results["authors"].sign(), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    torch.testing.assert_close(results["exact"], (1 - lr * beta) * lamda)


def test_unused_parameter_only_feels_the_prior():
    used = nn.Parameter(torch.zeros(2))
    unused = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = BayesBiNN([used, unused], train_set_size=5, lr=0.1, prior_lamda=0.5, kl_weight=2.0)
    opt.state[unused]["lamda"].copy_(LAMDA)

    def closure() -> torch.Tensor:
        loss = used.sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(opt.state[unused]["lamda"], LAMDA - 0.1 * 2.0 * (LAMDA - 0.5))


def test_mean_and_variance():
    lamda = torch.linspace(-4.0, 4.0, 9)
    p, opt = _optimizer(lamda)
    mu = opt.mean(p)
    torch.testing.assert_close(mu, torch.tanh(lamda))
    torch.testing.assert_close(opt.variance(p), 1 - mu**2)
    # Where tanh rounds to ±1 the variance stays positive (1 − μ² would be exactly 0).
    p, opt = _optimizer(torch.tensor([-20.0, 20.0]))
    assert (opt.variance(p) > 0).all() and (opt.variance(p) < 1e-16).all()


def test_initialisation_takes_signs_from_the_parameters():
    p = nn.Parameter(torch.tensor([0.3, -2.0, 0.0, -0.1]))
    opt = BayesBiNN([p], train_set_size=10, init_lamda=4.0)
    assert torch.equal(opt.state[p]["lamda"], torch.tensor([4.0, -4.0, 4.0, -4.0]))
    assert torch.equal(p.detach(), torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_samples_are_exactly_binary_with_the_right_mean():
    n = 20_000
    p, opt = _optimizer(torch.full((n,), 0.4, dtype=torch.float64))
    opt.sample_(torch.Generator().manual_seed(0))
    assert torch.isin(p.detach(), torch.tensor([-1.0, 1.0], dtype=torch.float64)).all()
    mu = math.tanh(0.4)
    assert abs(p.mean().item() - mu) < 4 * math.sqrt((1 - mu**2) / n)
    opt.load_mean_()
    assert torch.equal(p.detach(), torch.ones(n, dtype=torch.float64))


def test_state_dict_round_trip():
    p, opt = _optimizer()
    opt.step(_linear_closure(p, []))
    other = BayesBiNN([p], train_set_size=50)
    other.load_state_dict(opt.state_dict())
    assert torch.equal(other.state[p]["lamda"], opt.state[p]["lamda"])
    assert other.param_groups[0]["lr"] == 0.1


def test_split_binary_parameters():
    model = bayesbinn_mlp([5, 4, 3])
    binary, other = split_binary_parameters(model)
    named = {id(p): n for n, p in model.named_parameters()}
    assert [named[id(p)] for p in binary] == ["fc1.weight", "out.weight"]
    assert [named[id(p)] for p in other] == [
        "bn1.weight",
        "bn1.bias",
        "out.bias",
        "scale.log_scale",
    ]


def test_split_binary_parameters_takes_convolution_kernels():
    model = bayesbinn_network(CNN)
    binary, _ = split_binary_parameters(model)
    named = {id(p): n for n, p in model.named_parameters()}
    assert [named[id(p)] for p in binary] == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "out.weight",
    ]


@pytest.mark.parametrize("activation", ["sign", "relu"])
def test_cnn_network_trains_on_flat_input(activation):
    torch.manual_seed(0)
    model = bayesbinn_network(CNN, activation=activation)
    assert isinstance(model.act1, nn.ReLU) == (activation == "relu")
    x, y = torch.randn(12, 784), torch.randint(10, (12,))
    model(x).logsumexp(-1).sum().backward()  # forward and backward on (N, 784)
    assert all(p.grad is not None for p in model.parameters())
    kernel = model.conv2.weight.detach().clone()
    opt = train_bayesbinn(
        model, x, y, lr=1e-2, kl_weight=1e-3, epochs=1, batch_size=6, progress=False
    )
    assert opt.state[model.conv2.weight]["lamda"].shape == (8, 4, 5, 5)
    assert not torch.equal(model.conv2.weight.detach(), kernel.sign())  # kernels moved
    assert torch.isin(model.conv2.weight.detach(), torch.tensor([-1.0, 1.0])).all()
    probs = bayesbinn_predict_proba(model, opt, x, num_samples=2)
    assert probs.shape == (12, 10)


def test_sampled_prediction_is_the_average_over_posterior_samples():
    torch.manual_seed(0)
    model = bayesbinn_mlp([5, 8, 3]).eval()
    binary, _ = split_binary_parameters(model)
    opt = BayesBiNN(binary, train_set_size=10)
    x = torch.randn(7, 5)

    # Every weight uncertain (λ = 0): the sampled predictive averages networks drawn from
    # the generator seeded with `seed`, in order; the mean mode is the one network sign(μ).
    for p in binary:
        opt.state[p]["lamda"].zero_()
    sampled = bayesbinn_predict_proba(model, opt, x, num_samples=4, seed=3)
    generator, by_hand = torch.Generator().manual_seed(3), []
    for _ in range(4):
        opt.sample_(generator)
        by_hand.append(predict_proba(model, x))
    torch.testing.assert_close(sampled, torch.stack(by_hand).mean(0))
    mean = bayesbinn_predict_proba(model, opt, x, mode="mean")
    assert all(torch.equal(p.detach(), torch.ones_like(p)) for p in binary)  # sign(0) = +1
    torch.testing.assert_close(mean, predict_proba(model, x))
    assert not torch.allclose(sampled, mean)

    # A concentrated posterior (|λ| = 30): every sample is the mean network.
    for p in binary:
        opt.state[p]["lamda"].copy_(30.0 * torch.randn(p.shape).sign())
    torch.testing.assert_close(
        bayesbinn_predict_proba(model, opt, x, num_samples=3),
        bayesbinn_predict_proba(model, opt, x, mode="mean"),
    )


def test_bayesbinn_learns_digits(digits):
    torch.manual_seed(0)
    model = bayesbinn_mlp([64, 64, 10])
    opt = train_bayesbinn(
        model,
        digits["x"],
        digits["y"],
        kl_weight=1e-3,
        epochs=10,
        batch_size=64,
        progress=False,
    )
    x, y = digits["x_test"], digits["y_test"]
    assert accuracy(bayesbinn_predict_proba(model, opt, x, mode="mean"), y) > 0.7
    mc = bayesbinn_predict_proba(model, opt, x, num_samples=5, seed=1)
    torch.testing.assert_close(mc.sum(-1), torch.ones(len(y)))
    assert accuracy(mc, y) > 0.7
    for w in (model.fc1.weight, model.out.weight):  # the MAP network is back in place
        assert torch.equal(w.detach(), torch.where(opt.mean(w) >= 0, 1.0, -1.0))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": 1.5}, "lr"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 1.5}, "num_samples"),
        ({"train_set_size": 0}, "train_set_size"),
        ({"momentum": 1.0}, "momentum"),
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"init_lamda": -1.0}, "init_lamda"),
        ({"prior_lamda": math.nan}, "prior_lamda"),
        ({"gradient_scale": "reference"}, "gradient_scale"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BayesBiNN([nn.Parameter(torch.zeros(3))], **{"train_set_size": 10, **kwargs})


def test_bad_call_arguments():
    p, opt = _optimizer()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="closure must call backward"):
        opt.step(lambda: (GRAD * p).sum())
    model = bayesbinn_mlp([3, 2])
    opt = BayesBiNN(split_binary_parameters(model)[0], train_set_size=4)
    with pytest.raises(ValueError, match="num_samples"):
        bayesbinn_predict_proba(model, opt, torch.zeros(4, 3), num_samples=0)
    with pytest.raises(ValueError, match="mode"):
        bayesbinn_predict_proba(model, opt, torch.zeros(4, 3), mode="map")
    with pytest.raises(ValueError, match="activation"):
        bayesbinn_mlp([3, 2], activation="tanh")
    with pytest.raises(ValueError, match="optimizer"):
        train_bayesbinn(model, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), optimizer=opt)


def test_posterior_as_prior_copies_the_natural_parameters_for_the_next_task():
    # The paper's continual mode (lambda_0 <- lambda after a task), scaled by the strength.
    unused = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    used = nn.Parameter(torch.zeros(2))
    opt = BayesBiNN([used, unused], train_set_size=5, lr=0.1, kl_weight=2.0)
    opt.state[unused]["lamda"].copy_(LAMDA)
    opt.posterior_as_prior_(strength=0.5)
    prior = opt.state[unused]["prior_lamda"]
    torch.testing.assert_close(prior, 0.5 * LAMDA)

    def closure() -> torch.Tensor:
        loss = used.sum()
        loss.backward()
        return loss

    opt.step(closure)
    # With no gradient, the prior pulls lambda towards the per-weight lambda_0 ...
    expected = LAMDA - 0.1 * 2.0 * (LAMDA - 0.5 * LAMDA)
    torch.testing.assert_close(opt.state[unused]["lamda"], expected)
    # ... which is a copy: it stayed where it was while lambda moved.
    torch.testing.assert_close(opt.state[unused]["prior_lamda"], 0.5 * LAMDA)
    with pytest.raises(ValueError, match="strength"):
        opt.posterior_as_prior_(strength=0.0)


def test_continual_training_keeps_the_first_task_better_than_a_uniform_prior(digits):
    # Task 1: the digits; task 2: the digits with their pixels permuted. With the first
    # posterior as the prior, less of task 1 is overwritten.
    x, y, x_test, y_test = digits["x"], digits["y"], digits["x_test"], digits["y_test"]
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    kwargs = {"epochs": 3, "batch_size": 50, "progress": False}

    def first_task_accuracy_after_second(carry: bool) -> float:
        torch.manual_seed(0)
        model = bayesbinn_mlp([64, 32, 10])
        opt = train_bayesbinn(model, x, y, lr=0.1, temperature=1e-2, kl_weight=1.0, **kwargs)
        if carry:
            opt.posterior_as_prior_()
        opt = continue_bayesbinn(model, opt, x[:, permutation], y, **kwargs)
        assert opt.train_set_size == x.shape[0]
        return accuracy(bayesbinn_predict_proba(model, opt, x_test, mode="mean"), y_test)

    carried = first_task_accuracy_after_second(True)
    uniform = first_task_accuracy_after_second(False)
    # Measured 0.54 against 0.17 (seeded).
    assert carried > uniform + 0.2, (carried, uniform)


def test_continue_bayesbinn_refuses_an_optimizer_of_other_weights():
    model, other = bayesbinn_mlp([4, 3, 2]), bayesbinn_mlp([4, 3, 2])
    binary, _ = split_binary_parameters(other)
    x, y = torch.randn(8, 4), torch.randint(2, (8,))
    with pytest.raises(ValueError, match="binary weights"):
        continue_bayesbinn(model, BayesBiNN(binary, train_set_size=8), x, y, progress=False)
    with pytest.raises(ValueError, match="BayesBiNN"):
        continue_bayesbinn(model, torch.optim.SGD(binary, lr=0.1), x, y, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_optimizer_and_predictive_stay_on_the_gpu():
    model = bayesbinn_mlp([5, 8, 3], device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    x, y = torch.randn(16, 5, device="cuda"), torch.randint(3, (16,), device="cuda")
    opt = train_bayesbinn(model, x, y, epochs=1, batch_size=8, progress=False)
    opt.posterior_as_prior_()
    assert opt.state[split_binary_parameters(model)[0][0]]["prior_lamda"].is_cuda
    assert bayesbinn_predict_proba(model, opt, x, num_samples=2).is_cuda


def test_network_is_built_on_the_device_asked_for():
    model = bayesbinn_mlp([5, 8, 3], device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
