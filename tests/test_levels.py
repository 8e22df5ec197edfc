import math

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn import levels
from pyro_bqn.levels import LearnableLevels, LevelSet, check_levels

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@pytest.mark.parametrize(
    "level_set, expected",
    [
        (levels.binary(), [-1.0, 1.0]),
        (levels.ternary(), [-1.0, 0.0, 1.0]),
        (levels.uniform(1), [-1.0, 1.0]),
        (levels.uniform(2), [-1.0, -1 / 3, 1 / 3, 1.0]),
        (levels.uniform(3), [-1.0 + 2 * k / 7 for k in range(8)]),
        (levels.from_values([-0.7, 0.1, 1.3]), [-0.7, 0.1, 1.3]),
        (levels.learnable([-1.2, -0.1, 0.3, 0.9]), [-1.2, -0.1, 0.3, 0.9]),
    ],
    ids=["binary", "ternary", "uniform1", "uniform2", "uniform3", "from_values", "learnable"],
)
def test_constructors(level_set, expected):
    assert isinstance(level_set, LevelSet) and isinstance(level_set, pyro.nn.PyroModule)
    assert level_set.num_levels == len(expected)
    assert level_set.values.dtype == torch.get_default_dtype()
    assert torch.allclose(level_set.values, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(level_set.thresholds,
                          0.5 * (torch.tensor(expected[1:]) + torch.tensor(expected[:-1])),
                          atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_uniform_is_symmetric_and_evenly_spaced(bits):
    values = levels.uniform(bits).values
    assert values.shape == (2**bits,)
    assert torch.allclose(values, -values.flip(0))
    assert torch.allclose(values.diff(), torch.full((2**bits - 1,), 2 / (2**bits - 1)))


def test_nearest_rounds_to_the_closest_level_and_ties_go_up():
    ternary = levels.ternary()
    x = torch.tensor([[-5.0, -0.51, -0.5, -0.49], [0.0, 0.49, 0.5, 7.0]])
    expected = torch.tensor([[-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(ternary.nearest(x), expected)
    asymmetric = levels.from_values([-0.7, 0.1, 1.3])
    assert torch.equal(asymmetric.nearest(torch.tensor([-0.29, -0.31, 0.71, 0.69])),
                       torch.tensor([0.1, -0.7, 1.3, 0.1]))


def test_learnable_levels_are_parameters_and_get_gradients():
    level_set = levels.learnable([-1.0, 0.0, 0.5])
    assert isinstance(level_set, LearnableLevels)
    names = {name for name, _ in level_set.named_parameters()}
    assert names == {"first", "raw_gaps"}
    (level_set.values * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert level_set.first.grad is not None and (level_set.raw_gaps.grad > 0).all()


@settings(max_examples=50, deadline=None)
@given(
    first=st.floats(-1e30, 1e30),
    raw_gaps=st.lists(
        st.one_of(st.floats(-1e30, 1e30), st.sampled_from([-1e30, -100.0, 0.0, 100.0, 1e30])),
        min_size=1,
        max_size=7,
    ),
)
def test_learnable_levels_stay_strictly_increasing_for_any_raw_parameters(first, raw_gaps):
    level_set = levels.learnable(torch.linspace(-1.0, 1.0, len(raw_gaps) + 1))
    with torch.no_grad():
        level_set.first.fill_(first)
        level_set.raw_gaps.copy_(torch.tensor(raw_gaps))
    values = level_set.values
    assert torch.isfinite(values).all()
    assert (values.diff() > 0).all()
    check_levels(values.detach())
    assert (level_set.thresholds.diff() > 0).all()


def test_learnable_levels_survive_gaps_lost_to_rounding():
    # An absolute gap of 1e-3 vanishes next to 3e4 in float32; the relative one does not.
    level_set = levels.learnable([-1.0, 0.0, 1.0, 2.0])
    with torch.no_grad():
        level_set.first.fill_(3e4)
        level_set.raw_gaps.copy_(torch.tensor([-1e30, 1e30, -1e30]))
    assert (level_set.values.diff() > 0).all()


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0, -1.0], "sorted in increasing order"),
        ([-1.0, 0.0, 0.0, 1.0], "must not contain duplicate values"),
        ([-1.0, math.nan, 1.0], "must be finite"),
        ([-1.0, math.inf], "must be finite"),
        ([-math.inf, 1.0], "must be finite"),
        ([1.0], "at least two values"),
        ([], "at least two values"),
        ([[-1.0, 1.0]], "must be one-dimensional"),
    ],
    ids=["unsorted", "duplicate", "nan", "inf", "-inf", "one", "empty", "2d"],
)
@pytest.mark.parametrize("constructor", [levels.from_values, levels.learnable, LevelSet])
def test_bad_values_are_rejected(constructor, values, message):
    with pytest.raises(ValueError, match=message):
        constructor(values)


def test_check_levels_needs_a_tensor():
    with pytest.raises(ValueError, match="levels must be a torch.Tensor"):
        check_levels([-1.0, 1.0])
    values = torch.tensor([-1.0, 2.0])
    assert check_levels(values) is values


@pytest.mark.parametrize("bits", [0, -1, 1.5, True, "2"])
def test_uniform_needs_a_positive_integer_number_of_bits(bits):
    with pytest.raises(ValueError, match="bits must be a positive integer"):
        levels.uniform(bits)


def test_learnable_min_gap_is_checked():
    with pytest.raises(ValueError, match="min_gap must be at least"):
        levels.learnable([-1.0, 1.0], min_gap=0.0)
    with pytest.raises(ValueError, match=r"more than min_gap \* max\(1, \|v_k\|\) apart"):
        levels.learnable([-1.0, -0.9995, 1.0])
    with pytest.raises(ValueError, match=r"more than min_gap \* max\(1, \|v_k\|\) apart"):
        levels.learnable([100.0, 100.05])  # 0.05 < 1e-3 * 100


# --- per-layer copies ---------------------------------------------------------------------


def test_copy_of_a_fixed_level_set_is_an_equal_independent_set():
    original = levels.from_values([-0.7, 0.1, 1.3]).double()
    copy = original.copy()
    assert type(copy) is LevelSet and copy is not original
    assert copy.values.dtype == torch.float64
    assert torch.equal(copy.values, original.values)
    assert copy._values.data_ptr() != original._values.data_ptr()


def test_copy_keeps_values_finer_than_the_default_dtype_exactly():
    # Copies are what a deep copy of a distribution (and Pyro's deep_to) holds.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        original = levels.from_values([-0.7, 0.1, 1.3])
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(original.copy().values, original.values)


def test_copy_of_a_learnable_set_has_its_own_parameters_at_the_current_levels():
    original = levels.learnable([-1.0, -0.2, 0.4, 1.2], min_gap=1e-2)
    with torch.no_grad():
        original.first.fill_(-1.5)
        original.raw_gaps.add_(0.3)
    copy = original.copy()
    assert isinstance(copy, LearnableLevels) and copy.learnable
    assert copy.min_gap == 1e-2
    assert torch.equal(copy.values, original.values)
    assert copy.first is not original.first and copy.raw_gaps is not original.raw_gaps
    with torch.no_grad():
        copy.first.fill_(0.0)
    assert original.first.item() == -1.5
    assert not levels.ternary().learnable


# --- from_spec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected, learn",
    [
        ("binary", [-1.0, 1.0], False),
        (" Ternary ", [-1.0, 0.0, 1.0], False),
        ("2bit", [-1.0, -1 / 3, 1 / 3, 1.0], False),
        ("-0.7,0.1,1.3", [-0.7, 0.1, 1.3], False),
        ("learnable:-1,-0.2,0.4,1.2", [-1.0, -0.2, 0.4, 1.2], True),
        ("learnable: 2bit", [-1.0, -1 / 3, 1 / 3, 1.0], True),
        ("learnable:ternary", [-1.0, 0.0, 1.0], True),
    ],
)
def test_from_spec_reads_named_uniform_and_listed_levels(text, expected, learn):
    level_set = levels.from_spec(text)
    assert level_set.learnable is learn
    assert isinstance(level_set, LearnableLevels) is learn
    torch.testing.assert_close(level_set.values.detach(), torch.tensor(expected))


@pytest.mark.parametrize(
    "text, message",
    [
        ("quaternary", "binary, ternary, <n>bit or comma-separated numbers"),
        ("learnable:", "binary, ternary, <n>bit or comma-separated numbers"),
        ("0bit", r"1 <= n <= 8"),
        ("9bit", r"1 <= n <= 8"),
        ("1,0", "sorted in increasing order"),
        ("learnable:0,0.0001", "more than min_gap"),
        (",".join(str(v) for v in range(300)), "at most 256 values"),
    ],
)
def test_from_spec_refuses_other_text(text, message):
    with pytest.raises(ValueError, match=message):
        levels.from_spec(text)


# --- learnable thresholds -----------------------------------------------------------------


def test_learnable_thresholds_start_at_init_and_get_gradients():
    thresholds = levels.LearnableThresholds([-0.5, 0.2, 0.9])
    assert {name for name, _ in thresholds.named_parameters()} == {"first", "raw_gaps"}
    torch.testing.assert_close(thresholds.values.detach(), torch.tensor([-0.5, 0.2, 0.9]))
    (thresholds.values * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert (thresholds.raw_gaps.grad > 0).all() and thresholds.first.grad.item() == 6.0
    single = levels.LearnableThresholds([0.3])
    assert single.values.shape == (1,) and single.raw_gaps.shape == (0,)


@settings(max_examples=30, deadline=None)
@given(
    first=st.floats(-1e30, 1e30),
    raw_gaps=st.lists(st.floats(-1e30, 1e30), min_size=1, max_size=5),
)
def test_learnable_thresholds_stay_strictly_increasing(first, raw_gaps):
    thresholds = levels.LearnableThresholds(torch.linspace(-1.0, 1.0, len(raw_gaps) + 1))
    with torch.no_grad():
        thresholds.first.fill_(first)
        thresholds.raw_gaps.copy_(torch.tensor(raw_gaps))
    values = thresholds.values
    assert torch.isfinite(values).all() and (values.diff() > 0).all()


@pytest.mark.parametrize(
    "init, message",
    [([], "n >= 1"), ([[0.0]], "n >= 1"), ([0.0, math.nan], "finite"),
     ([0.5, 0.5], "strictly increasing"), ([0.0, 1e-4], "more than min_gap")],
)
def test_learnable_thresholds_refuse_bad_init(init, message):
    with pytest.raises(ValueError, match=message):
        levels.LearnableThresholds(init)


def test_layer_levels_lists_each_layers_current_levels():
    from pyro_bqn.nn import QuantizedActivation, QuantizedLinear

    shared = levels.learnable([-1.0, -0.2, 0.4, 1.2])
    model = torch.nn.Sequential(
        QuantizedLinear(3, 4, levels=shared.copy()),
        QuantizedActivation(levels.ternary()),
        QuantizedLinear(4, 2, levels=shared.copy()),
    )
    with torch.no_grad():
        model[2].levels.first.fill_(-3.0)
    found = levels.layer_levels(model)
    assert list(found) == ["0", "1", "2"]
    assert found["1"] == [-1.0, 0.0, 1.0]
    assert found["0"] == pytest.approx([-1.0, -0.2, 0.4, 1.2], abs=1e-6)
    assert found["2"][0] == -3.0
