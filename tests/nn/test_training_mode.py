"""Tests for pyro_bqn.nn.training_mode and the deprecated pyro_bqn.infer.eval_mode."""

from __future__ import annotations

import pytest
import torch

from pyro_bqn.infer import eval_mode
from pyro_bqn.nn import training_mode


def _mixed_modes() -> torch.nn.Sequential:
    # A model may deliberately mix modes (e.g. a frozen batch norm in eval mode).
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model.train()
    model[1].eval()
    return model


@pytest.mark.parametrize("mode", [True, False])
def test_sets_the_mode_then_gives_every_submodule_its_own_flag_back(mode: bool) -> None:
    model = _mixed_modes()
    with training_mode(model, mode):
        assert all(m.training is mode for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]


def test_restores_the_flags_after_an_error() -> None:
    model = _mixed_modes()
    with pytest.raises(RuntimeError, match="boom"), training_mode(model, True):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == [True, True, False]


def test_a_plain_callable_is_left_alone() -> None:
    with training_mode(len, False):
        pass


def test_eval_mode_is_a_deprecated_second_name() -> None:
    model = _mixed_modes()
    with pytest.warns(FutureWarning, match=r"use pyro_bqn\.nn\.training_mode\(model, False\)"):
        context = eval_mode(model)
    with context:
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False]
