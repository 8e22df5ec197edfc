import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_bqn.checkpoint import load_checkpoint, save_checkpoint
from pyro_bqn.export import export_network
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, predict
from pyro_bqn.models import QuantizedMLP
from tests.trained_mlp import SIZES, new_optimizer, trained_mlp


def _outputs(model, guide, x, y):
    """The loss, the predictive and the model's buffers: what a round trip must keep."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return DeterministicELBO().loss(model, guide, x, y), predict(model, guide, x), buffers


def _fresh(seed=5, sizes=SIZES):
    pyro.clear_param_store()  # as in a new process
    pyro.set_rng_seed(seed)  # a different initialisation than the saved run's
    model = QuantizedMLP(sizes)
    return model, AutoQuantizedGuide(model)


def test_round_trip_is_exact_and_training_continues_identically(tmp_path):
    run = trained_mlp(steps=3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide, run.optimizer)
    loss, probs, buffers = _outputs(run.model, run.guide, run.x, run.y)
    next_losses = [run.svi.step(run.x, run.y) for _ in range(3)]

    model, guide = _fresh()
    optimizer = new_optimizer()
    rng = torch.get_rng_state()
    load_checkpoint(path, model, guide, run.x, run.y, optimizer=optimizer)
    assert torch.equal(torch.get_rng_state(), rng)

    loaded_loss, loaded_probs, loaded_buffers = _outputs(model, guide, run.x, run.y)
    assert loaded_loss == loss
    assert torch.equal(loaded_probs, probs)
    assert all(torch.equal(loaded_buffers[name], b) for name, b in buffers.items())
    svi = SVI(model, guide, optimizer, DeterministicELBO())
    assert [svi.step(run.x, run.y) for _ in range(3)] == next_losses


def test_loading_into_the_trained_model_rolls_it_back(tmp_path):
    run = trained_mlp(steps=2)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide)
    loss, probs, _ = _outputs(run.model, run.guide, run.x, run.y)
    for _ in range(2):
        run.svi.step(run.x, run.y)

    load_checkpoint(path, run.model, run.guide, run.x, run.y)
    assert DeterministicELBO().loss(run.model, run.guide, run.x, run.y) == loss
    assert torch.equal(predict(run.model, run.guide, run.x), probs)


def test_files_that_are_not_checkpoints_are_refused_naming_the_path(tmp_path):
    run = trained_mlp(steps=1)
    model, guide = _fresh()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage, model, guide, run.x, run.y)

    network = tmp_path / "network.pt"
    export_network(run.model, run.guide, run.x).save(network)
    with pytest.raises(ValueError, match=r"network\.pt.*not a pyro_bqn\.checkpoint"):
        load_checkpoint(network, model, guide, run.x, run.y)


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameter(tmp_path):
    run = trained_mlp(steps=1)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide)
    model, guide = _fresh(sizes=(16, 4, 3))
    with pytest.raises(ValueError, match=r"parameter '[\w.]*body\.1\.weight' is \(3, 4, 16\)"):
        load_checkpoint(path, model, guide, run.x, run.y)
    # Nothing was copied: the model's running statistics are still the initial ones.
    assert torch.equal(model.body[2].running_mean, torch.zeros(4))
    assert model.body[2].num_batches_tracked == 0


def test_optimizer_misuse_and_an_empty_param_store_are_refused(tmp_path):
    with pytest.raises(ValueError, match="param store is empty"):
        save_checkpoint(tmp_path / "empty.pt", *_fresh())

    run = trained_mlp(steps=1)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, run.model, run.guide, run.x, run.y, optimizer=new_optimizer())

    save_checkpoint(path, run.model, run.guide, run.optimizer)
    with pytest.raises(ValueError, match="already taken a step"):
        load_checkpoint(path, run.model, run.guide, run.x, run.y, optimizer=run.optimizer)
