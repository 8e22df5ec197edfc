from collections import OrderedDict

import pytest
import torch

from pyro_bqn.architectures import TORCH_LAYERS, Architecture


def _network(arch):
    return torch.nn.Sequential(OrderedDict(arch.layers(TORCH_LAYERS)))


def test_mlp_layers_sizes_and_weight_count():
    arch = Architecture("mlp", (12,), 3, (5, 4))
    assert arch.sizes == (12, 5, 4, 3)
    net = _network(arch)
    assert [n for n, _ in net.named_children()] == [
        "flatten", "fc1", "bn1", "act1", "fc2", "bn2", "act2", "out",
    ]  # fmt: skip
    linear = [m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert arch.num_weights == sum(linear) == 12 * 5 + 5 * 4 + 4 * 3
    assert net(torch.randn(2, 3, 4)).shape == (2, 3)


def test_cnn_is_lenet_shaped_and_counts_its_kernels():
    arch = Architecture("cnn", (2, 12, 8), 4, (3, 5, 7))
    net = _network(arch)
    # two 5x5 'same' convolutions, each halved by pooling: 12x8 -> 3x2 with 5 channels
    assert arch.sizes == (5 * 3 * 2, 7, 4)
    kernels = [m.weight.shape for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kernels == [(3, 2, 5, 5), (5, 3, 5, 5)]
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    weights = [m.weight.numel() for m in net.modules() if isinstance(m, layers)]
    assert arch.num_weights == sum(weights)
    assert net(torch.randn(6, 2 * 12 * 8)).shape == (6, 4)


@pytest.mark.parametrize(
    ("kind", "shape", "hidden", "match"),
    [
        ("rnn", (4,), (3,), "architecture must be one of"),
        ("mlp", (4,), (0,), "positive integers"),
        ("cnn", (30,), (2, 2, 2), "image inputs"),
        ("cnn", (1, 10, 8), (2, 2, 2), "divisible by 4"),
        ("cnn", (1, 8, 8), (2, 2), "conv1 channels"),
    ],
)
def test_bad_shapes_are_refused_naming_the_problem(kind, shape, hidden, match):
    with pytest.raises(ValueError, match=match):
        Architecture(kind, shape, 3, hidden)
