"""The deployable integer network against the most probable network run in the model."""

import json
import subprocess
import sys

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_bqn import cli
from pyro_bqn import levels as qlevels
from pyro_bqn.architectures import Architecture
from pyro_bqn.deploy import integer_levels, integer_network
from pyro_bqn.deploy.artefacts import save_deployable, save_torch_program
from pyro_bqn.deploy.integer_network import (
    FloatAffine,
    IntegerConv2d,
    IntegerLinear,
    SignThreshold,
)
from pyro_bqn.export import export_network
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.models import QuantizedClassifier

LEVELS = {
    "binary": qlevels.binary,
    "ternary": qlevels.ternary,
    "2bit": lambda: qlevels.uniform(2),
}
# Inputs are normalised 8-bit codes, as images in pyro_bqn.data: x = OFFSET + STEP * code.
OFFSET, STEP = -0.13 / 0.31, 1 / 255 / 0.31
ARCHITECTURES = {
    "mlp": Architecture("mlp", (64,), 5, (24, 12)),
    "cnn": Architecture("cnn", (1, 8, 8), 5, (4, 6, 12)),
}


def _fitted(architecture, levels, activation="sign", steps=6, n=300):
    """A quick fit on random codes and labels, its most probable network and test inputs."""
    pyro.set_rng_seed(0)
    model = QuantizedClassifier(architecture, levels, activation)
    guide = AutoQuantizedGuide(model)
    codes = torch.randint(0, 256, (n, architecture.num_features))
    x = OFFSET + STEP * codes.float()
    y = torch.randint(0, architecture.num_classes, (n,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    for _ in range(steps):
        svi.step(x[:200], y[:200])
    network = export_network(model, guide, x[:2], batch_norm_data=x[:200])
    return model, network, x


def _codes(architecture):
    return (OFFSET, STEP) if architecture.kind == "mlp" else None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([-1.0, 1.0], (1.0, 2, -1)),
        ([-1.0, 0.0, 1.0], (1.0, 1, -1)),
        ([-1.0, -1 / 3, 1 / 3, 1.0], (1 / 3, 2, -3)),
        ([0.0, 0.5, 1.0], (0.5, 1, 0)),
        ([-0.2, 0.2], (0.2, 2, -1)),
    ],
)
def test_integer_levels_write_uniform_levels_as_a_scale_times_int8(values, expected):
    found = integer_levels(torch.tensor(values))
    scale, step, first = expected
    assert found.step == step and found.first == first
    assert found.scale == pytest.approx(scale, rel=1e-6)
    integers = found.integers(torch.arange(len(values)))
    assert integers.dtype == torch.int8
    assert torch.allclose(integers.float() * found.scale, torch.tensor(values), rtol=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        [-1.0, 0.5, 2.5],  # not uniform
        [-1.0, 0.3],  # -1 is no whole or half multiple of the gap 1.3
        [200.0, 201.0],  # the integers 200 and 201 do not fit int8
    ],
)
def test_integer_levels_refuse_what_int8_times_a_scale_cannot_hold(values):
    assert integer_levels(torch.tensor(values)) is None


@pytest.mark.parametrize("level_name", sorted(LEVELS))
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_sign_networks_in_integers_predict_as_the_most_probable_network(kind, level_name):
    architecture = ARCHITECTURES[kind]
    model, network, x = _fitted(architecture, LEVELS[level_name]())
    deployed = integer_network(network, model, x[:2], _codes(architecture))
    # Every hidden layer after the first (and the first of the MLP, on input codes) sums in
    # integers and ends in an int32 comparison.
    integer_layers = [m for m in deployed if isinstance(m, (IntegerLinear, IntegerConv2d))]
    float_first = 0 if kind == "mlp" else 1  # the CNN's first convolution pads its input
    assert len(integer_layers) == len(network.quantized) - float_first
    assert all(m.weight.dtype == torch.int8 for m in integer_layers)
    thresholds = [m.threshold for m in deployed if isinstance(m, SignThreshold)]
    assert sum(t.dtype == torch.int32 for t in thresholds) >= len(thresholds) - 1

    expected = network.run(model, x)
    with torch.no_grad():
        logits = deployed(x)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    # Logits agree to the float rounding of the output layer (scale, bias, temperature).
    reference = torch.log(expected)
    reference = reference - reference.mean(-1, keepdim=True)
    centred = logits - logits.mean(-1, keepdim=True)
    assert torch.allclose(centred, reference, atol=1e-4 * (1 + reference.abs().max()))


def test_negative_and_zero_batch_norm_scales_flip_or_fix_the_sign():
    architecture = ARCHITECTURES["mlp"]
    model, network, x = _fitted(architecture, qlevels.ternary())
    gamma = network.params["body.2.weight"]
    gamma[::2] = -gamma[::2]  # half the channels decreasing in their input
    gamma[1] = 0.0  # one channel constant: sign(beta)
    expected = network.run(model, x)
    deployed = integer_network(network, model, x[:2], _codes(architecture))
    first = deployed[2]
    assert isinstance(first, IntegerLinear)
    with torch.no_grad():
        signs = deployed[3](first(deployed[1](deployed[0](x))))
    assert (signs[:, 1] == (1 if network.params["body.2.bias"][1] >= 0 else -1)).all()
    assert torch.equal(deployed(x).argmax(-1), expected.argmax(-1))
    assert torch.allclose(torch.softmax(deployed(x), -1), expected, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_relu_and_non_integer_levels_keep_float_where_documented(kind):
    architecture = ARCHITECTURES[kind]
    for levels, activation in [
        (qlevels.ternary(), "relu"),
        (qlevels.from_values([-1, 0.4, 2.0]), "sign"),
    ]:
        pyro.clear_param_store()
        model, network, x = _fitted(architecture, levels, activation, steps=3)
        deployed = integer_network(network, model, x[:2], _codes(architecture))
        if activation == "sign":  # non-integer levels: every layer is a float one
            assert not any(isinstance(m, (IntegerLinear, IntegerConv2d)) for m in deployed)
            assert all(m.weight.is_floating_point() for m in deployed if isinstance(m, FloatAffine))
        expected = network.run(model, x)
        with torch.no_grad():
            probs = torch.softmax(deployed(x), -1)
        assert torch.allclose(probs, expected, atol=1e-5)


def test_bad_input_is_refused_before_work(tmp_path):
    model, network, x = _fitted(ARCHITECTURES["cnn"], qlevels.binary(), steps=1)
    with pytest.raises(ValueError, match="input_codes must be"):
        integer_network(network, model, x[:2], (0.0, 0.0))
    with pytest.raises(ValueError, match="MLP only"):
        integer_network(network, model, x[:2], (OFFSET, STEP))
    with pytest.raises(ValueError, match="QuantizedClassifier"):
        integer_network(network, torch.nn.Linear(2, 2), x[:2])
    with pytest.raises(ValueError, match="format must be one of"):
        save_deployable(network, model, x[:2], tmp_path, "tflite")
    with pytest.raises(ValueError, match="not an existing directory"):
        save_deployable(network, model, x[:2], tmp_path / "missing", "torch")


_STANDALONE = """
import builtins, sys
real_import = builtins.__import__
def refuse(name, *args, **kwargs):
    if name.split(".")[0] in ("pyro", "pyro_bqn"):
        raise ImportError("the program must run without " + name)
    return real_import(name, *args, **kwargs)
builtins.__import__ = refuse
import torch
program = torch.export.load(sys.argv[1]).module()
torch.save(program(torch.load(sys.argv[2])), sys.argv[3])
"""


def test_the_saved_torch_program_runs_without_pyro_or_pyro_bqn(tmp_path):
    architecture = ARCHITECTURES["cnn"]
    model, network, x = _fitted(architecture, qlevels.ternary(), steps=2)
    deployed = integer_network(network, model, x[:2])
    save_torch_program(deployed, tmp_path / "network.pt2", architecture.num_features)
    torch.save(x[:7], tmp_path / "x.pt")
    script = tmp_path / "run.py"
    script.write_text(_STANDALONE)
    paths = [str(tmp_path / name) for name in ("network.pt2", "x.pt", "logits.pt")]
    subprocess.run([sys.executable, str(script), *paths], check=True, cwd=tmp_path)
    with torch.no_grad():
        assert torch.equal(torch.load(paths[2]), deployed(x[:7]))


@pytest.mark.parametrize("level_name", sorted(LEVELS))
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_onnx_runtime_gives_the_logits_of_the_torch_program(tmp_path, kind, level_name):
    ort = pytest.importorskip("onnxruntime")
    architecture = ARCHITECTURES[kind]
    model, network, x = _fitted(architecture, LEVELS[level_name]())
    for name, gamma in network.params.items():
        if name.endswith(".weight"):  # every batch norm: some channels flipped, one constant
            gamma[::2] = -gamma[::2]
            gamma[1] = 0.0
    report = save_deployable(network, model, x[:2], tmp_path, "onnx", _codes(architecture))
    session = ort.InferenceSession(
        str(tmp_path / "network.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = integer_network(network, model, x[:2], _codes(architecture))(x)
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-5, rtol=1e-6)
    assert torch.equal(torch.from_numpy(logits).argmax(-1), network.run(model, x).argmax(-1))
    # Packed weights: at most the index bits per weight plus a fixed graph and per-channel
    # thresholds; the report says so.
    bits = max(network.bits_per_weight().values())
    channels = sum(site.shape[0] for site in network.quantized.values())
    assert report["file_bytes"] <= report["weights"] * bits / 8 + 16 * channels + 8000
    assert json.loads((tmp_path / "deployment_onnx.json").read_text()) == report


def test_cli_fit_export_and_export_write_the_programs_and_refuse_bad_folders(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--dataset", "breast-cancer", "--hidden", "6", "--no-progress", "--mc-samples", "0"]
    cli.main(["fit", *tiny, "--epochs", "1", "--output", str(run), "--export", "torch"])
    assert (run / "network.pt2").is_file()
    report = json.loads((run / "deployment_torch.json").read_text())
    assert (
        report["file"] == "network.pt2"
        and report["file_bytes"] == (run / "network.pt2").stat().st_size
    )
    assert "export" not in json.loads((run / "arguments.json").read_text())

    pytest.importorskip("onnx")
    assert cli.main(["export", str(run), "--format", "onnx"]) == 0
    assert (run / "network.onnx").is_file()
    assert "network.onnx" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "missing"), "--format", "onnx"])
    assert exit_info.value.code == 2
    assert "has no arguments.json" in capsys.readouterr().err
