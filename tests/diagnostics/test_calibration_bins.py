"""The bins behind ECE and MCE: their default number, length, dtype, device and edge
handling."""

import torch

from pyro_bqn.diagnostics import calibration_report
from pyro_bqn.diagnostics.calibration import (
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
)


def _random_predictions(n=200, num_classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(n, num_classes, generator=gen)).softmax(-1)
    return probs, torch.randint(0, num_classes, (n,), generator=gen)


def test_the_default_is_fifteen_bins_everywhere():
    probs, y = _random_predictions()
    assert calibration_bins(probs, y).counts.shape == (15,)
    ece, mce = expected_calibration_error(probs, y, 15), maximum_calibration_error(probs, y, 15)
    assert ece != expected_calibration_error(probs, y, 16)  # the data tell 15 from 16 bins
    assert mce != maximum_calibration_error(probs, y, 16)
    assert expected_calibration_error(probs, y) == ece
    assert maximum_calibration_error(probs, y) == mce
    report = calibration_report(probs, y)
    assert report["ece"] == ece.item() and report["mce"] == mce.item()


def test_empty_top_bins_still_give_one_count_per_bin():
    # Every confidence is 0.3: bins above it are empty, and counts has all M entries.
    probs = torch.tensor([[0.3, 0.25, 0.25, 0.2]]).repeat(5, 1)
    bins = calibration_bins(probs, torch.zeros(5, dtype=torch.long), num_bins=10)
    assert bins.counts.tolist() == [0, 0, 5, 0, 0, 0, 0, 0, 0, 0]
    assert bins.edges.shape == (11,)


def test_a_bin_with_one_sample_counts_for_the_mce():
    # Bin (0.5, 0.6]: four correct samples at 0.55 (gap 0.45); bin (0.9, 1]: one wrong
    # sample at 0.95 (gap 0.95), the largest.
    probs = torch.tensor([[0.55, 0.45]] * 4 + [[0.95, 0.05]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1])
    mce = maximum_calibration_error(probs, y, num_bins=10)
    torch.testing.assert_close(mce, torch.tensor(0.95, dtype=torch.float64))


def test_float64_confidences_are_binned_against_float64_edges():
    # 0.1 + 1e-12 lies above the edge 1/10 in float64, but below float32's 1/10 (0.1 + 1.5e-9).
    probs = torch.tensor([[0.1 + 1e-12] + [(0.9 - 1e-12) / 9] * 9], dtype=torch.float64)
    bins = calibration_bins(probs, torch.tensor([0]), num_bins=10)
    assert bins.edges.dtype == torch.float64
    assert bins.counts.tolist() == [0, 1] + [0] * 8


def test_the_bins_are_built_beside_the_inputs_whatever_the_default_device():
    # A user may set another default device (torch.set_default_device("cuda")) and still pass
    # CPU probabilities; every tensor the bins are built from must follow the inputs. "meta"
    # stands in for that other device on a machine with only a CPU.
    probs, y = _random_predictions()
    expected = calibration_bins(probs, y, num_bins=10)
    expected_ece = expected_calibration_error(probs, y, num_bins=10)
    with torch.device("meta"):
        bins = calibration_bins(probs, y, num_bins=10)
        ece = expected_calibration_error(probs, y, num_bins=10)
    for name, tensor in bins._asdict().items():
        assert tensor.device == probs.device, name
        torch.testing.assert_close(tensor, getattr(expected, name), equal_nan=True)
    assert ece.device == probs.device and ece == expected_ece
