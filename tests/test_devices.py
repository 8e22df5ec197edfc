"""Devices: a training step, predict, a checkpoint round trip and export on every device
this machine has (the CPU always; CUDA and MPS where present), everything a model holds
following ``model.to(device)``, and devices refused by name before any work."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

from pyro_bqn import QuantizedLinear, QuantizedMLP, baselines
from pyro_bqn.checkpoint import load_checkpoint
from pyro_bqn.devices import module_device, resolve_device
from pyro_bqn.export import QuantizedNetwork, export_network
from pyro_bqn.infer import AutoQuantizedGuide, fit, predict, predict_by_sampling
from pyro_bqn.infer.moment_messenger import MomentMessenger
from tests.infer.models import linear_classes

DEVICES = (
    ["cpu"]
    + (["cuda"] if torch.cuda.is_available() else [])
    + (["mps"] if torch.backends.mps.is_available() else [])
)
SIZES = (5, 12, 3)


def _tensors_of(fn) -> list[torch.Tensor]:
    """The tensors a distribution holds (its parameters, and a base distribution's)."""
    found = [value for value in vars(fn).values() if isinstance(value, torch.Tensor)]
    for inner in ("base_dist", "level_set"):
        if hasattr(fn, inner) and not isinstance(getattr(fn, inner), torch.Tensor):
            found += _tensors_of(getattr(fn, inner))
    return found


def _trained(device: str, checkpoint: Path | None = None):
    x, y = linear_classes(60, SIZES[0], SIZES[-1], seed=1)
    model = QuantizedMLP(SIZES)
    guide = AutoQuantizedGuide(model)
    history = fit(
        model, guide, x, y, epochs=1, batch_size=20, progress=False, device=device,
        checkpoint=checkpoint,
    )  # fmt: skip
    return model, guide, x, y, history


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_prior_follows_the_layer(device: str) -> None:
    # The bias prior was once built on the CPU at construction (torch.zeros(out_channels))
    # and stayed there; float64 shows the same defect on a machine with only a CPU.
    layer = QuantizedLinear(3, 2).to(device=device, dtype=torch.float64)
    trace = poutine.trace(layer).get_trace(torch.randn(4, 3, dtype=torch.float64, device=device))
    for name in ("weight", "bias"):
        for tensor in _tensors_of(trace.nodes[name]["fn"]):
            assert tensor.device.type == device, name
            assert not tensor.is_floating_point() or tensor.dtype == torch.float64, name


@pytest.mark.parametrize("device", DEVICES)
def test_everything_a_model_holds_follows_it(device: str) -> None:
    x, y = linear_classes(8, SIZES[0], SIZES[-1], seed=0)
    model = QuantizedMLP(SIZES)
    guide = AutoQuantizedGuide(model)
    guide(x, y)  # creates the guide's parameters on the CPU
    model.to(device), guide.to(device)
    x, y = x.to(device), y.to(device)
    for module in (model, guide):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device.type == device, name
    # The param store holds the same tensors, so it moved too.
    for name, value in pyro.get_param_store().items():
        assert value.device.type == device, name
    # Priors, posteriors and the likelihood are built where the model is.
    guide_trace = poutine.trace(MomentMessenger()(guide)).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    for trace in (guide_trace, model_trace):
        for name, site in trace.iter_stochastic_nodes():
            for tensor in _tensors_of(site["fn"]):
                assert tensor.device.type == device, name


@pytest.mark.parametrize("device", DEVICES)
def test_train_predict_and_checkpoint_on_a_device(device: str, tmp_path: Path) -> None:
    model, guide, x, y, history = _trained(device, tmp_path / "run.pt")
    assert module_device(model).type == device and module_device(guide).type == device
    assert history[0]["loss"] == history[0]["loss"]  # finite, not NaN
    # predict moves the CPU inputs to the device and answers there.
    probs = predict(model, guide, x, device=device)
    assert probs.device.type == device and probs.shape == (60, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(60, device=device))
    sampled = predict_by_sampling(model, guide, x, num_samples=3, device=device)
    assert sampled.device.type == device
    # A fresh model on the device takes the checkpoint (saved from the device) exactly, also
    # when the file is read onto the CPU first.
    pyro.clear_param_store()
    restored = QuantizedMLP(SIZES).to(device)
    restored_guide = AutoQuantizedGuide(restored)
    example = (x[:2].to(device), y[:2].to(device))
    load_checkpoint(tmp_path / "run.pt", restored, restored_guide, *example, map_location="cpu")
    torch.testing.assert_close(
        predict(restored, restored_guide, x, device=device), probs, rtol=0, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_saved_on_a_device_loads_on_the_cpu(device: str, tmp_path: Path) -> None:
    model, guide, x, y, _ = _trained(device, tmp_path / "run.pt")
    expected = predict(model, guide, x, device="cpu")
    pyro.clear_param_store()
    restored = QuantizedMLP(SIZES)
    restored_guide = AutoQuantizedGuide(restored)
    load_checkpoint(tmp_path / "run.pt", restored, restored_guide, x[:2], y[:2])
    torch.testing.assert_close(predict(restored, restored_guide, x), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_export_on_a_device(device: str, tmp_path: Path) -> None:
    model, guide, x, _, _ = _trained(device)
    x = x.to(device)
    network = export_network(model, guide, x[:2], batch_norm_data=x)
    network.save(tmp_path / "network.pt")
    loaded = QuantizedNetwork.load(tmp_path / "network.pt")
    probs = loaded.run(model, x)
    assert probs.device.type == device
    torch.testing.assert_close(probs, network.run(model, x))


def test_devices_are_resolved_by_name() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "mps" if "mps" in DEVICES else "cpu"
    assert resolve_device("auto").type == expected_auto
    assert resolve_device(None).type == expected_auto
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device must be one of cpu, cuda, mps, auto"):
            resolve_device(bad)
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=r"cuda:99|CUDA is not available"):
        resolve_device("cuda:99" if count else "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fit_refuses_cuda_before_any_work() -> None:
    x, y = linear_classes(20, SIZES[0], SIZES[-1], seed=0)
    model = QuantizedMLP(SIZES)
    guide = AutoQuantizedGuide(model)
    with pytest.raises(ValueError, match="'cuda' requested, but CUDA is not available"):
        fit(model, guide, x, y, epochs=1, progress=False, device="cuda")
    assert len(pyro.get_param_store()) == 0  # the guide never ran
    with pytest.raises(ValueError, match="CUDA is not available"):
        predict(model, guide, x, device="cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_baselines_train_and_predict_on_a_device(device: str) -> None:
    x, y = linear_classes(60, SIZES[0], SIZES[-1], seed=2)
    network = baselines.ste_mlp(SIZES)
    baselines.train_ste(network, x, y, epochs=1, batch_size=20, progress=False, device=device)
    assert module_device(network).type == device
    assert baselines.predict_proba(network, x).device.type == device
    model, guide = baselines.train_gaussian_bnn(
        x, y, SIZES, epochs=1, batch_size=20, progress=False, device=device
    )
    probs = baselines.gaussian_bnn_predict_proba(model, guide, x, num_samples=2)
    assert probs.device.type == device and probs.shape == (60, 3)


def test_gaussian_bnn_priors_follow_the_network() -> None:
    # Built once at construction, they stayed float32 on the CPU whatever the network did.
    model = baselines.GaussianBNN(SIZES).double()
    trace = poutine.trace(model).get_trace(torch.randn(4, SIZES[0], dtype=torch.float64))
    priors = [
        site["fn"]
        for name, site in trace.iter_stochastic_nodes()
        if name.endswith(("weight", "bias"))
    ]
    assert len(priors) == 4  # two layers' weight and bias
    for prior in priors:
        assert prior.mean.dtype == torch.float64 and prior.stddev.dtype == torch.float64
