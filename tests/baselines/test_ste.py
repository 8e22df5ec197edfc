import pytest
import torch
import torch.nn.functional as F

from pyro_bqn import levels as level_sets
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
from tests.baselines.conftest import accuracy

TERNARY = torch.tensor([-1.0, 0.0, 1.0])


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
    with pytest.raises(ValueError, match="after_step"):
        train_ste(
            ste_mlp([3, 2]),
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            after_step=lambda: None,
        )
