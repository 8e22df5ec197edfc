import pytest
import torch
from torch import nn

from pyro_bqn.architectures import Architecture
from pyro_bqn.baselines import predict_proba
from pyro_bqn.baselines.binarized import binarized_mlp, binarized_network, train_binarized
from pyro_bqn.baselines.ste import STEConv2d, STELinear, STEWeight, glorot_lr_scale
from tests.baselines.conftest import accuracy

BINARY = torch.tensor([-1.0, 1.0])
CNN = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))


def _inputs_and_weights(net: nn.Module, x: torch.Tensor):
    """The input every binary layer sees and the weight it multiplies, in one forward."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: seen.append((args[0], m.quantized_weight())))
        for m in net.modules()
        if isinstance(m, STEWeight)
    ]
    try:
        net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_weights_and_activations_are_binary_in_forward(architecture):
    torch.manual_seed(0)
    if architecture == "mlp":
        net = binarized_mlp([784, 32, 16, 10])
    else:
        net = binarized_network(CNN)
    x = torch.randn(6, 784)
    seen = _inputs_and_weights(net, x)
    assert len(seen) == (3 if architecture == "mlp" else 4)
    for i, (inputs, weight) in enumerate(seen):
        assert torch.isin(weight, BINARY).all()
        # Every layer but the first sees sign activations (max pooling keeps ±1).
        assert torch.isin(inputs, BINARY).all() == (i > 0)
    assert isinstance(net.out, STELinear) and (
        architecture == "mlp" or isinstance(net.conv1, STEConv2d)
    )


def test_cnn_runs_forward_and_backward_on_flat_input():
    torch.manual_seed(0)
    net = binarized_network(CNN)
    logits = net(torch.randn(5, 784))
    assert logits.shape == (5, 10)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_training_clips_the_latent_weights_and_learns_digits(digits):
    torch.manual_seed(0)
    net = binarized_mlp([64, 128, 10])
    history = train_binarized(
        net, digits["x"], digits["y"], epochs=6, batch_size=64, progress=False
    )
    assert history[-1] < history[0]
    assert accuracy(predict_proba(net, digits["x_test"]), digits["y_test"]) > 0.75
    latent = [net.fc1.weight, net.out.weight]
    assert all(w.min() >= -1.0 and w.max() <= 1.0 for w in latent)
    assert any((w.abs() == 1.0).any() for w in latent)  # the clip was active


def test_adam_rates_follow_the_papers_schedule(monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    torch.manual_seed(0)
    net = binarized_mlp([3, 4, 2])
    x, y = torch.randn(8, 3), torch.randint(2, (8,))
    train_binarized(
        net, x, y, lr=0.01, final_lr_fraction=0.01, epochs=2, batch_size=8, progress=False
    )
    fc1, out = glorot_lr_scale(net.fc1.weight), glorot_lr_scale(net.out.weight)
    # Epoch e runs at lr · f^(e/E); the binary layers at their Glorot multiple of it.
    expected = [[0.01 * fc1 * f, 0.01 * out * f, 0.01 * f] for f in (1.0, 0.1)]
    torch.testing.assert_close(torch.tensor(seen), torch.tensor(expected))
