"""ArviZ ``InferenceData`` from a model and its :class:`~pyro_bqn.infer.AutoQuantizedGuide`.

``az.from_pyro`` accepts MCMC runs only, so the groups are built here and assembled with
``az.from_dict``. Discrete networks are drawn from the guide's exact categorical posterior
(never a relaxed one) and the model is run on each under a fixed weight assignment, which
gives posterior draws, pointwise log-likelihoods and posterior-predictive samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyro_bqn.devices import move_to, resolve_device
from pyro_bqn.infer.auto_quantized_guide import AutoQuantizedGuide
from pyro_bqn.nn.training_mode import training_mode

if TYPE_CHECKING:
    import arviz as az

__all__ = ["DEFAULT_MAX_BYTES", "METHOD", "to_inference_data"]

#: Default size limit of the ``posterior`` (and ``constant_data``) groups, in bytes.
DEFAULT_MAX_BYTES = 100_000_000

#: The ``method`` attribute written on every group.
METHOD = (
    "variational inference with a mean-field categorical posterior over levels "
    "(AutoQuantizedGuide, typically fitted sampling-free with DeterministicELBO); draws are "
    "independent samples from that variational posterior, not MCMC"
)

# Axis names of a weight tensor (and of its bias) by the layer that owns it, keyed by an
# attribute only that kind of layer has.
_LAYER_AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "in_features": {
        "weight": ("out_features", "in_features"),
        "bias": ("out_features",),
    },
    "in_channels": {
        "weight": ("out_channels", "in_channels", "kernel_height", "kernel_width"),
        "bias": ("out_channels",),
    },
}

_MB = 1e6


def _site_dims(model: Any, name: str, shape: torch.Size) -> list[str]:
    """Dimension names of site ``name`` (shape ``shape``): ``"<layer>.<axis>"`` for the
    weight and bias of a linear or convolutional layer, so that a layer's weight and bias
    share their output axis; ``"<site>_dim_<i>"`` otherwise."""
    generic = [f"{name}_dim_{i}" for i in range(len(shape))]
    layer_path, _, attr = name.rpartition(".")
    if not layer_path or not isinstance(model, torch.nn.Module):
        return generic
    try:
        layer = attrgetter(layer_path)(model)
    except AttributeError:
        return generic
    for marker, axes_by_attr in _LAYER_AXES.items():
        axes = axes_by_attr.get(attr)
        if hasattr(layer, marker) and axes is not None and len(axes) == len(shape):
            axes = list(axes)
            # A grouped convolution's weight holds in_channels / groups input channels.
            if marker == "in_channels" and attr == "weight" and shape[1] != layer.in_channels:
                axes[1] = "in_channels_per_group"
            return [f"{layer_path}.{axis}" for axis in axes]
    return generic


def _site_bytes(guide: AutoQuantizedGuide, name: str, value: torch.Tensor, num_draws: int) -> int:
    """Bytes the draws of site ``name`` take, plus its ``(*shape, K)`` exact probabilities
    for a quantized site."""
    size = num_draws * value.numel() * value.element_size()
    if name in guide.quantized_sites:
        num_levels = guide.exact_posterior(name).num_levels
        size += value.numel() * num_levels * value.element_size()
    return size


def _select_sites(
    sizes: dict[str, int], sites: Sequence[str] | None, max_bytes: int, num_draws: int
) -> tuple[list[str], list[str]]:
    """The sites to store and the sites left out, both in model order."""
    if sites is not None:
        unknown = [name for name in sites if name not in sizes]
        if unknown:
            raise ValueError(
                f"sites {unknown} are not latent sites of the guide; its sites: {list(sizes)}"
            )
        selected = [name for name in sizes if name in set(sites)]
        total = sum(sizes[name] for name in selected)
        if total > max_bytes:
            listing = ", ".join(f"{name} {sizes[name] / _MB:.4g} MB" for name in selected)
            raise ValueError(
                f"the posterior of {num_draws} draws would take {total / _MB:.4g} MB "
                f"({listing}), more than max_bytes={max_bytes / _MB:.4g} MB; select fewer "
                f"sites with sites=[...], draw fewer samples, or raise max_bytes"
            )
        return selected, [name for name in sizes if name not in selected]
    # Smallest first: a large first layer is left out rather than every site after it.
    chosen: set[str] = set()
    total = 0
    for name in sorted(sizes, key=sizes.__getitem__):
        if total + sizes[name] <= max_bytes:
            chosen.add(name)
            total += sizes[name]
    return [n for n in sizes if n in chosen], [n for n in sizes if n not in chosen]


def _observation_dims(site: dict[str, Any], shape: torch.Size, obs_site: str) -> list[str]:
    """Names of the observed value's dimensions: a plate's name where a plate covers the
    dimension (e.g. ``"data"``), ``"<obs_site>_dim_<i>"`` otherwise."""
    batch_ndim = len(site["fn"].batch_shape)
    plates = {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.vectorized}
    return [
        plates.get(i - batch_ndim, f"{obs_site}_dim_{i}")
        if i < batch_ndim
        else f"{obs_site}_dim_{i}"
        for i in range(len(shape))
    ]


def _numpy_dtype(value: torch.Tensor) -> np.dtype:
    return torch.empty((), dtype=value.dtype).numpy().dtype


def _draw_seeds(seed: int, start: int, stop: int) -> list[int]:
    """One torch seed per draw index, so a draw does not depend on how draws are chunked."""
    return [
        int(np.random.SeedSequence(seed, spawn_key=(i,)).generate_state(1, np.uint64)[0])
        for i in range(start, stop)
    ]


def _run_network(
    model: Any,
    guide: AutoQuantizedGuide,
    latent: list[str],
    obs_site: str,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Draw one discrete network from the guide's exact posterior and run ``model`` on it.

    :returns: the drawn ``{site: value}`` and the trace node of ``obs_site``.
    """
    # exact_posterior, not guide(): a guide with a temperature would draw relaxed weights.
    network = {name: guide.exact_posterior(name).sample() for name in latent}
    trace = poutine.trace(poutine.condition(model, data=network)).get_trace(x, y)
    if obs_site not in trace.nodes or trace.nodes[obs_site]["type"] != "sample":
        sample_sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        raise ValueError(
            f"obs_site '{obs_site}' is not a sample site of the model; its sample sites: "
            f"{sample_sites}"
        )
    node = trace.nodes[obs_site]
    if not node["is_observed"]:
        raise ValueError(f"obs_site '{obs_site}' is not observed: pass its data as y")
    return network, node


def _draw_networks(
    model: Any,
    guide: AutoQuantizedGuide,
    prototype: dict[str, torch.Tensor],
    stored: list[str],
    obs_site: str,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    num_draws: int,
    chunk_size: int,
    progress: bool | None,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw ``num_draws`` networks, chunk by chunk, and run the model on each.

    :returns: the draws of the ``stored`` sites ``{name: (num_draws, *shape)}``, the
        pointwise log-likelihoods and the predictive samples ``(num_draws, *N)``, and the
        observed site's trace node of the last draw.
    """
    posterior = {
        name: np.empty((num_draws, *prototype[name].shape), _numpy_dtype(prototype[name]))
        for name in stored
    }
    log_lik = predictive = obs_node = None
    with tqdm(
        total=num_draws, desc="drawing networks", disable=None if progress is None else not progress
    ) as bar:
        for start in range(0, num_draws, chunk_size):
            stop = min(start + chunk_size, num_draws)
            chunk: dict[str, list[torch.Tensor]] = {name: [] for name in stored}
            log_liks, samples = [], []
            for draw_seed in _draw_seeds(seed, start, stop):
                # All devices' generators: the draws happen where the guide's logits are.
                torch.manual_seed(draw_seed)
                network, obs_node = _run_network(model, guide, list(prototype), obs_site, x, y)
                for name in stored:
                    chunk[name].append(network[name])
                log_liks.append(obs_node["fn"].log_prob(obs_node["value"]))
                samples.append(obs_node["fn"].sample())
            if log_lik is None:  # the observed site's shapes are known after the first draw
                # float64: ArviZ's Pareto smoothing of float32 log-likelihoods that differ
                # only in their last bits (confident predictions) returns NaN weights.
                log_lik = np.empty((num_draws, *log_liks[0].shape), np.float64)
                predictive = np.empty((num_draws, *samples[0].shape), _numpy_dtype(samples[0]))
            for name, values in chunk.items():
                posterior[name][start:stop] = torch.stack(values).cpu().numpy()
            log_lik[start:stop] = torch.stack(log_liks).cpu().numpy()
            predictive[start:stop] = torch.stack(samples).cpu().numpy()
            bar.update(stop - start)
    return posterior, log_lik, predictive, obs_node


def to_inference_data(
    model: Any,
    guide: AutoQuantizedGuide,
    x: torch.Tensor,
    y: torch.Tensor,
    num_samples: int = 200,
    sites: Sequence[str] | None = None,
    num_chains: int = 1,
    chunk_size: int = 50,
    max_bytes: int = DEFAULT_MAX_BYTES,
    seed: int | None = None,
    obs_site: str = "obs",
    progress: bool | None = None,
    device: str | torch.device | None = None,
) -> az.InferenceData:
    """Draw discrete networks from ``guide`` and collect them as ArviZ ``InferenceData``.

    Each draw samples every latent site from the guide's exact posterior (a level per
    quantized weight, a Normal value per continuous site such as a bias), runs ``model(x, y)``
    on that network in evaluation mode (batch norm on running statistics) without
    gradients, and records the observed site's pointwise ``log_prob(y)`` and a sample from
    it. ``S = num_chains * num_samples`` draws in all; the draws are independent, so the
    chains are arbitrary splits of them, useful only to let ArviZ compute ``r_hat``.

    Groups (``N`` = the observed site's shape, e.g. ``(N,)`` under a ``"data"`` plate):

    * ``posterior`` — one variable per stored site, values are level values, shape
      ``(chain, draw, *site_shape)``. A layer's weight and bias have named dims, e.g.
      ``fc.weight``: ``("fc.out_features", "fc.in_features")``, ``fc.bias``:
      ``("fc.out_features",)``; other sites ``"<site>_dim_<i>"``.
    * ``constant_data`` — for each stored quantized site, ``"<site>.probs"``: the exact
      posterior probabilities, shape ``(*site_shape, K)``, the last dim ``"<site>.level"``
      with the level values as its coordinate.
    * ``log_likelihood`` — ``obs_site``: ``log p(y_n | network)``, shape ``(chain, draw, *N)``.
    * ``posterior_predictive`` — ``obs_site``: one sampled ``y`` per draw, shape
      ``(chain, draw, *N)``.
    * ``observed_data`` — ``obs_site``: ``y``.

    Observation dims are named after their plates (``"data"`` in the usual model). Every
    group's attrs name the library, the method (:data:`METHOD`), the seed and any
    ``omitted_sites``.

    Which sites are stored: with ``sites=None``, every latent site whose draws fit into
    ``max_bytes``, adding the smallest first, so that a large layer is left out (with a
    warning, and named in the ``omitted_sites`` attribute) rather than the call failing.
    With ``sites`` given, exactly those, and a request larger than ``max_bytes`` raises
    :class:`ValueError`. The size counted is the ``posterior`` and ``constant_data``
    groups; ``log_likelihood`` and ``posterior_predictive`` add ``S * prod(N)`` values each.
    ``az.loo`` and ``az.compare`` need a ``posterior`` group: when no site is stored, call
    ``az.loo(idata, reff=1.0)`` (exact: the draws are independent).

    Example::

        >>> import torch
        >>> from pyro_bqn import AutoQuantizedGuide, QuantizedMLP, to_inference_data
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> model = QuantizedMLP((4, 8, 3)); guide = AutoQuantizedGuide(model)
        >>> idata = to_inference_data(model, guide, x, y, num_samples=10, seed=0, progress=False)
        >>> idata.log_likelihood["obs"].shape
        (1, 10, 6)

    **References**

    [1] *ArviZ a unified library for exploratory analysis of Bayesian models in Python*,
        R. Kumar, C. Carroll, A. Hartikainen, O. Martin (JOSS 2019)
    [2] *Practical Bayesian model evaluation using leave-one-out cross-validation and WAIC*,
        A. Vehtari, A. Gelman, J. Gabry (Statistics and Computing 2017)

    :param model: the Pyro model, called as ``model(x, y)``.
    :param guide: its trained :class:`~pyro_bqn.infer.AutoQuantizedGuide`.
    :param x: inputs, e.g. shape ``(N, D)``.
    :param y: observations of ``obs_site``, e.g. labels of shape ``(N,)``. For PSIS-LOO pass
        the data the guide was trained on (see the docs: LOO on held-out data is not LOO).
    :param num_samples: draws per chain.
    :param sites: names of the latent sites to store; see above for ``None``.
    :param num_chains: number of chains the draws are split into.
    :param chunk_size: draws gathered in torch before being copied into the output arrays
        at once; peak memory is the output plus one chunk. Does not change the draws.
    :param max_bytes: size limit of the stored posterior, in bytes.
    :param seed: seeds the draws (draw ``i`` is seeded from ``(seed, i)``, so the result does
        not depend on ``chunk_size``); ``None`` takes a seed from torch's global generator,
        so :func:`pyro.set_rng_seed` makes the call reproducible. The global generator's
        state is otherwise left as it was.
    :param obs_site: name of the observed site.
    :param progress: show a tqdm progress bar; ``None`` shows it only on a terminal.
    :param device: where to draw and run the networks
        (:func:`pyro_bqn.devices.resolve_device`): the model, the guide, ``x`` and ``y`` move
        there (``model.to(device)``); default: where they are. The arrays returned are on
        the host, as ArviZ holds NumPy arrays.
    :returns: an :class:`arviz.InferenceData`.
    :raises ValueError: on an unknown site or ``obs_site``, bad sizes, or a ``sites``
        request larger than ``max_bytes``.
    """
    # Imported here: arviz is slow to import and announces its refactor on import, which
    # users of the rest of pyro_bqn.diagnostics should not pay for.
    import arviz as az

    import pyro_bqn

    for label, value in (
        ("num_samples", num_samples),
        ("num_chains", num_chains),
        ("chunk_size", chunk_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if y is None:
        raise ValueError("y is required: the log-likelihood needs the observed values")
    if device is not None:
        x, y = move_to(resolve_device(device), model, guide, x, y)[2:]
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    # The generators the draws use are restored afterwards: the CPU's and, on a GPU, its own.
    forked = [x.device] if x.device.type == "cuda" else []

    num_draws = num_chains * num_samples
    with (
        torch.no_grad(),
        training_mode(model, False),
        torch.random.fork_rng(devices=forked),
        poutine.block(),
    ):
        if guide.prototype_trace is None:
            guide.median(x, y)  # builds the guide's prototype (its sites and parameters)
        prototype = {n: s["value"] for n, s in guide.prototype_trace.iter_stochastic_nodes()}
        sizes = {n: _site_bytes(guide, n, v, num_draws) for n, v in prototype.items()}
        stored, omitted = _select_sites(sizes, sites, max_bytes, num_draws)
        if omitted and sites is None:
            warnings.warn(
                f"to_inference_data left sites {omitted} out of the posterior: storing all "
                f"sites would exceed max_bytes={max_bytes / _MB:.4g} MB; pass sites=[...] or raise "
                "max_bytes to choose",
                stacklevel=2,
            )

        posterior, log_lik, predictive, obs_node = _draw_networks(
            model, guide, prototype, stored, obs_site, x, y, seed, num_draws, chunk_size, progress
        )
        probs = {
            name: guide.exact_posterior(name) for name in stored if name in guide.quantized_sites
        }

    def by_chain(a: np.ndarray) -> np.ndarray:
        return a.reshape(num_chains, num_samples, *a.shape[1:])

    observed = obs_node["value"]
    dims = {name: _site_dims(model, name, prototype[name].shape) for name in stored}
    dims[obs_site] = _observation_dims(obs_node, observed.shape, obs_site)
    coords: dict[str, Any] = {}
    constant_data = {}
    for name, posterior_dist in probs.items():
        level_dim = f"{name}.level"
        coords[level_dim] = posterior_dist.levels.cpu().numpy()
        constant_data[f"{name}.probs"] = posterior_dist.probs.detach().cpu().numpy()
        dims[f"{name}.probs"] = [*dims[name], level_dim]
    attrs = {
        "inference_library": "pyro_bqn",
        "inference_library_version": pyro_bqn.__version__,
        "pyro_version": pyro.__version__,
        "method": METHOD,
        "guide": type(guide).__name__,
        "seed": seed,
        "omitted_sites": ", ".join(omitted),
    }
    return az.from_dict(
        posterior={name: by_chain(draws) for name, draws in posterior.items()},
        log_likelihood={obs_site: by_chain(log_lik)},
        posterior_predictive={obs_site: by_chain(predictive)},
        observed_data={obs_site: observed.cpu().numpy()},
        constant_data=constant_data or None,
        coords=coords,
        dims=dims,
        # from_dict applies ``attrs`` to the data groups only; the others take their own
        # (copies: from_dict edits the dict it is given).
        attrs=dict(attrs),
        posterior_attrs=dict(attrs),
        log_likelihood_attrs=dict(attrs),
        posterior_predictive_attrs=dict(attrs),
    )
