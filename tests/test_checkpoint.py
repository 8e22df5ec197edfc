import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_bqn import levels as qlevels
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


# --- extra state for resuming ---------------------------------------------------------------


def test_extra_state_round_trips_and_defaults_to_an_empty_dict(tmp_path):
    run = trained_mlp(steps=1)
    generator = torch.Generator().manual_seed(4)
    torch.randperm(10, generator=generator)
    extra = {
        "fit": {
            "epoch": 3,
            "generator": generator.get_state(),
            "history": [{"epoch": 1, "loss": 0.5, "lr": 0.1}, {"epoch": 2, "loss": 0.25}],
            "settings": {"seed": 0, "name": "mnist", "resume": False, "limit": None},
            "betas": (0.9, 0.999),
        }
    }
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide, extra=extra)
    model, guide = _fresh()
    loaded = load_checkpoint(path, model, guide, run.x, run.y)
    assert loaded.keys() == {"fit"}
    fit_state = loaded["fit"]
    assert torch.equal(fit_state.pop("generator"), extra["fit"].pop("generator"))
    assert fit_state == extra["fit"]
    assert isinstance(fit_state["betas"], tuple)

    save_checkpoint(path, run.model, run.guide)
    assert load_checkpoint(path, model, guide, run.x, run.y) == {}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"fit": {"callback": object()}}, r"extra\['fit'\]\['callback'\] is of type object"),
        ({"history": [1, {"f": len}]}, r"extra\['history'\]\[1\]\['f'\] is of type builtin"),
        ({3: "epoch"}, r"extra must be a dict with str keys"),
        ([("epoch", 3)], r"extra must be a dict with str keys, got list"),
    ],
)
def test_extra_that_a_checkpoint_cannot_hold_is_refused_before_writing(tmp_path, extra, match):
    run = trained_mlp(steps=1)
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(ValueError, match=match):
        save_checkpoint(path, run.model, run.guide, extra=extra)
    assert not path.exists()


# --- level sets -----------------------------------------------------------------------------


def test_fixed_levels_of_another_declaration_are_refused_naming_both_level_sets(tmp_path):
    run = trained_mlp(steps=1)  # ternary {-1, 0, 1}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide)
    pyro.clear_param_store()
    model = QuantizedMLP(SIZES, levels=qlevels.from_values([-2.0, 0.0, 2.0]))
    guide = AutoQuantizedGuide(model)
    with pytest.raises(
        ValueError,
        match=r"buffer 'body\.1\.levels\._values' holds the fixed levels \[-2\.0, 0\.0, 2\.0\] "
        r".*checkpoint\.pt' holds \[-1\.0, 0\.0, 1\.0\]",
    ):
        load_checkpoint(path, model, guide, run.x, run.y)
    assert model.body[1].levels.values.tolist() == [-2.0, 0.0, 2.0]


def test_learnable_levels_are_trained_values_and_are_restored(tmp_path):
    run = trained_mlp(levels=qlevels.learnable([-1.0, 0.0, 1.0]), steps=3)
    trained = run.model.body[1].levels.values.detach().clone()
    assert not torch.equal(trained, torch.tensor([-1.0, 0.0, 1.0]))  # training moved them
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide)
    loss, probs, _ = _outputs(run.model, run.guide, run.x, run.y)

    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    model = QuantizedMLP(SIZES, levels=qlevels.learnable([-1.5, 0.0, 1.0]))
    guide = AutoQuantizedGuide(model)
    load_checkpoint(path, model, guide, run.x, run.y)
    assert torch.equal(model.body[1].levels.values, trained)
    assert DeterministicELBO().loss(model, guide, run.x, run.y) == loss
    assert torch.equal(predict(model, guide, run.x), probs)


# --- the optimiser fit uses -----------------------------------------------------------------


def _fit_optimizer() -> pyro.optim.PyroOptim:
    """The optimiser of :func:`pyro_bqn.infer.fit`: fused Adam, clipped, decayed per step."""
    return pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05, "fused": True}, "gamma": 0.9},
        clip_args={"clip_value": 10.0},
    )


def _steps(svi, optimizer, x, y, count):
    """``count`` SVI steps, each followed by a learning-rate step; the losses and rates."""
    record = []
    for _ in range(count):
        loss = svi.step(x, y)
        optimizer.step()
        lrs = [scheduler.get_last_lr()[0] for scheduler in optimizer.optim_objs.values()]
        record.append((loss, lrs))
    return record


def test_an_exponential_lr_schedule_over_fused_adam_round_trips(tmp_path):
    pyro.set_rng_seed(0)
    run = trained_mlp(steps=0)
    optimizer = _fit_optimizer()
    svi = SVI(run.model, run.guide, optimizer, DeterministicELBO())
    _steps(svi, optimizer, run.x, run.y, 3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, run.model, run.guide, optimizer)
    expected = _steps(svi, optimizer, run.x, run.y, 3)

    model, guide = _fresh()
    optimizer = _fit_optimizer()
    load_checkpoint(path, model, guide, run.x, run.y, optimizer=optimizer)
    svi = SVI(model, guide, optimizer, DeterministicELBO())
    assert _steps(svi, optimizer, run.x, run.y, 3) == expected
