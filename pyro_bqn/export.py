"""The most probable network of a posterior, stored compactly with level indices packed
into bits, and run without the guide.

A :class:`QuantizedNetwork` holds one fixed network: for each quantized weight site the
index of its most probable level, packed ``ceil(log2 K)`` bits per weight; the level values
(learned ones as learned); the weights that keep full precision (the outliers of a
spike-and-slab posterior, whose slab outweighs every level) as a sparse list of positions and
values; each continuous site's posterior mean; and the model state needed to run it (the Pyro
parameters the model reads, such as batch-norm affine parameters, the temperature and
learnable levels, and the model's buffers, such as batch-norm running statistics).

**File format** (``QuantizedNetwork.save``): a checked payload file
(:mod:`pyro_bqn.payload_files`: ``torch.save`` of a plain dictionary, written atomically,
read back with ``torch.load(..., weights_only=True)`` and its checksum verified)::

    {
        "format": "pyro_bqn.QuantizedNetwork",
        "version": 2,
        "quantized": {site: {"packed": uint8 tensor (ceil(numel * bits / 8),),
                             "levels": float tensor (K,),
                             "shape": [int, ...],
                             # optional: full-precision weights, none if absent
                             "outlier_index": int32 tensor (n,),   # row-major positions
                             "outlier_values": float tensor (n,)}},
        "continuous": {site: float tensor},
        "params": {param name: tensor},      # unconstrained, as in the Pyro param store
        "buffers": {buffer name: tensor},    # as in the model's state_dict
        "batch_norm": "model" | "reestimated",
        "checksum": "sha256:<hex>",          # of everything above
    }

Version 1 (pyro_bqn before checksums) had no ``"checksum"``; it is refused with an error
that says so. The outlier entries were added to version 2 without a version change (files
without them read as before); a pyro_bqn from before them reads a file with outliers as if
it had none, i.e. with those weights at their nearest level.

``bits = max(1, ceil(log2 K))``. The weights are flattened in row-major order; each index is
written most significant bit first into one continuous bit stream, which is cut into bytes
(most significant bit first, the last byte zero-padded) — the layout of
``numpy.packbits(..., bitorder="big")`` applied to the stream. An outlier's packed index is
its nearest level's (so the packed stream alone is the network rounded to the levels), and
its stored value replaces that level. Positions are strictly increasing.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule

from pyro_bqn.atomic_files import PathLike
from pyro_bqn.checked_condition import CheckedConditionMessenger
from pyro_bqn.devices import module_device
from pyro_bqn.levels import check_levels
from pyro_bqn.live_tensors import buffers_of, copy_into, live_params, preserved
from pyro_bqn.nn.recalibrate import reestimate_batch_norm
from pyro_bqn.nn.training_mode import training_mode
from pyro_bqn.payload_files import load_payload, save_payload
from pyro_bqn.state_checks import check_fixed_levels, check_matching

__all__ = [
    "PackedSite",
    "QuantizedNetwork",
    "export_network",
    "index_bits",
    "pack_indices",
    "unpack_indices",
]

FILE_FORMAT = "pyro_bqn.QuantizedNetwork"
FILE_VERSION = 2
BATCH_NORM_SOURCES = ("model", "reestimated")

_T = TypeVar("_T")

# Bit weights of a byte, most significant first.
_BYTE_BITS = torch.arange(7, -1, -1)


def index_bits(num_levels: int) -> int:
    """Bits needed to store a level index among ``num_levels >= 2``: ``ceil(log2 K)``
    (1 for binary, 2 for ternary and 2-bit uniform, 3 for 5 to 8 levels)."""
    if num_levels < 2:
        raise ValueError(f"a level set has at least two levels, got {num_levels}")
    return (num_levels - 1).bit_length()


def _msb_first(bits: int) -> torch.Tensor:
    return torch.arange(bits - 1, -1, -1)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer indices below ``2 ** bits`` into bytes.

    :param indices: integer tensor of any shape, flattened in row-major order.
    :return: ``uint8`` tensor of shape ``(ceil(indices.numel() * bits / 8),)`` (layout in the
        module docstring).
    """
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    flat = indices.reshape(-1).to("cpu", torch.int64)  # packed bytes live on the host
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(
            f"indices must lie in [0, {2**bits}) to fit {bits} bits, got range "
            f"[{flat.min().item()}, {flat.max().item()}]"
        )
    stream = ((flat.unsqueeze(-1) >> _msb_first(bits)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    return (stream.view(-1, 8) << _BYTE_BITS).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: the first ``count`` indices, ``int64`` ``(count,)``.

    :raises ValueError: if ``packed`` is not a ``uint8`` tensor of shape
        ``(ceil(count * bits / 8),)``.
    """
    expected = (math.ceil(count * bits / 8),)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(
            f"packed indices must be a uint8 tensor of shape {expected} for {count} indices of "
            f"{bits} bits, got {packed.dtype} {tuple(packed.shape)}"
        )
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> _BYTE_BITS) & 1).reshape(-1)
    return (stream[: count * bits].view(count, bits) << _msb_first(bits)).sum(-1)


def _position_dtype(numel: int) -> torch.dtype:
    """The dtype of the outlier positions of a weight with ``numel`` entries: ``int32`` (the
    file format's) where ``numel`` fits in it, else ``int64``."""
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def _no_outliers() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int32)


@dataclass(frozen=True, eq=False)
class PackedSite:
    """One quantized weight site stored as packed level indices, plus the weights that keep
    full precision.

    :param packed: ``uint8`` ``(ceil(numel * bits / 8),)``, see :func:`pack_indices`.
    :param levels: the level values ``(K,)``, strictly increasing.
    :param shape: the weight's shape.
    :param outlier_index: row-major positions of the full-precision weights, an integer
        tensor ``(n,)``, strictly increasing (default: none).
    :param outlier_values: their values, ``(n,)``, finite, of the levels' dtype.
    :raises ValueError: if the parts are inconsistent or an index is not below ``K``.
    """

    packed: torch.Tensor
    levels: torch.Tensor
    shape: torch.Size
    outlier_index: torch.Tensor = field(default_factory=_no_outliers)
    outlier_values: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        check_levels(self.levels)
        if self.outlier_values is None:
            object.__setattr__(self, "outlier_values", self.levels.new_zeros(0))
        self._check_outliers()
        # Unpacking checks the packed tensor's dtype and length; a K that is not a power of
        # two leaves index codes >= K unused, and a corrupted file may hold them.
        largest = self.indices().max() if self.numel else 0
        if largest >= self.num_levels:
            raise ValueError(
                f"a packed index is {int(largest)}, but there are only {self.num_levels} levels"
            )

    def _check_outliers(self) -> None:
        index, values = self.outlier_index, self.outlier_values
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError("outlier_index must be an int32 or int64 tensor")
        if not isinstance(values, torch.Tensor) or values.dtype != self.levels.dtype:
            raise ValueError(f"outlier_values must be a tensor of the levels' {self.levels.dtype}")
        if index.dim() != 1 or values.shape != index.shape:
            raise ValueError(
                f"outlier_index and outlier_values must have one shape (n,), got "
                f"{tuple(index.shape)} and {tuple(values.shape)}"
            )
        if index.numel() and (
            index[0] < 0 or index[-1] >= self.numel or (index[1:] <= index[:-1]).any()
        ):
            raise ValueError(
                f"outlier_index must be strictly increasing positions in [0, {self.numel})"
            )
        if not torch.isfinite(values).all():
            raise ValueError("outlier_values must be finite")

    @classmethod
    def from_indices(cls, indices: torch.Tensor, levels: torch.Tensor) -> PackedSite:
        """Pack ``indices`` (integer, the weight's shape) of the levels ``levels`` ``(K,)``."""
        bits = index_bits(levels.shape[0])
        return cls(pack_indices(indices, bits), levels, indices.shape)

    @classmethod
    def from_weights(cls, weights: torch.Tensor, levels: torch.Tensor) -> PackedSite:
        """Store ``weights`` (any shape): the entries equal to a level as its index, the
        others as full-precision outliers (packed as their nearest level's index)."""
        flat = weights.detach().reshape(-1).to(levels.dtype)
        matches = flat.unsqueeze(-1) == levels
        on_level = matches.any(-1)
        thresholds = 0.5 * (levels[1:] + levels[:-1])
        nearest = torch.bucketize(flat, thresholds, right=True)
        indices = torch.where(on_level, matches.to(torch.int64).argmax(-1), nearest)
        position = (~on_level).nonzero().squeeze(-1)
        bits = index_bits(levels.shape[0])
        return cls(
            pack_indices(indices, bits),
            levels,
            weights.shape,
            outlier_index=position.to(_position_dtype(flat.numel())),
            outlier_values=flat[position].clone(),
        )

    @property
    def num_levels(self) -> int:
        """``K``."""
        return self.levels.shape[0]

    @property
    def bits(self) -> int:
        """Bits per weight, ``ceil(log2 K)``."""
        return index_bits(self.num_levels)

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.shape.numel()

    @property
    def num_outliers(self) -> int:
        """Number of full-precision weights."""
        return self.outlier_index.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the packed indices, ``ceil(numel * bits / 8)``."""
        return self.packed.numel()

    @property
    def outlier_nbytes(self) -> int:
        """Bytes of the full-precision weights: their positions and values."""
        return sum(t.numel() * t.element_size() for t in (self.outlier_index, self.outlier_values))

    def indices(self) -> torch.Tensor:
        """Level indices, ``int64`` of the weight's shape (an outlier's nearest level)."""
        return unpack_indices(self.packed, self.bits, self.numel).view(self.shape)

    def values(self) -> torch.Tensor:
        """The weights, the weight's shape and the levels' dtype: level values, and the
        outliers' own values."""
        values = self.levels[self.indices()].reshape(-1)
        values[self.outlier_index.long()] = self.outlier_values
        return values.view(self.shape)


@dataclass(eq=False)
class QuantizedNetwork:
    """One fixed network of a model: packed quantized weights plus the state to run it.

    Build it with :func:`export_network`; :meth:`save` and :meth:`load` round-trip it
    exactly.

    :param quantized: ``{site: PackedSite}`` of the quantized weight sites.
    :param continuous: ``{site: tensor}`` of real-valued sites (e.g. biases).
    :param params: ``{name: tensor}``, the unconstrained values of the Pyro params the model
        reads (batch-norm affine parameters, temperature, ...).
    :param buffers: ``{name: tensor}``, the model's buffers (batch-norm running statistics,
        level values), named as in its ``state_dict``.
    :param batch_norm: where the running statistics in ``buffers`` come from: ``"model"``
        (the model's, gathered in moment mode) or ``"reestimated"`` (this network's own,
        see :func:`~pyro_bqn.nn.recalibrate.reestimate_batch_norm`).
    """

    quantized: dict[str, PackedSite]
    continuous: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_norm: str = "model"

    def __post_init__(self) -> None:
        if self.batch_norm not in BATCH_NORM_SOURCES:
            raise ValueError(
                f"batch_norm must be one of {BATCH_NORM_SOURCES}, got {self.batch_norm!r}"
            )
        both = sorted(set(self.quantized) & set(self.continuous))
        if both:
            raise ValueError(f"site '{both[0]}' is given both as quantized and as continuous")

    def weights(self) -> dict[str, torch.Tensor]:
        """``{site: value}`` for every site: unpacked level values for quantized sites,
        the stored tensors for continuous ones — ready for ``poutine.condition``."""
        unpacked = {name: site.values() for name, site in self.quantized.items()}
        return {**unpacked, **self.continuous}

    def bits_per_weight(self) -> dict[str, int]:
        """``{site: bits}`` of each quantized site."""
        return {name: site.bits for name, site in self.quantized.items()}

    def size_bytes(self) -> int:
        """Bytes of stored data: packed indices, level values, full-precision outliers
        (positions and values), continuous sites, params and buffers (the file adds a small,
        fixed container overhead)."""
        tensors = [
            t
            for site in self.quantized.values()
            for t in (site.packed, site.levels, site.outlier_index, site.outlier_values)
        ]
        for group in (self.continuous, self.params, self.buffers):
            tensors += list(group.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def distribution(
        self, model: Callable[..., Any], *args: Any, site: str = "obs", **kwargs: Any
    ) -> TorchDistribution:
        """The distribution of sample site ``site`` when ``model(*args, **kwargs)`` runs
        this network in evaluation mode, without gradients.

        For the run the network's weights condition the model, and its params and buffers
        are copied into the model's (which must have the same names, shapes and dtypes); the
        model's own values are restored afterwards, so ``model`` may be the trained model or
        a fresh instance of the same architecture.

        :raises ValueError: naming the site, parameter or buffer where network and model
            differ, also where the model is declared with other fixed levels (naming both
            level sets).
        """
        # A deep copy, taken during the run: the distribution may hold the model's own
        # tensors (e.g. a noise parameter), which are restored when the run ends.
        return self._read(model, args, kwargs, copy.deepcopy, site)

    def run(
        self, model: Callable[..., Any], *args: Any, site: str = "obs", **kwargs: Any
    ) -> torch.Tensor:
        """The probabilities (``probs``) of the observed site's distribution under this
        network, e.g. class probabilities ``(N, C)`` for a
        :class:`~pyro_bqn.models.QuantizedMLP` called as ``run(model, x)``. See
        :meth:`distribution`.
        """

        def probs(fn: TorchDistribution) -> torch.Tensor:
            if not hasattr(fn, "probs"):
                raise ValueError(
                    f"site '{site}' has a {type(fn).__name__} distribution without probs; "
                    "use distribution() instead"
                )
            return fn.probs.clone()

        return self._read(model, args, kwargs, probs, site)

    def _read(
        self,
        model: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        read: Callable[[TorchDistribution], _T],
        site: str,
    ) -> _T:
        """Run the model on this network and return ``read(distribution of site)``."""
        with self.loaded_into(model, *args, **kwargs) as conditioned:
            trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
            if site not in trace.nodes or trace.nodes[site]["type"] != "sample":
                sites = [name for name, node in trace.nodes.items() if node["type"] == "sample"]
                raise ValueError(
                    f"the model has no sample site '{site}'; its sample sites: {sites}"
                )
            return read(trace.nodes[site]["fn"])

    @contextmanager
    def loaded_into(
        self, model: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Iterator[Callable[..., Any]]:
        """Within the block, ``model`` holds this network's params and buffers and runs in
        evaluation mode without gradients; the block receives the model conditioned on the
        network's weights. ``model(*args, **kwargs)`` is run once first (example inputs) to
        find the Pyro params it reads. Afterwards the model's own values and training flags
        are restored.

        :raises ValueError: as :meth:`distribution`, where network and model differ.
        """
        device = module_device(model)  # the stored weights go where the model runs
        weights = {k: w if device is None else w.to(device) for k, w in self.weights().items()}
        conditioned = CheckedConditionMessenger(weights)(model)
        with torch.no_grad(), training_mode(model, False):
            params = live_params(conditioned, *args, **kwargs)
            own = _own_parameters(model, params)
            buffers = buffers_of(model)
            check_matching(params, self.params, "parameter", "the network")
            check_matching(buffers, self.buffers, "buffer", "the network")
            check_fixed_levels(model, self.buffers, "buffer", "the network")
            with preserved(params), preserved(own), preserved(buffers):
                copy_into(params, self.params)
                copy_into(own, self.params)
                copy_into(buffers, self.buffers)
                yield conditioned

    def save(self, path: PathLike) -> None:
        """Write the network to ``path`` (format in the module docstring), atomically: an
        interrupted save leaves the previous file at ``path`` as it was."""
        quantized = {}
        for name, site in self.quantized.items():
            entry = {"packed": site.packed, "levels": site.levels, "shape": list(site.shape)}
            if site.num_outliers:
                entry["outlier_index"] = site.outlier_index
                entry["outlier_values"] = site.outlier_values
            quantized[name] = entry
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "quantized": quantized,
            "continuous": self.continuous,
            "params": self.params,
            "buffers": self.buffers,
            "batch_norm": self.batch_norm,
        }
        save_payload(path, payload)

    @classmethod
    def load(cls, path: PathLike) -> QuantizedNetwork:
        """Read a network written by :meth:`save`, verifying its checksum.

        :raises FileNotFoundError: if ``path`` does not exist.
        :raises ValueError: naming ``path`` (and the site, for a damaged one), if the file
            cannot be read, is not a network file, is corrupt (damaged or truncated) or of
            another version.
        """
        payload = load_payload(
            path, FILE_FORMAT, FILE_VERSION, tensor_groups=("continuous", "params", "buffers")
        )
        damaged = f"{os.fspath(path)!r} holds a damaged network"
        quantized = {}
        try:
            for name, entry in payload["quantized"].items():
                try:
                    outliers = {
                        key: entry[key]
                        for key in ("outlier_index", "outlier_values")
                        if key in entry
                    }
                    quantized[name] = PackedSite(
                        entry["packed"], entry["levels"], entry["shape"], **outliers
                    )
                except (KeyError, TypeError, ValueError) as error:
                    raise ValueError(f"{damaged}: site '{name}': {error}") from error
        except AttributeError as error:  # "quantized" is not a dictionary
            raise ValueError(f"{damaged}: {error}") from error
        try:
            return cls(
                quantized=quantized,
                continuous=payload["continuous"],
                params=payload["params"],
                buffers=payload["buffers"],
                batch_norm=payload.get("batch_norm"),
            )
        except ValueError as error:
            raise ValueError(f"{damaged}: {error}") from error


def _own_parameters(model: Any, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{Pyro param name: nn.Parameter}`` of the plain ``nn.Parameter`` s of ``model``'s
    PyroModules (e.g. a batch norm's ``weight`` and ``bias``) that the run reads under a
    name of ``params`` but that are not the param store's tensor of that name.

    A PyroModule computes with its own ``nn.Parameter`` and only *registers* it in the param
    store; where the store already holds the name (another instance's tensor, such as the
    trained model's beside a fresh one), the store's tensor is not the one the module reads.
    (PyroParams, in contrast, read the store.) ``{}`` for a plain callable.
    """
    if not isinstance(model, PyroModule):
        return {}
    own = {}
    for module in model.modules():
        if not isinstance(module, PyroModule):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            # The Pyro name, as PyroModule.__getattr__ registers it (pyro 1.9).
            fullname = module._pyro_get_fullname(name)
            if fullname in params and params[fullname] is not parameter:
                own[fullname] = parameter
    return own


def export_network(
    model: Callable[..., Any],
    guide: Any,
    *args: Any,
    batch_norm_data: torch.Tensor | None = None,
    batch_size: int = 256,
    **kwargs: Any,
) -> QuantizedNetwork:
    """The most probable network of ``guide``'s posterior, with the model state to run it.

    Each quantized site keeps its weights in ``guide.median()``: the index of each weight's
    most probable level and, for a spike-and-slab posterior, the full-precision value of each
    weight whose slab outweighs every level (a sparse list, counted by
    :meth:`QuantizedNetwork.size_bytes`); each continuous site its posterior mean. Learnable
    levels are stored as learned (and, as Pyro params the model reads, in ``params``).
    ``model(*args, **kwargs)`` is run once in evaluation mode (example inputs, e.g. a small
    batch) to find the Pyro params the model reads, whose current values are stored.

    **Batch-norm statistics.** By default the network keeps the model's running statistics,
    gathered in moment mode, which describe the moment network rather than this one. Pass
    ``batch_norm_data`` (inputs ``(N, ...)``, e.g. training inputs) to store the network's
    own, re-estimated with :func:`~pyro_bqn.nn.recalibrate.reestimate_batch_norm`. They are
    stored in the network only: the model's statistics are restored afterwards, so the
    model is unchanged.

    :param model: the model (e.g. a :class:`~pyro_bqn.models.QuantizedMLP`).
    :param guide: its trained :class:`~pyro_bqn.infer.AutoQuantizedGuide` (anything with
        ``quantized_sites``, ``exact_posterior(name)`` and ``median()``).
    :param batch_size: batch size of the re-estimation passes.
    """
    median = guide.median(*args, **kwargs)
    quantized = {}
    for name in guide.quantized_sites:
        levels = guide.exact_posterior(name).levels.detach().clone()
        quantized[name] = PackedSite.from_weights(median[name], levels)
    continuous = {
        name: value.detach().clone() for name, value in median.items() if name not in quantized
    }
    with training_mode(model, False):
        params = live_params(CheckedConditionMessenger(median)(model), *args, **kwargs)
    buffers = buffers_of(model)
    with preserved(buffers):
        if batch_norm_data is not None:
            reestimate_batch_norm(model, median, batch_norm_data, batch_size=batch_size)
        network_buffers = {name: buffer.clone() for name, buffer in buffers.items()}
    return QuantizedNetwork(
        quantized=quantized,
        continuous=continuous,
        params={name: param.detach().clone() for name, param in params.items()},
        buffers=network_buffers,
        batch_norm="model" if batch_norm_data is None else "reestimated",
    )
