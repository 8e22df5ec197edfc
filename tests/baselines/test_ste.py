import math

import pytest
import torch
import torch.nn.functional as F

from pyro_bqn import levels as level_sets
from pyro_bqn.architectures import Architecture
from pyro_bqn.baselines import (
    STELinear,
    clip_latent_weights_,
    export_quantized_weights,
    predict_proba,
    quantize_ste,
    sign_ste,
    ste_mlp,
    train_ste,
)
from pyro_bqn.baselines.ste import (
    STEConv2d,
    glorot_lr_scale,
    ste_network,
    train_with_lr_schedule,
)
from tests.baselines.conftest import accuracy

TERNARY = torch.tensor([-1.0, 0.0, 1.0])
CNN = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))


def test_quantize_nearest_level_ties_go_up():
    w = torch.tensor([-2.0, -0.6, -0.5, -0.4, 0.0, 0.4, 0.5, 0.7, 3.0])
    expected = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert torch.equal(quantize_ste(w, TERNARY), expected)


def test_quantize_gradient_is_identity_inside_clip_range():
    w = torch.tensor([-1.5, -1.0, -0.3, 0.2, 1.0, 1.2], requires_grad=True)
    upstream = torch.arange(1.0, 7.0)
    quantize_ste(w, TERNARY).backward(upstream)
    assert torch.equal(w.grad, upstream * torch.tensor([0.0, 1, 1, 1, 1, 0]))


def test_sign_ste_values_and_hardtanh_gradient():
    x = torch.tensor([-2.0, -1.0, -0.1, 0.0, 0.5, 1.5], requires_grad=True)
    out = sign_ste(x)
    assert torch.equal(out, torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 0]))


def test_ste_linear_forward_uses_quantized_weights():
    torch.manual_seed(0)
    layer = STELinear(5, 3, levels=TERNARY)
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), F.linear(x, quantize_ste(layer.weight, TERNARY), layer.bias))
    assert layer.weight.min() >= -1 and layer.weight.max() <= 1


def test_ste_mlp_defaults():
    model = ste_mlp([6, 16, 4])
    assert torch.equal(model.fc1.levels, torch.tensor([-1.0, 1.0]))
    assert model.scale.scale.item() == pytest.approx(16**-0.5)
    assert model.scale.log_scale.requires_grad
    fixed = ste_mlp([6, 16, 4], level_sets.ternary(), output_scale=0.2, learn_output_scale=False)
    assert torch.equal(fixed.out.levels, TERNARY)
    assert fixed.scale.scale.item() == pytest.approx(0.2)
    assert "scale.log_scale" not in dict(fixed.named_parameters())


@pytest.mark.parametrize("levels", [None, TERNARY], ids=["binary", "ternary"])
def test_ste_mlp_learns_digits_and_exports_levels(digits, levels):
    torch.manual_seed(0)
    model = ste_mlp([64, 128, 10], levels)
    history = train_ste(model, digits["x"], digits["y"], epochs=8, batch_size=64, progress=False)
    assert history[-1] < history[0]
    assert accuracy(predict_proba(model, digits["x_test"]), digits["y_test"]) > 0.75

    latent = [model.fc1.weight, model.out.weight]
    assert all(w.min() >= -1.0 and w.max() <= 1.0 for w in latent)
    assert any(w.abs().max() == 1.0 for w in latent)  # the clip was active

    exported = export_quantized_weights(model)
    values = model.fc1.levels
    assert set(exported) == {"fc1.weight", "out.weight"}
    for name, weight in exported.items():
        assert not weight.requires_grad
        assert torch.isin(weight, values).all()
        assert torch.equal(weight, quantize_ste(model.get_parameter(name), values))


def test_ste_conv_forward_uses_quantized_kernel():
    torch.manual_seed(0)
    conv = STEConv2d(2, 3, 3, padding=1, bias=False, levels=TERNARY)
    x = torch.randn(4, 2, 6, 6)
    expected = F.conv2d(x, quantize_ste(conv.weight, TERNARY), padding=1)
    assert torch.equal(conv(x), expected)
    assert conv.weight.min() >= -1 and conv.weight.max() <= 1


def test_cnn_runs_forward_and_backward_on_flat_input():
    torch.manual_seed(0)
    net = ste_network(CNN, TERNARY)
    x = torch.randn(5, 784)
    logits = net(x)
    assert logits.shape == (5, 10)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert isinstance(net.conv1, STEConv2d) and isinstance(net.conv2, STEConv2d)
    assert net.scale.scale.item() == pytest.approx(16**-0.5)  # 1 / sqrt(fan-in of `out`)

    exported = export_quantized_weights(net)
    assert set(exported) == {"conv1.weight", "conv2.weight", "fc1.weight", "out.weight"}
    assert exported["conv2.weight"].shape == (8, 4, 5, 5)
    with torch.no_grad():
        net.conv1.weight.fill_(3.0)
    clip_latent_weights_(net)
    assert (net.conv1.weight == 1.0).all()


def test_ste_mlp_is_the_network_of_the_mlp_architecture():
    torch.manual_seed(0)
    a = ste_mlp([6, 5, 3], TERNARY)
    torch.manual_seed(0)
    b = ste_network(Architecture("mlp", (6,), 3, (5,)), TERNARY)
    assert a.architecture == b.architecture
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_glorot_lr_scale():
    assert glorot_lr_scale(torch.empty(256, 512)) == pytest.approx(math.sqrt(768 / 1.5))
    # A convolution's fans count its receptive field: (8·25 + 4·25) / 1.5.
    assert glorot_lr_scale(torch.empty(8, 4, 5, 5)) == pytest.approx(math.sqrt(300 / 1.5))


@pytest.mark.parametrize(
    ("schedule", "fraction", "factors"),
    [
        ("constant", 1.0, [1.0, 1.0, 1.0, 1.0]),
        ("exponential", 0.01, [1.0, 0.01**0.25, 0.1, 0.01**0.75]),
        (
            "cosine",
            0.0,
            [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2],
        ),
        (
            "cosine",
            0.2,
            [
                1.0,
                0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2,
                0.6,
                0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2,
            ],
        ),
    ],
)
def test_lr_schedules(schedule, fraction, factors):
    torch.manual_seed(0)
    model = ste_mlp([3, 4, 2])
    latent = [model.fc1.weight, model.out.weight]
    rest = [p for p in model.parameters() if all(p is not w for w in latent)]
    optimizer = torch.optim.Adam([{"params": latent, "lr": 0.5}, {"params": rest}], lr=0.1)
    seen, epochs_seen = [], []

    def record_lr(module, inputs):  # the learning rates in force while training
        seen.append([group["lr"] for group in optimizer.param_groups])

    model.fc1.register_forward_pre_hook(record_lr)
    x, y = torch.randn(8, 3), torch.randint(2, (8,))
    train_with_lr_schedule(
        model,
        x,
        y,
        [optimizer],
        lr_schedule=schedule,
        final_lr_fraction=fraction,
        epochs=4,
        batch_size=8,
        progress=False,
        callback=lambda epoch, loss: epochs_seen.append(epoch),
    )
    assert epochs_seen == [0, 1, 2, 3]  # the caller's callback still runs
    torch.testing.assert_close(
        torch.tensor(seen), torch.tensor([[0.5 * f, 0.1 * f] for f in factors])
    )
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 0.1]  # restored


def test_train_ste_glorot_scale_sets_the_binary_layers_rates(monkeypatch):
    seen = {}

    def fake_train(model, x, y, optimizers, **kwargs):
        groups = optimizers[0].param_groups
        seen["groups"] = [(g["lr"], [id(p) for p in g["params"]]) for g in groups]
        return []

    monkeypatch.setattr("pyro_bqn.baselines.ste.train_with_lr_schedule", fake_train)
    model = ste_mlp([6, 5, 3])
    train_ste(
        model, torch.zeros(4, 6), torch.zeros(4, dtype=torch.long), lr=0.01, glorot_scale=True
    )
    fc1, out = model.fc1.weight, model.out.weight
    rest = [id(p) for p in model.parameters() if p is not fc1 and p is not out]
    assert seen["groups"] == [
        (pytest.approx(0.01 * glorot_lr_scale(fc1)), [id(fc1)]),
        (pytest.approx(0.01 * glorot_lr_scale(out)), [id(out)]),
        (0.01, rest),
    ]


def test_clip_uses_the_level_range():
    model = ste_mlp([3, 4, 2], torch.tensor([-3.0, -1.0, 1.0, 3.0]))
    with torch.no_grad():
        model.fc1.weight.fill_(5.0)
        model.out.weight.fill_(-0.5)
    clip_latent_weights_(model)
    assert (model.fc1.weight == 3.0).all() and (model.out.weight == -0.5).all()


@pytest.mark.parametrize(
    "levels",
    [
        torch.tensor([1.0, -1.0]),
        torch.tensor([0.0, 0.0, 1.0]),
        torch.tensor([1.0]),
        torch.ones(2, 2),
        [0.0, float("nan")],
    ],
    ids=["unsorted", "duplicate", "single", "2d", "nan"],
)
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        ste_mlp([3, 2], levels)


def test_bad_sizes_and_train_arguments():
    with pytest.raises(ValueError, match="sizes"):
        ste_mlp([3])
    with pytest.raises(ValueError, match="output_scale"):
        ste_mlp([3, 2], output_scale=0.0)
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="after_step"):
        train_ste(ste_mlp([3, 2]), x, y, after_step=lambda: None)
    with pytest.raises(ValueError, match="optimizer"):
        train_ste(ste_mlp([3, 2]), x, y, optimizer=None)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_ste(ste_mlp([3, 2]), x, y, lr_schedule="step")
    for schedule, fraction in [("exponential", 0.0), ("cosine", -0.1), ("constant", 1.5)]:
        with pytest.raises(ValueError, match="final_lr_fraction"):
            train_ste(ste_mlp([3, 2]), x, y, lr_schedule=schedule, final_lr_fraction=fraction)
    with pytest.raises(ValueError, match="epochs"):
        train_ste(ste_mlp([3, 2]), x, y, lr_schedule="cosine", epochs=0)
