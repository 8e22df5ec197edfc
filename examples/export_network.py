"""Export the most probable network of a trained posterior and run it without the guide.

A ternary MLP is trained on 8x8 digits; `pyro_bqn.export_network` keeps, for every weight,
the index of its most probable level packed into 2 bits, with the batch-norm statistics
re-estimated for this fixed network; the file is saved, loaded back and run with
`QuantizedNetwork.run`. Its accuracy is compared with the Bayesian predictive's, and its
size with that of the same weights in float32.

Run: `python examples/export_network.py [--epochs 20] [--figures DIR]`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure

import pyro_bqn
from pyro_bqn.data import load_digits
from pyro_bqn.diagnostics import accuracy, save_figure


def level_counts_figure(network: pyro_bqn.QuantizedNetwork) -> Figure:
    """A bar chart of how many weights of each layer sit on each level."""
    fig = Figure(figsize=(5.5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    weights = {site: packed.values() for site, packed in network.quantized.items()}
    width = 0.8 / len(weights)
    for i, (site, w) in enumerate(weights.items()):
        levels, counts = w.unique(return_counts=True)
        shares = (counts / w.numel()).tolist()
        positions = [j + i * width for j in range(len(levels))]
        ax.bar(positions, shares, width, label=f"{site} ({w.numel()} weights)")
        ax.set_xticks([j + width * (len(weights) - 1) / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"{v:g}" for v in levels.tolist()])
    ax.set_xlabel("level")
    ax.set_ylabel("share of the layer's weights")
    ax.set_title("Exported ternary network")
    ax.margins(y=0.25)  # room above the bars for the legend
    ax.legend(loc="upper right")
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--figures", type=Path, help="directory for the PNG figures")
    args = parser.parse_args()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = load_digits()
    model = pyro_bqn.QuantizedMLP([data.num_features, 128, data.num_classes])
    guide = pyro_bqn.AutoQuantizedGuide(model)
    pyro_bqn.fit(
        model, guide, data.x_train, data.y_train, epochs=args.epochs, kl_weight=1e-2, progress=False
    )

    network = pyro_bqn.export_network(model, guide, data.x_train[:8], batch_norm_data=data.x_train)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "digits.pt"
        network.save(path)
        file_bytes = path.stat().st_size
        loaded = pyro_bqn.QuantizedNetwork.load(path)

    probs = loaded.run(model, data.x_test)  # the fixed network, no guide, no sampling
    bayes = pyro_bqn.predict(model, guide, data.x_test)
    agree = (probs.argmax(-1) == bayes.argmax(-1)).float().mean()
    num_weights = sum(site.values().numel() for site in loaded.quantized.values())
    print(f"bits per weight: {loaded.bits_per_weight()}")
    print(
        f"stored data: {loaded.size_bytes()} bytes ({file_bytes} bytes on disk); the same "
        f"{num_weights} weights in float32: {4 * num_weights} bytes"
    )
    print(
        f"test accuracy: exported network {accuracy(probs, data.y_test):.3f}, "
        f"Bayesian predictive {accuracy(bayes, data.y_test):.3f}; "
        f"same predicted class for {agree:.1%} of the test images"
    )
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))

    if args.figures:
        save_figure(level_counts_figure(loaded), args.figures / "export_levels.png")


if __name__ == "__main__":
    main()
