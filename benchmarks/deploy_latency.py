"""File size and inference latency of the deployed integer network against float32.

For the 784-512-256-10 MLP and the LeNet-style CNN (20, 50, 500) on 28x28 inputs, with
sign activations and binary or ternary weights (a random most probable network: its
values do not change the arithmetic), measured side by side in one run:

* **sizes**: the float32 weights (4 bytes each) against the deployable files
  (``network.pt2`` of :func:`torch.export.save`, ``int8`` weights; ``network.onnx``,
  packed weights) and the pyro_bqn network file (``QuantizedNetwork.save``);
* **latency** at batch 1 and 256, 1 and 2 threads: the float32 PyTorch network of the same
  shape (``nn.Linear``/``nn.Conv2d``, batch norm, sign) against the integer network as a
  PyTorch program and in ONNX Runtime; plus ONNX Runtime's float32 on the float network
  where ``torch.onnx.export`` is available (needs ``onnxscript``), to tell the runtime's
  speed from the integer kernels'.

    python benchmarks/deploy_latency.py [--rounds 20] [--repeats 2] [--levels ternary]

Prints median milliseconds per call and the ratios float32 / integer (above 1: the integer
network is faster), once per repeat (timings on a shared machine drift between runs).
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import pyro
import torch
from step_time import interleaved_medians
from torch import nn

from pyro_bqn import levels as qlevels
from pyro_bqn.architectures import TORCH_LAYERS, Architecture
from pyro_bqn.deploy import integer_network
from pyro_bqn.deploy.artefacts import save_onnx, save_torch_program
from pyro_bqn.export import export_network
from pyro_bqn.infer import AutoQuantizedGuide
from pyro_bqn.models import QuantizedClassifier

ARCHITECTURES = {
    "mlp 784-512-256-10": Architecture("mlp", (784,), 10, (512, 256)),
    "cnn 20-50-500": Architecture("cnn", (1, 28, 28), 10, (20, 50, 500)),
}
# MNIST's normalisation (pyro_bqn.data): x = (code / 255 - mean) / std.
MEAN, STD = 0.1307, 0.3081
INPUT_CODES = (-MEAN / STD, 1 / 255 / STD)


class _Sign(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, 1.0, -1.0)


def float_network(network, architecture: Architecture) -> nn.Sequential:
    """The float32 PyTorch network of the same shape holding the network's level values
    (batch norm and sign as modules: what a float deployment runs)."""
    layers = TORCH_LAYERS.replace(activation=_Sign)
    net = nn.Sequential(*(module for _, module in architecture.layers(layers))).eval()
    values = {**network.buffers, **network.params, **network.weights()}
    state = {name: values[f"body.{name}"] for name in net.state_dict()}
    net.load_state_dict(state)
    return net


def random_network(architecture: Architecture, levels):
    """A random most probable network (the guide's initial posterior) with batch-norm
    statistics of its own on random normalised 8-bit inputs, and the model."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = QuantizedClassifier(architecture, levels, "sign")
    guide = AutoQuantizedGuide(model)
    codes = torch.randint(0, 256, (512, architecture.num_features))
    x = INPUT_CODES[0] + INPUT_CODES[1] * codes.float()
    network = export_network(model, guide, x[:2], batch_norm_data=x)
    return model, network, x


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _float_onnx(net: nn.Module, features: int, path: Path) -> bool:
    try:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            net,
            (torch.zeros(2, features),),
            str(path),
            input_names=["input"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    except Exception as error:  # onnxscript missing, or an exporter limitation
        print(f"  (no float32 ONNX baseline: {type(error).__name__}: {error})")
        return False
    return True


def _calls(floats, program, session, float_session, inputs) -> dict:
    """The networks to time, each a call on ``inputs``."""
    feed = {"input": inputs.numpy()}
    calls = {
        "float torch": lambda: floats(inputs),
        "int torch": lambda: program(inputs),
        "int ORT": lambda: session.run(None, feed),
    }
    if float_session is not None:
        calls["float ORT"] = lambda: float_session.run(None, feed)
    return calls


def measure(name: str, architecture: Architecture, level_name: str, args, folder: Path):
    model, network, x = random_network(architecture, qlevels.from_spec(level_name))
    codes = INPUT_CODES if architecture.kind == "mlp" else None
    deployed = integer_network(network, model, x[:2], codes)
    floats = float_network(network, architecture)
    features = architecture.num_features
    paths = {fmt: folder / f"{level_name}-{architecture.kind}.{fmt}" for fmt in ("pt2", "onnx")}
    save_torch_program(deployed, paths["pt2"], features)
    save_onnx(deployed, paths["onnx"], features)
    network.save(folder / "network.pt")
    buffer = io.BytesIO()
    torch.save(floats.state_dict(), buffer)
    weights = architecture.num_weights
    sizes = {
        "float32 weights": 4 * weights,
        "float32 state_dict file": buffer.tell(),
        "network.pt2 (torch, int8)": paths["pt2"].stat().st_size,
        "network.onnx (packed)": paths["onnx"].stat().st_size,
        "QuantizedNetwork file": (folder / "network.pt").stat().st_size,
    }
    print(f"\n## {name}, {level_name} weights ({weights} weights)\n")
    print("| file | bytes | float32 weights / file |\n|---|---:|---:|")
    for label, size in sizes.items():
        print(f"| {label} | {size} | {4 * weights / size:.1f}× |")
    with torch.no_grad():
        differ = (deployed(x).argmax(-1) != floats(x).argmax(-1)).sum().item()
    print(f"\nclasses where the float32 and the integer network differ: {differ} of {len(x)}")
    if level_name != args.latency_levels:
        return
    program = torch.export.load(str(paths["pt2"])).module()
    float_onnx = folder / "float.onnx"
    has_float_onnx = _float_onnx(floats, features, float_onnx)
    print(
        "\n| threads | batch | float32 torch | int torch | int ORT | float32 ORT | "
        "float32 torch / int torch | float32 torch / int ORT | float32 ORT / int ORT |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        session = _ort_session(paths["onnx"], threads)
        float_session = _ort_session(float_onnx, threads) if has_float_onnx else None
        for batch in (1, 256):
            inputs = x[:batch].contiguous()
            calls = _calls(floats, program, session, float_session, inputs)
            with torch.no_grad():
                ms = {k: v * 1e3 for k, v in interleaved_medians(calls, args.rounds).items()}
            float_ort = ms.get("float ORT", float("nan"))
            print(
                f"| {threads} | {batch} | {ms['float torch']:.3f} | {ms['int torch']:.3f} | "
                f"{ms['int ORT']:.3f} | {float_ort:.3f} | "
                f"{ms['float torch'] / ms['int torch']:.2f} | "
                f"{ms['float torch'] / ms['int ORT']:.2f} | {float_ort / ms['int ORT']:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="alternating timing blocks")
    parser.add_argument("--repeats", type=int, default=2, help="whole measurements")
    parser.add_argument(
        "--latency-levels", default="ternary", help="the level set whose latency is timed"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    for repeat in range(args.repeats):
        print(f"\n# repeat {repeat + 1}")
        with tempfile.TemporaryDirectory() as folder:
            for name, architecture in ARCHITECTURES.items():
                for level_name in ("binary", "ternary"):
                    measure(name, architecture, level_name, args, Path(folder))


if __name__ == "__main__":
    main()
