import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI

from pyro_bqn import levels as qlevels
from pyro_bqn.checkpoint import save_checkpoint
from pyro_bqn.distributions import MomentCategorical, MomentNormal
from pyro_bqn.export import (
    PackedSite,
    QuantizedNetwork,
    export_network,
    index_bits,
    pack_indices,
    unpack_indices,
)
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.nn import QuantizedLinear, ReLU
from pyro_bqn.payload_files import save_payload
from pyro_bqn.priors import SpikeAndSlabPrior
from tests.infer.models import linear_classes
from tests.trained_mlp import SIZES, trained_mlp

LEVEL_SETS = {
    "binary": (qlevels.binary, 1),
    "ternary": (qlevels.ternary, 2),
    "uniform2": (lambda: qlevels.uniform(2), 2),
}


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _assert_same_tensors(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        assert torch.equal(first[name], second[name]), name


def _conditioned_probs(model, weights, x):
    """Class probabilities of ``model`` conditioned on ``weights``, evaluation mode."""
    model.eval()
    try:
        with torch.no_grad():
            trace = poutine.trace(poutine.condition(model, weights)).get_trace(x)
    finally:
        model.train()
    return trace.nodes["obs"]["fn"].probs


# --- bit packing --------------------------------------------------------------------------


@pytest.mark.parametrize(("num_levels", "bits"), [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4)])
def test_index_bits(num_levels, bits):
    assert index_bits(num_levels) == bits


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 13, 100])
def test_pack_round_trips_in_numpy_packbits_layout(bits, count):
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    indices = torch.randint(0, 2**bits, (count,), generator=gen)
    packed = pack_indices(indices, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (math.ceil(count * bits / 8),)
    assert torch.equal(unpack_indices(packed, bits, count), indices)
    # The documented layout: each index MSB first in one bit stream, cut into bytes MSB first.
    stream = ((indices.numpy()[:, None] >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    expected = np.packbits(stream.reshape(-1), bitorder="big")
    assert np.array_equal(packed.numpy(), expected)


@pytest.mark.parametrize(
    "dtype",
    [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.uint64],
    ids=str,
)
def test_pack_takes_indices_of_every_integer_dtype(dtype):
    indices = torch.tensor([5, 0, 7, 2, 6])
    packed = pack_indices(indices.to(dtype), 3)
    # 101 000 111 010 110 (+ 0 padding) = 10100011 10101100
    assert packed.tolist() == [0b10100011, 0b10101100]


def test_pack_and_unpack_refuse_bad_input():
    with pytest.raises(ValueError, match="fit 2 bits"):
        pack_indices(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_indices(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="integer"):
        pack_indices(torch.tensor([True, False]), 1)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), 2, 5)
    with pytest.raises(ValueError, match="uint8"):
        unpack_indices(torch.zeros(2, dtype=torch.int64), 2, 5)
    with pytest.raises(ValueError, match="at least two levels"):
        index_bits(1)


def test_packed_site_refuses_an_index_beyond_the_levels():
    packed = pack_indices(torch.tensor([0, 3]), 2)  # code 3 is unused by 3 levels
    with pytest.raises(ValueError, match="only 3 levels"):
        PackedSite(packed, qlevels.ternary().values, (2,))


# --- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("level_set", LEVEL_SETS)
def test_export_packs_the_argmax_levels_with_the_expected_size(level_set):
    make_levels, bits = LEVEL_SETS[level_set]
    run = trained_mlp(levels=make_levels())
    network = export_network(run.model, run.guide, run.x)
    median = run.guide.median()

    assert list(network.quantized) == run.guide.quantized_sites
    for name, site in network.quantized.items():
        argmax = run.guide.exact_posterior(name).probs.argmax(-1)
        assert torch.equal(site.indices(), argmax)
        assert site.bits == bits
        assert site.nbytes == math.ceil(argmax.numel() * bits / 8)
    assert network.bits_per_weight() == dict.fromkeys(network.quantized, bits)
    _assert_same_tensors(network.weights(), median)
    assert network.batch_norm == "model"
    assert list(network.continuous) == ["body.4.bias"]

    stored = [s.packed for s in network.quantized.values()]
    stored += [s.levels for s in network.quantized.values()]
    stored += [*network.continuous.values(), *network.params.values(), *network.buffers.values()]
    assert network.size_bytes() == sum(t.numel() * t.element_size() for t in stored)


def test_ternary_weights_take_two_bits_each():
    run = trained_mlp()
    network = export_network(run.model, run.guide, run.x)
    site = network.quantized["body.1.weight"]
    assert site.numel == SIZES[0] * SIZES[1]
    assert site.nbytes == math.ceil(site.numel * 2 / 8) == 32


def test_running_the_network_equals_the_model_conditioned_on_the_median():
    run = trained_mlp()
    network = export_network(run.model, run.guide, run.x)
    before = _state(run.model)
    probs = network.run(run.model, run.x)
    assert probs.shape == (run.x.shape[0], SIZES[-1])
    assert torch.equal(probs, _conditioned_probs(run.model, run.guide.median(), run.x))
    assert torch.equal(network.distribution(run.model, run.x).probs, probs)
    # The run leaves the model as it was: state and training flags.
    _assert_same_tensors(_state(run.model), before)
    assert all(module.training for module in run.model.modules())


def test_save_and_load_round_trip_exactly(tmp_path):
    run = trained_mlp()
    network = export_network(run.model, run.guide, run.x, batch_norm_data=run.x)
    path = tmp_path / "network.pt"
    network.save(path)
    loaded = QuantizedNetwork.load(path)

    assert loaded.batch_norm == "reestimated"
    assert loaded.quantized.keys() == network.quantized.keys()
    for name, site in network.quantized.items():
        assert torch.equal(loaded.quantized[name].packed, site.packed)
        assert torch.equal(loaded.quantized[name].levels, site.levels)
        assert loaded.quantized[name].shape == site.shape
    _assert_same_tensors(loaded.weights(), network.weights())
    for group in ("continuous", "params", "buffers"):
        _assert_same_tensors(getattr(loaded, group), getattr(network, group))
    assert torch.equal(loaded.run(run.model, run.x), network.run(run.model, run.x))


def test_a_fresh_model_in_a_new_param_store_runs_the_loaded_network_identically(tmp_path):
    run = trained_mlp()
    network = export_network(run.model, run.guide, run.x)
    expected = network.run(run.model, run.x)
    network.save(tmp_path / "network.pt")

    pyro.clear_param_store()  # as in a new process
    pyro.set_rng_seed(7)
    fresh = QuantizedMLP(SIZES)
    fresh(run.x)  # registers its own (untrained) parameters
    fresh_state = _state(fresh)
    probs = QuantizedNetwork.load(tmp_path / "network.pt").run(fresh, run.x)
    assert torch.equal(probs, expected)
    _assert_same_tensors(_state(fresh), fresh_state)


def test_a_fresh_model_beside_the_trained_one_runs_the_network_with_its_batch_norm_affine():
    # The param store still holds the trained model's batch-norm weight and bias; the fresh
    # model's batch norms read their own nn.Parameters (1 and 0), which the run must set.
    run = trained_mlp(steps=10)
    network = export_network(run.model, run.guide, run.x)
    assert not torch.allclose(network.params["body.2.weight"], torch.ones(SIZES[1]))
    expected = network.run(run.model, run.x)

    fresh = QuantizedMLP(SIZES)
    fresh(run.x)  # its PyroParams (the temperature) now read the store's trained values
    fresh_state = _state(fresh)
    store_before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    assert torch.equal(network.run(fresh, run.x), expected)
    _assert_same_tensors(_state(fresh), fresh_state)
    store_after = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    _assert_same_tensors(store_after, store_before)


def test_reestimated_batch_norm_statistics_are_the_networks_own_and_the_model_is_unchanged():
    run = trained_mlp()
    before = _state(run.model)
    network = export_network(run.model, run.guide, run.x, batch_norm_data=run.x)
    _assert_same_tensors(_state(run.model), before)

    weights = run.guide.median()
    hidden = run.x @ weights["body.1.weight"].T  # the batch norm's input
    assert torch.allclose(network.buffers["body.2.running_mean"], hidden.mean(0), atol=1e-6)
    assert torch.allclose(network.buffers["body.2.running_var"], hidden.var(0), rtol=1e-5)
    assert network.buffers["body.2.num_batches_tracked"] == 1

    # Running the network uses those statistics: the model with them copied in agrees.
    with torch.no_grad():
        for name, buffer in run.model.named_buffers():
            buffer.copy_(network.buffers[name])
    assert torch.equal(network.run(run.model, run.x), _conditioned_probs(run.model, weights, run.x))


@pytest.mark.parametrize(
    ("n", "options", "num_batches"),
    [(513, {}, 3), (200, {"batch_size": 100}, 2)],
    ids=["default-256", "batch_size-100"],
)
def test_batch_norm_statistics_are_reestimated_in_batches_of_batch_size(n, options, num_batches):
    run = trained_mlp()
    x, _ = linear_classes(n, SIZES[0], SIZES[-1], seed=2)
    network = export_network(run.model, run.guide, run.x, batch_norm_data=x, **options)
    # n splits into num_batches equal batches; the statistics are the mean over the batches
    # of the batch norm input's batch mean and unbiased batch variance.
    hidden = x @ run.guide.median()["body.1.weight"].T
    batches = hidden.view(num_batches, n // num_batches, SIZES[1])
    assert network.buffers["body.2.num_batches_tracked"] == num_batches
    torch.testing.assert_close(network.buffers["body.2.running_mean"], batches.mean(1).mean(0))
    torch.testing.assert_close(network.buffers["body.2.running_var"], batches.var(1).mean(0))


class KeywordMLP(QuantizedMLP):
    """A QuantizedMLP that takes its labels as a required keyword argument."""

    def forward(self, x, *, labels):
        return super().forward(x, labels)


def test_keyword_arguments_reach_every_run_of_the_model():
    x, y = linear_classes(24, SIZES[0], SIZES[-1], seed=1)
    model = KeywordMLP(SIZES)
    guide = AutoQuantizedGuide(model)  # never run: the export sets it up from the example
    network = export_network(model, guide, x, labels=y)
    median = guide.median()
    _assert_same_tensors(network.weights(), median)

    probs = network.run(model, x, labels=y)
    assert torch.equal(network.distribution(model, x, labels=y).probs, probs)
    model.eval()
    with torch.no_grad():
        trace = poutine.trace(poutine.condition(model, median)).get_trace(x, labels=y)
    assert torch.equal(probs, trace.nodes["obs"]["fn"].probs)


def _noisy_regression(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    noise = pyro.param("noise", torch.tensor(1.0))  # unconstrained: the store's tensor itself
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", MomentNormal(x @ w, noise), obs=y)


def test_a_distribution_holding_the_models_tensors_keeps_the_networks_values():
    # The likelihood's noise scale is a view of the param store's tensor, which the run sets
    # to the network's 0.5 and then restores to the model's 1.
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    _noisy_regression(x)
    network = QuantizedNetwork(
        {}, continuous={"w": torch.tensor([0.5, -0.25])}, params={"noise": torch.tensor(0.5)}
    )
    fn = network.distribution(_noisy_regression, x)
    assert pyro.param("noise").item() == 1.0
    assert torch.equal(fn.scale, torch.tensor([0.5, 0.5]))
    assert torch.equal(fn.mean, torch.tensor([0.0, 1.75]))  # x @ w


class PreprocessedMLP(pyro.nn.PyroModule):
    """A QuantizedMLP behind a plain torch module (not a PyroModule), e.g. preprocessing."""

    def __init__(self):
        super().__init__()
        self.preprocess = torch.nn.Identity()
        self.mlp = QuantizedMLP(SIZES)

    def forward(self, x, y=None):
        return self.mlp(self.preprocess(x), y)


def test_a_plain_torch_module_does_not_hide_a_fresh_models_batch_norm_affine():
    # As above, with the batch norm after a plain module in the model's module order.
    x, y = linear_classes(48, SIZES[0], SIZES[-1], seed=1)
    model = PreprocessedMLP()
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    for _ in range(10):
        svi.step(x, y)
    network = export_network(model, guide, x)
    assert not torch.allclose(network.params["mlp.body.2.weight"], torch.ones(SIZES[1]))
    expected = network.run(model, x)

    fresh = PreprocessedMLP()
    fresh(x)
    assert torch.equal(network.run(fresh, x), expected)


# --- bad inputs -----------------------------------------------------------------------------


def test_a_file_that_is_not_a_network_is_refused_naming_the_path(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x96 not a torch file at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        QuantizedNetwork.load(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(3)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt.*not a pyro_bqn\.QuantizedNetwork"):
        QuantizedNetwork.load(foreign)

    run = trained_mlp(steps=1)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, run.model, run.guide)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*format entry: 'pyro_bqn\.checkpoint'"):
        QuantizedNetwork.load(checkpoint)

    with pytest.raises(FileNotFoundError):
        QuantizedNetwork.load(tmp_path / "missing.pt")


def test_a_damaged_site_is_refused_naming_the_path_and_the_site(tmp_path):
    run = trained_mlp(steps=1)
    export_network(run.model, run.guide, run.x).save(tmp_path / "network.pt")
    # Inconsistent content with a valid checksum, as a faulty writer would produce it.
    payload = torch.load(tmp_path / "network.pt", weights_only=True)
    del payload["checksum"]
    site = payload["quantized"]["body.4.weight"]
    site["packed"] = site["packed"][:-1]
    save_payload(tmp_path / "damaged.pt", payload)
    with pytest.raises(ValueError, match=r"damaged\.pt.*site 'body\.4\.weight'"):
        QuantizedNetwork.load(tmp_path / "damaged.pt")

    payload["quantized"] = {}
    payload["buffers"] = {"body.2.running_mean": [0.0]}
    save_payload(tmp_path / "damaged.pt", payload)
    with pytest.raises(ValueError, match=r"damaged\.pt.*'buffers'"):
        QuantizedNetwork.load(tmp_path / "damaged.pt")


def test_running_on_a_model_that_does_not_fit_names_the_site_parameter_or_buffer():
    run = trained_mlp(steps=1)
    network = export_network(run.model, run.guide, run.x)
    with pytest.raises(ValueError, match=r"site 'body\.1\.weight' expects .*\(4, 16\)"):
        network.run(QuantizedMLP((16, 4, 3)), run.x)
    # Same weights, but a ReLU has no level buffer where the Sign activation had one.
    with pytest.raises(ValueError, match=r"buffer 'body\.3\.levels\._values'"):
        network.run(QuantizedMLP(SIZES, activation="relu"), run.x)
    missing_bias = QuantizedNetwork(network.quantized, {}, network.params, network.buffers)
    with pytest.raises(ValueError, match=r"'body\.4\.bias' has no value"):
        missing_bias.run(run.model, run.x)
    with pytest.raises(
        ValueError,
        match=r"no sample site 'nope'; its sample sites: \['body\.1\.weight', 'body\.4\.weight', "
        r"'body\.4\.bias', 'data', 'obs'\]",
    ):
        network.run(run.model, run.x, site="nope")
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        QuantizedNetwork(network.quantized, batch_norm="moments")
    with pytest.raises(ValueError, match="'body.4.weight' is given both as quantized and as"):
        QuantizedNetwork(network.quantized, {"body.4.weight": network.weights()["body.4.weight"]})


def test_running_on_a_model_declared_with_other_fixed_levels_is_refused(tmp_path):
    run = trained_mlp(steps=1)  # ternary {-1, 0, 1}
    export_network(run.model, run.guide, run.x).save(tmp_path / "network.pt")
    network = QuantizedNetwork.load(tmp_path / "network.pt")
    model = QuantizedMLP(SIZES, levels=qlevels.from_values([-2.0, 0.0, 2.0]))
    with pytest.raises(
        ValueError,
        match=r"buffer 'body\.1\.levels\._values' holds the fixed levels \[-2\.0, 0\.0, 2\.0\] "
        r".*the network holds \[-1\.0, 0\.0, 1\.0\]",
    ):
        network.run(model, run.x)
    assert model.body[1].levels.values.tolist() == [-2.0, 0.0, 2.0]


# --- full-precision outliers and learned levels ----------------------------------------------


def test_packed_site_stores_off_level_weights_as_a_sparse_full_precision_list():
    levels = torch.tensor([-1.0, -0.2, 0.4, 1.2])
    weights = torch.tensor([[-1.0, 0.4, 2.5], [0.3, 1.2, -0.2]])
    site = PackedSite.from_weights(weights, levels)
    assert site.num_outliers == 2
    assert torch.equal(site.outlier_index, torch.tensor([2, 3], dtype=torch.int32))
    assert torch.equal(site.outlier_values, torch.tensor([2.5, 0.3]))
    # The packed stream alone is the network rounded to the levels.
    assert torch.equal(site.indices(), torch.tensor([[0, 2, 3], [2, 3, 1]]))
    assert torch.equal(site.values(), weights)
    assert site.nbytes == math.ceil(6 * 2 / 8)
    assert site.outlier_nbytes == 2 * 4 + 2 * 4
    on_levels = PackedSite.from_weights(levels[torch.tensor([3, 0, 1])], levels)
    assert on_levels.num_outliers == 0 and on_levels.outlier_nbytes == 0


@pytest.mark.parametrize(
    "index, values, match",
    [
        (torch.tensor([1.0]), torch.tensor([0.5]), "int32 or int64"),
        (torch.tensor([1], dtype=torch.int32), torch.tensor([0.5], dtype=torch.float64),
         "levels' torch.float32"),
        (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0.5]), "one shape"),
        (torch.tensor([2, 1], dtype=torch.int32), torch.tensor([0.5, 0.6]), "strictly increasing"),
        (torch.tensor([1, 1], dtype=torch.int32), torch.tensor([0.5, 0.6]), "strictly increasing"),
        (torch.tensor([0, 2, 1]), torch.tensor([0.5, 0.6, 0.7]), "strictly increasing"),
        (torch.tensor([4], dtype=torch.int32), torch.tensor([0.5]), r"in \[0, 4\)"),
        (torch.tensor([0], dtype=torch.int32), torch.tensor([math.nan]), "finite"),
    ],
)
def test_packed_site_refuses_bad_outliers(index, values, match):
    levels = torch.tensor([-1.0, 1.0])
    packed = pack_indices(torch.tensor([0, 1, 1, 0]), 1)
    with pytest.raises(ValueError, match=match):
        PackedSite(packed, levels, (4,), outlier_index=index, outlier_values=values)


class SlabNet(pyro.nn.PyroModule):
    """Two quantized layers, each with its own copy of learnable levels, a spike-and-slab
    prior and a categorical likelihood."""

    def __init__(self, init=(-1.0, -0.2, 0.4, 1.2)):
        super().__init__()
        shared = qlevels.learnable(init)
        prior = SpikeAndSlabPrior(slab_prob=0.1)
        self.fc1 = QuantizedLinear(4, 6, levels=shared.copy(), prior=prior, bias=False)
        self.act = ReLU()
        self.fc2 = QuantizedLinear(6, 3, levels=shared.copy(), prior=prior)

    def forward(self, x, y=None):
        logits = self.fc2(self.act(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def _slab_run():
    x, y = linear_classes(32, 4, 3, seed=1)
    model = SlabNet()
    guide = AutoQuantizedGuide(model, posterior="spike-and-slab")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    for _ in range(5):
        svi.step(x, y)
    store = pyro.get_param_store()
    with torch.no_grad():  # two weights whose slab outweighs every level
        store["AutoQuantizedGuide.logits.fc1.weight"][4, 0, 1] = 40.0
        store["AutoQuantizedGuide.logits.fc2.weight"][4, 2, 5] = 40.0
    return model, guide, x


def test_export_keeps_outliers_at_full_precision_and_counts_them(tmp_path):
    model, guide, x = _slab_run()
    network = export_network(model, guide, x)
    median = guide.median()
    _assert_same_tensors(network.weights(), median)
    assert [site.num_outliers for site in network.quantized.values()] == [1, 1]
    # The learned levels, one set per layer, as learned.
    fc1, fc2 = network.quantized["fc1.weight"], network.quantized["fc2.weight"]
    assert torch.equal(fc1.levels, model.fc1.levels.values.detach())
    assert not torch.equal(fc1.levels, fc2.levels)
    assert {"fc1.levels.first", "fc2.levels.raw_gaps"} <= set(network.params)
    stored = [t for s in network.quantized.values()
              for t in (s.packed, s.levels, s.outlier_index, s.outlier_values)]
    stored += [*network.continuous.values(), *network.params.values(), *network.buffers.values()]
    assert network.size_bytes() == sum(t.numel() * t.element_size() for t in stored)
    assert torch.equal(network.run(model, x), _conditioned_probs(model, median, x))

    network.save(tmp_path / "network.pt")
    loaded = QuantizedNetwork.load(tmp_path / "network.pt")
    for name, site in network.quantized.items():
        assert torch.equal(loaded.quantized[name].outlier_index, site.outlier_index)
        assert torch.equal(loaded.quantized[name].outlier_values, site.outlier_values)
    _assert_same_tensors(loaded.weights(), network.weights())

    # A fresh model, declared with other initial learnable levels, runs it identically: the
    # learned levels are parameters of the network.
    expected = network.run(model, x)
    pyro.clear_param_store()
    fresh = SlabNet(init=(-2.0, -0.5, 0.5, 2.0))
    fresh(x)
    assert torch.equal(loaded.run(fresh, x), expected)
