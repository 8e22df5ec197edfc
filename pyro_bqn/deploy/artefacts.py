"""Deployable files of the most probable network, written atomically, with a size report.

* ``torch``: a :func:`torch.export.export` program saved with :func:`torch.export.save`
  (``network.pt2``); ``torch.export.load(path).module()(x)`` runs it with torch alone. It
  is torch's supported format for a standalone program (TorchScript is deprecated), keeps
  the integer operations (``_int_mm``) as they are, and has a dynamic batch dimension.
  Its weights are ``int8``: four times smaller than float32.
* ``onnx``: the ONNX graph of :mod:`pyro_bqn.deploy.onnx_graph` (``network.onnx``),
  weights packed ``b`` bits each, for ONNX Runtime.

Both take float inputs ``(N, D)`` as the model does and return logits ``(N, C)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyro_bqn.atomic_files import PathLike, write_bytes, write_text, write_with
from pyro_bqn.data import Dataset
from pyro_bqn.deploy.integer_network import integer_network
from pyro_bqn.deploy.onnx_graph import onnx_model
from pyro_bqn.export import QuantizedNetwork

__all__ = [
    "FILE_NAMES",
    "FORMATS",
    "input_codes_of",
    "save_deployable",
    "save_onnx",
    "save_torch_program",
    "size_report",
]

#: The deployable formats.
FORMATS = ("torch", "onnx")
#: The file each format is written to, in the output folder.
FILE_NAMES = {"torch": "network.pt2", "onnx": "network.onnx"}


def save_torch_program(network: nn.Module, path: PathLike, num_features: int) -> None:
    """Export ``network`` (float ``(N, num_features)`` to logits) with a dynamic batch
    dimension and save the program to ``path``, atomically."""
    example = torch.zeros(2, num_features)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    write_with(path, lambda handle: torch.export.save(program, handle))


def save_onnx(network: nn.Sequential, path: PathLike, num_features: int) -> None:
    """Write the ONNX model of ``network`` to ``path``, atomically."""
    write_bytes(path, onnx_model(network, num_features).SerializeToString())


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def save_deployable(
    network: QuantizedNetwork,
    model: nn.Module,
    example: torch.Tensor,
    folder: PathLike,
    format: str,
    input_codes: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Write the deployable network of ``network`` (see :func:`integer_network` for
    ``model``, ``example`` and ``input_codes``) to ``folder/FILE_NAMES[format]``, and its
    size report to ``folder/deployment_<format>.json`` and ``.md``, atomically.

    :returns: the size report: the file and its bytes, the number of weights, their
        float32 bytes and the ratio of the two.
    :raises ValueError: for an unknown ``format`` or a folder that does not exist (before
        any work), or as :func:`integer_network`.
    """
    _check_format(format)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} is not an existing directory")
    deployed = integer_network(network, model, example, input_codes)
    num_features = math.prod(example.shape[1:])
    path = folder / FILE_NAMES[format]
    if format == "torch":
        save_torch_program(deployed, path, num_features)
    else:
        save_onnx(deployed, path, num_features)
    report = size_report(network, path, format)
    write_text(folder / f"deployment_{format}.json", json.dumps(report, indent=2) + "\n")
    write_text(folder / f"deployment_{format}.md", size_markdown(report))
    return report


def input_codes_of(data: Dataset) -> tuple[float, float] | None:
    """``(offset, step)`` of the 8-bit codes of ``data``'s inputs (``x = offset + step *
    code``): for images normalised with one mean and deviation from raw values up to 255;
    ``None`` for tables."""
    if data.mean.numel() != 1 or len(data.input_shape) != 3 or 1 / data.raw_scale > 255.5:
        return None
    mean, std = float(data.mean), float(data.std)
    return -mean / std, data.raw_scale / std


def size_report(network: QuantizedNetwork, path: Path, format: str) -> dict[str, Any]:
    """Sizes of the deployable file ``path`` against the float32 weights of ``network``."""
    weights = sum(site.numel for site in network.quantized.values())
    file_bytes = path.stat().st_size
    return {
        "format": format,
        "file": path.name,
        "file_bytes": file_bytes,
        "weights": weights,
        "bits_per_weight": network.bits_per_weight(),
        "float32_weight_bytes": 4 * weights,
        "float32_over_file": round(4 * weights / file_bytes, 2),
    }


def size_markdown(report: dict[str, Any]) -> str:
    """The size report as a Markdown table."""
    return (
        f"# Deployable network ({report['format']})\n\n"
        "| file | bytes | weights | float32 weight bytes | float32 / file |\n"
        "|---|---:|---:|---:|---:|\n"
        f"| {report['file']} | {report['file_bytes']} | {report['weights']} | "
        f"{report['float32_weight_bytes']} | {report['float32_over_file']}× |\n"
    )
